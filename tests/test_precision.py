"""bf16 training as a GPU runs it, proven on CPU by measurement (tests/audit.py): the dtype and FLOPs of every
matmul-class op of a training step against the precision policy's float32 list (parallel/precision.py), the host
synchronisations a CUDA run would make, the max-logit probe under recompute, and the float32 master weights and
gradient buffers of bf16 parameters, the float32 accumulation of their micro batches' gradients (one process; the
distributed layouts are in test_precision_dist.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from launch.trainer import Trainer, init_runtime
from muonclip.main_grads import MainGrads
from parallel.precision import FP32_COMPUTE
from tests.audit import NoDeviceSync, OpAudit
from tests.test_train import debug_cfg

BF16 = torch.bfloat16
BF16_RUN = ["--train.param_dtype=bfloat16", "--train.dtype=bfloat16"]
STEP = ["--train.steps=4", "--schedule.warmup_steps=1", "--train.eval_interval=0", "--optim.qk_clip_tau=0.05",
        "--data.grad_accum=2"]


def trainer_for(tmp_path, *overrides: str) -> Trainer:
    cfg = debug_cfg(tmp_path, *STEP, *overrides)
    return Trainer(cfg, init_runtime(cfg))


def fp32_region(region: str) -> str:
    """The FP32_COMPUTE entry a float32 GEMM's region belongs to (or the region itself)."""
    if region.endswith(".mlp.gate"):
        return "router"
    return region


@pytest.mark.parametrize("overrides", [BF16_RUN, ["--train.dtype=bfloat16"]], ids=["bf16_params", "autocast"])
def test_every_gemm_of_a_step_is_bf16_except_the_documented_float32_list(tmp_path, overrides):
    """bf16 parameters (and, the same, bf16 autocast over float32 parameters): every routed-expert grouped GEMM and
    every SDPA call, forward and backward, runs in bf16; >= 90% of the matmul FLOPs are bf16; the float32 GEMMs are
    exactly the router scores and the max-logit probe (FP32_COMPUTE); Newton-Schulz runs in optim.ns_dtype."""
    trainer = trainer_for(tmp_path, *overrides, "--optim.ns_dtype=bfloat16")
    with OpAudit() as audit:
        trainer.train_step()
    model_ops = [r for r in audit.records if r.region != "optimizer"]
    n_moe = trainer.cfg.model.n_layers - trainer.cfg.model.first_k_dense
    experts = [r for r in model_ops if r.op == "_grouped_mm"]
    assert len(experts) == 2 * 3 * 3 * n_moe  # 2 micro batches x (gate, up, down) x (forward + 2 backward)
    assert all(r.dtypes == (BF16, BF16) for r in experts), {r.dtypes for r in experts}
    sdpa = [r for r in model_ops if r.op.startswith("_scaled_dot_product")]
    assert len(sdpa) == 2 * 2 * trainer.cfg.model.n_layers and all(set(r.dtypes) == {BF16} for r in sdpa)
    fp32 = [r for r in model_ops if set(r.dtypes) != {BF16}]
    assert all(set(r.dtypes) == {torch.float32} for r in fp32)
    assert {fp32_region(r.region) for r in fp32} == {"router", "max_logit_probe"} <= FP32_COMPUTE.keys()
    flops = audit.flops_by(lambda r: set(r.dtypes) == {BF16}, model_ops)
    assert flops[True] / (flops[True] + flops[False]) >= 0.90, flops
    optimizer_ops = [r for r in audit.records if r.region == "optimizer"]
    assert optimizer_ops and all(set(r.dtypes) == {BF16} for r in optimizer_ops)


def test_a_moe_training_step_makes_no_host_synchronisation(tmp_path):
    """Forward, backward, optimizer step, QK-Clip and the router bias update of a bf16 MoE step, with the decision
    to skip a step of non-finite gradient norm (muonclip/skip_nonfinite.py) and AdamW's step counters on the device:
    nothing a CUDA stream would wait on (bincount, nonzero, boolean indexing, repeat_interleave without
    output_size, .item(), .tolist()), no exception (expert parallelism's split sizes, the one documented sync, are
    checked under EP in test_precision_dist.py)."""
    trainer = trainer_for(tmp_path, *BF16_RUN, "--train.steps=3")
    trainer.train_step()  # the state exists (the first step creates nothing then, but keep it realistic)
    with NoDeviceSync():
        out = trainer.train_step()
    assert out.applied_t.device == out.grad_norm_t.device and out.applied_t.dtype == torch.bool
    with pytest.raises(AssertionError, match="host synchronisation"), NoDeviceSync():
        torch.bincount(torch.tensor([1, 2]))  # the mode does see one


