"""Small GPU measurements for benchmarks/gpu_check.sh (each a subcommand; none is needed on CPU machines).

    torchrun --nproc_per_node=1 -m benchmarks.gpu_probe nccl      # NCCL init + all-reduce
    python -m benchmarks.gpu_probe mfu --config C --metrics M     # tokens/s and MFU of a training run
    python -m benchmarks.gpu_probe max_logits                     # flex attention max scores vs our probe
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

# dense bf16 tensor-core peak FLOP/s by device name (vendor data sheets, SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12}


def nccl() -> None:
    import torch.distributed as dist

    t0 = time.perf_counter()
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    x = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    print(f"nccl: world {dist.get_world_size()}, init + 4 MiB all-reduce {time.perf_counter() - t0:.2f} s, "
          f"value {x[0].item()}")
    dist.destroy_process_group()


def active_params(model_cfg) -> tuple[int, int]:
    """(total, active per token) parameters: routed experts count top-k of n; embeddings excluded from active."""
    from models import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    total = sum(p.numel() for p in model.parameters())
    active = 0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        n = p.numel()
        if ".mlp.experts." in name:
            n = n * model_cfg.n_activated_experts // model_cfg.n_routed_experts
        active += n
    return total, active


def mfu(config: str, metrics: str) -> None:
    from configs import load_config

    cfg = load_config(config)
    total, active = active_params(cfg.model)
    records = [json.loads(line) for line in open(metrics) if '"tokens_per_s"' in line]
    rates = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]
    tps = statistics.median(rates)
    m, T = cfg.model, cfg.data.seq_len
    attn = 6 * m.n_layers * m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * T // 2  # causal
    flops_per_token = 6 * active + attn
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"mfu: {name}; {total / 1e9:.2f}B params, {active / 1e9:.3f}B active; median {tps:,.0f} tokens/s over "
          f"{len(rates)} logged intervals; {flops_per_token / 1e9:.2f} GFLOP/token (6N + causal attention) -> "
          f"{tps * flops_per_token / 1e12:.1f} TFLOP/s" + (f", MFU {tps * flops_per_token / peak:.1%} of "
                                                           f"{peak / 1e12:.0f} TFLOP/s bf16" if peak else ""))


def max_logits() -> None:
    """Per-head max scaled logit: flex attention's AuxRequest(max_scores=True) vs models.layers.causal_max_logits
    (the reference) on random bf16 q/k, with timings; our probe's float32 result is the one QK-Clip uses."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    from models.layers import causal_max_logits

    torch.manual_seed(0)
    B, H, T, d = 4, 16, 2048, 96
    q, k, v = (torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = d ** -0.5
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
    flex = torch.compile(flex_attention)

    def with_flex():
        _, aux = flex(q, k, v, block_mask=mask, scale=scale, return_aux=AuxRequest(max_scores=True))
        return aux.max_scores.float().amax(dim=(0, 2))

    def sdpa_and_probe():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return causal_max_logits(q, k, scale)

    for fn in (with_flex, sdpa_and_probe):
        fn()
    torch.cuda.synchronize()
    times = {}
    for fn in (with_flex, sdpa_and_probe):
        t0 = time.perf_counter()
        for _ in range(10):
            out = fn()
        torch.cuda.synchronize()
        times[fn.__name__] = (time.perf_counter() - t0) / 10 * 1e3
    ref, got = sdpa_and_probe(), with_flex()
    rel = ((got - ref).abs() / ref.abs()).max().item()
    print(f"max_logits: B{B} H{H} T{T} d{d} bf16: flex max_scores vs float32 probe max rel. diff {rel:.2e}; "
          f"flex attention + max scores {times['with_flex']:.2f} ms, SDPA + chunked probe {times['sdpa_and_probe']:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["nccl", "mfu", "max_logits"])
    p.add_argument("--config")
    p.add_argument("--metrics")
    a = p.parse_args()
    if a.what == "nccl":
        nccl()
    elif a.what == "mfu":
        mfu(a.config, a.metrics)
    else:
        max_logits()


if __name__ == "__main__":
    main()
