"""Raw text -> Megatron ``.bin/.idx`` token shards (one sequence per document, EOS appended).

    python -m data.preprocess --input /data/web /data/books.jsonl.zst --tokenizer gpt2 \\
        --output-prefix /data/tokens/web --workers 8

Inputs are anything a ``data.sources`` path may be (data/formats.py). It streams: the reading process only
splits files into chunks; ``--workers`` processes decode, parse and tokenize them; results are written in input
order, so any number of workers writes byte-identical files. At most ``2 * workers`` chunks are in flight, so
memory stays bounded whatever the input size. The files are written as ``OUT.tmp-<pid>.*`` and renamed into
place at the end (the old ``.idx`` is removed first): a crash never leaves a prefix that looks complete.
The trainer runs the same ``preprocess()`` on rank 0 for raw-text sources (data/sources.py).

Beside the prefix goes ``OUTPUT_PREFIX.stats.json`` (documents, tokens, largest token id, tied to the files' sizes
and the .idx's modification time), so a training run checks token ids against ``model.vocab_size`` without
reading every token. For Megatron prefixes made elsewhere, record it once beforehand:

    python -m data.preprocess --stats /data/tokens/web_text_document ...
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from typing import Callable, Iterator

from data.formats import Resolved, read_chunks, resolve, tokenize_chunk
from data.indexed import IndexedWriter, TokenShards, token_dtype
from data.tokenizer import TextTokenizer

_WORKER: dict = {}  # per worker process: tokenizer and options (set by _init_worker)


def _init_worker(tokenizer: TextTokenizer, text_key: str, utf8_errors: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _WORKER.update(tokenizer=tokenizer, text_key=text_key, utf8_errors=utf8_errors)


def _work(chunk):
    return tokenize_chunk(chunk, _WORKER["tokenizer"], _WORKER["text_key"], _WORKER["utf8_errors"])


def resolve_inputs(inputs: list[str], fmt: str = "auto") -> Resolved:
    """All raw files behind ``inputs`` as one Resolved (Megatron prefixes are refused: already tokenized)."""
    files, formats = [], []
    for path in inputs:
        r = resolve(path, fmt)
        if r.tokenized:
            raise ValueError(f"{path} is already tokenized (Megatron prefix {r.prefixes[0]}); use it as a data source")
        files += r.files
        formats += r.formats
    return Resolved(",".join(inputs), tuple(files), tuple(formats))


def remove_stale_tmp(target: str) -> None:
    """Delete ``<target>.tmp-<pid>`` and ``<target>.tmp-<pid>.*`` files or directories of runs whose process is
    gone (what a crash leaves behind while building ``target``)."""
    folder, base = os.path.split(os.path.abspath(target))
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        match = re.fullmatch(rf"{re.escape(base)}\.tmp-(\d+)(\..*)?", entry)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)  # a live process is still writing it
        except ProcessLookupError:
            path = os.path.join(folder, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        except PermissionError:
            pass


@contextlib.contextmanager
def building_dir(final: str, marker: str) -> Iterator[str]:
    """Build directory ``final`` in ``<final>.tmp-<pid>`` (yielded; what a killed build left is removed first)
    and rename it into place when the block ends without an error; another process that completed the same
    build meanwhile (its ``marker`` file exists) wins. The temporary directory is always gone afterwards."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    remove_stale_tmp(final)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(os.path.join(final, marker)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _identity(prefix: str) -> dict:
    idx = os.stat(prefix + ".idx")
    return {"idx_bytes": idx.st_size, "idx_mtime_ns": idx.st_mtime_ns, "bin_bytes": os.path.getsize(prefix + ".bin")}


def read_stats(prefix: str) -> dict | None:
    """``prefix.stats.json`` when it describes the files there now (sizes and .idx time unchanged), else None."""
    try:
        with open(prefix + ".stats.json", encoding="utf-8") as f:
            stats = json.load(f)
        return stats if {k: stats.get(k) for k in ("idx_bytes", "idx_mtime_ns", "bin_bytes")} == _identity(prefix) \
            else None
    except (OSError, ValueError, AttributeError):
        return None


def write_stats(prefix: str, stats: dict) -> dict:
    stats = {**stats, **_identity(prefix)}
    tmp = f"{prefix}.stats.json.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    os.replace(tmp, prefix + ".stats.json")
    return stats


def scan_stats(prefix: str) -> dict:
    """Validate a Megatron prefix, find its largest token id (one pass over the .bin) and record both."""
    shards = TokenShards(prefix)
    return write_stats(prefix, {"documents": len(shards), "tokens": shards.num_tokens,
                                "max_token": shards.max_token()})


