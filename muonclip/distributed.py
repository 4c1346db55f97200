"""ZeRO-1 MuonClip: optimizer state sharded over data parallelism, each Muon matrix orthogonalised once.

Per step (each rank)::

    loss.backward()                     # each gradient bucket's reduction starts as soon as backward completes it
    opt.reduce_gradients()              # waits for them (and reduces any bucket backward did not complete)
    norm = opt.clip_grad_norm_(1.0)     # optional; global norm, one all_reduce of one scalar (not finite: the
                                        # step leaves everything as it was, on every rank: skip_nonfinite.py)
    opt.step()                          # bucket by bucket: Muon/AdamW on owned params, then the bucket's broadcast
    opt.zero_grad()

(``step()`` reduces the gradients itself if ``reduce_gradients()`` was not called.) No DDP wrapper: this class
does the gradient averaging. QK-Clip registers on it unchanged (``QKClip(specs, process_group=dp_group)``):
the owner clips each query/key master in its update hook, before the parameter broadcast, with the MAX-reduced
logits; the post-step mode's clip (``scale_rows_``, inherited) scales every replica's bf16 parameter in place and
the owner's master, with no broadcast, so replicas stay identical; under TP the heads (rows) are local, so each tp
rank clips its own rows.

Gradient buckets (``_dist_layout.build_buckets``): the params of one owner, one dtype and one sharding group, up
to ``bucket_cap_mb`` each, in backward order. Every parameter's ``.grad`` is a view into its bucket's persistent
buffer, so backward accumulates in place and nothing is allocated per step. With ``overlap_reduce`` (default) a
hook counts each parameter's gradient accumulations; once every param of a bucket has had
``backward_passes_per_step`` of them (set it to the number of micro batches under gradient accumulation or
pipeline schedules), the bucket is reduced to its owner asynchronously, while backward goes on (buckets start
strictly in list order, the same on every rank). Gradients set or added by hand count as accumulations inside
``grads_added_by_hand(params)`` (the pipeline runs torch's zero-bubble weight-gradient actions there). A bucket
some param of which got fewer accumulations (unused in the forward) is reduced in ``reduce_gradients()``
instead, and so are the buckets after it: every rank starts them in one order, and nothing tells a hook that a
parameter will get no gradient (DDP's ``find_unused_parameters`` walks the autograd graph from the outputs for
that). Expert parallelism keeps a stack whose experts got no tokens in the graph (a zero gradient, as one process
has for them), so routing never holds buckets back. An accumulation into a bucket already in flight raises. In
``step()``, the update of one bucket overlaps the broadcasts of the buckets before it.

Placement (``muonclip.placement.Placement``, from the parallelize step; names missing from ``placements`` are
"replicated"):

- "replicated": whole on every rank. Owner = one dp index; its Newton–Schulz runs on one tp rank (``ns_rank``)
  and the result is sent to the tp peers, so a matrix replicated across TP is still orthogonalised once. One that
  is no copy on the tp peers (``tp_copies`` False: sequence parallelism's per-token tensors, norms, routers, MLA's
  down projections, applied by each tp rank to its own tokens) is owned by one rank of the pipeline stage
  (``stage``): its gradient is summed over the stage's dp x cp x tp ranks in ZeRO-1's buckets, once per step
  (Megatron sums it over TP once per step too), divided by the dp size, orthogonalised on its owner alone and
  counted in the grad norm there.
- "tp_sharded": rank t of ``tp_group`` holds slice t along ``shard_dim``. The owner dp index holds the momentum
  of its slice on every tp rank; the slices of the momentum-applied update are gathered to ``ns_rank``,
  orthogonalised as ONE full matrix (exact Muon, not blockwise) and the result's slices sent back.
- "expert": an [E_local, A, B] stack of whole experts; owner = one rank of ``edp_group`` (the replicas of these
  experts); batched Newton–Schulz over the stack, no gather. Expert gradients are summed over ``edp_group`` and
  divided by the dp size (``expert_grad_divisor``): each expert's local gradient already sums the tokens of its
  EP group, so this gives the same global-mean gradient as the dense params. A stack that is a copy on the tp
  peers (``tp_copies``: TP without sequence parallelism) is orthogonalised on one tp rank as a replicated matrix;
  one of the folded expert groups (sequence parallelism: the tp peers hold other experts, or at ep 1 other tokens'
  gradients, and ``edp_group`` spans them) on its owner alone, and counted in the grad norm there. A stack split by
  expert tensor parallelism (``shard_dim`` set, ``tp_group`` = the etp group) is owned by one edp index on each etp
  rank; its slices are gathered to its ``ns_rank`` in the etp group and each expert is orthogonalised as the whole
  matrix (exact Muon, as one process), the result's slices sent back; each rank counts its slice in the norm.

bf16 parameters (``MuonClip``'s precision contract, as Megatron's distributed optimizer): the bucket buffers are
float32 (each bf16 ``.grad`` is added in by the hook and dropped; ``.grad`` of a bf16 parameter stays None, read
``opt.grad(p)``), reduced in ``reduce_dtype`` (float32, or bf16: a transient bf16 copy of the bucket travels); the
float32 master of a parameter lives in its owner's state only (sharded like the momentum); the owner updates the
master, runs the update hooks on it (QK-Clip clips there, before anything leaves the rank), rounds it into the
parameter and broadcasts the bf16 parameter from the bucket buffer's first half (half the bytes of float32).
``offload_state`` streams each bucket's owned state from host memory for its update.

Within a bucket, the matrices this rank orthogonalises that share a shape (e.g. the q/k/v projections of its
layers, or several expert stacks) go through ONE batched Newton–Schulz call (``_dist_comm.orthogonalize_batched``).

Ownership is whole tensors (see ``_dist_layout``), so ``opt.state`` holds whole tensors for owned params only
(the local TP shard for "tp_sharded"), as the checkpoint contract requires. Parameters with
``requires_grad=False`` are not managed (never updated, never communicated).

Large AdamW tensors are split by rows instead (ZeRO-1 proper, ``sliced``: "replicated", ``slice_min_bytes`` or more,
every dp rank at least one row: the embedding and the head; Kimi K2's are 1.17G elements, whose AdamW state
whole on one rank of 16 was 14 GB there, moved over PCIe twice a step with offload, while the other 15 waited for
its broadcast). Rank r keeps the state of rows [r * ceil(R/G), ...) only (``row_shards()``; masters and moments of
that shape), as ``torch.chunk`` and DTensor's Shard(0) split; ``owns(p)`` is true on every rank. Their bucket's
buffer is G equal segments, segment r holding rank r's rows of each tensor (the last rank's padded) and the
presence flags; backward's hook adds each gradient's rows into the segments (``.grad`` stays None; the extra pass
reads the gradient autograd made anyway), a reduce-scatter leaves each rank its segment summed, in place, the rank
updates its rows (AdamW's update computed in the spent gradient: one temporary, the denominator, of the rows' size),
and an all-gather of the segments' updated rows, in the parameters' dtype and in place in the buffer, gives every
rank the whole parameters, overlapping the next buckets' updates as a broadcast does. The norm counts each rank's
rows once; the skip gate, presence flags, offload and ``reduce_dtype`` apply to the segments as to a bucket;
update hooks see the rows' master (QK-Clip touches Muon matrices only). A checkpoint saves the rows as a shard of
the global tensor (launch/checkpoint/state.py), so it loads at another dp size and in one process.

Where Megatron-LM's distributed optimizer differs: it shards every parameter, each bucket's flat buffer cut into
dp equal element ranges that may split a tensor anywhere (padded to a multiple of dp), and gathers the parameters
in the next forward. Here Muon matrices stay whole (Newton–Schulz needs the matrix), a small AdamW tensor stays whole
in a packed bucket (norms: a few KB; slicing them would cost a collective's latency for nothing), and a slice is
whole rows, so that the checkpoint describes it as a DTensor shard of the parameter (layout-free, re-shardable
by DCP) and the padding is at most G - 1 rows of each tensor.

No gradient is not a zero gradient (as ``MuonClip``, which skips a parameter whose ``.grad`` is None). A parameter
has a gradient on a rank when backward accumulated one (its hook ran), a ``.grad`` other than its bucket slice was
set, or one was added inside ``grads_added_by_hand``; writing into the slice ``.grad`` in place does not count.
Each rank writes that as a presence flag per parameter behind its bucket's gradients, and the flags are summed
with them: a parameter that got a gradient on some ranks of its group but not on others has a zero contribution
from those (the gradient of the global mean loss, exactly); one that got none on any rank is not updated at all:
momentum, AdamW moments and step counter, weight (no weight decay) all stay as they were. The owner decides
without a host read: where it has a gradient itself, the group has one; otherwise the parameter's step is gated
on the device by its reduced flag, as a skipped step is (``Gate & has``, muonclip/skip_nonfinite.py: gradient
zeroed, momentum and betas 1, no decay, no update, AdamW's counter advancing by the flag), before the update hooks
run, so QK-Clip clips the kept weight as MuonClip's post-step pass would.
"""
from __future__ import annotations

