"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), single process or any number of ranks.

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/      .metadata, __<rank>_0.distcp, checksums.json, config.yaml (human-readable copy)
    step_00000200/
    latest              text file: name of the newest complete checkpoint

A checkpoint is written to ``step_XXXXXXXX.tmp`` and renamed when every rank has finished, so a directory
without ``.tmp`` is complete; ``latest`` is replaced atomically; only the last ``keep`` are kept. Every file is
hashed at save time and verified before a load (launch/integrity.py); ``AsyncSaver`` is the same save with
only the staging copy blocking training.

Keys: the model's ``state_dict()`` (FQNs), the optimizer state flattened to ``optim/{fqn}/{state_key}``
(each key written by the rank that owns it), ``meta`` (resolved config, step, world size; bytes) and
``extra/rank{r}`` (bytes: data loader state, RNG states, monitor state of rank r). Tensors sharded by
tensor/expert parallelism are passed in as DTensors by the caller, so DCP stores the global tensors.
"""
from __future__ import annotations

import io
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from launch import integrity
from launch.errors import first_line
from launch.integrity import DamagedCheckpoint

# DCP warns on every single-process save/load ("assuming the intent is to ..."), also from its async save thread:
# expected here, so filtered for good rather than around each call
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

CHECKPOINT_SUBDIR = "checkpoints"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_SUBDIR


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed, with .metadata) as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / ".metadata").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint named by ``latest`` if complete, else the highest complete step (None if none)."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():  # a pointer that is not a complete step's name (garbage bytes, say) counts as missing
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        candidate = root / name
        if _STEP_RE.match(name) and (candidate / ".metadata").is_file():
            return candidate
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``train.resume`` -> checkpoint directory to load, or None to start from scratch."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoint_root(output_dir))
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"train.resume: checkpoint {path} does not exist; use a step_XXXXXXXX directory "
                                f"under <output_dir>/{CHECKPOINT_SUBDIR}/, 'auto' or 'none'")
    return path


# ------------------------------------------------------------------------------------------------ state
def optimizer_state(optimizer: Any) -> dict[str, torch.Tensor]:
    """``optim/{fqn}/{key}`` -> tensor for every parameter whose state this rank owns (needs group "names")."""
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        names = group.get("names")
        if names is None or len(names) != len(group["params"]):
            raise ValueError("checkpoint: optimizer param groups need a 'names' list (muonclip.build_param_groups)")
        for name, p in zip(names, group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optim/{name}/{key}"] = value
    return out


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_bytes(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _from_bytes(buf: Any) -> Any:
    if isinstance(buf, io.BytesIO):
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    return buf


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


# ------------------------------------------------------------------------------------------------ save
def save_checkpoint(root: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any],
                    extra: dict[str, Any], keep: int = 3, config_text: str = "") -> Path:
    """Collective: every rank passes its tensors (model + owned optimizer state) and its ``extra``.

    Writes ``step_XXXXXXXX.tmp``, hashes every file (``checksums.json``), renames it when complete, points
    ``latest`` at it, prunes to ``keep``. A failed write (disk full, read-only, ...) removes the partial
    directory, leaves the earlier checkpoints and ``latest`` untouched and raises the same OSError on every rank.
    """
    save = _Save(Path(root), step, keep, config_text, group=None)
    save.begin()
    try:
        dcp.save(save.state(tensors, meta, extra), storage_writer=FileSystemWriter(save.tmp),
                 no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises the same failure on every rank
        save.fail(e)
    save.finish()
    return save.final


class AsyncSaver:
    """``train.ckpt_async``: ``dcp.async_save`` stages a copy of the state (the only part that blocks training),
    then a background thread writes it, hashes the files and commits (rename + ``latest``) once every rank has
    finished, all on a process group of its own, so the training collectives never interleave with it. At most
    one save is in flight: a new save, a load and the end of training wait for the previous one; its error (if
    any) is raised then, on every rank."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if _distributed() else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-async")
        self._pending: Future | None = None

    def save(self, root: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any],
             extra: dict[str, Any], keep: int = 3, config_text: str = "") -> float:
        """Start a save (after waiting for the previous one); returns the seconds the staging copy took."""
        self.wait()
        t0 = time.perf_counter()
        save = _Save(Path(root), step, keep, config_text, group=self.group)
        save.begin()
        try:
            written = dcp.async_save(save.state(tensors, meta, extra), storage_writer=FileSystemWriter(save.tmp),
                                     process_group=self.group, no_dist=not _distributed())
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
        """Wait for the save in flight, then stop the thread (the end of a run)."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)


class _Save:
    """One checkpoint save's directory steps, shared by the synchronous and the asynchronous path."""

    def __init__(self, root: Path, step: int, keep: int, config_text: str, group: Any):
        self.root, self.step, self.keep, self.config_text, self.group = root, step, keep, config_text, group
        self.final = step_dir(root, step)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.rank = _rank()

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
        return {**tensors, "meta": _to_bytes({**meta, "step": self.step}),
                f"extra/rank{self.rank}": _to_bytes(extra)}

    def finish(self) -> None:
        """Hash this rank's files, gather the hashes on rank 0, which writes the manifest, renames, points
        ``latest`` and prunes; every rank then learns whether that worked."""
        error, entries = None, {}
        try:
            entries = integrity.hash_files(integrity.own_files(self.tmp, self.rank))
        except OSError as e:
            error = e
        gathered = [entries]
        if _distributed():
            gathered = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(gathered, (entries, error is not None), group=self.group)
            error = error or next((OSError(f"rank {r} could not read back its files") for r, (_, bad)
                                   in enumerate(gathered) if bad), None)
            gathered = [e for e, _ in gathered]
        if error is None and self.rank == 0:
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
        if _distributed():
            reasons = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(reasons, reason, group=self.group)
        failed = [(r, text) for r, text in enumerate(reasons) if text is not None]
        if failed:
            rank, text = failed[0]
            self._raise(text + (f" (rank {rank})" if _distributed() else ""), error)

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


