"""Bookkeeping for ``DistributedMuonClip``: which rank owns each parameter and how buffers are packed.

Pure Python, no communication: every rank that sees the same parameter structure computes the same answer,
which is what lets the per-bucket collectives line up across ranks.

Ownership. A large AdamW tensor (``sliced``: "replicated", at least ``slice_min_bytes``, every rank of the group
at least one row) is split by rows over ``dp_group`` as ``torch.chunk`` splits it (ceil(rows/G) rows per rank, the
last rank fewer; ``row_slice``), DTensor's Shard(0): each rank keeps the state of its rows (ZeRO-1 proper: gradients
reduce-scattered in, parameters all-gathered out). Every other parameter is owned WHOLE by one rank of its sharding
group: ``dp_group`` for "replicated" and "tp_sharded" params, ``edp_group`` for "expert" stacks, ``stage_group``
(the pipeline stage's dp x cp x tp ranks) for a "replicated" tensor that is no copy on the tp peers (sequence
parallelism: each tp rank applies it to its own tokens, so its gradient is summed over the stage) (Muon needs the
whole matrix; a small AdamW tensor is not worth a collective of its own). A Muon parameter is additionally given the
tensor-parallel rank (``ns_rank``) that runs its Newton–Schulz, so each matrix is orthogonalised exactly once in the
world. Assignment is greedy, largest first:

1. dense Muon matrices -> the (dp index, tp rank) cell with the least Newton–Schulz cost so far
   (cost of the FULL matrix, ``ns_cost``; ties -> least loaded dp column, then lowest index);
2. dense AdamW params not sliced -> the dp index with the fewest optimizer-state bytes so far;
3. / 4. the same for expert stacks over the (edp index, tp rank) cells, with their own load table; stacks of
   the folded expert groups (``ParamSlot.folded``: other experts, or other tokens' gradients, on the tp peers)
   over the edp indices alone, each orthogonalised by its owner (``ns_rank`` 0, no TP exchange); stacks split by
   expert tensor parallelism (``ParamSlot.etp``: column/row slices on the etp peers, which share the edp index) over
   the (edp index, etp rank) cells: the slices are gathered to ``ns_rank`` and each expert orthogonalised whole;
5. / 6. the same for the per-token tensors of sequence parallelism over the stage's ranks, each orthogonalised by
   its owner, the loads continuing from the dense ones (stage rank d * tp + t from the (dp index d, tp rank t)
   cell), so the largest per-token matrices go to the ranks the dense ones loaded least.

Assignments depend only on names, full shapes and dtypes, so they agree across the dp and tp groups. Expert
stacks are balanced among themselves (not against the dense params) so that a given stack name is owned by
the same edp index on every EP rank: the owners of one stack then form whole EP groups, and a checkpoint can
shard that stack's state over the EP group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


EVERY = -1  # the owner of a sliced parameter: every rank of its group, each its rows
SLICE_MIN_BYTES = 2**20  # AdamW tensors from this size on are sliced (the embedding and the head, not norms)


def row_slice(rows: int, group_size: int, rank: int) -> tuple[int, int]:
    """(first row, number of rows) of ``rank``'s slice: ceil(rows / G) rows each, as ``torch.chunk`` and DTensor's
    Shard(0) split a tensor, so a checkpoint can describe the slice as a shard of the global tensor."""
    per = -(-rows // group_size)
    start = min(rows, rank * per)
    return start, min(rows, start + per) - start


@dataclass(eq=False)
class ParamSlot:
    """One managed parameter (``index``: position over all param groups, in order; ``order``: position in the
    model, whose reverse is the order backward completes gradients; see ``set_backward_order``)."""

    index: int
    name: str
    param: Tensor
    group_index: int
    use_muon: bool
    kind: str
    shard_dim: int | None = None
    tp_sizes: tuple[int, ...] | None = None  # size along shard_dim on each tp rank (tp_sharded; etp rank: etp)
    owner: int = -2  # index within the sharding group (dp_group, or edp_group for experts); EVERY: sliced
    ns_rank: int = 0  # tp rank that runs Newton–Schulz for this matrix (Muon only)
    order: int = -1  # position in the model's parameters (set_backward_order); -1: index
    tp_copies: bool = True  # the same tensor and gradient on every tp rank (Placement.tp_copies); False: folded

    @property
    def etp(self) -> bool:
        """An expert stack split by expert tensor parallelism: slices along ``shard_dim`` on the etp peers."""
        return self.kind == "expert" and self.shard_dim is not None

    @property
    def folded(self) -> bool:
        """An expert stack of the folded expert groups, or a per-token tensor of sequence parallelism: not a copy
        on the tp peers (other experts, or other tokens' gradients), so it is orthogonalised (and its gradient
        counted in the norm) on its owner alone, without the TP group."""
        return self.kind in ("expert", "replicated") and not self.tp_copies

    def counted_on(self, tp_rank: int) -> bool:
        """Whether this rank's owned copy counts in the global grad norm: a TP slice and a folded stack (an ETP one:
        its slice) on every tp rank, a tensor whole on every tp rank on tp rank 0 only."""
        return self.kind == "tp_sharded" or self.folded or tp_rank == 0

    @property
    def full_shape(self) -> tuple[int, ...]:
        shape = list(self.param.shape)
        if self.kind == "tp_sharded" or self.etp:
            shape[self.shard_dim] = sum(self.tp_sizes)
        return tuple(shape)

    @property
    def sharding(self) -> str:
        """The group it is owned in and its gradient summed over: "edp" (experts), "stage" (per-token), "dp"."""
        if self.kind == "expert":
            return "edp"
        return "stage" if self.folded else "dp"

    @property
    def sliced(self) -> bool:
        """Split by rows over its group (every rank keeps the state of its rows), not owned whole."""
        return self.owner == EVERY

    @property
    def row_numel(self) -> int:
        """Elements per row (dim 0) of the full tensor."""
        return math.prod(self.full_shape[1:])

    @property
    def state_bytes(self) -> int:
        """Optimizer-state bytes of the FULL tensor (same on every tp rank, so plans agree across TP)."""
        per_elem = 1 if self.use_muon else 2  # momentum_buffer | exp_avg + exp_avg_sq
        return per_elem * math.prod(self.full_shape) * self.param.element_size()


def ns_cost(shape: Sequence[int]) -> float:
    """Newton–Schulz flops up to a constant: batch * max(A, B) * min(A, B)^2 for [..., A, B]."""
    A, B = shape[-2], shape[-1]
    return float(math.prod(shape[:-2])) * max(A, B) * min(A, B) ** 2


@dataclass
class _Loads:
    """Running Newton–Schulz cost per (owner, tp rank) cell and state bytes per owner."""

    ns_OT: list[list[float]]
    mem_O: list[int]

    def muon(self, slots: list[ParamSlot]) -> None:
        for s in sorted(slots, key=lambda s: (-ns_cost(s.full_shape), s.index)):
            _, _, o, t = min((load, sum(row), o, t) for o, row in enumerate(self.ns_OT) for t, load in enumerate(row))
            s.owner, s.ns_rank = o, t
            self.ns_OT[o][t] += ns_cost(s.full_shape)
            self.mem_O[o] += s.state_bytes

    def adamw(self, slots: list[ParamSlot]) -> None:
        for s in sorted(slots, key=lambda s: (-s.state_bytes, s.index)):
            o = min(range(len(self.mem_O)), key=lambda o: (self.mem_O[o], o))
            s.owner = o
            self.mem_O[o] += s.state_bytes


def sliceable(slot: ParamSlot, group_size: int, min_bytes: int) -> bool:
    """Whether ``slot`` is split by rows over its group: an AdamW tensor whole on every tp rank ("replicated"; a
    tp- or ep-sharded one would need a 2-D mesh to be described in a checkpoint, and the models here have none
    large), of at least ``min_bytes``, with at least one row on every rank of the group."""
    if slot.use_muon or slot.kind != "replicated" or group_size < 2 or slot.param.ndim == 0:
        return False
    rows = slot.full_shape[0]
    big = math.prod(slot.full_shape) * slot.param.element_size() >= min_bytes
    return big and row_slice(rows, group_size, group_size - 1)[1] > 0


def assign_owners(slots: list[ParamSlot], dp_size: int, tp_size: int, edp_size: int,
                  slice_min_bytes: int = SLICE_MIN_BYTES, etp_size: int = 1, stage_size: int | None = None) -> None:
    """Set ``owner`` (``EVERY`` for a sliced slot) and ``ns_rank`` of every slot in place (see module docstring)."""
    sizes = {"dp": dp_size, "edp": edp_size, "stage": stage_size or dp_size * tp_size}
    dense = None  # the dp table: stage rank d * tp + t continues from its (dp index d, tp rank t) cell
    for sharding, size in sizes.items():
        mine = [s for s in slots if s.sharding == sharding]
        for s in mine:
            s.owner = EVERY if sliceable(s, size, slice_min_bytes) else -2  # -2: assigned below
        # folded stacks: Newton–Schulz on the owner (ETP ones: on one of its etp ranks)
        cells = (etp_size if any(s.etp for s in mine) else 1) if any(s.folded for s in mine) else tp_size
        loads = _Loads([[0.0] * cells for _ in range(size)], [0] * size)
        if sharding == "stage" and size == dp_size * tp_size and cells == 1:
            loads = _Loads([[dense.ns_OT[o // tp_size][o % tp_size]] for o in range(size)],
                           [dense.mem_O[o // tp_size] for o in range(size)])
        loads.muon([s for s in mine if s.use_muon])
        loads.adamw([s for s in mine if not s.use_muon and not s.sliced])
        dense = loads if sharding == "dp" else dense


@dataclass(eq=False)
class Bucket:
    """Params of ONE owner (a rank of the sharding group) and one dtype, packed back to back into ``numel``
    elements: reduced to the owner, and broadcast from it after its update. No padding, whatever the sizes.
    ``dtype`` is the parameters'; the gradient buffer is ``grad_dtype`` (float32 for bf16 parameters).

    A ``sliced`` bucket (owner ``EVERY``) holds sliced params; its buffer is ``group_size`` equal segments, one per
    rank, each the rank's rows of every param back to back (``numel`` elements: ceil(rows/G) rows of each, the last
    rank's padded with zeros) and the presence flags: a reduce-scatter leaves each rank its segment reduced, an
    all-gather of the segments' updated rows (in the parameters' dtype) gives every rank the whole parameters."""

    sharding: str
    dtype: torch.dtype
    group_size: int
    owner: int
    numel: int = 0
    slots: list[ParamSlot] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # flat offset of each slot in the buffer

    @property
    def grad_dtype(self) -> torch.dtype:
        """The gradient buffer's dtype: gradients accumulate in >= float32."""
        return torch.promote_types(self.dtype, torch.float32)

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """The bucket's size in bytes in ``dtype`` (default: the parameters')."""
        return self.numel * (dtype or self.dtype).itemsize

    @property
    def sliced(self) -> bool:
        return self.owner == EVERY

    @property
    def segment_numel(self) -> int:
        """Elements the reduction leaves on a rank that holds it: the gradients, then one presence flag per
        parameter (1 where it got a gradient on this rank), so the sum tells the owner whether any rank had one."""
        return self.numel + len(self.slots)

    @property
    def buffer_numel(self) -> int:
        """Elements of the gradient buffer, and of its reduction: one segment, or one per rank (sliced)."""
        return self.segment_numel * (self.group_size if self.sliced else 1)

    def slice_rows(self, s: ParamSlot) -> int:
        """Rows of ``s`` in each rank's segment of a sliced bucket (the last rank's padded)."""
        return -(-s.full_shape[0] // self.group_size)


def set_backward_order(slots: list[ParamSlot], param_order: Sequence[str] | None) -> None:
    """Give each slot its position in ``param_order`` (the model's parameter names in definition order; backward
    completes their gradients roughly in reverse), or its param-group index without it. The param groups list
    parameters by rule (all Muon matrices, then AdamW's embedding, head and norms), so without the model's order
    the head's bucket, complete first in backward, would be reduced after every Muon bucket."""
    if param_order is None:
        return
    position = {name: i for i, name in enumerate(param_order)}
    missing = [s.name for s in slots if s.name not in position]
    if missing:
        raise ValueError(f"DistributedMuonClip: param_order lacks {missing[:5]} (pass the model's parameter names)")
    for s in slots:
        s.order = position[s.name]


def build_buckets(slots: list[ParamSlot], group_sizes: dict[str, int], cap_bytes: int | None = None) -> list[Bucket]:
    """Buckets of one (sharding group, dtype, owner) each, listed in the order backward completes them.

    Slots are taken in reverse model order (``order``: autograd produces the last layers' gradients first) and a
    bucket is closed before it would hold more than ``cap_bytes`` (None or 0: one bucket per key; a tensor larger
    than the cap is a bucket of its own). A bucket is complete when its lowest-order slot is, so buckets are listed
    by that order, highest first: the order in which every rank of a group issues their collectives. A sliced
    bucket's ``numel`` and ``offsets`` count one rank's segment (ceil(rows/G) rows of each param)."""
    open_: dict[tuple, Bucket] = {}
    full_bytes: dict[tuple, int] = {}  # the cap counts FULL tensors, so tp ranks with uneven shards agree
    buckets: list[Bucket] = []
    for s in sorted(slots, key=lambda s: -_order(s)):
        key = (s.sharding, s.param.dtype, s.owner)
        nbytes = math.prod(s.full_shape) * s.param.element_size()
        b = open_.get(key)
        if b is None or (cap_bytes and full_bytes[key] + nbytes > cap_bytes):
            b = open_[key] = Bucket(s.sharding, s.param.dtype, group_sizes[s.sharding], s.owner)
            full_bytes[key] = 0
            buckets.append(b)
        full_bytes[key] += nbytes
        b.slots.append(s)
        b.offsets.append(b.numel)
        b.numel += b.slice_rows(s) * s.row_numel if b.sliced else s.param.numel()
    return sorted(buckets, key=lambda b: -min(_order(s) for s in b.slots))


def _order(s: ParamSlot) -> int:
    return s.order if s.order >= 0 else s.index
