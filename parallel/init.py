"""Sharded initialisation: allocate only this rank's shards of a model built on ``meta`` and parallelized, then
fill each at its global position from the per-parameter generators of models/init.py.

Each rank allocates its stage's layers, its tensor-parallel slices and its expert-parallel experts, nothing
else (``load_hf_sharded`` then fills them from a released checkpoint, reading only those slices). The weights equal, element for element, those of one
process initialising the whole model with the same seed, so losses do not depend on the layout. Peak memory is
the rank's shard plus, transiently, one full tensor-parallel matrix (drawn whole, then sliced); expert stacks
draw only the rank's own experts (expert tensor parallelism: each drawn whole, then sliced).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.init import InitRule, fill_, reset_step_stats_
from muonclip.placement import Placement


def init_sharded(model: nn.Module, rules: dict[str, InitRule], global_shapes: dict[str, tuple[int, ...]],
                 placements: dict[str, Placement], ep_rank: int, seed: int, device: torch.device) -> None:
    """``rules``/``global_shapes``: from the plain model before parallelize (``model.init_rules()`` and its
    parameter shapes); ``placements``: what parallelize returned; ``ep_rank``: this rank's expert-parallel index."""
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        placement = placements.get(name)
        if placement is not None and placement.kind == "expert":
            fill_(p, rules[name], seed, name, expert_offset=ep_rank * p.shape[0], shard=_etp_shard(p, placement,
                                                                                                    global_shapes[name]))
        elif placement is not None and placement.kind == "tp_sharded" and tuple(p.shape) != global_shapes[name]:
            dim = placement.shard_dim
            offset = dist.get_rank(placement.tp_group) * p.shape[dim]  # slices in tp-rank order
            fill_(p, rules[name], seed, name, shard=(dim, offset, global_shapes[name]))
        else:
            fill_(p, rules[name], seed, name)
    reset_step_stats_(model)


@torch.no_grad()
def load_hf_sharded(model: nn.Module, global_shapes: dict[str, tuple[int, ...]], placements: dict[str, Placement],
                    ep_rank: int, source, targets: dict[str, torch.Tensor] | None = None,
                    row_shards: dict[str, Any] | None = None) -> None:
    """Overwrite this rank's (allocated) parameters with a released checkpoint's, reading only this rank's
    slices: its stage's layers, its experts, its tensor-parallel slices (``source``: ``models.hf_interop.HFTensors``).
    ``targets``: {name: tensor} to fill instead of the parameter (the optimizer's float32 masters); a target with
    fewer rows than the parameter takes the rows ``row_shards`` names (ZeRO-1's sliced masters)."""
    targets, row_shards = targets or {}, row_shards or {}
    for name, p in model.named_parameters():
        placement = placements.get(name)
        kwargs = {}
        if placement is not None and placement.kind == "expert":
            shard = _etp_shard(p, placement, global_shapes[name])
            kwargs = {"expert_offset": ep_rank * p.shape[0], "shard": shard and shard[:2]}
        elif placement is not None and placement.kind == "tp_sharded" and tuple(p.shape) != global_shapes[name]:
            dim = placement.shard_dim
            kwargs = {"shard": (dim, dist.get_rank(placement.tp_group) * p.shape[dim])}
        target, value = targets.get(name, p), source.local(name, tuple(p.shape), **kwargs)
        if name in row_shards and target.shape != value.shape:
            value = value.narrow(0, row_shards[name].start, row_shards[name].rows)
        target.copy_(value)


def _etp_shard(p: torch.Tensor, placement: Placement, global_shape: tuple[int, ...]) -> tuple | None:
    """(dim, offset, global shape) of an expert stack's expert-tensor-parallel slice (slices in etp-rank order), or
    None for a stack of whole experts."""
    if placement.shard_dim is None:
        return None
    dim = placement.shard_dim
    return dim, dist.get_rank(placement.tp_group) * p.shape[dim], global_shape


__all__ = ["init_sharded", "load_hf_sharded"]