# ------------------------------------------------------------------------------------------------ load
def read_metadata(path: str | Path) -> Any:
    """DCP metadata of a complete checkpoint, or a clear error about what is wrong with ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is not a directory (expected <output_dir>/{CHECKPOINT_SUBDIR}/step_*)")
    if path.name.endswith(".tmp"):
        raise ValueError(f"checkpoint {path} is an unfinished save (.tmp); resume from a complete step_* directory")
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint {path} is incomplete: it has no .metadata file (interrupted save or not a "
                         "checkpoint); pick another step_* directory")
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is damaged
        raise DamagedCheckpoint(f"checkpoint {path} is damaged (.metadata: unreadable, truncated or corrupt: "
                                f"{type(e).__name__}: {first_line(str(e))})") from e


def verify_checkpoint(path: str | Path) -> None:
    """Collective: every rank checks its share of the files against ``checksums.json``; all raise the same
    ``DamagedCheckpoint`` naming the first bad file (a checkpoint without checksums warns and passes)."""
    path = Path(path)
    world = dist.get_world_size() if _distributed() else 1
    problem: str | None
    try:
        problem = integrity.verify_share(path, _rank(), world)
    except (DamagedCheckpoint, OSError) as e:
        problem = str(e)
    problems = [problem]
    if _distributed():
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    found = next((p for p in problems if p is not None), None)
    if found is not None:
        raise DamagedCheckpoint(found if found.startswith("checkpoint ") else f"checkpoint {path} is damaged ({found})")
    integrity.warn_if_unverified(path)


def _check_finite(path: Path, tensors: dict[str, Any]) -> None:
    """Collective: all ranks raise when any rank loaded NaN/inf (a checkpoint of a run that had diverged)."""
    bad = [integrity.first_non_finite(tensors)]
    if _distributed():
        bad = [None] * dist.get_world_size()
        dist.all_gather_object(bad, integrity.first_non_finite(tensors))
    name = next((b for b in bad if b is not None), None)
    if name is not None:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged ({name}: non-finite values)")


def _load(path: Path, state: dict[str, Any]) -> None:
    try:
        dcp.load(state, storage_reader=FileSystemReader(path), no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps per-rank failures (CheckpointException
        # derives from BaseException in torch 2.13); name the checkpoint
        cause = integrity.root_cause(e)
        raise DamagedCheckpoint(f"checkpoint {path} is damaged (loading failed: {type(cause).__name__}: "
                                f"{first_line(str(cause))})") from e


def check_compatible(path: Path, metadata: Any, tensors: dict[str, Any], saved_model_cfg: dict | None,
                     model_cfg: dict | None) -> None:
    """Raise ValueError naming ``path`` if the saved model config or tensor shapes differ from ours."""
    if saved_model_cfg is not None and model_cfg is not None:
        diff = [f"{k}: checkpoint {saved_model_cfg.get(k)!r} vs config {v!r}" for k, v in model_cfg.items()
                if saved_model_cfg.get(k) != v]
        if diff:
            raise ValueError(f"checkpoint {path} was saved with a different model config ({'; '.join(diff)}); "
                             "resume with the same model section or start a new output_dir")
    saved = metadata.state_dict_metadata
    missing = [k for k in tensors if k not in saved]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors this run needs, e.g. {missing[:3]} "
                         "(saved with another model or optimizer?)")
    wrong = [f"{k}: checkpoint {tuple(saved[k].size)} vs model {tuple(t.shape)}" for k, t in tensors.items()
             if tuple(getattr(saved[k], "size", ())) != tuple(t.shape)]
    if wrong:
        raise ValueError(f"checkpoint {path} has tensors of other shapes: {'; '.join(wrong[:5])}")


def load_checkpoint(path: str | Path, tensors: dict[str, Any], model_cfg: dict | None = None,
                    verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective: load ``tensors`` in place from ``path``; return (meta, this rank's extra).

    ``tensors`` must hold correctly shaped tensors (optimizer state created with ``opt.init_state()``).
    Raises FileNotFoundError/ValueError naming the path before anything is modified when the checkpoint is
    missing, incomplete, unreadable or incompatible, and ``DamagedCheckpoint`` when a file fails its checksum
    (``verify``) or a loaded tensor is not finite. A rank without its own ``extra`` (more ranks than at save
    time) gets rank 0's.
    """
    path = Path(path)
    metadata = read_metadata(path)
    if verify:
        verify_checkpoint(path)
    if "meta" not in metadata.state_dict_metadata:
        raise ValueError(f"checkpoint {path} has no 'meta' entry: not written by launch/checkpoint.py")
    holder = {"meta": io.BytesIO()}
    _load(path, holder)
    meta = _from_bytes(holder["meta"])
    check_compatible(path, metadata, tensors, meta.get("config", {}).get("model"), model_cfg)
    extra_key = f"extra/rank{_rank()}"
    if extra_key not in metadata.state_dict_metadata:
        extra_key = "extra/rank0"
    state = {**tensors, extra_key: io.BytesIO()}
    _load(path, state)
    _check_finite(path, tensors)
    return meta, _from_bytes(state[extra_key])


def shard_views(tensors: dict[str, Any], placements: dict[str, Any], groups: Any) -> dict[str, Any]:
    """Wrap tensors of expert-parallel ("expert": Shard(0) over ``groups.ep_group``) and tensor-parallel
    ("tp_sharded": Shard(dim) over the tp group) parameters, and their optimizer state, as DTensors sharing
    the local storage, so DCP saves/loads the global tensors. Replicated tensors are returned unchanged."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    meshes: dict[int, Any] = {}
    out = dict(tensors)
    for key, t in tensors.items():
        name = key[len("optim/"):].rsplit("/", 1)[0] if key.startswith("optim/") else key
        placement = placements.get(name)
        if placement is None or placement.kind == "replicated" or t.ndim == 0:
            continue
        group, dim = ((groups.ep_group, 0) if placement.kind == "expert"
                      else (placement.tp_group, placement.shard_dim))
        if group is None or dist.get_world_size(group) == 1:
            continue
        if id(group) not in meshes:
            meshes[id(group)] = DeviceMesh.from_group(group, t.device.type)
        out[key] = DTensor.from_local(t, meshes[id(group)], [Shard(dim)], run_check=False)
    return out
