"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), single process or any number of ranks.

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/      .metadata, __<rank>_0.distcp, config.yaml (human-readable copy)
    step_00000200/
    latest              text file: name of the newest complete checkpoint

A checkpoint is written to ``step_XXXXXXXX.tmp`` and renamed when every rank has finished, so a directory
without ``.tmp`` is complete; ``latest`` is replaced atomically; only the last ``keep`` are kept.

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
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from launch.errors import first_line

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


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load ("assuming the intent is to ..."): expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


# ------------------------------------------------------------------------------------------------ save
def save_checkpoint(root: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any],
                    extra: dict[str, Any], keep: int = 3, config_text: str = "") -> Path:
    """Collective: every rank passes its tensors (model + owned optimizer state) and its ``extra``.

    Writes ``step_XXXXXXXX.tmp``, renames it when complete, points ``latest`` at it, prunes to ``keep``.
    """
    root, rank = Path(root), _rank()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted save
    _barrier()
    state = {**tensors, "meta": _to_bytes({**meta, "step": step}), f"extra/rank{rank}": _to_bytes(extra)}
    with _quiet_single_process():
        dcp.save(state, storage_writer=FileSystemWriter(tmp), no_dist=not _distributed())
    _barrier()
    if rank == 0:
        if config_text:
            (tmp / "config.yaml").write_text(config_text)
        _commit(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep, protect=final)
    _barrier()
    return final


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
        raise ValueError(f"checkpoint {path}: {path / '.metadata'} is unreadable (truncated or corrupt): "
                         f"{type(e).__name__}: {e}") from e


def _load(path: Path, state: dict[str, Any]) -> None:
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=FileSystemReader(path), no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps per-rank failures (CheckpointException
        # derives from BaseException in torch 2.13); name the checkpoint
        raise ValueError(f"checkpoint {path}: loading failed (damaged data files?): {type(e).__name__}: "
                         f"{first_line(str(e))}") from e


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


def load_checkpoint(path: str | Path, tensors: dict[str, Any], model_cfg: dict | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective: load ``tensors`` in place from ``path``; return (meta, this rank's extra).

    ``tensors`` must hold correctly shaped tensors (optimizer state created with ``opt.init_state()``).
    Raises FileNotFoundError/ValueError naming the path before anything is modified when the checkpoint is
    missing, incomplete, unreadable or incompatible. A rank without its own ``extra`` (more ranks than at
    save time) gets rank 0's.
    """
    path = Path(path)
    metadata = read_metadata(path)
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
