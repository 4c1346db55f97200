"""One pipeline pass per optimizer step, its memory bounded by the micro batches in flight: torch's stages and
schedules (torch.distributed.pipelining, 2.13) with two things changed, and the planner's model of the same.

One ``schedule.step`` over all the step's M micro batches fills and drains the pipeline once: a bubble of about
(P - 1) / (v M) of the step (torch's own op table for interleaved 1F1B at pp16 x 2 virtual stages: 49% of rank 0's
slots idle at 16 micro batches per step, 1.5% at 1,024). But torch holds memory for every micro batch of a pass:

1. a ``PipelineStage`` allocates at its first step a receive buffer for every micro batch's input and one for every
   micro batch's output gradient (``_setup_forward_recv_info``, ``_setup_backward_recv_info``) and keeps them;
2. the multi-stage runtime (interleaved 1F1B, ZBV, DualPipeV: ``_PipelineScheduleRuntime._step_microbatches``)
   waits for its sends only when the pass ends, and a send's ``Work`` keeps its tensor until waited (gloo, NCCL):
   every activation gradient a stage sent stays alive until then.

``BoundedStage`` (a ``PipelineStage``) sets its receive infos up with meta placeholders, allocates a micro batch's
buffer when the schedule's receive action asks for its ops, and drops it once consumed: the input after its
forward (the forward keeps it for backward, as autograd needs), the output's gradient after its backward. Under a
multi-stage schedule it issues its sends itself (the schedule gets no ops; its ``_batch_p2p([])`` is a no-op) and
a ``SendLedger`` waits each at the first of this rank's actions by which the peer has provably posted the matching
receive: one that consumes a message the peer sent after posting it (``release_points``, from the lowered action
lists of every rank that the schedule builds), or earlier once the backend reports it complete (NCCL: an event
query, no host sync; gloo reports a send complete only once waited). So no wait can block on a receive that is not
posted (no deadlock), and on NCCL, where the two ranks' point-to-point ops run in order on one stream per pair,
that receive finished before the consumed message left: the wait's stream dependency is already met. What is
left (the gradients of the pass's last backwards, after which the peer sends nothing back) is waited when the
step ends. ``Schedule1F1B`` (one stage per rank) waits its sends at the next exchange
already and keeps its ops.

For the planner (parallel/plan.py): ``buffer_timeline`` is a rank's step as these classes hold memory, action by
action, and ``idle_fraction`` the share of its slots in torch's own compute order with no compute action.
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Callable
from unittest import mock

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as pps
from torch.distributed.pipelining._utils import _make_tensor_from_meta, generate_stage_to_rank_mapping

SENDS = (pps.SEND_F, pps.SEND_B)
BACKWARDS = (pps.FULL_BACKWARD, pps.BACKWARD_INPUT)
_TORCH_ADD_UNSHARD_RESHARD = pps._add_unshard_reshard  # torch's, before ``lowering`` patches it in
RUNTIME_SCHEDULES = {"interleaved_1f1b": pps.ScheduleInterleaved1F1B, "zbv": pps.ScheduleZBVZeroBubble,
                     "dualpipev": pps.ScheduleDualPipeV}


class BoundedStage(PipelineStage):
    """A ``PipelineStage`` whose receive buffers live from their receive to their use, and whose sends, under a
    multi-stage schedule (``ledger`` set by ``bound_sends``), a ``SendLedger`` waits."""

    ledger: "SendLedger | None" = None

    def _setup_forward_recv_info(self, num_microbatches: int, has_backward: bool) -> None:
        with _placeholders(self):
            super()._setup_forward_recv_info(num_microbatches, has_backward)

    def _setup_backward_recv_info(self, num_microbatches: int) -> None:
        with _placeholders(self):
            super()._setup_backward_recv_info(num_microbatches)

    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        self._reached(pps.RECV_F, fwd_chunk_id)
        _allocate(self.args_recv_info[fwd_chunk_id], self.device)
        return super().get_fwd_recv_ops(fwd_chunk_id)

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        self._reached(pps.RECV_B, bwd_chunk_id)
        if self.has_backward and not self.is_last:
            _allocate(self.grad_recv_info[bwd_chunk_id], self.device)
        return super().get_bwd_recv_ops(bwd_chunk_id)

    def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index: int) -> None:
        """A V schedule hands the next stage's input gradients over; torch zeroes the buffer of a None one."""
        _allocate([info for info, g in zip(self.grad_recv_info[mb_index], next_stage_bwd_outputs) if g is None],
                  self.device)
        super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        self._reached(pps.FORWARD, fwd_chunk_id)
        try:
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        finally:
            _release(self.args_recv_info.get(fwd_chunk_id, ()))

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
        self._reached(pps.FULL_BACKWARD if full_backward else pps.BACKWARD_INPUT, bwd_chunk_id)
        try:
            out = super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                             last_backward=last_backward)
        finally:
            _release(self.grad_recv_info.get(bwd_chunk_id, ()))
        if full_backward:
            _let_go(loss)
        return out

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward=False):
        self._reached(pps.BACKWARD_WEIGHT, bwd_chunk_id)
        state = self.backward_state.get(bwd_chunk_id) if self.is_last else None
        out = super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)
        _let_go(state[2] if state else None)  # the loss, this stage's output
        return out

    def get_fwd_send_ops(self, fwd_chunk_id: int):
        return self._sent(pps.SEND_F, fwd_chunk_id, super().get_fwd_send_ops(fwd_chunk_id))

    def get_bwd_send_ops(self, bwd_chunk_id: int):
        return self._sent(pps.SEND_B, bwd_chunk_id, super().get_bwd_send_ops(bwd_chunk_id))

    def _sent(self, kind, mb: int, ops: list) -> list:
        if self.ledger is None:
            return ops  # Schedule1F1B issues and waits them
        self.ledger.send(self.stage_index, kind, mb, ops)
        return []

    def _reached(self, kind, mb: int) -> None:
        if self.ledger is not None:
            self.ledger.reached(self.stage_index, kind, mb)


