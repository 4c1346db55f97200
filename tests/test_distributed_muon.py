"""DistributedMuonClip (ZeRO-1) vs single-process MuonClip, on gloo/CPU in float64.

Every rank gets different deterministic gradients; the reference is MuonClip on ONE full copy of the params
with the dp-averaged gradients. Tolerance: TOL = 1e-12 absolute on params of size ~0.2 after 5 steps in
float64 (the only differences are summation order in the gradient reduction and the norm), replicas bitwise equal
(TOL32 where a float32 model runs).
Process groups are built by hand (rank = dp_index * tp + tp_index, EP blocks of consecutive dp indices).
"""
from __future__ import annotations

import copy
import gc
import math
import os
import traceback
import weakref
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

from muonclip import MuonClip, QKClip, build_param_groups
from muonclip.distributed import DistributedMuonClip, OptimizerGroups
from muonclip.placement import Placement
from tests.dist_utils import run_distributed

HP = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.1, ns_dtype=torch.float64)
TOL = 1e-12
TOL32 = 8 * torch.finfo(torch.float32).eps  # a float32 model's layouts: a few units in the last place of gains ~1
MAX_NORM = 8.0  # below the typical global norm here, so clipping is active
STEPS = 5
DENSE = {  # name -> full shape (names follow the model so build_param_groups routes them as in training)
    "layers.0.self_attn.q_proj.weight": (16, 8),
    "layers.0.self_attn.k_proj.weight": (16, 8),
    "layers.0.self_attn.o_proj.weight": (8, 16),
    "layers.0.mlp.up_proj.weight": (24, 8),
    "layers.0.mlp.down_proj.weight": (8, 24),
    "layers.0.mlp.stack": (3, 6, 10),  # a replicated 3-D Muon stack
    "layers.0.input_layernorm.weight": (8,),
    "embed_tokens.weight": (32, 8),
    "lm_head.weight": (32, 8),
}
FROZEN = "layers.0.mlp.gate.e_score_correction_bias"


# ---------------------------------------------------------------- helpers (run inside the workers)
def _seeded(key: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _grad(name: str, dp_index: int, step: int, shape) -> torch.Tensor:
    return _seeded(f"grad/{name}/{dp_index}/{step}", shape)


def _mean_grad(name: str, dp_size: int, step: int, shape) -> torch.Tensor:
    return sum(_grad(name, d, step, shape) for d in range(dp_size)) / dp_size


def _make(shapes: dict, frozen: bool = True) -> dict[str, nn.Parameter]:
    params = {n: nn.Parameter(0.2 * _seeded("init/" + n, s)) for n, s in shapes.items()}
    if frozen:
        params[FROZEN] = nn.Parameter(torch.zeros(4, dtype=torch.float64), requires_grad=False)
    return params


def _clone(params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    return {n: nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for n, p in params.items()}


def _count_ns() -> list[int]:
    """Count matrices orthogonalised by DistributedMuonClip on this rank (wraps the function it calls)."""
    import muonclip.distributed as md
    count, orig = [0], md.orthogonalize

    def counting(u, *args, **kwargs):
        count[0] += u.numel() // (u.shape[-2] * u.shape[-1])
        return orig(u, *args, **kwargs)

    md.orthogonalize = counting
    return count


def _world_sum(x: float | int, dtype=torch.float64) -> float:
    t = torch.tensor([x], dtype=dtype)
    dist.all_reduce(t)
    return t.item()


def _assert_identical(tensors: list[torch.Tensor], group, what: str) -> None:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = torch.empty(dist.get_world_size(group) * flat.numel(), dtype=flat.dtype)
    dist.all_gather_single(out, flat, group=group)
    for r, chunk in enumerate(out.view(-1, flat.numel())):
        assert torch.equal(chunk, flat), f"{what}: replica {r} differs from rank {dist.get_rank()}"


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float = TOL) -> None:
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err < tol, f"{name}: max |dist - single| = {err:.3e} >= {tol}"


def _dense_step(params, ref, opt, ref_opt, dp_index: int, dp_size: int, step: int) -> None:
    for n, p in params.items():
        if p.requires_grad:
            p.grad = _grad(n, dp_index, step, p.shape)
            ref[n].grad = _mean_grad(n, dp_size, step, p.shape)
    _step_both(opt, ref, ref_opt)


def _step_both(opt, ref, ref_opt) -> None:
    """Reduce + clip + step the distributed optimizer and the single-process reference; norms must agree."""
    opt.reduce_gradients()
    norm = opt.clip_grad_norm_(MAX_NORM)
    ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.values() if p.grad is not None], MAX_NORM)
    assert abs(norm.item() - ref_norm.item()) < TOL * ref_norm.item(), (norm, ref_norm)
    opt.step()
    ref_opt.step()
    opt.zero_grad()
    ref_opt.zero_grad()


