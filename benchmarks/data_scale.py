"""The data builder at billions of documents: build once on rank 0, memory-map everywhere.

    python benchmarks/data_scale.py                      # 1B documents (20 GB .idx on disk, ~9 GB of memory)
    python benchmarks/data_scale.py --docs 200000000

A synthetic Megatron prefix of ``--docs`` documents (1-3 tokens each; tests/synthetic_data.py: the .bin is a
sparse file) with its ``.stats.json``, then, each in a fresh process, with tracemalloc's peak of private memory
(Python objects and numpy buffers; memory maps are page cache, shared by the ranks of a node):
1. the builder (rank 0): ``build_datasets(builder=True)``: validate the .idx, build the document table (0.1% held
   out), the epoch-0 sample index at seq_len 4096 and the validation index; timed per phase from its log;
2. a waiting rank with the builder's manifest (what launch/build.py gives it): ``builder=False, manifest=...``;
3. a waiting rank without a manifest (resolves and validates the prefix itself).
Results: printed, and appended to ``--out`` (default benchmarks/results/data_scale.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def child(role: str, prefix: str, cache: str) -> dict:
    import tracemalloc

    import data
    from configs import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), [
        f"--data.data_dir={cache}", f"--data.sources=[{{path: {prefix}}}]", "--data.seq_len=4096",
        "--model.max_seq_len=4096", "--data.val_fraction=0.001", "--data.micro_batch_size=1"])
    phases, t0 = [], time.perf_counter()

    def log(message: str) -> None:
        phases.append((round(time.perf_counter() - t0, 1), message[:100]))

    manifest = None
    if role == "opener":
        with open(os.path.join(cache, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    tracemalloc.start()
    ds = data.build_datasets(cfg.data, 8192, 1, 100, builder=role == "builder", log=log,
                             **({"manifest": manifest} if manifest else {}))
    ds.train.windows(list(range(4)))
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    if role == "builder":
        with open(os.path.join(cache, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(ds.manifest, f)
    return {"role": role, "seconds": seconds, "peak_mib": peak / 2**20, "phases": phases}


def spawn(*args: str) -> dict:
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000_000)
    p.add_argument("--dir", default=None, help="where the prefix and caches go (default: a temporary directory)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "data_scale.md"))
    p.add_argument("--child", nargs=3)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return 0
    from data.preprocess import write_stats
    from tests.synthetic_data import write_synthetic_prefix

    work = a.dir or tempfile.mkdtemp(prefix="data_scale_")
    os.makedirs(work, exist_ok=True)
    prefix, cache = os.path.join(work, "docs"), os.path.join(work, "cache")
    t0 = time.perf_counter()
    tokens = write_synthetic_prefix(prefix, a.docs, 2)
    write_stats(prefix, {"max_token": 0, "tokens": tokens, "documents": a.docs})
    print(f"synthetic prefix: {a.docs:,} documents, {tokens:,} tokens, .idx "
          f"{os.path.getsize(prefix + '.idx') / 2**30:.1f} GiB ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = [spawn(role, prefix, cache) for role in ("builder", "opener", "plain")]
    lines = [f"## {a.docs:,} documents ({tokens:,} tokens), {time.strftime('%Y-%m-%d')}", "",
             "| process | seconds | peak private memory (tracemalloc) | bytes per document |", "|---|---:|---:|---:|"]
    names = {"builder": "builder (rank 0)", "opener": "waiting rank, with the manifest",
             "plain": "waiting rank, no manifest"}
    for r in rows:
        lines.append(f"| {names[r['role']]} | {r['seconds']:.1f} | {r['peak_mib']:,.1f} MiB | "
                     f"{r['peak_mib'] * 2**20 / a.docs:.3f} |")
    lines += ["", "Builder log (seconds since start):", ""] + [f"- {t} s: {m}" for t, m in rows[0]["phases"]]
    sizes = {n: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(cache, "index"))
                    for f in fs if n in d) for n in ("-docs-",)}
    lines += ["", f"Document table on disk: {sizes['-docs-'] / 2**30:.2f} GiB.", ""]
    text = "\n".join(lines)
    print(text)
    with open(a.out, "a", encoding="utf-8") as f:
        f.write(text + "\n")
    if not a.dir:
        import shutil
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
