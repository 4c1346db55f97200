"""Newton–Schulz paths and coefficient schedules: accuracy per shape, speed per shape, and the optimizer step.

Three tables, all on one torch thread, setups interleaved round by round (medians):

1. Accuracy: relative Frobenius distance of the 5-step result to the exact polar factor U V^T (float64 SVD) and
   the band its singular values land in, for Gaussian matrices and ill-conditioned ones (singular values spread
   over 1e4, like a low-rank momentum), per (coefficients, path, dtype).
2. Speed per Muon shape of the model (``--config``, default configs/tiny.yaml): ms and GFLOP/s (FLOPs from
   ``muonclip.newton_schulz.ns_flops``; bf16 counted the same) for standard vs gram, float32 vs bfloat16.
3. The optimizer step on that model with real gradients: MuonClip (each NS setting) vs torch AdamW and vs
   MuonClip with every parameter in AdamW, ms per ``step()``.

    python benchmarks/ns.py                              # ~2 min here
    python benchmarks/ns.py --device cuda --config configs/small_gpu.yaml
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import muonclip  # noqa: E402
from configs import load_config  # noqa: E402
from models import Transformer  # noqa: E402
from muonclip.newton_schulz import choose_path, newton_schulz, ns_flops  # noqa: E402

SETTINGS = [  # (label, coefficients, path, dtype)
    ("quintic standard f32", "quintic", "standard", torch.float32),
    ("quintic auto f32", "quintic", "auto", torch.float32),
    ("polar_express auto f32", "polar_express", "auto", torch.float32),
    ("quintic standard bf16", "quintic", "standard", torch.bfloat16),
    ("polar_express standard bf16", "polar_express", "standard", torch.bfloat16),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=5, help="Newton-Schulz steps")
    p.add_argument("--out", default="benchmarks/results/ns.md")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: list, rounds: int, device: str) -> list[float]:
    """Median seconds of each function; every round runs all of them once, in turn (after one warm-up call)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for j, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def ill_conditioned(G: torch.Tensor) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ torch.diag_embed(S * torch.logspace(0, -4, S.shape[-1], dtype=G.dtype)) @ Vh


def accuracy_table(steps: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(128, 256), (256, 256), (64, 512)]
    lines = ["| setting | input | rel. distance to U V^T | singular values after |", "|---|---|---:|---|"]
    for label, coefficients, path, dtype in SETTINGS + [("quintic gram f32", "quintic", "gram", torch.float32),
                                                        ("polar_express gram f32", "polar_express", "gram",
                                                         torch.float32)]:
        for kind in ("gaussian", "ill-conditioned"):
            dists, lo, hi = [], 1.0, 1.0
            for shape in shapes:
                G = torch.randn(*shape, generator=gen, dtype=torch.float64)
                G = ill_conditioned(G) if kind != "gaussian" else G
                U, _, Vh = torch.linalg.svd(G, full_matrices=False)
                polar = U @ Vh
                out = newton_schulz(G.float(), steps, dtype=dtype, coefficients=coefficients, path=path).double()
                dists.append(((out - polar).norm() / polar.norm()).item())
                s = torch.linalg.svdvals(out)
                lo, hi = min(lo, s.min().item()), max(hi, s.max().item())
            lines.append(f"| {label} | {kind} | {max(dists):.3f} | [{lo:.3g}, {hi:.3g}] |")
    return lines


def muon_shapes(cfg) -> collections.Counter:
    with torch.device("meta"):
        model = Transformer(cfg.model)
    shapes: collections.Counter = collections.Counter()
    for group in muonclip.build_param_groups(model.named_parameters()):
        if group["use_muon"]:
            for p in group["params"]:
                shapes[tuple(p.shape)] += 1
    return shapes


def speed_table(cfg, steps: int, rounds: int, device: str) -> list[str]:
    rows = [("standard", torch.float32), ("gram", torch.float32), ("standard", torch.bfloat16)]
    lines = ["| shape | count | auto (f32) picks | " + " | ".join(f"{p} {str(d)[6:]} ms (GFLOP/s)" for p, d in rows)
             + " |", "|---|---:|---|" + "---:|" * len(rows)]
    totals = [0.0] * len(rows)
    for shape, count in sorted(muon_shapes(cfg).items()):
        G = torch.randn(*shape, device=device)
        fns = [lambda p=p, d=d: newton_schulz(G, steps, dtype=d, path=p) for p, d in rows]
        secs = interleaved(fns, rounds, device)
        n_mat = shape[0] if len(shape) == 3 else 1
        cells = []
        for j, ((path, _), t) in enumerate(zip(rows, secs)):
            totals[j] += count * t
            cells.append(f"{t * 1e3:.2f} ({n_mat * ns_flops(shape, steps, path) / t / 1e9:.0f})")
        lines.append(f"| {list(shape)} | {count} | {choose_path(shape, steps)} | " + " | ".join(cells) + " |")
    lines.append("| **all Muon matrices** | | | " + " | ".join(f"**{t * 1e3:.1f}**" for t in totals) + " |")
    return lines


def optimizer_table(cfg, rounds: int, device: str) -> list[str]:
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device).train()
    x = torch.randint(0, cfg.model.vocab_size, (4, min(256, cfg.model.max_seq_len) + 1), device=device)
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def fresh(kind, coefficients="quintic", path="standard", dtype=torch.float32):
        m = Transformer(cfg.model).to(device)
        m.load_state_dict(model.state_dict())
        for n, p in m.named_parameters():
            p.grad = grads.get(n)
        if kind == "adamw":
            return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                                     weight_decay=0.1)
        groups = muonclip.build_param_groups(m.named_parameters())
        if kind == "all_adamw":
            for g in groups:
                g["use_muon"] = False
        return muonclip.MuonClip(groups, lr=1e-3, ns_coefficients=coefficients, ns_path=path, ns_dtype=dtype)

    setups = [("torch AdamW", fresh("adamw")), ("MuonClip, every parameter in AdamW", fresh("all_adamw"))]
    setups += [(f"MuonClip, {label}", fresh("muon", c, p, d)) for label, c, p, d in SETTINGS]
    secs = interleaved([opt.step for _, opt in setups], rounds, device)
    base = secs[0]
    lines = ["| optimizer step | ms | vs torch AdamW |", "|---|---:|---:|"]
    lines += [f"| {label} | {t * 1e3:.1f} | {t / base:.2f}x |" for (label, _), t in zip(setups, secs)]
    return lines


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(a.config)
    n_params = sum(p.numel() for p in Transformer(cfg.model).parameters())
    head = [f"# benchmarks/ns.py, {time.strftime('%Y-%m-%d')}", "",
            f"`python benchmarks/ns.py --config {a.config}`; device {a.device}, torch {torch.__version__}, 1 thread, "
            f"{a.steps} Newton-Schulz steps, medians of {a.rounds} interleaved rounds; model {n_params / 1e6:.1f}M "
            f"parameters; load average {os.getloadavg()[0]:.2f} at the start", ""]
    sections = [("Accuracy (5 steps; 128x256, 256x256, 64x512; worst of the three)", accuracy_table(a.steps)),
                ("Speed per Muon shape", speed_table(cfg, a.steps, a.rounds, a.device)),
                ("Optimizer step, real gradients", optimizer_table(cfg, a.rounds, a.device))]
    lines = head
    for title, table in sections:
        lines += [f"## {title}", ""] + table + [""]
        print("\n".join([f"## {title}", ""] + table + [""]), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
