"""Pipeline parallelism on ``torch.distributed.pipelining``: stages cut from the plain model, global names kept.

Split. The layers are cut into ``pp * virtual_stages`` contiguous stages. The rule is documented and balanced: it
minimises the largest stage cost, where a unit's cost is the parameters it uses per token (a FLOP proxy), and
among those splits the sum of squared stage costs. So a
dense layer costs its attention + FFN, an MoE layer its attention + router + shared experts + ``top_k`` routed
experts. The embedding (first stage) and the LM head (last stage) each cost ``dim * vocab``. An explicit list
(``layers_per_stage``, e.g. ``[3, 4, 4, 4]``) overrides the rule.

Placement of stages on pipeline ranks (``stage_ids``): ``1f1b`` one stage per rank (stage r on rank r);
``interleaved_1f1b`` ``v`` stages per rank, looped (stage s on rank s % pp); ``zbv`` and ``dualpipev`` two
stages per rank in a V (rank r holds stages r and 2*pp - 1 - r, so the first and last stage share rank 0).

Stage modules. A rank holds ONE copy of the plain ``models.Transformer`` (build it on ``meta``) pruned to the
union of its stages' layers (``prune_to_stage``; the embedding if it holds the first stage, norm + head if the
last): parameter and checkpoint names stay global (``layers.7.…``), so checkpoints are layout-free, and the
trainer treats it like the whole model (its parameters, QK-Clip specs, routers, state dict). Each stage is a
``stage_view`` of it that runs some of those layers and shares their modules.

The schedule runs the step's ``data.grad_accum`` micro batches in one pass (one fill and drain per step), on
torch's stages and schedules changed so that its receive buffers and sends are held only while their micro batch
needs them (parallel/pipeline_runtime.py): memory follows the micro batches in flight, not the step's count. The
loss (mean cross entropy per micro batch) lives on the last stage, and gradients are averaged over micro batches
(``scale_grads``), which is the same gradient as one process averaging the micro batches' losses.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
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
    head on the last), then, among the splits that reach it, the sum of squared stage costs, so the other stages
    are as even as that bound allows (parameters, hence memory, spread too); every stage gets at least one
    layer."""
    L = len(layers)
    if not 1 <= n_stages <= L:
        raise ValueError(f"pipeline: {n_stages} stages need between 1 and n_layers ({L}) stages")
    prefix = [0.0]
    for c in layers:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, s: int) -> float:  # layers [a, b) on stage s
        return prefix[b] - prefix[a] + (embed if s == 0 else 0.0) + (head if s == n_stages - 1 else 0.0)

    def solve(score, limit: float) -> tuple[float, list[tuple[int, int]]]:
        """DP over (stages, layers): combine prefix values with ``score``; stages costlier than ``limit`` excluded."""
        inf = float("inf")
        best = [[inf] * (L + 1) for _ in range(n_stages + 1)]  # best[s][b]: first s stages hold layers [0, b)
        cut = [[0] * (L + 1) for _ in range(n_stages + 1)]
        best[0][0] = 0.0
        for s in range(1, n_stages + 1):
            for b in range(s, L - (n_stages - s) + 1):
                for a in range(s - 1, b):
                    c = cost(a, b, s - 1)
                    if c > limit:
                        continue
                    value = score(best[s - 1][a], c)
                    if value < best[s][b]:
                        best[s][b], cut[s][b] = value, a
        bounds, b = [], L
        for s in range(n_stages, 0, -1):
            bounds.append((cut[s][b], b))
            b = cut[s][b]
        return best[n_stages][L], bounds

    largest, _ = solve(max, float("inf"))
    _, bounds = solve(lambda acc, c: acc + c * c, largest * (1 + 1e-9))  # the others as even as the bound allows
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


def stage_view(holder: nn.Module, layers: list[int], first: bool, last: bool) -> nn.Module:
    """A module that runs ``layers`` of ``holder`` (and its embedding / head when ``first`` / ``last``), sharing
    every submodule and parameter with it."""
    from models.transformer import LayerStack

    view = copy.copy(holder)
    view._modules, view._parameters, view._buffers = (dict(holder._modules), dict(holder._parameters),
                                                      dict(holder._buffers))
    view.layers = LayerStack({str(i): holder.layers[i] for i in layers})
    if not first:
        view.embed_tokens = None
    if not last:
        view.norm, view.lm_head = None, None
    return view


@dataclass(frozen=True)
class StagePlan:
    ranges: list[list[int]]  # layers of every stage
    stages: list[int]  # this rank's stage indices
    n_stages: int
    owners: list[int]  # pipeline rank of every stage

    @property
    def has_first(self) -> bool:
        return 0 in self.stages

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stages

    @property
    def layers(self) -> list[int]:
        return sorted(i for s in self.stages for i in self.ranges[s])


def plan_stages(cfg, pp_rank: int, pp: int, virtual: int = 1, schedule: str = "1f1b",
                layers_per_stage: list[int] | None = None) -> StagePlan:
    n_stages = pp * virtual
    return StagePlan(split_layers(cfg, n_stages, layers_per_stage), stage_ids(pp_rank, pp, virtual, schedule),
                     n_stages, stage_owners(pp, virtual, schedule))


