"""Checkpoint integrity: per-file checksums written with every checkpoint and verified before it is loaded, a
finite check of what is saved and what was loaded (the same check: a save that would fail it is refused), and plain
words for the OS errors a save meets (disk full, read-only, quota).

``checksums.json`` in a checkpoint directory::

    {"algorithm": "crc32", "files": {"__0_0.distcp": {"size": 123, "crc32": "89abcdef"}, ".metadata": {...}}}

Each rank checksums the data files it writes (``__<rank>_*.distcp``) while it writes them: DCP's writer gets a
file system whose streams run CRC-32 over every buffer on a helper thread while the write itself goes on
(``checksum_writer``), so no file is read back. Rank 0 writes the manifest before the directory is renamed into
place, so a complete checkpoint always has one. On load every rank verifies a disjoint share of the files (file i
on rank i % world), its files on parallel threads, and all ranks raise the same ``DamagedCheckpoint``
(``checkpoint <path> is damaged (<file>: <reason>)``). CRC-32 (zlib) is for damage (torn writes, bit rot, a file
overwritten), not tampering: it is 2.5x sha256's speed here, and checkpoints with sha256 manifests (written before)
still verify. Checkpoints written before checksums existed load with a warning.
"""
from __future__ import annotations

import errno
import hashlib
import json
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from launch.checkpoint.state import distributed

MANIFEST = "checksums.json"
ALGORITHM = "crc32"
ALGORITHMS = ("crc32", "sha256")  # what a manifest may name (sha256: checkpoints written before crc32)
_CHUNK = 8 << 20
_OVERLAP_BYTES = 1 << 20  # buffers this large are checksummed on the helper thread while they are written


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not match their checksums, are missing or truncated, or hold non-finite
    values. ``train.resume_fallback`` may skip it for an older one; other ValueErrors (wrong shapes) never."""


class NonFiniteState(FloatingPointError):
    """A save refused because the state holds NaN/inf (it would load as damaged): a runtime failure, exit code 1."""


class _Checksum:
    """``hashlib``'s interface for ``algorithm``: crc32 (zlib, hex of 8 digits) or a hashlib name."""

    def __init__(self, algorithm: str = ALGORITHM):
        self.crc, self.digest = 0, (None if algorithm == "crc32" else hashlib.new(algorithm))

    def update(self, data: Any) -> None:
        if self.digest is None:
            self.crc = zlib.crc32(data, self.crc)
        else:
            self.digest.update(data)

    def hexdigest(self) -> str:
        return f"{self.crc:08x}" if self.digest is None else self.digest.hexdigest()


def hash_file(path: Path, algorithm: str = ALGORITHM) -> dict[str, Any]:
    digest, size = _Checksum(algorithm), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, algorithm: digest.hexdigest()}


class _ChecksumStream:
    """A write stream that checksums what goes through it: a large buffer's CRC runs on ``helper`` while the
    file write runs here (both release the GIL), and ``write`` returns when both are done, so the buffer is never
    read after the caller may reuse it. Everything else is the file's."""

    def __init__(self, stream: Any, helper: ThreadPoolExecutor):
        self._stream, self._helper = stream, helper
        self.checksum, self.size = _Checksum(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _OVERLAP_BYTES:
            crc = self._helper.submit(zlib.crc32, view, self.checksum.crc)
            written = self._stream.write(view)
            self.checksum.crc = crc.result()
        else:
            written = self._stream.write(view)
            self.checksum.update(view)
        self.size += view.nbytes
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _ChecksumFileSystem(FileSystem):
    """DCP's local file system whose write streams checksum their bytes into ``entries`` (file name -> size and
    checksum, as ``hash_file`` gives them)."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-crc") as helper, \
                super().create_stream(path, mode) as stream:
            checked = _ChecksumStream(stream, helper)
            yield checked
        with self._lock:
            self.entries[Path(path).name] = {"size": checked.size, ALGORITHM: checked.checksum.hexdigest()}


def checksum_writer(directory: Path) -> FileSystemWriter:
    """DCP's ``FileSystemWriter`` for ``directory`` whose files are checksummed as they are written:
    ``checksums(writer, rank)`` gives this rank's entries for the manifest."""
    writer = FileSystemWriter(directory)
    writer.fs = _ChecksumFileSystem()
    return writer


def checksums(writer: FileSystemWriter, rank: int) -> dict[str, dict[str, Any]]:
    """The data files rank ``rank`` wrote through ``writer`` (``__<rank>_*.distcp``), with their checksums."""
    return {name: entry for name, entry in writer.fs.entries.items()
            if name.startswith(f"__{rank}_") and name.endswith(".distcp")}


def write_manifest(directory: Path, entries: dict[str, dict[str, Any]], referenced: set[str]) -> None:
    """Rank 0, before the rename: ``entries`` from every rank plus ``.metadata``. ``referenced`` (the files the
    DCP metadata points at) must all be hashed, else a rank's files went missing during the save."""
    missing = sorted(referenced - set(entries))
    if missing:
        raise OSError(f"checkpoint {directory}: files {missing[:3]} are referenced by .metadata but were not found "
                      "after the save (another process removed them, or ranks wrote to different directories)")
    entries = {**entries, ".metadata": hash_file(Path(directory) / ".metadata")}
    (Path(directory) / MANIFEST).write_text(json.dumps({"algorithm": ALGORITHM, "files": entries}, indent=1))


def read_manifest(directory: Path) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """The manifest's algorithm and files, or None when the checkpoint has none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        files, algorithm = manifest["files"], manifest.get("algorithm")
        if algorithm not in ALGORITHMS or not isinstance(files, dict):
            raise ValueError(f"algorithm {algorithm!r}")
        return algorithm, files
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged ({MANIFEST}: unreadable: {e})") from e


def verify_share(directory: Path, rank: int, world: int, threads: int = 4) -> str | None:
    """Check this rank's share of the files (on up to ``threads`` threads); the first problem in file order as
    ``"<file>: <reason>"``, or None."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    algorithm, files = manifest
    mine = [(name, want) for i, (name, want) in enumerate(sorted(files.items())) if i % world == rank]

    def check(name: str, want: dict[str, Any]) -> str | None:
        path = Path(directory) / name
        if not path.is_file():
            return f"{name}: missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name}: {size} bytes, {want['size']} expected (truncated or overwritten)"
        if hash_file(path, algorithm)[algorithm] != want[algorithm]:
            return f"{name}: {algorithm} mismatch (contents changed since the save)"
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(mine)))) as pool:
        return next((p for p in pool.map(lambda item: check(*item), mine) if p is not None), None)


