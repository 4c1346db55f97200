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

The ``ep_group`` is whatever ``ParallelDims`` built: under sequence parallelism it is folded over the stage's
ranks and may span TP ranks (each routes its own tokens), without it the ranks of one tp index (parallel/dims.py).

Expert tensor parallelism (``etp > 1``, Megatron's ``--expert-tensor-parallel-size``): the ``etp_group``'s ranks hold
column slices ``[E/ep, I/etp, D]`` of each local expert's gate/up and row slices ``[E/ep, D, I/etp]`` of its down
projection (slices in etp-rank order). After the EP all-to-all the received rows are all-gathered over etp (every
peer's rows, uneven), the grouped GEMMs on the slices give each rank a partial output for all of them, and an uneven
reduce-scatter sums the partials and hands each peer back its rows (the backward: the same two the other way
round). Both go through ``all_to_all_single`` (gloo has no uneven list all-gather/reduce-scatter): the gather sends
this rank's rows to every peer (an etp x transient of its rows), the reduce-scatter each peer its rows of the
partial output; ``bytes_sent`` counts what leaves the rank. The etp peers' counts are all-gathered before the one
``.tolist()`` of the MoE forward, so ETP adds no host synchronisation.

Autograd: a small Function whose backward is the swapped all-to-all (``torch.distributed.nn.functional``'s
version works on gloo too but is deprecated in torch 2.13). Expert gradients on the owner rank therefore sum
the contributions of every rank of the EP group. Reducing expert gradients over ``edp_group`` (replicas) is
the optimizer's job; with per-rank mean losses divide the sum by ``dp_size`` (not ``edp_size``) to match the
dense parameters' average over ``dp_group``.
"""
from __future__ import annotations

from collections import defaultdict
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


def _gather_rows(x: torch.Tensor, rows: list[int], me: int, group: Any, sent: dict[str, int]) -> torch.Tensor:
    """Every etp peer's rows (``rows[k]`` from peer k), in peer order: this rank's rows sent to each peer."""
    out = x.new_empty((sum(rows),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous().repeat(len(rows), *([1] * (x.ndim - 1))), rows,
                           [x.shape[0]] * len(rows), group=group)
    sent["etp_all_gather"] += (len(rows) - 1) * x.numel() * x.element_size()
    return out


def _sum_rows(y: torch.Tensor, rows: list[int], me: int, group: Any, sent: dict[str, int]) -> torch.Tensor:
    """This rank's rows of the sum over the etp peers of ``y`` (every peer's rows, in peer order): each peer is sent
    its rows of ``y``, the received blocks summed."""
    K, R = len(rows), rows[me]
    out = y.new_empty((K * R,) + tuple(y.shape[1:]))
    dist.all_to_all_single(out, y.contiguous(), [R] * K, rows, group=group)
    sent["etp_reduce_scatter"] += (y.shape[0] - R) * (y.numel() // max(y.shape[0], 1)) * y.element_size()
    return out.view((K, R) + tuple(y.shape[1:])).sum(0)


class _EtpRows(torch.autograd.Function):
    """The uneven all-gather (``gather``) or reduce-scatter of rows over the etp group; each the other's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: list[int], gather: bool, me: int, group: Any,
                sent: dict[str, int]) -> torch.Tensor:
        ctx.args = (rows, gather, me, group, sent)
        return collective(lambda: (_gather_rows if gather else _sum_rows)(x, rows, me, group, sent))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, gather, me, group, sent = ctx.args
        return _EtpRows.apply(grad, rows, not gather, me, group, sent), None, None, None, None, None


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
    """Local slice of a ``GroupedExperts`` stack plus all-to-all dispatch/combine over ``ep_group`` (and, with
    ``etp_size > 1``, column/row slices of each expert with the row gather/reduce-scatter over ``etp_group``)."""

    def __init__(self, full: GroupedExperts, ep_rank: int, ep_size: int, ep_group: Any, etp_rank: int = 0,
                 etp_size: int = 1, etp_group: Any = None):
        n_global, inter_dim, dim = full.gate_proj.shape
        if n_global % ep_size:
            raise ValueError(f"expert parallel: n_routed_experts ({n_global}) must be divisible by ep ({ep_size})")
        if inter_dim % etp_size:
            raise ValueError(f"expert tensor parallel: moe_inter_dim ({inter_dim}) must be divisible by etp "
                             f"({etp_size})")
        n_local, cols = n_global // ep_size, inter_dim // etp_size
        super().__init__(0, dim, cols, use_grouped=full.use_grouped)
        self.n_global, self.n_local = n_global, n_local
        self.expert_offset = ep_rank * n_local
        self.ep_rank, self.ep_size, self.ep_group = ep_rank, ep_size, ep_group
        self.etp_rank, self.etp_size, self.etp_group = etp_rank, etp_size, etp_group
        self.bytes_sent: dict[str, int] = defaultdict(int)  # the etp row exchanges' bytes leaving this rank
        sl = slice(self.expert_offset, self.expert_offset + n_local)
        for name, dim_ in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 2)):
            full_stack = getattr(full, name)
            local = full_stack.detach()[sl].narrow(dim_, etp_rank * cols, cols)
            setattr(self, name, nn.Parameter(local.clone(), requires_grad=full_stack.requires_grad))

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if counts_E.numel() != self.n_global:
            raise ValueError(f"expert parallel: got counts for {counts_E.numel()} experts, expected {self.n_global}")
        recv_counts_SL, send_splits, recv_splits, etp_rows = collective(lambda: self._exchange_counts(counts_E))
        x_recv = _all_to_all(x_TD, recv_splits, send_splits, self.ep_group) if self.ep_size > 1 else x_TD
        if self.etp_size > 1:  # every etp peer's rows: sources (peer, ep source), [etp * P, L] counts
            x_recv = _EtpRows.apply(x_recv, etp_rows, True, self.etp_rank, self.etp_group, self.bytes_sent)
        order = local_expert_order(recv_counts_SL, x_recv.shape[0])
        x_local = x_recv[order]
        y_local = super().forward(x_local, recv_counts_SL.sum(0))
        if x_local.shape[0] == 0:  # keep the all-to-alls and the local params in the graph on every rank
            y_local = y_local + x_local.sum() * 0 + sum(p.sum() for p in self.parameters()) * 0
        # back to the received order as a gather by the inverse permutation: its backward keeps the index, where
        # index_copy's kept y_local (the rows times dim)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        y_recv = y_local.index_select(0, inverse)
        if self.etp_size > 1:  # the partial outputs summed over etp, this rank's rows back
            y_recv = _EtpRows.apply(y_recv, etp_rows, False, self.etp_rank, self.etp_group, self.bytes_sent)
        return _all_to_all(y_recv, send_splits, recv_splits, self.ep_group) if self.ep_size > 1 else y_recv

    def _exchange_counts(self, counts_E: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
        """Rows each source sends per local expert ([P, L]; with etp, [etp * P, L]: every etp peer's sources in
        peer order), the split sizes of both all-to-alls and the rows of each etp peer."""
        P, L, K = self.ep_size, self.n_local, self.etp_size
        counts_E = counts_E.to(torch.int64)
        recv_counts = counts_E
        if P > 1:
            recv_counts = torch.empty_like(counts_E)
            dist.all_to_all_single(recv_counts, counts_E, group=self.ep_group)  # [P*L] from each source: its L counts
        counts_SL = recv_counts.view(P, L)
        if K > 1:
            gathered = counts_E.new_empty(K * P * L)
            dist.all_gather_single(gathered, recv_counts, group=self.etp_group)
            counts_SL = gathered.view(K * P, L)
        # the one host synchronisation of the MoE step: the collectives take their split sizes as host lists
        sizes = torch.cat([counts_E.view(P, L).sum(1), recv_counts.view(P, L).sum(1),
                           counts_SL.view(K, P * L).sum(1)]).tolist()
        return counts_SL, sizes[:P], sizes[P:2 * P], sizes[2 * P:]

    def extra_repr(self) -> str:
        return (f"experts {self.expert_offset}..{self.expert_offset + self.n_local - 1} of {self.n_global}, "
                f"ep_rank={self.ep_rank}/{self.ep_size}, etp_rank={self.etp_rank}/{self.etp_size}, "
                f"use_grouped={self.use_grouped}")


# the dimension of each stack that expert tensor parallelism splits: gate/up by columns (their I rows), down by rows
ETP_SHARD_DIMS = {"gate_proj": 1, "up_proj": 1, "down_proj": 2}


def apply_expert_parallel(model: nn.Module, ep_rank: int, ep_size: int, ep_group: Any, etp_rank: int = 0,
                          etp_size: int = 1, etp_group: Any = None) -> None:
    """Replace every ``GroupedExperts`` (module named ``experts`` of an MoE) with its EP-local (and ETP-sliced)
    stacks, in place."""
    if ep_size == 1 and etp_size == 1:
        return
    for block in model.layers:
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, GroupedExperts) and not isinstance(experts, ExpertParallelExperts):
            block.mlp.experts = ExpertParallelExperts(experts, ep_rank, ep_size, ep_group, etp_rank, etp_size,
                                                      etp_group)


def expert_placements(model: nn.Module, tp_copies: bool = True) -> dict[str, Placement]:
    """``expert`` placement for every routed-expert stack (EP-sharded or not); ``tp_copies``: False under sequence
    parallelism, where the expert groups are folded over the TP ranks (parallel/dims.py). An ETP-sliced stack's
    placement names the dimension it is split along and the ``etp_group`` (as ``tp_group``)."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            etp = getattr(mod, "etp_size", 1)
            for p_name, _ in mod.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}"] = (Placement("expert", ETP_SHARD_DIMS[p_name], mod.etp_group, False)
                                               if etp > 1 else Placement("expert", tp_copies=tp_copies))
    return out


__all__ = ["ETP_SHARD_DIMS", "ExpertParallelExperts", "apply_expert_parallel", "expert_placements", "local_expert_order"]
