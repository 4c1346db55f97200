"""Saving: finite check -> ``step_XXXXXXXX.tmp`` -> checksums -> rename -> ``latest`` -> prune, synchronously or
with ``AsyncSaver`` (only the staging copy into its kept buffer, staging.py, blocks training); a failed write raises
one OSError on every rank. State holding NaN/inf (what a load rejects as damaged) is refused before anything is
written: ``NonFiniteState`` on every rank, ``latest`` and the earlier checkpoints untouched."""
from __future__ import annotations

import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from launch.checkpoint import integrity
from launch.checkpoint.paths import LATEST, latest_checkpoint, list_checkpoints, step_dir
from launch.checkpoint.staging import StagingBuffer
from launch.checkpoint.state import distributed, rank, to_bytes

# DCP warns on every single-process save/load ("assuming the intent is to ..."), also from its async save thread:
# expected here, so filtered for good rather than around each call (load.py relies on it too)
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any],
                    extra: dict[str, Any], keep: int = 3, config_text: str = "") -> Path:
    """Collective: every rank passes its tensors (model + owned optimizer state) and its ``extra``.

    Writes ``step_XXXXXXXX.tmp``, checksumming every file as it is written (``checksums.json``), renames it when
    complete, points ``latest`` at it, prunes to ``keep``. A failed write (disk full, read-only, ...) removes the
    partial directory, leaves the earlier checkpoints and ``latest`` untouched and raises the same OSError on every
    rank. State holding NaN/inf raises ``NonFiniteState`` on every rank before anything is written.
    """
    refuse_non_finite(Path(root), step, tensors, group=None)
    save = _Save(Path(root), step, keep, config_text, group=None)
    save.begin()
    try:
        dcp.save(save.state(tensors, meta, extra), storage_writer=save.writer, no_dist=not distributed())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises the same failure on every rank
        save.fail(e)
    save.finish()
    return save.final


