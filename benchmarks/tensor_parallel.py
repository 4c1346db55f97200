"""Tensor parallelism for a MoE on 2 CPU processes: tp2 + sequence parallelism against tp2 without it (a script).

    torchrun --nproc_per_node=2 benchmarks/tensor_parallel.py                # 8 interleaved steps per setup
    torchrun --nproc_per_node=2 benchmarks/tensor_parallel.py --steps 16 --micro-batch 8

configs/tiny.yaml's model (MLA, 8 routed experts top-2 + a shared expert, float32) on both ranks, the same global
batch in every setup. Not a GPU claim: on 2 CPU cores the point is the routed-expert work tp2 duplicates (every TP
rank routes every token) and tp2 + SP does not (each rank routes its own half of the sequence).

- ``dp2``: tensor parallelism off (the reference for the expert FLOPs: each rank routes its own sequences).
- ``tp2``: Megatron's tensor parallelism without sequence parallelism.
- ``tp2+sp``: ``parallel.sequence_parallel: true``.

Per setup: the median step time over ``--steps`` steps the setups take turns on (the machine is shared and noisy;
one torch thread per process), tokens per second of the global batch, and one step's routed-expert GEMM FLOPs on
each rank (a dispatch-mode count, tests/audit.py OpAudit: forward and backward). Rank 0 writes the table to
benchmarks/results/tensor_parallel.md (``--out``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._tiny_runs import TINY, interleaved_step_times, quiet  # noqa: E402
from configs import load_config  # noqa: E402
from launch.trainer import Trainer, init_runtime  # noqa: E402
from tests.audit import OpAudit  # noqa: E402

SETUPS = {
    "dp2": [],
    "tp2": ["--parallel.tp=2"],
    "tp2+sp": ["--parallel.tp=2", "--parallel.sequence_parallel=true"],
}
STEP_ONLY = ["--train.eval_interval=0", "--train.ckpt_interval=0"]


def expert_flops(trainer: Trainer) -> int:
    """This rank's routed-expert GEMM FLOPs in one training step (forward and backward)."""
    with OpAudit() as audit:
        trainer.train_step()
    return sum(r.flops for r in audit.records if ".experts" in r.region)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro batch (of the global batch)")
    p.add_argument("--work", default="outputs/bench_tensor_parallel")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tensor_parallel.md"))
    a = p.parse_args()
    torch.set_num_threads(1)
    trainers, flops = {}, {}
    for name, overrides in SETUPS.items():
        # the same global batch: dp2 splits the sequences over its two replicas, tp2 gives both ranks all of them
        batch = a.micro_batch // 2 if name == "dp2" else a.micro_batch
        cfg = load_config(TINY, quiet(Path(a.work) / name, *STEP_ONLY, f"--data.micro_batch_size={batch}",
                                      *overrides))
        trainers[name] = Trainer(cfg, init_runtime(cfg))
        trainers[name].train_step()  # warm-up
        flops[name] = expert_flops(trainers[name])
    times = interleaved_step_times(trainers, a.steps)
    per_rank = {name: [0] * dist.get_world_size() for name in SETUPS}
    for name in SETUPS:
        dist.all_gather_object(per_rank[name], flops[name])
    if dist.get_rank() != 0:
        return
    tokens = {name: t.tokens_per_step() for name, t in trainers.items()}
    assert len(set(tokens.values())) == 1, tokens  # the same global batch everywhere
    cfg = trainers["tp2"].cfg
    lines = [f"# Tensor parallelism for a MoE (benchmarks/tensor_parallel.py, {time.strftime('%Y-%m-%d')}, "
             f"torch {torch.__version__}, 2 processes, gloo, 1 thread each)", "",
             f"configs/tiny.yaml's model, float32, a global batch of {a.micro_batch} x {cfg.data.seq_len} tokens "
             f"per step, median of {a.steps} interleaved steps.", "",
             "| setup | step (median) | tokens/s | vs tp2 | routed-expert GEMM FLOPs per rank (one step) | "
             "vs dp2's |", "|---|---:|---:|---:|---:|---:|"]
    for name in SETUPS:
        rank_flops = per_rank[name]
        lines.append(f"| {name} | {times[name]:.3f} s | {tokens[name] / times[name]:,.0f} | "
                     f"{times['tp2'] / times[name]:.2f}x | {' / '.join(f'{f:,}' for f in rank_flops)} | "
                     f"{sum(rank_flops) / sum(per_rank['dp2']):.2f}x |")
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
