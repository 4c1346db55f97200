"""Memory and communication planner: what each rank of a layout holds and sends, without running it.

    python -m parallel.plan --config configs/kimi_k2.yaml --world 256
    python -m parallel.plan --config configs/tiny.yaml --world 4 --parallel.pp=2 --data.grad_accum=4 --all-ranks

For every rank (pipeline index p, data-parallel index d, tensor-parallel rank t) it builds the model on the meta
device exactly as the trainer does (this rank's stages, EP and TP applied, so shapes are the real local ones)
and the ZeRO-1 plan ``DistributedMuonClip`` would make (the same ``assign_owners`` / ``build_buckets``), then:

- parameters (in the precision policy's dtype: 2 bytes with ``train.param_dtype: bfloat16``, the router bias 4),
  gradients (float32, every trainable local tensor; with ZeRO-1 its persistent gradient buffers, one owner's
  params per bucket without padding, which the reduce and broadcast use in place, or a sliced bucket's segment
  per rank: ceil(rows/dp) rows of each tensor) and optimizer state of the parameters this rank owns (of a sliced
  AdamW tensor, its rows: the embedding's and the head's 1/dp): the float32 master of a bf16 parameter (4 bytes),
  Muon momentum (4) or AdamW's two moments (8) and step counter, on the device or, with ``optim.offload_state``, in
  host memory (all but the counters); host memory is counted as the offloaders' arenas allocate it
  (muonclip/host_arena.py: power-of-two chunks, sub-allocated), laid out as they will lay it out: the states in the
  order the optimizer makes them, the activations' host copies as the schedule's forwards take them and its
  backwards give them back; with
  ``train.ckpt_async`` also the buffer an asynchronous save stages the checkpoint in (launch/checkpoint/staging.py:
  every tensor this rank writes, kept from save to save);
- activations: the storages autograd keeps per micro batch, layer by layer, with recomputation, FP8 storage,
  activation offload (host) and the chunked loss acting on them as the mechanisms do (parallel/plan_activations.py,
  equal to the measured saved bytes), plus the pipeline's stage inputs, outputs and gradients as its runtime
  holds them (parallel/pipeline_runtime.py ``buffer_timeline``: a receive buffer from its receive to its use, a
  sent gradient until the peer has posted its receive) and the step's token ids and targets; their high point over
  the step follows this rank's actions in torch's own schedule (forwards add a micro batch of a stage, backwards
  free it), each action with what it holds while it runs (a layer's working set, FP8's quantisation copies,
  offload's blocks on the device, full recompute's rebuilt block, the loss's backward, the embedding's gradient);
  and the recomputation's extra forward FLOPs per step;
- each pipeline rank's idle share of its slots in torch's compute order for a pass (``idle_fraction``) and the
  modelled step time it gives (``format_pipeline``);
- the optimizer step's transients: ``DistributedMuonClip`` goes bucket by bucket, holding the bucket's owned
  momentum updates, then batching its matrices of one shape (the stack plus two Newton–Schulz iterates), then
  AdamW's denominator for one tensor (or its rows; the update goes into the spent gradient); ``MuonClip`` (one
  process) one matrix at a time, AdamW's denominator and update; with offloaded state, two groups' state on the
  device;
- a peak estimate: the larger of two phases: backward (parameters, optimizer state, all gradients, activations
  in flight; the gradient reductions run in place inside it) and the optimizer step (the gradients still held:
  the owned ones, or ZeRO-1's buffers, + its transients);
- per-step bytes sent by this rank, per collective: DP/EDP reduce (or all-reduce; in ``parallel.grad_reduce_dtype``)
  and broadcast (the parameters' dtype), a sliced bucket's reduce-scatter and all-gather, and the grad-norm
  all-reduce (exact: the counts ``CountingComm`` reports),
  the Newton–Schulz gathers/scatters over TP (exact), TP all-reduces of activations (4 per layer per micro batch,
  and the vocab-split embedding's output and head input's gradient), the vocab-parallel loss's all-reduces (exact),
  EP all-to-all (expected under uniform routing; under sequence parallelism each rank routes 1/tp of the tokens
  over its folded expert group), PP send/recv (activations forward, their gradients backward),
  activations in the policy's compute/activation dtype; sequence parallelism's collectives (``_sp_comm``) and the
  routers' all-reduces (``_router_comm``: the balance loss's counts, the step's expert loads);
- the largest matrix this rank orthogonalises (full shape, after the TP gather).
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel.precision import LOW_PRECISION, PrecisionPolicy, apply_precision

F32 = 4
F64 = 8


@dataclass
class RankPlan:
    rank: int
    coords: tuple[int, int, int]  # (pp index, dp index, tp rank)
    layers: list[int]
    params: int = 0  # bytes
    grads: int = 0
    optimizer: int = 0  # on the device
    optimizer_host: int = 0  # offloaded to host memory (optim.offload_state)
    optimizer_host_reserved: int = 0  # the state offloader's host arena (muonclip/host_arena.py): its chunks
    step_transient: int = 0  # Newton–Schulz: momentum updates held, the batched stack, two iterates
    owned_grads: int = 0  # gradients held through the optimizer step (ZeRO-1: its persistent buffers + owned)
    activations_per_micro: int = 0  # on the device, one micro batch through all of this rank's stages
    activations_host_per_micro: int = 0  # offloaded
    saved_per_micro: int = 0  # what autograd keeps (device + host): no stage tensors, no replayed collectives
    in_flight: float = 1  # the most micro batches between forward and backward (chunks / stages on the rank)
    idle: float = 0.0  # the share of this rank's slots in the pipeline schedule with no compute action
    activations: int = 0  # what micro batches in flight hold at the step's high point, on the device
    activations_host: int = 0
    activations_host_reserved: int = 0  # activation offload's host arena (muonclip/host_arena.py): its chunks
    ckpt_staging: int = 0  # train.ckpt_async: the host buffer a save stages this rank's checkpoint in
    backward_transient: int = 0  # what the action running at the high point holds on top (_working_sets)
    recompute_flops: float = 0.0  # extra forward FLOPs per step recomputation costs
    comm: dict[str, int] = field(default_factory=dict)  # bytes sent per step
    largest_matrix: tuple[int, ...] | None = None

    @property
    def phases(self) -> dict[str, int]:
        """Bytes held at the high point of each phase of a step."""
        base = self.params + self.optimizer
        return {"backward": base + self.grads + self.activations + self.backward_transient,
                "optimizer step": base + self.owned_grads + self.step_transient}

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def host(self) -> int:
        """Host memory: the offloaders' arenas and the checkpoint staging buffer."""
        return self.optimizer_host_reserved + self.activations_host_reserved + self.ckpt_staging


