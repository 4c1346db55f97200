"""Sharded initialisation: every layout starts from the single-process weights, and a rank allocates its shard only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from configs import load_config
from models import Transformer
from models.init import fill_, normal
from tests.audit import vm_bytes
from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "configs" / "debug.yaml"
BIG = ["--model.dim=256", "--model.n_layers=3", "--model.n_routed_experts=32", "--model.moe_inter_dim=2048"]


def _cfg(tmp, *overrides):
    return load_config(DEBUG, [f"--train.output_dir={tmp}", f"--data.data_dir={ROOT / 'data' / 'cache'}", *overrides])


def test_init_depends_only_on_seed_and_name():
    cfg = _cfg("/tmp/unused").model
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(seed=7)
    torch.randn(100)  # the global generator moving in between changes nothing
    b.init_weights(seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    b.init_weights(seed=8)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    full = a.layers[1].mlp.experts.gate_proj
    part = torch.empty(2, *full.shape[1:])
    fill_(part, normal(0.02, per_expert=True), 7, "layers.1.mlp.experts.gate_proj", expert_offset=2)
    assert torch.equal(part, full[2:4])  # experts 2..3 alone, drawn on their own
    w = a.layers[0].self_attn.o_proj.weight
    rows = torch.empty(w.shape[0], w.shape[1] // 2)
    fill_(rows, normal(a.init_rules()["layers.0.self_attn.o_proj.weight"].std), 7, "layers.0.self_attn.o_proj.weight",
          shard=(1, w.shape[1] // 2, tuple(w.shape)))
    assert torch.equal(rows, w[:, w.shape[1] // 2:])


def _build_worker(rank, world_size, tmp, overrides, measure):
    from launch.build import build_model
    from launch.runtime import init_runtime

    cfg = _cfg(tmp, *overrides)
    rt = init_runtime(cfg)
    base = vm_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    model, placements = build_model(cfg, rt)
    peak = (vm_bytes("VmHWM") - base) / 2**20
    local = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    info = {"ep_rank": rt.groups.ep_rank, "tp_rank": rt.groups.tp_rank, "peak_mb": peak, "local_mb": local,
            "kinds": {n: (pl.kind, pl.shard_dim) for n, pl in placements.items()}}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(info))
    if not measure:
        torch.save(model.state_dict(), Path(tmp, f"rank{rank}.pt"))


@pytest.mark.parametrize("world,layout", [(2, ["--parallel.ep=2"]), (2, ["--parallel.tp=2"]),
                                          (2, ["--parallel.pp=2", "--data.grad_accum=2"]), (4, ["--parallel.tp=2"])],
                         ids=["dp2-ep2", "tp2", "pp2", "dp2xtp2"])
def test_every_layout_starts_from_the_single_process_weights(tmp_path, world, layout):
    """Each rank holds the single-process weights' slice for its own position (tp rank, ep rank), not for its
    global rank (dp2 x tp2: global ranks 2 and 3 are tp ranks 0 and 1); and the experts of a stack differ."""
    run_distributed(_build_worker, world, str(tmp_path), layout, False)
    torch.manual_seed(123)  # the trainer's init must not depend on the global generator
    cfg = _cfg(tmp_path)
    with torch.device("meta"):
        ref = Transformer(cfg.model)
    ref.to_empty(device="cpu")
    ref.init_weights(seed=cfg.train.seed)
    full = ref.state_dict()
    stacks = [t for name, t in full.items() if ".experts." in name]
    assert stacks and all(not torch.equal(t[i], t[j]) for t in stacks for i in range(len(t)) for j in range(i))
    held = set()
    for rank in range(world):
        info = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        local = torch.load(Path(tmp_path, f"rank{rank}.pt"))
        assert set(local) <= set(full)  # a pipeline stage holds some layers, under their global names
        held |= set(local)
        for name, t in local.items():
            kind, dim = info["kinds"].get(name, ("replicated", None))
            if kind == "expert" and t.shape != full[name].shape:
                n = t.shape[0]
                expected = full[name][info["ep_rank"] * n:(info["ep_rank"] + 1) * n]
            elif kind == "tp_sharded" and t.shape != full[name].shape:
                n = t.shape[dim]
                expected = full[name].narrow(dim, info["tp_rank"] * n, n)
            else:
                expected = full[name]
            assert torch.equal(t, expected), f"rank {rank}: {name} differs from the single-process init"
    assert held == set(full)
    sharded = {n for n, (k, _) in info["kinds"].items() if k != "replicated"}
    assert len(held) > len(local) or (sharded and any(local[n].shape != full[n].shape for n in sharded))


@pytest.mark.parametrize("layout", [["--parallel.ep=2"], ["--parallel.pp=2", "--data.grad_accum=2"]],
                         ids=["dp2-ep2", "pp2"])
def test_a_rank_allocates_only_its_shard(tmp_path, layout):
    """A model whose routed experts are ~95% of the parameters, at dp=2 x ep=2 (half the experts per rank) or
    pp=2 (one MoE layer per stage): each rank's peak RSS growth while building the model is its part, not the
    whole model."""
    run_distributed(_build_worker, 2, str(tmp_path), [*BIG, *layout], True)
    with torch.device("meta"):
        full_mb = sum(p.numel() * 4 for p in Transformer(_cfg(tmp_path, *BIG).model).parameters()) / 2**20
    for rank in range(2):
        info = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert info["local_mb"] < 0.6 * full_mb
        assert info["peak_mb"] < info["local_mb"] * 1.1 + 16, (info, full_mb)  # not the whole model (full_mb)
