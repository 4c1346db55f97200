"""Checkpoint integrity: per-file checksums written with every checkpoint and verified before it is loaded, a
finite check of what was loaded, and plain words for the OS errors a save meets (disk full, read-only, quota).

``checksums.json`` in a checkpoint directory::

    {"algorithm": "sha256", "files": {"__0_0.distcp": {"size": 123, "sha256": "..."}, ".metadata": {...}}}

Each rank hashes the data files it wrote (``__<rank>_*.distcp``) right after the save; rank 0 writes the manifest
before the directory is renamed into place, so a complete checkpoint always has one. On load every rank verifies
a disjoint share of the files (file i on rank i % world) and all ranks raise the same ``DamagedCheckpoint``
(``checkpoint <path> is damaged (<file>: <reason>)``). Checkpoints written before checksums existed load with a
warning.
"""
from __future__ import annotations

import errno
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

MANIFEST = "checksums.json"
ALGORITHM = "sha256"
_CHUNK = 8 << 20


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not match their checksums, are missing or truncated, or hold non-finite
    values. ``train.resume_fallback`` may skip it for an older one; other ValueErrors (wrong shapes) never."""


def hash_file(path: Path) -> dict[str, Any]:
    digest, size = hashlib.new(ALGORITHM), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, ALGORITHM: digest.hexdigest()}


def own_files(directory: Path, rank: int) -> list[Path]:
    """The data files rank ``rank`` wrote (FileSystemWriter names them ``__<rank>_<i>.distcp``)."""
    return sorted(Path(directory).glob(f"__{rank}_*.distcp"))


def hash_files(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    return {p.name: hash_file(p) for p in paths}


def write_manifest(directory: Path, entries: dict[str, dict[str, Any]], referenced: set[str]) -> None:
    """Rank 0, before the rename: ``entries`` from every rank plus ``.metadata``. ``referenced`` (the files the
    DCP metadata points at) must all be hashed, else a rank's files went missing during the save."""
    missing = sorted(referenced - set(entries))
    if missing:
        raise OSError(f"checkpoint {directory}: files {missing[:3]} are referenced by .metadata but were not found "
                      "after the save (another process removed them, or ranks wrote to different directories)")
    entries = {**entries, ".metadata": hash_file(Path(directory) / ".metadata")}
    (Path(directory) / MANIFEST).write_text(json.dumps({"algorithm": ALGORITHM, "files": entries}, indent=1))


def read_manifest(directory: Path) -> dict[str, dict[str, Any]] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"algorithm {manifest.get('algorithm')!r}")
        return files
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged ({MANIFEST}: unreadable: {e})") from e


def verify_share(directory: Path, rank: int, world: int) -> str | None:
    """Check this rank's share of the files; the first problem as ``"<file>: <reason>"``, or None."""
    files = read_manifest(directory)
    if files is None:
        return None
    for i, (name, want) in enumerate(sorted(files.items())):
        if i % world != rank:
            continue
        path = Path(directory) / name
        if not path.is_file():
            return f"{name}: missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name}: {size} bytes, {want['size']} expected (truncated or overwritten)"
        if hash_file(path)[ALGORITHM] != want[ALGORITHM]:
            return f"{name}: {ALGORITHM} mismatch (contents changed since the save)"
    return None


def warn_if_unverified(directory: Path) -> None:
    if not (Path(directory) / MANIFEST).is_file():
        warnings.warn(f"checkpoint {directory} has no {MANIFEST} (written before checksums): loaded unverified",
                      stacklevel=3)


def first_non_finite(tensors: dict[str, Any]) -> str | None:
    """Name of the first floating tensor (local shard) with NaN/inf values, or None."""
    for name, t in tensors.items():
        local = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(local, torch.Tensor) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


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
