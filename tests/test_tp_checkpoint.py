"""Tensor-parallel checkpoints (2 gloo processes, tp=2, the workers of test_dist_checkpoint): bitwise resume in
new processes, and the tp=2 checkpoint loaded in one process (tp=1) holds the full (global) tensors and
continues the run."""
from __future__ import annotations

import pytest
import torch

from launch.trainer import Trainer, init_runtime
from models import Transformer
from tests.dist_utils import run_distributed
from tests.test_checkpoint import checkpoint_tensors
from tests.test_dist_checkpoint import HALF, N, _phase1, _phase2, _snapshot, assert_bitwise_resume
from tests.test_train import debug_cfg

COMMON = [f"--train.steps={N}", "--schedule.warmup_steps=2", "--train.eval_interval=0", "--train.ckpt_interval=0",
          "--data.micro_batch_size=4", "--model.n_layers=3"]
TP2 = [*COMMON, "--parallel.tp=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpckpt")
    run_distributed(_phase1, 2, str(root), TP2)
    run_distributed(_phase2, 2, str(root), None, TP2)
    load = lambda name: [torch.load(root / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)]  # noqa: E731
    return {"root": root, "a": load("a"), "b1": load("b1"), "b2": load("b2")}


def test_tp2_resume_in_new_processes_is_bitwise(runs):
    assert_bitwise_resume(runs)
    # the ranks really hold different shards of some weights
    a0, a1 = (runs["a"][r]["params"] for r in range(2))
    assert any(not torch.equal(v, a1[k]) for k, v in a0.items())


def test_tp2_checkpoint_loads_in_one_process_with_full_tensors(runs, tmp_path):
    path = runs["root"] / "b" / "checkpoints" / f"step_{HALF:08d}"
    saved = checkpoint_tensors(path, tmp_path / "flat.pt")
    cfg = debug_cfg(tmp_path / "single", *COMMON, f"--train.resume={path}")
    trainer = Trainer(cfg, init_runtime(cfg))
    assert trainer.step == HALF
    loaded = _snapshot(trainer)
    for k, v in loaded["params"].items():
        assert torch.equal(v, saved[k]), f"param {k} differs from the checkpoint's global tensor"
    with torch.device("meta"):
        full = Transformer(cfg.model)
    assert {k: v.shape for k, v in loaded["params"].items()} == {k: v.shape for k, v in full.state_dict().items()}
    for k, v in loaded["optim"].items():
        assert torch.equal(v, saved[k]), f"optimizer state {k} differs"
    # a tp=2 shard is a slice of the global tensor: rank 0's q rows are the first half of the loaded ones
    name = "layers.0.self_attn.q_proj.weight"
    shard = runs["b1"][0]["params"][name]
    assert shard.shape[0] * 2 == loaded["params"][name].shape[0]
    assert torch.equal(loaded["params"][name][: shard.shape[0]], shard)
    result = trainer.fit()
    ref = runs["b2"][0]["losses"]
    assert sorted(result.losses) == sorted(ref) == list(range(HALF + 1, N + 1))
    assert [result.losses[s] for s in sorted(ref)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-5, abs=1e-5)