def test_the_max_logit_probe_runs_once_per_layer_and_micro_batch_under_recompute(tmp_path, monkeypatch):
    """Activation checkpointing recomputes each block in backward; the float32 probe (and the router's load count)
    is not run again, and records what the run without recompute records."""
    import models.attention as attention

    calls = []
    original = attention.causal_max_logits

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "causal_max_logits", counted)
    stats = {}
    for ac in (False, True):
        calls.clear()
        trainer = trainer_for(tmp_path / str(ac), *BF16_RUN, f"--parallel.activation_checkpointing={ac}")
        trainer.train_step()
        assert len(calls) == 2 * trainer.cfg.model.n_layers  # 2 micro batches
        stats[ac] = ([a.self_attn.max_logits_H.clone() for a in trainer.model.layers],
                     [r.expert_load_E.clone() for r in trainer.model.moe_routers()])
    for a, b in zip(*stats.values()):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------ float32 gradient accumulation
def step_gradients(out_dir, *overrides: str) -> dict[str, torch.Tensor]:
    """One train step's gradients as the update reads them (``optimizer.grad(p)``: reduced, the float32 buffer of a
    bf16 parameter; under ZeRO-1 the ones this rank owns), by name, read as the update starts (no clipping)."""
    cfg = debug_cfg(out_dir, "--train.eval_interval=0", "--optim.grad_clip=0", *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    grads: dict[str, torch.Tensor] = {}

    def read(opt, args, kwargs) -> None:
        for name, p in trainer.model.named_parameters():
            g = opt.grad(p)
            if g is not None:
                assert g.dtype == torch.float32, (name, g.dtype)
                grads[name] = g.detach().clone()

    trainer.optimizer.register_step_pre_hook(read)
    trainer.train_step()
    assert grads
    trainer.close()
    return grads


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every parameter's gradient together."""
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    return (diff / sum(float(b[k].double().square().sum()) for k in b)) ** 0.5


def test_grad_accum_in_bf16_equals_one_large_micro_batch(tmp_path):
    """bf16 parameters accumulate their micro batches' gradients in float32 (MainGrads): 4 micro batches of 1
    sample give the gradient of one micro batch of the same 4 samples up to bf16's rounding of the computation,
    closer to it than the float32 run's gradient is (measured 0.45x that bf16-vs-float32 distance; an accumulation
    that kept only the last micro batch: 140x)."""
    big = step_gradients(tmp_path / "big", *BF16_RUN, "--data.micro_batch_size=4", "--data.grad_accum=1")
    fp32 = step_gradients(tmp_path / "fp32", "--data.micro_batch_size=4", "--data.grad_accum=1")
    accum = step_gradients(tmp_path / "accum", *BF16_RUN, "--data.micro_batch_size=1", "--data.grad_accum=4")
    bf16_noise = relative_distance(big, fp32)  # every trainable parameter's gradient (the float32 run's) in each
    distance = relative_distance(accum, big)
    assert 0 < distance < bf16_noise, f"accumulated vs one micro batch {distance:.3g}, bf16 vs float32 {bf16_noise:.3g}"


def test_main_grads_adds_a_bf16_grad_accumulated_without_the_hook():
    """Zero-bubble pipeline schedules (zbv, dualpipev) accumulate weight gradients by hand (``weight.grad += dw``:
    no post-accumulate-grad hook): ``MainGrads.grad`` adds that bf16 ``.grad`` to what backward's hook moved into
    the float32 buffer, once, also for a parameter that got no gradient through the hook (bitwise: float32 sums of
    bf16 values in the same order)."""
    g = torch.Generator().manual_seed(0)
    hooked, by_hand = (nn.Parameter(torch.randn(4, 8, generator=g).to(BF16)) for _ in range(2))
    dy = [torch.randn(4, 8, generator=g).to(BF16) for _ in range(3)]
    main = MainGrads([hooked, by_hand])
    (hooked * dy[0]).float().sum().backward()  # its gradient is dy[0] exactly: the hook adds it to the buffer
    assert hooked.grad is None and by_hand.grad is None
    assert main.grad(by_hand) is None  # no gradient yet
    for p in (hooked, by_hand):  # what torch's zero-bubble schedules do: p.grad = dw, then p.grad += dw (bf16)
        p.grad = dy[1].clone()
        p.grad += dy[2]
    expected = {id(hooked): dy[0].float() + (dy[1] + dy[2]).float(), id(by_hand): (dy[1] + dy[2]).float()}
    for p in (hooked, by_hand):
        assert main.grad(p) is not None and torch.equal(main.grad(p), expected[id(p)]), "hand-made .grad left out"
        assert p.grad is None and torch.equal(main.grad(p), expected[id(p)])  # read again: not added twice


# ---------------------------------------------------------------------------------------------- masters in checkpoints
LONG = ["--train.steps=12", "--train.eval_interval=0", "--schedule.warmup_steps=2", "--optim.qk_clip_tau=0.05",
        "--data.grad_accum=2"]


def run(out_dir, *overrides: str):
    cfg = debug_cfg(out_dir, *LONG, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    return trainer, trainer.fit()


def resumed_trainer(out_dir, ckpt, *overrides: str) -> Trainer:
    cfg = debug_cfg(out_dir, *LONG, *overrides, f"--train.resume={ckpt}")
    return Trainer(cfg, init_runtime(cfg))


def test_a_bf16_run_checkpoints_its_float32_masters_and_resumes_bitwise(tmp_path):
    from tests.test_checkpoint import checkpoint_tensors

    trainer, full = run(tmp_path / "full", *BF16_RUN, "--train.ckpt_interval=6")
    step12 = tmp_path / "full" / "checkpoints" / "step_00000012"
    saved = checkpoint_tensors(step12, tmp_path / "flat.pt")
    masters = trainer.optimizer.master_params()
    assert masters.keys() == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, master in masters.items():  # the checkpoint's weight is the float32 master
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], master), name
    assert not any(k.endswith("/master") for k in saved)  # stored once, as the model's weight
    _, again = run(tmp_path / "again", *BF16_RUN, f"--train.resume={tmp_path / 'full/checkpoints/step_00000006'}")
    assert [again.losses[s] for s in range(7, 13)] == [full.losses[s] for s in range(7, 13)]