import math
import time
import weakref
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from muonclip._dist_comm import CountingComm, NSItem, group_size, orthogonalize_once, reduce_by_all_reduce
from muonclip._dist_layout import (SLICE_MIN_BYTES, ParamSlot, assign_owners, build_buckets, row_slice,
                                   set_backward_order)
from muonclip.main_grads import accumulate_
from muonclip.muon import apply_muon_update_, muon_momentum_, orthogonalize
from muonclip.newton_schulz import CoefficientSpec
from muonclip.optimizer import MuonClip
from muonclip.placement import REPLICATED, Placement
from muonclip.grad_norm import sum_of_squares
from muonclip.skip_nonfinite import Gate, decide


@dataclass(frozen=True)
class OptimizerGroups:
    """The process groups the optimizer needs (any object with these attributes works, e.g. ParallelGroups).

    dp_group: ranks with the same tp rank (ZeRO sharding, dense gradient averaging); None = the world.
    tp_group: tensor-parallel peers (None = no TP). edp_group: replicas of the same experts (None = dp_group).
    stage: the pipeline stage's dp x cp x tp ranks, over which the per-token tensors of sequence parallelism
    (``Placement(tp_copies=False)``) are owned and their gradients summed (None = the world).
    """

    dp_group: Any = None
    tp_group: Any = None
    edp_group: Any = None
    stage: Any = None


@dataclass(frozen=True)
class RowShard:
    """The rows of a sliced parameter whose state this rank keeps: ``rows`` rows from row ``start`` of the full
    ``shape``, DTensor's Shard(0) of that tensor over ``group`` (launch/checkpoint/state.py writes them so)."""

    group: Any
    shape: tuple[int, ...]
    start: int
    rows: int


def _by_rank(segments: Tensor, offset: int, rows: int, row_numel: int) -> Tensor:
    """[G, rows, row_numel] view of one parameter's rows in each of the G segments of a sliced bucket."""
    return segments[:, offset:offset + rows * row_numel].view(segments.shape[0], rows, row_numel)


def _spread_(by_rank: Tensor, full: Tensor, add: bool) -> None:
    """``by_rank[r]`` <- (or +=) rank r's rows of ``full`` [R, C] (ceil(R/G) each; the padding rows untouched)."""
    per, R = by_rank.shape[1], full.shape[0]
    k = R // per
    op = Tensor.add_ if add else Tensor.copy_
    if k:
        op(by_rank[:k], full[:k * per].view(k, per, -1))
    if R > k * per:
        op(by_rank[k, :R - k * per], full[k * per:])


def _collect_(full: Tensor, by_rank: Tensor) -> None:
    """``full`` [R, C] <- every rank's rows from ``by_rank`` (the inverse of ``_spread_``)."""
    per, R = by_rank.shape[1], full.shape[0]
    k = R // per
    if k:
        full[:k * per].view(k, per, -1).copy_(by_rank[:k])
    if R > k * per:
        full[k * per:].copy_(by_rank[k, :R - k * per])


def _or(group: Any, default: Any) -> Any:
    return default if group is None else group


