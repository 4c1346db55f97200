"""Data for billions of documents: the document table (split, ids, token counts, lengths) is built once by rank 0
and memory-mapped by the others, who open the sources from rank 0's manifest; the waiting ranks' wait is bounded;
the largest token id comes from the prefix's stats, not from a scan at the first training run."""
from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import data
from configs import load_config
from data import documents
from data.indexed import IndexedWriter, TokenShards
from data.preprocess import main as preprocess_main
from data.preprocess import read_stats, write_stats
from data.sampling import ShardSet, SourceSamples, split_documents
from launch.build import _wait_for_rank0, build_data
from launch.runtime import init_runtime
from tests.dist_utils import run_distributed
from tests.synthetic_data import write_synthetic_prefix

DEBUG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"


def _prefix(path: Path, lengths: list[int], seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with IndexedWriter(str(path), np.uint16) as w:
        w.add_documents(rng.integers(0, 500, sum(lengths)), np.asarray(lengths))
    return str(path)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3])
def test_document_table_is_the_in_memory_split(tmp_path, monkeypatch, fraction):
    """Ids, token counts and (several shards) lengths equal data.sampling's in-memory split, built in chunks."""
    monkeypatch.setattr(documents, "_CHUNK", 7)  # many chunks
    rng = np.random.default_rng(1)
    shards = [TokenShards(_prefix(tmp_path / f"s{i}", list(rng.integers(1, 9, n)), seed=i))
              for i, n in enumerate([40, 1, 77])]
    for docs in (ShardSet(shards[:1]), ShardSet(shards)):
        folder = documents.table_dir(str(tmp_path / "cache"), f"x{len(docs.shards)}", "key", len(docs), fraction)
        documents.build_table(docs, folder, fraction, "source x", log=lambda m: None)
        table = documents.open_table(folder)
        train, val = (np.arange(len(docs)), None) if fraction == 0 else split_documents(len(docs), fraction)
        lengths = np.concatenate([np.asarray(s.sequence_lengths) for s in docs.shards])
        np.testing.assert_array_equal(table.train, train)
        assert table.val is None if val is None else np.array_equal(table.val, val)
        assert table.train_tokens == lengths[train].sum() and table.val_tokens == lengths.sum() - lengths[train].sum()
        assert table.shard_tokens == [s.num_tokens for s in docs.shards]
        assert (table.lengths is None) == (len(docs.shards) == 1)
        if table.lengths is not None:
            np.testing.assert_array_equal(table.lengths, lengths)
        assert isinstance(table.train, np.memmap)
        # the samples over a memory-mapped table are those over the in-memory ids (and the index build
        # shuffles a plain copy: RandomState.shuffle of an np.memmap swaps item by item in Python)
        opened = ShardSet([TokenShards(s.prefix, s.num_tokens) for s in docs.shards], table.lengths)
        ours = SourceSamples(opened, table.train, 8, seed=3, tokens=table.train_tokens)
        ref = SourceSamples(ShardSet(docs.shards), train, 8, seed=3)
        assert ours.samples_per_epoch == ref.samples_per_epoch
        js = np.arange(ref.samples_per_epoch)
        np.testing.assert_array_equal(ours.windows(js), ref.windows(js))


def test_damaged_table_and_shards_that_do_not_match_it_are_named(tmp_path):
    docs = ShardSet([TokenShards(_prefix(tmp_path / "s", [3, 4, 5]))])
    folder = documents.table_dir(str(tmp_path), "s", "key", 3, 0.0)
    documents.build_table(docs, folder, 0.0, "source s")
    with pytest.raises(ValueError, match=r"s\.bin: size 24 bytes, but .* describes 13 tokens"):
        TokenShards(str(tmp_path / "s"), num_tokens=13)  # trusted open still checks the sizes
    (Path(folder) / "train.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"document table .*train\.npy is missing; the data builder"):
        documents.open_table(folder)
    (Path(folder) / "table.json").write_text("{")
    with pytest.raises(ValueError, match=r"document table .* is damaged .*delete the directory"):
        documents.open_table(folder)


def test_stats_beside_the_prefix_replace_the_token_scan(tmp_path, monkeypatch, capsys):
    """`python -m data.preprocess --stats` records the largest id; training reads it instead of every token, and
    rescans when the files changed since."""
    prefix = _prefix(tmp_path / "p", [5, 6, 7])
    assert preprocess_main(["--stats", prefix + ".bin"]) == 0
    top = int(np.asarray(TokenShards(prefix).tokens).max())
    assert read_stats(prefix)["max_token"] == top and "largest token id" in capsys.readouterr().out
    cfg = load_config(DEBUG, [f"--data.data_dir={tmp_path / 'cache'}", f"--data.sources=[{{path: {prefix}}}]",
                              "--data.val_fraction=0", "--data.seq_len=4", "--data.micro_batch_size=1",
                              "--train.eval_interval=0"])

    def no_scan(self):
        raise AssertionError("scanned the tokens")

    monkeypatch.setattr(TokenShards, "max_token", no_scan)
    data.build_datasets(cfg.data, top + 1, 1, 4, with_val=False, log=lambda m: None)
    with pytest.raises(ValueError, match=f"holds token id {top}, but model.vocab_size is {top}"):
        data.build_datasets(cfg.data, top, 1, 4, with_val=False, log=lambda m: None)
    write_stats(prefix, {"max_token": 1})
    _prefix(tmp_path / "p", [5, 6, 8])  # rewritten: the stats no longer describe it
    assert read_stats(prefix) is None
    with pytest.raises(AssertionError, match="scanned the tokens"):
        data.build_datasets(cfg.data, top + 1, 1, 4, with_val=False, log=lambda m: None)


def test_waiting_ranks_give_up_after_the_build_timeout_naming_rank0s_last_message():
    store = dist.HashStore()
    store.set("data_status", "data: tokenizing source web (/data/web, 9 files) with 'gpt2'")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"rank 0 has not finished building the data after data.build_timeout_s=0.5 "
                                         r"s \(its last message: data: tokenizing source web .*\); tokenize large "
                                         r"corpora beforehand"):
        _wait_for_rank0(store, "data_built", "data_status", 0.5)
    assert time.monotonic() - t0 < 5
    store.set("data_built", "{}")
    assert _wait_for_rank0(store, "data_built", "data_status", 0.5) == "{}"