def test_float32_and_bf16_checkpoints_resume_into_each_other(tmp_path):
    """A float32 checkpoint fills a bf16 run's masters exactly (its parameters are them rounded); a bf16 run's
    checkpoint gives a float32 run its masters."""
    fp32, _ = run(tmp_path / "fp32", "--train.ckpt_interval=12")
    bf16 = resumed_trainer(tmp_path / "to_bf16", tmp_path / "fp32/checkpoints/step_00000012", *BF16_RUN)
    weights = dict(fp32.model.named_parameters())
    masters = bf16.optimizer.master_params()
    for name, p in bf16.model.named_parameters():
        if name in masters:
            assert torch.equal(masters[name], weights[name]) and torch.equal(p, weights[name].to(torch.bfloat16))
        else:
            assert not p.requires_grad and torch.equal(p, weights[name])  # the float32 router bias
    assert bf16.step == 12 and torch.equal(bf16.optimizer.state[bf16.model.lm_head.weight]["exp_avg"],
                                          fp32.optimizer.state[fp32.model.lm_head.weight]["exp_avg"])

    trained, _ = run(tmp_path / "bf16", *BF16_RUN, "--train.ckpt_interval=12")
    back = resumed_trainer(tmp_path / "to_fp32", tmp_path / "bf16/checkpoints/step_00000012")
    masters = trained.optimizer.master_params()
    for name, p in back.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, masters.get(name, dict(trained.model.named_parameters())[
            name])), name


