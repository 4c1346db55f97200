"""Pipeline parallelism in the trainer (gloo, 2 and 4 processes): pp=2 alone, with dp=2 and with ep=2 reproduce one
process's per-step losses over 20 steps (MLA + MoE, QK-Clip clipping, gradient clipping active), for 1f1b and
interleaved_1f1b; every stage's max logits reach rank 0's metrics; checkpoints move between pp=2 and pp=1; one pass
of many micro batches holds what one of a few holds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from configs import load_config
from launch.trainer import Trainer, init_runtime
from parallel.plan import plan_layout
from tests.dist_utils import run_distributed
from tests.test_checkpoint import SpikeOnce
from tests.test_train import debug_cfg

STEPS = 20
COMMON = [f"--train.steps={STEPS}", "--train.eval_interval=10", "--schedule.warmup_steps=2", "--data.grad_accum=2",
          "--optim.qk_clip_tau=0.05", "--optim.grad_clip=0.5"]
TOL = dict(rel=2e-5, abs=2e-5)  # reduction order only (per-stage norms summed, dp/ep reductions)


def train(out_dir, *overrides):
    cfg = debug_cfg(out_dir, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    return trainer, trainer.fit()


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    trainer, result = train(out, *overrides)
    torch.save({"losses": result.losses, "val": result.val_losses,
                "names": sorted(trainer.model.state_dict())}, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, same global batch (4 samples: micro batch 2 x accumulation 2)."""
    out = {}
    for layers in (2, 4):
        directory = tmp_path_factory.mktemp(f"ref{layers}")
        _, result = train(directory, *COMMON, "--data.micro_batch_size=2", f"--model.n_layers={layers}")
        result.out_dir = directory
        out[layers] = result
    return out