N_BIG = 40_000_000


def _open_worker(rank: int, world: int, tmp: str, prefixes: list[str]) -> None:
    torch.set_num_threads(1)
    out = {}
    for name, prefix in prefixes:
        cfg = load_config(DEBUG, [f"--data.data_dir={tmp}/cache-{name}", f"--data.sources=[{{path: {prefix}}}]",
                                  f"--train.output_dir={tmp}/out", "--data.val_fraction=0.001",
                                  "--data.micro_batch_size=2", "--data.build_timeout_s=600"])
        tracemalloc.start()
        t0 = time.perf_counter()
        loader, datasets = build_data(cfg, init_runtime(cfg))
        inputs, _ = loader.next_batch()
        val = datasets.val.windows(np.arange(2))
        out[name] = {"peak": tracemalloc.get_traced_memory()[1], "seconds": time.perf_counter() - t0,
                     "docs": len(datasets.train.sources[0].doc_ids), "batch": inputs.shape[0], "val": len(val)}
        tracemalloc.stop()
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))


def test_waiting_rank_opens_40M_documents_in_constant_memory(tmp_path):
    """dp=2 through launch.build.build_data: rank 0 builds the document table and sample indices of a synthetic
    40M-document prefix (sparse .bin, 0.8 GB .idx); rank 1 opens them from rank 0's manifest. Rank 1's peak of
    private memory (tracemalloc: Python objects and numpy buffers, not memory maps) stays within 16 MiB of what it
    is for a 1M-document prefix, so no buffer of a byte or more per document (38 MiB here) is made. Before the
    document table it was ~16 bytes per document (measured at 20M documents: 306 MiB peak, 157 MiB kept for the
    run): ~600 MiB here. 200M and 1B documents: benchmarks/data_scale.py (this test ran at 200M until the CI
    budget moved that size there: 128 s vs ~25 s)."""
    big = write_synthetic_prefix(str(tmp_path / "big"), N_BIG, 2)
    small = write_synthetic_prefix(str(tmp_path / "small"), 1_000_000, 2)
    for prefix, n in (("big", big), ("small", small)):  # as data.preprocess records them: no scan of the tokens
        write_stats(str(tmp_path / prefix), {"max_token": 0, "tokens": n})
    run_distributed(_open_worker, 2, str(tmp_path),
                    [("small", str(tmp_path / "small")), ("big", str(tmp_path / "big"))])
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["big"]["docs"] == N_BIG - N_BIG // 1000 and r["big"]["batch"] == 2 and r["big"]["val"] == 2
    waiting = ranks[1]
    print(f"rank 1 peak private memory: 1M documents {waiting['small']['peak'] / 2**20:.1f} MiB, 40M documents "
          f"{waiting['big']['peak'] / 2**20:.1f} MiB ({waiting['big']['seconds']:.1f} s, rank 0 "
          f"{ranks[0]['big']['seconds']:.1f} s, {ranks[0]['big']['peak'] / 2**20:.0f} MiB)")
    assert waiting["big"]["peak"] - waiting["small"]["peak"] < 16 * 2**20


def test_automatic_preprocess_workers_follow_the_input_size(tmp_path, monkeypatch):
    """data.preprocess_workers 0: one tokenizer process per 64 MiB of raw text, at least 1, at most the CPUs."""
    import os

    from data.formats import Resolved
    from data.sources import _Builder

    files = []
    for name, size in (("a.jsonl", 100 << 20), ("b.jsonl", 100 << 20), ("small.jsonl", 10)):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: only the size is read
        files.append(str(path))
    cfg = load_config(DEBUG, [f"--data.data_dir={tmp_path / 'cache'}"])
    builder = _Builder(cfg.data, True, lambda m: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert builder.workers(Resolved("x", tuple(files[:2]), ("jsonl",) * 2)) == 3  # 200 MiB
    assert builder.workers(Resolved("x", tuple(files[2:]), ("jsonl",))) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert builder.workers(Resolved("x", tuple(files[:2]), ("jsonl",) * 2)) == 2
    fixed = load_config(DEBUG, [f"--data.data_dir={tmp_path / 'cache'}", "--data.preprocess_workers=5"])
    assert _Builder(fixed.data, True, lambda m: None).workers(Resolved("x", tuple(files), ("jsonl",) * 3)) == 5
    with pytest.raises(ValueError, match="preprocess_workers must be >= 0"):
        load_config(DEBUG, ["--data.preprocess_workers=-1"])
    with pytest.raises(ValueError, match="build_timeout_s must be > 0"):
        load_config(DEBUG, ["--data.build_timeout_s=0"])
