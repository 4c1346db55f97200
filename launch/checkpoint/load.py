"""Loading: clear errors about the directory, checksums verified on every rank, compatibility with this run's
model, then ``dcp.load`` in place and a finite check; nothing is modified before the checks pass."""
from __future__ import annotations

import io
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from launch.checkpoint import integrity
from launch.checkpoint.integrity import DamagedCheckpoint
from launch.checkpoint.paths import CHECKPOINT_SUBDIR
from launch.checkpoint.state import distributed, from_bytes, rank
from launch.errors import first_line
from models import ModelConfig


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
    world = dist.get_world_size() if distributed() else 1
    problem: str | None
    try:
        problem = integrity.verify_share(path, rank(), world)
    except (DamagedCheckpoint, OSError) as e:
        problem = str(e)
    problems = [problem]
    if distributed():
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    found = next((p for p in problems if p is not None), None)
    if found is not None:
        raise DamagedCheckpoint(found if found.startswith("checkpoint ") else f"checkpoint {path} is damaged ({found})")
    integrity.warn_if_unverified(path)


def _check_finite(path: Path, tensors: dict[str, Any]) -> None:
    """Collective: all ranks raise when any rank loaded NaN/inf (a checkpoint of a run that had diverged; saves
    refuse such state since the check was added there too)."""
    name = integrity.non_finite_on_any_rank(tensors)
    if name is not None:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged ({name}: non-finite values)")


def _load(path: Path, state: dict[str, Any]) -> None:
    try:
        dcp.load(state, storage_reader=FileSystemReader(path), no_dist=not distributed())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps per-rank failures (CheckpointException
        # derives from BaseException in torch 2.13); name the checkpoint
        cause = integrity.root_cause(e)
        raise DamagedCheckpoint(f"checkpoint {path} is damaged (loading failed: {type(cause).__name__}: "
                                f"{first_line(str(cause))})") from e


# what a sequence-length stage may change (no weight depends on it): the context length and RoPE scaling
CONTEXT_FIELDS = ("max_seq_len", "yarn_factor", "yarn_original_max_seq_len", "yarn_beta_fast", "yarn_beta_slow",
                  "yarn_mscale", "yarn_mscale_all_dim")


def _with_defaults(saved_model_cfg: dict | None) -> dict:
    """A saved model config; a field added after the checkpoint was written counts as its default (what that run
    used)."""
    return {**{f.name: f.default for f in fields(ModelConfig)}, **(saved_model_cfg or {})}


def context_changes(saved_model_cfg: dict | None, model_cfg: dict) -> list[str]:
    """The ``CONTEXT_FIELDS`` a resumed run changes, as "name old -> new" (empty: none)."""
    saved = _with_defaults(saved_model_cfg)
    return [f"{k} {saved[k]!r} -> {model_cfg[k]!r}" for k in CONTEXT_FIELDS if saved[k] != model_cfg[k]]


def check_compatible(path: Path, metadata: Any, tensors: dict[str, Any], saved_model_cfg: dict | None,
                     model_cfg: dict | None) -> None:
    """Raise ValueError naming ``path`` if the saved model config (but its ``CONTEXT_FIELDS``) or tensor shapes
    differ from ours."""
    if saved_model_cfg is not None and model_cfg is not None:
        saved = _with_defaults(saved_model_cfg)
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in model_cfg.items()
                if saved.get(k) != v and k not in CONTEXT_FIELDS]
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
        raise ValueError(f"checkpoint {path} has no 'meta' entry: not written by launch/checkpoint")
    holder = {"meta": io.BytesIO()}
    _load(path, holder)
    meta = from_bytes(holder["meta"])
    check_compatible(path, metadata, tensors, meta.get("config", {}).get("model"), model_cfg)
    extra_key = f"extra/rank{rank()}"
    if extra_key not in metadata.state_dict_metadata:
        extra_key = "extra/rank0"
    state = {**tensors, extra_key: io.BytesIO()}
    _load(path, state)
    _check_finite(path, tensors)
    return meta, from_bytes(state[extra_key])