@contextmanager
def _placeholders(stage: PipelineStage):
    """torch's setup allocates each receive buffer on ``stage.device``: meta placeholders instead."""
    device, stage.device = stage.device, torch.device("meta")
    try:
        yield
    finally:
        stage.device = device


def _allocate(infos, device) -> None:
    for info in infos:
        if not info.is_root_arg and info.buffer is not None and info.buffer.is_meta:
            info.buffer = _make_tensor_from_meta(info.tensor_meta, device)


def _release(infos) -> None:
    for info in infos:
        if not info.is_root_arg and info.buffer is not None:
            info.buffer = _make_tensor_from_meta(info.tensor_meta, "meta")


def _let_go(loss) -> None:
    """The schedule keeps every micro batch's loss until the pass ends, and with it the loss's autograd graph,
    whose leaves (the last stage's received input among them) stay alive: cut it once the backward has run, as
    torch cuts the last stage's output (the zero-bubble split keeps it as a 1-tuple)."""
    for t in loss if isinstance(loss, tuple) else (loss,):
        if isinstance(t, torch.Tensor) and t.grad_fn is not None and not t._is_view():
            t.detach_()


class SendLedger:
    """The sends of one rank's stages during a pass of a multi-stage schedule: each waited when ``release_points``
    says the peer has posted its receive (or once the backend reports it complete), the rest by ``finish``."""

    def __init__(self, order: dict[int, list], stage_to_rank: Callable[[int], int], rank: int):
        flat = {r: flatten(actions) for r, actions in order.items()}
        self.index = {a[:3]: k for k, a in enumerate(flat[rank])}
        self.release = release_points(flat, stage_to_rank, rank)
        self.pending: list[tuple[float, list]] = []  # (release index, works)

    def reached(self, stage: int, kind, mb: int) -> int:
        k = self.index[(stage, kind, mb)]
        self._wait_released(k)
        return k

    def send(self, stage: int, kind, mb: int, ops: list) -> None:
        k = self.reached(stage, kind, mb)
        self.pending.append((self.release[k], pps._batch_p2p(ops)))
        self._wait_released(k)

    def _wait_released(self, k: int) -> None:
        kept = []
        for release, works in self.pending:
            if release <= k or all(w.is_completed() for w in works):
                for w in works:
                    w.wait()
            else:
                kept.append((release, works))
        self.pending = kept

    def finish(self) -> None:
        for _, works in self.pending:
            for w in works:
                w.wait()
        self.pending = []


def bound_sends(schedule, stages: list[BoundedStage]) -> None:
    """Give a multi-stage schedule's stages (this rank's) one ``SendLedger`` and wait what it holds when each
    ``step`` ends."""
    ledger = SendLedger(schedule.pipeline_order_with_comms, schedule.stage_index_to_group_rank.__getitem__,
                        schedule.rank)
    for stage in stages:
        stage.ledger = ledger
    step = schedule.step

    def run(*args, **kwargs):
        try:
            out = step(*args, **kwargs)
        except BaseException:
            ledger.pending = []  # a failed pass: its sends are not waited (a peer may never receive them)
            raise
        ledger.finish()
        return out

    schedule.step = run


def flatten(actions: list) -> list:
    """A rank's actions, the sub-actions of an overlapped forward + backward (DualPipeV) in their place, no idle
    slots."""
    return [sub for a in actions if a is not None for sub in (a.sub_actions or (a,))]


def _destination(a) -> int:
    return a.stage_index + 1 if a.computation_type == pps.SEND_F else a.stage_index - 1


