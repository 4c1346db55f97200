"""Cross-cutting weight edits run after every optimizer step (registered once the optimizer exists).

- ``RouterBiasUpdate``: DeepSeek-V3 aux-loss-free balancing. Stacks ``expert_load_E`` of every MoE router into
  one [L, E] tensor, sums it over the ranks that saw different tokens with ONE all_reduce, then calls
  ``Router.update_bias`` per layer. Every rank applies the same update, so the biases stay identical.
- QK-Clip is ``muonclip.QKClip`` (one MAX all_reduce for all layers); with clipping disabled the trainer
  registers it with ``tau=inf`` so the per-head max logits are still reduced and logged.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


class RouterBiasUpdate:
    """``hook()`` after ``optimizer.step()``; ``last_loads`` keeps the reduced [L, E] loads for logging."""

    def __init__(self, routers: Sequence[Any], process_group: Any = None):
        self.routers = list(routers)
        self.process_group = process_group
        self.last_loads: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, *_args: Any, **_kwargs: Any) -> None:
        if not self.routers:
            return
        loads_LE = torch.stack([r.expert_load_E.float() for r in self.routers])
        if self.process_group is not None:
            dist.all_reduce(loads_LE, op=dist.ReduceOp.SUM, group=self.process_group)
        for router, load_E in zip(self.routers, loads_LE):
            router.update_bias(load_E)
        self.last_loads = loads_LE

    def loads_list(self) -> list[torch.Tensor] | None:
        return None if self.last_loads is None else list(self.last_loads)


def register_post_step(optimizer: Any, hook: Callable[[], None]) -> Callable[[], None] | None:
    """Run ``hook()`` after every ``optimizer.step()``.

    Returns None when the optimizer supports ``register_step_post_hook`` (torch optimizers); otherwise returns
    ``hook`` so the caller runs it itself right after ``step()``.
    """
    if hasattr(optimizer, "register_step_post_hook"):
        optimizer.register_step_post_hook(lambda opt, args, kwargs: hook())
        return None
    return hook
