"""Parallel layout: a validated ``ParallelDims`` and the process groups it builds (``ParallelGroups``).

Axes (world_size == pp * dp * cp * tp):

- ``pp`` (pipeline parallel): outermost. Pipeline index ``p`` holds stages of the model
  (parallel/pipeline_parallel.py); ``rank = p * dp * cp * tp + replica_index * tp + tp_index``. A ``pp_group``
  is the ranks with the same (replica, tp) index (activations go along it); a ``stage_group`` the dp * cp * tp
  ranks of one pipeline index (the same parameters: ZeRO-1's structure check, the grad norm before it is summed
  over ``pp_group``). Every group below lives inside one pipeline index.

- ``tp`` (tensor parallel): ranks that split attention heads and dense/shared FFN columns/rows of ONE copy of
  the model and see the SAME tokens. Innermost axis: ``rank = replica_index * tp + tp_index``, so a TP group is
  ``tp`` consecutive ranks (keep it inside a node).
- ``dp`` (data parallel) x ``cp`` (context parallel): the replica axis of ``dp * cp`` indices, ranks with the same
  ``tp_index``; replica index ``r = data_index * cp + cp_index``. Ranks with the same data index (``cp``
  consecutive replica indices, a ``cp_group``) read the same batch and each takes ``seq_len / cp`` of its tokens
  (parallel/context_parallel.py); every replica sees different tokens, so ``dp_group`` is the whole replica axis
  (``dp_size`` = dp * cp): it reduces gradients of non-expert parameters (and the losses, QK-Clip's max logits,
  the routers' loads) and is the ZeRO-1 sharding group.
- ``sp`` (sequence parallelism, parallel/sequence_parallel.py): the ranks of a TP group also split each sequence
  (of the CP chunk) outside the TP regions; no group of its own. Every rank of a stage then routes tokens no other
  rank routes, so the experts are folded over all of them (below).
- ``ep`` (expert parallel): each rank of an ``ep_group`` holds ``n_routed_experts // ep`` experts and exchanges
  tokens with the others (all-to-all); ``edp`` (expert data parallel): the ranks holding the same experts (their
  replicas); expert gradients are reduced over ``edp_group``. Two layouts:
  - folded (Megatron's MoE parallel folding; with ``sp``, and whenever ``tp == 1``): the expert groups cut the
    stage's ``dp * cp * tp`` ranks, rank within the stage ``s = replica_index * tp + tp_index``, into
    ``etp_index = s % etp``, ``ep_index = (s // etp) % ep`` and ``edp_index = s // (etp * ep)`` (Megatron's
    ``tp-cp-ep-dp-pp`` order with etp as the experts' "tp"): an ``etp_group`` is ``etp`` consecutive ranks, an
    ``ep_group`` the ranks with the same etp and edp index (``ep`` consecutive ranks at etp 1: it may span TP
    ranks: at tp2 + SP, ep2 it is the TP pair), ``etp * ep`` divides ``dp * cp * tp``. At tp 1 and etp 1 these are
    the replica-axis blocks below.
  - ``etp`` (expert tensor parallelism, folded layout only): the ranks of an ``etp_group`` hold column slices of
    each expert's gate/up and row slices of its down projection (parallel/expert_parallel.py); they route
    different tokens and gather each other's rows into the expert GEMMs. At tp 1 they are data ranks.
  - legacy (tp > 1 without ``sp``: TP peers route the same tokens, their experts are copies): EP BORROWS from the
    replica axis (``ep`` divides ``dp * cp``), cut into ``dp * cp // ep`` blocks of ``ep`` consecutive replica
    indices at one tp index; ``edp_group``: the same tp index and ``ep_rank`` in different blocks.

The loader's data rank is the data index (``data_rank``/``data_size``: dp_rank // cp and dp): the ranks of one
TP group and of one CP group read the same batch. No module-level globals: build once, pass the object
explicitly.
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
    pp: int = 1
    cp: int = 1
    sp: bool = False  # sequence parallelism: TP ranks split each sequence outside the TP regions
    etp: int = 1  # expert tensor parallelism: ranks that split each routed expert's matrices (folded layout)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "ep", "pp", "cp", "etp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel dims: {name} must be an integer >= 1, got {value!r}")
        if self.sp and self.tp == 1:
            raise ValueError("parallel dims: sp (sequence parallelism) splits sequences over the tensor-parallel "
                             "ranks: it needs tp > 1")
        if self.etp > 1 and not self.folded:
            raise ValueError(f"parallel dims: etp ({self.etp}) > 1 with tp ({self.tp}) > 1 needs sp (sequence "
                             f"parallelism): expert tensor parallelism splits the experts over ranks that route "
                             f"different tokens")
        if self.etp > 1 and self.folded and self.expert_ranks % (self.ep * self.etp) != 0:
            n = self.expert_ranks
            raise ValueError(f"parallel dims: etp * ep ({self.etp} * {self.ep}) must divide dp * cp * tp ({n}): the "
                             f"expert groups are folded over the ranks of a pipeline stage")
        if self.sp and self.expert_ranks % self.ep != 0:
            n = self.expert_ranks
            raise ValueError(
                f"parallel dims: ep ({self.ep}) must divide dp * cp * tp ({n}) - the expert groups are folded over the "
                f"ranks of a pipeline stage (sequence parallelism: each routes its own tokens); choose ep in "
                f"{[d for d in range(1, n + 1) if n % d == 0]} or raise dp")
        if self.expert_ranks % self.ep != 0:
            raise ValueError(
                f"parallel dims: ep ({self.ep}) must divide dp * cp ({self.replicas}) - expert parallelism borrows "
                f"ranks from the data/context-parallel axis (ranks of an EP group see different tokens); choose ep "
                f"in {[d for d in range(1, self.replicas + 1) if self.replicas % d == 0]} or raise dp")

    @property
    def replicas(self) -> int:
        """Ranks with different tokens and the same parameters (of one tp index and pipeline index)."""
        return self.dp * self.cp

    @property
    def world_size(self) -> int:
        return self.pp * self.replicas * self.tp

    @property
    def folded(self) -> bool:
        """Whether the expert groups are folded over the stage's ranks (see the module docstring): with sequence
        parallelism, and at tp 1 (where both layouts agree)."""
        return self.sp or self.tp == 1

    @property
    def expert_ranks(self) -> int:
        """The ranks of one tp index (legacy) or of the stage (folded) that the ep x edp expert groups cut."""
        return self.replicas * self.tp if self.folded else self.replicas

    @property
    def edp(self) -> int:
        return self.expert_ranks // (self.ep * self.etp)

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            other = self.pp * self.tp * self.cp
            raise ValueError(
                f"parallel dims: world size {world_size} != pp*dp*cp*tp = {self.pp}*{self.dp}*{self.cp}*{self.tp} = "
                f"{self.world_size}; set dp = world_size / (pp * cp * tp) (e.g. "
                f"dp={world_size // other if world_size % other == 0 else '?'}) or launch {self.world_size} processes")

    def check_model(self, model_cfg: Any) -> None:
        """Divisibility the model must satisfy for this layout (``model_cfg``: a ``models.ModelConfig``)."""
        errors = []
        tp = self.tp
        if model_cfg.n_heads % (tp * self.cp):
            errors.append(f"n_heads ({model_cfg.n_heads}) must be divisible by tp * cp ({tp} * {self.cp}): context "
                          f"parallelism gives each rank of a tensor-parallel group's heads 1/cp of them")
        if model_cfg.attn_type == "mha" and model_cfg.n_kv_heads % tp:
            errors.append(f"n_kv_heads ({model_cfg.n_kv_heads}) must be divisible by tp ({tp}) "
                          f"(KV-head replication is not supported)")
        if model_cfg.vocab_size % tp:
            errors.append(f"vocab_size ({model_cfg.vocab_size}) must be divisible by tp ({tp}): the embedding and the "
                          f"head split their rows over the tensor-parallel ranks")
        if model_cfg.first_k_dense > 0 and model_cfg.inter_dim % tp:
            errors.append(f"inter_dim ({model_cfg.inter_dim}) must be divisible by tp ({tp})")
        has_moe = model_cfg.first_k_dense < model_cfg.n_layers
        if has_moe:
            shared = model_cfg.moe_inter_dim * model_cfg.n_shared_experts
            if shared and shared % tp:
                errors.append(f"moe_inter_dim*n_shared_experts ({shared}) must be divisible by tp ({tp})")
            if model_cfg.n_routed_experts % self.ep:
                errors.append(f"n_routed_experts ({model_cfg.n_routed_experts}) must be divisible by ep ({self.ep})")
            if model_cfg.moe_inter_dim % self.etp:
                errors.append(f"moe_inter_dim ({model_cfg.moe_inter_dim}) must be divisible by etp ({self.etp}): expert "
                              f"tensor parallelism splits each routed expert's columns")
        if errors:
            raise ValueError("parallel dims vs model config: " + "; ".join(errors)
                             + f" (dp={self.dp}, tp={self.tp}, ep={self.ep}, etp={self.etp}, cp={self.cp}): change "
                               f"tp/ep/etp/cp or the model sizes")

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Global ranks of every group of each kind, in creation order (pure; used by ``build`` and tests)."""
        dp, tp, ep, pp, cp = self.replicas, self.tp, self.ep, self.pp, self.cp  # dp: the replica axis

        def rank(d: int, t: int, p: int = 0) -> int:
            return p * dp * tp + d * tp + t

        out = {
            "tp": [[rank(d, t, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
            "dp": [[rank(d, t, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        }
        if self.folded:  # rank within the stage s = d * tp + t = (edp * ep + ep index) * etp + etp index
            etp = self.etp
            blocks = dp * tp // (ep * etp)

            def fold(p: int, b: int, e: int, k: int) -> int:
                return p * dp * tp + (b * ep + e) * etp + k
            out["ep"] = [[fold(p, b, e, k) for e in range(ep)] for p in range(pp) for b in range(blocks)
                         for k in range(etp)]
            out["edp"] = [[fold(p, b, e, k) for b in range(blocks)] for p in range(pp) for e in range(ep)
                          for k in range(etp)]
            if etp > 1:
                out["etp"] = [[fold(p, b, e, k) for k in range(etp)] for p in range(pp) for b in range(blocks)
                              for e in range(ep)]
        else:
            out["ep"] = [[rank(b * ep + e, t, p) for e in range(ep)] for p in range(pp) for t in range(tp)
                         for b in range(dp // ep)]
            out["edp"] = [[rank(b * ep + e, t, p) for b in range(dp // ep)] for p in range(pp) for t in range(tp)
                          for e in range(ep)]
        if cp > 1:
            out["cp"] = [[rank(b * cp + c, t, p) for c in range(cp)] for p in range(pp) for t in range(tp)
                         for b in range(dp // cp)]
        if pp > 1:
            out["pp"] = [[rank(d, t, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
            out["stage"] = [[rank(d, t, p) for d in range(dp) for t in range(tp)] for p in range(pp)]
        return out

    def build(self, device_type: str = "cpu") -> "ParallelGroups":
        """Create every group (collective: all ranks call this with the same dims) and return this rank's view.

        Without an initialised default process group only ``world_size == 1`` is allowed; groups are then None
        (every size is 1 and the parallelize step applies nothing).
        """
        if not dist.is_initialized():
            self.check_world(1)
            return ParallelGroups(self, device_type, 0, None, 0, None, 0, None, 0, None, 0, None, 0, None, None, 0,
                                  None, 0)
        self.check_world(dist.get_world_size())
        me = dist.get_rank()
        mine = {}
        for kind, lists in self.group_ranks().items():  # same order on every rank
            for ranks in lists:
                group = dist.new_group(ranks)
                if me in ranks:
                    mine[kind] = (group, ranks.index(me))
        pp, stage, cp = mine.get("pp", (None, 0)), mine.get("stage", (None, 0)), mine.get("cp", (None, 0))
        etp = mine.get("etp", (None, 0))
        return ParallelGroups(self, device_type, me, *mine["dp"], *mine["tp"], *mine["ep"], *mine["edp"], *pp,
                              stage[0], *cp, *etp)


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
    pp_group: Optional[Any] = None  # None when pp == 1
    pp_rank: int = 0
    stage_group: Optional[Any] = None  # the dp x tp ranks of this pipeline index; None = the world (pp == 1)
    cp_group: Optional[Any] = None  # None when cp == 1
    cp_rank: int = 0
    etp_group: Optional[Any] = None  # the expert-tensor-parallel peers (folded layout); None when etp == 1
    etp_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def dp_size(self) -> int:
        """Ranks of ``dp_group``: data x context parallel (the replicas of one parameter shard)."""
        return self.dims.replicas

    @property
    def cp_size(self) -> int:
        return self.dims.cp

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def ep_size(self) -> int:
        return self.dims.ep

    @property
    def etp_size(self) -> int:
        return self.dims.etp

    @property
    def edp_size(self) -> int:
        return self.dims.edp

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    @property
    def stage(self) -> Optional[Any]:
        """The dp x cp x tp ranks of this pipeline index as a group to reduce over (``stage_group``, the world when
        pp == 1, None in one process): every token of the stage's global batch is on one of them."""
        if self.stage_group is not None:
            return self.stage_group
        return dist.group.WORLD if self.world_size > 1 else None

    @property
    def data_rank(self) -> int:
        """Index among ranks that read different batches (TP and CP peers share it)."""
        return self.dp_rank // self.dims.cp

    @property
    def data_size(self) -> int:
        return self.dims.dp