def release_points(order: dict[int, list], stage_to_rank: Callable[[int], int], rank: int) -> dict[int, float]:
    """For each send in ``rank``'s flattened lowered actions ``order[rank]``, by index: the index of the first of
    its actions by which the peer has posted the matching receive, i.e. one that consumes a message the peer sent
    after posting it (the runtime waits a receive before the compute that reads it), and not before the send
    itself; ``inf`` where none comes (waited when the pass ends)."""
    mine = order[rank]
    index = {a[:3]: k for k, a in enumerate(mine)}

    def consumer(a) -> int:  # this rank's action reading what the peer's send ``a`` carries
        if a.computation_type == pps.SEND_F:
            return index[(a.stage_index + 1, pps.FORWARD, a.microbatch_index)]
        full = index.get((a.stage_index - 1, pps.FULL_BACKWARD, a.microbatch_index))
        return full if full is not None else index[(a.stage_index - 1, pps.BACKWARD_INPUT, a.microbatch_index)]

    peers: dict[int, tuple[list[float], dict]] = {}
    out: dict[int, float] = {}
    for k, a in enumerate(mine):
        if a.computation_type not in SENDS:
            continue
        peer = stage_to_rank(_destination(a))
        if peer not in peers:  # suffix[j]: the earliest consumer of a message the peer sends here at or after j
            theirs = order[peer]
            suffix = [math.inf] * (len(theirs) + 1)
            for j in range(len(theirs) - 1, -1, -1):
                b = theirs[j]
                here = b.computation_type in SENDS and stage_to_rank(_destination(b)) == rank
                suffix[j] = min(suffix[j + 1], consumer(b)) if here else suffix[j + 1]
            peers[peer] = suffix, {b[:3]: j for j, b in enumerate(theirs)}
        suffix, where = peers[peer]
        recv = pps.RECV_F if a.computation_type == pps.SEND_F else pps.RECV_B
        out[k] = max(k, suffix[where[(_destination(a), recv, a.microbatch_index)] + 1])
    return out


def stage_to_rank(schedule: str, pp: int, virtual: int) -> Callable[[int], int]:
    style = "v" if schedule in ("zbv", "dualpipev") else "loop"
    return generate_stage_to_rank_mapping(pp, pp * virtual, style=style).__getitem__


