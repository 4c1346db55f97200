"""float32 vs bf16 training on this CPU: step time, where the matmul FLOPs run, bytes per collective, and what
300 steps of configs/tiny.yaml reach in each precision.

Setups (parallel/precision.py):
  float32    train.param_dtype float32, no autocast (tiny.yaml's default)
  autocast   float32 parameters, bf16 autocast (train.dtype: bfloat16)
  bf16       bf16 parameters, float32 gradient buffers and master weights (train.param_dtype: bfloat16)
  bf16_pure  bf16 parameters updated in place, no master (optim.master_weights: false): what the master buys

    python benchmarks/precision.py --timing-steps 12            # step times + FLOP shares + planned bytes (minutes)
    python benchmarks/precision.py --full-runs                   # + 300-step runs of tiny.yaml per setup (hours)

Step times are medians of steps interleaved across the setups in one process, one torch thread. Results go to
benchmarks/results/precision.md (``--out``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configs import load_config  # noqa: E402
from launch.trainer import Trainer, init_runtime  # noqa: E402
from parallel.plan import plan_layout  # noqa: E402
from tests.audit import OpAudit  # noqa: E402
from benchmarks._tiny_runs import TINY, interleaved_step_times, quiet, runs_table, train_run  # noqa: E402

SETUPS = {
    "float32": [],
    "autocast": ["--train.dtype=bfloat16"],
    "bf16": ["--train.dtype=bfloat16", "--train.param_dtype=bfloat16"],
    "bf16_pure": ["--train.dtype=bfloat16", "--train.param_dtype=bfloat16", "--optim.master_weights=false"],
}


def timing(steps: int, work: Path) -> dict[str, dict]:
    """Median step time per setup (interleaved) and the share of matmul FLOPs in bf16 (one audited step)."""
    trainers = {}
    for name, overrides in SETUPS.items():
        if name == "bf16_pure":
            continue  # the same GEMMs as bf16
        cfg = load_config(TINY, quiet(work / name, *overrides, "--train.steps=300", "--train.eval_interval=0",
                                      "--train.ckpt_interval=0"))
        trainers[name] = Trainer(cfg, init_runtime(cfg))
    out = {}
    for name, trainer in trainers.items():
        with OpAudit() as audit:
            trainer.train_step()  # also the warm-up step
        model = [r for r in audit.records if r.region != "optimizer"]
        flops = audit.flops_by(lambda r: set(r.dtypes) == {torch.bfloat16}, model)
        total = sum(flops.values())
        out[name] = {"bf16_share": flops.get(True, 0) / total, "gflop": total / 1e9,
                     "fp32_regions": sorted({r.region.rsplit(".", 1)[-1] for r in model
                                             if set(r.dtypes) != {torch.bfloat16}})}
    for name, step_s in interleaved_step_times(trainers, steps).items():
        out[name]["step_s"] = step_s
    return out


def planned_bytes(world: int, layout: list[str]) -> dict[str, dict]:
    """Per-step bytes sent by rank 0 (the planner: exact for the optimizer's collectives) and its states."""
    out = {}
    for name in ("float32", "bf16"):
        cfg = load_config(TINY, [*SETUPS[name], *layout])
        plan = plan_layout(cfg, world)[0]
        out[name] = {**plan.comm, "params": plan.params, "grads": plan.grads, "optimizer": plan.optimizer}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timing-steps", type=int, default=12)
    p.add_argument("--full-runs", action="store_true", help="also train tiny.yaml for --steps in every setup")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--work", default="outputs/bench_precision")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision.md"))
    a = p.parse_args()
    torch.set_num_threads(1)
    work = Path(a.work)
    lines = [f"# Precision (benchmarks/precision.py, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             "1 thread)", ""]
    t = timing(a.timing_steps, work)
    lines += ["## Step time and matmul FLOPs (configs/tiny.yaml, 1 process, micro batch 8 x 256)", "",
              "| setup | step (median) | vs float32 | matmul GFLOP / step | bf16 share | float32 GEMMs in |",
              "|---|---:|---:|---:|---:|---|"]
    for name, row in t.items():
        lines.append(f"| {name} | {row['step_s']:.3f} s | {row['step_s'] / t['float32']['step_s']:.2f}x | "
                     f"{row['gflop']:.1f} | {100 * row['bf16_share']:.1f}% | {', '.join(row['fp32_regions'])} |")
    for title, world, layout in (("dp=2 ZeRO-1", 2, []), ("dp=2 x ep=2", 2, ["--parallel.ep=2"]),
                                 ("pp=2", 2, ["--parallel.pp=2", "--data.grad_accum=2"])):
        b = planned_bytes(world, layout)
        keys = sorted({k for row in b.values() for k in row})
        lines += ["", f"## Planned bytes of rank 0, {title} (parallel/plan.py)", "",
                  "| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for name, row in b.items():
            lines.append(f"| {name} | " + " | ".join(f"{row.get(k, 0) / 2**20:.2f} MiB" for k in keys) + " |")
    if a.full_runs:
        runs = {name: train_run(work / f"full_{name}", SETUPS[name], a.steps) for name in SETUPS}
        lines += runs_table(a.steps, runs, "float32")
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
