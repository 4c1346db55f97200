"""train.init_from: a run starts from a released (Hugging Face) checkpoint at any layout, reading only each rank's
slices of the (sharded) safetensors; the optimizer starts fresh; a config that does not match is refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from launch.trainer import Trainer, init_runtime
from models import Transformer
from models.hf_interop import export_hf
from tests.dist_utils import run_distributed
from tests.test_train import debug_cfg

STEPS = ["--train.steps=3", "--train.eval_interval=0", "--schedule.warmup_steps=1", "--data.grad_accum=2"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """configs/debug.yaml's model with other weights (seed 123), saved by transformers in 8 shards."""
    root = tmp_path_factory.mktemp("released")
    model = Transformer(debug_cfg(root / "x").model)
    model.init_weights(seed=123)
    export_hf(model, root / "single")
    DeepseekV3ForCausalLM.from_pretrained(root / "single").save_pretrained(root / "sharded", max_shard_size="2MB")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 1
    return model, root / "sharded"


def _run(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    torch.save({"losses": trainer.fit().losses}, Path(out) / f"rank{rank}.pt")


def test_one_process_starts_from_the_released_weights(released, tmp_path):
    model, path = released
    cfg = debug_cfg(tmp_path, *STEPS, f"--train.init_from={path}")
    trainer = Trainer(cfg, init_runtime(cfg))
    for name, t in model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], t), name
    state = [t for st in trainer.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    assert state and all(torch.count_nonzero(t) == 0 for t in state)  # weights only: the optimizer starts fresh
    trainer.fit()


@pytest.mark.parametrize("layout", [["--parallel.ep=2", "--data.micro_batch_size=2"],
                                    ["--parallel.tp=2", "--data.micro_batch_size=4"],
                                    ["--parallel.pp=2", "--data.micro_batch_size=4"],
                                    ["--parallel.tp=2", "--parallel.sequence_parallel=true", "--parallel.ep=2",
                                     "--data.micro_batch_size=4"],
                                    ["--parallel.etp=2", "--data.micro_batch_size=2"]],
                         ids=["dp2-ep2", "tp2", "pp2", "tp2sp-ep2-folded", "dp2-etp2"])
def test_every_layout_starts_from_the_same_released_weights(released, tmp_path, layout):
    _, path = released
    _run(0, 1, str(tmp_path / "one"), [*STEPS, "--data.micro_batch_size=4", f"--train.init_from={path}"])
    run_distributed(_run, 2, str(tmp_path / "two"), [*STEPS, *layout, f"--train.init_from={path}"])
    one = torch.load(tmp_path / "one" / "rank0.pt")["losses"]
    two = torch.load(tmp_path / "two" / "rank0.pt")["losses"]
    assert two[1] == pytest.approx(one[1], rel=1e-5)  # the same starting model
    assert list(two.values()) == pytest.approx(list(one.values()), rel=2e-5, abs=2e-5)
    scratch = debug_cfg(tmp_path / "scratch", *STEPS, "--data.micro_batch_size=4")
    assert Trainer(scratch, init_runtime(scratch)).fit().losses[1] != pytest.approx(one[1], rel=1e-3)


def test_a_released_checkpoint_of_another_shape_is_refused(released, tmp_path):
    _, path = released
    cfg = debug_cfg(tmp_path, *STEPS, f"--train.init_from={path}", "--model.n_routed_experts=8")
    with pytest.raises(ValueError, match=rf"train.init_from {path}: its config.json does not match the run's model "
                                         r"section \(model.n_routed_experts: run 8 vs 4\)"):
        Trainer(cfg, init_runtime(cfg))