def _local_model(cfg, pp_rank: int, tp_rank: int, ep_rank: int, etp_rank: int = 0):
    """The meta model a rank builds (launch/build.py): its stages' layers, EP, TP and the parameter dtypes applied;
    and placements (expert stacks folded over TP under sequence parallelism, parallel/dims.py)."""
    from models import Transformer
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.parallelize import model_placements
    from parallel.pipeline_parallel import plan_stages, prune_to_stage
    from parallel.tensor_parallel import apply_tensor_parallel
    from parallel.vocab_parallel import apply_vocab_parallel

    p = cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model)
        plan = None
        if p.pp > 1:
            plan = plan_stages(cfg.model, pp_rank, p.pp, p.pp_virtual_stages, p.schedule, p.pp_layers or None)
            model = prune_to_stage(model, plan.layers, first=plan.has_first, last=plan.has_last)
        apply_expert_parallel(model, ep_rank, p.ep, None, etp_rank, p.etp, None)
        apply_tensor_parallel(model, tp_rank, p.tp, None)
        if p.tp > 1:
            apply_vocab_parallel(model, tp_rank, p.tp, None)
        apply_precision(model, PrecisionPolicy.from_config(cfg))
    # a stand-in TP group: nothing is communicated here
    return model, model_placements(model, p.sequence_parallel, "planned"), plan


def _zero1_layout(model, placements, tp: int, dp: int, edp: int, bucket_mb: float, etp: int = 1):
    """The slots and buckets DistributedMuonClip builds for this model (shapes, owners, packing)."""
    import muonclip
    from muonclip._dist_layout import ParamSlot, assign_owners, build_buckets, set_backward_order

    groups = muonclip.build_param_groups(model.named_parameters())
    slots, index = [], 0
    for gi, group in enumerate(groups):
        for name, param in zip(group["names"], group["params"]):
            index += 1
            if not param.requires_grad:
                continue
            pl = placements[name]
            slot = ParamSlot(index - 1, name, param, gi, group["use_muon"], pl.kind, pl.shard_dim,
                             tp_copies=pl.tp_copies)
            if pl.shard_dim is not None:  # a TP slice, or an expert stack's ETP slice
                slot.tp_sizes = (param.shape[pl.shard_dim],) * (tp if pl.kind == "tp_sharded" else etp)
            slots.append(slot)
    assign_owners(slots, dp, tp, edp, etp_size=etp, stage_size=dp * tp)
    set_backward_order(slots, [n for n, _ in model.named_parameters()])
    return slots, build_buckets(slots, {"dp": dp, "edp": edp, "stage": dp * tp}, int(bucket_mb * 2**20))


def _activation_plan(cfg, plan, pp_rank: int, tp: int, ep: int, policy: PrecisionPolicy,
                     model: torch.nn.Module) -> dict[str, float]:
    """Per micro batch, and at the high point of the step: this rank's pass as torch's schedule orders it and the
    pipeline runtime holds it (``buffer_timeline``) walked action by action, each forward adding its micro batch's
    bytes and each backward removing them, the pipeline's receive buffers and sent gradients coming and going
    between them, with what an action holds while it runs on top (``_working_sets``); device and host; the
    recomputation's extra forward FLOPs per step; the share of the rank's schedule slots idle (``idle_fraction``).
    ``activations`` is what is held at the high point, ``transient`` what the action running then adds."""
    from parallel.pipeline_runtime import buffer_timeline, idle_fraction
    from parallel.plan_activations import Techniques, local_rows, micro_batch

    m, d, p = cfg.model, cfg.data, cfg.parallel
    tech = Techniques.from_config(cfg)
    N = d.micro_batch_size * d.seq_len
    held = local_rows(cfg, N) * m.dim * policy.activation_dtype.itemsize  # a pipeline tensor: [B, T/(cp*tp), D]
    idle, batch = 0.0, 0
    if plan is None:
        stages = {0: (list(range(m.n_layers)), True, True)}
        timeline = (("F", 0), ("B", 0))  # micro batch after micro batch
    else:
        stages = {s: (plan.ranges[s], s == 0, s == plan.n_stages - 1) for s in plan.stages}
        per_pass = p.microbatches_per_round(d.grad_accum)  # one schedule call; more run one after another
        timeline = buffer_timeline(p.schedule, p.pp, p.pp_virtual_stages, per_pass, pp_rank)
        idle = idle_fraction(p.schedule, p.pp, p.pp_virtual_stages, per_pass, pp_rank)
        # the step's token ids (first stage) and targets (last stage), int64, through the step: every micro batch
        # moved to the device, and the pass's concatenated copy the schedule splits (launch/trainer.py)
        batch = (d.grad_accum + per_pass) * N * 8 * (plan.has_first + plan.has_last)
    actions = tuple(e for e in timeline if e[0] != "buf")
    per_stage = {}
    for s, (layers, first, last) in stages.items():
        mb = micro_batch(cfg, layers, first, last, tp, ep, policy, tech)
        output_held = 0 if plan is None or last else held  # a stage's output, kept for its backward
        per_stage[s] = (mb.device + output_held, mb.host, mb)
    work = _working_sets(cfg, stages, {s: v[2] for s, v in per_stage.items()}, tp, policy, tech, model)
    device, host = batch, 0
    top = (batch, 0)  # (held, transient) at the high point
    peak_host = chunks = peak_chunks = 0
    for kind, s in timeline:
        if kind == "buf":
            device += s * held
            top = max(top, (device, 0), key=sum)
            continue
        forward, backward, after = work[s]
        if kind == "F":
            device += per_stage[s][0]
            host += per_stage[s][1]
            chunks += 1
            points = [(device, forward)]
        else:
            points = [(device, backward)]
            device -= per_stage[s][0]
            host -= per_stage[s][1]
            chunks -= 1
            points.append((device, after))
        top = max([top, *points], key=sum)
        peak_host, peak_chunks = max(peak_host, host), max(peak_chunks, chunks)
    per_micro = sum(v[0] for v in per_stage.values())
    return {"per_micro": per_micro, "host_per_micro": sum(v[1] for v in per_stage.values()),
            "saved_per_micro": sum(mb.device + mb.host - mb.replayed for _, _, mb in per_stage.values()),
            "peak": top[0], "peak_host": peak_host, "in_flight": peak_chunks / len(stages), "idle": idle,
            "host_reserved": _offload_arena(actions, tuple((s, tuple(map(tuple, v[2].block_copies)))
                                                           for s, v in per_stage.items())),
            "transient": top[1], "recompute_flops": _recompute_flops(cfg, stages, tp, tech)}


