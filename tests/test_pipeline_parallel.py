"""Pipeline parallelism: the layer split, stage placement, and pp=2 schedules that reproduce one process's losses
and gradients (float64, MLA + MoE) with global parameter names."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, Transformer
from parallel.pipeline_parallel import balanced_split, prune_to_stage, split_layers, stage_ids, unit_costs
from tests.dist_utils import run_distributed

CFG = dict(vocab_size=64, dim=32, n_layers=4, first_k_dense=1, attn_type="mla", n_heads=2, q_lora_rank=0,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=16, inter_dim=64,
           moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1)
N_MICRO, BATCH, SEQ, SEED = 4, 8, 12, 7


def test_balanced_split_is_contiguous_and_minimises_the_largest_stage():
    costs = [5.0, 1.0, 1.0, 1.0, 1.0, 5.0]
    split = balanced_split(0.0, costs, 0.0, 3)
    assert sum(split, []) == list(range(6)) and all(split)
    assert max(sum(costs[i] for i in s) for s in split) == 5.0  # [0] [1..4] [5]
    heavy_ends = balanced_split(4.0, [1.0] * 8, 4.0, 2)  # embedding and head count
    assert [len(s) for s in heavy_ends] == [4, 4]
    assert [len(s) for s in balanced_split(8.0, [1.0] * 8, 0.0, 2)] == [1, 7]  # max(8+1, 7) = 9 beats max(10, 6)
    with pytest.raises(ValueError, match="between 1 and n_layers"):
        balanced_split(0.0, [1.0] * 3, 0.0, 4)


def test_balanced_split_spreads_what_the_largest_stage_leaves_evenly():
    """Many splits reach the smallest largest stage (here: the heavy first layer alone); the rule then takes the
    most even one, not e.g. [1], [4], [1], [1] (same maximum, four layers of parameters on one rank)."""
    assert [len(s) for s in balanced_split(0.0, [4.0] + [1.0] * 6, 0.0, 4)] == [1, 2, 2, 2]
    from configs import load_config
    k2 = load_config(Path(__file__).resolve().parent.parent / "configs" / "kimi_k2.yaml", []).model
    split = split_layers(k2, 32)  # K2's 61 layers over 16 ranks x 2 virtual stages: none holds 3
    assert sum(split, []) == list(range(61)) and max(len(s) for s in split) == 2


def test_split_rule_counts_dense_and_moe_layers_and_explicit_lists():
    cfg = ModelConfig(**{**CFG, "n_layers": 8, "first_k_dense": 3, "inter_dim": 512})  # heavy dense layers
    embed, layers, head = unit_costs(cfg)
    assert layers[0] > layers[3] and embed == head == 32 * 64
    split = split_layers(cfg, 2)
    assert len(split[0]) < len(split[1])  # the three dense layers weigh more
    assert split_layers(cfg, 2, [3, 5]) == [[0, 1, 2], [3, 4, 5, 6, 7]]
    with pytest.raises(ValueError, match="sum to model.n_layers"):
        split_layers(cfg, 2, [3, 4])


def test_stage_placement_per_schedule():
    assert [stage_ids(r, 2, 1, "1f1b") for r in range(2)] == [[0], [1]]
    assert [stage_ids(r, 2, 2, "interleaved_1f1b") for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_ids(r, 4, 2, "zbv") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    with pytest.raises(ValueError, match="exactly 2 stages per rank"):
        stage_ids(0, 2, 3, "dualpipev")
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        stage_ids(0, 2, 1, "gpipe2")


def test_pruned_stages_keep_global_names_and_compose_to_the_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG)).double()
    import copy
    first = prune_to_stage(copy.deepcopy(model), [0, 1], first=True, last=False)
    last = prune_to_stage(copy.deepcopy(model), [2, 3], first=False, last=True)
    names = set(first.state_dict()) | set(last.state_dict())
    assert names == set(model.state_dict()) and not set(first.state_dict()) & set(last.state_dict())
    assert "layers.2.self_attn.o_proj.weight" in last.state_dict()
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    hidden = first(tokens)
    assert hidden.shape == (2, SEQ, 32)
    torch.testing.assert_close(last(hidden), model(tokens), rtol=0, atol=1e-12)


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 64, (BATCH, SEQ), generator=g), torch.randint(0, 64, (BATCH, SEQ), generator=g)


def _loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _pp_worker(rank, world_size, out, schedule, virtual):
    import torch.distributed as dist

    from parallel.init import init_sharded
    from parallel.pipeline_parallel import build_pipeline

    with torch.device("meta"):  # the trainer's path: meta model, each pruned stage allocated and initialised alone
        model = Transformer(ModelConfig(**CFG))
    rules, shapes = model.init_rules(), {n: tuple(p.shape) for n, p in model.named_parameters()}

    def prepare(stage):
        init_sharded(stage, rules, shapes, {}, 0, SEED, torch.device("cpu"))
        stage.double()

    pipe = build_pipeline(model, rank, world_size, dist.group.WORLD, torch.device("cpu"), N_MICRO, _loss,
                          schedule=schedule, virtual=virtual, prepare=prepare)
    inputs, targets = _data()
    losses: list = []
    pipe.schedule.step(*([inputs] if pipe.has_first else []), target=targets if pipe.has_last else None,
                       losses=losses)
    grads = {n: p.grad for m in pipe.modules for n, p in m.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "losses": [float(x) for x in losses], "stages": pipe.stages},
               Path(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("schedule,virtual", [("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2), ("dualpipev", 2)])
def test_pp2_schedules_match_one_process(tmp_path, schedule, virtual):
    run_distributed(_pp_worker, 2, str(tmp_path), schedule, virtual)
    ref = Transformer(ModelConfig(**CFG))
    ref.init_weights(SEED)
    ref.double()
    inputs, targets = _data()
    micro = [_loss(ref(x), y) for x, y in zip(inputs.chunk(N_MICRO), targets.chunk(N_MICRO))]
    (sum(micro) / N_MICRO).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    results = [torch.load(Path(tmp_path, f"rank{r}.pt")) for r in range(2)]
    assert sorted(sum((r["stages"] for r in results), [])) == list(range(2 * virtual))
    losses = [x for r in results for x in r["losses"]]
    assert losses == pytest.approx([float(m.detach()) for m in micro], abs=1e-12)  # per micro batch, on the last stage
    grads = {n: g for r in results for n, g in r["grads"].items()}
    assert grads.keys() == ref_grads.keys()  # every parameter on exactly one stage, under its global name
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("schedule,pp", [("interleaved_1f1b", 4), ("zbv", 2), ("dualpipev", 2)])
def test_the_planned_pass_is_lowered_as_torch_lowers_it(schedule, pp):
    """The planner's and the send ledger's view of a pass (parallel/pipeline_runtime.py ``lowered_order``, with its
    linear-time FSDP prefetch pass) is torch's own lowering of its compute order, action for action."""
    from torch.distributed.pipelining import schedules as pps

    from parallel.pipeline_runtime import compute_order, flatten, lowered_order, stage_to_rank

    order = compute_order(schedule, pp, 2, 8)
    torchs = pps._add_send_recv({r: pps._add_reduce_grad(pps._add_unshard_reshard(a), 8) for r, a in order.items()},
                                stage_to_rank(schedule, pp, 2), 2 * pp)
    assert lowered_order(schedule, pp, 2, 8) == {r: flatten(a) for r, a in torchs.items()}