# ---------------------------------------------------------------- (a)(b) replicated params, dp=2
def _replicated_worker(rank: int, world: int) -> None:
    dp_group = dist.new_group(list(range(world)))
    ns_count = _count_ns()
    params = _make(DENSE)
    ref = _clone(params)
    opt = DistributedMuonClip(build_param_groups(list(params.items())), {}, OptimizerGroups(dp_group), **HP)
    ref_opt = MuonClip(build_param_groups(list(ref.items())), **HP)
    buffers = [flat.data_ptr() for flat in opt._flat]
    for step in range(1, STEPS + 1):
        _dense_step(params, ref, opt, ref_opt, rank, world, step)
    for n, p in params.items():
        _assert_close(p, ref[n], n)
    _assert_identical(list(params.values()), dp_group, "params")
    # persistent gradient buffers: never reallocated; after zero_grad() backward accumulates into them in place
    assert [flat.data_ptr() for flat in opt._flat] == buffers
    storages = {flat.untyped_storage().data_ptr() for flat in opt._flat}
    managed = [p for p in params.values() if p.requires_grad]
    assert all(p.grad is not None and p.grad.untyped_storage().data_ptr() in storages for p in managed)

    def backward() -> None:
        sum((p * (i + 1)).sum() for i, p in enumerate(managed)).backward()

    opt.backward_passes_per_step = 2
    backward()  # the first of two passes: accumulated in place, no reduction started
    for i, p in enumerate(managed):
        assert p.grad.untyped_storage().data_ptr() in storages and torch.equal(p.grad, torch.full_like(p, i + 1.0))
    assert opt._launched == 0
    backward()  # the second: every bucket's reduction starts from backward's hooks
    assert opt._in_backward == len(opt.buckets) > 1
    opt.reduce_gradients()
    for i, p in enumerate(managed):
        assert (p.grad is not None) == opt.owns(p)
        assert p.grad is None or torch.equal(p.grad, torch.full_like(p, 2 * (i + 1.0)))  # mean of equal sums
    with pytest.raises(RuntimeError, match="backward_passes_per_step"):
        backward()  # a third pass would accumulate into buffers already reduced
    opt.zero_grad()
    opt.backward_passes_per_step = 1

    # each Muon matrix orthogonalised exactly once in the world per step (the 3-D stack counts 3)
    n_matrices = sum(1 if len(s) == 2 and "proj" in n else 0 for n, s in DENSE.items()) + 3
    assert _world_sum(ns_count[0]) == n_matrices * STEPS
    # state: whole tensors, owned params only, every param owned by exactly one rank
    managed = {n: p for n, p in params.items() if p.requires_grad}
    for n, p in managed.items():
        st = opt.state.get(p, {})
        assert bool(st) == opt.owns(p), n
        for key, t in st.items():
            assert key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "step"), key
            assert t.shape == (p.shape if key != "step" else ()), (n, key)
    assert _world_sum(len(opt.owned_names())) == len(managed)
    assert FROZEN not in opt.owned_names() and not opt.state.get(params[FROZEN])
    # (b) memory: sum over ranks == single process; each rank ~1/dp (whole-tensor granularity)
    ref_bytes = sum(t.numel() * t.element_size() for st in ref_opt.state.values() for t in st.values())
    mine = opt.state_bytes()
    assert _world_sum(mine) == ref_bytes
    largest = max(t.numel() * t.element_size() for st in ref_opt.state.values() for t in st.values()) * 2
    assert mine <= ref_bytes / world + largest, (mine, ref_bytes)
    assert 0 < mine < ref_bytes

    # the all-reduce path (what gloo takes for large buckets) and 1 KiB buckets (one or two tensors each) give
    # the same result as reducing one bucket per owner to it
    params_ar, ref_ar = _make(DENSE), _clone(_make(DENSE))
    opt_ar = DistributedMuonClip(build_param_groups(list(params_ar.items())), {}, OptimizerGroups(dp_group),
                                 all_reduce_min_bytes=0, bucket_cap_mb=2**-10, **HP)
    ref_opt_ar = MuonClip(build_param_groups(list(ref_ar.items())), **HP)
    assert all(opt_ar._all_reduce) and not any(opt._all_reduce)  # DENSE's buckets are small: reduce
    assert len(opt_ar.buckets) >= 6 > len(opt.buckets)
    for step in range(1, STEPS + 1):
        _dense_step(params_ar, ref_ar, opt_ar, ref_opt_ar, rank, world, step)
    for n, p in params_ar.items():
        _assert_close(p, ref_ar[n], n)
        assert torch.equal(p, params[n]), n  # bitwise the first run's result
    assert opt_ar.comm_bytes.get("all_reduce", 0) > 0 and "reduce" not in opt_ar.comm_bytes
    assert opt.comm_bytes.get("reduce", 0) > 0 and opt.comm_bytes.get("broadcast", 0) > 0
    # bad input: groups without names; ranks that disagree on the structure (clear error on every rank)
    with pytest.raises(ValueError, match="names"):
        DistributedMuonClip([{"params": [params["lm_head.weight"]], "use_muon": False}], {}, OptimizerGroups(), **HP)
    extra = {"extra.weight": nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))} if rank == 1 else {}
    with pytest.raises(ValueError, match="disagree"):
        DistributedMuonClip(build_param_groups(list({**_make(DENSE), **extra}.items())), {}, OptimizerGroups(), **HP)


# ---------------------------------------------------------------- ownership plan (pure, no processes)
def test_ownership_plan_covers_every_param_once_and_packs_buckets():
    from muonclip._dist_layout import ParamSlot, assign_owners, build_buckets, ns_cost
    dp, tp = 3, 2
    shapes = [((64, 32), True), ((32, 64), True), ((16, 16), True), ((4, 8, 8), True), ((128, 16), False),
              ((16,), False), ((48, 32), True), ((8, 8), True)]
    slots = [ParamSlot(i, f"p{i}", torch.zeros(s), 0, muon, "replicated") for i, (s, muon) in enumerate(shapes)]
    slots.append(ParamSlot(len(slots), "sharded", torch.zeros(32, 16), 0, True, "tp_sharded", 0, (32, 32)))
    assign_owners(slots, dp, tp, edp_size=dp)
    assert all(0 <= s.owner < dp and 0 <= s.ns_rank < tp for s in slots)
    again = [ParamSlot(s.index, s.name, s.param, 0, s.use_muon, s.kind, s.shard_dim, s.tp_sizes) for s in slots]
    assign_owners(again, dp, tp, edp_size=dp)
    assert [(s.owner, s.ns_rank) for s in again] == [(s.owner, s.ns_rank) for s in slots]  # deterministic
    # greedy NS balance: no (dp, tp) cell carries more than the average plus the largest single matrix
    cells = {}
    for s in slots:
        if s.use_muon:
            cells[(s.owner, s.ns_rank)] = cells.get((s.owner, s.ns_rank), 0) + ns_cost(s.full_shape)
    costs = [ns_cost(s.full_shape) for s in slots if s.use_muon]
    assert max(cells.values()) <= sum(costs) / (dp * tp) + max(costs)
    assert slots[-1].full_shape == (64, 16)
    for cap in (None, 8 * 1024):  # one bucket per owner; buckets of at most 8 KiB of full tensors
        buckets = build_buckets(slots, {"dp": dp, "edp": dp}, cap)
        assert sorted(s.name for b in buckets for s in b.slots) == sorted(s.name for s in slots)  # each once
        for b in buckets:  # one owner, packed back to back without padding, filled in backward order
            assert {s.owner for s in b.slots} == {b.owner}
            assert b.offsets == [sum(s.param.numel() for s in b.slots[:k]) for k in range(len(b.slots))]
            assert b.numel == sum(s.param.numel() for s in b.slots)
            assert [s.index for s in b.slots] == sorted((s.index for s in b.slots), reverse=True)
            full = sum(math.prod(s.full_shape) * 4 for s in b.slots)
            assert cap is None or full <= cap or len(b.slots) == 1
        firsts = [min(s.index for s in b.slots) for b in buckets]
        assert firsts == sorted(firsts, reverse=True)  # listed in the order backward completes them
        owners = len({s.owner for s in slots})
        assert len(buckets) == owners if cap is None else len(buckets) > owners
    # tp ranks with uneven shards of the same matrix form the same buckets (the cap counts full tensors)
    other = [ParamSlot(s.index, s.name, torch.zeros(24, 16) if s.kind == "tp_sharded" else s.param, 0, s.use_muon,
                       s.kind, s.shard_dim, (24, 40) if s.kind == "tp_sharded" else None) for s in slots]
    for o, s in zip(other, slots):
        o.owner, o.ns_rank = s.owner, s.ns_rank
    assert [[s.name for s in b.slots] for b in build_buckets(other, {"dp": dp}, 8 * 1024)] == \
        [[s.name for s in b.slots] for b in build_buckets(slots, {"dp": dp}, 8 * 1024)]


