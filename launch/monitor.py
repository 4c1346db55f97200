"""Stability monitoring: per-step attention/router statistics, loss-spike detection, rollback decisions.

Three independent pieces:

* ``step_stats(model, qkclip)``: per-layer and per-head attention max logits and per-expert router load, read
  from the model's per-step buffers (``max_logits_H`` of the attention modules, ``expert_load_E`` of the
  routers) with ONE device->host transfer. ``IntervalStats`` keeps them over a logging interval and, at the log
  step, gathers them over the ranks that split heads (tensor parallel) and layers (pipeline stages), so what is
  logged, plotted and shown on the console is every head of the model, as one process would log it.
* ``SpikeDetector``: robust z-score of each loss against the median/MAD of a moving window of accepted losses;
  non-finite losses are always spikes; spikes never enter the window.
* ``plan_rollback`` / ``RollbackPolicy``: pure decision logic. On a spike at step ``s`` with the last checkpoint
  at step ``c`` (checkpoint "at step c" = state after c optimizer steps, data loader positioned at the data of
  step c): restore ``c``, then skip the global batches of steps ``c..s`` (they preceded or caused the spike), so
  the loader continues exactly where it would have been at step ``s + 1``: no batch replayed, no position lost
  other than the counted skipped ones. The step counter resumes at ``c`` (the model has done c updates).
  Too many rollbacks in a row (no ``reset_after`` clean steps past the previous spike) raise
  ``RollbackLimitError``.

Step numbering: ``step`` is the 0-based index of the optimizer step whose loss is reported (the trainer's
``step`` before it is incremented). Checkpoint step = number of completed steps.
"""
from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# --------------------------------------------------------------------------------------------- statistics
def _layer_index(name: str, fallback: int) -> int:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else fallback


def _attention_max_logits(model: nn.Module, qkclip: Any | None) -> list[tuple[int, torch.Tensor]]:
    """[(layer index, max_logits_H)]: QKClip's reduced values when it has run, else the model's local buffers."""
    out = []
    for name, m in model.named_modules():
        buf = getattr(m, "max_logits_H", None)
        if isinstance(buf, torch.Tensor):
            out.append((_layer_index(name, len(out)), buf))
    last = getattr(qkclip, "last_max_logits", None) if qkclip is not None else None
    if last is not None:  # rows in layer order; the indices are global (a pipeline stage holds some layers)
        return [(i, row) for (i, _), row in zip(out, last)]
    return out


def _router_loads(model: nn.Module, expert_loads: list[torch.Tensor] | None) -> list[tuple[int, torch.Tensor]]:
    names = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "expert_load_E", None),
                                                                         torch.Tensor)]
    if expert_loads is not None:
        if len(expert_loads) != len(names):
            raise ValueError(f"step_stats: got {len(expert_loads)} expert_loads but the model has {len(names)} "
                             "routers; pass one globally reduced load tensor per router, in model order")
        return [(_layer_index(n, i), load) for i, ((n, _), load) in enumerate(zip(names, expert_loads))]
    return [(_layer_index(n, i), m.expert_load_E) for i, (n, m) in enumerate(names)]