# a pass's steady state laid out for this many periods: the arena stops growing well before (Kimi K2 at 4k and 32k,
# one pass, every rank: its last new chunk within 1.5 periods of the steady state's start; equal to the whole
# pass's layout, 2026-12-07)
ARENA_PERIODS = 4


@functools.lru_cache(maxsize=64)
def _offload_arena(actions: tuple, block_copies: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...]) -> int:
    """The host bytes activation offload's arena allocates (muonclip/host_arena.py): the schedule's forwards take
    a range per host copy, block by block, and each backward gives back those of its stage's oldest micro batch
    (what they hold together, as the arena lays it out). ``block_copies``: (stage, each block's copies' bytes);
    cached: the ranks of a pipeline stage lay out the same requests. A long pass repeats one pattern of actions
    (its steady state, ``_periodic``): laid out up to ``ARENA_PERIODS`` of them (what follows takes what the
    pattern gives back; the pass's last period and end are laid out after them), so a pass of 1,024 micro batches
    costs what one of a few dozen does."""
    from collections import deque

    from muonclip.host_arena import ArenaLayout

    arena = ArenaLayout()
    block_copies = dict(block_copies)
    taken: dict[int, deque] = {s: deque() for s in block_copies}
    start, end, period = _periodic(actions)
    periods = (end - start) // period
    if periods > ARENA_PERIODS:  # the first ones, then the last of the stretch and what follows it
        actions = actions[:start + ARENA_PERIODS * period] + actions[end - (end - start) % period - period:]
    for kind, s in actions:
        if kind == "F":
            taken[s].append([(arena.take(n), n) for block in block_copies[s] for n in block])
        else:
            for (chunk, offset), n in taken[s].popleft():
                arena.give_back(chunk, offset, n)
    return arena.reserved


def _periodic(actions: tuple) -> tuple[int, int, int]:
    """(start, end, period): a stretch ``actions[start:end]`` around the middle in which every action after the first
    period is the one ``period`` before it, for the shortest period (up to a quarter of the actions) whose stretch
    covers at least half of them; (0, 0, 1) if none does."""
    n = len(actions)
    mid = n // 2
    for p in range(1, n // 4 + 1):
        if actions[mid:mid + p] != actions[mid + p:mid + 2 * p]:
            continue
        start, end = mid, mid + 2 * p
        while start > 0 and actions[start - 1] == actions[start - 1 + p]:
            start -= 1
        while end < n and actions[end] == actions[end - p]:
            end += 1
        if end - start >= n // 2:
            return start, end, p
    return 0, 0, 1


def _working_sets(cfg, stages: dict, mbs: dict, tp: int, policy: PrecisionPolicy, tech, model: torch.nn.Module
                  ) -> dict:
    """What a stage's forward and backward hold while they run, on top of the micro batches' kept bytes; and, on
    the first stage, what its backward ends with once the micro batch's activations are freed (the embedding's
    gradient). A layer's working set: an op's output and its input (or their gradients) alive together, each at
    most the layer's largest activation (in forward the attention core's, the max-logit probe's chunk, if larger),
    and FP8 storage's float32 working copies; backward adds the largest layer weight's gradient before it joins its
    float32 buffer, full recompute's rebuilt block, and on the last stage the loss's backward if larger (its logits
    chunk, the head weight's gradient). Activation offload: a block's device tensors live until its forward ends,
    beside their host copies, and backward has two blocks' tensors back on the device (the one running, the one
    prefetched: at most the two largest)."""
    from parallel.plan_activations import attention_transient, loss_transient, recompute_transient

    grad = policy.param_dtype.itemsize  # autograd's gradient of a parameter, before it is added to its buffer
    layer_params = [q.numel() for name, q in model.named_parameters() if name.startswith("layers.")]
    weight = max(layer_params, default=0) * grad
    embed = getattr(model, "embed_tokens", None)
    attention = attention_transient(cfg, tp, policy)
    out = {}
    for s, (_, first, last) in stages.items():
        mb = mbs[s]
        blocks = sorted(mb.block_hosts, reverse=True)  # every stage holds at least one layer
        # FP8: quantising makes 4 float32 copies of a tensor, dequantising 2 (the float32 tiles, their product)
        forward = max(2 * mb.largest, attention) + mb.quantize_transient + blocks[0]
        backward = 2 * mb.largest + mb.quantize_transient // 2 + weight + recompute_transient(mb, tech) + \
            sum(blocks[:2])
        if last:
            backward = max(backward, loss_transient(cfg, policy, tech, tp))
        after = embed.weight.numel() * grad if first and embed is not None else 0
        out[s] = (forward, backward, after)
    return out


def _recompute_flops(cfg, stages: dict, tp: int, tech) -> float:
    """Extra forward FLOPs per step of this rank's recomputation: full recomputes every layer's forward (2 FLOPs
    per parameter used per token); selective the regions' GEMMs (the MLA up-projections, the routed experts' down
    GEMMs; norms and SwiGLU are elementwise)."""
    m, d = cfg.model, cfg.data
    N = d.micro_batch_size * d.seq_len
    layers = [i for layers, _, _ in stages.values() for i in layers]
    per_micro = 0.0
    if tech.recompute == "full":
        from parallel.pipeline_parallel import unit_costs

        _, costs, _ = unit_costs(m)
        per_micro = sum(2 * N * costs[i] / tp for i in layers)
    if "mla_up_proj" in tech.selective and m.attn_type == "mla":
        H = m.n_heads // tp
        up = (m.q_lora_rank * H * (m.qk_nope_head_dim + m.qk_rope_head_dim) if m.q_lora_rank else 0) + \
            m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)
        per_micro += len(layers) * 2 * N * up
    if "moe_down_proj" in tech.selective:  # the rank's routed rows (its own tokens' under sequence parallelism)
        from parallel.plan_activations import local_rows

        moe = sum(1 for i in layers if i >= m.first_k_dense)
        per_micro += moe * 2 * local_rows(cfg, N) * m.n_activated_experts * m.moe_inter_dim * m.dim
    return per_micro * d.grad_accum