def _check(results: list[dict], ref) -> None:
    losses = results[0]["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(r["losses"] == losses for r in results)  # every rank agrees (the spike detector reads it)
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx([ref.losses[s] for s in range(1, STEPS + 1)],
                                                                     **TOL)
    assert results[0]["val"] == pytest.approx(ref.val_losses, **TOL)


@pytest.mark.parametrize("schedule,virtual,layers,batch", [
    ("1f1b", 1, 2, ["--data.micro_batch_size=2"]),
    ("interleaved_1f1b", 2, 4, ["--data.micro_batch_size=2"]),
    ("zbv", 2, 4, ["--data.micro_batch_size=2"]),
    ("dualpipev", 2, 4, ["--data.micro_batch_size=1", "--data.grad_accum=4"]),  # needs micro batches >= stages
    ("1f1b", 1, 2, ["--data.micro_batch_size=1", "--data.grad_accum=4", "--parallel.pp_microbatches=2"]),  # 2 rounds
])
def test_pp2_matches_one_process(tmp_path, reference, schedule, virtual, layers, batch):
    overrides = [*COMMON, *batch, "--parallel.pp=2", f"--parallel.pp_schedule={schedule}",
                 f"--parallel.pp_virtual_stages={virtual}", f"--model.n_layers={layers}"]
    run_distributed(_worker, 2, str(tmp_path), overrides)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    _check(results, reference[layers])
    names = [set(r["names"]) for r in results]
    last = 0 if schedule in ("zbv", "dualpipev") else 1  # a V puts the first and the last stage on rank 0
    assert not names[0] & names[1] and "embed_tokens.weight" in names[0] and "lm_head.weight" in names[last]
    logged = [r for r in records(tmp_path) if "loss" in r]
    assert all(f"max_logit/l{i}" in logged[0] for i in range(layers))  # rank 0 logs every stage's layers
    assert sum(r["qk_clip/clipped_heads"] for r in logged) > 0  # QK-Clip did clip
    single = [r for r in records(reference[layers].out_dir) if "loss" in r]
    assert [r["qk_clip/clipped_heads"] for r in logged] == [r["qk_clip/clipped_heads"] for r in single]
    # the gradient before clipping is the one process's (the optimizer divides the schedule's micro batch sum; a
    # missing division would double it, which the clipping hides from the losses)
    assert [r["grad_norm"] for r in logged] == pytest.approx([r["grad_norm"] for r in single], **TOL)
    # every gradient bucket's reduction started inside the schedule's backward, also under zero-bubble schedules,
    # whose weight-gradient actions add to .grad by hand (no hooks): the pipeline hands those to the optimizer
    assert {r["zero1/reduced_in_backward"] for r in logged} == {1.0}


@pytest.mark.parametrize("extra", [["--data.micro_batch_size=1"], ["--data.micro_batch_size=1", "--parallel.ep=2"],
                                   ["--data.micro_batch_size=2", "--parallel.tp=2",
                                    "--parallel.activation_checkpointing=true"],
                                   ["--data.micro_batch_size=1", "--parallel.ep=2", "--parallel.recompute=full"],
                                   ["--data.micro_batch_size=2", "--parallel.tp=2", "--parallel.recompute=selective",
                                    "--parallel.activation_offload=true"]],
                         ids=["pp2xdp2", "pp2xdp2xep2", "pp2xtp2+ac", "pp2xdp2xep2+full", "pp2xtp2+selective+offload"])
def test_pp2_with_dp2_ep2_or_tp2_matches_one_process(tmp_path, reference, extra):
    overrides = [*COMMON, "--parallel.pp=2", *extra]
    run_distributed(_worker, 4, str(tmp_path), overrides)
    _check([torch.load(tmp_path / f"rank{r}.pt") for r in range(4)], reference[2])


def _peak_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    from tests.audit import LiveBytes

    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    rt = init_runtime(cfg)
    with LiveBytes() as live:
        trainer = Trainer(cfg, rt)
        losses = [float(trainer.train_step().loss) for _ in range(2)]
    torch.save({"losses": losses, "peak": live.peak}, Path(out) / f"rank{rank}.pt")


def test_one_pass_of_64_micro_batches_holds_what_8_hold(tmp_path):
    """A step's micro batches in one pipeline pass (interleaved 1F1B, pp2 x 2 stages per rank): its receive buffers
    and sends live only while their micro batch needs them (parallel/pipeline_runtime.py), so each rank's peak
    tensor bytes over its build and two steps (tests/audit.py ``LiveBytes``) at 64 micro batches are those at 8 and
    the planner's, within the planner's 10% (torch's own stages and runtime hold a receive buffer per micro batch
    and every send until the pass ends: +37% and +30% at 64 here); the losses are one process's."""
    common = ["--model.n_layers=4", "--model.loss_chunk_tokens=32", "--data.micro_batch_size=1",
              "--train.eval_interval=0", "--schedule.warmup_steps=1"]
    pp = ["--parallel.pp=2", "--parallel.pp_virtual_stages=2"]
    peaks = {}
    for n in (8, 64):
        run_distributed(_peak_worker, 2, str(tmp_path / str(n)), [*common, *pp, f"--data.grad_accum={n}"])
        results = [torch.load(tmp_path / str(n) / f"rank{r}.pt") for r in range(2)]
        peaks[n] = [r["peak"] for r in results]
    assert peaks[64] == pytest.approx(peaks[8], rel=0.10), peaks
    plans = plan_layout(debug_cfg(tmp_path, *common, *pp, "--data.grad_accum=64"), 2)
    assert [p.peak for p in plans] == pytest.approx(peaks[64], rel=0.10), ([p.phases for p in plans], peaks)
    cfg = debug_cfg(tmp_path / "one", *common, "--data.grad_accum=64")
    trainer = Trainer(cfg, init_runtime(cfg))
    reference = [float(trainer.train_step().loss) for _ in range(2)]
    assert results[0]["losses"] == results[1]["losses"] == pytest.approx(reference, **TOL)


def _pp4_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    from data.loader import BatchLoader

    torch.set_num_threads(1)
    calls = [0]
    read = BatchLoader.next_batch

    def counted(self):
        calls[0] += 1
        return read(self)

    BatchLoader.next_batch = counted
    trainer, result = train(out, *overrides)
    torch.save({"losses": result.losses, "val": result.val_losses, "reads": calls[0],
                "consumed": trainer.loader.samples_consumed}, Path(out) / f"rank{rank}.pt")


def test_pp4_middle_stages_read_no_batch_and_the_pipelined_eval_matches_one_process(tmp_path, reference):
    """pp=4 (1F1B, a layer per stage): the middle stages' loaders read no batch (they only move on, to the same
    position as the others'), and the per-step and validation losses (the stage-major pipelined forward) are the
    one process's."""
    overrides = [*COMMON, "--data.micro_batch_size=1", "--data.grad_accum=4", "--parallel.pp=4", "--model.n_layers=4"]
    run_distributed(_pp4_worker, 4, str(tmp_path), overrides)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    _check(results, reference[4])
    reads = [r["reads"] for r in results]
    assert reads[1] == reads[2] == 0 and reads[0] == reads[3] == STEPS * 4, reads
    assert len({r["consumed"] for r in results}) == 1


def test_pp2_with_the_sequence_wise_balance_loss_matches_one_process(tmp_path):
    """The balance loss computed inside each stage reaches its router with the one-process weight (backward sums
    the micro batches, the optimizer divides), and its logged value sums every stage's layers."""
    overrides = [*COMMON, "--train.steps=6", "--data.micro_batch_size=2", "--model.seq_aux_loss_alpha=50",
                 "--train.log_interval=1"]
    _, ref = train(tmp_path / "ref", *overrides)
    run_distributed(_worker, 2, str(tmp_path / "pp"), [*overrides, "--parallel.pp=2"])
    pp = torch.load(tmp_path / "pp" / "rank0.pt")
    assert [pp["losses"][s] for s in range(1, 7)] == pytest.approx([ref.losses[s] for s in range(1, 7)], **TOL)
    logged = [[r["router/seq_aux_loss"] for r in records(d) if "loss" in r] for d in (tmp_path / "ref", tmp_path / "pp")]
    assert len(logged[0]) == 6 and logged[1] == pytest.approx(logged[0], **TOL)
    assert all(50 * 0.9 < v < 50 * 1.5 for v in logged[0])  # one MoE layer of the debug model; 1.0 x alpha = balanced


def _ckpt_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    train(out, *overrides)


def test_checkpoints_move_between_pp2_and_pp1(tmp_path, reference):
    """pp=2's step-10 checkpoint resumes in one process, one process's in pp=2; both then follow the
    uninterrupted run (global names: each stage saved its own layers)."""
    ref = reference[2].losses
    args = [*COMMON, "--train.ckpt_interval=10", "--data.micro_batch_size=2"]
    run_distributed(_ckpt_worker, 2, str(tmp_path / "pp2"), [*args, "--parallel.pp=2"])
    _, resumed = train(tmp_path / "to_pp1", *args, f"--train.resume={tmp_path / 'pp2/checkpoints/step_00000010'}")
    assert sorted(resumed.losses) == list(range(11, STEPS + 1))
    assert [resumed.losses[s] for s in range(11, STEPS + 1)] == pytest.approx([ref[s] for s in range(11, 21)], **TOL)

    train(tmp_path / "pp1", *args)
    run_distributed(_worker, 2, str(tmp_path / "to_pp2"),
                    [*args, "--parallel.pp=2", f"--train.resume={tmp_path / 'pp1/checkpoints/step_00000010'}"])
    losses = torch.load(tmp_path / "to_pp2" / "rank0.pt")["losses"]
    assert sorted(losses) == list(range(11, STEPS + 1))
    assert [losses[s] for s in range(11, STEPS + 1)] == pytest.approx([ref[s] for s in range(11, 21)], **TOL)

    # and at the same layout the resume is bitwise: pp=2 from pp=2's own step-10 checkpoint
    pp2 = {r["step"]: r["loss"] for r in records(tmp_path / "pp2") if "loss" in r}
    run_distributed(_worker, 2, str(tmp_path / "pp2_again"),
                    [*args, "--parallel.pp=2", f"--train.resume={tmp_path / 'pp2/checkpoints/step_00000010'}"])
    again = torch.load(tmp_path / "pp2_again" / "rank0.pt")["losses"]
    assert [again[s] for s in range(11, STEPS + 1)] == [pp2[s] for s in range(11, STEPS + 1)]


class _SpikeAt15(SpikeOnce):
    at = 15


def _spike_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    trainer = _SpikeAt15(cfg, init_runtime(cfg))
    result = trainer.fit()
    torch.save({"losses": result.losses, "rollbacks": trainer.rollbacks.metrics()["rollback/count"],
                "batches": trainer.loader.global_batches}, Path(out) / f"rank{rank}.pt")


def test_a_spike_on_the_last_stage_rolls_every_stage_back(tmp_path):
    """The loss lives on the last stage; every rank sees the same value, so all detect the spike and restore the
    same checkpoint, then skip the same batches."""
    overrides = [*COMMON, "--data.micro_batch_size=2", "--parallel.pp=2", "--train.ckpt_interval=10",
                 "--monitor.rollback=true", "--monitor.spike_min_history=5"]
    run_distributed(_spike_worker, 2, str(tmp_path), overrides)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["rollbacks"] for r in results] == [1, 1]
    assert results[0]["losses"] == results[1]["losses"] and sorted(results[0]["losses"]) == list(range(1, 21))
    assert results[0]["batches"] == results[1]["batches"] == (STEPS + 5) * 2  # steps 10..14's batches skipped


