"""Your own corpus: every input format, the preprocessing CLI, tokenizers, bad-data errors, blends, validation
and training on a blend of a jsonl directory and a pretokenized prefix (resume bitwise)."""
from __future__ import annotations

import gzip
import json
import lzma
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from configs import SourceConfig, load_config
from data.blend import PERIOD, Blend
from data.indexed import IndexedWriter
from data.preprocess import main as preprocess_main
from data.preprocess import preprocess
from data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "configs" / "debug.yaml"

DOCS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
        "In the beginning God created the heaven and the earth. \u00e9\u00df\u2713",
        "To be, or not to be: that is the question", "Call me Ishmael.", "x" * 300 + " end"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bpe8k")


def expected_ids(tok, docs=DOCS):
    return [tok.encode(t) + [tok.eos_id] for t in docs]


def shard_docs(prefix):
    shards = data.TokenShards(str(prefix))
    return [shards[i].tolist() for i in range(len(shards))]


# ------------------------------------------------------------------------------------------------ formats
def _jsonl(path, docs, key="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({key: t, "meta": i}) + "\n")


def _zst(path, docs):
    import zstandard
    with zstandard.open(path, "wt", encoding="utf-8") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")


def _write_format(root: Path, fmt: str, docs=DOCS) -> tuple[str, str]:
    """Write ``docs`` in ``fmt``; returns (source path, format option)."""
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        _jsonl(root / "a.jsonl", docs[:2])
        _jsonl(root / "b.jsonl", docs[2:])  # a directory of two files, read in sorted order
        (root / "README.md").write_text("ignored")
        return str(root), "auto"
    if fmt == "jsonl.gz":
        _jsonl(root / "a.jsonl.gz", docs, opener=gzip.open)
        return str(root / "a.jsonl.gz"), "auto"
    if fmt == "jsonl.xz":
        _jsonl(root / "a.jsonl.xz", docs, opener=lzma.open)
        return str(root / "a.jsonl.xz"), "auto"
    if fmt == "jsonl.zst":
        _zst(root / "a.jsonl.zst", docs[:3])
        _zst(root / "b.jsonl.zst", docs[3:])
        return str(root / "*.jsonl.zst"), "auto"  # a glob
    if fmt == "json":
        (root / "a.json").write_text(json.dumps([{"text": t} for t in docs]))
        return str(root / "a.json"), "auto"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), root / "a.parquet", row_group_size=2)
        return str(root / "a.parquet"), "auto"
    if fmt == "txt":
        for i, t in enumerate(docs):
            (root / f"{i:03d}.txt").write_text(t, encoding="utf-8")
        return str(root), "auto"
    if fmt == "lines":
        (root / "a.txt").write_text("\n".join(docs[:3]) + "\n\n" + "\r\n".join(docs[3:]) + "\n", encoding="utf-8")
        return str(root / "a.txt"), "lines"
    if fmt == "hf_disk":
        import datasets
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "ds"))
        return str(root / "ds"), "auto"
    raise AssertionError(fmt)


