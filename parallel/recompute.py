"""Activation recomputation (``parallel.recompute``): ``full`` recomputes each block in backward, ``selective``
only the named regions (``parallel.recompute_modules``; parallel/regions.py), Kimi K2's "selective recomputation
to inexpensive, high-footprint stages".

| module | recomputed in backward | kept instead |
|---|---|---|
| ``norm`` | every RMSNorm (block, MLA latent and final norms) | the norm's input |
| ``swiglu`` | silu(gate) * up of dense FFNs, shared and routed experts | gate and up |
| ``mla_up_proj`` | q, k, v of the attention (q_b_proj, kv_b_proj, RoPE, the assembly) | the latents |
| ``moe_down_proj`` | the routed experts' SwiGLU and down GEMM (Kimi K2's option against expert imbalance) | gate and up |

``norm``, ``swiglu`` and ``moe_down_proj`` run their region under ``torch.utils.checkpoint`` (non-reentrant): its
inputs are saved through the saved-tensor hooks active around it, so FP8 storage (parallel/fp8_storage.py) and
activation offload compress or move them. ``mla_up_proj`` keeps the up-projections' own saves (their inputs, the
latents) and drops what attention keeps, q, k and v (64 heads x 192 + 64 x 128 per token in Kimi K2, against
2,112 latent values): attention's saved q/k/v are handed to backward as a recipe, the latents (saved through the
hooks around) and the region, which is run again when attention's backward asks for them (Megatron's "discard
the output, recompute it before use"); attention itself is not recomputed. Gradients are bitwise those without
recomputation (the same ops run again; tested in float32).

Recomputation never records statistics twice, and repeats few collectives: under context parallelism
``mla_up_proj``'s region ends with the all-to-all of q, k and v over heads (parallel/context_parallel.py), and
rebuilding the exchanged tensors attention keeps sends them again in backward (handing back the forward's result
would keep the very bytes the region drops; Megatron's recomputation under context parallelism likewise repeats its
exchange, and the planner counts the bytes: parallel/plan.py ``cp_all_to_all``); under sequence parallelism the
region starts with the all-gather of the local latents (parallel/sequence_parallel.py), which the rebuild runs
again; the up projections inside keep only the local latents too (every column region under sequence parallelism
keeps its local input and gathers it again when backward reads it, as Megatron does), so backward gathers the
latents twice: for the rebuild and for the up projections' weight gradients. The other regions hold no collective,
and a recomputed block (``full``) hands back the results its forward's collectives (the expert- and context-parallel
all-to-alls and their split sizes, the tensor-parallel all-reduces, the balance loss's counts) recorded
(``collective``: those results are kept, not re-dispatched, and the split sizes are not read from the device again),
while its max-logit probe and router counters stay off (``record_stats``). Sequence parallelism's all-gathers and
reduce-scatters are run again instead, as Megatron does (the TP peers recompute at the same point): handing back the
gathered activations would keep the whole sequence beside the 1/tp block input; the recomputed column regions keep
their local inputs and gather them once more when backward reads them.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.utils.checkpoint import checkpoint

from models import MLAttention
from parallel.regions import outer_hooks, saved_tensors_chain, wrap_region

RECOMPUTE_MODES = ("none", "full", "selective")
RECOMPUTE_MODULES = ("norm", "swiglu", "mla_up_proj", "moe_down_proj")

_REPLAYS: list["_CollectiveReplay"] = []  # the checkpointed blocks running now, innermost last


class _CollectiveReplay:
    """The results of the collectives one checkpointed block ran, recorded in its forward and handed back, in order,
    when backward recomputes it."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.replaying = False

    @contextmanager
    def active(self, replaying: bool) -> Iterator[None]:
        self.replaying = replaying
        _REPLAYS.append(self)
        try:
            yield
        finally:
            _REPLAYS.pop()


def collective(run: Callable[[], Any]) -> Any:
    """``run()`` (a collective and what reads its result), except while a checkpointed block is recomputed: then
    the result its forward recorded. Outside checkpointed blocks it just runs."""
    if not _REPLAYS:
        return run()
    replay = _REPLAYS[-1]
    if replay.replaying:
        return replay.results.pop(0)
    out = run()
    # detached aliases: the replayed result becomes the output of a new autograd node, not of the recorded one
    replay.results.append(tuple(_detached(x) for x in out) if isinstance(out, tuple) else _detached(out))
    return out


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


