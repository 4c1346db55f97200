"""Rank-0 reporting: resolved config + environment, console (tqdm), metrics.jsonl and Weights & Biases.

Metrics are grouped for W&B with ``define_metric``: ``step`` (optimizer steps) and ``tokens`` are the x axes
(choose either in the UI); ``skipped_steps`` counts the steps skipped for a non-finite gradient norm; sections
are ``max_logit/*``, ``qk_clip/*``, ``router/*``, ``spike/*``, ``ckpt/*`` and ``data/*``. Events a user must not
miss (loss spike, rollback, non-finite loss, skipped step, dead/stuck rank, preemption save) also raise
``wandb.alert`` (e-mail/Slack per the user's W&B settings), at most one per title per ``monitor.alert_wait_s``;
they go to the console and metrics.jsonl (``{"alert": ...}``) in any mode.

W&B mode comes from ``logging.wandb_mode`` (default "offline": runs land in ``<output_dir>/wandb`` and can be
uploaded later with ``wandb sync``); the ``WANDB_MODE`` environment variable overrides it (tests set
"disabled"). A resumed job reuses the W&B run id stored in ``<output_dir>/wandb_run_id``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from configs import JobConfig, config_to_dict, dump_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(world_size: int, device: torch.device) -> dict[str, Any]:
    info = {
        "torch": torch.__version__, "python": platform.python_version(), "world_size": world_size,
        "device": str(device), "host": socket.gethostname(), "git_commit": git_commit(),
        "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(device))
    return info


def format_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
                     ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "tok/s {:,.0f}"), ("mfu", "mfu {:.1%}"),
                     ("max_logit/max", "max_logit {:.1f}"), ("qk_clip/post_step_max_logit", "post-step {:.1f}"),
                     ("qk_clip/clipped_heads", "clipped {:.0f}")):
        if key in m:
            parts.append(fmt.format(m[key]))
    if m.get("skipped_steps"):  # shown once a step was skipped (launch/skipped_steps.py)
        parts.append(f"skipped steps {m['skipped_steps']:.0f}")
    return " | ".join(parts)


SECTIONS = ("max_logit", "qk_clip", "router", "spike", "ckpt", "data", "zero1")


def define_metrics(run: Any) -> None:
    """Axes and summaries: every metric is plotted against ``step`` by default, ``tokens`` is logged as a metric
    so it can be chosen as the x axis; loss summaries keep the minimum, max-logit ones the maximum."""
    run.define_metric("tokens", summary="max")
    run.define_metric("*", step_metric="step", step_sync=True)
    for key in ("loss", "val_loss", "loss_avg"):
        run.define_metric(key, step_metric="step", summary="min")
    for section in SECTIONS:
        run.define_metric(f"{section}/*", step_metric="step", summary="max" if section == "max_logit" else "last")


class MetricsLogger:
    """Everything is a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, cfg: JobConfig, env: dict[str, Any], enabled: bool = True):
        self.cfg, self.enabled, self.env = cfg, enabled, env
        self.out_dir = Path(cfg.train.output_dir)
        self._bar = None
        self._wandb = None
        self._last_alert: dict[str, float] = {}
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a")
        self._init_wandb(env)

    def write_config(self) -> None:
        """``<output_dir>/config.yaml`` (loads back with --config). The trainer calls it once the run is known to
        start, after a resume was validated, so a failed resume leaves the previous run's file as it was."""
        if not self.enabled:
            return
        header = "resolved config of this run\n" + "\n".join(f"{k}: {v}" for k, v in self.env.items())
        (self.out_dir / "config.yaml").write_text(dump_config(self.cfg, header))

    def _init_wandb(self, env: dict[str, Any]) -> None:
        mode = os.environ.get("WANDB_MODE", self.cfg.logging.wandb_mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            self.write("wandb is not installed: metrics go to metrics.jsonl only")
            return
        id_file = self.out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        name = self.cfg.logging.run_name or self.out_dir.name
        self._wandb = wandb.init(project=self.cfg.logging.project, name=name, id=run_id, resume="allow",
                                 mode=mode, dir=str(self.out_dir), config={**config_to_dict(self.cfg), "env": env})
        define_metrics(self._wandb)

    def add_config(self, key: str, value: Any) -> None:
        """Extra start-up facts (e.g. the Muon coverage table) in the W&B run config."""
        if self._wandb is not None:
            self._wandb.config.update({key: value}, allow_val_change=True)

    def alert(self, title: str, text: str, level: str = "WARN", step: int | None = None) -> bool:
        """``wandb.alert`` (level INFO/WARN/ERROR), rate-limited per title by ``monitor.alert_wait_s``; always
        written to the console and metrics.jsonl. Returns whether W&B was alerted."""
        if not self.enabled:
            return False
        self.write(f"alert [{level}] {title}: {text}")
        self._jsonl.write(json.dumps({"step": step, "alert": title, "level": level, "text": text}) + "\n")
        self._jsonl.flush()
        now, wait = time.monotonic(), self.cfg.monitor.alert_wait_s
        if self._wandb is None or now - self._last_alert.get(title, -math.inf) < wait:
            return False
        self._last_alert[title] = now
        import wandb
        self._wandb.alert(title=title, text=text, level=getattr(wandb.AlertLevel, level),
                          wait_duration=wait)
        return True

    def start_progress(self, initial: int, total: int) -> None:
        if self.enabled and self.cfg.logging.progress_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    def progress(self, step: int) -> None:
        """The bar follows the completed optimizer steps: every step (no host read is needed to count one), and
        back to the restored step after a rollback."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def show_loss(self, loss: float) -> None:
        """The bar's loss, set when a log step has read the pending losses on the host."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        """Record ``metrics`` at ``step`` (completed optimizer steps) to jsonl, W&B and the console."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({"step": step, **metrics}, step=step)
        if console:
            self.write(format_line(step, self.cfg.train.steps, metrics))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        self.enabled = False  # closing twice is harmless