def test_per_token_matrices_are_owned_over_the_stage_where_the_dense_ones_loaded_least():
    """Sequence parallelism's per-token tensors (``tp_copies=False``) are owned over the stage's dp x tp ranks, the
    Newton-Schulz loads continuing from the dense table: stage rank d * tp + t is the dense (d, t) cell, so at dp2 x
    tp2 with the two large dense matrices on tp rank 0 of each dp index the per-token ones go to tp rank 1's."""
    from muonclip._dist_layout import ParamSlot, assign_owners
    dense = [ParamSlot(i, f"dense{i}", torch.zeros(32, 64), 0, True, "tp_sharded", 0, (32, 32)) for i in range(2)]
    per_token = [ParamSlot(2 + i, f"token{i}", torch.zeros(32, 32), 0, True, "replicated", tp_copies=False)
                 for i in range(4)]
    assign_owners(dense + per_token, 2, 2, edp_size=2)
    assert [(s.owner, s.ns_rank) for s in dense] == [(0, 0), (1, 0)]
    assert {s.sharding for s in per_token} == {"stage"} and {s.owner for s in per_token} == {1, 3}


# ---------------------------------------------------------------- (e) state_dict round trip, (f) QK-Clip
def _resume_and_qkclip_worker(rank: int, world: int) -> None:
    dp_group = dist.new_group(list(range(world)))
    params = _make(DENSE)
    ref = _clone(params)
    opt = DistributedMuonClip(build_param_groups(list(params.items())), {}, OptimizerGroups(dp_group), **HP)
    ref_opt = MuonClip(build_param_groups(list(ref.items())), **HP)
    opt.init_state()
    assert {n for n, p in params.items() if p in opt.state} == set(opt.owned_names())

    # QK-Clip as a post-step hook: per-rank max logits MAX-reduced over dp; reference sees the global max
    q, k = "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight"
    logits, ref_logits = torch.zeros(2), torch.zeros(2)
    spec = dict(kind="mha", n_heads=2, n_kv_heads=2, head_dim=8, max_logits=logits)
    clip = QKClip([dict(spec, q_weight=params[q], k_weight=params[k])], tau=100.0, process_group=dp_group)
    ref_clip = QKClip([dict(spec, q_weight=ref[q], k_weight=ref[k], max_logits=ref_logits)], tau=100.0)
    clip.register(opt)
    ref_clip.register(ref_opt)

    for step in range(1, STEPS + 1):
        per_rank = torch.tensor([[150.0, 60.0], [90.0, 130.0 + step]], dtype=torch.float32)  # [rank, head]
        logits.copy_(per_rank[rank % 2])
        ref_logits.copy_(per_rank.max(0).values)
        _dense_step(params, ref, opt, ref_opt, rank, world, step)
    assert clip.last_clipped.item() == 2 and torch.equal(clip.last_max_logits, ref_clip.last_max_logits)
    for n, p in params.items():
        _assert_close(p, ref[n], n)
    _assert_identical(list(params.values()), dp_group, "params after QK-Clip")

    # (e) resume: state_dict after step 3 + the params then, continued to step 5 == uninterrupted run
    def run(ps, o, steps):
        for step in steps:
            for n, p in ps.items():
                if p.requires_grad:
                    p.grad = _grad(n, rank, step, p.shape)
            o.step()
            o.zero_grad()

    full = _make(DENSE)
    opt_full = DistributedMuonClip(build_param_groups(list(full.items())), {}, OptimizerGroups(dp_group), **HP)
    run(full, opt_full, range(1, 4))
    resumed, saved = _clone(full), copy.deepcopy(opt_full.state_dict())
    run(full, opt_full, range(4, STEPS + 1))
    opt2 = DistributedMuonClip(build_param_groups(list(resumed.items())), {}, OptimizerGroups(dp_group), **HP)
    opt2.init_state()
    opt2.load_state_dict(saved)
    run(resumed, opt2, range(4, STEPS + 1))
    for n in full:
        assert torch.equal(resumed[n], full[n]), n
    # another rank's state dict is rejected with a clear error
    others = [None] * world
    dist.all_gather_object(others, opt_full.state_dict())
    with pytest.raises(ValueError, match="does not own"):
        opt2.load_state_dict(others[(rank + 1) % world])


