"""``data.sources`` -> the training and validation sample streams the trainer reads.

For each source (an empty list means the embedded corpus, data/corpus.py):
1. resolve its path (data/formats.py); raw text is tokenized once by ``data.preprocess.preprocess`` into
   ``<data_dir>/tokens/<name>-<key>/`` where the key hashes the files' paths, sizes and modification times (the
   embedded corpus: its MANIFEST's sha256), the format options and the serialised tokenizer. The directory is
   built under a temporary name and renamed into place, so a crash never leaves one that looks complete;
2. open its token shards, and check every token id < ``model.vocab_size`` (the largest id of a Megatron prefix is
   found by one pass at first use and cached under ``<data_dir>/stats/``);
3. split: with ``data.val_sources`` empty, ``val_fraction`` of its documents are held out (data/sampling.py);
4. sample (data/sampling.py; indices cached under ``<data_dir>/index/``) and blend by weight (data/blend.py).

``build_datasets(..., builder=True)`` runs on rank 0 first (tokenizes, scans, prebuilds the sample indices the
planned run needs); the other ranks then call it with ``builder=False``, which only opens what rank 0 wrote.
An epoch index not prebuilt is built by the first rank that reaches it (written atomically; identical bytes
whichever rank writes it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Callable

import numpy as np

from data.blend import BlendedSamples
from data.corpus import EMBEDDED_DIR, MANIFEST_PATH, embedded_files, sha256_file
from data.formats import Resolved, file_identity, resolve
from data.indexed import TokenShards
from data.loader import available_samples
from data.preprocess import preprocess, remove_stale_tmp
from data.sampling import INDEX_VERSION, ShardSet, SourceSamples, split_documents
from data.tokenizer import TextTokenizer

FORMAT_VERSION = 2  # of the tokenized cache directories
PREBUILD_EPOCHS = 4  # later epochs (small corpora looped many times) are built when first reached, by any rank


@dataclasses.dataclass
class Source:
    name: str
    weight: float
    docs: ShardSet
    key: str  # content key of its token shards
    resolved: Resolved
    max_token: int | None = None  # known when we tokenized it (meta.json); else found by one scan


@dataclasses.dataclass
class Datasets:
    train: BlendedSamples
    val: BlendedSamples | None
    val_samples: int  # global samples in one validation pass (0 without validation)
    tokenizer: TextTokenizer | None  # loaded when a source is raw text


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def source_name(spec, used: set[str]) -> str:
    if spec.name:
        return spec.name
    path = re.split(r"[*?\[]", spec.path)[0] if re.search(r"[*?\[]", spec.path) else spec.path
    base = os.path.basename(path.rstrip("/")) or "source"
    base = re.sub(r"\.(jsonl|json|parquet|txt|bin|idx|gz|zst|xz)$", "", base)
    base = re.sub(r"\.(jsonl|json|parquet|txt)$", "", base)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "source"
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    return name


class _Builder:
    """Shared state of one build: the data config, the tokenizer (loaded on first need) and logging."""

    def __init__(self, d, builder: bool, log: Callable[[str], None]):
        self.d, self.builder, self.log = d, builder, log
        self.tokenizer: TextTokenizer | None = None

    def tok(self) -> TextTokenizer:
        if self.tokenizer is None:
            self.tokenizer = TextTokenizer(self.d.tokenizer, os.path.join(self.d.data_dir, "downloads"),
                                           self.d.trust_remote_code)
        return self.tokenizer

    def open_sources(self, specs, what: str) -> list[Source]:
        used: set[str] = set()
        out = []
        for spec in specs:
            name = source_name(spec, used)
            used.add(name)
            if spec.weight == 0:
                self.log(f"data: {what} source {name} ({spec.path}) has weight 0: left out")
                continue
            out.append(self.open_source(spec, name))
        return out

    def open_source(self, spec, name: str) -> Source:
        embedded = spec.path == EMBEDDED_DIR
        if embedded:
            files = tuple(embedded_files(verify=self.builder))
            resolved = Resolved(spec.path, files, ("jsonl",) * len(files))
            identity = {"manifest": sha256_file(MANIFEST_PATH)}
        else:
            resolved = resolve(spec.path, spec.format)
            identity = {"files": file_identity(resolved)}
        if resolved.tokenized:
            key = _digest({"prefixes": identity})
            prefixes = list(resolved.prefixes)
        else:
            key = _digest({"format": FORMAT_VERSION, **identity, "formats": resolved.formats,
                           "text_key": spec.text_key, "utf8_errors": self.d.utf8_errors,
                           "tokenizer": self.tok().fingerprint})
            prefixes = [self.tokenize(spec, name, resolved, key)]
            with open(os.path.join(os.path.dirname(prefixes[0]), "meta.json"), encoding="utf-8") as f:
                max_token = json.load(f)["max_token"]
            return Source(name, spec.weight, ShardSet([TokenShards(prefixes[0])]), key, resolved, max_token)
        return Source(name, spec.weight, ShardSet([TokenShards(p) for p in prefixes]), key, resolved)

    def tokenize(self, spec, name: str, resolved: Resolved, key: str) -> str:
        root = os.path.join(self.d.data_dir, "tokens")
        final = os.path.join(root, f"{name}-{key[:16]}")
        if os.path.exists(os.path.join(final, "meta.json")):
            return os.path.join(final, "tokens")
        if not self.builder:
            raise FileNotFoundError(f"data source {name}: {final} is missing; rank 0 builds it before the other "
                                    f"ranks open it (is data.data_dir on a filesystem every rank shares?)")
        os.makedirs(root, exist_ok=True)
        remove_stale_tmp(final)  # what a killed build left behind
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            self.log(f"data: tokenizing source {name} ({resolved.path}, {len(resolved.files)} files) with "
                     f"{self.d.tokenizer!r} into {final}")
            stats = preprocess(resolved, self.tok(), os.path.join(tmp, "tokens"), self.d.preprocess_workers,
                               spec.text_key, utf8_errors=self.d.utf8_errors, progress=False, log=self.log)
            stats.update(source=dataclasses.asdict(spec), tokenizer=self.d.tokenizer, key=key)
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(stats, f, indent=2, sort_keys=True)
            self.log(f"data: source {name}: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
                     f"({stats['tokens_per_s']:,.0f} tokens/s)")
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.exists(os.path.join(final, "meta.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return os.path.join(final, "tokens")

    def check_vocab(self, src: Source, vocab_size: int) -> None:
        """Every token id < vocab_size, checked when the shards open (not as an IndexError mid-step)."""
        path = os.path.join(self.d.data_dir, "stats", f"{src.key[:32]}.json")
        if src.max_token is not None:
            top = src.max_token
        elif os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                top = json.load(f)["max_token"]
        else:
            top = max(s.max_token() for s in src.docs.shards)
            if self.builder:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(f"{path}.tmp-{os.getpid()}", "w", encoding="utf-8") as f:
                    json.dump({"max_token": top}, f)
                os.replace(f"{path}.tmp-{os.getpid()}", path)
        if top >= vocab_size:
            where = src.docs.shards[0].prefix if len(src.docs.shards) == 1 else src.resolved.path
            raise ValueError(f"data source {src.name}: {where} holds token id {top}, but model.vocab_size is "
                             f"{vocab_size}; set --model.vocab_size={top + 1} or larger (or use the tokenizer the "
                             f"shards were made with)")

    def samples(self, src: Source, doc_ids: np.ndarray, shuffle: bool) -> SourceSamples:
        d = self.d
        cache = None
        if shuffle:
            ids_digest = hashlib.sha256(np.ascontiguousarray(doc_ids, np.int64).tobytes()).hexdigest()
            cache = os.path.join(d.data_dir, "index", f"{src.name}-" + _digest({
                "v": INDEX_VERSION, "key": src.key, "docs": ids_digest, "seq_len": d.seq_len, "seed": d.seed})[:16])
        return SourceSamples(src.docs, doc_ids, d.seq_len, d.seed, shuffle, cache, src.name)


def embedded_spec(spec_cls):
    return spec_cls(path=EMBEDDED_DIR, name="embedded", format="jsonl")


def build_datasets(d, model_vocab_size: int, global_batch: int, planned_samples: int, builder: bool = True,
                   with_val: bool = True, log: Callable[[str], None] = print) -> Datasets:
    """Sample streams for a ``DataConfig`` ``d`` (see the module docstring). ``global_batch``: samples per
    optimizer step (validation passes are multiples of it); ``planned_samples``: global samples the run will read
    (their sample indices are built now by the builder)."""
    from configs.config import SourceConfig

    b = _Builder(d, builder, log)
    train_sources = b.open_sources(d.sources or [embedded_spec(SourceConfig)], "training")
    val_sources = b.open_sources(d.val_sources, "validation") if d.val_sources else []
    if b.tokenizer is not None and b.tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"model.vocab_size ({model_vocab_size}) is smaller than the {d.tokenizer!r} tokenizer's "
                         f"vocabulary ({b.tokenizer.vocab_size}); set --model.vocab_size={b.tokenizer.vocab_size}")
    for src in train_sources + val_sources:
        b.check_vocab(src, model_vocab_size)
    train, held_out = [], []
    for src in train_sources:
        if val_sources or d.val_fraction == 0:  # the split never depends on whether validation runs
            train_ids, val_ids = np.arange(len(src.docs)), None
        else:
            train_ids, val_ids = split_documents(len(src.docs), d.val_fraction, f"data source {src.name}")
        train.append(b.samples(src, train_ids, shuffle=True))
        if val_ids is not None:
            held_out.append(b.samples(src, val_ids, shuffle=False))
    train_stream = BlendedSamples(train, [s.weight for s in train_sources])
    if builder:  # the sample indices of the epochs the planned run reaches (at most PREBUILD_EPOCHS), built once
        for samples, n in zip(train, train_stream.counts(planned_samples)):
            for epoch in range(min(int(max(n - 1, 0)) // samples.samples_per_epoch + 1, PREBUILD_EPOCHS)):
                samples.build_epoch(epoch)
    if not with_val:
        return Datasets(train_stream, None, 0, b.tokenizer)
    if val_sources:
        val_stream = BlendedSamples([b.samples(s, np.arange(len(s.docs)), shuffle=False) for s in val_sources],
                                    [s.weight for s in val_sources])
    else:
        val_stream = BlendedSamples(held_out, [s.weight for s in train_sources])
    return Datasets(train_stream, val_stream, _val_samples(val_stream, d.val_batches, global_batch, log),
                    b.tokenizer)


def _val_samples(val: BlendedSamples, val_batches: int, global_batch: int, log) -> int:
    """Samples in one validation pass: ``val_batches`` global batches, fewer if the validation set is smaller;
    an error if it is smaller than one global batch."""
    fit = available_samples(val) // global_batch
    if fit == 0:
        sizes = ", ".join(f"{s.name}: {s.samples_per_epoch} samples" for s in val.sources)
        raise ValueError(f"the validation set is too small for one global batch of {global_batch} samples of "
                         f"{val.seq_len} tokens ({sizes}); raise data.val_fraction, give larger data.val_sources, "
                         f"or lower data.seq_len / micro_batch_size")
    if fit < val_batches:
        log(f"data: the validation set holds {fit} global batches, fewer than data.val_batches={val_batches}: "
            f"validating on {fit}")
    return min(fit, val_batches) * global_batch
