"""Where documents come from: resolve a source path, stream its documents in chunks, tokenize a chunk.

A source ``path`` is one of
- a file: ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` / ``.jsonl.xz`` (one JSON object per line), ``.json`` (a JSON
  array of objects, read whole), ``.parquet``, ``.txt`` (one document per file; ``format: lines``: one per
  non-empty line; ``.txt.gz``/``.zst``/``.xz`` too);
- a directory (every such file below it, sorted; hidden files and other extensions are ignored), a directory
  written by ``datasets.Dataset.save_to_disk``, or a glob (``/data/web/*.jsonl.zst``, ``**`` recurses);
- a Megatron prefix ``foo`` with ``foo.bin`` + ``foo.idx`` (already tokenized), or a glob/directory of them.

``read_chunks`` runs in the reading process and only splits files into ``Chunk``s (raw lines or strings with
their location); ``tokenize_chunk`` (in worker processes) decodes, parses, validates and tokenizes one chunk,
so errors name the file and the line or row.
"""
from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import io
import itertools
import json
import lzma
import os
from typing import Iterator

import numpy as np

COMPRESSION = {".gz": gzip.open, ".xz": lzma.open, ".zst": None}  # zstandard is imported when needed
RAW_FORMATS = ("jsonl", "json", "parquet", "text", "lines", "hf_disk")
CHUNK_DOCS, CHUNK_BYTES = 512, 4 << 20  # a chunk ends at whichever comes first


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a source path names: raw files (each with its format) or Megatron prefixes."""

    path: str
    files: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    @property
    def tokenized(self) -> bool:
        return bool(self.prefixes)


@dataclasses.dataclass
class Chunk:
    """Consecutive documents of one file: ``kind`` "jsonl" (raw lines), "bytes" (raw documents) or "str"."""

    kind: str
    path: str
    positions: list[int]  # of each item: 1-based line number (jsonl, lines) or 0-based row (parquet, json, hf_disk)
    items: list
    unit: str = "line"  # how ``positions`` count: "line", "row" or "file"

    def where(self, i: int) -> str:
        return "file" if self.unit == "file" else f"{self.unit} {self.positions[i]}"


def format_of(path: str, fmt: str = "auto") -> str | None:
    """The raw format of a file by its extension (None: not a supported file)."""
    name = path.lower()
    for ext in COMPRESSION:
        name = name.removesuffix(ext)
    by_ext = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text"}
    found = next((f for ext, f in by_ext.items() if name.endswith(ext)), None)
    if fmt == "auto" or found is None:
        return found if fmt == "auto" else fmt
    return "lines" if fmt == "lines" and found == "text" else fmt


def is_prefix(path: str) -> bool:
    return os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx")


def _is_hf_disk(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json")) and \
        os.path.isfile(os.path.join(path, "dataset_info.json"))


def resolve(path: str, fmt: str = "auto") -> Resolved:
    """Resolve a source path (see the module docstring); a clear error when it names nothing usable."""
    if fmt == "megatron" or (fmt == "auto" and (is_prefix(path) or path.endswith((".bin", ".idx")))):
        prefix = path.removesuffix(".bin").removesuffix(".idx") if not is_prefix(path) else path
        if not is_prefix(prefix):
            raise FileNotFoundError(f"data source {path}: no Megatron prefix {prefix}.bin + {prefix}.idx")
        return Resolved(path, prefixes=(prefix,))
    if _is_hf_disk(path) or fmt == "hf_disk":
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            raise ValueError(f"data source {path} is a DatasetDict; point the path at one split, e.g. {path}/train")
        if not _is_hf_disk(path):
            raise FileNotFoundError(f"data source {path}: not a datasets.save_to_disk directory (no state.json)")
        return Resolved(path, files=(path,), formats=("hf_disk",))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            raise ValueError(f"data source {path} is a DatasetDict; point the path at one split, e.g. {path}/train")
        candidates = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            candidates += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        what = f"directory {path}"
    elif os.path.isfile(path):
        candidates, what = [path], f"file {path}"
    else:
        candidates = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not candidates:
            raise FileNotFoundError(f"data source {path}: no such file or directory, and no file matches it as a glob")
        what = f"glob {path}"
    prefixes = sorted({c[:-4] for c in candidates if c.endswith((".bin", ".idx")) and is_prefix(c[:-4])})
    raw = [(c, format_of(c, fmt)) for c in candidates if not c.endswith((".bin", ".idx"))]
    raw = [(c, f) for c, f in raw if f in RAW_FORMATS]
    if prefixes and raw:
        raise ValueError(f"data source {path}: {what} mixes Megatron prefixes ({prefixes[0]}, ...) and raw text "
                         f"files ({raw[0][0]}, ...); give them as two sources")
    if prefixes:
        return Resolved(path, prefixes=tuple(prefixes))
    if not raw:
        if len(candidates) == 1 and what.startswith("file"):
            raise ValueError(f"data source {path}: unsupported file type (use .jsonl[.gz|.zst|.xz], .json, .parquet, "
                             f".txt, a Megatron prefix, or set format)")
        raise FileNotFoundError(f"data source {path}: {what} holds no .jsonl/.json/.parquet/.txt files or Megatron "
                                f"prefixes" + ("" if candidates else " (it is empty)"))
    return Resolved(path, files=tuple(c for c, _ in raw), formats=tuple(f for _, f in raw))


def file_identity(resolved: Resolved) -> list:
    """(path, size, mtime) of every file behind a source: the content key of its cached token shards."""
    paths = list(resolved.files) or [p + ext for p in resolved.prefixes for ext in (".idx", ".bin")]
    out = []
    for p in paths:
        if os.path.isdir(p):  # save_to_disk directory: its arrow files
            out += file_identity(Resolved(p, files=tuple(sorted(os.path.join(p, n) for n in os.listdir(p)))))
        else:
            st = os.stat(p)
            out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


# ------------------------------------------------------------------------------------------------ reading
def _open_binary(path: str):
    lower = path.lower()
    if lower.endswith(".zst"):
        import zstandard
        return io.BufferedReader(zstandard.open(path, "rb"))  # its reader has no line iteration
    for ext, opener in COMPRESSION.items():
        if lower.endswith(ext) and opener is not None:
            return opener(path, "rb")
    return open(path, "rb")


def read_chunks(files: tuple[str, ...], formats: tuple[str, ...], text_key: str = "text",
                utf8_errors: str = "strict") -> Iterator[Chunk]:
    """Stream every document of ``files`` as chunks (bounded memory except ``.json``, which is read whole)."""
    for path, fmt in zip(files, formats):
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ValueError(f"{path}: the file is empty")
        n = 0
        reader = {"jsonl": _jsonl_chunks, "lines": _line_chunks, "text": _text_chunks, "json": _json_chunks,
                  "parquet": _parquet_chunks, "hf_disk": _hf_disk_chunks}[fmt]
        for chunk in reader(path, text_key, utf8_errors):
            n += len(chunk.items)
            yield chunk
        if n == 0:
            raise ValueError(f"{path}: no documents in the file")


def _batched(items: Iterator, make) -> Iterator[Chunk]:
    """Group (position, item) pairs into chunks: ``make(positions, items)``."""
    batch, positions, size = [], [], 0
    for pos, item in items:
        positions.append(pos)
        batch.append(item)
        size += len(item)
        if len(batch) >= CHUNK_DOCS or size >= CHUNK_BYTES:
            yield make(positions, batch)
            batch, positions, size = [], [], 0
    if batch:
        yield make(positions, batch)


def _jsonl_chunks(path: str, text_key: str, utf8_errors: str) -> Iterator[Chunk]:
    with _open_binary(path) as f:
        lines = ((i, line) for i, line in enumerate(_read_lines(f, path), 1) if line.strip())
        yield from _batched(lines, lambda pos, items: Chunk("jsonl", path, pos, items))


def _line_chunks(path: str, text_key: str, utf8_errors: str) -> Iterator[Chunk]:
    with _open_binary(path) as f:
        lines = ((i, line.rstrip(b"\r\n")) for i, line in enumerate(_read_lines(f, path), 1) if line.strip())
        yield from _batched(lines, lambda pos, items: Chunk("bytes", path, pos, items))


def _read_lines(f, path: str) -> Iterator[bytes]:
    try:
        yield from f
    except (OSError, EOFError, lzma.LZMAError) as e:  # truncated or corrupt compressed stream
        raise ValueError(f"{path}: cannot decompress ({type(e).__name__}: {e})") from None


def _text_chunks(path: str, text_key: str, utf8_errors: str) -> Iterator[Chunk]:
    with _open_binary(path) as f:
        raw = b"".join(_read_lines(f, path))
    if raw.strip():
        yield Chunk("bytes", path, [0], [raw], unit="file")


def _json_chunks(path: str, text_key: str, utf8_errors: str) -> Iterator[Chunk]:
    with _open_binary(path) as f:
        text = decode(b"".join(_read_lines(f, path)), utf8_errors, path, "file")[0]
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); a .json source must be "
                         f"one JSON array of objects (use .jsonl for one object per line)") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: top level is a JSON {type(rows).__name__}; a .json source must be an array "
                         f"of objects with a {text_key!r} field")
    texts = ((i, extract_text(row, text_key, path, f"row {i}")) for i, row in enumerate(rows))
    yield from _batched(texts, lambda pos, items: Chunk("str", path, pos, items, unit="row"))


def _parquet_chunks(path: str, text_key: str, utf8_errors: str) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    yield from _arrow_chunks(path, pf.schema_arrow, lambda: pf.iter_batches(CHUNK_DOCS, columns=[text_key]),
                             text_key)


def _hf_disk_chunks(path: str, text_key: str, utf8_errors: str) -> Iterator[Chunk]:
    import datasets

    table = datasets.load_from_disk(path).data.table  # memory-mapped arrow
    yield from _arrow_chunks(path, table.schema,
                             lambda: table.select([text_key]).to_batches(CHUNK_DOCS) if text_key in
                             table.column_names else [], text_key)


def _arrow_chunks(path: str, schema, batches, text_key: str) -> Iterator[Chunk]:
    import pyarrow as pa

    if text_key not in schema.names:
        raise ValueError(f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}); set the source's "
                         f"text_key")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_key!r} has type {kind}, expected strings")
    row = 0
    for batch in batches():
        column = batch.column(0)
        if column.null_count:
            bad = row + next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
            raise ValueError(f"{path}: row {bad}: {text_key!r} is null, expected a string")
        texts = column.to_pylist()
        yield Chunk("str", path, list(range(row, row + len(texts))), texts, unit="row")
        row += len(texts)


# ------------------------------------------------------------------------------------------------ tokenizing
class _Replacements:
    count = 0


def _count_replace(error: UnicodeDecodeError):
    _Replacements.count += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("muonclip_count_replace", _count_replace)


def decode(raw: bytes, utf8_errors: str, path: str, where: str) -> tuple[str, int]:
    """UTF-8 text of ``raw`` and how many bytes were replaced (``utf8_errors: replace``), else a clear error."""
    if utf8_errors == "replace":
        before = _Replacements.count
        text = raw.decode("utf-8", "muonclip_count_replace")
        return text, _Replacements.count - before
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {where}: invalid UTF-8 at byte {e.start} of {'the file' if where == 'file' else 'the line'} "
                         f"({e.reason}); fix the file or set data.utf8_errors: replace "
                         f"(python -m data.preprocess --utf8-errors replace)") from None


def extract_text(obj, text_key: str, path: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {where}: expected a JSON object, got {type(obj).__name__}")
    if text_key not in obj:
        keys = ", ".join(list(obj)[:8]) or "none"
        raise ValueError(f"{path}: {where}: no {text_key!r} key (keys: {keys}); set the source's text_key "
                         f"(--text-key for data.preprocess)")
    text = obj[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{path}: {where}: {text_key!r} is {type(text).__name__}, expected a string")
    return text


def chunk_texts(chunk: Chunk, text_key: str, utf8_errors: str) -> tuple[list[str], int]:
    """Decode and parse a chunk's documents: (texts, replaced bytes)."""
    if chunk.kind == "str":
        return chunk.items, 0
    texts, replaced = [], 0
    for i, raw in enumerate(chunk.items):
        where = chunk.where(i)
        text, n = decode(raw, utf8_errors, chunk.path, where)
        replaced += n
        if chunk.kind == "jsonl":
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{chunk.path}: {where}: not valid JSON ({e.msg}, column {e.colno})") from None
            text = extract_text(obj, text_key, chunk.path, where)
        texts.append(text)
    return texts, replaced


def tokenize_chunk(chunk: Chunk, tokenizer, text_key: str, utf8_errors: str) -> dict:
    """Token ids of a chunk's non-empty documents, EOS appended to each: {tokens, lengths, docs, empty, replaced}."""
    texts, replaced = chunk_texts(chunk, text_key, utf8_errors)
    kept = [t for t in texts if t]
    ids = tokenizer.encode_batch(kept) if kept else []
    sizes = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(sizes.sum()))  # ids < 2**31: half the IPC
    tokens = np.insert(flat, np.cumsum(sizes), tokenizer.eos_id)  # EOS after each document
    lengths = sizes + 1
    return {"tokens": tokens, "lengths": lengths, "docs": len(kept), "empty": len(texts) - len(kept),
            "replaced": replaced}
