"""Parallel layout: a validated ``ParallelDims`` and the process groups it builds (``ParallelGroups``).

Axes (world_size == dp * tp):

- ``tp`` (tensor parallel): ranks that split attention heads and dense/shared FFN columns/rows of ONE copy of
  the model and see the SAME tokens. Innermost axis: ``rank = dp_index * tp + tp_index``, so a TP group is
  ``tp`` consecutive ranks (keep it inside a node).
- ``dp`` (data parallel): ranks with the same ``tp_index``; each sees different tokens. ``dp_group`` reduces
  gradients of non-expert parameters and is the ZeRO-1 sharding group.
- ``ep`` (expert parallel) BORROWS from dp (``ep`` divides ``dp``): the dp axis is cut into ``dp // ep`` blocks
  of ``ep`` consecutive dp indices; an ``ep_group`` is one block (same tp index). Each rank of an EP group
  holds ``n_routed_experts // ep`` experts and exchanges tokens with the others (all-to-all).
- ``edp`` (expert data parallel): ranks with the same tp index and the same ``ep_rank`` in different EP blocks,
  i.e. the replicas of the same experts (``dp // ep`` of them). Expert gradients are reduced over ``edp_group``.

The loader's data rank is the dp index (``data_rank``/``data_size`` == ``dp_rank``/``dp_size``): the ranks of
one TP group read the same batch. No module-level globals: build once, pass the object explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel dims: {name} must be an integer >= 1, got {value!r}")
        if self.dp % self.ep != 0:
            raise ValueError(
                f"parallel dims: ep ({self.ep}) must divide dp ({self.dp}) - expert parallelism borrows ranks from "
                f"the data-parallel axis (ranks of an EP group see different tokens); choose ep in "
                f"{[d for d in range(1, self.dp + 1) if self.dp % d == 0]} or raise dp")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(
                f"parallel dims: world size {world_size} != dp*tp = {self.dp}*{self.tp} = {self.world_size}; set "
                f"dp = world_size / tp (e.g. dp={world_size // self.tp if world_size % self.tp == 0 else '?'}) "
                f"or launch {self.world_size} processes")

    def check_model(self, model_cfg: Any) -> None:
        """Divisibility the model must satisfy for this layout (``model_cfg``: a ``models.ModelConfig``)."""
        errors = []
        tp = self.tp
        if model_cfg.n_heads % tp:
            errors.append(f"n_heads ({model_cfg.n_heads}) must be divisible by tp ({tp})")
        if model_cfg.attn_type == "mha" and model_cfg.n_kv_heads % tp:
            errors.append(f"n_kv_heads ({model_cfg.n_kv_heads}) must be divisible by tp ({tp}) "
                          f"(KV-head replication is not supported)")
        if model_cfg.first_k_dense > 0 and model_cfg.inter_dim % tp:
            errors.append(f"inter_dim ({model_cfg.inter_dim}) must be divisible by tp ({tp})")
        has_moe = model_cfg.first_k_dense < model_cfg.n_layers
        if has_moe:
            shared = model_cfg.moe_inter_dim * model_cfg.n_shared_experts
            if shared and shared % tp:
                errors.append(f"moe_inter_dim*n_shared_experts ({shared}) must be divisible by tp ({tp})")
            if model_cfg.n_routed_experts % self.ep:
                errors.append(f"n_routed_experts ({model_cfg.n_routed_experts}) must be divisible by ep ({self.ep})")
        if errors:
            raise ValueError("parallel dims vs model config: " + "; ".join(errors)
                             + f" (dp={self.dp}, tp={self.tp}, ep={self.ep}): change tp/ep or the model sizes")

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Global ranks of every group of each kind, in creation order (pure; used by ``build`` and tests)."""
        dp, tp, ep = self.dp, self.tp, self.ep

        def rank(d: int, t: int) -> int:
            return d * tp + t

        return {
            "tp": [[rank(d, t) for t in range(tp)] for d in range(dp)],
            "dp": [[rank(d, t) for d in range(dp)] for t in range(tp)],
            "ep": [[rank(b * ep + e, t) for e in range(ep)] for t in range(tp) for b in range(dp // ep)],
            "edp": [[rank(b * ep + e, t) for b in range(dp // ep)] for t in range(tp) for e in range(ep)],
        }

    def build(self, device_type: str = "cpu") -> "ParallelGroups":
        """Create every group (collective: all ranks call this with the same dims) and return this rank's view.

        Without an initialised default process group only ``world_size == 1`` is allowed; groups are then None
        (every size is 1 and the parallelize step applies nothing).
        """
        if not dist.is_initialized():
            self.check_world(1)
            return ParallelGroups(self, device_type, 0, None, 0, None, 0, None, 0, None, 0)
        self.check_world(dist.get_world_size())
        me = dist.get_rank()
        mine = {}
        for kind, lists in self.group_ranks().items():  # same order on every rank
            for ranks in lists:
                group = dist.new_group(ranks)
                if me in ranks:
                    mine[kind] = (group, ranks.index(me))
        return ParallelGroups(self, device_type, me, *mine["dp"], *mine["tp"], *mine["ep"], *mine["edp"])


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's groups and coordinates; produced by ``ParallelDims.build``. Sizes come from ``dims``."""

    dims: ParallelDims
    device_type: str
    rank: int
    dp_group: Optional[Any]
    dp_rank: int
    tp_group: Optional[Any]
    tp_rank: int
    ep_group: Optional[Any]
    ep_rank: int
    edp_group: Optional[Any]
    edp_rank: int

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def ep_size(self) -> int:
        return self.dims.ep

    @property
    def edp_size(self) -> int:
        return self.dims.edp

    @property
    def data_rank(self) -> int:
        """Index among ranks that read different batches (TP peers share it)."""
        return self.dp_rank

    @property
    def data_size(self) -> int:
        return self.dims.dp