# ---------------------------------------------------------------- (g) QK-Clip outside a step on bf16 params
def _post_step_clip_worker(rank: int, world: int) -> None:
    """The post-step mode's clip (``QKClip._clip_layer`` -> ``optimizer.scale_rows_``) on bf16 parameters with
    float32 masters whose low bits bf16 cannot hold, dp=2 ZeRO-1 vs one MuonClip: no collective but the max-logit
    reduction (it was a broadcast of every query/key weight), parameters and the owner's masters bitwise those of
    the one process, every parameter its master rounded, a head below tau untouched to the bit, the masters less
    than one bf16 unit from the exact float32 scaling; the next step goes on from there as the one process does."""
    from muonclip.qk_clip import scale_rows_
    from tests.audit import WireAudit

    dp_group = dist.new_group(list(range(world)))
    q, k = "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight"
    shapes = {n: s for n, s in DENSE.items() if n != "layers.0.mlp.stack"}
    masters = {n: (0.2 * _seeded("init/" + n, s) + 1e-3 * _seeded("low/" + n, s)).float() for n, s in shapes.items()}
    params = {n: nn.Parameter(m.to(torch.bfloat16)) for n, m in masters.items()}
    ref = _clone(params)
    hp = dict(HP, ns_dtype=torch.float32)
    opt = DistributedMuonClip(build_param_groups(list(params.items())), {}, OptimizerGroups(dp_group), **hp)
    ref_opt = MuonClip(build_param_groups(list(ref.items())), **hp)
    for o, ps in ((opt, params), (ref_opt, ref)):
        o.init_state()
        for n, p in ps.items():
            if p in o.state:
                o.state[p]["master"].copy_(masters[n])  # low bits the bf16 parameter does not hold

    spec = dict(kind="mha", n_heads=2, n_kv_heads=2, head_dim=8)
    per_rank = torch.tensor([[150.0, 60.0], [90.0, 80.0]])  # head 0 clips (gamma 2/3), head 1 does not
    clip = QKClip([dict(spec, q_weight=params[q], k_weight=params[k], max_logits=per_rank[rank % 2])], tau=100.0,
                  process_group=dp_group, optimizer=opt)
    ref_clip = QKClip([dict(spec, q_weight=ref[q], k_weight=ref[k], max_logits=per_rank.max(0).values)],
                      tau=100.0, optimizer=ref_opt)
    with WireAudit() as wire:
        clip.apply()
    ref_clip.apply()
    sent = [(r.call, r.dtype, r.numel) for r in wire.records]
    assert sent == [("all_reduce", torch.float32, 2)], sent
    for n in (q, k):
        assert torch.equal(params[n], ref[n]), n
        assert torch.equal(params[n][8:], masters[n][8:].to(torch.bfloat16)), n  # head 1: every bit kept
        exact = masters[n].clone()
        scale_rows_(exact, torch.tensor([(2 / 3) ** 0.5] * 8 + [1.0] * 8))
        master = ref_opt.state[ref[n]]["master"]
        assert torch.equal(ref[n], master.to(torch.bfloat16)), n
        unit = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8)  # bf16 spacing at exact
        assert ((master - exact).abs() < unit).all(), n
        assert torch.equal(master[8:], masters[n][8:]), n
        if params[n] in opt.state:
            assert torch.equal(opt.state[params[n]]["master"], master), n
    _assert_identical(list(params.values()), dp_group, "params after the post-step clip")

    for n, p in params.items():  # the same gradient on both ranks: the dp mean is exactly the reference's
        p.grad = _grad(n, 0, 1, p.shape).to(torch.bfloat16)
        ref[n].grad = p.grad.clone()
    for o in (opt, ref_opt):
        o.step()
    for n, p in params.items():
        torch.testing.assert_close(p, ref[n], rtol=2.0 ** -8, atol=0, msg=n)  # one bf16 unit (NS batching)
        if p in opt.state:
            assert torch.equal(p, opt.state[p]["master"].to(torch.bfloat16)), n
    _assert_identical(list(params.values()), dp_group, "params after the next step")


# ---------------------------------------------------------------- (c) tensor parallel, dp=2 x tp=2
TP = {  # name -> (full shape, placement: shard dim | "rep" | "expert")
    "layers.0.self_attn.q_b_proj.weight": ((16, 8), 0),  # column split (heads)
    "layers.0.self_attn.o_proj.weight": ((8, 16), 1),  # row split
    "layers.0.mlp.up_proj.weight": ((24, 8), 0),
    "layers.0.mlp.down_proj.weight": ((8, 24), 1),
    "layers.0.self_attn.q_a_proj.weight": ((12, 8), "rep"),
    "layers.1.mlp.gate.weight": ((6, 8), "rep"),
    "layers.1.mlp.experts.gate_proj": ((4, 6, 8), "expert"),  # ep=1: whole stack, replicated across tp
    "layers.0.shared.bias": ((16,), 0),  # a tp-sharded AdamW param
    "embed_tokens.weight": ((32, 8), "rep"),
    "norm.weight": ((8,), "rep"),
}


def _tp_slice(x: torch.Tensor, dim, t: int, tp: int) -> torch.Tensor:
    return x.chunk(tp, dim)[t] if isinstance(dim, int) else x


def _tp_worker(rank: int, world: int, hp: dict = HP, group_options: dict | None = None) -> None:
    from muonclip.muon import orthogonalize
    tp, dp = 2, world // 2
    d, t = divmod(rank, tp)
    dp_groups = [dist.new_group(list(range(j, world, tp))) for j in range(tp)]
    tp_groups = [dist.new_group(list(range(i * tp, (i + 1) * tp))) for i in range(dp)]
    dp_group, tp_group = dp_groups[t], tp_groups[d]
    ns_count = _count_ns()
    full = _make({n: s for n, (s, _) in TP.items()}, frozen=False)
    ref = _clone(full)
    params = {n: nn.Parameter(_tp_slice(p.detach(), TP[n][1], t, tp).clone()) for n, p in full.items()}
    placements = {n: Placement("tp_sharded", dim, tp_group) if isinstance(dim, int) else
                  Placement("expert") if dim == "expert" else Placement() for n, (_, dim) in TP.items()}
    groups = OptimizerGroups(dp_group=dp_group, tp_group=tp_group, edp_group=dp_group)
    opt = DistributedMuonClip(build_param_groups(list(params.items()), group_options=group_options), placements,
                              groups, **hp)
    ref_opt = MuonClip(build_param_groups(list(ref.items()), group_options=group_options), **hp)
    for step in range(1, STEPS + 1):
        for n, p in params.items():
            p.grad = _tp_slice(_grad(n, d, step, TP[n][0]), TP[n][1], t, tp)
            ref[n].grad = _mean_grad(n, dp, step, TP[n][0])
        opt.reduce_gradients()
        norm = opt.clip_grad_norm_(MAX_NORM)
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), MAX_NORM)
        assert abs(norm.item() - ref_norm.item()) < TOL * ref_norm.item(), (norm, ref_norm)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for n, p in params.items():
        _assert_close(p, _tp_slice(ref[n], TP[n][1], t, tp), n)
    _assert_identical(list(params.values()), dp_group, "dp replicas")
    _assert_identical([p for n, p in params.items() if not isinstance(TP[n][1], int)], tp_group, "tp replicated")
    muon = sum(s[0] if len(s) == 3 else 1 for n, (s, _) in TP.items() if len(s) >= 2 and "embed" not in n)
    assert _world_sum(ns_count[0]) == muon * STEPS  # once in the world, not once per tp rank
    # the test can tell exact Muon from blockwise: orthogonalising a shard alone gives something else
    g = _mean_grad("layers.0.mlp.up_proj.weight", dp, 1, (24, 8))
    exact = orthogonalize(g, ns_dtype=torch.float64).chunk(tp, 0)[t]
    assert (orthogonalize(g.chunk(tp, 0)[t], ns_dtype=torch.float64) - exact).abs().max() > 1e-3


# ---------------------------------------------------------------- (d) experts, dp=4 with ep=2 (edp=2)
EXPERTS = {"layers.1.mlp.experts.gate_proj": (8, 6, 4), "layers.1.mlp.experts.down_proj": (8, 4, 6)}