@pytest.mark.parametrize("override,message", [
    (["--data.grad_accum=1"], r"grad_accum \(1\) is the number of micro batches per pipeline round: it must be >= "
                              r"parallel.pp"),
    (["--data.grad_accum=4", "--parallel.pp_microbatches=3"], r"pp_microbatches \(3\) must divide data.grad_accum"),
    (["--data.grad_accum=4", "--parallel.pp_microbatches=1"], r"pp_microbatches \(1\) is the number of micro "
                                                              r"batches per pipeline round: it must be >= parallel.pp"),
    (["--optim.qk_clip_mode=post_step"], "qk_clip_mode: post_step re-runs a forward"),
    (["--parallel.pp_layers=[1, 2]"], r"pp_layers \[1, 2\] must list 2 layer counts"),
    (["--parallel.optimizer=replicated"], "pp > 1 needs optimizer: zero1"),
    (["--parallel.pp_schedule=zbv"], "places exactly 2 stages per rank"),
    (["--parallel.pp_schedule=dualpipev", "--parallel.pp_virtual_stages=2", "--model.n_layers=4"],
     r"dualpipev needs at least as many micro batches per round as stages \(4\)"),
])
def test_pipeline_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(Path(__file__).resolve().parent.parent / "configs" / "debug.yaml",
                    ["--parallel.pp=2", "--data.grad_accum=2", *override])
