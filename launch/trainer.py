"""The training loop: build data, model, optimizer and hooks from a ``JobConfig``, then step, log, evaluate,
checkpoint and resume. ``run(cfg)`` is what ``train.py`` calls (also usable in-process by tests).

One optimizer step = ``data.grad_accum`` micro batches per data-parallel rank:
reset per-step stats -> set lr -> forward/backward (loss in float32) -> clip the global grad norm -> optimizer
step (MuonClip / ZeRO-1 DistributedMuonClip) -> post-step hooks (QK-Clip, then router bias update) -> log.
A step whose global grad norm is not finite changes nothing (weights, optimizer state, QK-Clip, router biases),
decided on the device (muonclip/skip_nonfinite.py); the loop counts it when it next reads the losses and stops after
``monitor.max_skipped_steps`` in a row (launch/skipped_steps.py). The step count, lr schedule and data go on.
With ``optim.qk_clip_mode: post_step`` the QK-Clip hook only reduces the forward's max logits for logging, and
after the router bias update one no-grad forward on the step's micro batches re-measures and clips
(``muonclip.QKClip.apply_post_step``), so each head ends the step <= tau on that batch.

No host synchronisation per step: the loss and gradient norm stay tensors (``StepResult``) until a log, eval,
checkpoint or stop step, where the pending losses are read in one transfer and judged by the spike detector in
order (so a spike is acted on at most ``train.log_interval`` steps late; rollback still restores the checkpoint
before it and skips its batches, and no checkpoint is written before its steps were judged).
After each step the loop learns, from an all-reduce started one step earlier on a CPU group, whether any rank got
SIGTERM/SIGINT (launch/preemption.py): if so every rank saves that step and ``fit`` returns
(``RunResult.preempted``). The loop reports progress to the
rank watchdog (launch/watchdog.py) per micro batch (under PP per pipeline action), optimizer step and eval batch;
saves run as "busy" phases.
With ``train.ckpt_async`` saves are ``checkpoint.AsyncSaver``'s, polled after each step.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import data as data_lib
import muonclip
from configs import JobConfig, config_to_dict, dump_config
from launch import checkpoint as ckpt
from launch import monitor as monitor_lib
from launch import watchdog as watchdog_lib
from launch.build import (build_data, build_model, build_optimizer, build_pipeline, load_released_weights,
                          tokens_per_step, use_zero1, wraps_in_ddp)
from launch.checkpoint import shard_views
from launch.hooks import RouterBiasUpdate, register_post_step
from launch.metrics import MetricsLogger, environment_info
from launch.mfu import peak_tflops, throughput_metrics
from launch.preemption import PreemptionHandler
from launch.skipped_steps import SkippedSteps
from launch.runtime import Runtime, init_runtime
from parallel.precision import PrecisionPolicy
from launch.schedule import schedule_fn
from models import Transformer
from models.flops import flops_per_token


@dataclass
class StepResult:
    """One optimizer step, its loss (mean over the global batch), gradient norm and whether the update applied
    (a bool: the norm was finite) as tensors on the device: reading them is a host synchronisation, which the loop
    does at log intervals only."""

    loss_t: torch.Tensor
    grad_norm_t: torch.Tensor
    lr: float
    applied_t: torch.Tensor

    @property
    def loss(self) -> float:
        return float(self.loss_t)

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_t)


@dataclass
class RunResult:
    losses: dict[int, float] = field(default_factory=dict)  # completed step -> training loss of that step
    val_losses: dict[int, float] = field(default_factory=dict)
    final_step: int = 0
    preempted: bool = False  # stopped early by SIGTERM/SIGINT after saving a checkpoint


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, cfg: JobConfig, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.step = 0  # completed optimizer steps
        self.metrics = MetricsLogger(cfg, environment_info(rt.world_size, rt.device), enabled=rt.rank == 0)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.watchdog = None
        if rt.world_size > 1:
            self.watchdog = watchdog_lib.Watchdog(
                dist.distributed_c10d._get_default_store(), rt.rank, rt.world_size, cfg.train.dist_timeout_s,
                on_fail=lambda text: self.metrics.alert("rank watchdog", text, "ERROR", self.step)).start()
        self.preemption = PreemptionHandler().install()
        self.saver = ckpt.AsyncSaver() if cfg.train.ckpt_async else None
        self.loader, self.datasets = build_data(cfg, rt)
        with torch.device("meta"):
            coverage = muonclip.coverage(Transformer(cfg.model))
        self.metrics.write("parameters by optimizer (global shapes):\n" + muonclip.format_coverage(coverage))
        self.metrics.add_config("muon_coverage", coverage)
        self.model, self.placements = build_model(cfg, rt)  # with PP: this rank's stages' layers only
        # the whole model's FLOPs per token and the device's peak, for the logged MFU (launch/mfu.py)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_tflops = peak_tflops(cfg.train.peak_tflops, rt.device)
        self.pipeline = build_pipeline(cfg, rt, self.model) if cfg.parallel.pp > 1 else None
        if self.pipeline is not None:  # progress per pipeline action: a step may outlast train.dist_timeout_s
            self.pipeline.report_progress(self._progress)
        # the micro batch loss's weight in the step's gradient (under PP backward sums the micro batches and the
        # optimizer divides the sum: build_pipeline)
        self.model.set_aux_loss_scale(1.0 if self.pipeline is not None else 1.0 / cfg.data.grad_accum)
        self.zero1 = use_zero1(cfg, rt)
        dp_group = rt.groups.dp_group if rt.groups.dp_size > 1 else None
        self.train_model = self.model
        if wraps_in_ddp(cfg, rt, self.zero1):
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, process_group=dp_group, broadcast_buffers=False,  # buffers = per-rank step stats
                device_ids=None)  # no moving of inputs: the document segments come in host memory (train_step)
        self.optimizer = build_optimizer(cfg, self.model, self.placements, rt, self.zero1)
        if self.pipeline is not None and self.zero1:  # zero-bubble weight gradients into the float32 buckets
            self.pipeline.collect_weight_grads(self.optimizer.grads_added_by_hand)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.lr_factor = schedule_fn(cfg.schedule, cfg.train.steps)
        o = cfg.optim
        post_step = o.qk_clip and o.qk_clip_mode == "post_step"
        # inf: measure + reduce the forward's max logits (logging), never clip
        tau = o.qk_clip_tau if o.qk_clip and not post_step else math.inf
        # QK-Clip clips each query/key weight right after its update, on its float32 master (muonclip/qk_clip.py)
        self.qkclip = muonclip.QKClip(self.model.qk_clip_specs(), tau=tau, process_group=dp_group)
        self.qkclip.register(self.optimizer)
        self.qkclip_post = (muonclip.QKClip(self.model.qk_clip_specs(), tau=o.qk_clip_tau, process_group=dp_group,
                                            optimizer=self.optimizer) if post_step else None)
        # the loads of every token of the stage (sequence parallelism: each TP rank routes its own; without it TP peers
        # count the same tokens tp times, which the sign of the update and the logged shares do not see)
        self.router_hook = RouterBiasUpdate(self.model.moe_routers(), process_group=rt.groups.stage)
        self.manual_hooks = [h for h in (register_post_step(self.optimizer, self.router_hook),) if h is not None]
        m = cfg.monitor
        self.detector = monitor_lib.SpikeDetector(m.spike_window, m.spike_threshold, m.spike_min_history)
        self.skipped = SkippedSteps(m.max_skipped_steps,
                                    lambda title, text, level: self.metrics.alert(title, text, level, self.step))
        self.rollbacks = (monitor_lib.RollbackPolicy(max_rollbacks=m.max_rollbacks, reset_after=m.rollback_reset_after,
                                                     batches_per_step=cfg.data.grad_accum) if m.rollback else None)
        # max logits / router loads over the whole logging interval, not just the logged step
        self.interval_stats = monitor_lib.IntervalStats()
        self.autocast = PrecisionPolicy.from_config(cfg).autocast(rt.device.type)
        self.ckpt_root = ckpt.checkpoint_root(cfg.train.output_dir)
        self.last_ckpt_step: int | None = None
        if not self._resume() and cfg.train.init_from:
            n_mtp = load_released_weights(cfg, rt, self.model, self.placements, self.optimizer)
            self.metrics.write(f"weights from {cfg.train.init_from} (train.init_from), fresh optimizer state"
                               + (f"; its {n_mtp} multi-token-prediction layer(s) skipped (not modelled here)"
                                  if n_mtp else ""))
        self.metrics.write_config()

    def close(self) -> None:
        """Release what the run holds: the save in flight (waited for), watchdog, signal handlers, loggers."""
        try:
            if getattr(self, "saver", None) is not None:
                self.saver.close()
        finally:
            if getattr(self, "watchdog", None) is not None:
                self.watchdog.stop()
            if getattr(self, "preemption", None) is not None:
                self.preemption.uninstall()
            self.metrics.close()

    # ---------------------------------------------------------------- one step
    def train_step(self) -> StepResult:
        cfg, device = self.cfg, self.rt.device
        self.model.reset_step_stats()
        lr_scale = self.lr_factor(self.step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * lr_scale
        accum = cfg.data.grad_accum
        loss_sum = torch.zeros((), device=device)
        step_inputs = []
        if self.pipeline is not None:
            loss_sum = self._pipeline_step(self._pipeline_batches(accum), train=True)
            self._progress()
        for micro in range(accum if self.pipeline is None else 0):
            # (segments_BT,) under data.document_mask, left in host memory: the model reads the documents' lengths
            # there (models/document_mask.py) and copies the segments to the device itself
            inputs_BT, targets_BT, *documents = self.loader.next_batch()
            inputs_BT, targets_BT = inputs_BT.to(device, non_blocking=True), targets_BT.to(device, non_blocking=True)
            step_inputs.append((inputs_BT, *documents))
            sync = micro == accum - 1 or not hasattr(self.train_model, "no_sync")
            with (nullcontext() if sync else self.train_model.no_sync()):
                with self.autocast:
                    loss = self.train_model(inputs_BT, targets_BT, *documents)  # float32 mean cross entropy
                (loss / accum).backward()
            loss_sum += loss.detach()
            self._progress()
        grad_norm = self._clip_gradients()
        applied = self.optimizer.step_ok  # the norm was finite: the step applies (muonclip/skip_nonfinite.py)
        self.optimizer.step()
        self._progress()
        for hook in self.manual_hooks:
            hook(self.optimizer)
        if self.qkclip_post is not None:
            self._post_step_clip(step_inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss_avg = self.rt.mean_over_dp(loss_sum / accum)
        self.step += 1
        return StepResult(loss_avg.detach(), torch.as_tensor(grad_norm).detach(), lr=cfg.optim.lr * lr_scale,
                          applied_t=applied)

    def _pipeline_batches(self, n: int) -> list:
        """The step's ``n`` micro batches as this rank's stages need them: a rank without the first or the last
        stage needs neither tokens nor targets (nor, without document masking, anything), so its loader only moves
        on (every loader stays at the same position, for checkpoints and for the layouts a resume may change
        to)."""
        if self.pipeline.has_first or self.pipeline.has_last or self.cfg.data.document_mask:
            return [self.loader.next_batch() for _ in range(n)]
        self.loader.skip(n)
        return [None] * n

    def _pipeline_step(self, batches: list, train: bool) -> torch.Tensor:
        """The micro batches through this rank's stages (one ``schedule.step`` over all of them, or one per round of
        ``parallel.pp_microbatches``, gradients adding up across rounds; or the pipelined forward for validation,
        ``parallel.pp`` micro batches per call):
        the sum of their losses, summed over the pipeline group so every rank has it (the last stage computed it).
        Only the first stage's inputs and the last stage's targets go to the device."""
        pipe, device = self.pipeline, self.rt.device
        inputs = [b[0].to(device) for b in batches] if pipe.has_first else None
        targets = [b[1].to(device) for b in batches] if pipe.has_last else None
        # document masking: every stage's attention needs the segments (torch passes kwargs to each stage), in host
        # memory (models/document_mask.py reads the documents' lengths there)
        segments = [b[2] for b in batches] if self.cfg.data.document_mask else None
        per_round = self.cfg.parallel.microbatches_per_round(len(batches))
        if not train:  # the stage-major forward keeps what a stage sends in a call until the call ends: pp at a time
            per_round = min(per_round, self.cfg.parallel.pp)
        losses: list[torch.Tensor] = []
        with self.autocast:
            for start in range(0, len(batches), per_round):
                inputs_BT = inputs[start:start + per_round] if pipe.has_first else None
                targets_BT = targets[start:start + per_round] if pipe.has_last else None
                segments_BT = segments[start:start + per_round] if segments is not None else None
                if train:
                    round_losses: list[torch.Tensor] = []  # torch's step replaces the list's contents
                    documents = {} if segments_BT is None else {"segments": torch.cat(segments_BT)}
                    pipe.schedule.step(*([torch.cat(inputs_BT)] if pipe.has_first else []),
                                       target=torch.cat(targets_BT) if pipe.has_last else None,
                                       losses=round_losses, return_outputs=False, **documents)
                    losses += round_losses
                else:
                    n = min(per_round, len(batches) - start)
                    losses.append(pipe.forward_losses(n, inputs_BT, targets_BT, device, segments_BT))
        total = torch.stack([x.detach().float() for x in losses]).sum() if pipe.has_last else torch.zeros(
            (), device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.rt.groups.pp_group)
        return total

    def _busy(self):
        """A phase that may outlast train.dist_timeout_s without loop progress (liveness is still watched)."""
        return self.watchdog.busy() if self.watchdog is not None else nullcontext()

    def _progress(self) -> None:
        if self.watchdog is not None:
            self.watchdog.progress(self.step)

    @torch.no_grad()
    def _post_step_clip(self, step_inputs: list[tuple[torch.Tensor, ...]]) -> None:
        """QK-Clip on the updated weights: one no-grad forward over all the step's micro batches at once (no saved
        activations; stopped after the last attention layer), clipping layer by layer. Eval mode records no max
        logits; the routers' load counters are restored so the probe leaves no trace but the clip."""
        routers = self.model.moe_routers()
        loads = [r.expert_load_E.clone() for r in routers]
        inputs_BT, *documents = (torch.cat(parts) for parts in zip(*step_inputs))
        self.model.eval()
        try:
            with self.autocast:
                self.qkclip_post.apply_post_step(lambda: self.model(inputs_BT, None, *documents))
        finally:
            self.model.train()
            for router, load_E in zip(routers, loads):
                router.expert_load_E.copy_(load_E)

    def _clip_gradients(self) -> torch.Tensor:
        """Reduce the gradients (ZeRO-1 buckets; bf16 parameters' float32 buffers without DDP) and clip their
        global norm (float32)."""
        self.optimizer.reduce_gradients()
        return self.optimizer.clip_grad_norm_(self.cfg.optim.grad_clip or math.inf)  # inf: measure only

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over ``data.val_batches`` global batches of the validation stream: the same samples whatever
        the split of the global batch into micro_batch_size, dp and grad_accum."""
        d, g = self.cfg.data, self.rt.groups
        self.model.eval()
        total, n = torch.zeros((), device=self.rt.device), 0
        batches = data_lib.val_batches(self.datasets.val, d.micro_batch_size, self.datasets.val_samples,
                                       g.data_rank, g.data_size, d.document_mask, g.cp_rank, g.cp_size)
        if self.pipeline is not None:  # grad_accum micro batches at a time (a global batch's share)
            # a middle stage needs no batch (document masking: its segments)
            ends = self.pipeline.has_first or self.pipeline.has_last or d.document_mask
            batches = list(batches) if ends else [None] * data_lib.val_batch_count(
                d.micro_batch_size, self.datasets.val_samples, g.data_size)
            for k in range(0, len(batches), d.grad_accum):
                total += self._pipeline_step(batches[k:k + d.grad_accum], train=False)
                n += len(batches[k:k + d.grad_accum])
                self._progress()
            batches = []
        for batch in batches:
            with self.autocast:
                inputs_BT, targets_BT, *documents = batch  # the segments stay in host memory (train_step)
                total += self.model(inputs_BT.to(self.rt.device), targets_BT.to(self.rt.device), *documents)
            n += 1
            self._progress()
        self.model.train()
        return float(self.rt.mean_over_dp(total / max(n, 1)))

    # ---------------------------------------------------------------- loop
    def fit(self) -> RunResult:
        try:
            if self.watchdog is not None:
                self.watchdog.arm()
            return self._loop()
        finally:
            self.close()

    def _loop(self) -> RunResult:
        cfg, result = self.cfg.train, RunResult()
        if self.step >= cfg.steps:
            self.metrics.write(f"already at step {self.step} of {cfg.steps}: nothing to do")
        self.metrics.start_progress(self.step, cfg.steps)
        window: list[float] = []
        pending: list[tuple[int, StepResult]] = []  # steps whose loss the host has not read yet
        t_last, tokens_per_step = time.perf_counter(), self.tokens_per_step()
        while self.step < cfg.steps:
            out = self.train_step()
            self.metrics.progress(self.step)
            self.interval_stats.update(self.model, self.qkclip, self.router_hook.loads_list(), self.qkclip_post)
            pending.append((self.step, out))
            last = self.step == cfg.steps
            log_now = self.step % cfg.log_interval == 0 or last
            eval_now = bool(cfg.eval_interval) and (self.step % cfg.eval_interval == 0 or last)
            save_now = bool(cfg.ckpt_interval) and (self.step % cfg.ckpt_interval == 0 or last)
            stop = self.preemption.stop_requested_async()
            if log_now or eval_now or save_now or stop:  # every checkpoint is of steps the detector has judged
                if self._judge(pending, result, window):
                    window.clear()
                    self.interval_stats.reset()  # drop the statistics of the rolled-back steps
                    self.metrics.progress(self.step)  # the bar goes back with the step
                    continue
            if log_now:
                now = time.perf_counter()
                self._log(out, window, len(window) * tokens_per_step / (now - t_last))
                window.clear()
                t_last = now
            if eval_now:
                result.val_losses[self.step] = val = self.evaluate()
                self.metrics.log(self.step, {"val_loss": val})
                t_last = time.perf_counter()
            self._async_save_done(block=False)
            if stop:
                self._preempted(result)
                break
            if save_now:
                self.save()
                t_last = time.perf_counter()
        if not result.preempted and self.preemption.stop_requested():
            self._preempted(result)  # a signal during the last step: the run is done, but save it all the same
        self._async_save_done(block=True)
        result.final_step = self.step
        return result

    def _judge(self, pending: list[tuple[int, StepResult]], result: RunResult, window: list[float]) -> bool:
        """Read the pending steps' losses, grad norms and skip flags on the host (one transfer); pass the losses to
        the spike detector in order, then count the skipped steps (launch/skipped_steps.py: a non-finite loss stops
        or rolls back first); True if one was a spike and the run rolled back (the later pending steps are discarded
        with it). Detection therefore waits for the next log / eval / checkpoint / stop step: at most log_interval
        steps."""
        values = torch.stack([torch.stack([out.loss_t.float(), out.grad_norm_t.float(), out.applied_t.float()])
                              for _, out in pending]).tolist()
        steps = [step for step, _ in pending]
        pending.clear()
        for step, (loss, grad_norm, applied) in zip(steps, values):
            event = self.detector.update(step - 1, loss)
            if event is not None and self.on_spike(event):
                return True
            if not math.isfinite(loss):
                text = (f"loss is {loss} at step {step}: lower optim.lr or qk_clip_tau, or enable "
                        "monitor.rollback with checkpoints")
                self.metrics.alert("non-finite loss", text + "; training stopped", "ERROR", self.step)
                raise FloatingPointError(text)
            self.skipped.record(step, not applied, grad_norm)
            result.losses[step] = loss
            window.append(loss)
            self.metrics.show_loss(loss)
        return False

    def _preempted(self, result: RunResult) -> None:
        """A signal asked to stop (launch/preemption.py): checkpoint this step and return (exit code 0)."""
        name = self.preemption.signal_name or "a signal on another rank"
        if self.last_ckpt_step != self.step:
            self.save()
        self._async_save_done(block=True)
        result.preempted = True
        text = (f"{name}: stopped after step {self.step} of {self.cfg.train.steps} and saved "
                f"{ckpt.step_dir(self.ckpt_root, self.step)}; run the same command again to resume")
        self.metrics.alert("preempted", text, "WARN", self.step)

    def tokens_per_step(self) -> int:
        return tokens_per_step(self.cfg, self.rt)

    def _log(self, out: StepResult, window: list[float], tokens_per_s: float) -> None:
        # window[-1] is this step's loss, already read on the host by _judge
        metrics = {"loss": window[-1], "loss_avg": sum(window) / len(window), "lr": out.lr,
                   "grad_norm": out.grad_norm, "tokens_per_s": tokens_per_s,
                   "tokens": self.loader.tokens_consumed, "data/seq_len": self.loader.seq_len}
        metrics.update(throughput_metrics(tokens_per_s, self.flops_per_token, self.rt.world_size, self.peak_tflops))
        metrics.update({f"data/{name}/tokens": n for name, n in self.loader.tokens_per_source().items()})
        metrics.update(self.interval_stats.flush(group=self.rt.groups.pp_group,
                                                 head_group=self.rt.groups.tp_group))
        metrics.update(self.skipped.metrics())
        if self.zero1:  # the share of gradient buckets whose reduction backward started (the rest waited for it)
            stats = self.optimizer.last_step_stats
            metrics["zero1/reduced_in_backward"] = stats["reduced_in_backward"] / max(stats["buckets"], 1)
        self.metrics.log(self.step, metrics)

    # ---------------------------------------------------------------- spikes
    def on_spike(self, event: dict[str, Any]) -> bool:
        """Hook point for loss spikes (from ``launch.monitor.SpikeDetector``). Logs the event; with
        ``monitor.rollback`` it restores the last checkpoint and skips the offending batches
        (``monitor.RollbackPolicy`` decides). Returns True when the state was rolled back."""
        self.metrics.log(self.step, {"spike/loss": event["loss"], "spike/z": event["z"]}, console=False)
        text = (f"loss spike at step {event['step']}: loss {event['loss']:.4f} (median {event['median']:.4f}, "
                f"z {event['z']:.1f}, {event['reason']})")
        if self.rollbacks is None:
            if math.isfinite(event["loss"]):  # a non-finite loss gets its own alert as the run stops
                self.metrics.alert("loss spike", text + "; no action (monitor.rollback is off)", "WARN", self.step)
            return False
        self._async_save_done(block=True)  # the checkpoint to roll back to may still be in flight
        plan = self.rollbacks.plan(event, self.last_ckpt_step)
        self.load(ckpt.step_dir(self.ckpt_root, plan.restore_step), restore_monitor=False)
        self.loader.skip(plan.skip_batches)
        self.metrics.alert("loss spike: rolled back", f"{text}; rolled back to step {plan.restore_step} and "
                           f"skipped {plan.skip_batches} batches", "WARN", self.step)
        self.metrics.log(self.step, self.rollbacks.metrics(), console=False)
        return True

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_tensors(self, saving: bool = False) -> dict[str, Any]:
        """The model's weights under their names (float32 masters where this rank keeps them: the master IS the
        checkpoint's weight) and the optimizer state by name. ``saving``: a bf16 parameter whose master another
        rank keeps (ZeRO-1) is left to that rank; a load fills it, rounded, straight from the checkpoint."""
        model = ckpt.model_state(self.model, self.optimizer, saving)
        tensors = {**model, **ckpt.optimizer_state(self.optimizer)}
        return shard_views(tensors, self.placements, self.rt.groups, self.optimizer.row_shards())

    def save(self) -> None:
        extra = {"step": self.step, "loader": self.loader.state_dict(), "rng": ckpt.rng_state(self.rt.device),
                 "detector": self.detector.state_dict(), "skipped": self.skipped.state_dict(),
                 "rollbacks": self.rollbacks.state_dict() if self.rollbacks is not None else None}
        meta = {"config": config_to_dict(self.cfg), "world_size": self.rt.world_size}
        args = (self.ckpt_root, self.step, self.checkpoint_tensors(saving=True), meta, extra)
        kwargs = dict(keep=self.cfg.train.ckpt_keep, config_text=dump_config(self.cfg))
        t0 = time.perf_counter()
        if self.saver is not None:
            with self._busy():
                self._async_save_done(block=True)  # at most one in flight
                self.saver.save(*args, **kwargs)
            self.metrics.log(self.step, {"ckpt/blocked_s": time.perf_counter() - t0}, console=False)
            return
        with self._busy():
            path = ckpt.save_checkpoint(*args, **kwargs)
        self.last_ckpt_step = self.step
        seconds = time.perf_counter() - t0
        self.metrics.log(self.step, {"ckpt/blocked_s": seconds, "ckpt/save_s": seconds}, console=False)
        self.metrics.write(f"saved checkpoint {path}")

    def _async_save_done(self, block: bool) -> None:
        """Record an asynchronous save that has committed (waiting for it with ``block``); raises its error."""
        if self.saver is None:
            return
        with self._busy():
            done = self.saver.wait() if block else self.saver.poll()
        if done is not None:
            step, seconds = done
            self.last_ckpt_step = step
            self.metrics.log(self.step, {"ckpt/save_s": seconds}, console=False)
            self.metrics.write(f"saved checkpoint {ckpt.step_dir(self.ckpt_root, step)} (asynchronous, {seconds:.1f} s)")

    def load(self, path, restore_monitor: bool = True) -> None:
        model_cfg = config_to_dict(self.cfg)["model"]
        meta, extra = ckpt.load_checkpoint(path, self.checkpoint_tensors(), model_cfg,
                                           verify=self.cfg.train.ckpt_verify)
        self.optimizer.sync_params_from_masters()  # the bf16 parameters = their loaded masters, rounded
        self.step = int(extra["step"])
        # a sequence-length stage (e.g. 4k -> 32k -> 128k with YaRN): weights, optimizer state and step carry over
        changes = ckpt.context_changes(meta.get("config", {}).get("model"), model_cfg)
        data_change = self.loader.load_state_dict(extra["loader"])
        if changes or data_change:
            text = "; ".join([*(f"model.{c}" for c in changes), *([data_change] if data_change else [])])
            self.metrics.alert("sequence-length stage", f"resumed {path} at step {self.step}: {text}", "INFO",
                               self.step)
        ckpt.set_rng_state(extra["rng"], self.rt.device)
        if restore_monitor and extra.get("detector"):
            self.detector.load_state_dict(extra["detector"])
        if restore_monitor and extra.get("skipped"):
            self.skipped.load_state_dict(extra["skipped"])
        if restore_monitor and self.rollbacks is not None and extra.get("rollbacks"):
            self.rollbacks.load_state_dict(extra["rollbacks"])
        self.last_ckpt_step = self.step

    def _resume(self) -> bool:
        """Load the checkpoint ``train.resume`` names, if any; whether one was loaded (then train.init_from,
        the starting weights of a new run, does not apply)."""
        path = ckpt.resolve_resume(self.cfg.train.resume, self.cfg.train.output_dir)
        if path is None:
            existing = ckpt.list_checkpoints(self.ckpt_root)
            if existing and self.cfg.train.resume == "none":
                raise ValueError(f"{self.ckpt_root} already holds checkpoints (last: {existing[-1][1].name}) and "
                                 "train.resume is 'none': use --train.resume=auto to continue, or another "
                                 "--train.output_dir, or delete them")
            return False
        while True:
            try:
                self.load(path)
                break
            except ckpt.DamagedCheckpoint as e:
                path = self._fallback(path, e)
        self.metrics.write(f"resumed from {path} at step {self.step}")
        return True

    def _fallback(self, damaged, error: Exception):
        """``resume: auto`` met a damaged checkpoint: the previous complete one when ``train.resume_fallback``
        allows it (with a warning and an alert), else the error, saying what the user can do."""
        older = [p for step, p in ckpt.list_checkpoints(self.ckpt_root) if p.name < damaged.name]
        if self.cfg.train.resume != "auto" or not older:
            raise error
        if not self.cfg.train.resume_fallback:
            raise ckpt.DamagedCheckpoint(f"{error}; set --train.resume_fallback=true to resume from the previous "
                                         f"checkpoint {older[-1]} instead, or pass --train.resume=<path>") from error
        self.metrics.alert("damaged checkpoint", f"{error}; resuming from the previous checkpoint {older[-1]}",
                           "WARN", self.step)
        return older[-1]


def run(cfg: JobConfig) -> RunResult:
    """Train according to ``cfg`` (initialises torch.distributed when launched by torchrun)."""
    rt = init_runtime(cfg)
    result = Trainer(cfg, rt).fit()  # on an error: no collective teardown on the way out (a peer may be gone, or
    rt.shutdown()                    # killed by torchrun once one rank exits): the error is reported first and
    return result                    # the process exit releases the group (launch/errors.py)