def _logged(action, name, events):
    def run(*args, **kwargs):
        out = action(*args, **kwargs)
        events.append(name)
        return out
    return run


def _progress_worker(rank, world_size, out):
    import torch.distributed as dist

    from parallel.init import init_sharded
    from parallel.pipeline_parallel import build_pipeline

    with torch.device("meta"):
        model = Transformer(ModelConfig(**CFG))
    rules, shapes = model.init_rules(), {n: tuple(p.shape) for n, p in model.named_parameters()}
    cpu = torch.device("cpu")

    def prepare(stage):
        init_sharded(stage, rules, shapes, {}, 0, SEED, cpu)

    results = {}
    for schedule, virtual in (("1f1b", 1), ("zbv", 2)):
        pipe = build_pipeline(model, rank, world_size, dist.group.WORLD, cpu, N_MICRO, _loss, schedule=schedule,
                              virtual=virtual, prepare=prepare)
        events: list[str] = []
        pipe.report_progress(lambda: events.append("progress"))
        for stage in pipe.torch_stages:  # outside report_progress's wrappers: log each action as it returns
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                action = getattr(stage, name, None)
                if action is not None:
                    setattr(stage, name, _logged(action, name, events))
        inputs, targets = _data()
        pipe.schedule.step(inputs, target=targets, losses=[])
        results[schedule] = events
    torch.save(results, Path(out, "events.pt"))


def test_every_pipeline_action_reports_progress_to_the_watchdog(tmp_path):
    """The watchdog counts progress per pipeline action under PP (``Pipeline.report_progress``), so a step of many
    micro batches, or a long backward, is not "stuck": as torch's schedules run them (1F1B; zero bubble, with its
    weight-gradient halves), every forward, backward and weight action reports progress once within its call.
    One process holds every stage (pp=1 group): the schedules call the same stage methods as at pp > 1."""
    run_distributed(_progress_worker, 1, str(tmp_path))
    for schedule, events in torch.load(tmp_path / "events.pt").items():
        stages = 1 if schedule == "1f1b" else 2
        actions = events[1::2]
        assert events[0::2] == ["progress"] * len(actions), (schedule, events)  # one report within each action
        kinds = ["forward_one_chunk", "backward_one_chunk"] + (["backward_weight_one_chunk"] if stages == 2 else [])
        counts = {k: actions.count(k) for k in set(actions)}
        assert counts == dict.fromkeys(kinds, N_MICRO * stages), (schedule, actions)
