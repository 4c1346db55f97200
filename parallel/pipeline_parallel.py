"""Pipeline parallelism on ``torch.distributed.pipelining``: stages cut from the plain model, global names kept.

Split. The layers are cut into ``pp * virtual_stages`` contiguous stages. The rule is documented and balanced: it
minimises the largest stage cost, where a unit's cost is the parameters it uses per token (a FLOP proxy). So a
dense layer costs its attention + FFN, an MoE layer its attention + router + shared experts + ``top_k`` routed
experts. The embedding (first stage) and the LM head (last stage) each cost ``dim * vocab``. An explicit list
(``layers_per_stage``, e.g. ``[3, 4, 4, 4]``) overrides the rule.

Placement of stages on pipeline ranks (``stage_ids``): ``1f1b`` one stage per rank (stage r on rank r);
``interleaved_1f1b`` ``v`` stages per rank, looped (stage s on rank s % pp); ``zbv`` and ``dualpipev`` two
stages per rank in a V (rank r holds stages r and 2*pp - 1 - r, so the first and last stage share rank 0).

Stage modules. Each is a deep copy of the plain ``models.Transformer`` (build it on ``meta``) pruned to its
layers (``prune_to_stage``): parameter and checkpoint names stay global (``layers.7.…``), so checkpoints are
layout-free. The schedule runs ``data.grad_accum`` micro batches per step; the loss (mean cross entropy per
micro batch) lives on the last stage, and gradients are averaged over micro batches (``scale_grads``), which
is the same gradient as one process averaging the micro batches' losses.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

SCHEDULES = ("1f1b", "interleaved_1f1b", "zbv", "dualpipev")
V_SHAPED = ("zbv", "dualpipev")


def unit_costs(cfg) -> tuple[float, list[float], float]:
    """(embedding cost, cost of each layer, head cost) in parameters used per token."""
    d = cfg.dim
    if cfg.attn_type == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = (d * cfg.q_lora_rank + cfg.q_lora_rank * cfg.n_heads * qk) if cfg.q_lora_rank else d * cfg.n_heads * qk
        kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * cfg.n_heads * (
            cfg.qk_nope_head_dim + cfg.v_head_dim)
        attn = q + kv + cfg.n_heads * cfg.v_head_dim * d
    else:
        hd = d // cfg.n_heads
        attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    dense = 3 * d * cfg.inter_dim
    moe = d * cfg.n_routed_experts + 3 * d * cfg.moe_inter_dim * (cfg.n_activated_experts + cfg.n_shared_experts)
    layers = [attn + (dense if i < cfg.first_k_dense else moe) for i in range(cfg.n_layers)]
    return float(d * cfg.vocab_size), [float(c) for c in layers], float(d * cfg.vocab_size)


def balanced_split(embed: float, layers: list[float], head: float, n_stages: int) -> list[list[int]]:
    """Contiguous layer ranges, one per stage, minimising the largest stage cost (embedding on the first stage,
    head on the last); every stage gets at least one layer."""
    L = len(layers)
    if not 1 <= n_stages <= L:
        raise ValueError(f"pipeline: {n_stages} stages need between 1 and n_layers ({L}) stages")
    prefix = [0.0]
    for c in layers:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, s: int) -> float:  # layers [a, b) on stage s
        return prefix[b] - prefix[a] + (embed if s == 0 else 0.0) + (head if s == n_stages - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n_stages + 1)]  # best[s][b]: first s stages hold layers [0, b)
    cut = [[0] * (L + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for b in range(s, L - (n_stages - s) + 1):
            for a in range(s - 1, b):
                value = max(best[s - 1][a], cost(a, b, s - 1))
                if value < best[s][b]:
                    best[s][b], cut[s][b] = value, a
    bounds, b = [], L
    for s in range(n_stages, 0, -1):
        bounds.append((cut[s][b], b))
        b = cut[s][b]
    return [list(range(a, b)) for a, b in reversed(bounds)]


def split_layers(cfg, n_stages: int, layers_per_stage: list[int] | None = None) -> list[list[int]]:
    if layers_per_stage:
        if len(layers_per_stage) != n_stages or any(n < 1 for n in layers_per_stage) or \
                sum(layers_per_stage) != cfg.n_layers:
            raise ValueError(f"parallel.pp_layers {list(layers_per_stage)} must list {n_stages} positive layer counts "
                             f"(one per stage, pp * pp_virtual_stages) that sum to model.n_layers ({cfg.n_layers})")
        starts = [sum(layers_per_stage[:s]) for s in range(n_stages)]
        return [list(range(a, a + n)) for a, n in zip(starts, layers_per_stage)]
    return balanced_split(*unit_costs(cfg), n_stages)


def stage_ids(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Stage indices held by ``pp_rank`` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: use one of {list(SCHEDULES)}")
    if schedule == "1f1b":
        if virtual != 1:
            raise ValueError("pipeline schedule 1f1b runs one stage per rank: use interleaved_1f1b for "
                             f"pp_virtual_stages={virtual}")
        return [pp_rank]
    if schedule in V_SHAPED:
        if virtual != 2:
            raise ValueError(f"pipeline schedule {schedule} places exactly 2 stages per rank (a V): set "
                             f"pp_virtual_stages=2, got {virtual}")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(virtual)]


def prune_to_stage(model: nn.Module, layers: list[int], first: bool, last: bool) -> nn.Module:
    """Delete, in place, every layer not in ``layers``, and the embedding / final norm and head unless this is the
    first / last stage. Names of what is left are unchanged."""
    keep = {str(i) for i in layers}
    for key in [k for k in model.layers.keys() if k not in keep]:
        del model.layers[key]
    if not first:
        model.embed_tokens = None
    if not last:
        model.norm, model.lm_head = None, None
    return model


@dataclass
class Pipeline:
    schedule: Any  # a torch.distributed.pipelining schedule: step(inputs, target=..., losses=[...])
    modules: list[nn.Module]  # this rank's stage modules, in stage order
    stages: list[int]  # their stage indices
    n_stages: int

    @property
    def has_first(self) -> bool:
        return 0 in self.stages

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stages


def build_pipeline(model: nn.Module, pp_rank: int, pp: int, pp_group: Any, device: torch.device,
                   n_microbatches: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   schedule: str = "1f1b", virtual: int = 1, layers_per_stage: list[int] | None = None,
                   prepare: Callable[[nn.Module], None] | None = None) -> Pipeline:
    """This rank's stages of ``model`` (not modified; build it on meta and pass ``prepare`` to allocate and
    initialise each pruned stage, e.g. with ``parallel.init.init_sharded``) and the schedule that runs them."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as pps

    n_stages = pp * virtual
    ranges = split_layers(model.cfg, n_stages, layers_per_stage)
    ids = stage_ids(pp_rank, pp, virtual, schedule)
    modules, stages = [], []
    for s in ids:
        module = prune_to_stage(copy.deepcopy(model), ranges[s], first=s == 0, last=s == n_stages - 1)
        if prepare is not None:
            prepare(module)
        modules.append(module)
        stages.append(PipelineStage(module, s, n_stages, device, group=pp_group))
    if schedule == "1f1b":
        sched = pps.Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn)
    else:
        cls = {"interleaved_1f1b": pps.ScheduleInterleaved1F1B, "zbv": pps.ScheduleZBVZeroBubble,
               "dualpipev": pps.ScheduleDualPipeV}[schedule]
        sched = cls(stages, n_microbatches, loss_fn=loss_fn)
    return Pipeline(sched, modules, ids, n_stages)


__all__ = ["SCHEDULES", "Pipeline", "balanced_split", "build_pipeline", "prune_to_stage", "split_layers",
           "stage_ids", "unit_costs"]
