"""``data.sources`` -> the training and validation sample streams the trainer reads.

For each source (an empty list means the embedded corpus, data/corpus.py):
1. resolve its path (data/formats.py); raw text is tokenized once by ``data.preprocess.preprocess`` into
   ``<data_dir>/tokens/<name>-<key>/`` where the key hashes the files' paths, sizes and modification times (the
   embedded corpus: its MANIFEST's sha256), the format options and the serialised tokenizer. The directory is
   built under a temporary name and renamed into place, so a crash never leaves one that looks complete;
2. open its token shards, and check every token id < ``model.vocab_size`` (from the prefix's ``.stats.json``,
   which data.preprocess writes; a Megatron prefix without one is scanned once and the result cached under
   ``<data_dir>/stats/``);
3. its document table (data/documents.py): with ``data.val_sources`` empty, ``val_fraction`` of its documents
   are held out; the ids and token counts of both parts are written once and memory-mapped;
4. sample (data/sampling.py; indices cached under ``<data_dir>/index/``) and blend by weight (data/blend.py).

``build_datasets(..., builder=True)`` runs on rank 0 first (tokenizes, scans, builds the document tables and the
sample indices the planned run needs) and returns, in ``Datasets.manifest``, what it opened (names, weights, keys,
prefixes, tables: a few hundred bytes per source). The other ranks pass that manifest back in
(``builder=False, manifest=...``) and only memory-map what rank 0 wrote: no file walk, no hashing, no pass over
the index, nothing per document in their own memory. An epoch index not prebuilt is built by the first rank
that reaches it (written atomically; identical bytes whichever rank writes it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Callable


from data.blend import BlendedSamples
from data.corpus import EMBEDDED_DIR, MANIFEST_PATH, embedded_files, sha256_file
from data.formats import Resolved, file_identity, resolve
from data.indexed import TokenShards
from data.loader import available_samples
from data.documents import DocumentTable, build_table, open_table, table_dir
from data.preprocess import building_dir, preprocess, read_stats
from data.sampling import INDEX_VERSION, ShardSet, SourceSamples
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
    manifest: dict  # what was opened: build_datasets(..., builder=False, manifest=...) opens the same


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
        final = os.path.join(self.d.data_dir, "tokens", f"{name}-{key[:16]}")
        if os.path.exists(os.path.join(final, "meta.json")):
            return os.path.join(final, "tokens")
        if not self.builder:
            raise FileNotFoundError(f"data source {name}: {final} is missing; rank 0 builds it before the other "
                                    f"ranks open it (is data.data_dir on a filesystem every rank shares?)")
        with building_dir(final, "meta.json") as tmp:
            self.log(f"data: tokenizing source {name} ({resolved.path}, {len(resolved.files)} files) with "
                     f"{self.d.tokenizer!r} into {final}")
            stats = preprocess(resolved, self.tok(), os.path.join(tmp, "tokens"), self.workers(resolved),
                               spec.text_key, utf8_errors=self.d.utf8_errors, progress=False, log=self.log)
            stats.update(source=dataclasses.asdict(spec), tokenizer=self.d.tokenizer, key=key)
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(stats, f, indent=2, sort_keys=True)
            self.log(f"data: source {name}: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
                     f"({stats['tokens_per_s']:,.0f} tokens/s)")
        return os.path.join(final, "tokens")

    def workers(self, resolved: Resolved) -> int:
        """``data.preprocess_workers``, or with 0 one per 64 MiB of input up to the CPUs this process may use."""
        if self.d.preprocess_workers:
            return self.d.preprocess_workers
        size = sum(entry[1] for entry in file_identity(resolved))
        return max(1, min(len(os.sched_getaffinity(0)), size // (64 << 20)))

    def check_vocab(self, src: Source, vocab_size: int) -> None:
        """Every token id < vocab_size, checked when the shards open (not as an IndexError mid-step)."""
        top = src.max_token if src.max_token is not None else max(self.max_token(s) for s in src.docs.shards)
        if top >= vocab_size:
            where = src.docs.shards[0].prefix if len(src.docs.shards) == 1 else src.resolved.path
            raise ValueError(f"data source {src.name}: {where} holds token id {top}, but model.vocab_size is "
                             f"{vocab_size}; set --model.vocab_size={top + 1} or larger (or use the tokenizer the "
                             f"shards were made with)")

    def max_token(self, shards: TokenShards) -> int:
        """From ``prefix.stats.json`` (data.preprocess), else from one scan, cached under <data_dir>/stats/."""
        stats = read_stats(shards.prefix)
        if stats is not None:
            return int(stats["max_token"])
        identity = file_identity(Resolved(shards.prefix, prefixes=(shards.prefix,)))
        path = os.path.join(self.d.data_dir, "stats", _digest(identity)[:32] + ".json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return int(json.load(f)["max_token"])
        self.log(f"data: scanning the {shards.num_tokens:,} tokens of {shards.prefix} for the vocabulary check "
                 f"(once; `python -m data.preprocess --stats {shards.prefix}` records it beforehand)")
        top = shards.max_token()
        if self.builder:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(f"{path}.tmp-{os.getpid()}", "w", encoding="utf-8") as f:
                json.dump({"max_token": top}, f)
            os.replace(f"{path}.tmp-{os.getpid()}", path)
        return top

    def manifest(self, vocab_size: int) -> dict:
        """Open (the builder: tokenize, check, build the document tables of) every source: the manifest."""
        from configs.config import SourceConfig

        d = self.d
        train_sources = self.open_sources(d.sources or [embedded_spec(SourceConfig)], "training")
        val_sources = self.open_sources(d.val_sources, "validation") if d.val_sources else []
        if self.tokenizer is not None and self.tokenizer.vocab_size > vocab_size:
            raise ValueError(f"model.vocab_size ({vocab_size}) is smaller than the {d.tokenizer!r} tokenizer's "
                             f"vocabulary ({self.tokenizer.vocab_size}); set "
                             f"--model.vocab_size={self.tokenizer.vocab_size}")
        for src in train_sources + val_sources:
            self.check_vocab(src, vocab_size)
        held_out = 0.0 if val_sources else d.val_fraction  # the split never depends on whether validation runs
        return {"train": [self.entry(src, held_out) for src in train_sources],
                "val": [self.entry(src, 0.0) for src in val_sources]}

    def entry(self, src: Source, val_fraction: float) -> dict:
        folder = table_dir(self.d.data_dir, src.name, src.key, len(src.docs), val_fraction)
        if self.builder:
            build_table(src.docs, folder, val_fraction, f"data source {src.name}", self.log)
        return {"name": src.name, "weight": src.weight, "key": src.key, "path": src.resolved.path,
                "prefixes": [s.prefix for s in src.docs.shards], "table": folder}

    def open_entry(self, entry: dict) -> tuple[ShardSet, DocumentTable]:
        """A manifest entry's shards and table, memory-mapped; the shards' sizes checked against the table."""
        table = open_table(entry["table"])
        if len(table.shard_tokens) != len(entry["prefixes"]):
            raise ValueError(f"data source {entry['name']}: document table {table.path} describes "
                             f"{len(table.shard_tokens)} shards, the source has {len(entry['prefixes'])}")
        shards = [TokenShards(p, num_tokens=n) for p, n in zip(entry["prefixes"], table.shard_tokens)]
        return ShardSet(shards, table.lengths), table

    def samples(self, entry: dict, docs: ShardSet, table: DocumentTable, part: str, shuffle: bool) -> SourceSamples:
        d = self.d
        ids, tokens = (table.train, table.train_tokens) if part == "train" else (table.val, table.val_tokens)
        cache = os.path.join(d.data_dir, "index", f"{entry['name']}-" + _digest({
            "v": INDEX_VERSION, "table": os.path.basename(table.path), "part": part, "seq_len": d.seq_len,
            "shuffle": shuffle, "seed": d.seed if shuffle else None})[:16])
        return SourceSamples(docs, ids, d.seq_len, d.seed, shuffle, cache, entry["name"], tokens)


def embedded_spec(spec_cls):
    return spec_cls(path=EMBEDDED_DIR, name="embedded", format="jsonl")


def build_datasets(d, model_vocab_size: int, global_batch: int, planned_samples: int, builder: bool = True,
                   with_val: bool = True, log: Callable[[str], None] = print,
                   manifest: dict | None = None) -> Datasets:
    """Sample streams for a ``DataConfig`` ``d`` (see the module docstring). ``global_batch``: samples per
    optimizer step (validation passes are multiples of it); ``planned_samples``: global samples the run will read
    (their sample indices are built now by the builder); ``manifest``: the builder's ``Datasets.manifest`` (the
    sources are then opened from it, without resolving or checking them again)."""
    b = _Builder(d, builder, log)
    if manifest is None:
        manifest = b.manifest(model_vocab_size)
    train, held_out, held_out_weights = [], [], []
    for entry in manifest["train"]:
        docs, table = b.open_entry(entry)
        train.append(b.samples(entry, docs, table, "train", shuffle=True))
        if table.val is not None:
            held_out.append(b.samples(entry, docs, table, "val", shuffle=False))
            held_out_weights.append(entry["weight"])
    train_stream = BlendedSamples(train, [e["weight"] for e in manifest["train"]])
    if builder:  # the sample indices of the epochs the planned run reaches (at most PREBUILD_EPOCHS), built once
        for samples, n in zip(train, train_stream.counts(planned_samples)):
            t0 = time.perf_counter()
            epochs = min(int(max(n - 1, 0)) // samples.samples_per_epoch + 1, PREBUILD_EPOCHS)
            for epoch in range(epochs):
                samples.build_epoch(epoch)
            if time.perf_counter() - t0 > 10:
                log(f"data: source {samples.name}: sample indices of {epochs} epoch(s) ready "
                    f"({time.perf_counter() - t0:.0f} s)")
    if not with_val:
        return Datasets(train_stream, None, 0, b.tokenizer, manifest)
    if manifest["val"]:
        val_parts = []
        for entry in manifest["val"]:
            docs, table = b.open_entry(entry)
            val_parts.append(b.samples(entry, docs, table, "train", shuffle=False))
        val_stream = BlendedSamples(val_parts, [e["weight"] for e in manifest["val"]])
    else:
        val_stream = BlendedSamples(held_out, held_out_weights)
    if builder:  # validation reads its first epoch, in order
        for samples in val_stream.sources:
            samples.build_epoch(0)
    return Datasets(train_stream, val_stream, _val_samples(val_stream, d.val_batches, global_batch, log),
                    b.tokenizer, manifest)


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
