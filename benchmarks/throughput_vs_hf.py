"""Training-step throughput: our Transformer + MuonClip vs transformers' DeepseekV3ForCausalLM + torch AdamW.

Both models get the SAME weights (ours exported with ``models.hf_interop.export_hf`` and loaded by
``DeepseekV3ForCausalLM.from_pretrained``); the script first checks that their logits agree, then times full
training steps (forward, cross-entropy, backward, optimizer step) on the same random token batches.

Rows: ours+MuonClip (QK-Clip on: the model records per-head max logits), ours+MuonClip without QK-Clip,
ours+MuonClip with bfloat16 Newton-Schulz, ours+AdamW (isolates the optimizer cost), HF+AdamW with its default
experts implementation and with "eager". Each step is also timed by phase (forward incl. the loss, backward,
optimizer step incl. QK-Clip and zero_grad), with a device sync between phases.

    python benchmarks/throughput_vs_hf.py                       # CPU, tiny config, ~2 min on 2 cores
    python benchmarks/throughput_vs_hf.py --device cuda --batch 32 --seq 1024 --dim 1024
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import muonclip  # noqa: E402
from models import ModelConfig, Transformer  # noqa: E402
from models.hf_interop import export_hf  # noqa: E402
from parallel.parallelize import apply_compile  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings on a shared machine)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="benchmarks/results/throughput_vs_hf.md")
    return p.parse_args(argv)


def model_config(a) -> ModelConfig:
    return ModelConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, attn_type="mla", n_heads=4,
                       q_lora_rank=0, kv_lora_rank=a.dim // 4, qk_nope_head_dim=32, qk_rope_head_dim=16,
                       v_head_dim=32, inter_dim=2 * a.dim, moe_inter_dim=a.dim // 2, n_routed_experts=8,
                       n_shared_experts=1, n_activated_experts=2, first_k_dense=1, max_seq_len=a.seq)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


PHASES = ("forward", "backward", "optimizer")


def time_interleaved(steps, batches, warmup: int, device: str) -> tuple[list[list[list[float]]], list[float]]:
    """Per setup, per step, the seconds of each phase, and each setup's first step in seconds; setups take turns
    step by step so load changes on a shared machine hit all alike. A step function yields at each phase
    boundary."""
    times: list[list[list[float]]] = [[] for _ in steps]
    first: list[float] = [0.0] * len(steps)
    for i, (x, y) in enumerate(batches):
        for j, step_fn in enumerate(steps):
            phases = []
            sync(device)
            t0 = time.perf_counter()
            for _ in step_fn(x, y):
                sync(device)
                t1 = time.perf_counter()
                phases.append(t1 - t0)
                t0 = t1
            if i == 0:
                first[j] = sum(phases)
            if i >= warmup:
                times[j].append(phases)
    return times, first


def ours_step(model, opt, qkclip):
    def step(x, y):
        model.reset_step_stats()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        yield
        loss.backward()
        yield
        opt.step()
        if qkclip is not None:
            qkclip()
        opt.zero_grad(set_to_none=True)
        yield
    return step


def hf_step(model, opt):
    def step(x, y):
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        yield
        loss.backward()
        yield
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield
    return step


def build_rows(a, cfg, hf_dir):
    from transformers import DeepseekV3ForCausalLM

    def ours(muon: bool, clip: bool, ns_dtype=torch.float32, compile_blocks: bool = False):
        torch.manual_seed(0)
        model = Transformer(cfg).to(a.device).train()
        if compile_blocks:
            apply_compile(model)
        if muon:
            opt = muonclip.MuonClip(muonclip.build_param_groups(model.named_parameters()), lr=a.lr, ns_dtype=ns_dtype)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
        qk = muonclip.QKClip(model.qk_clip_specs(), tau=100.0) if clip else None
        if not clip:  # skip the max-logit probe entirely: eval-mode recording is off, so patch the record
            for layer in model.layers:
                layer.self_attn._record = lambda q, k: None
        return ours_step(model, opt, qk)

    def hf(impl: str | None):
        model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(a.device).train()
        if impl is not None:
            model.set_experts_implementation(impl)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
        return hf_step(model, opt), model.config._experts_implementation

    rows = [lambda: (ours(True, True), "ours + MuonClip (QK-Clip on)"),
            lambda: (ours(True, False), "ours + MuonClip (no QK-Clip, no max-logit probe)"),
            lambda: (ours(True, True, torch.bfloat16), "ours + MuonClip (QK-Clip on, bf16 Newton-Schulz)"),
            lambda: (ours(True, True, compile_blocks=True), "ours + MuonClip (QK-Clip on, torch.compile per block)"),
            lambda: (ours(False, False), "ours + torch AdamW (no probe)")]
    for impl in (None, "eager"):
        def make(impl=impl):
            step, resolved = hf(impl)
            return step, f"HF DeepseekV3ForCausalLM + torch AdamW (experts: {resolved})"
        rows.append(make)
    return rows


def check_parity(cfg, hf_dir, a) -> float:
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    hf = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, min(64, a.seq)))
    with torch.no_grad():
        return (ours(x) - hf(input_ids=x).logits.float()).abs().max().item()


def main(argv=None):
    import transformers

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = model_config(a)
    g = torch.Generator().manual_seed(1)
    n = a.warmup + a.steps
    batches = [(lambda t: (t[:, :-1].to(a.device), t[:, 1:].to(a.device)))(
        torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g)) for _ in range(n)]
    tokens_per_step = a.batch * a.seq
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        export_hf(Transformer(cfg), tmp)
        diff = check_parity(cfg, tmp, a)
        print(f"logit parity ours vs HF (same weights): max |diff| = {diff:.2e}", flush=True)
        built = [make() for make in build_rows(a, cfg, tmp)]
        all_times, first_steps = time_interleaved([step for step, _ in built], batches, a.warmup, a.device)
    compile_note: list[str] = []
    results = []
    for (_, label), times, first in zip(built, all_times, first_steps):
        if "compile" in label:
            print(f"{label}: first step {first:.1f} s (compilation)", flush=True)
            compile_note.append(f"torch.compile: the first step of the compiled row took {first:.1f} s (compilation).")
        med = statistics.median(sum(phases) for phases in times)
        by_phase = [statistics.median(phases[k] for phases in times) for k in range(len(PHASES))]
        results.append((label, med, tokens_per_step / med, by_phase))
        print(f"{label}: {med * 1e3:.0f} ms/step ({', '.join(f'{n} {t * 1e3:.0f}' for n, t in zip(PHASES, by_phase))}"
              f"), {tokens_per_step / med:,.0f} tokens/s", flush=True)
    n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    base = results[-2][2]
    lines = [
        f"Machine: {cpu_name()} ({os.cpu_count()} cores visible), device {a.device}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} torch thread(s), load average "
        f"{os.getloadavg()[0]:.2f} at the end",
        f"Config: MLA, dim {cfg.dim}, {cfg.n_layers} layers ({cfg.first_k_dense} dense), 4 heads, "
        f"{cfg.n_routed_experts} experts top-{cfg.n_activated_experts} + {cfg.n_shared_experts} shared, "
        f"vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params; batch {a.batch} x seq {a.seq} = {tokens_per_step} "
        f"tokens/step; median of {a.steps} steps after {a.warmup} warmup, setups interleaved step by step; float32",
        f"Logit parity (same weights): max |diff| = {diff:.1e}",
        *compile_note,
        "",
        "Phases are medians on their own (they need not add up to the step's median).",
        "",
        "| setup | ms/step | forward ms | backward ms | optimizer ms | tokens/s | vs HF default |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ] + [f"| {lbl} | {m * 1e3:.0f} | " + " | ".join(f"{t * 1e3:.0f}" for t in ph) + f" | {tps:,.0f} | {tps / base:.2f}x |"
         for lbl, m, tps, ph in results]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
