"""A NaN or inf in one gradient element skips the step on every rank, decided on the device
(muonclip/skip_nonfinite.py): weights, float32 masters, Muon momentum, AdamW moments and step counters, QK-Clip and
the router biases keep their values (compared with ``torch.equal``: a skipped step may turn a -0.0 into +0.0), with
no parameter-sized temporary; the loop counts the skips, alerts, stops after ``monitor.max_skipped_steps`` in a row
(launch/skipped_steps.py), and no checkpoint with NaN/inf is written (launch/checkpoint/save.py). That no host
synchronisation comes with it is tests/test_precision.py's sync test (no exception left for the step counters)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import muonclip
from launch import checkpoint as ckpt
from launch.errors import run_reporting_errors
from launch.trainer import Trainer, init_runtime
from tests.dist_utils import run_distributed
from tests.test_precision import BF16_RUN
from tests.test_train import debug_cfg

# step (as logged: completed steps) -> the parameter whose gradient gets one non-finite element in that step: a NaN
# in an attention matrix (Muon; the first stage under pp2), an inf in an expert stack (the second stage)
PLANTS = {4: ("layers.0.self_attn.kv_b_proj.weight", float("nan")), 5: ("layers.1.mlp.experts.down_proj", float("inf"))}
RUN = [*BF16_RUN, "--train.steps=6", "--train.ckpt_interval=2", "--train.eval_interval=0",
       "--schedule.warmup_steps=1", "--data.grad_accum=2", "--optim.qk_clip_tau=0.05"]


def plant(trainer: Trainer, plants: dict[int, tuple[str, float]]) -> None:
    """A gradient hook puts the value into element 0 of the named parameter's gradient in every backward of the
    given step, on one rank of those holding it (NaN: the last, inf: the first), before any accumulation or
    reduction sees it."""
    params = dict(trainer.model.named_parameters())
    for step, (name, value) in plants.items():
        holders = [name in params]
        if dist.is_initialized():
            holders = [None] * dist.get_world_size()
            dist.all_gather_object(holders, name in params)
        ranks = [r for r, held in enumerate(holders) if held]
        if trainer.rt.rank != (ranks[-1] if math.isnan(value) else ranks[0]):
            continue

        def hook(grad: torch.Tensor, step: int = step, value: float = value) -> torch.Tensor:
            if trainer.step != step - 1:
                return grad
            grad = grad.clone()
            grad.view(-1)[0] = value
            return grad

        params[name].register_hook(hook)


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Copies of everything a step may change: parameters (router biases included), float32 masters, optimizer
    state (Muon momentum, AdamW moments and step counters)."""
    opt = trainer.optimizer
    tensors = {**{f"param/{n}": p for n, p in trainer.model.named_parameters()},
               **{f"master/{n}": m for n, m in opt.master_params().items()}, **ckpt.optimizer_state(opt)}
    return {k: v.detach().clone() for k, v in tensors.items()}