def test_export_writes_the_masters_and_init_from_fills_them(tmp_path):
    """scripts/export_hf.py from a bf16 run's checkpoint: --dtype float32 writes the float32 masters exactly,
    bfloat16 the bf16 parameters. ``train.init_from`` of that bf16 directory starts a bf16 run whose masters are
    exactly those values, and of the float32 directory one whose masters are the float32 ones (not rounded)."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from export_hf import main as export

    trainer, _ = run(tmp_path / "run", *BF16_RUN, "--train.ckpt_interval=12")
    step = tmp_path / "run/checkpoints/step_00000012"
    masters = trainer.optimizer.master_params()
    hf_key = "model.layers.0.self_attn.kv_b_proj.weight"
    for dtype in ("float32", "bfloat16"):
        export([str(step), "--out", str(tmp_path / dtype), "--dtype", dtype])
        written = load_file(tmp_path / dtype / "model.safetensors")[hf_key]
        assert torch.equal(written, masters["layers.0.self_attn.kv_b_proj.weight"].to(getattr(torch, dtype)))
        started = Trainer(*(lambda c: (c, init_runtime(c)))(debug_cfg(
            tmp_path / f"from_{dtype}", *LONG, *BF16_RUN, f"--train.init_from={tmp_path / dtype}")))
        new_masters = started.optimizer.master_params()
        for name, m in new_masters.items():
            expected = masters[name].to(getattr(torch, dtype)).float()
            assert torch.equal(m, expected), name
        assert all(torch.equal(p, new_masters[n].to(torch.bfloat16)) for n, p in started.model.named_parameters()
                   if n in new_masters)


def test_offloaded_optimizer_state_gives_bitwise_the_same_run(tmp_path):
    """optim.offload_state on one process: the state lives in host memory between steps (its own tensors, lent to
    the device per parameter) and the run is bit for bit the one without offload."""
    runs = {}
    for offload in (False, True):
        trainer, result = run(tmp_path / str(offload), *BF16_RUN, f"--optim.offload_state={offload}")
        runs[offload] = (trainer, result)
    (plain, plain_result), (off, off_result) = runs[False], runs[True]
    assert off_result.losses == plain_result.losses
    assert all(torch.equal(a, b) for a, b in zip(off.model.parameters(), plain.model.parameters()))
    counters = sum(4 for st in off.optimizer.state.values() if "step" in st)
    assert off.optimizer.state_bytes("host") == off.optimizer.state_bytes() - counters > 0
    assert plain.optimizer.state_bytes("host") == 0 and plain.optimizer.state_bytes() == off.optimizer.state_bytes()


def test_qk_clip_scales_the_float32_master_and_the_bf16_parameter_is_its_rounding(tmp_path):
    """The same bf16 step with and without QK-Clip: the clipped run's query/key masters are the unclipped run's
    masters with each head's rows scaled by its gamma (sqrt(gamma) on q_nope/k_nope, gamma on q_rope), in float32,
    every other master is equal, and every bf16 parameter is its master rounded (a clip of the parameter alone
    would leave the master, and the next update, unclipped)."""
    from muonclip.qk_clip import head_gammas, row_scales, scale_rows_

    clipped = trainer_for(tmp_path / "clip", *BF16_RUN)
    plain = trainer_for(tmp_path / "plain", *BF16_RUN, "--optim.qk_clip=false")
    for t in (clipped, plain):
        t.train_step()
    assert int(clipped.qkclip.last_clipped) > 0
    assert torch.equal(clipped.qkclip.last_max_logits, plain.qkclip.last_max_logits)
    expected = dict(plain.optimizer.master_params())
    names = {id(p): n for n, p in plain.model.named_parameters()}
    for spec, max_H in zip(plain.model.qk_clip_specs(), plain.qkclip.last_max_logits):
        for key, scale_R in row_scales(spec, head_gammas(max_H, clipped.qkclip.tau)).items():
            name = names[id(spec[key])]
            expected[name] = expected[name].clone()
            scale_rows_(expected[name], scale_R)
    got = clipped.optimizer.master_params()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got)
    params = dict(clipped.model.named_parameters())
    assert all(torch.equal(params[n], m.to(BF16)) for n, m in got.items())


def test_without_masters_the_bf16_parameters_are_updated_in_place(tmp_path):
    """optim.master_weights: false (a baseline: what the master buys): no master, float32 state, bf16 updates."""
    trainer, result = run(tmp_path, *BF16_RUN, "--optim.master_weights=false")
    opt = trainer.optimizer
    assert opt.master_params() == {} and len(result.losses) == 12
    assert result.losses[12] < result.losses[1] - 1.0
    states = [t for st in opt.state.values() for k, t in st.items() if k != "step"]
    assert states and all(t.dtype == torch.float32 for t in states)