def warn_if_unverified(directory: Path) -> None:
    if not (Path(directory) / MANIFEST).is_file():
        warnings.warn(f"checkpoint {directory} has no {MANIFEST} (written before checksums): loaded unverified",
                      stacklevel=3)


def first_non_finite(tensors: dict[str, Any]) -> str | None:
    """Name of the first floating tensor (local shard) with NaN/inf values, or None. Its minimum and maximum
    (NaN propagates into both, +-inf into one) tell: 10x faster than a mask of every element."""
    for name, t in tensors.items():
        local = t.to_local() if hasattr(t, "to_local") else t
        if not isinstance(local, torch.Tensor) or not local.is_floating_point() or local.numel() == 0:
            continue
        if local.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            lo, hi = torch.aminmax(local)
            finite = bool(torch.isfinite(lo) & torch.isfinite(hi))
        else:  # FP8 and other types aminmax does not take
            finite = bool(torch.isfinite(local).all())
        if not finite:
            return name
    return None


def non_finite_on_any_rank(tensors: dict[str, Any], group: Any = None) -> str | None:
    """Collective over ``group`` (the world by default): the first rank's ``first_non_finite``, the same on every
    rank, or None."""
    bad = [first_non_finite(tensors)]
    if distributed():
        found = bad[0]
        bad = [None] * dist.get_world_size(group)
        dist.all_gather_object(bad, found, group=group)
    return next((b for b in bad if b is not None), None)


# ------------------------------------------------------------------------------------------------ save errors
_OS_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large (a file-size limit, ulimit -f?)",
    errno.EIO: "input/output error (failing disk or network file system)",
}


def root_cause(error: BaseException) -> BaseException:
    """DCP's CheckpointException only says which ranks failed: the first rank's own exception, else ``error``."""
    failures = getattr(error, "failures", None) or {}
    for item in failures.values():
        return item[0] if isinstance(item, tuple) else item
    return error


def os_cause(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: its cause/context chain and DCP's per-rank failures are searched."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        stack += [e.__cause__, e.__context__]
        for item in getattr(e, "failures", {}).values():  # CheckpointException: rank -> (exception, traceback)
            stack.append(item[0] if isinstance(item, tuple) else item)
    return None


def describe_save_failure(error: BaseException, where: Path) -> str:
    """What happened, in words: the OS reason when there is one, else the error's first line; a disk nearly full
    is named even when the writer reported something else (torch's zip writer says 'unexpected pos')."""
    from launch.errors import first_line
    import shutil

    cause = os_cause(error)
    if cause is not None:
        reason = _OS_REASONS.get(cause.errno, cause.strerror or type(cause).__name__)
        target = f" ({cause.filename})" if cause.filename else ""
        text = f"{reason}{target}"
    else:
        text = f"{type(error).__name__}: {first_line(str(error))}"
    try:
        free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
        if cause is None or cause.errno == errno.ENOSPC:
            text += f"; {free / 2**20:.1f} MiB free there"
    except (OSError, StopIteration):
        pass
    return text
