"""Expert parallelism: each rank of an ``ep_group`` holds ``E / ep`` routed experts and exchanges tokens.

``ExpertParallelExperts`` replaces ``models.moe.GroupedExperts`` inside each MoE (same parameter names, local
stacks ``[E/ep, ...]``). Rank r of the EP group owns global experts ``[r*E/ep, (r+1)*E/ep)``. Forward takes the
rank's own tokens sorted by GLOBAL expert id plus the global counts, and:

1. exchanges counts (all_to_all_single, E ints) -> how many rows each peer sends for each local expert;
2. dispatches rows (all_to_all_single, uneven splits): received rows are grouped by source rank, then local
   expert;
3. permutes them to local-expert order, runs ``GroupedExperts`` math on the local stack (grouped or loop path,
   ``use_grouped``), un-permutes;
4. combines (all_to_all_single back with the splits swapped) -> outputs in the caller's row order.

Autograd: a small Function whose backward is the swapped all-to-all (``torch.distributed.nn.functional``'s
version works on gloo too but is deprecated in torch 2.13). Expert gradients on the owner rank therefore sum
the contributions of every rank of the EP group. Reducing expert gradients over ``edp_group`` (replicas) is
the optimizer's job; with per-rank mean losses divide the sum by ``dp_size`` (not ``edp_size``) to match the
dense parameters' average over ``dp_group``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models import GroupedExperts
from muonclip.placement import Placement
from parallel.recompute import collective


class _AllToAll(torch.autograd.Function):
    """Row all-to-all with uneven splits; the backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group

        def exchange() -> torch.Tensor:
            out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
            return out
        return collective(exchange)  # a recomputed block gets its forward's result back

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def local_expert_order(recv_counts_SL: torch.Tensor, n: int) -> torch.Tensor:
    """Index that reorders rows received as (source rank, local expert) blocks into (local expert, source).

    ``recv_counts_SL[s, l]``: rows from source ``s`` for local expert ``l``; ``n``: their total (known on the host
    from the split sizes, so no ``repeat_interleave`` reads a size from the device). Pure; returns int64 [n].
    """
    S, L = recv_counts_SL.shape
    flat = recv_counts_SL.reshape(-1)
    starts_SL = (torch.cumsum(flat, 0) - flat).view(S, L)
    lengths_LS = recv_counts_SL.t().reshape(-1)
    starts_LS = starts_SL.t().reshape(-1)
    block_start = torch.repeat_interleave(torch.cumsum(lengths_LS, 0) - lengths_LS, lengths_LS, output_size=n)
    return (torch.repeat_interleave(starts_LS, lengths_LS, output_size=n) + torch.arange(n, device=flat.device)
            - block_start)


class ExpertParallelExperts(GroupedExperts):
    """Local slice of a ``GroupedExperts`` stack plus all-to-all dispatch/combine over ``ep_group``."""

    def __init__(self, full: GroupedExperts, ep_rank: int, ep_size: int, ep_group: Any):
        n_global, inter_dim, dim = full.gate_proj.shape
        if n_global % ep_size:
            raise ValueError(f"expert parallel: n_routed_experts ({n_global}) must be divisible by ep ({ep_size})")
        n_local = n_global // ep_size
        super().__init__(0, dim, inter_dim, use_grouped=full.use_grouped)
        self.n_global, self.n_local = n_global, n_local
        self.expert_offset = ep_rank * n_local
        self.ep_rank, self.ep_size, self.ep_group = ep_rank, ep_size, ep_group
        sl = slice(self.expert_offset, self.expert_offset + n_local)
        for name in ("gate_proj", "up_proj", "down_proj"):
            full_stack = getattr(full, name)
            setattr(self, name, nn.Parameter(full_stack.detach()[sl].clone(), requires_grad=full_stack.requires_grad))

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if counts_E.numel() != self.n_global:
            raise ValueError(f"expert parallel: got counts for {counts_E.numel()} experts, expected {self.n_global}")
        recv_counts_SL, send_splits, recv_splits = collective(lambda: self._exchange_counts(counts_E))
        x_recv = _all_to_all(x_TD, recv_splits, send_splits, self.ep_group)
        order = local_expert_order(recv_counts_SL, sum(recv_splits))
        x_local = x_recv[order]
        y_local = super().forward(x_local, recv_counts_SL.sum(0))
        if x_local.shape[0] == 0:  # keep the all-to-alls and the local params in the graph on every rank
            y_local = y_local + x_local.sum() * 0 + sum(p.sum() for p in self.parameters()) * 0
        # back to the received order as a gather by the inverse permutation: its backward keeps the index, where
        # index_copy's kept y_local (the rows times dim)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        y_recv = y_local.index_select(0, inverse)
        return _all_to_all(y_recv, send_splits, recv_splits, self.ep_group)

    def _exchange_counts(self, counts_E: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """Rows each source sends this rank per local expert [P, L], and the split sizes of both all-to-alls."""
        P, L = self.ep_size, self.n_local
        counts_E = counts_E.to(torch.int64)
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.ep_group)  # [P*L] from each source: its L counts
        recv_counts_SL = recv_counts.view(P, L)
        # the one host synchronisation of the MoE step: all_to_all_single takes its split sizes as host lists
        send_splits, recv_splits = torch.stack([counts_E.view(P, L).sum(1), recv_counts_SL.sum(1)]).tolist()
        return recv_counts_SL, send_splits, recv_splits

    def extra_repr(self) -> str:
        return (f"experts {self.expert_offset}..{self.expert_offset + self.n_local - 1} of {self.n_global}, "
                f"ep_rank={self.ep_rank}/{self.ep_size}, use_grouped={self.use_grouped}")


def apply_expert_parallel(model: nn.Module, ep_rank: int, ep_size: int, ep_group: Any) -> None:
    """Replace every ``GroupedExperts`` (module named ``experts`` of an MoE) with its EP-local slice, in place."""
    if ep_size == 1:
        return
    for block in model.layers:
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, GroupedExperts) and not isinstance(experts, ExpertParallelExperts):
            block.mlp.experts = ExpertParallelExperts(experts, ep_rank, ep_size, ep_group)


def expert_placements(model: nn.Module) -> dict[str, Placement]:
    """``expert`` placement for every routed-expert stack (EP-sharded or not)."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            for p_name, _ in mod.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}"] = Placement("expert")
    return out


__all__ = ["ExpertParallelExperts", "apply_expert_parallel", "expert_placements", "local_expert_order"]
