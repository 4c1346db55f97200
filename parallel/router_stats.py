"""Router statistics when ranks split each sequence (sequence parallelism over TP, context parallelism over CP).

The sequence-wise balance loss (``models.moe.Router``, DeepSeek-V3 eq. 17-20) is per sequence: its token counts
``f_i`` and probability means ``P_i`` cover the whole sequence. With the sequence split over n ranks,
``apply_sequence_shards`` gives each router ``sequence_shards = (n, total, grad_scale)``: ``total`` all-reduces its
[S, 2E] counts and means over the groups that split the sequences (TP under sequence parallelism, then CP; integer
counts and a sum of n means), inside ``collective`` so a recomputed block (``recompute: full``) gets its forward's
result back. Every rank's loss then has one process's value, and its gradient reaches only its own tokens'
scores: the TP ranks' gradients are summed (ZeRO-1 sums the router's over the stage), the CP ranks' averaged like
every replica's, so ``grad_scale`` = cp makes the total one process's gradient (Megatron likewise all-reduces the
counts over tp x cp and keeps the probabilities local). The expert loads of the aux-loss-free bias update are
summed over the stage by ``launch.hooks.RouterBiasUpdate`` (the trainer passes ``ParallelGroups.stage``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models import Router
from parallel.recompute import collective


def apply_sequence_shards(model: nn.Module, sp: tuple[Any, int], cp: tuple[Any, int]) -> None:
    """``sp``, ``cp``: (process group, size) of the TP group under sequence parallelism (size 1 without) and of the
    CP group; nothing when neither splits the sequences."""
    groups = [(g, size) for g, size in (sp, cp) if size > 1]
    if not groups:
        return
    n = sp[1] * cp[1]

    def total(t: torch.Tensor) -> torch.Tensor:
        def all_reduce() -> torch.Tensor:
            out = t.contiguous().clone()
            for group, _ in groups:
                dist.all_reduce(out, group=group)
            return out
        return collective(all_reduce)

    for module in model.modules():
        if isinstance(module, Router):
            module.sequence_shards = (n, total, cp[1])


__all__ = ["apply_sequence_shards"]
