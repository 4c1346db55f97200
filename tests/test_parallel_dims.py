"""ParallelDims validation and rank layout, group construction on 4 gloo ranks, and the full parallelize step
(dp=2, tp=2, ep=2 with activation checkpointing) against the single-process model (one 4-process run)."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import muonclip
from parallel.dims import ParallelDims
from parallel.parallelize import ParallelizeConfig, parallelize
from models import ModelConfig, Transformer
from tests.dist_utils import run_distributed


@pytest.mark.parametrize("kwargs, match", [
    (dict(dp=0), "dp must be an integer >= 1"),
    (dict(tp=-1), "tp must be an integer >= 1"),
    (dict(dp=4, ep=3), r"ep \(3\) must divide dp \* cp \(4\).*\[1, 2, 4\]"),
    (dict(dp=2, ep=2.0), "ep must be an integer"),
])
def test_invalid_dims(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_world_and_model_checks():
    with pytest.raises(ValueError, match=r"world size 4 != pp\*dp\*cp\*tp = 1\*3\*1\*2"):
        ParallelDims(dp=3, tp=2).check_world(4)
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=2, attn_type="mha", n_heads=4, n_kv_heads=4, head_dim=4,
                      inter_dim=30, moe_inter_dim=8, n_routed_experts=6, n_activated_experts=2, first_k_dense=1)
    with pytest.raises(ValueError, match=r"inter_dim \(30\) must be divisible by tp \(4\).*n_routed_experts \(6\)"):
        ParallelDims(dp=4, tp=4, ep=4).check_model(cfg)
    ParallelDims(dp=6, tp=2, ep=3).check_model(cfg)


def test_group_layout():
    # rank = dp_index * tp + tp_index; EP blocks are consecutive dp indices; EDP strides over blocks
    ranks = ParallelDims(dp=4, tp=2, ep=2).group_ranks()
    assert ranks["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ranks["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert ranks["ep"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert ranks["edp"] == [[0, 4], [2, 6], [1, 5], [3, 7]]
    for kind, lists in ranks.items():  # each kind partitions the world
        assert sorted(r for g in lists for r in g) == list(range(8)), kind
    # context parallelism: the replica axis is dp x cp (data index = replica // cp); CP groups are consecutive
    # replica indices; dp_group is the whole replica axis, EP borrows from it
    ranks = ParallelDims(dp=2, tp=2, ep=2, cp=2).group_ranks()
    assert ranks["cp"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert ranks["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert ranks["ep"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be divisible by tp \* cp \(2 \* 4\)"):
        ParallelDims(dp=1, tp=2, cp=4).check_model(ModelConfig(vocab_size=32, dim=16, n_layers=1, attn_type="mha",
                                                               n_heads=4, n_kv_heads=4, head_dim=4))
    single = ParallelDims().build("cpu")  # no process group: sizes 1, groups None
    assert (single.data_rank, single.data_size, single.tp_size, single.ep_size, single.tp_group) == (0, 1, 1, 1, None)


def test_expert_groups_folded_over_the_stage_under_sequence_parallelism():
    """Under sequence parallelism each rank of a stage routes its own tokens: the expert groups cut the stage's ranks
    s = replica * tp + tp_index into ep index s % ep and edp index s // ep (Megatron's MoE parallel folding); at tp 1
    that is the replica-axis layout, and tp > 1 without sequence parallelism keeps it (TP peers' experts are copies)."""
    ranks = ParallelDims(dp=4, tp=2, ep=4, sp=True).group_ranks()
    assert ranks["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ranks["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert ranks["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]] and ranks["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    ranks = ParallelDims(dp=1, tp=2, ep=2, sp=True).group_ranks()
    assert ranks["ep"] == ranks["tp"] == [[0, 1]] and ranks["edp"] == [[0], [1]]  # the EP group is the TP pair
    ranks = ParallelDims(dp=1, tp=2, ep=1, sp=True).group_ranks()
    assert ranks["ep"] == [[0], [1]] and ranks["edp"] == [[0, 1]]  # ep 1: every expert on each, reduced over the stage
    ranks = ParallelDims(dp=2, tp=2, ep=2, pp=2, sp=True).group_ranks()  # inside each pipeline stage
    assert ranks["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]] and ranks["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    ranks = ParallelDims(dp=1, tp=2, ep=4, cp=2, sp=True).group_ranks()  # s = (data * cp + c) * tp + t
    assert ranks["ep"] == [[0, 1, 2, 3]] and ranks["edp"] == [[0], [1], [2], [3]]
    assert (ParallelDims(dp=4, tp=2, ep=4, sp=True).edp, ParallelDims(dp=4, tp=2, ep=2).edp) == (2, 2)
    # tp 1: today's groups, element for element and in creation order
    for kw in (dict(dp=4, ep=2), dict(dp=2, cp=2, ep=4), dict(dp=2, ep=2, pp=2), dict(dp=8, ep=2)):
        d = ParallelDims(**kw)
        R, ep, pp = d.replicas, d.ep, d.pp
        assert d.group_ranks()["ep"] == [[p * R + b * ep + e for e in range(ep)] for p in range(pp)
                                         for b in range(R // ep)], kw
        assert d.group_ranks()["edp"] == [[p * R + b * ep + e for b in range(R // ep)] for p in range(pp)
                                          for e in range(ep)], kw
    # tp 2 without sequence parallelism: experts copied over TP, EP over the replica axis (test_group_layout)
    assert ParallelDims(dp=4, tp=2, ep=2).group_ranks()["ep"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    with pytest.raises(ValueError, match=r"ep \(4\) must divide dp \* cp \* tp \(2\).*folded.*\[1, 2\]"):
        ParallelDims(dp=1, tp=2, ep=4, sp=True)
    with pytest.raises(ValueError, match=r"ep \(2\) must divide dp \* cp \(1\)"):
        ParallelDims(dp=1, tp=2, ep=2)


def _check_groups(rank):
    for dims in (ParallelDims(dp=2, tp=2, ep=2), ParallelDims(dp=4, tp=1, ep=2), ParallelDims(dp=1, tp=4),
                 ParallelDims(dp=2, tp=2, ep=2, sp=True)):
        g = dims.build("cpu")
        layout = dims.group_ranks()
        for kind in ("dp", "tp", "ep", "edp"):
            members = dist.get_process_group_ranks(getattr(g, f"{kind}_group"))
            assert members in layout[kind] and rank in members, (dims, kind, members)
            assert members.index(rank) == getattr(g, f"{kind}_rank"), (dims, kind)
            assert len(members) == getattr(g, f"{kind}_size"), (dims, kind)
        assert (g.data_rank, g.data_size) == (rank // dims.tp, dims.dp)
        with pytest.raises(AttributeError):
            g.tp_rank = 3  # frozen
    cp = ParallelDims(dp=2, tp=1, cp=2).build("cpu")  # replica r = data * 2 + cp index
    assert dist.get_process_group_ranks(cp.cp_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert (cp.cp_rank, cp.cp_size, cp.data_rank, cp.data_size, cp.dp_size) == (rank % 2, 2, rank // 2, 2, 4)


CFG = dict(vocab_size=42, dim=24, n_layers=3, attn_type="mla", n_heads=4, q_lora_rank=10, kv_lora_rank=12,
           qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6, inter_dim=32, moe_inter_dim=8,
           n_routed_experts=4, n_activated_experts=2, n_shared_experts=2, first_k_dense=1, max_seq_len=16)
TOL = dict(rtol=1e-6, atol=1e-9)


def _ce_sum(model, tokens, n_global):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).double(), tokens[:, 1:].flatten(), reduction="sum") / n_global


def _gather(t, dim, group, size):
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _parallelize_worker(rank, world_size):
    _check_groups(rank)
    pdims = ParallelDims(dp=2, tp=2, ep=2)
    groups = pdims.build("cpu")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG)).double().train()
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, CFG["vocab_size"], (4, 11), generator=torch.Generator().manual_seed(3))
    n_global = tokens[:, 1:].numel()
    ref_loss = _ce_sum(ref, tokens, n_global)
    ref_loss.backward()

    placements = parallelize(model, pdims, groups, ParallelizeConfig(activation_checkpointing=True))
    calls = []
    model.layers[1].mlp.gate.register_forward_hook(lambda *_: calls.append(1))
    local = tokens[groups.data_rank * 2:(groups.data_rank + 1) * 2]
    loss = _ce_sum(model, local, n_global)
    loss.backward()
    assert len(calls) == 2, "activation checkpointing should recompute the block in backward"

    total = loss.detach().clone()
    dist.all_reduce(total, group=groups.dp_group)
    torch.testing.assert_close(total, ref_loss.detach(), **TOL)
    ref_params = dict(ref.named_parameters())
    assert set(placements) == set(ref_params)  # names unchanged by EP, TP and checkpointing
    for name, p in model.named_parameters():
        pl, ref_p = placements[name], ref_params[name]
        if ref_p.grad is None:
            continue
        grad, full = p.grad.clone(), ref_p.grad
        if pl.kind == "expert":
            experts = model.get_submodule(name.rsplit(".", 1)[0])
            full = full[experts.expert_offset:experts.expert_offset + experts.n_local]
            dist.all_reduce(grad, group=groups.edp_group)
        else:
            if pl.kind == "tp_sharded":
                grad = _gather(grad, pl.shard_dim, groups.tp_group, groups.tp_size)
            dist.all_reduce(grad, group=groups.dp_group)
        torch.testing.assert_close(grad, full, **TOL, msg=name)
    kinds = {k: sum(pl.kind == k for pl in placements.values()) for k in ("expert", "tp_sharded")}
    assert kinds == {"expert": 2 * 3, "tp_sharded": 3 * 3 + 3 + 2 * 3 + 2}, kinds  # + the vocab-split embedding, head
    # statistics count each forward once despite the recomputation
    for r_ref, r in zip(ref.moe_routers(), model.moe_routers()):
        load = r.expert_load_E.clone()
        dist.all_reduce(load, group=groups.dp_group)
        assert torch.equal(load, r_ref.expert_load_E)
    for spec, ref_spec in zip(model.qk_clip_specs(), ref.qk_clip_specs()):
        m = spec["max_logits"].clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=groups.dp_group)
        torch.testing.assert_close(m, ref_spec["max_logits"][groups.tp_rank * 2:groups.tp_rank * 2 + 2])

    # post-step QK-Clip through EP all-to-alls, TP-sharded heads and checkpointed blocks = one process, whole batch
    tau = float(torch.cat([s["max_logits"] for s in ref.qk_clip_specs()]).median())
    muonclip.QKClip(ref.qk_clip_specs(), tau=tau).apply_post_step(lambda: ref.eval()(tokens))
    clip = muonclip.QKClip(model.qk_clip_specs(), tau=tau, process_group=groups.dp_group)
    with torch.no_grad():
        clip.apply_post_step(lambda: model.eval()(local))
    clipped = clip.last_clipped.clone()
    dist.all_reduce(clipped, group=groups.tp_group)
    assert clipped > 0
    for name, p in model.named_parameters():
        pl, full = placements[name], ref_params[name].detach()
        w = p.detach()
        if pl.kind == "expert":
            experts = model.get_submodule(name.rsplit(".", 1)[0])
            full = full[experts.expert_offset:experts.expert_offset + experts.n_local]
        elif pl.kind == "tp_sharded":
            w = _gather(w, pl.shard_dim, groups.tp_group, groups.tp_size)
        torch.testing.assert_close(w, full, rtol=1e-6, atol=1e-12, msg=name)


def test_groups_and_parallelize_dp2_tp2_ep2_with_checkpointing():
    """One 4-process run: group membership for three layouts, then the full parallelize step."""
    run_distributed(_parallelize_worker, 4)


def test_pipeline_axis_is_outermost_and_every_other_group_stays_inside_one_stage():
    ranks = ParallelDims(dp=2, tp=2, ep=2, pp=2).group_ranks()
    assert ranks["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]  # same (dp, tp) index, consecutive pipeline indices
    assert ranks["stage"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ranks["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]] and ranks["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert ranks["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]] and ranks["edp"] == [[0], [2], [1], [3], [4], [6], [5], [7]]
    for kind in ("tp", "dp", "ep", "edp"):
        assert all(len({r // 4 for r in group}) == 1 for group in ranks[kind]), kind
    assert "pp" not in ParallelDims(dp=2).group_ranks()  # no singleton groups without a pipeline
    with pytest.raises(ValueError, match=r"world size 4 != pp\*dp\*cp\*tp = 2\*1\*1\*1 = 2"):
        ParallelDims(pp=2).check_world(4)
