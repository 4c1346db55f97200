"""What the benchmarks that train configs/tiny.yaml share: quiet overrides, a whole train.py run read back from
its metrics, and step times of several trainers interleaved in one process (the machine is noisy: setups are
compared within one run, step by step)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def quiet(out: Path, *overrides: str) -> list[str]:
    return [f"--train.output_dir={out}", "--train.resume=none", "--logging.wandb_mode=disabled",
            "--logging.progress_bar=false", *overrides]


def train_run(out: Path, overrides: list[str], steps: int) -> dict:
    """``train.py`` on tiny.yaml for ``steps`` (one thread, no checkpoints): the last validation and training
    losses and the minutes it took."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(TINY),
           *quiet(out, *overrides, f"--train.steps={steps}", "--train.ckpt_interval=0")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    loss = [r["loss"] for r in records if "loss" in r]
    return {"val_loss": val[-1], "train_loss": loss[-1], "minutes": (time.perf_counter() - t0) / 60}


def interleaved_step_times(trainers: dict, steps: int) -> dict[str, float]:
    """Median seconds of ``train_step`` per trainer, the trainers taking turns step by step."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(steps):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def runs_table(steps: int, runs: dict[str, dict], ref: str) -> list[str]:
    """Markdown lines: each ``train_run`` result against ``runs[ref]``'s validation loss."""
    lines = ["", f"## {steps} steps of configs/tiny.yaml (train.py, OMP_NUM_THREADS=1)", "",
             f"| setup | validation loss | vs {ref} | last training loss | minutes |", "|---|---:|---:|---:|---:|"]
    for name, r in runs.items():
        rel = r["val_loss"] / runs[ref]["val_loss"] - 1
        lines.append(f"| {name} | {r['val_loss']:.4f} | {100 * rel:+.2f}% | {r['train_loss']:.4f} | "
                     f"{r['minutes']:.1f} |")
    return lines
