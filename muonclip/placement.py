"""How a parameter is laid out across ranks, as the distributed optimizer needs to know it.

Produced by the parallelize step (parallel/), consumed by ``muonclip.distributed``. Plain data, no logic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Placement:
    """``kind``:
    - "replicated": every rank of the data-parallel group holds the whole tensor.
    - "tp_sharded": each rank of ``tp_group`` holds a contiguous slice of the full matrix along ``shard_dim``
      (slices in tp-rank order); Muon must see the whole matrix (gather across ``tp_group``).
    - "expert": a stack of whole expert matrices [E_local, A, B] owned by this expert-parallel rank; replicas
      of the same experts live on the ranks of the expert-data-parallel group.
    """

    kind: str = "replicated"
    shard_dim: Optional[int] = None
    tp_group: Any = None

    def __post_init__(self) -> None:
        if self.kind not in ("replicated", "tp_sharded", "expert"):
            raise ValueError(f"unknown placement kind {self.kind!r}")
        if self.kind == "tp_sharded" and (self.shard_dim is None or self.tp_group is None):
            raise ValueError("tp_sharded placement needs shard_dim and tp_group")


REPLICATED = Placement()
