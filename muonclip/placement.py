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
      of the same experts live on the ranks of the expert-data-parallel group. ``tp_copies``: the same stack is
      on every rank of the TP group (tensor parallelism without sequence parallelism: TP peers route the same
      tokens), so one tp rank orthogonalises it and the grad norm counts it on tp rank 0; False when the expert
      groups are folded over the TP ranks (parallel/dims.py): TP peers hold other experts or other tokens'
      gradients, each stack is orthogonalised and counted on its owner alone.
    """

    kind: str = "replicated"
    shard_dim: Optional[int] = None
    tp_group: Any = None
    tp_copies: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("replicated", "tp_sharded", "expert"):
            raise ValueError(f"unknown placement kind {self.kind!r}")
        if self.kind == "tp_sharded" and (self.shard_dim is None or self.tp_group is None):
            raise ValueError("tp_sharded placement needs shard_dim and tp_group")


REPLICATED = Placement()