def _expert_worker(rank: int, world: int) -> None:
    ep = 2
    ep_rank, E_local = rank % ep, 8 // ep
    edp_groups = [dist.new_group(list(range(r, world, ep))) for r in range(ep)]
    dp_group, edp_group = dist.new_group(list(range(world))), edp_groups[ep_rank]
    ns_count = _count_ns()
    params = _make(DENSE)
    ref = _clone(params)
    for n, shape in EXPERTS.items():
        stack = 0.2 * _seeded("init/" + n, shape)
        params[n] = nn.Parameter(stack[ep_rank * E_local:(ep_rank + 1) * E_local].clone())
        for e in range(shape[0]):  # the reference holds every expert as its own 2-D Muon matrix
            ref[f"{n}.{e}"] = nn.Parameter(stack[e].clone())
    placements = {n: Placement("expert") for n in EXPERTS}
    opt = DistributedMuonClip(build_param_groups(list(params.items())), placements,
                              OptimizerGroups(dp_group=dp_group, edp_group=edp_group), **HP)
    ref_opt = MuonClip(build_param_groups(list(ref.items())), **HP)
    for step in range(1, STEPS + 1):
        for n, shape in EXPERTS.items():
            local = (E_local, *shape[1:])
            params[n].grad = _grad(n, rank, step, local)  # this rank's contribution for its ep block
            for e in range(shape[0]):  # sum over the edp replicas of the block, / dp size
                r, i = divmod(e, E_local)
                ref[f"{n}.{e}"].grad = sum(_grad(n, d, step, local)[i] for d in range(r, world, ep)) / world
        for n, p in params.items():
            if n not in EXPERTS and p.requires_grad:
                p.grad = _grad(n, rank, step, p.shape)
                ref[n].grad = _mean_grad(n, world, step, p.shape)
        _step_both(opt, ref, ref_opt)
    for n, p in params.items():
        if n in EXPERTS:
            for i in range(E_local):
                _assert_close(p[i], ref[f"{n}.{ep_rank * E_local + i}"], f"{n}[{i}]")
        else:
            _assert_close(p, ref[n], n)
    _assert_identical([p for n, p in params.items() if n not in EXPERTS], dp_group, "dense params")
    _assert_identical([params[n] for n in EXPERTS], edp_group, "expert replicas")
    n_dense = sum(1 for n, s in DENSE.items() if len(s) == 2 and "proj" in n) + 3
    assert _world_sum(ns_count[0]) == (n_dense + 16) * STEPS
    owned_experts = [n for n in opt.owned_names() if n in EXPERTS]
    assert _world_sum(len(owned_experts)) == 2 * ep  # each (stack, ep block) owned by one edp replica
    # a stack name is owned by the same edp index on every EP rank: its owners form whole EP groups
    flags = torch.tensor([float(opt.owns(params[n])) for n in EXPERTS], dtype=torch.float64)
    table = torch.empty(world * len(EXPERTS), dtype=torch.float64)
    dist.all_gather_single(table, flags)
    for block in table.view(world // ep, ep, len(EXPERTS)):
        assert (block == block[0]).all(), table


# Every option changes the result (and must change it the same way in both optimizers): a DistributedMuonClip
# that ignored one of them (e.g. nesterov=False or ns_steps) would differ from MuonClip here.
OPTION_VARIANTS = [dict(nesterov=False), dict(ns_steps=2), dict(momentum=0.5), dict(weight_decay=0.0),
                   dict(adamw_betas=(0.5, 0.9)), dict(adamw_eps=1e-2), dict(lr=0.2),
                   dict(ns_coefficients="polar_express"), dict(ns_path="gram", ns_steps=3)]
ADAMW_LR = {"adamw": {"lr": 0.3 * HP["lr"]}, "adamw_no_decay": {"lr": 0.3 * HP["lr"]}}  # what adamw_lr_scale sets


def _options_worker(rank: int, world: int) -> None:
    for variant in OPTION_VARIANTS:
        _tp_worker(rank, world, {**HP, **variant})
    _tp_worker(rank, world, HP, group_options=ADAMW_LR)


# ---------------------------------------------------------------- reductions started from backward
def _overlap_worker(rank: int, world: int) -> None:
    """A real model, gradient accumulation over 2 micro batches, 4 KiB buckets: with the reductions started by
    backward's hooks the run is bitwise the run that reduces after backward, and every bucket did start there."""
    from models import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, inter_dim=32, moe_inter_dim=8, n_routed_experts=4,
                      max_seq_len=16)

    def run(overlap: bool, zero_grad: bool = True):
        torch.manual_seed(0)
        model = Transformer(cfg).double()
        opt = DistributedMuonClip(build_param_groups(model.named_parameters()), {}, OptimizerGroups(),
                                  bucket_cap_mb=4 / 1024, overlap_reduce=overlap, **HP)
        opt.backward_passes_per_step = 2
        started = []
        for step in range(3):
            for micro in range(2):
                g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
                tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
                logits = model(tokens[:, :-1])
                (nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) / 2).backward()
            opt.reduce_gradients()
            opt.clip_grad_norm_(0.05)  # below the norms seen: clipping active
            opt.step()
            started.append(opt.last_step_stats["reduced_in_backward"])
            if zero_grad:
                opt.zero_grad()
        n_buckets, dropped = len(opt.buckets), weakref.ref(opt)
        del opt
        gc.collect()
        assert dropped() is None  # the gradient hooks do not keep a dropped optimizer's buffers alive
        return model, started, n_buckets

    overlapped, started, n_buckets = run(True)
    after, started_after, _ = run(False)
    # without zero_grad() between steps backward makes fresh .grad tensors (step() leaves None): copied in
    unzeroed, started_unzeroed, _ = run(True, zero_grad=False)
    assert n_buckets >= 6 and started == [n_buckets] * 3 and started_after == [0] * 3, (n_buckets, started)
    assert started_unzeroed == [n_buckets, 0, 0], started_unzeroed
    for (n, p), q, r in zip(overlapped.named_parameters(), after.parameters(), unzeroed.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), n
    _assert_identical(list(overlapped.parameters()), dist.group.WORLD, "params")