FORMATS = ["jsonl", "jsonl.gz", "jsonl.xz", "jsonl.zst", "json", "parquet", "txt", "lines", "hf_disk"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_input_format_round_trips_to_the_same_ids(tmp_path, tok, fmt):
    path, option = _write_format(tmp_path / "in", fmt)
    stats = preprocess([path], tok, str(tmp_path / "out"), fmt=option, progress=False)
    assert shard_docs(tmp_path / "out") == expected_ids(tok)
    assert stats["documents"] == len(DOCS) and stats["tokens"] == sum(map(len, expected_ids(tok)))
    assert sorted(os.listdir(tmp_path)) == ["in", "out.bin", "out.idx", "out.stats.json"]  # nothing else left


def test_megatron_prefix_and_text_key_sources(tmp_path, tok):
    _jsonl(tmp_path / "a.jsonl", DOCS, key="content")
    preprocess([str(tmp_path / "a.jsonl")], tok, str(tmp_path / "p"), text_key="content", progress=False)
    resolved = data.formats.resolve(str(tmp_path / "p"))
    assert resolved.tokenized and resolved.prefixes == (str(tmp_path / "p"),)
    assert data.formats.resolve(str(tmp_path / "p.bin")).prefixes == (str(tmp_path / "p"),)
    with pytest.raises(ValueError, match="already tokenized"):
        preprocess([str(tmp_path / "p")], tok, str(tmp_path / "q"), progress=False)


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_two_workers_write_byte_identical_files(tmp_path, capsys):
    _write_format(tmp_path / "in", "jsonl", DOCS * 300)  # several chunks
    args = ["--input", str(tmp_path / "in"), "--tokenizer", "bpe8k", "--no-progress"]
    assert preprocess_main([*args, "--output-prefix", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert preprocess_main([*args, "--output-prefix", str(tmp_path / "w2"), "--workers", "2"]) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert "1,500 documents" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert preprocess_main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "o"),
                            "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'a.jsonl'}: line 2: no 'text' key (keys: body); set the source's text_key "
                   f"(--text-key for data.preprocess)"]
    assert not list(tmp_path.glob("o*"))  # nothing half-written


def _preprocess_then_die(src, out):
    def die(self):
        self._bin.close()
        os._exit(3)  # hard kill while finishing: no cleanup code runs
    IndexedWriter.close = die
    preprocess([src], "bpe8k", out, progress=False)


def test_crash_leaves_no_prefix_that_looks_complete(tmp_path, tok):
    src, _ = _write_format(tmp_path / "in", "jsonl")
    out = str(tmp_path / "o")
    preprocess([src], tok, out, progress=False)
    old = (Path(out + ".bin").read_bytes(), Path(out + ".idx").read_bytes())
    _jsonl(tmp_path / "in" / "c.jsonl", ["one more document"])
    child = multiprocessing.get_context("fork").Process(target=_preprocess_then_die, args=(src, out))
    child.start()
    child.join()
    assert child.exitcode == 3
    assert (Path(out + ".bin").read_bytes(), Path(out + ".idx").read_bytes()) == old  # old prefix untouched
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the half-written files are not in place
    preprocess([src], tok, out, progress=False)  # a rerun removes the dead run's files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o.bin", "o.idx", "o.stats.json"]
    assert shard_docs(out) == expected_ids(tok, DOCS + ["one more document"])


# ------------------------------------------------------------------------------------------------ bad data
def _bad_cases(tmp_path: Path):
    def f(name, content: bytes):
        p = tmp_path / name
        p.write_bytes(content)
        return str(p)

    (tmp_path / "emptydir").mkdir()
    return {
        "empty file": (f("e.jsonl", b""), r"e\.jsonl: the file is empty"),
        "blank file": (f("b.jsonl", b"\n\n"), r"b\.jsonl: no documents in the file"),
        "empty directory": (str(tmp_path / "emptydir"), r"emptydir: directory .* holds no .*\(it is empty\)"),
        "no glob match": (str(tmp_path / "nothing*.jsonl"), r"nothing\*\.jsonl: no such file or directory, and no file "
                                                            r"matches it as a glob"),
        "invalid utf-8": (f("u.jsonl", b'{"text": "ok"}\n{"text": "bad \xff byte"}\n'),
                          r"u\.jsonl: line 2: invalid UTF-8 at byte 14 .*utf8_errors: replace"),
        "invalid utf-8 txt": (f("u.txt", b"bad \xfe"), r"u\.txt: file: invalid UTF-8 at byte 4 of the file"),
        "missing key": (f("k.jsonl", b'{"text": "a"}\n\n{"txt": "b"}\n'), r"k\.jsonl: line 3: no 'text' key \(keys: txt\)"),
        "non-string": (f("n.jsonl", b'{"text": 3}\n'), r"n\.jsonl: line 1: 'text' is int, expected a string"),
        "bad json": (f("j.jsonl", b'{"text": "a"}\n{"text": \n'), r"j\.jsonl: line 2: not valid JSON"),
        "json not array": (f("o.json", b'{"text": "a"}'), r"o\.json: top level is a JSON dict"),
        "json row": (f("r.json", b'[{"text": "a"}, {"x": 1}]'), r"r\.json: row 1: no 'text' key"),
        "unsupported": (f("a.csv", b"text\nhello\n"), r"a\.csv: unsupported file type"),
        "bad gzip": (f("g.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:-30]), r"g\.jsonl\.gz: cannot decompress"),
    }


@pytest.mark.parametrize("case", ["empty file", "blank file", "empty directory", "no glob match", "invalid utf-8",
                                  "invalid utf-8 txt", "missing key", "non-string", "bad json", "json not array",
                                  "json row", "unsupported", "bad gzip"])
def test_bad_data_names_the_file_and_line(tmp_path, tok, case):
    path, pattern = _bad_cases(tmp_path)[case]
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        preprocess([path], tok, str(tmp_path / "out"), progress=False)
    assert not list(tmp_path.glob("out*"))


def test_parquet_missing_column_and_nulls(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'text' \(columns: body\)"):
        preprocess([str(tmp_path / "a.parquet")], tok, str(tmp_path / "o"), progress=False)
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet: row 1: 'text' is null"):
        preprocess([str(tmp_path / "b.parquet")], tok, str(tmp_path / "o"), progress=False)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"c\.parquet: column 'text' has type int64, expected strings"):
        preprocess([str(tmp_path / "c.parquet")], tok, str(tmp_path / "o"), progress=False)


def test_utf8_replace_mode_counts_and_keeps_going(tmp_path, tok):
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe byte"}\n')
    logged = []
    stats = preprocess([str(tmp_path / "u.jsonl")], tok, str(tmp_path / "o"), utf8_errors="replace",
                       progress=False, log=logged.append)
    assert stats["utf8_replaced_bytes"] == 2 and "replaced 2 invalid UTF-8 bytes" in logged[0]
    assert shard_docs(tmp_path / "o") == expected_ids(tok, ["ok", "bad \ufffd\ufffd byte"])


def test_truncated_or_mismatched_prefix_is_refused(tmp_path, tok):
    preprocess([_write_format(tmp_path / "in", "json")[0]], tok, str(tmp_path / "p"), progress=False)
    preprocess([_write_format(tmp_path / "in2", "lines", ["other"])[0]], tok, str(tmp_path / "q"), fmt="lines",
               progress=False)
    os.replace(tmp_path / "q.idx", tmp_path / "p.idx")  # a .bin/.idx pair that does not belong together
    with pytest.raises(ValueError, match=r"p\.bin: size .* bytes, but .*p\.idx describes"):
        data.TokenShards(str(tmp_path / "p"))


# ------------------------------------------------------------------------------------------------ tokenizers
def test_tokenizer_json_path_and_hf_directory(tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    by_path = load_tokenizer(str(path))
    assert by_path.encode(DOCS[1]) == tok.encode(DOCS[1]) and by_path.eos_id == tok.eos_id
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    hf.save_pretrained(str(tmp_path / "hf"))
    by_dir = load_tokenizer(str(tmp_path / "hf"))
    assert by_dir.eos_id == 0 and by_dir.vocab_size == 8192
    assert by_dir.encode(DOCS[0]) == tok.encode(DOCS[0])  # no BOS/specials added
    src = _write_format(tmp_path / "in", "json")[0]
    preprocess([src], by_dir, str(tmp_path / "o"), progress=False)
    assert shard_docs(tmp_path / "o") == expected_ids(tok)


def test_tokenizer_errors_name_the_file(tmp_path):
    (tmp_path / "garbage.json").write_bytes(b"\x00\x01 not json")
    with pytest.raises(ValueError, match=r"garbage\.json is not a valid tokenizers JSON file"):
        load_tokenizer(str(tmp_path / "garbage.json"))
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        load_tokenizer("nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir could not be loaded"):
        load_tokenizer(str(tmp_path / "empty_dir"))


# ------------------------------------------------------------------------------------------------ blends
def _source(tokens_per_doc, n_docs, seq_len=16, name="s", seed=0, offset=0):
    toks = (np.arange(n_docs * tokens_per_doc) + offset).astype(np.int64)
    return data.packed_samples(toks, seq_len, seed, name=name,
                               doc_lengths=np.full(n_docs, tokens_per_doc)).sources[0]


def test_blend_shares_match_weights_per_batch_and_over_200_batches():
    a, b = _source(50, 40, name="web"), _source(30, 30, name="code", offset=100_000)
    stream = data.BlendedSamples([a, b], [0.7, 0.3])
    loader = data.BatchLoader(stream, micro_batch_size=8)
    from_b = 0
    for _ in range(200):
        x, _ = loader.next_batch()
        from_b += int((x[:, 0] >= 100_000).sum())
    assert abs(from_b / 1600 - 0.3) < 0.02
    shares = {k: v / loader.tokens_consumed for k, v in loader.tokens_per_source().items()}
    assert shares["code"] == pytest.approx(from_b / 1600) and abs(shares["web"] - 0.7) < 0.02
    blend = Blend([0.7, 0.3])
    for n in (8, 800, PERIOD - 3, 5 * PERIOD + 17):  # every prefix within ~1 sample of its share
        assert np.abs(blend.counts(n) - n * np.array([0.7, 0.3])).max() <= 1.0


def test_blend_reads_each_source_in_its_own_order_without_gaps():
    blend = Blend([3, 1, 0.5])
    d, j = blend.locate(np.arange(3 * PERIOD))
    for src in range(3):
        np.testing.assert_array_equal(j[d == src], np.arange((d == src).sum()))
    np.testing.assert_array_equal(blend.counts(3 * PERIOD), np.bincount(d))
    with pytest.raises(ValueError, match="weight 1e-06 is below 1/65536"):
        Blend([1.0, 1e-6], ["big", "tiny"])
    with pytest.raises(ValueError, match="sum to > 0"):
        Blend([0.0, 0.0])


# ------------------------------------------------------------------------------------------------ build_datasets
def _cfg(tmp_path, *overrides):
    return load_config(DEBUG, [f"--data.data_dir={tmp_path / 'cache'}", f"--train.output_dir={tmp_path / 'out'}",
                               *overrides])


def _user_corpus(tmp_path, tok) -> tuple[str, str]:
    """A jsonl directory of real text and a pretokenized prefix (made by the CLI from other text)."""
    from data.corpus import iter_documents
    texts = [d["text"][:3000] for _, d in zip(range(120), iter_documents())]
    web = tmp_path / "web"
    web.mkdir()
    for part in range(3):
        _jsonl(web / f"part-{part}.jsonl", texts[part * 30:(part + 1) * 30])
    (tmp_path / "code.txt").write_text("\n".join(t.replace("\n", " ") for t in texts[90:]))
    preprocess([str(tmp_path / "code.txt")], tok, str(tmp_path / "code_text_document"), fmt="lines", progress=False)
    return str(web), str(tmp_path / "code_text_document")


def test_build_datasets_caches_tokens_and_checks_vocab(tmp_path, tok, monkeypatch):
    web, code = _user_corpus(tmp_path, tok)
    sources = f"--data.sources=[{{path: {web}, weight: 0.7}}, {{path: {code}, weight: 0.3, name: code}}]"
    cfg = _cfg(tmp_path, sources, "--data.val_fraction=0.05")
    ds = data.build_datasets(cfg.data, cfg.model.vocab_size, 8, 800, log=lambda m: None)
    assert ds.train.names == ["web", "code"] and ds.train.weights == [0.7, 0.3]
    assert ds.val_samples == cfg.data.val_batches * 8
    train_docs = [len(s.doc_ids) for s in ds.train.sources]
    val_docs = [len(s.doc_ids) for s in ds.val.sources]
    assert train_docs[0] + val_docs[0] == 90 and val_docs[0] == round(90 * 0.05)
    monkeypatch.setattr(data.sources, "preprocess", lambda *a, **k: pytest.fail("raw text tokenized twice"))
    again = data.build_datasets(cfg.data, cfg.model.vocab_size, 8, 800, builder=False, log=lambda m: None)
    np.testing.assert_array_equal(again.train.windows(np.arange(64)), ds.train.windows(np.arange(64)))
    with pytest.raises(ValueError, match=r"model.vocab_size \(5000\) is smaller than the 'bpe8k' tokenizer's "
                                         r"vocabulary \(8192\); set --model.vocab_size=8192"):
        data.build_datasets(cfg.data, 5000, 8, 800, log=lambda m: None)
    only_prefix = _cfg(tmp_path, f"--data.sources=[{{path: {code}, name: code}}]", "--data.val_fraction=0.05")
    top = max(max(ids) for ids in shard_docs(code))
    with pytest.raises(ValueError, match=rf"data source code: .*code_text_document holds token id {top}, but "
                                         rf"model.vocab_size is {top}; set --model.vocab_size={top + 1}"):
        data.build_datasets(only_prefix.data, top, 8, 800, log=lambda m: None)


def test_a_killed_build_leaves_nothing_the_next_build_keeps(tmp_path, tok):
    """The token directory and the epoch index are built under <name>.tmp-<pid>: what a dead process left is
    removed by the next build, which then writes the complete files."""
    import subprocess
    import sys

    web, _ = _user_corpus(tmp_path, tok)
    cfg = _cfg(tmp_path, f"--data.sources=[{{path: {web}}}]")
    data.build_datasets(cfg.data, cfg.model.vocab_size, 8, 80, log=lambda m: None)
    (token_dir,) = (tmp_path / "cache" / "tokens").iterdir()
    (table_dir,) = (tmp_path / "cache" / "index").glob("*-docs-*")
    index_dir = next(p for p in (tmp_path / "cache" / "index").iterdir()
                     if p != table_dir and (p / "epoch_00000.npy").exists())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid whose process has exited
    shutil.rmtree(token_dir)
    stale_dir = token_dir.parent / f"{token_dir.name}.tmp-{dead}"
    stale_dir.mkdir()
    (stale_dir / "tokens.bin").write_bytes(b"half")
    (index_dir / "epoch_00000.npy").unlink()
    stale_index = index_dir / f"epoch_00000.npy.tmp-{dead}.npy"
    stale_index.write_bytes(b"half")
    shutil.rmtree(table_dir)
    stale_table = table_dir.parent / f"{table_dir.name}.tmp-{dead}"
    stale_table.mkdir()
    (stale_table / "train.npy").write_bytes(b"half")
    data.build_datasets(cfg.data, cfg.model.vocab_size, 8, 80, log=lambda m: None)
    assert sorted(p.name for p in token_dir.parent.iterdir()) == [token_dir.name]
    assert sorted(p.name for p in index_dir.iterdir()) == ["epoch_00000.npy"]
    assert not stale_table.exists() and sorted(p.name for p in table_dir.iterdir()) == ["table.json", "train.npy",
                                                                                        "val.npy"]


def test_val_sources_and_too_small_validation_fail_at_start(tmp_path, tok):
    web, code = _user_corpus(tmp_path, tok)
    cfg = _cfg(tmp_path, f"--data.sources=[{{path: {web}}}]", f"--data.val_sources=[{{path: {code}}}]")
    ds = data.build_datasets(cfg.data, cfg.model.vocab_size, 8, 80, log=lambda m: None)
    assert [len(s.doc_ids) for s in ds.train.sources] == [90]  # nothing held out when val_sources are given
    assert ds.val.names == ["code_text_document"]
    tiny = _cfg(tmp_path, f"--data.sources=[{{path: {web}}}]", "--data.val_fraction=0.001", "--data.seq_len=64",
                "--data.micro_batch_size=64")
    with pytest.raises(ValueError, match="validation set is too small for one global batch of 64 samples"):
        data.build_datasets(tiny.data, tiny.model.vocab_size, 64, 640, log=lambda m: None)


def test_config_rejects_bad_weights_and_missing_validation():
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        load_config(DEBUG, ["--data.sources=[{path: a, weight: -0.5}]"])
    with pytest.raises(ValueError, match="weights sum to 0"):
        load_config(DEBUG, ["--data.sources=[{path: a, weight: 0}, {path: b, weight: 0}]"])
    with pytest.raises(ValueError, match="validation needs data"):
        load_config(DEBUG, ["--data.val_fraction=0"])
    assert load_config(DEBUG, ["--data.val_fraction=0", "--train.eval_interval=0"]).data.val_fraction == 0
    assert SourceConfig(path="x").weight == 1.0


# ------------------------------------------------------------------------------------------------ training
def _train_py(args: list[str]) -> list[dict]:
    import subprocess
    import sys

    out = next(a.split("=", 1)[1] for a in args if a.startswith("--train.output_dir="))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(DEBUG), *args], cwd=ROOT,
                          env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def test_train_py_on_a_blend_keeps_the_shares_and_resumes_bitwise(tmp_path, tok):
    """train.py on a jsonl directory + a pretokenized prefix blended 0.7/0.3: 200 steps (200 global batches),
    per-source token shares within 2% of the weights, QK-Clip clipping; a resume from step 100 in a new process
    gives the same losses, bit for bit."""
    web, code = _user_corpus(tmp_path, tok)
    common = [f"--data.sources=[{{path: {web}, weight: 0.7}}, {{path: {code}, weight: 0.3, name: code}}]",
              f"--data.data_dir={tmp_path / 'cache'}", "--data.val_fraction=0.05", "--train.steps=200",
              "--train.eval_interval=200", "--train.log_interval=1", "--train.ckpt_interval=100",
              "--optim.qk_clip_tau=0.5"]
    rows = _train_py([*common, f"--train.output_dir={tmp_path / 'a'}"])
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == list(range(1, 201)) and losses[200] < losses[1]
    last = [r for r in rows if "data/web/tokens" in r][-1]
    assert last["step"] == 200 and last["data/web/tokens"] + last["data/code/tokens"] == last["tokens"] == 200 * 4 * 64
    assert abs(last["data/web/tokens"] / last["tokens"] - 0.7) < 0.02
    assert abs(last["data/code/tokens"] / last["tokens"] - 0.3) < 0.02
    assert sum(r.get("qk_clip/clipped_heads", 0) for r in rows) > 0  # QK-Clip actually clipped
    resumed = _train_py([*common, f"--train.output_dir={tmp_path / 'b'}",
                         f"--train.resume={tmp_path / 'a' / 'checkpoints' / 'step_00000100'}"])
    again = {r["step"]: r["loss"] for r in resumed if "loss" in r}
    assert sorted(again) == list(range(101, 201))
    assert [again[s] for s in range(101, 201)] == [losses[s] for s in range(101, 201)]  # exact
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val == [r["val_loss"] for r in resumed if "val_loss" in r]
    counts = ("step", "tokens", "data/web/tokens", "data/code/tokens")
    final = [r for r in resumed if "data/code/tokens" in r][-1]
    assert {k: final[k] for k in counts} == {k: last[k] for k in counts}  # same per-source counts after the resume


def test_val_loss_does_not_depend_on_the_split_of_the_global_batch(tmp_path):
    from launch.trainer import Trainer, init_runtime

    losses = []
    for mbs, accum in [(4, 1), (2, 2), (1, 4)]:
        cfg = _cfg(tmp_path / f"{mbs}", f"--data.micro_batch_size={mbs}", f"--data.grad_accum={accum}",
                   "--data.val_batches=2", f"--data.data_dir={ROOT / 'data' / 'cache'}")
        trainer = Trainer(cfg, init_runtime(cfg))
        assert trainer.datasets.val_samples == 2 * 4
        losses.append(trainer.evaluate())
        trainer.metrics.close()
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and losses[2] == pytest.approx(losses[0], abs=1e-5)
    assert torch.isfinite(torch.tensor(losses)).all()


def _bad_source_worker(rank, world_size, tmp):
    from launch.trainer import Trainer, init_runtime

    cfg = _cfg(Path(tmp), f"--data.sources=[{{path: {tmp}/missing_dir}}]")
    with pytest.raises(ValueError) as e:
        Trainer(cfg, init_runtime(cfg))
    Path(tmp, f"rank{rank}.txt").write_text(str(e.value))


def test_a_data_error_on_rank0_reaches_every_rank(tmp_path):
    from tests.dist_utils import run_distributed

    run_distributed(_bad_source_worker, 2, str(tmp_path))
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert msgs[0] == msgs[1]
    assert f"data source {tmp_path}/missing_dir: no such file or directory" in msgs[0]


def _highest_averages(weights: list[float], seats: int, divisor) -> list[int]:
    """A divisor-method apportionment, seat by seat (ties to the first source): the textbook reference."""
    won = [0] * len(weights)
    for _ in range(seats):
        quotients = [w / divisor(s) if w > 0 else -1.0 for w, s in zip(weights, won)]
        won[quotients.index(max(quotients))] += 1
    return won


@pytest.mark.parametrize("weights", [[3.14159, 2.71828, 1.0], [5.0, 1.0, 0.37], [0.05, 0.9, 0.05]])
def test_the_blend_pattern_is_the_sainte_lague_apportionment_of_every_prefix(weights):
    """The first n samples of a period are the Sainte-Laguë apportionment of n seats (divisors 2s + 1), for
    every n, not D'Hondt's (s + 1, which favours the large sources); each of 3 uneven sources gets its share of
    a period within one sample. (Weights without exact ties: floating point decides those either way.)"""
    from data.blend import blend_pattern

    period = 600
    pattern = blend_pattern(weights, period)
    w = np.asarray(weights) / sum(weights)
    for n in range(1, period + 1):
        got = np.bincount(pattern[:n], minlength=len(weights)).tolist()
        assert got == _highest_averages(list(w), n, lambda s: 2 * s + 1), n
    assert (np.abs(np.bincount(pattern, minlength=3) - w * period) <= 1).all()
    assert any(_highest_averages(list(w), n, lambda s: s + 1) != _highest_averages(list(w), n, lambda s: 2 * s + 1)
               for n in range(1, 50))  # the two rules differ here: the test can tell them apart


def test_publishing_a_prefix_never_leaves_the_old_index_beside_a_new_bin(tmp_path, monkeypatch):
    """A crash between the two renames (new .bin in place, new .idx not yet) leaves no .idx, so the prefix reads as
    missing, not as the old index over the new tokens; a completed publish has both new files."""
    from data import preprocess

    prefix, tmp = str(tmp_path / "corpus"), str(tmp_path / "corpus.tmp")
    for path, text in ((prefix + ".bin", b"old bin"), (prefix + ".idx", b"old idx"), (tmp + ".bin", b"new bin"),
                       (tmp + ".idx", b"new idx")):
        Path(path).write_bytes(text)
    real_replace, calls = os.replace, []

    def crash_after_first(src, dst):
        if calls:
            raise KeyboardInterrupt("killed between the renames")
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(preprocess.os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        preprocess._publish(tmp, prefix)
    assert Path(prefix + ".bin").read_bytes() == b"new bin" and not Path(prefix + ".idx").exists()
    monkeypatch.setattr(preprocess.os, "replace", real_replace)
    Path(tmp + ".bin").write_bytes(b"newer bin")
    preprocess._publish(tmp, prefix)
    assert Path(prefix + ".bin").read_bytes() == b"newer bin" and Path(prefix + ".idx").read_bytes() == b"new idx"