def _comm(cfg, slots, buckets, me: dict[str, int], tp_rank: int, plan, pp_rank: int,
          model: torch.nn.Module) -> dict[str, int]:
    """Bytes this rank sends per step, named like CountingComm's counters plus the model's collectives; ``model``:
    this rank's local model (``_local_model``: its stages, embedding and head, per-token parameters)."""
    p, m, d = cfg.parallel, cfg.model, cfg.data
    dp, tp, pp = (cfg.parallel.dp, p.tp, p.pp)
    out: dict[str, int] = {}

    def add(key: str, n: int) -> None:
        if n:
            out[key] = out.get(key, 0) + n

    from muonclip._dist_comm import reduce_by_all_reduce
    from parallel.plan_activations import Techniques

    policy = PrecisionPolicy.from_config(cfg)
    for b in buckets:
        G = b.group_size
        itemsize = (policy.reduce_dtype if b.grad_dtype == torch.float32 else b.grad_dtype).itemsize
        if G > 1 and b.sliced:  # every other rank's segment (its rows and flags), then this rank's rows to each
            add("reduce_scatter", (G - 1) * b.segment_numel * itemsize)
            add("all_gather", (G - 1) * b.nbytes())
        elif G > 1:
            # the gradients and a presence flag per parameter (Bucket.buffer_numel)
            wire = b.buffer_numel * itemsize
            if reduce_by_all_reduce(wire, _backend(cfg)):  # as DistributedMuonClip chooses
                add("all_reduce", 2 * (G - 1) * wire // G)
            else:
                add("reduce", (G - 1) * wire // G)
            add("broadcast", (G - 1) * b.nbytes() // G)  # the parameters, in their dtype
    stage = dp * tp
    add("all_reduce", 2 * (stage - 1) * F64 // stage if stage > 1 else 0)  # the grad norm (one float64)
    add("all_reduce", 2 * (pp - 1) * F64 // pp if pp > 1 else 0)
    if tp > 1:  # Newton–Schulz over TP: gather the owned tp_sharded updates, send every result back
        owned = [s for s in slots if s.use_muon and s.owner == me[s.sharding] and not s.folded]  # folded: local
        gather = sum(s.param.numel() for s in owned if s.kind == "tp_sharded" and s.ns_rank != tp_rank)
        scatter = 0
        for s in owned:
            if s.ns_rank == tp_rank:
                scatter += (tp - 1) * s.param.numel()  # a shard to each other rank, or the whole matrix
        add("all_to_all", (gather + scatter) * F32)
    if p.etp > 1:  # Newton–Schulz of the ETP stacks: their slices gathered to the ns_rank, the results' sent back
        owned = [s for s in slots if s.use_muon and s.owner == me[s.sharding] and s.etp]
        gather = sum(s.param.numel() for s in owned if s.ns_rank != me.get("etp", 0))
        scatter = sum((p.etp - 1) * s.param.numel() for s in owned if s.ns_rank == me.get("etp", 0))
        add("all_to_all", (gather + scatter) * F32)
    tokens = d.micro_batch_size * d.seq_len  # this rank's (seq_len / cp under context parallelism)
    micro = d.grad_accum
    layers = plan.layers if plan is not None else list(range(m.n_layers))
    if p.cp > 1:  # Ulysses: q, k, v out and the attention output back, forward and backward; (cp-1)/cp leave
        H = m.n_heads // tp
        dq = m.qk_nope_head_dim + m.qk_rope_head_dim if m.attn_type == "mla" else m.head_dim
        dv = m.v_head_dim if m.attn_type == "mla" else m.head_dim  # MLA's v goes padded to dq, its output comes
        sends = 2 * (3 * dq + dv)  # back dv
        if m.attn_type == "mla" and "mla_up_proj" in Techniques.from_config(cfg).selective:
            sends += 3 * dq  # rebuilding the exchanged q, k, v in backward sends them again (parallel/recompute.py)
        per_layer = tokens * H * sends * policy.compute_dtype.itemsize * (p.cp - 1) // p.cp
        add("cp_all_to_all", len(layers) * micro * per_layer)
    compute = min(policy.compute_dtype.itemsize, policy.activation_dtype.itemsize)  # GEMM outputs (bf16 or fp32)
    for key, n in _router_comm(cfg, layers, stage).items():
        add(key, n)
    if tp > 1 and p.sequence_parallel:
        for key, n in _sp_comm(cfg, model, layers, compute, _split_backwards(cfg, plan, pp_rank)).items():
            add(key, n)
    elif tp > 1:  # attention and FFN outputs forward, their input gradients backward; the vocab-split embedding's
        # partial outputs forward (its dtype), the head input's partial gradient backward (GEMM dtype)
        head, embed = getattr(model, "lm_head", None), getattr(model, "embed_tokens", None)
        widths = len(layers) * 4 * compute + (compute if head is not None else 0) + \
            (embed.weight.element_size() if embed is not None else 0)
        add("tp_all_reduce", micro * 2 * (tp - 1) * tokens * m.dim * widths // tp)
    if tp > 1 and getattr(model, "lm_head", None) is not None:  # the vocab-parallel loss (exact)
        add("ce_all_reduce", micro * _ce_all_reduce(tokens, m.loss_chunk_tokens, m.vocab_size // tp, tp))
    if p.ep > 1:  # dispatch + combine forward and backward; (ep-1)/ep of the routed rows leave the rank
        moe = sum(1 for i in layers if i >= m.first_k_dense)
        routed = tokens // tp if p.sequence_parallel else tokens  # SP: each rank routes its 1/tp of the tokens
        rows = routed * m.n_activated_experts  # expected: (ep-1)/ep of them leave, as many arrive
        per_layer = ep_all_to_all_bytes(rows, rows, m.dim, policy.compute_dtype.itemsize)
        add("ep_all_to_all", moe * micro * per_layer * (p.ep - 1) // p.ep)
    if p.etp > 1:  # the received rows (as many as this rank routes, expected) gathered over etp, the partial outputs
        moe = sum(1 for i in layers if i >= m.first_k_dense)  # reduce-scattered back, and the same in backward
        rows = (tokens // tp if p.sequence_parallel else tokens) * m.n_activated_experts
        per_layer = etp_exchange_bytes([rows] * p.etp, me.get("etp", 0), m.dim, policy.compute_dtype.itemsize)
        for key, n in per_layer.items():
            add(key, moe * micro * n)
    if plan is not None:
        owner = plan.owners
        sends = sum(1 for s in plan.stages if s + 1 < plan.n_stages and owner[s + 1] != pp_rank)
        sends += sum(1 for s in plan.stages if s > 0 and owner[s - 1] != pp_rank)  # gradients back
        hidden = tokens // tp if p.sequence_parallel else tokens  # a stage sends 1/tp of the sequence under SP
        add("pp_send", sends * micro * hidden * m.dim * policy.activation_dtype.itemsize)
    return out


def _router_comm(cfg, layers: list[int], stage: int) -> dict[str, int]:
    """The routers' all-reduces (float32): the sequence-wise balance loss's [B, 2E] per-sequence counts and
    probability means per MoE layer and training forward, over each group that splits the sequences (TP under
    sequence parallelism, then CP: parallel/router_stats.py; full recompute hands the result back); the step's
    [L, E] expert loads of this rank's L routers over the pipeline stage's ranks (launch/hooks.py
    ``RouterBiasUpdate``, once per step)."""
    p, m, d = cfg.parallel, cfg.model, cfg.data
    moe = sum(1 for i in layers if i >= m.first_k_dense)
    E = m.n_routed_experts
    out = {"router_load_all_reduce": 2 * (stage - 1) * moe * E * F32 // stage}
    groups = [g for g in ((p.tp if p.sequence_parallel else 1), p.cp) if g > 1]
    if m.seq_aux_loss_alpha > 0:
        counts = d.micro_batch_size * 2 * E * F32
        out["seq_aux_all_reduce"] = moe * d.grad_accum * sum(2 * (g - 1) * counts // g for g in groups)
    return {k: n for k, n in out.items() if n}


def _split_backwards(cfg, plan, pp_rank: int) -> dict[int | str, int]:
    """Layer (and "head" for the last stage's) -> the micro batches per step whose backward the zero-bubble schedules
    split into an input pass and a later weight pass (their ``BACKWARD_INPUT`` actions; DualPipeV runs some
    backwards whole; torch runs the first stage's whole, in its weight action)."""
    from torch.distributed.pipelining import schedules as pps

    from parallel.pipeline_runtime import compute_order, flatten

    p, d = cfg.parallel, cfg.data
    if plan is None or p.schedule not in ("zbv", "dualpipev"):
        return {}
    per_pass = p.microbatches_per_round(d.grad_accum)
    actions = flatten(compute_order(p.schedule, p.pp, p.pp_virtual_stages, per_pass)[pp_rank])
    out = {}
    for s in plan.stages:
        n = sum(1 for a in actions if a.stage_index == s and a.computation_type == pps.BACKWARD_INPUT)
        if s > 0:
            out.update({i: n * d.grad_accum // per_pass for i in plan.ranges[s]})
            out.update({"head": n * d.grad_accum // per_pass} if s == plan.n_stages - 1 else {})
    return out


def _ce_all_reduce(tokens: int, chunk_tokens: int, vocab: int, tp: int) -> int:
    """Bytes one rank sends in the vocab-parallel loss of one micro batch (parallel/vocab_parallel.py): per chunk
    (``chunk_tokens`` 0: one chunk) a float32 all-reduce of [c] and one of [c, 2], counted as ``SequenceComm``
    counts an all-reduce (2 (G-1)/G of the tensor)."""
    from models.loss import chunk_size

    chunk = tokens if chunk_tokens == 0 else chunk_size(chunk_tokens, vocab)
    sizes = [min(chunk, tokens - s) for s in range(0, tokens, chunk)]
    return sum(2 * (tp - 1) * n * F32 // tp for c in sizes for n in (c, 2 * c))


def ep_all_to_all_bytes(rows_out: int, rows_in: int, dim: int, itemsize: int) -> int:
    """Bytes one MoE layer's token exchange sends per micro batch (parallel/expert_parallel.py): the dispatch sends
    the ``rows_out`` routed rows bound for other ranks' experts, the combine the ``rows_in`` rows this rank's experts
    computed for other ranks back, and backward the same with the roles swapped."""
    return 2 * (rows_out + rows_in) * dim * itemsize


def etp_exchange_bytes(rows: list[int], me: int, dim: int, itemsize: int) -> dict[str, int]:
    """Bytes one MoE layer's expert-tensor-parallel row exchanges send per micro batch (parallel/expert_parallel.py,
    ``bytes_sent``), ``rows[k]``: the rows etp peer k received from the EP exchange. The all-gather sends this
    rank's rows to each other peer, the reduce-scatter each other peer its rows of the partial outputs; backward
    runs each as the other's gradient (the reduce-scatter's: an all-gather, and so on): each key counts twice."""
    others = sum(rows) - rows[me]
    return {"etp_all_gather": 2 * (len(rows) - 1) * rows[me] * dim * itemsize,
            "etp_reduce_scatter": 2 * others * dim * itemsize}


def _sp_comm(cfg, model, layers: list[int], compute: int, split: dict[int | str, int] | None = None
             ) -> dict[str, int]:
    """Sequence parallelism's bytes per step (``SequenceComm``'s counters, parallel/sequence_parallel.py): per layer
    and micro batch each column region all-gathers its input forward and reduce-scatters its gradient backward, each
    row region the reverse, (tp-1)/tp of the whole tensor each; the widths are the regions' own (MLA: q's and kv's
    latents and the rotary key). Each column region keeps its local input and gathers it again when backward reads
    it, in a ``split`` backward twice (the zero-bubble schedules' input pass, then their weight pass). The head's
    input is gathered forward and its gradient reduce-scattered backward, the embedding's partial outputs
    reduce-scattered forward and their gradient gathered backward; full recomputation runs the forward's collectives
    again but the block's last reduce-scatter (torch's checkpoint stops after the last tensor backward needs: the
    FFN's output, or with a MoE layer without shared experts the MoE's), ``mla_up_proj`` the latents' gather (the
    per-token parameters' gradients are summed in ZeRO-1's buckets over the stage: the optimizer's bytes)."""
    from parallel.plan_activations import Techniques
    p, m, d = cfg.parallel, cfg.model, cfg.data
    tp, micro, tokens = p.tp, d.grad_accum, d.micro_batch_size * d.seq_len  # seq_len: this CP rank's
    part = tokens * (tp - 1) // tp  # the tokens an all-gather or a reduce-scatter sends
    up = m.kv_lora_rank + m.qk_rope_head_dim + m.q_lora_rank  # what qkv_up gathers (MLA)
    latents = (up + (0 if m.q_lora_rank else m.dim)) if m.attn_type == "mla" else m.dim  # q_proj gathers x
    tech = Techniques.from_config(cfg)
    gathered = scattered = again = 0  # widths per token and micro batch (again: per token and step)
    for i in layers:
        ffn = m.dim if i < m.first_k_dense or m.n_shared_experts > 0 else 0  # a dense FFN or shared experts
        region = latents + m.dim + 2 * ffn  # forward: entries gathered, exits scattered; backward the reverse
        gathered, scattered = gathered + region, scattered + region
        gathered += latents + ffn  # the column regions keep their local inputs: gathered again in backward
        again += (split or {}).get(i, 0) * (latents + ffn)  # and once more in a split backward's weight pass
        if tech.recompute == "full":
            gathered += latents + ffn
            scattered += m.dim
        elif "mla_up_proj" in tech.selective and m.attn_type == "mla":
            gathered += up
    gathered, scattered = (micro * gathered + again) * part * compute, micro * part * scattered * compute
    if model.lm_head is not None:  # the final norm's output gathered for the vocab-split head (forward, and again
        # in backward: a column region), its gradient back
        gathered += (2 * micro + (split or {}).get("head", 0)) * part * m.dim * compute
        scattered += micro * part * m.dim * compute
    if model.embed_tokens is not None:  # the vocab-split embedding's partial outputs, their gradient back
        gathered += micro * part * m.dim * model.embed_tokens.weight.element_size()
        scattered += micro * part * m.dim * model.embed_tokens.weight.element_size()
    return {"sp_all_gather": gathered, "sp_reduce_scatter": scattered}


def _backend(cfg) -> str:
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "nccl" if device == "cuda" else "gloo"


def _held_numel(slot, group_size: int, index: int) -> int:
    """Elements of ``slot`` whose optimizer state a rank of index ``index`` in its group keeps: its rows of a sliced
    tensor (``row_slice``), else the whole."""
    from muonclip._dist_layout import row_slice

    if not slot.sliced:
        return slot.param.numel()
    return row_slice(slot.full_shape[0], group_size, index)[1] * slot.row_numel


def _state_elements(slot, policy) -> int:
    """Float32 optimizer-state elements per parameter element: the master of a bf16 parameter, then Muon's
    momentum or AdamW's two moments."""
    master = 1 if policy.master_weights and slot.param.dtype in LOW_PRECISION else 0
    return master + (1 if slot.use_muon else 2)


def _state_arena(owned: list, held: dict[int, int], policy) -> int:
    """The host bytes the state offloader's arena allocates (muonclip/host_arena.py): each owned parameter's
    float32 state tensors (its master, then Muon's momentum or AdamW's two moments; ``held`` elements each) in the
    order the optimizer makes them."""
    from muonclip.host_arena import ArenaLayout

    arena = ArenaLayout()
    for s in owned:
        for _ in range(_state_elements(s, policy)):
            arena.take(held[id(s)] * F32)
    return arena.reserved


def _staging_buffer(model, slots: list, owned: list, held: dict[int, int], policy) -> int:
    """The host buffer an asynchronous save stages this rank's checkpoint tensors in (launch/checkpoint/staging.py,
    each aligned): the model's state with the float32 master of a bf16 parameter this rank owns (one whose master
    another rank keeps is that rank's to write; of a sliced one, its rows), and the owned parameters' optimizer
    state: Muon's momentum, AdamW's two moments and step (launch/checkpoint/state.py)."""
    from launch.checkpoint.staging import staging_bytes

    trainable, mine = {s.name for s in slots}, {s.name: s for s in owned}
    sizes = []
    for name, t in model.state_dict().items():
        master = name in trainable and policy.master_weights and t.dtype in LOW_PRECISION
        if not master or name in mine:
            sizes.append(held[id(mine[name])] * F32 if master else t.numel() * t.element_size())
    for s in owned:
        sizes += [held[id(s)] * F32] if s.use_muon else [held[id(s)] * F32] * 2 + [F32]
    return staging_bytes(sizes)


def plan_layout(cfg, world: int) -> list[RankPlan]:
    """One RankPlan per rank of ``world`` for the job config ``cfg`` (``parallel.dp: 0`` is inferred)."""
    from dataclasses import replace

    p = cfg.parallel
    if world % (p.pp * p.tp * p.cp):
        raise ValueError(f"plan: parallel.pp * parallel.tp * parallel.cp ({p.pp} * {p.tp} * {p.cp}) must divide the "
                         f"world ({world})")
    data = p.data_parallel(world)
    dp = data * p.cp  # the replica axis (parallel/dims.py): ZeRO-1 owners, gradient reductions
    folded = p.sequence_parallel or p.tp == 1  # the expert groups cut the stage's ranks (parallel/dims.py)
    experts = dp * p.tp if folded else dp
    if experts % (p.ep * p.etp):
        raise ValueError(f"plan: parallel.etp * parallel.ep ({p.etp} * {p.ep}) must divide dp * cp"
                         f"{' * tp' if folded else ''} ({experts})")
    # context parallelism: each rank holds seq_len / cp tokens of every activation; attention's q, k, v and output
    # are [B, H/cp, T] after the all-to-all, the same bytes as [B, H, T/cp] (parallel/context_parallel.py)
    cfg = replace(cfg, parallel=replace(p, dp=dp), data=replace(cfg.data, seq_len=cfg.data.seq_len // p.cp))
    edp = experts // (p.ep * p.etp)
    policy = PrecisionPolicy.from_config(cfg)
    sharded = world > 1 and p.optimizer == "zero1"  # ZeRO-1 (else MuonClip: every rank holds every state)
    cache: dict[tuple[int, int, int], Any] = {}
    out = []
    for rank in range(world):
        pp_rank, rest = divmod(rank, dp * p.tp)
        d, t = divmod(rest, p.tp)
        etp_rank, rest = divmod(d * p.tp + t if folded else d, p.etp)[::-1]  # s = (edp * ep + ep) * etp + etp
        ep_rank, edp_rank = divmod(rest, p.ep)[::-1]
        key = (pp_rank, t)  # local shapes do not depend on which experts (or expert slices) a rank holds
        if key not in cache:
            model, placements, plan = _local_model(cfg, pp_rank, t, ep_rank, etp_rank)
            slots, buckets = _zero1_layout(model, placements, p.tp, dp, edp, p.zero1_bucket_mb, p.etp)
            acts = _activation_plan(cfg, plan, pp_rank, p.tp, p.ep, policy, model)  # the same for the key's ranks
            cache[key] = (model, slots, buckets, plan, acts)
        model, slots, buckets, plan, acts = cache[key]
        me = {"dp": d, "edp": edp_rank, "etp": etp_rank, "stage": d * p.tp + t}
        sizes = {"dp": dp, "edp": edp, "stage": dp * p.tp}
        layers = plan.layers if plan is not None else list(range(cfg.model.n_layers))
        r = RankPlan(rank, (pp_rank, d, t), layers)
        r.params = sum(q.numel() * q.element_size() for q in model.parameters())
        r.grads = sum(q.numel() for q in model.parameters() if q.requires_grad) * F32  # float32 buffers
        if sharded:  # ZeRO-1's buckets: a presence flag per parameter, a sliced one's padded rows (buffer_numel)
            r.grads = sum(b.buffer_numel for b in buckets) * F32
        owned = [s for s in slots if s.sliced or s.owner == me[s.sharding]] if sharded else slots
        mine_ids = {id(s) for s in owned}
        held = {id(s): _held_numel(s, sizes[s.sharding], me[s.sharding]) if sharded else s.param.numel()
                for s in slots}
        state = sum(held[id(s)] * _state_elements(s, policy) for s in owned) * F32
        counters = sum(1 for s in owned if not s.use_muon) * F32  # AdamW's step, a float32 scalar
        r.optimizer, r.optimizer_host = (counters, state) if cfg.optim.offload_state else (state + counters, 0)
        r.optimizer_host_reserved = _state_arena(owned, held, policy) if cfg.optim.offload_state else 0
        r.ckpt_staging = _staging_buffer(model, slots, owned, held, policy) if cfg.train.ckpt_async else 0
        muon = [s for s in owned if s.use_muon]
        if sharded:  # DistributedMuonClip: bucket by bucket, batched NS per shape, then AdamW
            # gradients live in persistent per-bucket buffers (no padding: one owner per bucket; a sliced bucket's
            # segments pad the last rank's rows), reduced and broadcast (all-gathered) in place, held through the step
            r.owned_grads = r.grads
            transients = [0]
            for b in buckets:
                mine = [s for s in b.slots if s.use_muon and b.owner == me[s.sharding]]
                by_shape: dict[tuple, int] = {}
                for s in mine:
                    key = tuple(s.full_shape[-2:])
                    by_shape[key] = by_shape.get(key, 0) + s.param.numel() * (
                        p.tp if s.kind == "tp_sharded" else p.etp if s.etp else 1)
                transients.append(sum(s.param.numel() for s in mine) + 3 * max(by_shape.values(), default=0))
                # AdamW: its denominator (muon.py adamw_apply_; the update goes into the spent gradient)
                transients.append(max((held[id(s)] for s in b.slots if id(s) in mine_ids and not s.use_muon),
                                       default=0))
            r.step_transient = max(transients) * F32
        else:  # MuonClip: one parameter at a time (update, normalised copy, next iterate; AdamW's denominator and
            r.owned_grads = r.grads  # update)
            adamw = max((s.param.numel() for s in slots if not s.use_muon), default=0)
            r.step_transient = max(3 * max((s.param.numel() for s in muon), default=0), 2 * adamw) * F32
        if cfg.optim.offload_state:  # one group's state lent to the device, the next one's prefetched
            groups = ([[s for s in b.slots if id(s) in mine_ids] for b in buckets] if sharded else [[s] for s in slots])
            lent = sorted((sum(held[id(s)] * _state_elements(s, policy) for s in g) * F32 for g in groups),
                          reverse=True)
            r.step_transient += sum(lent[:2])
        r.activations_per_micro, r.activations_host_per_micro = acts["per_micro"], acts["host_per_micro"]
        r.saved_per_micro = acts["saved_per_micro"]
        r.activations, r.activations_host, r.in_flight = acts["peak"], acts["peak_host"], acts["in_flight"]
        r.idle = acts["idle"]
        r.activations_host_reserved = acts["host_reserved"]
        r.backward_transient, r.recompute_flops = acts["transient"], acts["recompute_flops"]
        r.comm = _comm(cfg, slots, buckets, me, t, plan, pp_rank, model)
        shapes = [s.full_shape for s in muon]
        r.largest_matrix = max(shapes, key=lambda s: s[-1] * s[-2]) if shapes else None
        out.append(r)
    return out


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def format_plan(plans: list[RankPlan], all_ranks: bool = False, budget_gib: float = 80.0) -> str:
    rows = plans if all_ranks else _worst_per_stage(plans)
    kinds = sorted({k for r in rows for k in r.comm})
    host = any(r.host for r in rows)
    head = ["rank", "(pp,dp,tp)", "layers", "params", "grads", "optim", "act/micro", "in flight", "idle", "activations",
            "bwd transient", "NS transient", "peak", *(["host (optim + act + ckpt)"] if host else []),
            "recompute GFLOP", *kinds, "largest NS matrix"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        layers = _ranges(r.layers)
        cells = [str(r.rank), str(r.coords), layers, _size(r.params), _size(r.grads), _size(r.optimizer),
                 _size(r.activations_per_micro), f"{r.in_flight:.1f}", f"{r.idle:.1%}", _size(r.activations),
                 _size(r.backward_transient), _size(r.step_transient), f"**{_size(r.peak)}**",
                 *([_size(r.host)] if host else []),
                 f"{r.recompute_flops / 1e9:,.0f}",
                 *[_size(r.comm.get(k, 0)) for k in kinds],
                 "x".join(map(str, r.largest_matrix)) if r.largest_matrix else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    worst = max(plans, key=lambda r: r.peak)
    verdict = "fits" if worst.peak <= budget_gib * 2**30 else "does NOT fit"
    lines.append(f"\nlargest peak: rank {worst.rank} {_size(worst.peak)} -> {verdict} in {budget_gib:g} GiB "
                 "(comm columns: bytes this rank sends per optimizer step)")
    return "\n".join(lines)


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 31, 32] -> '0-2,31-32'."""
    parts, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(f"{start}-{x}" if x != start else str(x))
            start = None
    return ",".join(parts) or "-"


def _worst_per_stage(plans: list[RankPlan]) -> list[RankPlan]:
    out: dict[int, RankPlan] = {}
    for r in plans:
        if r.coords[0] not in out or r.peak > out[r.coords[0]].peak:
            out[r.coords[0]] = r
    return [out[k] for k in sorted(out)]


# modelled H100 (SXM) rates, TFLOP/s: the step at the rate Megatron-Bridge publishes for DeepSeek-V3 on 1,024 H100s
# (the model FLOPs per device per second it sustains); a GEMM alone at the dense peak of its operands' dtype (bf16
# tensor cores; float32 on the CUDA cores: torch leaves TF32 off for matmuls)
H100_STEP_TFLOPS = 338.0
H100_PEAK_TFLOPS = {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 67.0}
H100_HBM_TBPS = 3.35  # H100 SXM's memory bandwidth


def probe_bytes_per_pair(cfg) -> int:
    """Memory traffic of the max-logit probe per (query, key) pair and head it forms (models/layers.py
    ``causal_max_logits``): its float32 score written by the GEMM and read by the max; with document masks read
    and written once more by the mask (the masks themselves are shared by the heads)."""
    return 16 if cfg.data.document_mask else 8


def probe_runs(cfg) -> int:
    """How often a step runs the max-logit probe per layer and token: once in the training forward with SDPA
    (flex attention returns the max scores itself), once more in the post-step mode's re-measuring forward."""
    post_step = cfg.optim.qk_clip and cfg.optim.qk_clip_mode == "post_step"
    return int(cfg.model.attention_impl != "flex") + int(post_step)


def probe_dtype(policy: PrecisionPolicy) -> torch.dtype:
    """The dtype the probe's q and k arrive in, which it multiplies in on CUDA (models/layers.py
    ``probe_logits``: bf16 x bf16 with float32 accumulation and output; float32 in a float32 run)."""
    return policy.param_dtype if policy.low_precision else policy.compute_dtype


def compute_seconds(cfg, world: int) -> float:
    """A device's share of the step's model FLOPs (models/flops.py) at the modelled H100 rate."""
    from models.flops import flops_per_token

    d = cfg.data
    tokens = d.seq_len * d.micro_batch_size * d.grad_accum * cfg.parallel.data_parallel(world)
    return flops_per_token(cfg.model, d.seq_len) * tokens / world / (H100_STEP_TFLOPS * 1e12)


def format_pipeline(cfg, plans: list[RankPlan], world: int) -> str:
    """Each pipeline rank's idle share of its schedule slots (torch's own compute order for one pass: a forward, a
    backward or a weight gradient per slot, taken as equally long) and the step time they give: a device's compute
    (``compute_seconds``) stretched by the most idle rank's bubble, the time every rank waits for it."""
    p, d = cfg.parallel, cfg.data
    if p.pp == 1:
        return "pipeline: none (parallel.pp: 1)"
    idle = {r.coords[0]: r.idle for r in plans}
    per_pass = p.microbatches_per_round(d.grad_accum)
    passes = d.grad_accum // per_pass
    busy = compute_seconds(cfg, world)
    worst = max(idle.values())
    return (f"pipeline: {p.schedule}, pp {p.pp} x {p.pp_virtual_stages} stages per rank, {d.grad_accum:,} micro "
            f"batches per step in {passes} pass{'es' if passes > 1 else ''} of {per_pass:,}: idle share of each rank's "
            f"slots {', '.join(f'{idle[k]:.1%}' for k in sorted(idle))} (pipeline ranks 0..{p.pp - 1}); modelled "
            f"step ~{busy:,.4g} s of compute / (1 - {worst:.1%}) = {busy / (1 - worst):,.4g} s")


def format_flops(cfg, world: int) -> str:
    """The FLOP model the trainer logs MFU with (models/flops.py): per token, per step, per device; and the
    max-logit probe's FLOPs (outside the model FLOPs), their dtype and their modelled H100 time next to the
    step's."""
    from models.flops import attention_flops_per_token, flops_per_token, matmul_params_per_token, probe_flops_per_token
    from models.layers import MAX_LOGIT_CHUNK, probe_pairs

    m, d, p = cfg.model, cfg.data, cfg.parallel
    per_token = flops_per_token(m, d.seq_len)
    tokens = d.seq_len * d.micro_batch_size * d.grad_accum * p.data_parallel(world)
    step_device = per_token * tokens / world
    step_s = compute_seconds(cfg, world)
    model = (f"model FLOPs: {per_token / 1e9:,.2f} GFLOP per token (6 x {matmul_params_per_token(m) / 1e9:,.3f}B "
             f"matmul weights per token + causal attention {attention_flops_per_token(m, d.seq_len) / 1e9:,.2f} "
             f"GFLOP at {d.seq_len} tokens); {per_token * tokens / 1e15:,.1f} PFLOP per step of {tokens:,} tokens, "
             f"{step_device / 1e12:,.1f} TFLOP per device (train.peak_tflops gives MFU in the logs): "
             f"~{step_s:,.2f} s on an H100 at {H100_STEP_TFLOPS:,.0f} TFLOP/s (Megatron's DeepSeek-V3 rate)")
    runs = probe_runs(cfg)
    if runs == 0:
        return model + "\nmax-logit probe: none (flex attention returns the max scores)"
    dtype = probe_dtype(PrecisionPolicy.from_config(cfg))
    probe_token = runs * probe_flops_per_token(m, d.seq_len)
    probe_device = probe_token * tokens / world
    probe_s = probe_device / (H100_PEAK_TFLOPS[dtype] * 1e12)
    # its scores go through memory (no fused kernel): at 2 x head dim FLOPs per score, the bytes bound it
    bytes_device = probe_token / (2 * m.qk_head_dim) * probe_bytes_per_pair(cfg) * tokens / world
    bytes_s = bytes_device / (H100_HBM_TBPS * 1e12)
    operands = "float32" if dtype == torch.float32 else f"{str(dtype)[6:]} x {str(dtype)[6:]} -> float32"
    return model + (
        f"\nmax-logit probe (QK-Clip, {runs} per layer and micro batch, keys up to each {MAX_LOGIT_CHUNK}-query block's "
        f"end: {probe_pairs(d.seq_len) / d.seq_len ** 2:.1%} of q.k^T): {operands} "
        f"{probe_token / 1e9:,.2f} GFLOP per token, {probe_device / 1e12:,.1f} TFLOP per device per step: "
        f"~{probe_s:,.2f} s at the H100's {H100_PEAK_TFLOPS[dtype]:,.0f} TFLOP/s {str(dtype)[6:]} peak; its float32 "
        f"scores move {bytes_device / 1e12:,.1f} TB per device per step ({probe_bytes_per_pair(cfg)} B a score): "
        f"~{bytes_s:,.2f} s at {H100_HBM_TBPS} TB/s, so ~{max(probe_s, bytes_s) / step_s:.1%} of the step's "
        f"modelled time")


def main(argv: list[str] | None = None) -> int:
    from configs import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world", type=int, required=True, help="number of ranks")
    parser.add_argument("--all-ranks", action="store_true", help="one row per rank (default: the largest per stage)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per device for the verdict")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        plans = plan_layout(cfg, args.world)
        print(format_plan(plans, args.all_ranks, args.gpu_gib))
        print(format_flops(cfg, args.world))
        print(format_pipeline(cfg, plans, args.world))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
