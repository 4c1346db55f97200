"""Collectives used by ``DistributedMuonClip``, with a per-rank count of the bytes each one sends.

``CountingComm`` wraps the torch.distributed calls the optimizer makes (reduce, broadcast, all_reduce,
reduce_scatter_single, all_gather_single, all_to_all_single) and adds to ``bytes_sent[op]`` the bytes a rank sends
under the usual pipelined ring/chain algorithms: reduce and broadcast (G-1)/G of the buffer (every rank but one
sends it once: the group's average), all-reduce 2(G-1)/G, reduce-scatter and all-gather (G-1)/G of the whole buffer
(G-1 segments of it: every other rank's, on their way round the ring; its own, in all-gather's case), all-to-all
whatever leaves for other ranks. Groups of size 1 cost nothing. Every call takes ``async_op`` and then returns the
work handle (None where nothing was sent).

``orthogonalize_once`` runs Newton–Schulz for the Muon matrices one dp index owns across its tensor-parallel
group: each matrix is orthogonalised on exactly one tp rank (its ``ns_rank``). Matrix shards are gathered
there and the result's slices are sent back; a matrix that is whole on every tp rank (replicated or an expert
stack) is orthogonalised there and the result sent to the peers. Two ``all_to_all_single`` calls in all.
On each rank, the matrices it orthogonalises that share a shape (and ns settings) go through Newton–Schulz as one
batch (``orthogonalize_batched``): one batched call per shape instead of one call per matrix.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


# gloo reduces a buffer to one rank more slowly than it all-reduces it from 4-8 MB on, although all-reduce sends
# twice the bytes (benchmarks/collectives.py, 2 gloo ranks, CPU, 2026-12-01: 2 MB 3.4 vs 5.9 ms, 4 MB 5.6 vs 6.1,
# 8 MB 12.6 vs 10.1, 32 MB 47.4 vs 43.9, 64 MB 111 vs 79); NCCL's reduce is the cheaper one
GLOO_ALL_REDUCE_MIN_BYTES = 4 * 2**20


def reduce_by_all_reduce(nbytes: int, backend: str, min_bytes: int | None = None) -> bool:
    """Whether a ZeRO-1 gradient bucket of ``nbytes`` is reduced with an all-reduce (its owner then reads it)
    instead of a reduce to its owner: on gloo from ``min_bytes`` (default GLOO_ALL_REDUCE_MIN_BYTES) on."""
    if min_bytes is not None:
        return nbytes >= min_bytes
    return backend == "gloo" and nbytes >= GLOO_ALL_REDUCE_MIN_BYTES


class CountingComm:
    def __init__(self) -> None:
        self.bytes_sent: dict[str, int] = defaultdict(int)

    def _count(self, op: str, nbytes: int) -> None:
        self.bytes_sent[op] += nbytes

    def reduce(self, t: Tensor, dst: int, group: Any, async_op: bool = False) -> Any:
        """Sum ``t`` over ``group`` into ``t`` on its rank ``dst`` (a group rank); other ranks' ``t`` is scratch."""
        G = group_size(group)
        if G == 1:
            return None
        self._count("reduce", (G - 1) * t.numel() * t.element_size() // G)
        return dist.reduce(t, dist.get_global_rank(group, dst), op=dist.ReduceOp.SUM, group=group,
                           async_op=async_op)

    def broadcast(self, t: Tensor, src: int, group: Any, async_op: bool = False) -> Any:
        G = group_size(group)
        if G == 1:
            return None
        self._count("broadcast", (G - 1) * t.numel() * t.element_size() // G)
        return dist.broadcast(t, dist.get_global_rank(group, src), group=group, async_op=async_op)

    def reduce_scatter(self, out: Tensor, t: Tensor, group: Any, async_op: bool = False) -> Any:
        """Sum ``t`` (G equal segments) over ``group``; segment r of the sum lands in ``out`` on group rank r (``out``
        may be that segment of ``t`` itself: in place)."""
        G = group_size(group)
        if G == 1:
            return None
        self._count("reduce_scatter", (G - 1) * out.numel() * out.element_size())
        return dist.reduce_scatter_single(out, t, op=dist.ReduceOp.SUM, group=group, async_op=async_op)

    def all_gather(self, out: Tensor, t: Tensor, group: Any, async_op: bool = False) -> Any:
        """Segment r of ``out`` <- ``t`` of group rank r (``t`` may be this rank's segment of ``out``: in place)."""
        G = group_size(group)
        if G == 1:
            return None
        self._count("all_gather", (G - 1) * t.numel() * t.element_size())
        return dist.all_gather_single(out, t, group=group, async_op=async_op)

    def all_reduce(self, t: Tensor, op: Any, group: Any, async_op: bool = False) -> Any:
        G = dist.get_world_size(group)
        if G == 1:
            return None
        self._count("all_reduce", 2 * (G - 1) * t.numel() * t.element_size() // G)
        return dist.all_reduce(t, op=op, group=group, async_op=async_op)

    def all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> None:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        me = dist.get_rank(group)
        self._count("all_to_all", (inp.numel() - in_splits[me]) * inp.element_size())


@dataclass
class NSItem:
    """One Muon matrix (or expert stack) owned by this dp index: its local momentum-applied update."""

    update: Tensor  # tp shard or whole tensor, in the Newton–Schulz dtype
    ns_rank: int  # tp rank that orthogonalises it
    shard_dim: int | None = None  # None: whole on every tp rank
    tp_sizes: tuple[int, ...] | None = None  # sizes along shard_dim on each tp rank
    ns_steps: int = 5
    ns_eps: float = 1e-7


def _shard_numel(item: NSItem, rank: int) -> int:
    if item.shard_dim is None:
        return item.update.numel()
    return item.update.numel() // item.update.shape[item.shard_dim] * item.tp_sizes[rank]


def _shard_shape(item: NSItem, rank: int) -> list[int]:
    shape = list(item.update.shape)
    shape[item.shard_dim] = item.tp_sizes[rank]
    return shape


def _cat(parts: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)


def orthogonalize_once(items: Sequence[NSItem], orth: Callable[[Tensor, NSItem], Tensor], comm: CountingComm,
                       tp_group: Any = None) -> list[Tensor]:
    """Orthogonalised update for each item, shaped like ``item.update`` (this rank's shard or the whole).

    All ranks of ``tp_group`` must pass the same items in the same order (same params, same ``ns_rank``).
    """
    T = group_size(tp_group)
    if T == 1:
        outs = orthogonalize_batched({i: it.update for i, it in enumerate(items)}, items, orth)
        return [outs[i] for i in range(len(items))]
    if not items:
        return []
    me = dist.get_rank(tp_group)
    mine = [i for i, it in enumerate(items) if it.ns_rank == me]
    fulls = _gather_shards(items, mine, me, T, comm, tp_group)
    outs = orthogonalize_batched(fulls, items, orth)
    return _scatter_results(items, outs, me, T, comm, tp_group)


def orthogonalize_batched(fulls: dict[int, Tensor], items: Sequence[NSItem],
                          orth: Callable[[Tensor, NSItem], Tensor]) -> dict[int, Tensor]:
    """``{i: orth(fulls[i], items[i])}``, with every group of two or more matrices of the same [A, B] shape, ns
    settings, dtype and device orthogonalised by ONE batched call (expert stacks [E, A, B] join as E matrices).
    Each matrix is still normalised and iterated on its own, so the results equal the per-matrix ones up to
    the rounding of batched vs single matmul kernels."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, full in fulls.items():
        it = items[i]
        groups[(tuple(full.shape[-2:]), it.ns_steps, it.ns_eps, full.dtype, full.device)].append(i)
    outs: dict[int, Tensor] = {}
    for members in groups.values():
        if len(members) == 1:
            i = members[0]
            outs[i] = orth(fulls[i], items[i])
            continue
        stacked = torch.cat([fulls[i].reshape(-1, *fulls[i].shape[-2:]) for i in members])
        result = orth(stacked, items[members[0]])
        counts = [fulls[i].numel() // (fulls[i].shape[-2] * fulls[i].shape[-1]) for i in members]
        for i, part in zip(members, result.split(counts)):
            outs[i] = part.reshape(fulls[i].shape)
    return outs


def _gather_shards(items: Sequence[NSItem], mine: list[int], me: int, T: int, comm: CountingComm,
                   tp_group: Any) -> dict[int, Tensor]:
    """Whole update for each item this rank orthogonalises (tp shards gathered with one all-to-all)."""
    fulls = {i: items[i].update for i in mine if items[i].shard_dim is None}
    if all(it.shard_dim is None for it in items):
        return fulls
    dtype, device = items[0].update.dtype, items[0].update.device
    send: list[list[Tensor]] = [[] for _ in range(T)]
    for it in items:
        if it.shard_dim is not None:
            send[it.ns_rank].append(it.update.reshape(-1))
    mine_sharded = [i for i in mine if items[i].shard_dim is not None]
    out_splits = [sum(_shard_numel(items[i], j) for i in mine_sharded) for j in range(T)]
    in_splits = [sum(x.numel() for x in parts) for parts in send]
    out = torch.empty(sum(out_splits), dtype=dtype, device=device)
    comm.all_to_all(out, _cat([x for parts in send for x in parts], dtype, device), out_splits, in_splits, tp_group)
    pieces = [chunk.split([_shard_numel(items[i], j) for i in mine_sharded])
              for j, chunk in enumerate(out.split(out_splits))]
    for k, i in enumerate(mine_sharded):
        item = items[i]
        fulls[i] = torch.cat([pieces[j][k].view(_shard_shape(item, j)) for j in range(T)], dim=item.shard_dim)
    return fulls


def _scatter_results(items: Sequence[NSItem], outs: dict[int, Tensor], me: int, T: int, comm: CountingComm,
                     tp_group: Any) -> list[Tensor]:
    """Send each orthogonalised matrix back: its slice to every tp rank, or the whole to the other ranks."""
    any_out = next(iter(outs.values()), None)
    dtype = any_out.dtype if any_out is not None else items[0].update.dtype
    device = items[0].update.device
    send: list[list[Tensor]] = [[] for _ in range(T)]
    for i in sorted(outs):  # ascending item index: the order the receivers unpack in (``incoming``)
        O, item = outs[i], items[i]
        if item.shard_dim is None:
            for j in range(T):
                if j != me:
                    send[j].append(O.reshape(-1))
            continue
        start = 0
        for j, size in enumerate(item.tp_sizes):
            send[j].append(O.narrow(item.shard_dim, start, size).reshape(-1))
            start += size
    incoming = [[i for i, it in enumerate(items) if it.ns_rank == j and not (j == me and it.shard_dim is None)]
                for j in range(T)]
    out_splits = [sum(items[i].update.numel() for i in idx) for idx in incoming]
    in_splits = [sum(x.numel() for x in parts) for parts in send]
    out = torch.empty(sum(out_splits), dtype=dtype, device=device)
    comm.all_to_all(out, _cat([x for parts in send for x in parts], dtype, device), out_splits, in_splits, tp_group)
    results: list[Tensor | None] = [outs.get(i) for i in range(len(items))]
    for idx, chunk in zip(incoming, out.split(out_splits)):
        for i, flat in zip(idx, chunk.split([items[i].update.numel() for i in idx])):
            results[i] = flat.view(items[i].update.shape)
    return results  # type: ignore[return-value]