def _one_group(placed: list[tuple[str, Placement]], group: Any, what: str, kind: str) -> Any:
    """The one group the ``placed`` (name, placement) pairs split over (their ``tp_group``; ``group`` if given), or
    None: a placement naming another group is an error."""
    if group is None and placed:
        group = placed[0][1].tp_group
    if group is not None:
        ranks = dist.get_process_group_ranks(group)
        for name, pl in placed:
            if dist.get_process_group_ranks(pl.tp_group) != ranks:
                raise ValueError(f"DistributedMuonClip: placement of {name} uses {what} with ranks "
                                 f"{dist.get_process_group_ranks(pl.tp_group)}, expected {ranks} (one {kind} group)")
    return group


class DistributedMuonClip(MuonClip):
    """ZeRO-1 ``MuonClip`` (see module docstring). Same param groups ("names" required) and hyper-parameters.

    Args:
        params: param groups as for ``MuonClip`` (``build_param_groups``), identical structure on every rank.
        placements: {param name: Placement}; missing names are "replicated".
        groups: object with ``dp_group`` and optionally ``tp_group``, ``edp_group``, ``etp_group`` and ``stage``
            (``OptimizerGroups``; ``parallel.dims.ParallelGroups``).
        expert_grad_divisor: divisor of expert gradients after the edp sum (default: dp size).
        bucket_cap_mb: the most MiB of (full) parameters in one gradient bucket; 0 = one bucket per owner.
        overlap_reduce: start each bucket's reduction from backward (see module docstring); False = all in
            ``reduce_gradients()``. ``backward_passes_per_step`` (attribute, default 1): backward passes per step.
            ``grad_sum_divisor`` (attribute, default 1): set it to the number of micro batches where backward
            sums their gradients instead of averaging them (pipeline schedules built with scale_grads=False).
        all_reduce_min_bytes: reduce buckets of at least this many bytes with an all-reduce instead of a
            reduce to the owner (default: from 4 MiB on gloo, never on NCCL; ``_dist_comm.reduce_by_all_reduce``).
        norm_group: group spanning dp x tp for ``clip_grad_norm_`` and the structure check (default: world).
        pipeline_group: with pipeline parallelism, the ranks holding the other stages (same dp, tp index): the
            squared norm of this stage is summed over it too, so every stage clips by the same global norm.
        param_order: the model's parameter names in definition order (``[n for n, _ in
            model.named_parameters()]``): buckets are packed and reduced in its reverse, the order backward
            completes gradients (the head's first). Default: the param groups' order, rule by rule.
        slice_min_bytes: AdamW tensors of at least this many bytes (whole on every tp rank, one row or more per dp
            rank) are split by rows over dp instead of owned whole (see the module docstring; default 1 MiB).
    """

    def __init__(self, params: Iterable[dict[str, Any]], placements: Mapping[str, Placement] | None, groups: Any,
                 lr: float, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.1, adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 *, ns_dtype: torch.dtype = torch.float32, ns_eps: float = 1e-7,
                 ns_coefficients: CoefficientSpec = "quintic", ns_path: str = "standard",
                 expert_grad_divisor: int | None = None, norm_group: Any = None, pipeline_group: Any = None,
                 bucket_cap_mb: float = 25.0, overlap_reduce: bool = True,
                 all_reduce_min_bytes: int | None = None, master_weights: bool = True, offload_state: bool = False,
                 reduce_dtype: torch.dtype = torch.float32, param_order: Sequence[str] | None = None,
                 slice_min_bytes: int = SLICE_MIN_BYTES) -> None:
        self._frozen = False
        super().__init__(params, lr, momentum, nesterov, ns_steps, weight_decay, adamw_betas, adamw_eps,
                         ns_dtype=ns_dtype, ns_eps=ns_eps, ns_coefficients=ns_coefficients, ns_path=ns_path,
                         master_weights=master_weights, offload_state=offload_state, reduce_dtype=reduce_dtype)
        if not dist.is_initialized():
            raise ValueError("DistributedMuonClip needs torch.distributed initialised (use MuonClip for 1 process)")
        self.comm = CountingComm()
        self.norm_group = norm_group if norm_group is not None else dist.group.WORLD
        self.pipeline_group = pipeline_group
        self.dp_group = _or(getattr(groups, "dp_group", None), dist.group.WORLD)
        self.edp_group = _or(getattr(groups, "edp_group", None), self.dp_group)
        self.stage_group = _or(getattr(groups, "stage", None), dist.group.WORLD)
        placements = dict(placements or {})
        self.tp_group = self._resolve_tp_group(getattr(groups, "tp_group", None), placements)
        self.tp_rank = dist.get_rank(self.tp_group) if self.tp_group is not None else 0
        self.etp_group = self._resolve_etp_group(placements)
        self.dp_size = dist.get_world_size(self.dp_group)
        self.expert_grad_divisor = expert_grad_divisor or self.dp_size
        self.slots = self._make_slots(placements)
        set_backward_order(self.slots, param_order)
        self._device = self.slots[0].param.device if self.slots else torch.device("cpu")
        self._check_same_structure()
        self._gather_tp_sizes()
        sizes = {"dp": self.dp_size, "edp": dist.get_world_size(self.edp_group),
                 "stage": dist.get_world_size(self.stage_group)}
        stage_ranks = self.dp_size * group_size(self.tp_group)
        if any(s.sharding == "stage" for s in self.slots) and sizes["stage"] != stage_ranks:
            raise ValueError(f"DistributedMuonClip: per-token parameters (Placement tp_copies=False) are summed over "
                             f"the pipeline stage's dp x tp ranks ({stage_ranks}), but groups.stage has "
                             f"{sizes['stage']}: pass the stage's group")
        assign_owners(self.slots, self.dp_size, group_size(self.tp_group), sizes["edp"], slice_min_bytes,
                      group_size(self.etp_group), sizes["stage"])
        if bucket_cap_mb < 0:
            raise ValueError(f"DistributedMuonClip: bucket_cap_mb must be >= 0 (0 = one bucket per owner), got "
                             f"{bucket_cap_mb}")
        self.buckets = build_buckets(self.slots, sizes, int(bucket_cap_mb * 2**20))
        self._index = {"dp": dist.get_rank(self.dp_group), "edp": dist.get_rank(self.edp_group),
                       "stage": dist.get_rank(self.stage_group)}
        self._slot = {id(s.param): s for s in self.slots}
        self._bucket_of = {id(s.param): i for i, b in enumerate(self.buckets) for s in b.slots}
        # a sliced param's rows this rank keeps (the state's shape), as a view of the param
        self._rows: dict[int, RowShard] = {}
        self._rows_of: dict[int, Tensor] = {}
        for b in self.buckets:
            for s in b.slots if b.sliced else ():
                start, n = row_slice(s.full_shape[0], b.group_size, self._index[b.sharding])
                self._rows[id(s.param)] = RowShard(self._group(b), s.full_shape, start, n)
                self._rows_of[id(s.param)] = s.param.detach().narrow(0, start, n)
        # a persistent buffer per bucket (float32 for bf16 params): backward accumulates the gradients into it
        # (``.grad`` are views of float32 params owned whole), the reduction and the parameter broadcast (all-gather)
        # run in place in it; behind the gradients one presence flag per param (``Bucket.segment_numel``), reduced
        # with them
        self._flat = [torch.zeros(b.buffer_numel, dtype=b.grad_dtype, device=b.slots[0].param.device)
                      for b in self.buckets]
        self._wire: list[Tensor | None] = [None] * len(self.buckets)  # a bucket's gradients in reduce_dtype
        self._grad_views = [self._slices(i, b.grad_dtype) for i, b in enumerate(self.buckets)]
        self._param_views = [self._slices(i, b.dtype, gathered=True) for i, b in enumerate(self.buckets)]
        self._grad_of = {id(s.param): view for views in self._grad_views for s, view in views}
        # per bucket: all-reduce instead of a reduce to the owner where that is faster (gloo, large buffers)
        self._all_reduce = [not b.sliced and reduce_by_all_reduce(b.buffer_numel * self._reduce_dtype(b).itemsize,
                                                                  dist.get_backend(self._group(b)),
                                                                  all_reduce_min_bytes)
                            for b in self.buckets]
        self.backward_passes_per_step = 1
        self.grad_sum_divisor = 1  # also divide the reduced gradients by this (see the class docstring)
        me = weakref.ref(self)  # the hooks must not keep a dropped optimizer (and its buffers) alive

        def on_accumulated(p: Tensor) -> None:
            opt = me()
            if opt is not None:
                opt._grad_accumulated(p)

        self.overlap_reduce = overlap_reduce
        # every param: bf16 grads are moved into the float32 buckets, and each accumulation is a gradient this step
        self._hooks = [s.param.register_post_accumulate_grad_hook(on_accumulated) for s in self.slots]
        self._works: list[Any] = [None] * len(self.buckets)  # the collective in flight per bucket
        self.zero_grad()
        self.last_step_stats: dict[str, float] = {"ns_seconds": 0.0, "ns_matrices": 0, "buckets": len(self.buckets),
                                                  "reduced_in_backward": 0}
        self._frozen = True

    # ------------------------------------------------------------------ setup
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_frozen", False):
            raise ValueError("DistributedMuonClip: param groups are fixed at construction (ownership and buffers "
                             "are planned over all of them); build a new optimizer instead")
        super().add_param_group(param_group)

    @staticmethod
    def _resolve_tp_group(tp_group: Any, placements: Mapping[str, Placement]) -> Any:
        sharded = [(n, pl) for n, pl in placements.items() if pl.kind == "tp_sharded"]
        return _one_group(sharded, tp_group, "a tp_group", "TP")

    @staticmethod
    def _resolve_etp_group(placements: Mapping[str, Placement]) -> Any:
        """The expert-tensor-parallel group of the ETP-split expert stacks (one for all of them), or None."""
        etp = [(n, pl) for n, pl in placements.items() if pl.kind == "expert" and pl.shard_dim is not None]
        return _one_group(etp, None, "an etp group", "ETP")

    def _make_slots(self, placements: Mapping[str, Placement]) -> list[ParamSlot]:
        slots = []
        index = 0
        for gi, group in enumerate(self.param_groups):
            names = group.get("names")
            if names is None:
                raise ValueError(f"DistributedMuonClip: param group {gi} has no 'names' (needed to look up "
                                 "placements); build groups with muonclip.build_param_groups(model.named_parameters())")
            for name, p in zip(names, group["params"]):
                index += 1
                if not p.requires_grad:
                    continue
                if isinstance(p, DTensor):
                    raise ValueError(f"DistributedMuonClip: {name} is a DTensor; this optimizer works on plain local "
                                     "tensors described by placements (use MuonClip for DTensor/FSDP2 models)")
                pl = placements.get(name, REPLICATED)
                if pl.kind == "tp_sharded" and not 0 <= pl.shard_dim < p.ndim:
                    raise ValueError(f"DistributedMuonClip: {name} shard_dim={pl.shard_dim} out of range for local "
                                     f"shape {tuple(p.shape)}")
                if pl.kind == "expert" and group["use_muon"] and p.ndim < 3:
                    raise ValueError(f"DistributedMuonClip: expert param {name} has shape {tuple(p.shape)}; expected "
                                     "an [E_local, A, B] stack")
                slots.append(ParamSlot(index - 1, name, p, gi, group["use_muon"], pl.kind, pl.shard_dim,
                                       tp_copies=pl.tp_copies))
        return slots

    def _check_same_structure(self) -> None:
        """Every rank must plan over the same names/kinds/dtypes/shapes (else collectives would not line up)."""
        def shape(s: ParamSlot) -> tuple:
            return tuple(-1 if d == s.shard_dim else n for d, n in enumerate(s.param.shape))
        text = "|".join(f"{s.name}:{s.kind}:{s.sharding}:{s.shard_dim}:{s.use_muon}:{s.param.dtype}:{shape(s)}"
                        for s in self.slots)
        h = zlib.crc32(text.encode())
        hh = torch.tensor([h, -h], dtype=torch.int64, device=self._device)
        dist.all_reduce(hh, op=dist.ReduceOp.MAX, group=self.norm_group)
        if hh[0].item() != -hh[1].item():
            raise ValueError("DistributedMuonClip: ranks disagree on the parameter structure (names, placements, "
                             "dtypes or shapes of the param groups); every rank must build the same groups")

    def _gather_tp_sizes(self) -> None:
        sharded = [s for s in self.slots if s.kind == "tp_sharded"]
        T = group_size(self.tp_group)
        local = torch.tensor([s.param.shape[s.shard_dim] for s in sharded], dtype=torch.int64, device=self._device)
        sizes = torch.empty(T * len(sharded), dtype=torch.int64, device=self._device)
        if T > 1 and sharded:
            dist.all_gather_single(sizes, local, group=self.tp_group)
        else:
            sizes.copy_(local)
        for k, s in enumerate(sharded):
            s.tp_sizes = tuple(int(x) for x in sizes.view(T, len(sharded))[:, k])
        for s in self.slots:  # ETP slices are even (parallel/expert_parallel.py)
            if s.etp:
                s.tp_sizes = (s.param.shape[s.shard_dim],) * group_size(self.etp_group)

    # ------------------------------------------------------------------ ownership / state
    def owns(self, p: Tensor) -> bool:
        """True if this rank holds (and updates) the optimizer state of ``p`` (of its rows: ``row_shards``)."""
        s = self._slot.get(id(p))
        return s is not None and (s.sliced or s.owner == self._index[s.sharding])

    def owned_names(self) -> list[str]:
        return [s.name for s in self.slots if self.owns(s.param)]

    def updated_elsewhere(self, p: Tensor) -> bool:
        """Whether another rank (the owner) updates ``p`` and broadcasts it here."""
        return id(p) in self._slot and not self.owns(p)

    def _owned(self) -> list[ParamSlot]:
        return [s for s in self.slots if self.owns(s.param)]

    def row_shards(self) -> dict[str, RowShard]:
        """{name: this rank's rows} of every sliced parameter: its optimizer state (masters included) has that
        shape, a Shard(0) of the full tensor (launch/checkpoint/state.py saves it as one)."""
        return {s.name: self._rows[id(s.param)] for s in self.slots if s.sliced}

    def weight(self, p: Tensor) -> Tensor:
        """What the update changes: the float32 master, or ``p`` itself (of a sliced ``p``: this rank's rows)."""
        rows = self._rows_of.get(id(p))
        if rows is None:
            return super().weight(p)
        return self.state[p].get("master", rows) if p in self.state else rows

    def _init_param_state(self, p: Tensor, use_muon: bool, like: Tensor | None = None) -> dict[str, Any]:
        return super()._init_param_state(p, use_muon, self._rows_of.get(id(p), like))

    def _finish_update(self, p: Tensor, weight: Tensor) -> None:
        """As ``MuonClip``'s, a sliced ``p`` receiving its rows (the update hooks see the rows' master)."""
        rows = self._rows_of.get(id(p))
        if rows is None:
            return super()._finish_update(p, weight)
        for hook in self._update_hooks.values():
            hook(p, weight)
        if weight is not rows:
            rows.copy_(weight)

    def _spent(self, grad: Tensor) -> Tensor:
        return grad  # a bucket's gradient, spent once AdamW's moments have read it (the broadcast reuses the buffer)

    @torch.no_grad()
    def sync_params_from_masters(self) -> None:
        """Round every master this rank keeps into its parameter; a sliced parameter is then all-gathered from every
        rank's rows (a collective: every rank calls it, e.g. after a checkpoint load)."""
        for s in self.slots:
            master = self.state.get(s.param, {}).get("master")
            if master is not None and not s.sliced:
                s.param.copy_(master)
        for i, b in enumerate(self.buckets):
            if not b.sliced or not any(self._keeps_master(s.param) for s in b.slots):
                continue
            self._wait(i)
            for s in b.slots:
                master = self.state.get(s.param, {}).get("master")
                if master is not None:
                    self._rows_of[id(s.param)].copy_(master)
            self._launch_broadcast(i)
            self._wait(i)
            self._receive(i)
            self._stale[i] = True  # the buffer holds parameters now: zeroed before the next gradient

    def _make_main_grads(self, trainable: list[Tensor]) -> None:
        return None  # the float32 gradient buckets below take that role

    def init_state(self) -> None:
        """Create zero state and the float32 masters for every owned param (so a checkpoint can be loaded in
        place)."""
        for s in self._owned():
            if not self.state.get(s.param):
                self._init_param_state(s.param, s.use_muon)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        names = [n for g in self.param_groups for n in g["names"]]
        foreign = [names[i] for i in state_dict.get("state", {}) if isinstance(i, int) and i < len(params)
                   and not self.owns(params[i])]
        if foreign:
            raise ValueError(f"DistributedMuonClip.load_state_dict: state for params this rank does not own "
                             f"({foreign[:5]}{'...' if len(foreign) > 5 else ''}); optimizer state dicts are per "
                             "rank: load the one this rank saved under the same layout, or re-shard by name "
                             "(optim/{fqn}/{key}) with launch/checkpoint")
        super().load_state_dict(state_dict)

    @property
    def comm_bytes(self) -> dict[str, int]:
        """Bytes this rank has sent so far, per collective kind (reset with ``opt.comm.bytes_sent.clear()``)."""
        return dict(self.comm.bytes_sent)

    # ------------------------------------------------------------------ gradients
    def grad(self, p: Tensor) -> Tensor | None:
        """The reduced float32 gradient of an owned ``p`` after ``reduce_gradients()`` (a view of its bucket; this
        rank's rows of a sliced ``p``), else None."""
        if not self._reduced or not self.owns(p):
            return None
        return self._grad_of[id(p)]

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers and point every managed float32 parameter's ``.grad`` at its slice, so backward
        accumulates straight into them (``set_to_none`` is ignored: the buffers are the gradients; a bf16 or sliced
        parameter's ``.grad`` stays None: the hook adds each backward's into the buffer)."""
        self._wait_all()  # nothing may still be reducing into a buffer that is zeroed
        self.step_ok = None
        for i, flat in enumerate(self._flat):
            flat.zero_()
            for s, view in self._views(i):
                s.param.grad = view if self._inplace(s) else None
        self._new_step()
        self._stale = [False] * len(self.buckets)

    def _new_step(self) -> None:
        """Reset the per-step bookkeeping (after ``step()``, and by ``zero_grad()``)."""
        self._accumulated: dict[int, int] = {}  # id(param) -> gradient accumulations into the buffers
        self._incomplete = [len(b.slots) for b in self.buckets]  # params still short of backward_passes_per_step
        self._present: list[list[bool] | None] = [None] * len(self.buckets)  # per bucket, per param: a gradient here
        self._launched = 0  # buckets [0, _launched) have their reduction under way (or done)
        self._in_backward = 0
        self._reduced = False

    def _group(self, b: Any) -> Any:
        """The group a bucket's gradients are reduced and its params broadcast over (dp, edp for experts, the
        stage for sequence parallelism's per-token tensors)."""
        return {"dp": self.dp_group, "edp": self.edp_group, "stage": self.stage_group}[b.sharding]

    def _reduce_dtype(self, b: Any) -> torch.dtype:
        """The dtype bucket ``b``'s gradients travel in: ``reduce_dtype`` unless the buffer is narrower/wider
        (float64 tests keep float64)."""
        return self.reduce_dtype if b.grad_dtype == torch.float32 else b.grad_dtype

    def _owns_bucket(self, i: int) -> bool:
        b = self.buckets[i]
        return b.sliced or b.owner == self._index[b.sharding]

    def _slices(self, i: int, dtype: torch.dtype, gathered: bool = False) -> list[tuple[ParamSlot, Tensor]]:
        """Each param of bucket i with its slice of the bucket's buffer seen in ``dtype``, shaped like the param:
        the gradients (the buffer's dtype), or the parameters (bf16 ones in the float32 buffer's first half). A
        sliced bucket: this rank's rows of each gradient in its segment, or (``gathered``) every rank's rows of
        each parameter, [G, ceil(rows/G), row elements], as the all-gather leaves them."""
        b = self.buckets[i]
        flat = self._flat[i] if dtype == self._flat[i].dtype else self._flat[i].view(dtype)
        if not b.sliced:
            return [(s, flat[off:off + s.param.numel()].view(s.param.shape)) for s, off in zip(b.slots, b.offsets)]
        if not gathered:
            held = self._segments(i)[self._index[b.sharding]]
            return [(s, held[off:off + s.row_numel * self._rows[id(s.param)].rows].view(
                self._rows_of[id(s.param)].shape)) for s, off in zip(b.slots, b.offsets)]
        segments = flat[:b.group_size * b.numel].view(b.group_size, b.numel)  # the rows, no flags
        return [(s, _by_rank(segments, off, b.slice_rows(s), s.row_numel)) for s, off in zip(b.slots, b.offsets)]

    def _segments(self, i: int, flat: Tensor | None = None) -> Tensor:
        """Bucket i's buffer (or ``flat``, its reduce_dtype copy) as [G, segment] (one row a rank; sliced only)."""
        b = self.buckets[i]
        return (self._flat[i] if flat is None else flat).view(b.group_size, b.segment_numel)

    def _held(self, i: int, flat: Tensor | None = None) -> Tensor:
        """What bucket i's reduction leaves this rank (of ``flat``, default its buffer): the segment of a sliced
        bucket, else the whole buffer (the owner's): the gradients, then the presence flags."""
        if not self.buckets[i].sliced:
            return self._flat[i] if flat is None else flat
        return self._segments(i, flat)[self._index[self.buckets[i].sharding]]

    def _inplace(self, s: ParamSlot) -> bool:
        """Whether backward accumulates ``s``'s gradient straight into its bucket (``.grad`` a view of it): a float32
        parameter owned whole; bf16 and sliced ones are added in by the hook (``_add_grad``)."""
        return not s.sliced and s.param.dtype == self._flat[self._bucket_of[id(s.param)]].dtype

    def _add_grad(self, i: int, s: ParamSlot) -> None:
        """Add ``s.param.grad`` into bucket i and drop it: a sliced one's rows into every rank's segment."""
        if not s.sliced:
            return accumulate_(self._grad_of[id(s.param)], s.param)
        b = self.buckets[i]
        offset = b.offsets[b.slots.index(s)]
        _spread_(_by_rank(self._segments(i), offset, b.slice_rows(s), s.row_numel),
                 s.param.grad.reshape(s.full_shape[0], s.row_numel), add=True)
        s.param.grad = None

    def _views(self, i: int) -> list[tuple[ParamSlot, Tensor]]:
        """Each param of bucket i with its gradient slice."""
        return self._grad_views[i]

    def _grad_accumulated(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: move a bf16 gradient into its float32 bucket (a sliced param's rows into every
        rank's segment); count, and start the reductions of the buckets that are complete now."""
        i = self._bucket_of[id(p)]
        flat, s = self._flat[i], self._slot[id(p)]
        by_hand = not self._inplace(s)
        if p.grad is None or not by_hand and p.grad.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            return  # not accumulating into this optimizer's buffer (e.g. another optimizer took the params over)
        self._check_open(i, p)
        if by_hand:
            self._fresh(i)
            self._add_grad(i, s)
        self._count(p, i)

    def _check_open(self, i: int, p: Tensor) -> None:
        if i < self._launched:
            raise RuntimeError(f"DistributedMuonClip: a gradient of {self._slot[id(p)].name} was accumulated after "
                               "its bucket's reduction had started: set opt.backward_passes_per_step to the number "
                               f"of backward passes per step (now {self.backward_passes_per_step}) or build the "
                               "optimizer with overlap_reduce=False")

    def _count(self, p: Tensor, i: int) -> None:
        """One more gradient accumulation of ``p`` (so it has a gradient this step): with ``overlap_reduce``, start
        the reductions of the buckets that are complete now."""
        n = self._accumulated[id(p)] = self._accumulated.get(id(p), 0) + 1
        if self.overlap_reduce and n == self.backward_passes_per_step:
            self._incomplete[i] -= 1
            while self._launched < len(self.buckets) and self._incomplete[self._launched] == 0:
                self._launch_reduce(self._launched)
                self._in_backward += 1

    @contextmanager
    def grads_added_by_hand(self, params: Iterable[Tensor]) -> Iterator[None]:
        """Inside, code may set or add to ``.grad`` of ``params`` without autograd's accumulation (torch's
        zero-bubble pipeline schedules: ``stage_backward_weight`` does ``p.grad = dw`` or ``p.grad += dw``, no
        hook): each gradient made inside is added to its float32 bucket on the way out, as backward's hook adds
        one (a bf16 gradient is not summed in bf16 across micro batches), and counts as an accumulation (the
        parameter has a gradient; its bucket's reduction may start). A float32 parameter's ``.grad``, its bucket
        slice outside, is None inside, so that what is made there is told apart."""
        managed = [p for p in params if id(p) in self._slot]
        in_bucket = set()
        for p in managed:
            view = self._grad_of[id(p)]
            if p.grad is not None and self._inplace(self._slot[id(p)]) and p.grad.data_ptr() == view.data_ptr():
                in_bucket.add(id(p))
                p.grad = None
        yield
        added = []
        for p in managed:
            view = self._grad_of[id(p)]
            if p.grad is not None:
                i = self._bucket_of[id(p)]
                self._check_open(i, p)
                self._fresh(i)
                self._add_grad(i, self._slot[id(p)])
                in_bucket.add(id(p))
                added.append((p, i))
            if id(p) in in_bucket and self._inplace(self._slot[id(p)]):
                p.grad = view  # backward accumulates in place again
        for p, i in added:  # counted once every .grad is back: a bucket this starts reads them all
            self._count(p, i)

    def _fresh(self, i: int) -> None:
        """Zero bucket i if a step spent it and no ``zero_grad()`` came since (its buffer holds last step's
        reduced gradients and broadcast parameters)."""
        if self._stale[i]:
            self._flat[i].zero_()
            self._stale[i] = False

    @torch.no_grad()
    def _launch_reduce(self, i: int) -> None:
        """Start bucket i's reduction to its owner (a sliced bucket's reduce-scatter: each rank its segment);
        gradients that are not in the buffer are copied (float32) or added (bf16, sliced: accumulated by hand, e.g.
        by zero-bubble pipeline schedules) in."""
        b, flat = self.buckets[i], self._flat[i]
        self._fresh(i)
        present = []
        for s, view in self._views(i):
            grad = s.param.grad
            counted = id(s.param) in self._accumulated
            if not self._inplace(s):
                if grad is not None:
                    self._add_grad(i, s)
                present.append(counted or grad is not None)
            elif grad is None:
                view.zero_()
                present.append(False)
            elif grad.data_ptr() != view.data_ptr():
                view.copy_(grad)
                present.append(True)
            else:
                present.append(counted)
        flags = self._segments(i)[:, b.numel:] if b.sliced else flat[b.numel:]  # a sliced bucket's: in every segment
        flags.fill_(1)  # device fills, no host-to-device copy (a blocking one would synchronise on CUDA)
        for k in (k for k, has in enumerate(present) if not has):
            flags[..., k].zero_()
        self._present[i] = present
        group = self._group(b)
        wire = flat if self._reduce_dtype(b) == flat.dtype else flat.to(self._reduce_dtype(b))
        self._wire[i] = wire if wire is not flat else None
        if b.sliced:  # in place: this rank's segment of the sum lands in its segment
            self._works[i] = self.comm.reduce_scatter(self._held(i, wire), wire, group, async_op=True)
        elif self._all_reduce[i]:
            self._works[i] = self.comm.all_reduce(wire, dist.ReduceOp.SUM, group, async_op=True)
        else:
            self._works[i] = self.comm.reduce(wire, b.owner, group, async_op=True)
        self._launched = i + 1

    def _wait(self, i: int) -> None:
        if self._works[i] is not None:
            self._works[i].wait()
            self._works[i] = None

    def _wait_all(self) -> None:
        for i in range(len(self.buckets)):
            self._wait(i)
            self._wire[i] = None

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average gradients: each owner receives the full averaged gradient of its params (the reductions
        backward started, and the rest now, in bucket order); ``p.grad`` of owned float32 params is a view of its
        bucket's buffer (``opt.grad(p)`` for any owned param: this rank's rows of a sliced one), other params'
        ``p.grad`` is set to None. No-op if already done since the last step."""
        if self._reduced:
            return
        while self._launched < len(self.buckets):
            self._launch_reduce(self._launched)
        for i, b in enumerate(self.buckets):
            self._wait(i)
            mine = self._owns_bucket(i)
            if mine:
                held = self._held(i)
                if self._wire[i] is not None:
                    held.copy_(self._held(i, self._wire[i]))
                # the stage's sum is the tp ranks' tokens (one process's gradient) times the dp x cp replicas
                divisor = self.expert_grad_divisor if b.sharding == "edp" else self.dp_size
                held[:b.numel].div_(divisor * self.grad_sum_divisor)  # the gradients (not the flags)
            self._wire[i] = None
            for s, view in self._views(i):
                s.param.grad = view if mine and self._inplace(s) else None
        self._reduced = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Scale owned gradients so the global L2 norm is at most ``max_norm``; return the norm (pre-clip), the
        same on every rank. Each element is counted once: tp_sharded params contribute their slice from every
        tp rank, folded expert stacks from every owner, replicated params and TP copies of expert stacks only from
        tp rank 0. A norm that is not finite (a NaN or inf in any rank's gradient reaches every rank through the
        sum) makes the next ``step()`` a no-op on every rank (``step_ok``, muonclip/skip_nonfinite.py)."""
        if float(norm_type) != 2.0:
            raise ValueError(f"DistributedMuonClip.clip_grad_norm_ supports norm_type=2 only, got {norm_type}")
        self.reduce_gradients()
        owned = [(s, view) for i in range(len(self.buckets)) if self._owns_bucket(i) for s, view in self._views(i)]
        sq = torch.zeros(1, dtype=torch.float64, device=self._device)  # muonclip/grad_norm.py: row norms in float64
        for s, grad in owned:
            if s.counted_on(self.tp_rank):
                sq += sum_of_squares(grad).to(self._device)
        self.comm.all_reduce(sq, dist.ReduceOp.SUM, self.norm_group)
        if self.pipeline_group is not None:
            self.comm.all_reduce(sq, dist.ReduceOp.SUM, self.pipeline_group)
        total = sq.sqrt()[0]
        self.step_ok = decide(total)
        if math.isinf(max_norm):  # measure only
            return total
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for _, grad in owned:
            grad.mul_(coef.to(device=grad.device, dtype=grad.dtype))
        return total

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update the owned params bucket by bucket (their float32 masters where the params are bf16, the state
        streamed from host memory with ``offload_state``); each bucket's broadcast starts as soon as it is updated
        and runs while the next buckets are (every ``.grad`` is None afterwards, until ``zero_grad()``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        self.init_state()  # (no-op once created) new state before it is lent to the device
        self.last_step_stats = {"ns_seconds": 0.0, "ns_matrices": 0, "buckets": len(self.buckets),
                                "reduced_in_backward": self._in_backward}
        mine = {i for i in range(len(self.buckets)) if self._owns_bucket(i)}
        gate = Gate(self.step_ok)  # where the step is skipped, its coefficients make it a no-op (skip_nonfinite.py)
        lent = None if self.offload is None else self.offload.lend_in_turn(
            [[self.state[s.param] for s in self.buckets[i].slots] for i in sorted(mine)])
        for i in range(len(self.buckets)):
            if i in mine:
                if lent is not None:
                    next(lent)  # bucket i's state is on the device now (the previous bucket's went home)
                self._update_bucket(i, gate)
            self._launch_broadcast(i)
        for _ in lent or ():  # the last bucket's state goes home
            pass
        for i in range(len(self.buckets)):
            self._wait(i)
            for s in self.buckets[i].slots:
                s.param.grad = None
            if i not in mine or self.buckets[i].sliced:
                self._receive(i)
        self._new_step()  # a backward before the next zero_grad() makes new .grad tensors: copied in when reduced
        self._stale = [True] * len(self.buckets)
        return loss

    def _update_bucket(self, i: int, gate: Gate) -> None:
        """Muon and AdamW on bucket i's params; a param without a gradient on any rank of its group is left as it
        was, gated as a skipped step is, by its reduced presence flag (see the module docstring)."""
        b, present = self.buckets[i], self._present[i]
        reduced = self._held(i)[b.numel:]  # the presence flags summed over the group
        gates = [gate if present[k] else gate & (reduced[k] > 0) for k in range(len(b.slots))]
        self._muon_step([(s, g, gates[k]) for k, (s, g) in enumerate(self._views(i)) if s.use_muon])
        for k, s in enumerate(b.slots):
            if not s.use_muon:
                self._adamw_update(s.param, self.param_groups[s.group_index], gates[k])

    def _launch_broadcast(self, i: int) -> None:
        """The owner sends bucket i's updated params (bf16 where they are) to the group, in the (spent) gradient
        buffer; of a sliced bucket, every rank its rows (an all-gather of the segments)."""
        b = self.buckets[i]
        if b.group_size == 1:
            return
        if b.sliced:
            me = self._index[b.sharding]
            for s, view in self._param_views[i]:
                rows = self._rows_of[id(s.param)]
                view[me, :rows.shape[0]].copy_(rows.reshape(rows.shape[0], -1))
            flat = self._flat[i] if b.dtype == b.grad_dtype else self._flat[i].view(b.dtype)
            wire = flat[:b.group_size * b.numel]
            mine = wire.view(b.group_size, b.numel)[me]
            self._works[i] = self.comm.all_gather(wire, mine, self._group(b), async_op=True)
            return
        if self._owns_bucket(i):
            for s, view in self._param_views[i]:
                view.copy_(s.param)
        wire = self._flat[i][:b.numel] if b.dtype == b.grad_dtype else self._flat[i].view(b.dtype)[:b.numel]
        self._works[i] = self.comm.broadcast(wire, b.owner, self._group(b), async_op=True)

    def _receive(self, i: int) -> None:
        """Copy bucket i's broadcast (or all-gathered) parameters from its buffer into the parameters."""
        b = self.buckets[i]
        if b.group_size == 1:
            return
        for s, view in self._param_views[i]:
            if b.sliced:
                _collect_(s.param.detach().view(s.full_shape[0], s.row_numel), view)
            else:
                s.param.copy_(view)

    def _muon_step(self, owned: list[tuple[ParamSlot, Tensor, Gate]]) -> None:
        """Muon on (slot, reduced gradient, gate) triples: where the gate is shut (a non-finite step, or no gradient
        on any rank), momentum and weight stay as they were (muonclip/skip_nonfinite.py; every rank still takes part
        in the tensor-parallel Newton–Schulz, whose collectives must line up)."""
        items = []
        for s, grad, gate in owned:
            group = self.param_groups[s.group_index]
            gate.zero_(grad)  # a skipped step reads zeros (the bucket's gradients are spent after the step anyway)
            update = muon_momentum_(grad, self.state[s.param]["momentum_buffer"], group["momentum"], group["nesterov"],
                                    gate)
            items.append(NSItem(update.to(self.ns_dtype), s.ns_rank, s.shard_dim, s.tp_sizes,
                                group["ns_steps"], group["ns_eps"]))
        # folded expert stacks differ between tp peers: orthogonalised here (ETP slices: gathered over the etp
        # group), sequence parallelism's per-token tensors on their owner alone, the rest once across the TP group
        outs: list = [None] * len(items)
        for kind, group in (("tp", self.tp_group), ("expert", self.etp_group), ("replicated", None)):
            ks = [k for k, (s, _, _) in enumerate(owned) if (s.kind if s.folded else "tp") == kind]
            for k, out in zip(ks, orthogonalize_once([items[k] for k in ks], self._orthogonalize, self.comm, group)):
                outs[k] = out
        for (s, _, gate), out in zip(owned, outs):
            group = self.param_groups[s.group_index]
            weight = self.weight(s.param)
            apply_muon_update_(weight, out, lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                               shape=s.full_shape, gate=gate)
            self._finish_update(s.param, weight)

    def _orthogonalize(self, update: Tensor, item: NSItem) -> Tensor:
        t0 = time.perf_counter()
        out = orthogonalize(update, item.ns_steps, eps=item.ns_eps, **self._ns_options())
        self.last_step_stats["ns_seconds"] += time.perf_counter() - t0
        self.last_step_stats["ns_matrices"] += update.numel() // (update.shape[-2] * update.shape[-1])
        return out