class AsyncSaver:
    """``train.ckpt_async``: ``dcp.async_save`` stages a copy of the state into this saver's buffer, the same one at
    every save (staging.py; the only part that blocks training), then a background thread writes it, hashes the
    files and commits (rename + ``latest``) once every rank has finished, all on a process group of its own, so
    the training collectives never interleave with it. At most one save is in flight: a new save, a load and the
    end of training wait for the previous one; its error (if any) is raised then, on every rank."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if distributed() else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-async")
        self._pending: Future | None = None
        self.stager = StagingBuffer()

    def save(self, root: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any],
             extra: dict[str, Any], keep: int = 3, config_text: str = "") -> float:
        """Start a save (after waiting for the previous one); returns the seconds the staging copy took."""
        self.wait()  # the staging buffer is free again
        refuse_non_finite(Path(root), step, tensors, group=self.group)
        t0 = time.perf_counter()
        save = _Save(Path(root), step, keep, config_text, group=self.group)
        save.begin()
        try:
            written = dcp.async_save(save.state(tensors, meta, extra), storage_writer=save.writer,
                                     process_group=self.group, no_dist=not distributed(),
                                     async_stager=self.stager)
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            save.fail(e)
        self._pending = self._executor.submit(self._complete, save, written, t0)
        return time.perf_counter() - t0

    @staticmethod
    def _complete(save: "_Save", written: Any, t0: float) -> tuple[int, float]:
        try:
            (written.upload_completion if hasattr(written, "upload_completion") else written).result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            save.fail(e)
        save.finish()
        return save.step, time.perf_counter() - t0

    def wait(self) -> tuple[int, float] | None:
        """Block until the save in flight (if any) is committed: its (step, seconds from start to commit), or
        None when none was in flight; raises its error."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        return pending.result()

    def poll(self) -> tuple[int, float] | None:
        """Like ``wait`` when the save in flight has finished, else None at once."""
        if self._pending is not None and self._pending.done():
            return self.wait()
        return None

    def close(self) -> None:
        """Wait for the save in flight, then stop the thread and free the staging buffer (the end of a run)."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self.stager.close()


def refuse_non_finite(root: Path, step: int, tensors: dict[str, Any], group: Any) -> None:
    """Collective: the finite check a load makes (load.py), before the save starts; raises ``NonFiniteState``
    naming the first tensor with NaN/inf on every rank (a rank's local shard counts)."""
    name = integrity.non_finite_on_any_rank(tensors, group)
    if name is not None:
        latest = latest_checkpoint(root) if root.is_dir() else None
        raise integrity.NonFiniteState(
            f"checkpoint save to {step_dir(root, step)} refused: {name} holds non-finite values (a load would reject "
            f"it as damaged); nothing written, latest is still {latest.name if latest is not None else 'none'}")


class _Save:
    """One checkpoint save's directory steps, shared by the synchronous and the asynchronous path."""

    def __init__(self, root: Path, step: int, keep: int, config_text: str, group: Any):
        self.root, self.step, self.keep, self.config_text, self.group = root, step, keep, config_text, group
        self.final = step_dir(root, step)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.rank = rank()
        self.writer = integrity.checksum_writer(self.tmp)

    def begin(self) -> None:
        error = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if self.tmp.exists():
                    shutil.rmtree(self.tmp)  # left over from an interrupted save
            except OSError as e:
                error = e
        self._agree(error)

    def state(self, tensors: dict[str, Any], meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        return {**tensors, "meta": to_bytes({**meta, "step": self.step}),
                f"extra/rank{self.rank}": to_bytes(extra)}

    def finish(self) -> None:
        """Gather the checksums of the files every rank wrote on rank 0, which writes the manifest, renames,
        points ``latest`` and prunes; every rank then learns whether that worked."""
        error, entries = None, integrity.checksums(self.writer, self.rank)
        gathered = [entries]
        if distributed():
            gathered = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(gathered, entries, group=self.group)
        if self.rank == 0:
            try:
                metadata = FileSystemReader(self.tmp).read_metadata()
                referenced = {info.relative_path for info in metadata.storage_data.values()}
                integrity.write_manifest(self.tmp, {k: v for e in gathered for k, v in e.items()}, referenced)
                if self.config_text:
                    (self.tmp / "config.yaml").write_text(self.config_text)
                _commit(self.tmp, self.final)
                _write_latest(self.root, self.final.name)
                _prune(self.root, self.keep, protect=self.final)
            except OSError as e:
                error = e
        self._agree(error)

    def fail(self, error: BaseException) -> None:
        """The write failed (on every rank: DCP gathers the failures): drop the partial directory, raise."""
        self._raise(integrity.describe_save_failure(error, self.tmp), error)

    def _agree(self, error: BaseException | None) -> None:
        """Collective: if any rank failed, every rank raises (rank 0's reason first)."""
        reason = None if error is None else integrity.describe_save_failure(error, self.tmp)
        reasons = [reason]
        if distributed():
            reasons = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(reasons, reason, group=self.group)
        failed = [(r, text) for r, text in enumerate(reasons) if text is not None]
        if failed:
            rank, text = failed[0]
            self._raise(text + (f" (rank {rank})" if distributed() else ""), error)

    def _raise(self, reason: str, error: BaseException | None) -> None:
        if self.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)  # frees the space a full disk needs back
        latest = latest_checkpoint(self.root) if self.root.is_dir() else None
        kept = f"; {latest} is intact" if latest is not None else ""
        raise OSError(f"checkpoint save to {self.final} failed: {reason}{kept}") from error


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():  # re-saving a step (e.g. after a rollback): swap, then drop the old copy
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def _write_latest(root: Path, name: str) -> None:
    pointer_tmp = root / (LATEST + ".tmp")
    pointer_tmp.write_text(name + "\n")
    pointer_tmp.replace(root / LATEST)


def _prune(root: Path, keep: int, protect: Path) -> None:
    found = list_checkpoints(root)
    for _, path in found[:-keep]:
        if path != protect:
            shutil.rmtree(path)
