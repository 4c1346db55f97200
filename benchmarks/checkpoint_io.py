"""Checkpoint I/O with and without verification (a script, not a test): the time to save a ~1.5 GiB state through
DCP with the checksumming writer (files checksummed with CRC-32 as they are written) and with ``save_checkpoint``
against DCP's plain ``FileSystemWriter``, and
to load it with ``load_checkpoint`` with ``verify`` on (every file checksummed on parallel threads before DCP reads
it) and off; and the earlier way for reference: sha256 of every file read back after the save, and before the load.

    python benchmarks/checkpoint_io.py                      # 1.5 GiB, 9 interleaved repeats, one process
    python benchmarks/checkpoint_io.py --gib 0.5 --repeats 3 --dir /scratch/ckpt_bench

Setups take turns within each repeat (the machine is shared: medians of interleaved runs); before each, its
directory is removed and every dirty page written out (os.sync), then the save fsyncs its files as DCP does; the
loads read files the page cache holds. Results go to benchmarks/results/checkpoint_io.md (``--out``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch import checkpoint as ckpt  # noqa: E402
from launch.checkpoint import integrity  # noqa: E402


def state(gib: float) -> dict[str, torch.Tensor]:
    """Like a model's: a few large matrices and many small tensors, float32, ``gib`` GiB in all."""
    g = torch.Generator().manual_seed(0)
    total, out, i = int(gib * 2**30) // 4, {}, 0
    while total > 0:
        n = min(total, (32 << 20) if i % 4 == 0 else (1 << 16) * (1 + i % 7))
        out[f"t{i}"] = torch.randn(n, generator=g)
        total -= n
        i += 1
    return out


def timed(fn, clear: Path | None) -> float:
    """Seconds ``fn`` takes, from a clean start: ``clear`` removed and every dirty page written out first, so
    no setup pays for the one before it (a save's fsync would otherwise wait for the previous save's pages)."""
    if clear is not None:
        shutil.rmtree(clear, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dir", default="outputs/bench_checkpoint_io")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_io.md"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(a.dir)
    tensors = state(a.gib)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    meta, extra = {"step": 1}, {"rank": 0}

    def save_plain():
        dcp.save({**tensors}, storage_writer=FileSystemWriter(work / "plain"), no_dist=True)

    def save_crc():
        dcp.save({**tensors}, storage_writer=integrity.checksum_writer(work / "crc"), no_dist=True)

    def save_checksummed():
        ckpt.save_checkpoint(work / "checked", 1, tensors, meta, extra, keep=1)

    def save_read_back_sha256():  # the earlier way: write, then read every file back through sha256
        save_plain()
        for p in sorted((work / "plain").iterdir()):
            integrity.hash_file(p, "sha256")

    target = {k: torch.empty_like(v) for k, v in tensors.items()}

    def load_plain():
        dcp.load(target, storage_reader=FileSystemReader(work / "plain"), no_dist=True)

    def load_verified():
        ckpt.load_checkpoint(ckpt.step_dir(work / "checked", 1), target, verify=True)

    def load_unverified():
        ckpt.load_checkpoint(ckpt.step_dir(work / "checked", 1), target, verify=False)

    def load_sha256_first():
        for p in sorted((work / "plain").iterdir()):
            integrity.hash_file(p, "sha256")
        load_plain()

    setups = {"save: DCP FileSystemWriter (no checksums)": (save_plain, work / "plain"),
              "save: DCP, checksum_writer (CRC-32 while writing)": (save_crc, work / "crc"),
              "save: save_checkpoint (the same + manifest, commit)": (save_checksummed, work / "checked"),
              "save: write, then sha256 read-back (before)": (save_read_back_sha256, work / "plain"),
              "load: DCP (no verification)": (load_plain, None),
              "load: load_checkpoint, verify off": (load_unverified, None),
              "load: load_checkpoint, verify on (CRC-32, threads)": (load_verified, None),
              "load: sha256 of every file, then DCP (before)": (load_sha256_first, None)}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(a.repeats):
        for name, (fn, clear) in setups.items():
            times[name].append(timed(fn, clear))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = {"save": med["save: DCP FileSystemWriter (no checksums)"], "load": med["load: DCP (no verification)"]}
    lines = [f"# Checkpoint I/O (benchmarks/checkpoint_io.py, {time.strftime('%Y-%m-%d')}, torch {torch.__version__})",
             "", f"{nbytes / 2**30:.2f} GiB in {len(tensors)} float32 tensors, one process, medians of {a.repeats} "
             "interleaved repeats, each from a clean start (directory removed, os.sync); loads from the page cache.", "",
             "| setup | seconds (median) | vs no verification |", "|---|---:|---:|"]
    for name, t in med.items():
        lines.append(f"| {name} | {t:.2f} | {100 * (t / base[name.split(':')[0]] - 1):+.0f}% |")
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
