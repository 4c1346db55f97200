"""Token efficiency: MuonClip vs AdamW at equal token budgets on the embedded corpus, with a small lr sweep each.

Every run: same model init (seed), same batches in the same order, same schedule (linear warmup, cosine decay to
10%), weight decay 0.1 on matrices and embeddings (none on norms/biases), grad-norm clip 1.0. MuonClip = Muon for
hidden matrices and expert stacks + AdamW (same lr) for embeddings/head/norms, QK-Clip tau=100. AdamW =
torch.optim.AdamW on everything, betas (0.9, 0.95). Validation loss on fixed held-out windows during training.

Reports, for the best lr of each optimizer (lowest final validation loss), the fraction of the token budget
Muon needs to reach AdamW's final validation loss (linear interpolation between evaluations).
Writes benchmarks/results/muon_vs_adamw.{png,md,csv}.

    python benchmarks/muon_vs_adamw.py                    # ~14 min on 1 CPU thread
    python benchmarks/muon_vs_adamw.py --steps 100 --muon-lrs 0.01 --adamw-lrs 0.004 --out-dir /tmp/mva
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import muonclip  # noqa: E402
from models import ModelConfig, Transformer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[5e-3, 1e-2, 2e-2])
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[4e-3, 8e-3, 1.6e-2, 3.2e-2])
    p.add_argument("--warmup-frac", type=float, default=0.1)
    p.add_argument("--ns-coefficients", default="quintic", help="MuonClip's Newton-Schulz coefficients")
    p.add_argument("--ns-dtype", default="float32", choices=["float32", "bfloat16"], help="Newton-Schulz dtype")
    add_model_args(p, layers=3)
    return p.parse_args(argv)


def add_model_args(p: argparse.ArgumentParser, layers: int) -> None:
    """The arguments ``model_config`` and the run setup read (shared with scripts/qk_clip_evidence.py)."""
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data", "cache"))
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))


def model_config(a, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, dim=a.dim, n_layers=a.layers, attn_type="mla", n_heads=4,
                       q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                       inter_dim=2 * a.dim, moe_inter_dim=a.dim // 2, n_routed_experts=8, n_activated_experts=2,
                       first_k_dense=1, max_seq_len=a.seq)


def embedded_data(a, val_batches: int = 1) -> "data.Datasets":
    """Training/validation streams of the embedded corpus (bpe8k) for ``a.seq`` x ``a.batch`` batches."""
    from configs import DataConfig
    d = DataConfig(data_dir=a.data_dir, seq_len=a.seq, micro_batch_size=a.batch, seed=a.seed, val_batches=val_batches)
    return data.build_datasets(d, model_vocab_size=8192, global_batch=a.batch,
                               planned_samples=getattr(a, "steps", 0) * a.batch)


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(kind: str, model: Transformer, lr: float, ns_coefficients: str = "quintic",
                    ns_dtype: str = "float32"):
    groups = muonclip.build_param_groups(model.named_parameters(), weight_decay=0.1)
    if kind == "muon":
        opt = muonclip.MuonClip(groups, lr=lr, weight_decay=0.1, ns_coefficients=ns_coefficients,
                                ns_dtype=getattr(torch, ns_dtype))
        muonclip.QKClip(model.qk_clip_specs(), tau=100.0).register(opt)
        return opt
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


@torch.no_grad()
def evaluate(model: Transformer, val_windows) -> float:
    model.eval()
    loss = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in val_windows)
    model.train()
    return loss / len(val_windows)


def run(a, cfg, datasets, kind: str, lr: float, val_windows) -> dict:
    torch.manual_seed(a.seed)
    model = Transformer(cfg).train()
    opt = build_optimizer(kind, model, lr, a.ns_coefficients, a.ns_dtype)
    base_lrs = [g["lr"] for g in opt.param_groups]
    loader = data.BatchLoader(datasets.train, a.batch)
    warmup = max(1, int(a.warmup_frac * a.steps))
    tokens_per_step = a.seq * a.batch
    curve, train_losses, t0 = [(0, evaluate(model, val_windows))], [], time.perf_counter()
    for step in range(a.steps):
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * lr_factor(step, a.steps, warmup)
        model.reset_step_stats()
        x, y = loader.next_batch()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            curve.append(((step + 1) * tokens_per_step, evaluate(model, val_windows)))
    secs = time.perf_counter() - t0
    out = {"kind": kind, "lr": lr, "curve": curve, "final_val": curve[-1][1],
           "final_train": sum(train_losses[-20:]) / len(train_losses[-20:]), "seconds": secs}
    print(f"{kind:5s} lr {lr:g}: final val {out['final_val']:.4f}, train (last 20) {out['final_train']:.4f}, "
          f"{secs:.0f} s", flush=True)
    return out


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count at which the (linearly interpolated) validation curve reaches ``target``."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
    return None


def write_outputs(a, cfg, runs: list[dict], n_params: int, total_secs: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(a.out_dir, exist_ok=True)
    best = {k: min((r for r in runs if r["kind"] == k), key=lambda r: r["final_val"]) for k in ("muon", "adamw")}
    target = best["adamw"]["final_val"]
    reach = tokens_to_reach(best["muon"]["curve"], target)
    budget = best["adamw"]["curve"][-1][0]
    ratio_text = (f"{reach / budget:.2f} ({reach / 1e3:.0f}k of {budget / 1e3:.0f}k tokens)" if reach is not None
                  else f"not reached within {budget / 1e3:.0f}k tokens")

    with open(os.path.join(a.out_dir, "muon_vs_adamw.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "lr", "tokens", "val_loss"])
        for r in runs:
            for tokens, loss in r["curve"]:
                w.writerow([r["kind"], r["lr"], tokens, f"{loss:.5f}"])

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"muon": plt.cm.Blues, "adamw": plt.cm.Oranges}
    for kind in ("muon", "adamw"):
        mine = [r for r in runs if r["kind"] == kind]
        for i, r in enumerate(mine):
            is_best = r is best[kind]
            ax.plot([t / 1e3 for t, _ in r["curve"]], [v for _, v in r["curve"]], marker="o", ms=3,
                    color=colors[kind](0.4 + 0.5 * (i + 1) / len(mine)), lw=2.2 if is_best else 1.0,
                    label=f"{'MuonClip' if kind == 'muon' else 'AdamW'} lr {r['lr']:g}" + (" (best)" if is_best else ""))
    ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"AdamW best final val {target:.3f}")
    if reach is not None:
        ax.axvline(reach / 1e3, color="tab:blue", ls=":", lw=0.8)
    lo = min(r["final_val"] for r in runs)
    ax.set_ylim(lo - 0.1, lo + 2.0)
    ax.set(xlabel="training tokens (thousands)", ylabel="validation loss",
           title=f"MuonClip vs AdamW, equal token budget ({n_params / 1e6:.1f}M-param MLA MoE)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out_dir, "muon_vs_adamw.png"), dpi=110)

    lines = [
        f"Model: MLA MoE, dim {cfg.dim}, {cfg.n_layers} layers ({cfg.first_k_dense} dense), 4 heads, "
        f"{cfg.n_routed_experts} experts top-{cfg.n_activated_experts} + {cfg.n_shared_experts} shared, vocab "
        f"{cfg.vocab_size} (bpe8k), {n_params / 1e6:.2f}M params. Budget {a.steps} steps x {a.batch} x {a.seq} = "
        f"{budget / 1e3:.0f}k tokens per run; warmup {a.warmup_frac:.0%} + cosine to 10%; wd 0.1; grad clip 1.0; "
        f"seed {a.seed}; MuonClip Newton-Schulz: {a.ns_coefficients}, {a.ns_dtype}; validation {a.val_batches} x {a.batch} x {a.seq} held-out tokens. Total {total_secs / 60:.1f} min.",
        "",
        "| optimizer | lr | final val loss | train loss (last 20 steps) | seconds |",
        "|---|---:|---:|---:|---:|",
    ] + [f"| {'MuonClip' if r['kind'] == 'muon' else 'AdamW'} | {r['lr']:g} | {r['final_val']:.4f}"
         f"{' **best**' if r is best[r['kind']] else ''} | {r['final_train']:.4f} | {r['seconds']:.0f} |"
         for r in runs] + [
        "",
        f"Tokens for MuonClip (lr {best['muon']['lr']:g}) to reach AdamW's best final val loss ({target:.4f}, "
        f"lr {best['adamw']['lr']:g}): {ratio_text}.",
    ]
    for kind, grid in (("muon", a.muon_lrs), ("adamw", a.adamw_lrs)):
        if len(grid) > 1 and best[kind]["lr"] in (min(grid), max(grid)):
            lines.append(f"Note: the best {kind} lr is at the edge of its grid {grid}; widen the sweep.")
    with open(os.path.join(a.out_dir, "muon_vs_adamw.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    datasets = embedded_data(a, a.val_batches)
    cfg = model_config(a, datasets.tokenizer.vocab_size)
    val_windows = list(data.val_batches(datasets.val, a.batch, datasets.val_samples))
    t0 = time.perf_counter()
    runs = [run(a, cfg, datasets, "muon", lr, val_windows) for lr in a.muon_lrs]
    runs += [run(a, cfg, datasets, "adamw", lr, val_windows) for lr in a.adamw_lrs]
    n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    write_outputs(a, cfg, runs, n_params, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