def _bf16_buckets_worker(rank: int, world: int) -> None:
    """bf16 params: after each step's reduction an owned param's float32 bucket slice is the float32 mean over dp of
    the sum of its 2 micro batches' bf16 gradients (each moved into the bucket after its backward, not summed in
    bf16), with the reductions started by backward or after it, and with or without ``zero_grad()`` between steps
    (then the first gradient of a step zeroes the bucket a step spent: it held the reduced gradients and the
    broadcast bf16 params). The exact sums are float64 sums of bf16 values: float32 rounding only."""
    bf16 = torch.bfloat16
    for overlap in (True, False):
        for zero_grad in (True, False):
            params = {n: nn.Parameter(p.detach().to(bf16)) for n, p in _make(DENSE, frozen=False).items()}
            opt = DistributedMuonClip(build_param_groups(params.items()), {}, OptimizerGroups(),
                                      bucket_cap_mb=1 / 1024, overlap_reduce=overlap,
                                      **dict(HP, ns_dtype=torch.float32))
            opt.backward_passes_per_step = 2
            assert len(opt.buckets) >= 4 and all(f.dtype == torch.float32 for f in opt._flat)
            for step in range(2):  # without zero_grad(), step 1 starts with spent buckets
                for micro in range(2):  # the gradient of sum(p * c) is c (bf16) exactly
                    sum((p * _grad(f"{n}/{micro}", rank, step, p.shape).to(bf16)).float().sum()
                        for n, p in params.items()).backward()
                opt.reduce_gradients()
                for n, p in params.items():
                    if opt.owns(p):
                        expected = sum(_grad(f"{n}/{m}", d, step, p.shape).to(bf16).double()
                                       for d in range(world) for m in range(2)) / world
                        torch.testing.assert_close(opt.grad(p).double(), expected, rtol=1e-6, atol=1e-5,
                                                   msg=lambda m: f"{n} step {step} overlap {overlap} "
                                                                 f"zero_grad {zero_grad}: {m}")
                opt.step()
                if zero_grad:
                    opt.zero_grad()


def _order_worker(rank: int, world: int) -> None:
    """Buckets are listed, so reduced, in the order backward completes them (recorded by hooks on a real
    backward): with the model's parameter order the head's bucket is first and each bucket is complete no later
    than the next; in the param groups' order (rule by rule) the head's bucket came after every Muon bucket."""
    from models import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, inter_dim=32, moe_inter_dim=8, n_routed_experts=4,
                      max_seq_len=16)

    def completion(param_order: bool) -> tuple[list[int], list]:
        torch.manual_seed(0)
        model = Transformer(cfg).double()
        completed: list[str] = []
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda _, n=n: completed.append(n))
        names = [n for n, _ in model.named_parameters()] if param_order else None
        opt = DistributedMuonClip(build_param_groups(model.named_parameters()), {}, OptimizerGroups(),
                                  bucket_cap_mb=4 / 1024, param_order=names, **HP)
        tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(rank))
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        when = {n: i for i, n in enumerate(completed)}
        return [max(when[s.name] for s in b.slots) for b in opt.buckets], opt.buckets

    done, buckets = completion(True)
    assert len(buckets) >= 6 and done == sorted(done), done
    assert [s.name for s in buckets[0].slots] == ["lm_head.weight"]
    assert "embed_tokens.weight" in [s.name for s in buckets[-1].slots]
    unordered, _ = completion(False)
    assert unordered != sorted(unordered)  # what param_order fixes


# ---------------------------------------------------------------- parameters without a gradient
NEVER = {"layers.0.mlp.unused_proj.weight": (16, 8), "layers.0.mlp.unused_scale": (8,)}  # Muon, AdamW (decayed)
SOMETIMES = {"layers.0.mlp.gate_proj.weight": (24, 8), "layers.0.mlp.gate_scale": (6,)}
PRESENT = [(), (0,), (1,), (), (0, 1)]  # per step: the dp ranks where SOMETIMES get a gradient (from backward)


def _unused_worker(rank: int, world: int) -> None:
    """dp=2: a matrix and a vector that never get a gradient, and a matrix and a vector that get one on no rank, on
    one, on the other or on both (by backward, through the hooks): one process skips a parameter whose ``.grad``
    is None (no momentum decay, no AdamW step, no weight decay) and sees the missing rank's share as zero. Each
    owner has or lacks its own gradient in some step, so both ways of deciding run; as one reduce per owner and as
    small all-reduced buckets. Reduction, clipping and step read nothing on the host: an owner that lacks its own
    gradient gates the parameter's step by the reduced flag on the device, Muon and AdamW alike."""
    from tests.audit import NoDeviceSync

    for options in ({}, dict(all_reduce_min_bytes=0, bucket_cap_mb=2**-10), dict(slice_min_bytes=0)):
        params = _make({**DENSE, **NEVER, **SOMETIMES})
        ref = _clone(params)
        opt = DistributedMuonClip(build_param_groups(list(params.items())), {}, OptimizerGroups(), **options, **HP)
        ref_opt = MuonClip(build_param_groups(list(ref.items())), **HP)
        opt.init_state()
        for step, ranks in enumerate(PRESENT, start=1):
            for n in DENSE:
                params[n].grad = _grad(n, rank, step, params[n].shape)
                ref[n].grad = _mean_grad(n, world, step, params[n].shape)
            for n in SOMETIMES:
                if rank in ranks:  # backward's gradient: accumulated in place in the bucket, its hook counts it
                    (params[n] * _grad(n, rank, step, params[n].shape)).sum().backward()
                if ranks:
                    ref[n].grad = sum(_grad(n, d, step, params[n].shape) for d in ranks) / world
            with NoDeviceSync():
                opt.reduce_gradients()
                norm = opt.clip_grad_norm_(MAX_NORM)
                opt.step()
            ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.values() if p.grad is not None], MAX_NORM)
            assert abs(norm.item() - ref_norm.item()) < TOL * ref_norm.item(), (norm, ref_norm)
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
        for n, p in params.items():
            _assert_close(p, ref[n], n)
            if opt.owns(p):  # the state too: AdamW's step counts the steps with a gradient somewhere
                expected, shard = ref_opt.state.get(ref[n], {}), opt.row_shards().get(n)
                for key, value in opt.state[p].items():
                    want = expected[key] if expected else torch.zeros_like(value)
                    if expected and shard is not None and key != "step":  # the rows this rank keeps
                        want = want[shard.start:shard.start + shard.rows]
                    _assert_close(value, want, f"{n} {key}")
        assert bool(opt.row_shards()) == ("slice_min_bytes" in options)
        for n in NEVER:
            assert torch.equal(params[n], 0.2 * _seeded("init/" + n, NEVER[n])), n  # bitwise untouched
        _assert_identical(list(params.values()), dist.group.WORLD, "params")