@torch.no_grad()
def step_stats(model: nn.Module, qkclip: Any | None = None,
               expert_loads: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Attention and router statistics of the last step as a flat ``{name: float}`` dict for W&B.

    Keys: ``max_logit/max`` (over all layers), ``max_logit/l{i}``, ``max_logit/l{i}/h{h}`` (pre-softmax scaled
    logit maxima; with ``qkclip`` these are the values it reduced over data-parallel ranks, measured BEFORE
    its clip; heads are this rank's heads under tensor parallelism: ``IntervalStats.flush`` gathers them),
    ``qk_clip/clipped_heads`` (with ``qkclip``),
    ``router/l{i}/e{e}`` (share of routed token slots that went to expert e; sums to 1),
    ``router/l{i}/max_over_mean`` (1.0 = perfectly balanced). ``expert_loads`` overrides the model's local
    counts (e.g. loads already all-reduced for the aux-loss-free bias update). Layers that recorded nothing since
    ``model.reset_step_stats()`` (eval, no tokens) are omitted. Exactly one host transfer (``.tolist()``).
    """
    clipped = getattr(qkclip, "last_clipped", None) if qkclip is not None else None
    return _format_stats(_attention_max_logits(model, qkclip), _router_loads(model, expert_loads), clipped)


def _format_stats(attn: list[tuple[int, torch.Tensor]], routers: list[tuple[int, torch.Tensor]],
                  clipped: torch.Tensor | None, post_max: torch.Tensor | None = None) -> dict[str, float]:
    pieces: list[torch.Tensor] = []
    for _, max_H in attn:
        pieces += [max_H.detach().float().reshape(-1), max_H.detach().float().max().reshape(1)]
    for _, load_E in routers:
        load_E = load_E.detach().float().reshape(-1)
        total = load_E.sum()
        share_E = load_E / total.clamp_min(1e-12)
        pieces += [share_E, (load_E.max() / load_E.mean().clamp_min(1e-12)).reshape(1), total.reshape(1)]
    if clipped is not None:
        pieces.append(clipped.detach().float().reshape(1))
    if post_max is not None:
        pieces.append(post_max.detach().float().reshape(1))
    if not pieces:
        return {}
    device = pieces[0].device
    values = torch.cat([p.to(device) for p in pieces]).tolist()  # the one device->host sync

    out: dict[str, float] = {}
    pos = 0
    layer_max: list[float] = []
    for i, max_H in attn:
        n = max_H.numel()
        heads, lmax = values[pos:pos + n], values[pos + n]
        pos += n + 1
        if not math.isfinite(lmax) and lmax < 0:  # -inf: nothing recorded since reset
            continue
        out[f"max_logit/l{i}"] = lmax
        layer_max.append(lmax)
        for h, v in enumerate(heads):
            if not (math.isinf(v) and v < 0):  # -inf padding (layers with fewer heads)
                out[f"max_logit/l{i}/h{h}"] = v
    if layer_max:
        out["max_logit/max"] = max(layer_max)
    for i, load_E in routers:
        n = load_E.numel()
        shares, ratio, total = values[pos:pos + n], values[pos + n], values[pos + n + 1]
        pos += n + 2
        if total <= 0:
            continue
        for e, s in enumerate(shares):
            out[f"router/l{i}/e{e}"] = s
        out[f"router/l{i}/max_over_mean"] = ratio
    if clipped is not None:
        out["qk_clip/clipped_heads"] = values[pos]
        pos += 1
    if post_max is not None:
        out["qk_clip/post_step_max_logit"] = values[pos]
    return out


class IntervalStats:
    """``step_stats`` over a logging interval instead of the last step only: call ``update`` after EVERY step
    (device ops only, no host sync) and ``flush()`` at log time (one host transfer; then it starts over).
    Max logits are the running max over the interval, router loads are summed, ``qk_clip/clipped_heads`` is
    the number of (step, head) clips in the interval. With ``post_clip`` (the ``QKClip`` that ran
    ``apply_post_step``) the clip count is its own and ``qk_clip/post_step_max_logit`` is the interval's max of
    the logits re-measured after the update, before that clip. ``router/seq_aux_loss`` (when the model computes
    DeepSeek-V3's sequence-wise balance loss) is its per-step value summed over layers, averaged over the
    interval (a second host transfer)."""

    def __init__(self) -> None:
        self.reset()

    @torch.no_grad()
    def update(self, model: nn.Module, qkclip: Any | None = None,
               expert_loads: list[torch.Tensor] | None = None, post_clip: Any | None = None) -> None:
        self._steps += 1
        attn = _attention_max_logits(model, qkclip)
        loads = _router_loads(model, expert_loads)
        source = post_clip if post_clip is not None else qkclip
        clipped = getattr(source, "last_clipped", None) if source is not None else None
        post = getattr(post_clip, "last_max_logits", None) if post_clip is not None else None
        if self._attn is None:
            self._attn = [(i, t.detach().float().clone()) for i, t in attn]
            self._loads = [(i, t.detach().float().clone()) for i, t in loads]
        else:
            for (_, acc), (_, t) in zip(self._attn, attn):
                torch.maximum(acc, t.detach().float(), out=acc)
            for (_, acc), (_, t) in zip(self._loads, loads):
                acc.add_(t.detach().float())
        if clipped is not None:
            clipped = clipped.detach().float()
            self._clipped = clipped.clone() if self._clipped is None else self._clipped + clipped
        if post is not None:
            post = post.detach().float().max()
            self._post_max = post.clone() if self._post_max is None else torch.maximum(self._post_max, post)
        aux = _seq_aux_loss(model)
        if aux is not None:
            self._aux = aux if self._aux is None else self._aux + aux

    def flush(self, group: Any = None, head_group: Any = None) -> dict[str, float]:
        """The interval's statistics (``step_stats`` keys); then starts a new interval. With ``head_group`` (the
        tensor-parallel group of attention: each rank holds other heads of the same layers) every head is
        gathered in global order and each rank's clip count added (``_gather_heads``); with ``group`` (the
        pipeline group: each rank holds other layers) every rank's layers are gathered, so each returns the
        statistics of the whole model (collectives over both groups; every rank of them calls it)."""
        attn, loads, clipped, post, aux = self._attn, self._loads, self._clipped, self._post_max, self._aux
        steps = self._steps
        if attn and head_group is not None and dist.get_world_size(head_group) > 1:
            attn, clipped, post = _gather_heads(attn, clipped, post, head_group)
        if group is not None and dist.get_world_size(group) > 1:
            mine = (_cpu(attn or []), _cpu(loads or []), None if clipped is None else clipped.cpu(),
                    None if post is None else post.cpu(), None if aux is None else aux.cpu())
            parts: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, mine, group=group)
            attn = sorted((x for part in parts for x in part[0]), key=lambda x: x[0]) or None
            loads = sorted((x for part in parts for x in part[1]), key=lambda x: x[0])
            counts = [part[2] for part in parts if part[2] is not None]
            clipped = sum(counts[1:], counts[0]) if counts else None
            posts = [part[3] for part in parts if part[3] is not None]
            post = torch.stack(posts).max() if posts else None
            auxes = [part[4] for part in parts if part[4] is not None]  # each stage's layers: summed
            aux = sum(auxes[1:], auxes[0]) if auxes else None
        self.reset()
        if attn is None:
            return {}
        out = _format_stats(attn, loads, clipped, post)
        if aux is not None:
            out["router/seq_aux_loss"] = float(aux) / max(steps, 1)
        return out

    def reset(self) -> None:
        """Drop what was accumulated (e.g. the steps undone by a rollback), without a host sync."""
        self._attn: list[tuple[int, torch.Tensor]] | None = None
        self._loads: list[tuple[int, torch.Tensor]] | None = None
        self._clipped: torch.Tensor | None = None
        self._post_max: torch.Tensor | None = None
        self._aux: torch.Tensor | None = None
        self._steps = 0


def _gather_heads(attn: list[tuple[int, torch.Tensor]], clipped: torch.Tensor | None, post: torch.Tensor | None,
                  group: Any) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor | None, torch.Tensor | None]:
    """Every head of these layers from the ranks of ``group`` that split them: tensor-parallel rank r holds heads
    [r * H/tp, (r + 1) * H/tp) of each layer (parallel/tensor_parallel.py), so rank r's heads go to r * H/tp of
    the gathered rows (every layer has H heads). Each rank counted the clips of its own heads (the same count on
    its data/context-parallel replicas, which reduced the max logits before): the counts are summed; the
    post-step max is the max. One ``all_gather_single`` of L * H/tp + 1 float32 values per rank (+ 1 in
    post_step mode), on the device: no host sync."""
    size = dist.get_world_size(group)
    rows_LH = torch.stack([t.reshape(-1) for _, t in attn])
    n_layers, n_local = rows_LH.shape
    extras = [x.reshape(1).to(rows_LH) for x in (clipped, post) if x is not None]
    mine = torch.cat([rows_LH.reshape(-1), *extras])
    every = mine.new_empty(size * mine.numel())
    dist.all_gather_single(every, mine, group=group)
    every_RN = every.view(size, -1)
    heads_LH = every_RN[:, :n_layers * n_local].view(size, n_layers, n_local).transpose(0, 1).reshape(n_layers, -1)
    pos = n_layers * n_local
    if clipped is not None:
        clipped, pos = every_RN[:, pos].sum(), pos + 1
    if post is not None:
        post = every_RN[:, pos].max()
    return [(i, row) for (i, _), row in zip(attn, heads_LH)], clipped, post


def _seq_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The step's sequence-wise balance loss summed over this model's routers (each the mean over its forwards),
    or None when no router computed one."""
    stats = [m.seq_aux_loss_stat for m in model.modules() if getattr(m, "seq_aux_loss_alpha", 0) > 0]
    if not stats:
        return None
    stat_L2 = torch.stack(stats).detach().float()
    return (stat_L2[:, 0] / stat_L2[:, 1].clamp_min(1)).sum()  # a router with no forward: 0 / 1


def _cpu(pairs: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    return [(i, t.cpu()) for i, t in pairs]


# --------------------------------------------------------------------------------------------- spike detector
_MAD_TO_STD = 1.4826  # MAD of a normal distribution times this = its standard deviation


def robust_z(loss: float, history: list[float], min_scale_frac: float = 0.0) -> tuple[float, float, float]:
    """(z, median, scale) of ``loss`` against ``history``: z = (loss - median) / scale, scale = 1.4826 * MAD
    floored at ``min_scale_frac * |median|`` (and at 1e-12) so a flat plateau does not make noise look huge."""
    median = statistics.median(history)
    mad = statistics.median(abs(x - median) for x in history)
    scale = max(_MAD_TO_STD * mad, min_scale_frac * abs(median), 1e-12)
    return (loss - median) / scale, median, scale


class SpikeDetector:
    """Flags loss spikes: ``loss - median > z_threshold * scale`` over a window of accepted losses (one-sided:
    a sudden drop is not a spike), or any non-finite loss. Needs ``min_history`` accepted losses before it
    judges finite losses. Spikes are not added to the window, so one outlier does not raise the bar."""

    def __init__(self, window: int = 100, z_threshold: float = 6.0, min_history: int = 20,
                 min_scale_frac: float = 0.005) -> None:
        if window < 2 or not 1 <= min_history <= window:
            raise ValueError(f"SpikeDetector: need window >= 2 and 1 <= min_history <= window, got window={window}, "
                             f"min_history={min_history}")
        if not z_threshold > 0 or min_scale_frac < 0:
            raise ValueError(f"SpikeDetector: z_threshold must be > 0 and min_scale_frac >= 0, got {z_threshold}, "
                             f"{min_scale_frac}")
        self.window, self.z_threshold, self.min_history = window, float(z_threshold), min_history
        self.min_scale_frac = float(min_scale_frac)
        self.history: deque[float] = deque(maxlen=window)
        self.n_spikes = 0

    def update(self, step: int, loss: float) -> dict[str, Any] | None:
        """Judge one step's loss; returns None (accepted, added to the window) or an event dict
        ``{"step", "loss", "reason" ("non_finite" | "z_score"), "z", "median", "scale"}``."""
        loss = float(loss)
        if not math.isfinite(loss):
            self.n_spikes += 1
            return {"step": step, "loss": loss, "reason": "non_finite", "z": math.inf, "median": math.nan,
                    "scale": math.nan}
        if len(self.history) >= self.min_history:
            z, median, scale = robust_z(loss, list(self.history), self.min_scale_frac)
            if z > self.z_threshold:
                self.n_spikes += 1
                return {"step": step, "loss": loss, "reason": "z_score", "z": z, "median": median, "scale": scale}
        self.history.append(loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "z_threshold": self.z_threshold, "min_history": self.min_history,
                "min_scale_frac": self.min_scale_frac, "history": list(self.history), "n_spikes": self.n_spikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"window", "z_threshold", "min_history", "history", "n_spikes"} - set(state)
        if missing:
            raise ValueError(f"SpikeDetector.load_state_dict: checkpoint state misses {sorted(missing)}")
        self.__init__(int(state["window"]), float(state["z_threshold"]), int(state["min_history"]),
                      float(state.get("min_scale_frac", self.min_scale_frac)))
        self.history.extend(float(x) for x in state["history"])
        self.n_spikes = int(state["n_spikes"])


# --------------------------------------------------------------------------------------------- rollback
class RollbackLimitError(RuntimeError):
    pass


@dataclass(frozen=True)
class RollbackPlan:
    spike_step: int  # step whose loss spiked
    restore_step: int  # checkpoint to load; the step counter resumes here
    skip_batches: int  # global batches to skip right after loading (``BatchLoader.skip(n)``): data of steps
    #                    restore_step..spike_step, so the loader continues at the data of spike_step + 1


def plan_rollback(spike_step: int, checkpoint_step: int | None, batches_per_step: int = 1) -> RollbackPlan:
    """Restore ``checkpoint_step`` and skip the data of steps ``checkpoint_step..spike_step`` (inclusive).

    ``batches_per_step``: global batches consumed per optimizer step (gradient accumulation). The loaded data
    loader sits at the data of step ``checkpoint_step``; after the skip it sits at the data of ``spike_step + 1``.
    """
    if checkpoint_step is None:
        raise RollbackLimitError(f"loss spike at step {spike_step} but there is no checkpoint to roll back to; "
                                 "save checkpoints more often (checkpoint interval) or disable rollback")
    if batches_per_step < 1:
        raise ValueError(f"batches_per_step must be >= 1, got {batches_per_step}")
    if not 0 <= checkpoint_step <= spike_step:
        raise ValueError(f"rollback: the last checkpoint (step {checkpoint_step}) must be at or before the spike "
                         f"(step {spike_step}); checkpoints must be saved only after a step's loss was accepted")
    return RollbackPlan(spike_step=spike_step, restore_step=checkpoint_step,
                        skip_batches=(spike_step - checkpoint_step + 1) * batches_per_step)


class RollbackPolicy:
    """Counts rollbacks and refuses a run that keeps spiking.

    A rollback is "consecutive" when its spike comes within ``reset_after`` steps of the previous spike (the
    step counter goes back on rollback, so a spike at step <= previous spike + reset_after means training did
    not get cleanly past the trouble). More than ``max_rollbacks`` consecutive rollbacks raise
    ``RollbackLimitError``. Keep the live policy (do not load it from the restored checkpoint) across a
    rollback; save/load it with checkpoints for resumption.
    """

    def __init__(self, max_rollbacks: int = 3, reset_after: int = 100, batches_per_step: int = 1) -> None:
        if max_rollbacks < 0 or reset_after < 0 or batches_per_step < 1:
            raise ValueError(f"RollbackPolicy: need max_rollbacks >= 0, reset_after >= 0, batches_per_step >= 1; "
                             f"got {max_rollbacks}, {reset_after}, {batches_per_step}")
        self.max_rollbacks, self.reset_after, self.batches_per_step = max_rollbacks, reset_after, batches_per_step
        self.consecutive = 0
        self.total = 0
        self.skipped_batches = 0
        self.last_spike_step: int | None = None
        self.history: list[dict[str, Any]] = []

    def plan(self, event: dict[str, Any], checkpoint_step: int | None) -> RollbackPlan:
        """Decide the rollback for a ``SpikeDetector`` event; raises ``RollbackLimitError`` past the limit."""
        step = int(event["step"])
        if self.last_spike_step is not None and step > self.last_spike_step + self.reset_after:
            self.consecutive = 0
        if self.consecutive >= self.max_rollbacks:
            raise RollbackLimitError(
                f"loss spike at step {step} ({event.get('reason')}, loss={event.get('loss')}) after "
                f"{self.consecutive} consecutive rollbacks (max_rollbacks={self.max_rollbacks}; spikes "
                f"{[h['spike_step'] for h in self.history[-self.consecutive:]]}); training is not recovering: lower "
                "the learning rate or QK-Clip tau, check the data, or raise max_rollbacks / the spike threshold")
        plan = plan_rollback(step, checkpoint_step, self.batches_per_step)
        self.consecutive += 1
        self.total += 1
        self.skipped_batches += plan.skip_batches
        self.last_spike_step = step
        self.history.append({**asdict(plan), "reason": event.get("reason"), "loss": event.get("loss")})
        return plan

    def metrics(self) -> dict[str, float]:
        return {"rollback/count": float(self.total), "rollback/consecutive": float(self.consecutive),
                "rollback/skipped_batches": float(self.skipped_batches)}

    def state_dict(self) -> dict[str, Any]:
        return {"max_rollbacks": self.max_rollbacks, "reset_after": self.reset_after,
                "batches_per_step": self.batches_per_step, "consecutive": self.consecutive, "total": self.total,
                "skipped_batches": self.skipped_batches, "last_spike_step": self.last_spike_step,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"consecutive", "total", "skipped_batches", "last_spike_step"} - set(state)
        if missing:
            raise ValueError(f"RollbackPolicy.load_state_dict: checkpoint state misses {sorted(missing)}")
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
        self.skipped_batches = int(state["skipped_batches"])
        self.last_spike_step = None if state["last_spike_step"] is None else int(state["last_spike_step"])
        self.history = [dict(h) for h in state.get("history", [])]


__all__ = ["IntervalStats", "RollbackLimitError", "RollbackPlan", "RollbackPolicy", "SpikeDetector", "plan_rollback", "robust_z",
           "step_stats"]
