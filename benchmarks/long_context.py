"""Long context on CPU: step time and peak RSS of tiny.yaml's model at seq_len 512 -> 4096, one process (cp=1) and
two (cp=2, parallel/context_parallel.py), with and without document masking.

    python benchmarks/long_context.py                 # ~10 minutes on 2 cores
    python benchmarks/long_context.py --lengths 512 1024

Every run trains 4 steps of 4,096 tokens (micro batch 4096 / seq_len) through train.py (torchrun for cp=2), one
torch thread per process, the setups interleaved (for each length: cp1, cp1 + mask, cp2, cp2 + mask); the step
time is the median of steps 2-4 from metrics.jsonl, the peak RSS the largest process's (``ru_maxrss`` of the
children). cp=2 runs two processes on the machine's two cores: its step time is not a speed-up measurement of
the exchange on a GPU cluster, it shows the exchange's cost next to the attention's. Results: printed and written
to ``--out`` (default benchmarks/results/long_context.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(length: int, cp: int, mask: bool, work: str) -> dict:
    out = os.path.join(work, f"L{length}-cp{cp}-{'mask' if mask else 'plain'}")
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"--train.output_dir={out}",
            f"--data.seq_len={length}", f"--model.max_seq_len={length}", f"--data.micro_batch_size={4096 // length}",
            "--train.steps=4", "--train.eval_interval=0", "--train.ckpt_interval=0", "--train.log_interval=1",
            "--schedule.warmup_steps=1", "--train.resume=none", f"--parallel.cp={cp}", "--logging.wandb_mode=disabled",
            *(["--data.document_mask=true", "--data.reset_positions=true"] if mask else [])]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}"] if cp > 1
                else [sys.executable])
    t0 = time.perf_counter()
    # a fresh parent per run, so ru_maxrss of its children is this run's largest process (torchrun waits for its
    # workers, so theirs count too)
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *launcher, os.path.join(ROOT, "train.py"), *args],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] >= 2]
    return {"step_s": statistics.median(4096 / x for x in rates), "rss_mb": int(proc.stdout.split()[-1]) / 1024,
            "wall_s": time.perf_counter() - t0}


_MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "long_context.md"))
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="long_context_") as work:
        for length in a.lengths:
            for cp, mask in ((1, False), (1, True), (2, False), (2, True)):
                r = run(length, cp, mask, work)
                rows.append((length, cp, mask, r))
                print(f"seq_len {length} cp {cp} mask {mask}: {r}", flush=True)
    lines = [f"# Long context on CPU ({time.strftime('%Y-%m-%d')}, tiny.yaml model, 4,096 tokens per step)", "",
             "| seq_len | cp | document mask | step time | peak RSS (largest process) |", "|---:|---:|---|---:|---:|"]
    for length, cp, mask, r in rows:
        rss = f"{r['rss_mb']:,.0f} MB"
        lines.append(f"| {length} | {cp} | {'yes' if mask else 'no'} | {r['step_s']:.2f} s | {rss} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