def preprocess(inputs: list[str] | Resolved, tokenizer: TextTokenizer | str, output_prefix: str, workers: int = 1,
               text_key: str = "text", fmt: str = "auto", utf8_errors: str = "strict", progress: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx``; returns statistics (documents, tokens, seconds, ...)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    resolved = inputs if isinstance(inputs, Resolved) else resolve_inputs(list(inputs), fmt)
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer(tokenizer)
    folder = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(folder, exist_ok=True)
    remove_stale_tmp(output_prefix)
    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    stats = {"files": len(resolved.files), "documents": 0, "empty_skipped": 0, "utf8_replaced_bytes": 0}
    t0 = time.perf_counter()
    bar = _progress_bar(progress)
    pool = None
    with IndexedWriter(tmp, token_dtype(tok.vocab_size)) as writer:
        try:
            chunks = read_chunks(resolved.files, resolved.formats, text_key, utf8_errors)
            if workers == 1:
                results = (tokenize_chunk(c, tok, text_key, utf8_errors) for c in chunks)
            else:
                ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
                pool = ctx.Pool(workers, _init_worker, (tok, text_key, utf8_errors))
                results = _ordered(pool, chunks, 2 * workers)
            for out in results:
                writer.add_documents(out["tokens"], out["lengths"])
                stats["documents"] += out["docs"]
                stats["empty_skipped"] += out["empty"]
                stats["utf8_replaced_bytes"] += out["replaced"]
                if bar is not None:
                    bar.update(out["docs"])
                    bar.set_postfix_str(f"{writer.num_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s",
                                        refresh=False)
        finally:
            if pool is not None:
                pool.terminate()
            if bar is not None:
                bar.close()
        if stats["documents"] == 0:
            raise ValueError(f"{resolved.path}: no non-empty documents")
    _publish(tmp, output_prefix)
    seconds = time.perf_counter() - t0
    stats.update(tokens=writer.num_tokens, max_token=writer.max_token, seconds=seconds,
                 tokens_per_s=writer.num_tokens / max(seconds, 1e-9), vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    write_stats(output_prefix, stats)
    if stats["utf8_replaced_bytes"]:
        log(f"{resolved.path}: replaced {stats['utf8_replaced_bytes']} invalid UTF-8 bytes with U+FFFD")
    if stats["empty_skipped"]:
        log(f"{resolved.path}: skipped {stats['empty_skipped']} empty documents")
    return stats


def _ordered(pool, chunks, in_flight: int):
    """Results of ``_work`` over ``chunks`` in input order, at most ``in_flight`` chunks submitted at a time."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_work, (chunk,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _publish(tmp: str, output_prefix: str) -> None:
    """Rename the finished files into place: the old .idx goes first, the new .idx last."""
    for old in (output_prefix + ".idx", output_prefix + ".stats.json"):
        if os.path.exists(old):
            os.remove(old)
    os.replace(tmp + ".bin", output_prefix + ".bin")
    os.replace(tmp + ".idx", output_prefix + ".idx")


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(unit="doc", desc="tokenizing", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="files, directories, globs (see data/formats.py)")
    parser.add_argument("--tokenizer", default="bpe8k",
                        help="bpe8k, gpt2, a tokenizer.json path or a Hugging Face tokenizer directory")
    parser.add_argument("--output-prefix", help="writes OUTPUT_PREFIX.bin, .idx and .stats.json")
    parser.add_argument("--stats", nargs="+", metavar="PREFIX",
                        help="instead: validate existing Megatron prefixes and record PREFIX.stats.json for each")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: %(default)s)")
    parser.add_argument("--text-key", default="text", help="JSON/parquet/arrow field with the text")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "parquet", "text", "lines",
                                                             "hf_disk"], help="override the format by extension")
    parser.add_argument("--utf8-errors", default="strict", choices=["strict", "replace"])
    parser.add_argument("--trust-remote-code", action="store_true", help="for tokenizer directories with code")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.stats:
        return _record_stats(args.stats)
    if not args.input or not args.output_prefix:
        parser.error("--input and --output-prefix are required (or --stats PREFIX ...)")
    try:
        tok = TextTokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
        stats = preprocess(args.input, tok, args.output_prefix, args.workers, args.text_key, args.format,
                           args.utf8_errors, progress=not args.no_progress,
                           log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
          f"({stats['tokens_per_s']:,.0f} tokens/s, {stats['seconds']:.1f} s, {args.workers} workers)")
    return 0


def _record_stats(prefixes: list[str]) -> int:
    for prefix in prefixes:
        prefix = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
        try:
            stats = scan_stats(prefix)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {prefix}.stats.json: {stats['documents']:,} documents, {stats['tokens']:,} tokens, "
              f"largest token id {stats['max_token']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