def watch(trainer: Trainer, steps) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """``state`` before and after each of ``steps``, filled while the trainer runs."""
    shots: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    inner = trainer.train_step

    def train_step():
        n = trainer.step + 1
        if n in steps:
            shots[n, "before"] = state(trainer)
        out = inner()
        if n in steps:
            shots[n, "after"] = state(trainer)
        return out

    trainer.train_step = train_step
    return shots


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_planted(out: Path, *overrides: str) -> dict:
    """Train RUN with PLANTS; what changed in the planted steps and in one ordinary step, and which checkpoints
    loaded (every one written is loaded back, in step order)."""
    cfg = debug_cfg(out, *RUN, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    plant(trainer, PLANTS)
    shots = watch(trainer, (*PLANTS, 6))
    result = trainer.fit()
    loaded = []
    for step, path in ckpt.list_checkpoints(trainer.ckpt_root):
        trainer.load(path)  # DamagedCheckpoint if it held NaN/inf
        loaded.append(step)
    return {"final_step": result.final_step, "losses": result.losses, "loaded": loaded,
            "changed": {s: changed(shots[s, "before"], shots[s, "after"]) for s in (*PLANTS, 6)}}


def check_planted_run(results: list[dict], out: Path) -> None:
    """Every rank: the run reached step 6, the planted steps changed nothing, the next step did; checkpoints 2, 4
    (of the NaN-skipped step) and 6 loaded; metrics.jsonl counts the skips and holds their alerts."""
    for r in results:
        assert r["final_step"] == 6 and sorted(r["losses"]) == list(range(1, 7))
        assert r["changed"][4] == [] and r["changed"][5] == [], r["changed"]
        assert any(k.startswith("param/") for k in r["changed"][6])  # an ordinary step does move the weights
        assert r["loaded"] == [2, 4, 6]
    logged = records(out)
    assert {r["step"]: r["skipped_steps"] for r in logged if "skipped_steps" in r} == {1: 0, 2: 0, 3: 0, 4: 1, 5: 2,
                                                                                      6: 2}
    assert [(r["step"], r["alert"]) for r in logged if "alert" in r] == [(4, "skipped step"), (5, "skipped step")]


@pytest.mark.parametrize("overrides", [[], ["--optim.qk_clip_mode=post_step"], ["--optim.offload_state=true"]],
                         ids=["forward_clip", "post_step_clip", "offload"])
def test_a_nan_and_an_inf_gradient_skip_their_steps_bitwise(tmp_path, overrides):
    """One process, bf16 parameters with float32 masters, QK-Clip clipping every step (in either mode), the router
    bias moving every step, the optimizer state in host memory or not: the NaN step and the inf step leave every
    parameter, master and state bit as it was."""
    result = run_planted(tmp_path, *overrides)
    check_planted_run([result], tmp_path)


def _layouts_worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    for name, layout in LAYOUTS.items():
        result = run_planted(Path(out) / name, *layout)
        torch.save(result, Path(out) / name / f"rank{rank}.pt")


LAYOUTS = {"dp2-zero1": ["--data.micro_batch_size=2"], "ep2": ["--data.micro_batch_size=2", "--parallel.ep=2"],
           "pp2": ["--parallel.pp=2"]}


def test_every_rank_skips_the_step_in_dp2_zero1_ep2_and_pp2(tmp_path):
    """gloo, 2 processes, each layout in turn: the planted element is on one rank only (under pp2 on one stage),
    yet every rank skips both steps bitwise (owners' masters and state, replicas' parameters), reaches the last
    step, and every checkpoint loads."""
    run_distributed(_layouts_worker, 2, str(tmp_path))
    for name in LAYOUTS:
        check_planted_run([torch.load(tmp_path / name / f"rank{r}.pt") for r in range(2)], tmp_path / name)


def test_max_skipped_steps_in_a_row_stop_the_run_with_one_line(tmp_path, capsys):
    """Steps 2, 3 and 4 skipped with monitor.max_skipped_steps=3: the run stops after step 4 with one line and exit
    code 1 (a runtime failure), after an alert; the weights are still step 1's."""
    cfg = debug_cfg(tmp_path, *RUN, "--train.steps=8", "--train.ckpt_interval=0", "--monitor.max_skipped_steps=3")
    trainer = Trainer(cfg, init_runtime(cfg))
    plant(trainer, {s: ("layers.1.self_attn.q_proj.weight", float("nan")) for s in range(2, 9)})
    shots = watch(trainer, (2, 4))
    code = run_reporting_errors(lambda: trainer.fit() and 0, lambda: str(tmp_path))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 1 and trainer.step == 4
    assert err == [f"error: FloatingPointError: 3 steps in a row skipped (steps 2-4): their global gradient norm was "
                   f"not finite (monitor.max_skipped_steps=3); the weights are those before step 2: lower optim.lr, "
                   f"look at the data of those steps, or resume from an earlier checkpoint (traceback: "
                   f"{tmp_path}/logs/rank0.log)"]
    assert changed(shots[2, "before"], shots[4, "after"]) == []
    assert [r["alert"] for r in records(tmp_path) if "alert" in r] == ["skipped step", "skipped step",
                                                                       "skipped steps: stopped"]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_refuses_state_holding_nan_and_keeps_latest(tmp_path, async_save):
    """The finite check a load makes runs before a save: a NaN in one master refuses the save on every rank with
    one message, nothing is written and ``latest`` still names the previous checkpoint."""
    cfg = debug_cfg(tmp_path, *RUN, f"--train.ckpt_async={str(async_save).lower()}")
    trainer = Trainer(cfg, init_runtime(cfg))
    try:
        trainer.save()
        trainer._async_save_done(block=True)
        trainer.optimizer.master_params()["layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
        trainer.step = 1
        with pytest.raises(FloatingPointError, match=r"checkpoint save to .*step_00000001 refused: "
                           r"layers\.0\.self_attn\.q_proj\.weight holds non-finite values .*latest is still "
                           r"step_00000000$"):
            trainer.save()
    finally:
        trainer.close()
    root = trainer.ckpt_root
    assert [step for step, _ in ckpt.list_checkpoints(root)] == [0] and not list(root.glob("*.tmp"))
    assert ckpt.latest_checkpoint(root).name == "step_00000000"


def test_the_optimizer_skips_a_step_whose_norm_is_not_finite_without_clipping(tmp_path):
    """The library contract without the trainer: ``clip_grad_norm_`` measuring a NaN or inf norm (here with
    max_norm inf, measuring only) makes ``step()`` leave parameters and state as they were; the next finite step
    applies, counted as the first by AdamW."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    opt = muonclip.MuonClip(muonclip.build_param_groups(model.named_parameters()), lr=1e-2)
    opt.init_state()
    params = list(model.parameters())

    def snapshot():
        return [p.detach().clone() for p in params] + [t.clone() for st in opt.state.values() for t in st.values()]

    for bad in (float("nan"), float("inf")):
        for p in params:
            p.grad = torch.randn_like(p)
        params[0].grad[0, 0] = bad
        before = snapshot()
        assert not bool(opt.clip_grad_norm_(float("inf")).isfinite())
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
        opt.zero_grad()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.clip_grad_norm_(1.0)
    opt.step()
    assert not torch.equal(params[0], before[0])
    assert {float(st["step"]) for st in opt.state.values() if "step" in st} == {1.0}


def test_a_pending_decision_adds_no_parameter_sized_temporary():
    """The most tensor bytes alive during ``step()`` above the state before it (tests/audit.py ``LiveBytes``), with
    a decision pending (``clip_grad_norm_`` measured a finite norm, or a NaN one), is that of the step without one
    plus a few 0-dim coefficients, for a model whose largest parameter is updated by AdamW (an embedding, as Kimi
    K2's head owned whole): a draft copy of its moments or weight would add 4 bytes per element."""
    from collections import OrderedDict

    from tests.audit import LiveBytes

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(embed_tokens=nn.Embedding(4096, 64), proj=nn.Linear(64, 64, bias=False)))
    opt = muonclip.MuonClip(muonclip.build_param_groups(model.named_parameters()), lr=1e-2)
    assert [n for g in opt.param_groups if not g["use_muon"] for n in g["names"]] == ["embed_tokens.weight"]  # 1 MiB
    opt.init_state()
    params = list(model.parameters())

    def step_peak(decision: float | None) -> int:
        """Live-bytes peak of one step: without a decision (None), or after measuring a norm with one gradient
        element set to ``decision``."""
        for p in params:
            p.grad = torch.randn_like(p)
        if decision is not None:
            params[0].grad[0, 0] = decision
            opt.clip_grad_norm_(float("inf"))
        with LiveBytes() as live:
            opt.step()
        opt.zero_grad()
        return live.peak

    without = step_peak(None)
    assert without >= 2 * params[0].numel() * 4  # AdamW's own update temporaries are seen
    extra = {"finite": step_peak(1.0) - without, "nan": step_peak(float("nan")) - without}
    assert max(extra.values()) <= 256, extra  # a few 0-dim coefficients (4 or 8 bytes each)
