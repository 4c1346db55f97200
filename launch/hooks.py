"""Cross-cutting weight edits run after every optimizer step (registered once the optimizer exists).

- ``RouterBiasUpdate``: DeepSeek-V3 aux-loss-free balancing. Stacks ``expert_load_E`` of every MoE router into
  one [L, E] tensor, sums it over the ranks that saw different tokens with ONE all_reduce, then calls
  ``Router.update_bias`` per layer. Every rank applies the same update, so the biases stay identical. A step the
  optimizer skipped (``step_ok`` false: a non-finite gradient norm, muonclip/skip_nonfinite.py) keeps the old biases,
  decided on the device like the step: the update reads zero loads there, and sign(0) = 0 moves no bias.
- QK-Clip is ``muonclip.QKClip`` (one MAX all_reduce for all layers); with clipping disabled the trainer
  registers it with ``tau=inf`` so the per-head max logits are still reduced and logged.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


class RouterBiasUpdate:
    """``hook(optimizer)`` after ``optimizer.step()``; ``last_loads`` keeps the reduced [L, E] loads for logging."""

    def __init__(self, routers: Sequence[Any], process_group: Any = None):
        self.routers = list(routers)
        self.process_group = process_group
        self.last_loads: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, optimizer: Any = None, *_args: Any, **_kwargs: Any) -> None:
        if not self.routers:
            return
        loads_LE = torch.stack([r.expert_load_E.float() for r in self.routers])
        if self.process_group is not None:
            dist.all_reduce(loads_LE, op=dist.ReduceOp.SUM, group=self.process_group)
        ok = getattr(optimizer, "step_ok", None)
        used_LE = loads_LE if ok is None else torch.where(ok, loads_LE, 0)  # a skipped step: no load, no move
        for router, load_E in zip(self.routers, used_LE):
            router.update_bias(load_E)
        self.last_loads = loads_LE

    def loads_list(self) -> list[torch.Tensor] | None:
        return None if self.last_loads is None else list(self.last_loads)


def register_post_step(optimizer: Any, hook: Callable[[Any], None]) -> Callable[[Any], None] | None:
    """Run ``hook(optimizer)`` after every ``optimizer.step()``.

    Returns None when the optimizer supports ``register_step_post_hook`` (torch optimizers); otherwise returns
    ``hook`` so the caller runs it itself right after ``step()``, passing the optimizer.
    """
    if hasattr(optimizer, "register_step_post_hook"):
        optimizer.register_step_post_hook(lambda opt, args, kwargs: hook(opt))
        return None
    return hook
