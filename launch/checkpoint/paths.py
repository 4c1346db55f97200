"""Names on disk: ``<output_dir>/checkpoints/step_XXXXXXXX/``, the ``latest`` pointer, and what a resume picks."""
from __future__ import annotations

import re
from pathlib import Path

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
