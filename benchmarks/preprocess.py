"""Data pipeline cost: tokenisation throughput and peak memory, and the sample-index build for a 10B-token prefix.

    python benchmarks/preprocess.py                  # ~50 MB of text (the embedded corpus x 4), 2 repeats
    python benchmarks/preprocess.py --index-only     # just the 10B-token sample index

1. Tokenize the same ~50 MB jsonl with (a) the previous path (``datasets.load_dataset`` + ``Dataset.map`` over
   ``encode_batch`` + arrow flatten + write, as data/prepare.py did before data/preprocess.py replaced it) and
   (b) ``python -m data.preprocess`` with 1 and 2 workers. The setups are interleaved (a, b1, b2, a, b1, b2, ...),
   one tokenizer thread per process (TOKENIZERS_PARALLELISM=false), each in a fresh process; reported: tokens/s,
   tokens/s per worker, and peak RSS of the main process and of the largest worker.
2. Build the epoch-0 sample index (data/sampling.py: document shuffle, token offsets, sample shuffle) of a
   synthetic 10B-token prefix (10M documents; the .bin is a sparse file, the index never reads it) in a fresh
   process: seconds and peak RSS for opening/validating the .idx, the held-out split and the index build.
Results: printed, and written to ``--out`` (default benchmarks/results/preprocess.md).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from tests.synthetic_data import write_synthetic_prefix  # noqa: E402


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest waited-for child) peak RSS in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


# ------------------------------------------------------------------------------------------------ child runs
def run_previous_path(src: str, out_dir: str) -> dict:
    """The pre-change tokenisation path: datasets.load_dataset("json") -> map(encode_batch) -> flatten -> write."""
    import datasets
    import pyarrow.compute as pc

    from data.indexed import IndexedWriter, token_dtype
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer("bpe8k").tokenizer
    eos_id = 0
    t0 = time.perf_counter()
    docs = datasets.load_dataset("json", data_files=[src], split="train", cache_dir=os.path.join(out_dir, "hf"))

    def encode(batch: dict) -> dict:
        return {"ids": [enc.ids + [eos_id] for enc in tok.encode_batch(batch["text"], add_special_tokens=False)]}

    tokenized = docs.map(encode, batched=True, batch_size=256, remove_columns=docs.column_names,
                         features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}))
    column = tokenized.with_format("arrow")[:].column("ids")
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
    flat = pc.list_flatten(column).to_numpy()
    with IndexedWriter(os.path.join(out_dir, "prev"), token_dtype(8192)) as writer:
        writer.add_documents(flat, lengths)
    return {"tokens": int(flat.size), "seconds": time.perf_counter() - t0}


def run_cli(src: str, out_dir: str, workers: int) -> dict:
    from data.preprocess import preprocess

    t0 = time.perf_counter()
    stats = preprocess([src], "bpe8k", os.path.join(out_dir, f"cli{workers}"), workers=workers, progress=False)
    return {"tokens": stats["tokens"], "seconds": time.perf_counter() - t0}


def run_index(prefix: str, cache: str, seq_len: int) -> dict:
    from data.indexed import TokenShards
    from data.sampling import ShardSet, SourceSamples, split_documents

    t0 = time.perf_counter()
    shards = TokenShards(prefix)
    t1 = time.perf_counter()
    train_ids, _ = split_documents(len(shards), 0.001)
    t2 = time.perf_counter()
    src = SourceSamples(ShardSet([shards]), train_ids, seq_len, seed=1234, cache_dir=cache)
    src.build_epoch(0)
    t3 = time.perf_counter()
    size = os.path.getsize(src.epoch_path(0))
    return {"tokens": shards.num_tokens, "docs": len(shards), "samples": src.samples_per_epoch,
            "open_s": t1 - t0, "split_s": t2 - t1, "index_s": t3 - t2, "index_mb": size / 2**20}


def child(argv: list[str]) -> int:
    kind, args = argv[0], argv[1:]
    if kind == "previous":
        out = run_previous_path(*args)
    elif kind == "cli":
        out = run_cli(args[0], args[1], int(args[2]))
    else:
        out = run_index(args[0], args[1], int(args[2]))
    own, workers = peak_rss_mb()
    print(json.dumps({**out, "rss_main_mb": own, "rss_worker_mb": workers}))
    return 0


def spawn(*args: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def make_text(path: str, repeat: int) -> int:
    from data.corpus import iter_documents

    docs = [json.dumps({"text": d["text"]}) + "\n" for d in iter_documents()]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            f.writelines(docs)
    return os.path.getsize(path)


def tokenize_section(a, tmp: str) -> list[str]:
    src = os.path.join(tmp, "text.jsonl")
    size = make_text(src, a.repeat)
    setups = [("previous (datasets.map)", ("previous", src), 1), ("data.preprocess, 1 worker", ("cli", src, "", "1"), 1),
              ("data.preprocess, 2 workers", ("cli", src, "", "2"), 2)]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in setups}
    for rep in range(a.repeats):
        for name, args, _ in setups:
            out_dir = tempfile.mkdtemp(dir=tmp)
            args = (args[0], args[1], out_dir, *args[3:]) if args[0] == "cli" else (*args, out_dir)
            r = spawn(*args)
            results[name].append(r)
            print(f"rep {rep}: {name:28s} {r['tokens'] / r['seconds']:>11,.0f} tokens/s  "
                  f"RSS main {r['rss_main_mb']:.0f} MB, worker {r['rss_worker_mb']:.0f} MB", flush=True)
            shutil.rmtree(out_dir)
    base = statistics.median(r["tokens"] / r["seconds"] for r in results[setups[0][0]])
    lines = [f"Input: {size / 1e6:.1f} MB of jsonl (the embedded corpus x {a.repeat}), "
             f"{results[setups[0][0]][0]['tokens']:,} tokens; median of {a.repeats} interleaved repeats, one "
             f"tokenizer thread per process.", "",
             "| setup | tokens/s | tokens/s per worker | per worker vs previous | peak RSS main | peak RSS worker |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, _, workers in setups:
        rate = statistics.median(r["tokens"] / r["seconds"] for r in results[name])
        main_mb = max(r["rss_main_mb"] for r in results[name])
        worker_mb = max(r["rss_worker_mb"] for r in results[name]) if workers > 1 else float("nan")
        lines.append(f"| {name} | {rate:,.0f} | {rate / workers:,.0f} | {rate / workers / base:.2f}x | "
                     f"{main_mb:,.0f} MB | {'-' if workers == 1 else f'{worker_mb:,.0f} MB'} |")
    return lines


def index_section(a, tmp: str) -> list[str]:
    prefix = os.path.join(tmp, "synthetic")
    n_tokens = write_synthetic_prefix(prefix, a.index_docs, a.index_tokens // a.index_docs, dtype=np.int32)
    r = spawn("index", prefix, os.path.join(tmp, "index"), str(a.seq_len))
    print(f"index: {r}", flush=True)
    return [f"Synthetic prefix: {n_tokens / 1e9:.2f}B tokens in {r['docs']:,} documents; seq_len {a.seq_len} -> "
            f"{r['samples']:,} samples per epoch; fresh process.", "",
            "| step | seconds |", "|---|---:|",
            f"| open + validate the .idx (chunked) | {r['open_s']:.1f} |",
            f"| held-out split (0.1%) | {r['split_s']:.1f} |",
            f"| epoch-0 index: document shuffle, offsets, sample shuffle, write .npy | {r['index_s']:.1f} |",
            f"| **total** | **{r['open_s'] + r['split_s'] + r['index_s']:.1f}** |", "",
            f"Peak RSS {r['rss_main_mb']:,.0f} MB; index file {r['index_mb']:,.0f} MB (memory-mapped by every rank)."]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=4, help="copies of the embedded corpus (~13 MB each)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each setup")
    p.add_argument("--index-tokens", type=int, default=10_000_000_000)
    p.add_argument("--index-docs", type=int, default=10_000_000)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--index-only", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "preprocess.md"))
    a = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        lines = [f"# Data pipeline benchmark ({time.strftime('%Y-%m-%d')})", "",
                 f"`python benchmarks/preprocess.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(
                     " `", "`"), ""]
        if not a.index_only:
            lines += ["## Tokenisation", ""] + tokenize_section(a, tmp) + [""]
        lines += ["## Sample index for a 10B-token prefix", ""] + index_section(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