def stage_owners(pp: int, virtual: int, schedule: str) -> list[int]:
    """The pipeline rank holding each stage (the inverse of ``stage_ids``)."""
    owners = [0] * (pp * virtual)
    for r in range(pp):
        for s in stage_ids(r, pp, virtual, schedule):
            owners[s] = r
    return owners


@dataclass
class Pipeline:
    schedule: Any  # a torch.distributed.pipelining schedule: step(inputs, target=..., losses=[...])
    modules: list[nn.Module]  # this rank's stage views, in stage order (plan.stages)
    plan: StagePlan
    holder: nn.Module  # the pruned model the views share
    group: Any  # the pipeline group
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the last stage's output, targets -> loss
    dtype: torch.dtype = torch.float32  # the hidden states stages send (the precision policy's activation dtype)
    torch_stages: list = field(default_factory=list)  # this rank's BoundedStage objects (torch stages), in stage order
    micro_shape: tuple[int, ...] | None = None  # pipeline_schedule's micro_batch: what a middle stage receives

    def report_progress(self, progress: Callable[[], None]) -> None:
        """Call ``progress`` after each of this rank's pipeline actions (a chunk's forward, backward or weight
        gradient): a step of many micro batches then shows the rank watchdog it is moving (launch/watchdog.py)
        however long the whole ``schedule.step`` takes."""
        for stage in self.torch_stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                action = getattr(stage, name, None)
                if action is not None:
                    setattr(stage, name, _then(action, progress))

    def collect_weight_grads(self, collect: Callable[[list[nn.Parameter]], ContextManager]) -> None:
        """Run each weight-gradient action of the zero-bubble schedules (zbv, dualpipev) inside ``collect(that
        stage's parameters)``: torch's ``stage_backward_weight`` sets or adds ``.grad`` by hand (no
        post-accumulate-grad hook), which an optimizer that accumulates in float32 buffers must take in itself
        (``DistributedMuonClip.grads_added_by_hand``): a bf16 ``.grad`` would otherwise sum the micro batches in
        bf16. The other schedules have no such action (their backward accumulates through autograd's hooks)."""
        for stage in self.torch_stages:
            params = list(stage.submod.parameters())
            stage.backward_weight_one_chunk = _inside(stage.backward_weight_one_chunk, lambda p=params: collect(p))

    @property
    def stages(self) -> list[int]:
        return self.plan.stages

    @property
    def n_stages(self) -> int:
        return self.plan.n_stages

    @property
    def owners(self) -> list[int]:
        return self.plan.owners

    @property
    def has_first(self) -> bool:
        return self.plan.has_first

    @property
    def has_last(self) -> bool:
        return self.plan.has_last

    @torch.no_grad()
    def forward_losses(self, n: int, inputs: list[torch.Tensor] | None, targets: list[torch.Tensor] | None,
                       device: torch.device, segments: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Forward only (validation), any schedule, pipelined: each of this rank's stages runs the ``n`` micro
        batches in turn (stage-major), receiving each input from the previous stage's rank and sending each output
        on asynchronously, so the next stage starts on micro batch 0 while this one computes micro batch 1 (before,
        a micro batch went through every stage before the next began). ``inputs`` (first stage) and ``targets``
        (last stage) are the rank's micro batches, None where it holds neither; ``segments`` (document masking):
        every stage's. The sum of the losses on the rank
        holding the last stage (0 elsewhere). Independent of the schedules' own ``eval`` (zbv's fails in torch
        2.13)."""
        me = dist.get_rank(self.group)
        module = dict(zip(self.stages, self.modules))
        shape = (inputs or targets)[0].shape if (inputs or targets) else self.micro_shape
        if shape is None:
            raise ValueError("Pipeline.forward_losses: a middle stage needs micro_shape "
                             "(pipeline_schedule's micro_batch)")
        shape = (shape[0], self.micro_shape[-1]) if self.micro_shape else shape  # the hidden states' length
        total = torch.zeros((), device=device)
        sends, local = [], []
        for s in self.stages:
            outputs = []
            for i in range(n):
                if s == 0:
                    h = inputs[i]
                elif self.owners[s - 1] != me:
                    h = torch.empty(*shape, self.holder.cfg.dim, dtype=self.dtype, device=device)
                    dist.recv(h, src=dist.get_global_rank(self.group, self.owners[s - 1]), group=self.group)
                else:
                    h = local[i]  # the previous stage is this rank's too
                h = module[s](h) if segments is None else module[s](h, segments=segments[i])
                if s == self.n_stages - 1:
                    total += self.loss_fn(h, targets[i])
                elif self.owners[s + 1] != me:
                    h = h.to(self.dtype).contiguous()
                    sends.append((h, dist.isend(h, dst=dist.get_global_rank(self.group, self.owners[s + 1]),
                                                group=self.group)))
                else:
                    outputs.append(h)
            local = outputs
        for _, work in sends:
            work.wait()
        return total


def build_pipeline(model: nn.Module, pp_rank: int, pp: int, pp_group: Any, device: torch.device,
                   n_microbatches: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   schedule: str = "1f1b", virtual: int = 1, layers_per_stage: list[int] | None = None,
                   prepare: Callable[[nn.Module], None] | None = None) -> Pipeline:
    """This rank's stages of ``model`` (not modified; build it on meta and pass ``prepare`` to allocate and
    initialise the pruned holder, e.g. with ``parallel.init.init_sharded``) and the schedule that runs them."""
    plan = plan_stages(model.cfg, pp_rank, pp, virtual, schedule, layers_per_stage)
    holder = prune_to_stage(copy.deepcopy(model), plan.layers, first=plan.has_first, last=plan.has_last)
    if prepare is not None:
        prepare(holder)
    return pipeline_schedule(holder, plan, pp_group, device, n_microbatches, loss_fn, schedule)


def pipeline_schedule(holder: nn.Module, plan: StagePlan, pp_group: Any, device: torch.device,
                      n_microbatches: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                      schedule: str = "1f1b", micro_batch: tuple[int, int] | None = None,
                      dtype: torch.dtype = torch.float32, scale_grads: bool = True) -> Pipeline:
    """The stage views of a prepared (pruned, parallelized, initialised) ``holder`` and their schedule.

    ``loss_fn`` None (the trainer's): the last stage ends at the final norm and the schedule's loss is the
    model's ``head_loss`` (the LM head and cross entropy, chunked with ``model.loss_chunk_tokens``: the logits
    never leave it); otherwise the last stage returns logits and ``loss_fn(logits, targets)`` is the loss.
    ``micro_batch`` = (micro batch size, sequence length[, the hidden states' length: 1/tp of it under sequence
    parallelism]) declares every stage's input and output shapes
    (tokens, hidden states in ``dtype``: bf16 with bf16 parameters; the last stage's normed hidden states or
    logits). Without it torch infers them by running each stage once on the first micro batch, or on
    uninitialised memory for later stages, which would leak into the per-step statistics the model records
    (max logits that QK-Clip acts on, router loads), so the trainer always passes it. ``scale_grads=False``: the
    stages' gradients stay the SUM over micro batches (torch divides them in place after the last backward
    otherwise; an optimizer that starts reducing them from backward divides them itself)."""
    from torch.distributed.pipelining import schedules as pps

    from parallel.pipeline_runtime import RUNTIME_SCHEDULES, BoundedStage, bound_sends, lowering

    head_in_loss = loss_fn is None
    if head_in_loss:
        loss_fn = holder.head_loss
    modules, stages = [], []
    for s in plan.stages:
        first, last = s == 0, s == plan.n_stages - 1
        module = stage_view(holder, plan.ranges[s], first=first, last=last)
        module.head_in_loss = last and head_in_loss
        modules.append(module)
        shapes = {}
        if micro_batch is not None:
            B, T, *parts = micro_batch  # (B, ids' length[, hidden states' length: sequence parallelism's 1/tp])
            t = parts[0] if parts else T
            hidden = torch.empty(B, t, holder.cfg.dim, dtype=dtype, device="meta")
            received = hidden.clone().requires_grad_()  # so the stage computes the gradient it sends back
            if head_in_loss:  # the final norm's output: the narrower of the stream's and the norm weight's dtypes
                normed = min(dtype, holder.norm.weight.dtype if last else dtype, key=lambda t: t.itemsize)
                out = torch.empty(B, t, holder.cfg.dim, dtype=normed, device="meta")
            else:
                out = torch.empty(B, T, holder.cfg.vocab_size, dtype=torch.float32, device="meta")
            shapes = dict(input_args=torch.empty(B, T, dtype=torch.long, device="meta") if first else received,
                          output_args=out if last else hidden,
                          input_grads=(None,) if first else (hidden,),  # tokens get no gradient
                          output_grads=(None,) if last else (hidden,))  # the loss starts the backward
        stages.append(BoundedStage(module, s, plan.n_stages, device, group=pp_group, **shapes))
    if schedule == "1f1b":
        sched = pps.Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    else:
        with lowering():  # torch's lowering in linear time (its own is quadratic: ~11 s a process at 1,024)
            sched = RUNTIME_SCHEDULES[schedule](stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        bound_sends(sched, stages)
    return Pipeline(sched, modules, plan, holder, pp_group, loss_fn, dtype, stages, micro_batch)


def _inside(action: Callable, context: Callable[[], ContextManager]) -> Callable:
    def run(*args, **kwargs):
        with context():
            return action(*args, **kwargs)
    return run


def _then(action: Callable, after: Callable[[], None]) -> Callable:
    def run(*args, **kwargs):
        out = action(*args, **kwargs)
        after()
        return out
    return run


__all__ = ["SCHEDULES", "Pipeline", "StagePlan", "balanced_split", "build_pipeline", "pipeline_schedule",
           "plan_stages", "prune_to_stage", "split_layers", "stage_ids", "stage_owners", "stage_view",
           "unit_costs"]
