"""MFU in the logs: the model FLOP count per token against a hand count, the logged model TFLOP/s and MFU, and
the planner printing the same FLOP model."""
from __future__ import annotations

import json

import pytest

from configs import load_config
from models.flops import attention_flops_per_token, flops_per_token, matmul_params_per_token
from launch.trainer import Trainer, init_runtime
from tests.test_train import DEBUG, debug_cfg


def train(out_dir, *overrides):
    cfg = debug_cfg(out_dir, *overrides)
    return cfg, Trainer(cfg, init_runtime(cfg)).fit()


def test_flops_per_token_is_the_hand_count_of_the_debug_model():
    """configs/debug.yaml: dim 64, 2 layers (dense, then MoE), MLA with 2 heads (q_proj 64 -> 2 x (16 + 8),
    kv_a 64 -> 32 + 8, kv_b 32 -> 2 x (16 + 16), o_proj 2 x 16 -> 64), dense FFN 64 <-> 128, 4 routed experts
    top-2 of 64 <-> 64 with a router and 1 shared expert, head 64 -> 8192, 64 tokens."""
    model = load_config(DEBUG, []).model
    attention = 64 * 48 + 64 * 40 + 32 * 64 + 32 * 64
    dense = 3 * 64 * 128
    moe = 4 * 64 + 2 * 3 * 64 * 64 + 3 * 64 * 64
    head = 8192 * 64
    assert matmul_params_per_token(model) == 2 * attention + dense + moe + head == 605_440
    # per layer and head: q.k^T (24 wide) and the weighted sum (16 wide) over 32.5 keys on average, x 2 x 3
    assert attention_flops_per_token(model, 64) == 3 * 2 * 2 * 2 * (24 + 16) * 65 / 2 == 31_200
    assert flops_per_token(model, 64) == 6 * 605_440 + 31_200


def test_the_log_has_model_tflops_and_mfu_against_the_configured_peak(tmp_path):
    cfg, _ = train(tmp_path, "--train.steps=4", "--schedule.warmup_steps=1", "--train.eval_interval=0",
                   "--train.peak_tflops=0.5")
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "tokens_per_s" in r]
    assert logged
    for r in logged:
        assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s"] * per_token / 1e12, rel=1e-12)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5, rel=1e-12)
    train(tmp_path / "no_peak", "--train.steps=2", "--schedule.warmup_steps=1", "--train.eval_interval=0")
    on_cpu = [json.loads(line) for line in (tmp_path / "no_peak" / "metrics.jsonl").read_text().splitlines()]
    assert any("tflops_per_device" in r for r in on_cpu) and not any("mfu" in r for r in on_cpu)  # no CPU peak


@pytest.mark.parametrize("world", [1, 2, 4])
def test_tflops_and_mfu_are_per_device_shares_of_the_global_throughput(world):
    """``tokens_per_s`` is the whole job's (every data-parallel rank's tokens): 8,000 tokens/s of 1 GFLOP each is
    8 TFLOP/s in all, 8 / world per device, and MFU is that against one device's peak (10 TFLOP/s)."""
    from launch.mfu import throughput_metrics

    got = throughput_metrics(8_000.0, 1e9, world, 10.0)
    assert got == pytest.approx({"tflops_per_device": 8.0 / world, "mfu": 0.8 / world}, rel=1e-12)
    assert throughput_metrics(8_000.0, 1e9, world, None) == pytest.approx({"tflops_per_device": 8.0 / world},
                                                                          rel=1e-12)


def test_the_planner_prints_the_same_flop_model(capsys):
    from parallel.plan import main

    assert main(["--config", str(DEBUG), "--world", "1"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(DEBUG, [])
    assert f"model FLOPs: {flops_per_token(cfg.model, cfg.data.seq_len) / 1e9:,.2f} GFLOP per token" in out


def test_the_planner_reports_the_probe_flops_by_dtype_and_their_h100_time():
    """Kimi K2 at 4k on 256 H100s: the max-logit probe forms q.k^T of 64 heads x 192 wide over 61 layers for the
    keys up to each 512-query block's end (36 of 64 blocks of 512 x 512), in bf16 with float32 output: 3.45 GFLOP
    per token against 205.47 of model FLOPs, timed at the H100's bf16 peak (989 TFLOP/s) against the step at
    Megatron's 338: 0.6%; its float32 scores, written and read (8 bytes each), bound it at the H100's 3.35 TB/s:
    3.5% of the step (the float32 probe over all T keys was 15%); a float32 run's probe runs at 67 TFLOP/s; the
    post-step mode (without pipeline stages) runs it twice; flex attention not at all."""
    from parallel.plan import format_flops

    k2 = load_config("configs/kimi_k2.yaml", [])
    per_token = 2 * 61 * 64 * 192 * 4096 * 36 / 64
    step_s, probe_s = flops_per_token(k2.model, 4096) / 338, per_token / 989
    assert per_token / flops_per_token(k2.model, 4096) == pytest.approx(0.0168, abs=1e-4)
    line = format_flops(k2, 256).splitlines()[1]
    assert f"bfloat16 x bfloat16 -> float32 {per_token / 1e9:,.2f} GFLOP per token" in line
    tokens = 67_108_864 // 256  # per device per step
    assert f"~{per_token * tokens / 989e12:,.2f} s at the H100's 989 TFLOP/s bfloat16 peak" in line
    assert probe_s / step_s == pytest.approx(0.0057, abs=1e-4)  # its FLOPs alone
    pairs = 61 * 64 * 4096 * 36 / 64  # scores per token (layers x heads x keys per query on average)
    bytes_share = 8 * pairs / 3.35e12 / (flops_per_token(k2.model, 4096) / 338e12)
    assert f"so ~{bytes_share:.1%} of the step's modelled time" in line and "3.5%" in line
    f32 = format_flops(load_config("configs/kimi_k2.yaml", ["--train.param_dtype=float32", "--train.dtype=float32"]),
                     256).splitlines()[1]
    assert f"float32 {per_token / 1e9:,.2f} GFLOP" in f32 and "67 TFLOP/s float32 peak" in f32
    post = format_flops(load_config("configs/kimi_k2.yaml", ["--optim.qk_clip_mode=post_step", "--parallel.pp=1"]), 256)
    assert f"{2 * per_token / 1e9:,.2f} GFLOP per token" in post.splitlines()[1]
    flex = format_flops(load_config("configs/kimi_k2.yaml", ["--model.attention_impl=flex"]), 256)
    assert flex.splitlines()[1].startswith("max-logit probe: none")
