"""The memory techniques on this CPU (parallel/recompute.py, fp8_storage.py, activation_offload.py, models/loss.py):
per setting, the bytes one step keeps for backward (measured and planned), the peak of building a trainer and
its first step (tensor bytes and RSS growth measured, and planned), the step time; and what 300 steps of
configs/tiny.yaml reach with FP8 activation storage against none.

    python benchmarks/memory.py                   # saved bytes, peaks, step times (minutes)
    python benchmarks/memory.py --full-runs       # + 300-step tiny.yaml runs: none (2 seeds, the noise) and FP8

configs/tiny.yaml's model at micro batch 16 x 256, float32, one process, one torch thread. Saved bytes come from
a counting saved_tensors_hooks (tests/audit.py SavedBytes); the peak of tensor bytes from tests/audit.py LiveBytes
(what torch.cuda.max_memory_allocated reports on a GPU: what the planner plans), peak RSS from VmHWM in a fresh
process per setting (MALLOC_MMAP_THRESHOLD_=65536 so freed blocks go back; it also holds what is not a tensor,
the interpreter's and the libraries' heap); step times are medians of steps interleaved across the
settings in one process. On a CPU, offload's host copies live in the same memory as the "device": its RSS is not a
saving here (the planned peak is compared as device + host). Results go to benchmarks/results/memory.md (``--out``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configs import load_config  # noqa: E402
from launch.trainer import Trainer, init_runtime  # noqa: E402
from parallel.plan import plan_layout  # noqa: E402
from tests.audit import LiveBytes, SavedBytes, vm_bytes  # noqa: E402
from benchmarks._tiny_runs import TINY, interleaved_step_times, quiet, runs_table, train_run  # noqa: E402

FP8 = "--parallel.fp8_activations=[moe_up_input, swiglu_input]"
SETTINGS = {
    "none": [],
    "full": ["--parallel.recompute=full"],
    "selective": ["--parallel.recompute=selective"],
    "none+fp8": [FP8],
    "selective+fp8": ["--parallel.recompute=selective", FP8],
    "selective+fp8+offload": ["--parallel.recompute=selective", FP8, "--parallel.activation_offload=true"],
    "chunked loss": ["--model.loss_chunk_tokens=512"],
}
SHAPE = ["--data.micro_batch_size=16", "--data.seq_len=256"]
STEP_ONLY = ["--train.eval_interval=0", "--train.ckpt_interval=0"]


def one_setting(name: str, work: Path) -> dict:
    """In this (fresh) process, after a warm-up trainer (imports, the data index): the peak RSS growth from
    building the setting's trainer through its first step (parameters, gradients and optimizer state included,
    as the planner's peak), and the bytes that step keeps for backward."""
    torch.set_num_threads(1)
    cfg = load_config(TINY, quiet(work / name, *STEP_ONLY, *SHAPE, *SETTINGS[name]))
    warm = Trainer(cfg, init_runtime(cfg))
    warm.train_step()
    warm.close()
    del warm
    gc.collect()
    base = vm_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    with LiveBytes() as live:
        trainer = Trainer(cfg, init_runtime(cfg))
        with SavedBytes(trainer.model) as saved:
            trainer.train_step()
    plan = plan_layout(cfg, 1)[0]
    return {"device": saved.device, "host": saved.host, "peak": vm_bytes("VmHWM") - base, "tensors": live.peak,
            "planned_saved": plan.saved_per_micro, "planned_host": plan.activations_host_per_micro,
            "planned_peak": plan.peak + plan.activations_host}


def timing(steps: int, work: Path) -> dict[str, float]:
    torch.set_num_threads(1)
    trainers = {}
    for name, overrides in SETTINGS.items():
        cfg = load_config(TINY, quiet(work / f"t_{name}", *STEP_ONLY, *SHAPE, *overrides))
        trainers[name] = Trainer(cfg, init_runtime(cfg))
        trainers[name].train_step()  # warm-up
    return interleaved_step_times(trainers, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", help=argparse.SUPPRESS)  # internal: measure one setting in this process
    p.add_argument("--timing-steps", type=int, default=6)
    p.add_argument("--full-runs", action="store_true", help="also train tiny.yaml for --steps: none x 2 seeds, FP8")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--work", default="outputs/bench_memory")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.md"))
    a = p.parse_args()
    work = Path(a.work)
    if a.setting:
        print(json.dumps(one_setting(a.setting, work)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    measured = {}
    for name in SETTINGS:
        run = subprocess.run([sys.executable, __file__, "--setting", name, "--work", str(work)], check=True,
                             cwd=ROOT, env=env, capture_output=True, text=True)
        measured[name] = json.loads(run.stdout.strip().splitlines()[-1])
    times = timing(a.timing_steps, work)
    mib = 2**20
    lines = [f"# Memory techniques (benchmarks/memory.py, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             "1 thread)", "", "configs/tiny.yaml's model (float32), micro batch 16 x 256, one process.", "",
             "| setting | saved for backward: device | host | planned (device + host) | peak tensor bytes: build + "
             "first step | peak RSS growth | planned peak (device + host) | step (median) | vs none |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in measured.items():
        lines.append(f"| {name} | {m['device'] / mib:.1f} MiB | {m['host'] / mib:.1f} MiB | "
                     f"{m['planned_saved'] / mib:.1f} MiB | {m['tensors'] / mib:.1f} MiB | {m['peak'] / mib:.1f} MiB | "
                     f"{m['planned_peak'] / mib:.1f} MiB ({100 * (m['planned_peak'] / m['tensors'] - 1):+.0f}%) | "
                     f"{times[name]:.3f} s | {times[name] / times['none']:.2f}x |")
    if a.full_runs:
        runs = {"none (seed 0)": [], "none (seed 1)": ["--train.seed=1"], "fp8 (seed 0)": [FP8]}
        results = {name: train_run(work / f"full_{i}", [*o, f"--train.eval_interval={a.steps}"], a.steps)
                   for i, (name, o) in enumerate(runs.items())}
        lines += runs_table(a.steps, results, "none (seed 0)")
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
