"""Named regions of the model that the memory techniques act on (parallel/recompute.py, parallel/fp8_storage.py,
parallel/activation_offload.py), each a method of a model module that the technique wraps in place (instance
attribute, so parameter names, state dicts and the other modules stay as they are); and the chained saved-tensor
hooks they use (``saved_tensors_chain``: what one technique leaves alone reaches the one around it).

| region | method | what autograd keeps there |
|---|---|---|
| ``norm`` | ``RMSNorm.forward`` (block, MLA latent and final norms) | the float32 statistics and normalised copy |
| ``swiglu`` | ``act`` of ``FeedForward`` (dense, shared experts) and ``GroupedExperts`` (routed) | gate, silu(gate), up |
| ``mla_up_proj`` | ``MLAttention.qkv_up`` (q_b_proj, kv_b_proj, RoPE, the q/k/v assembly) with ``attend`` | q, k, v |
| ``moe_down_proj`` | ``GroupedExperts.act_down``: the routed SwiGLU and down GEMM | gate, up, the SwiGLU output |
| ``moe_up`` | ``GroupedExperts.up_gemms``: the routed gate/up GEMMs | their input rows (moe_up_input) |
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from models import FeedForward, GroupedExperts, RMSNorm

REGIONS: dict[str, tuple[tuple[type, ...], str]] = {
    "norm": ((RMSNorm,), "forward"),
    "swiglu": ((FeedForward, GroupedExperts), "act"),
    "moe_down_proj": ((GroupedExperts,), "act_down"),
    "moe_up": ((GroupedExperts,), "up_gemms"),
}

Wrapper = Callable[[nn.Module, Callable], Callable]
_WEIGHT_VIEWS = ("ToCopyBackward", "TransposeBackward", "TBackward", "ViewBackward", "PermuteBackward")


def param_storages(module: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def is_weight(t: torch.Tensor, storages: set[int]) -> bool:
    """Whether a tensor autograd saves is a parameter, a view of one or its cast to the compute dtype (autocast over
    float32 parameters): the techniques that compress or move saved activations leave those alone."""
    if t.untyped_storage().data_ptr() in storages:
        return True
    node = t.grad_fn
    for _ in range(4):
        if node is None or not type(node).__name__.startswith(_WEIGHT_VIEWS):
            return False
        node = node.next_functions[0][0] if node.next_functions else None
        if type(node).__name__ == "AccumulateGrad":
            return isinstance(node.variable, nn.Parameter)
    return False


def wrap_region(model: nn.Module, region: str, wrapper: Wrapper) -> int:
    """Replace ``region``'s method on every module of ``model`` that has it by ``wrapper(module, method)``; returns
    how many were wrapped."""
    types, name = REGIONS[region]
    n = 0
    for module in model.modules():
        if isinstance(module, types):
            setattr(module, name, wrapper(module, getattr(module, name)))
            n += 1
    return n


def outer_hooks() -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
    """The saved-tensor hooks active now, (pack, unpack), identity where none: a record that keeps its own tensors
    for backward (a recomputed region's inputs, a column region's local input) hands them to these."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return outer if outer is not None else (_same, _same)


def _same(x: Any) -> Any:
    return x


@contextmanager
def saved_tensors_chain(pack: Callable[[torch.Tensor], Any], unpack: Callable[[Any], torch.Tensor],
                        pass_on: bool = False) -> Iterator[None]:
    """``torch.autograd.graph.saved_tensors_hooks(pack, unpack)``, except that a tensor ``pack`` declines (returns
    None) goes to the hooks that were active around it (torch uses only the innermost pair): so FP8 storage,
    activation offload and recomputation stack, each taking what it handles. ``pass_on``: what ``pack`` returns is
    a dataclass whose tensor fields go on to the hooks around (FP8 tiles are then offloaded like the rest)."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    onward = pass_on and outer is not None

    def pack_chained(t: torch.Tensor) -> tuple[bool, Any]:
        mine = pack(t)
        if mine is not None:
            return True, (_map_tensors(mine, outer[0]) if onward else mine)
        return False, (outer[0](t) if outer is not None else t)

    def unpack_chained(packed: tuple[bool, Any]) -> torch.Tensor:
        mine, value = packed
        if mine:
            return unpack(_map_tensors(value, outer[1]) if onward else value)
        return outer[1](value) if outer is not None else value

    with torch.autograd.graph.saved_tensors_hooks(pack_chained, unpack_chained):
        yield


def _map_tensors(obj: Any, fn: Callable) -> Any:
    """A copy of dataclass ``obj`` with ``fn`` applied to its fields named in ``obj.stored`` (its tensors, or what
    the hooks around made of them)."""
    return dataclasses.replace(obj, **{name: fn(getattr(obj, name)) for name in obj.stored})


__all__ = ["REGIONS", "is_weight", "outer_hooks", "param_storages", "saved_tensors_chain", "wrap_region"]