def _no_tokens_worker(rank: int, world: int) -> None:
    """dp=2 x ep=2, a real MoE: the router bias sends every token to EP rank 0's experts, so EP rank 1's stacks see
    none; they still get their (zero) gradient in backward, as one process gives the whole stack one, so every
    bucket's reduction starts inside backward, and 2 steps match one process on the whole batch. In float64 the
    experts run as a loop of GEMMs, in float32 as grouped GEMMs (what training runs), where no rows mean no GEMM."""
    from parallel.dims import ParallelDims
    from parallel.parallelize import parallelize
    from tests.test_expert_parallel import ROWS_PER_RANK, SEQ, TINY
    from models import ModelConfig, Transformer

    pdims = ParallelDims(dp=world, tp=1, ep=2)
    groups = pdims.build("cpu")
    for dtype, path, tol in ((torch.float64, "loop", TOL), (torch.float32, "grouped", TOL32)):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**TINY)).to(dtype).train()
        ref = copy.deepcopy(model)
        placements = parallelize(model, pdims, groups)
        assert model.layers[1].mlp.experts.path(torch.device("cpu"), dtype) == path
        for m in (model, ref):
            for router in m.moe_routers():
                router.e_score_correction_bias.data[:TINY["n_activated_experts"]] = 100.0  # EP rank 0's experts
        opt = DistributedMuonClip(build_param_groups(model.named_parameters()), placements, groups,
                                  bucket_cap_mb=2**-10, param_order=[n for n, _ in model.named_parameters()], **HP)
        ref_opt = MuonClip(build_param_groups(ref.named_parameters()), **HP)
        for step in range(2):
            tokens = torch.randint(0, TINY["vocab_size"], (ROWS_PER_RANK * world, SEQ),
                                   generator=torch.Generator().manual_seed(step))
            local = tokens[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK]
            for m, batch in ((model, local), (ref, tokens)):
                m.reset_step_stats()
                logits = m(batch[:, :-1])
                nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
            assert all(r.expert_load_E[TINY["n_routed_experts"] // 2:].sum() == 0 for r in model.moe_routers())
            opt.step()
            ref_opt.step()
            assert opt.last_step_stats["reduced_in_backward"] == len(opt.buckets) > 4, (dtype, opt.last_step_stats)
            opt.zero_grad()
            ref_opt.zero_grad()
        ref_params = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            expected = ref_params[n].detach()
            if ".experts." in n:
                experts = model.get_submodule(n.rsplit(".", 1)[0])
                expected = expected[experts.expert_offset:experts.expert_offset + experts.n_local]
            _assert_close(p, expected, f"{n} ({dtype})", tol)


# ---------------------------------------------------------------- AdamW tensors split by rows (ZeRO-1 proper)
# rows on dp ranks 0 | 1: 17 | 16, 16 | 16, 5 | 4
SLICED = {"embed_tokens.weight": (33, 8), "lm_head.weight": (32, 8), "layers.0.mlp.bias": (9,)}
SLICE_MIN = 65  # bytes: the float64 tensors above are sliced, the (8,) norm (64 bytes) is owned whole



def _sliced_worker(rank: int, world: int) -> None:
    """dp=2, float64: the embedding, the head and a bias (odd row counts) are split by rows, each rank keeping the
    AdamW state of its rows only (1/dp of the bytes, the padding aside); the rest is owned whole as before. Five
    steps (gradients by backward's hooks, by hand inside ``grads_added_by_hand`` and set before the reduction) equal
    one process; the reduce-scatter and all-gather send each rank's segment: ceil(rows/2) rows of each tensor and a
    presence flag each (CountingComm's counts); a state_dict resume is bitwise. Then bf16 parameters with float32
    masters: slicing gives bitwise the run that owns every tensor whole (the sums of two ranks do not depend on the
    collective; no clipping, whose norm sums other partial sums), also with offloaded state and with the gradients
    reduced in bf16, every reduction started from backward's hooks."""
    shapes = {**DENSE, **SLICED}
    params = _make(shapes)
    ref = _clone(params)
    opt = DistributedMuonClip(build_param_groups(list(params.items())), {}, OptimizerGroups(),
                              slice_min_bytes=SLICE_MIN, **HP)
    ref_opt = MuonClip(build_param_groups(list(ref.items())), **HP)
    assert set(opt.row_shards()) == set(SLICED) and all(opt.owns(params[n]) for n in SLICED)
    assert [b.sliced for b in opt.buckets].count(True) == 1 and not any(opt._all_reduce)
    for step in range(1, STEPS + 1):
        for n, p in params.items():
            if not p.requires_grad:
                continue
            g = _grad(n, rank, step, p.shape)
            ref[n].grad = _mean_grad(n, world, step, p.shape)
            if n == "embed_tokens.weight" and step % 2:  # through autograd: the hook adds it into the segments
                (p * g).sum().backward()
            elif n == "lm_head.weight" and step % 2:  # by hand, as zero-bubble pipeline schedules add theirs
                with opt.grads_added_by_hand([p]):
                    p.grad = g
            else:
                p.grad = g
        _step_both(opt, ref, ref_opt)
        if step == 3:
            saved, at3 = copy.deepcopy(opt.state_dict()), _clone(params)
    for n, p in params.items():
        _assert_close(p, ref[n], n)
    _assert_identical(list(params.values()), dist.group.WORLD, "params")
    for n, shape in SLICED.items():  # this rank's rows (torch.chunk's, DTensor Shard(0)'s): 1/dp of the bytes
        mine = torch.arange(shape[0]).chunk(world)[rank]
        start, rows = int(mine[0]), len(mine)
        shard = opt.row_shards()[n]
        assert (shard.start, shard.rows, shard.shape) == (start, rows, shape), (n, shard)
        state, full = opt.state[params[n]], ref_opt.state[ref[n]]
        assert state["exp_avg"].shape == (rows, *shape[1:]) and state["step"].item() == STEPS, n
        for key in ("exp_avg", "exp_avg_sq"):
            _assert_close(state[key], full[key][start:start + rows], f"{n} {key}")
        nbytes = sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
        assert _world_sum(nbytes) == 2 * math.prod(shape) * 8 and nbytes <= 16 * -(-shape[0] // world) * shape[-1]
    # per step, each rank sends the other its segment of the gradients (float64: ceil(rows/2) rows of each tensor,
    # a presence flag each) and its updated rows
    segment = sum(-(-s[0] // world) * math.prod(s[1:]) for s in SLICED.values())
    assert opt.comm_bytes["reduce_scatter"] == STEPS * (world - 1) * (segment + len(SLICED)) * 8
    assert opt.comm_bytes["all_gather"] == STEPS * (world - 1) * segment * 8
    assert opt.comm_bytes["reduce"] > 0 and opt.comm_bytes["broadcast"] > 0  # the tensors owned whole
    resumed = DistributedMuonClip(build_param_groups(list(at3.items())), {}, OptimizerGroups(),
                                  slice_min_bytes=SLICE_MIN, **HP)
    resumed.init_state()
    resumed.load_state_dict(saved)
    for step in (4, 5):
        for n, p in at3.items():
            if p.requires_grad:
                p.grad = _grad(n, rank, step, p.shape)
        resumed.clip_grad_norm_(MAX_NORM)
        resumed.step()
        resumed.zero_grad()
    for n, p in params.items():
        assert torch.equal(at3[n], p), f"{n} after a resume"

    # bf16 parameters, float32 masters: sliced == owned whole, bit for bit (no clipping: the norm's partial sums differ)
    def run(slice_min: int, **options) -> dict[str, torch.Tensor]:
        ps = {n: nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad)
              for n, p in _make(shapes).items()}
        o = DistributedMuonClip(build_param_groups(list(ps.items())), {}, OptimizerGroups(), slice_min_bytes=slice_min,
                                **options, **dict(HP, ns_dtype=torch.float32))
        for step in range(1, 4):
            for n, p in ps.items():
                if p.requires_grad:
                    (p * _grad(n, rank, step, p.shape).to(torch.bfloat16)).float().sum().backward()
            o.step()
            assert o.last_step_stats["reduced_in_backward"] == len(o.buckets)  # the sliced one's too: hooks start it
            o.zero_grad()
        assert bool(o.row_shards()) == (slice_min == SLICE_MIN)
        if options.get("offload_state"):
            assert o.state_bytes("host") > 0
        return ps

    whole = run(2**40)
    for options in ({}, dict(offload_state=True), dict(reduce_dtype=torch.bfloat16)):
        sliced = run(SLICE_MIN, **options)
        base = whole if not options.get("reduce_dtype") else run(2**40, **options)
        for n, p in sliced.items():
            assert torch.equal(p, base[n]), (n, options)


# ---------------------------------------------------------------- one spawn per world size (startup dominates)
CHECKS = {"replicated": _replicated_worker, "resume_qkclip": _resume_and_qkclip_worker, "tp": _tp_worker,
          "post_step_clip": _post_step_clip_worker,
          "experts": _expert_worker, "options": _options_worker, "overlap": _overlap_worker, "order": _order_worker,
          "bf16_buckets": _bf16_buckets_worker, "unused": _unused_worker, "no_tokens": _no_tokens_worker,
          "sliced": _sliced_worker}


def _suite_worker(rank: int, world: int, out_dir: str, names: list[str]) -> None:
    for name in names:
        try:
            CHECKS[name](rank, world)
        except BaseException:
            with open(os.path.join(out_dir, f"{name}.{rank}.txt"), "w") as f:
                f.write(traceback.format_exc())
            raise  # later checks are not run (their collectives could not line up)
        with open(os.path.join(out_dir, f"{name}.{rank}.txt"), "w") as f:
            f.write("ok")


class _Suite:
    def __init__(self, world: int, names: list[str], out_dir: str) -> None:
        self.world, self.out_dir, self.error = world, out_dir, None
        try:
            run_distributed(_suite_worker, world, out_dir, names)
        except RuntimeError as e:
            self.error = str(e)

    def check(self, name: str) -> None:
        results = []
        for r in range(self.world):
            path = os.path.join(self.out_dir, f"{name}.{r}.txt")
            results.append(open(path).read() if os.path.exists(path) else None)
        if all(x == "ok" for x in results):
            return
        failed = [x for x in results if x not in (None, "ok")]
        pytest.fail(failed[0] if failed else f"check {name} did not run: {self.error}", pytrace=False)


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> _Suite:
    return _Suite(2, ["replicated", "resume_qkclip", "overlap", "order", "bf16_buckets", "post_step_clip", "unused",
                      "no_tokens", "sliced"],
                  str(tmp_path_factory.mktemp("dist2")))


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> _Suite:
    return _Suite(4, ["tp", "experts", "options"], str(tmp_path_factory.mktemp("dist4")))


def test_replicated_params_match_single_process_dp2(world2):
    world2.check("replicated")


def test_reductions_started_by_backward_equal_reducing_after_it_dp2(world2):
    world2.check("overlap")


def test_buckets_are_reduced_in_the_order_backward_completes_them_dp2(world2):
    world2.check("order")


def test_bf16_gradients_accumulate_in_float32_buckets_also_without_zero_grad_dp2(world2):
    world2.check("bf16_buckets")


def test_a_parameter_without_a_gradient_is_skipped_as_in_one_process_dp2(world2):
    world2.check("unused")


def test_experts_without_tokens_keep_the_overlap_and_match_one_process_dp2_ep2(world2):
    world2.check("no_tokens")


def test_large_adamw_tensors_are_split_by_rows_and_match_one_process_dp2(world2):
    world2.check("sliced")


def test_state_dict_resume_and_qkclip_dp2(world2):
    world2.check("resume_qkclip")


def test_post_step_qk_clip_of_bf16_params_makes_no_broadcast_dp2(world2):
    world2.check("post_step_clip")


def test_tensor_parallel_exact_muon_dp2_tp2(world4):
    world4.check("tp")


def test_experts_batched_on_ep_rank_dp4_ep2(world4):
    world4.check("experts")


def test_every_optimizer_option_matches_muonclip_dp2_tp2(world4):
    world4.check("options")


def test_same_shape_matrices_share_one_batched_newton_schulz_call():
    """orthogonalize_batched: one call per (shape, ns settings) group, expert stacks joining as E matrices;
    results equal per-matrix Newton–Schulz (float64) and keep each input's shape."""
    from muonclip._dist_comm import NSItem, orthogonalize_batched
    from muonclip.muon import orthogonalize

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (3, 4, 6), (5, 3), (4, 6), (4, 6), (5, 3)]
    steps = [5, 5, 5, 5, 3, 5]  # item 4 has other ns settings: its own call
    items = [NSItem(torch.randn(*s, generator=g, dtype=torch.float64), ns_rank=0, ns_steps=n)
             for s, n in zip(shapes, steps)]
    calls = []

    def orth(update, item):
        calls.append(tuple(update.shape))
        return orthogonalize(update, item.ns_steps, eps=item.ns_eps, ns_dtype=torch.float64)

    fulls = {i: it.update for i, it in enumerate(items)}
    outs = orthogonalize_batched(fulls, items, orth)
    assert sorted(calls) == sorted([(5, 4, 6), (2, 5, 3), (4, 6)])
    assert sorted(outs) == list(range(len(items)))
    for i, it in enumerate(items):
        ref = orthogonalize(it.update, it.ns_steps, eps=it.ns_eps, ns_dtype=torch.float64)
        assert outs[i].shape == it.update.shape
        torch.testing.assert_close(outs[i], ref, rtol=0, atol=1e-12)