@functools.lru_cache(maxsize=8)
def compute_order(schedule: str, pp: int, virtual: int, n_microbatches: int) -> dict[int, list]:
    """torch's compute actions of every pipeline rank for one pass, one slot each, idle slots None (the tables its
    schedules are built from)."""
    if schedule == "1f1b":  # its table as built, before the REDUCE_GRAD lowering (which drops the idle slots)
        fake = SimpleNamespace(_num_stages=pp, _n_microbatches=n_microbatches)
        with mock.patch.object(pps, "_add_reduce_grad", lambda actions, n: actions):
            return pps.Schedule1F1B._get_pipeline_order(fake)
    rounds = max(1, n_microbatches // pp)
    fake = SimpleNamespace(n_local_stages=virtual, microbatches_per_round=n_microbatches // rounds, pp_group_size=pp,
                           _n_microbatches=n_microbatches, num_stages=pp * virtual)
    return {r: RUNTIME_SCHEDULES[schedule]._calculate_single_rank_operations(fake, r) for r in range(pp)}


@functools.lru_cache(maxsize=8)
def lowered_order(schedule: str, pp: int, virtual: int, n_microbatches: int) -> dict[int, list]:
    """Every rank's actions with the communication a multi-stage schedule's runtime runs, flattened, lowered as
    ``_PipelineScheduleRuntime._prepare_schedule_with_comms`` lowers them."""
    order = compute_order(schedule, pp, virtual, n_microbatches)
    actions = {r: pps._add_reduce_grad(_add_unshard_reshard(a), n_microbatches) for r, a in order.items()}
    lowered = pps._add_send_recv(actions, stage_to_rank(schedule, pp, virtual), pp * virtual)
    return {r: flatten(a) for r, a in lowered.items()}


def _add_unshard_reshard(actions: list) -> list:
    """``pps._add_unshard_reshard`` (FSDP's prefetch of the next 3 stages; the actions take simulation steps when
    the sends and receives are placed), in linear time where a rank holds at most 3 stages: all are fetched before
    its first action and each is let go before the first action after its last (torch's is quadratic: ~0.7 s
    per rank at 4,158 slots, ~11 s for the 16 ranks every process lowers when it builds the schedule)."""
    acts = [a for a in actions if a is not None]
    stages = [[s.stage_index for s in (a.sub_actions or (a,))] for a in acts]
    last = {s: i for i, ss in enumerate(stages) for s in ss}
    if len(last) > 3:
        return _TORCH_ADD_UNSHARD_RESHARD(actions)
    out, active = [], set()
    for i, a in enumerate(acts):
        if i == 0:
            for s in dict.fromkeys(s for ss in stages for s in ss):
                active.add(s)
                out.append(pps._Action(s, pps.UNSHARD, None))
        for s in [s for s in active if last[s] < i]:
            active.remove(s)
            out.append(pps._Action(s, pps.RESHARD, None))
        out.append(a)
    return out + [pps._Action(s, pps.RESHARD, None) for s in list(active)]


@contextmanager
def lowering():
    """Build a multi-stage schedule with ``_add_unshard_reshard`` below (what torch's constructor lowers every
    rank's actions with)."""
    with mock.patch.object(pps, "_add_unshard_reshard", _add_unshard_reshard):
        yield


def idle_fraction(schedule: str, pp: int, virtual: int, n_microbatches: int, rank: int) -> float:
    """The share of ``rank``'s slots in torch's compute order for one pass with no compute action (a forward, a
    backward or a weight gradient each take one slot): the pipeline bubble as the schedule lays it out."""
    slots = compute_order(schedule, pp, virtual, n_microbatches)[rank]
    return sum(a is None for a in slots) / len(slots)


@functools.lru_cache(maxsize=64)
def buffer_timeline(schedule: str, pp: int, virtual: int, n_microbatches: int, rank: int) -> tuple:
    """``rank``'s pass as the planner walks it: ("F", stage) and ("B", stage) compute actions (B: a full backward or
    the input half of a zero-bubble one, after which the micro batch's activations are gone) and, between them,
    ("buf", n): n pipeline tensors (a stage's received input or output gradient, or the input gradient it sends or
    hands to its previous stage: [micro batch, sequence, dim] in the activation dtype) allocated (n > 0) or freed,
    as ``BoundedStage`` and ``SendLedger`` hold them under torch's schedule: a receive buffer from its receive to
    the end of the forward's backward that keeps it (the input; the weight half under zero bubble) or of its
    backward (the output gradient); a sent gradient until its release point, one handed over until its stage's
    backward. A stage's output is kept until its backward (the planner counts it with the activations)."""
    if schedule == "1f1b":
        return _one_f_one_b(pp, n_microbatches, rank)
    order = lowered_order(schedule, pp, virtual, n_microbatches)
    to_rank, last_stage = stage_to_rank(schedule, pp, virtual), pp * virtual - 1
    mine = order[rank]
    release = release_points(order, to_rank, rank)
    gradients = {k: r for k, r in release.items() if mine[k].computation_type == pps.SEND_B}
    freed_at = Counter(r for k, r in gradients.items() if k < r < math.inf)
    out = []
    for k, a in enumerate(mine):
        if freed_at[k]:
            out.append(("buf", -freed_at[k]))
        kind, s = a.computation_type, a.stage_index
        received = s > 0 and to_rank(s - 1) != rank  # else its input is the previous stage's output, here
        kept = int(received) + int(s != last_stage)  # its input and its output's gradient
        if kind in (pps.RECV_F, pps.RECV_B):
            out.append(("buf", 1))
        elif kind == pps.FORWARD:
            out.append(("F", s))
        elif kind in BACKWARDS:
            out += [("B", s), ("buf", int(s > 0) - (kept if kind == pps.FULL_BACKWARD else 0))]
        elif kind == pps.BACKWARD_WEIGHT:
            out.append(("buf", -kept))
        elif k in gradients and gradients[k] == k:
            out.append(("buf", -1))
    left = sum(1 for r in gradients.values() if r == math.inf)
    return tuple(out + [("buf", -left)] * bool(left))


def _one_f_one_b(pp: int, n_microbatches: int, rank: int) -> tuple:
    """Schedule1F1B's pass on ``rank`` (its ``_step_microbatches``): the P2P ops it keeps in local variables hold
    a micro batch's output gradient buffer until the next one is allocated, the gradient it sent until the next
    backward has run, and the last forward's input until the pass ends."""
    first, last = rank == 0, rank == pp - 1
    recv_in, recv_grad, grad_out = int(not first), int(not last), int(not first)
    warm = min(n_microbatches, pp - rank)
    out = [("buf", recv_in), ("F", rank)] * warm
    for b in range(n_microbatches):
        out += [("buf", recv_grad), ("buf", -recv_grad * (b > 0)), ("B", rank),
                ("buf", -recv_in * (b < n_microbatches - 1) + grad_out - grad_out * (b > 0))]
        if b < n_microbatches - warm:
            out += [("buf", recv_in), ("F", rank)]
    out.append(("buf", -(recv_in + recv_grad + grad_out)))
    return tuple(e for e in out if e[0] != "buf" or e[1])