@contextmanager
def _no_step_stats(module: nn.Module) -> Iterator[None]:
    """A recomputation records no per-step statistics (max logits, expert loads, balance-loss values): the modules
    that keep them skip it (the float32 max-logit probe is not run again), so each forward counts once."""
    recording = [m for m in module.modules() if getattr(m, "record_stats", False)]
    for m in recording:
        m.record_stats = False
    try:
        yield
    finally:
        for m in recording:
            m.record_stats = True


def _block_contexts(block: nn.Module):
    """(forward, recompute) contexts of one checkpointed call of ``block``: its collectives' results recorded,
    then handed back with the statistics off."""
    replay = _CollectiveReplay()
    return replay.active(replaying=False), _replaying(replay, block)


@contextmanager
def _replaying(replay: _CollectiveReplay, block: nn.Module) -> Iterator[None]:
    with replay.active(replaying=True), _no_step_stats(block):
        yield


def _recomputed(module: nn.Module, method: Callable) -> Callable:
    return partial(checkpoint, method, use_reentrant=False)


class _QKVRecipe:
    """q, k and v of one attention forward, as attention's backward gets them back: the region and its inputs
    (packed by the hooks that were around it), run again once on first use, under the forward's autocast. What
    attention saves may be a view of q, k or v (per-document attention saves each document's span): it is known by
    its storage and comes back as the same view of the recomputed tensor."""

    def __init__(self, qkv_up: Callable, inputs: tuple[torch.Tensor, ...], outputs: tuple[torch.Tensor, ...]):
        self.qkv_up = qkv_up
        pack, self.unpack_input = outer_hooks()
        self.inputs = [pack(t.detach()) for t in inputs]
        device = inputs[0].device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self.index = {t.untyped_storage().data_ptr(): (i, t.storage_offset()) for i, t in enumerate(outputs)}
        self.values: tuple[torch.Tensor, ...] | None = None

    def pack(self, t: torch.Tensor) -> tuple | None:
        known = self.index.get(t.untyped_storage().data_ptr())
        if known is None:
            return None
        i, offset = known
        return self, i, t.storage_offset() - offset, tuple(t.shape), t.stride()

    @staticmethod
    def unpack(packed: tuple) -> torch.Tensor:
        recipe, i, offset, shape, stride = packed
        if recipe.values is None:
            device, enabled, dtype = recipe.autocast
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                recipe.values = recipe.qkv_up(*(recipe.unpack_input(x) for x in recipe.inputs))
        value = recipe.values[i]
        return value.as_strided(shape, stride, value.storage_offset() + offset)


def _keep_latents(attn: nn.Module) -> None:
    """``mla_up_proj`` on one MLA attention: attention's saved q, k, v become a ``_QKVRecipe``."""
    qkv_up, attend = attn.qkv_up, attn.attend
    current: list[_QKVRecipe] = []

    def up(*inputs):
        outputs = qkv_up(*inputs)
        current[:] = [_QKVRecipe(qkv_up, inputs, outputs)] if torch.is_grad_enabled() else []
        return outputs

    def core(*qkv):
        if not current:
            return attend(*qkv)
        recipe = current.pop()
        with saved_tensors_chain(recipe.pack, _QKVRecipe.unpack):
            return attend(*qkv)

    attn.qkv_up, attn.attend = up, core


def apply_recompute(model: nn.Module, mode: str, modules: list[str] | tuple[str, ...] = RECOMPUTE_MODULES) -> None:
    """``full``: each block (composable API: parameter names unchanged); ``selective``: the named regions."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode must be one of {list(RECOMPUTE_MODES)}, got {mode!r}")
    if mode == "full":
        for block in model.layers:
            composable_checkpoint(block, context_fn=partial(_block_contexts, block))
    elif mode == "selective":
        unknown = sorted(set(modules) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ValueError(f"unknown recompute module(s) {unknown}: choose from {list(RECOMPUTE_MODULES)}")
        for name in modules:
            if name == "mla_up_proj":
                for attn in model.modules():
                    if isinstance(attn, MLAttention):
                        _keep_latents(attn)
            else:
                wrap_region(model, name, _recomputed)


__all__ = ["RECOMPUTE_MODES", "RECOMPUTE_MODULES", "apply_recompute", "collective"]
