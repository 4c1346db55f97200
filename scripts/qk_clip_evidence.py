"""Evidence that QK-Clip bounds attention logits: the same tiny MLA MoE model, seed and data, trained with an
aggressive learning rate three ways: no QK-Clip, QK-Clip in forward mode (Kimi K2, the default) and QK-Clip in
post-step mode (``optim.qk_clip_mode: post_step``).

Per step it records the max pre-softmax logit of the training forward (what W&B shows as ``max_logit/max``) and,
for the clipped runs, re-measures the step's batch with an independent train-mode forward after the update and
after the clip:

* forward mode: the clip uses the forward's S_max but acts on the UPDATED weights (Kimi K2, Algorithm 1). It is
  checked to be exact (each head's logit * gamma = tau / S_max where S_max > tau, else untouched), but right after
  a step a head can sit above tau by that step's own growth until the next clip.
* post-step mode: re-measures with the updated weights and clips layer by layer, so the max logit after each
  step is <= tau. The script exits non-zero if it is not (or if the forward-mode clip is not exact, or a clipped
  run does not lower the peak).

Writes benchmarks/results/qk_clip.png and qk_clip.csv.

    python scripts/qk_clip_evidence.py                  # ~5 min on 1 CPU thread
    python scripts/qk_clip_evidence.py --steps 100 --tau 10 --out-dir /tmp/qk
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import muonclip  # noqa: E402
from benchmarks.muon_vs_adamw import add_model_args, embedded_data, model_config  # noqa: E402  (the benchmark's)
from models import ModelConfig, Transformer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.03, help="aggressive on purpose")
    p.add_argument("--tau", type=float, default=20.0, help="QK-Clip threshold (Kimi K2: 100; small here so the "
                                                           "effect shows within a short CPU run)")
    add_model_args(p, layers=2)
    return p.parse_args(argv)


@torch.no_grad()
def remeasure(model: Transformer, inputs_BT: torch.Tensor) -> torch.Tensor:
    """[L, H] max logits of the current weights on ``inputs_BT`` (a training-mode forward records the probe)."""
    model.reset_step_stats()
    model(inputs_BT)
    return torch.stack([layer.self_attn.max_logits_H.clone() for layer in model.layers])


MODES = ("none", "forward", "post_step")
LABELS = {"none": "no QK-Clip", "forward": "QK-Clip, forward mode (Kimi K2)",
          "post_step": "QK-Clip, post-step mode"}


def run(a, cfg: ModelConfig, train, mode: str) -> list[dict]:
    """One training run. ``forward``: the step is split to check the clip exactly: forward/backward (max logits S
    of the pre-update weights) -> update -> re-measure M1 (before clip) -> QK-Clip -> re-measure M2; it must give
    M2 = M1 * gamma per head, gamma = tau / S where S > tau, else 1. ``post_step``: update -> apply_post_step on
    the step's batch -> re-measure M2 (must be <= tau)."""
    torch.manual_seed(a.seed)
    model = Transformer(cfg).train()
    opt = muonclip.MuonClip(muonclip.build_param_groups(model.named_parameters()), lr=a.lr, weight_decay=0.0)
    qk = muonclip.QKClip(model.qk_clip_specs(), tau=float("inf") if mode == "none" else a.tau)  # inf: measure only
    loader = data.BatchLoader(train, a.batch)
    rows = []
    for step in range(a.steps):
        inputs_BT, targets_BT = loader.next_batch()
        model.reset_step_stats()
        loss = F.cross_entropy(model(inputs_BT).flatten(0, 1), targets_BT.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        forward_LH = torch.stack([layer.self_attn.max_logits_H.clone() for layer in model.layers])
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step, "loss": loss.item(), "max_logit": forward_LH.max().item()}
        if mode == "none":
            qk()  # what the registered post-step hook does in training (tau = inf: measures only)
        elif mode == "forward":
            before_LH = remeasure(model, inputs_BT)
            model.reset_step_stats()
            for layer, row_H in zip(model.layers, forward_LH):  # the clip acts on the forward's max logits
                layer.self_attn.max_logits_H.copy_(row_H)
            qk()
            after_LH = remeasure(model, inputs_BT)
            gamma_LH = torch.where(forward_LH > a.tau, a.tau / forward_LH, torch.ones_like(forward_LH))
            row["clip_rel_error"] = ((after_LH - before_LH * gamma_LH).abs() / before_LH.abs()).max().item()
            row["max_logit_after_update"] = before_LH.max().item()
        else:
            qk.apply_post_step(lambda: model.eval()(inputs_BT))
            model.train()
            row["max_logit_after_update"] = qk.last_max_logits.max().item()  # re-measured before its clip
            after_LH = remeasure(model, inputs_BT)
        row["clipped_heads"] = int(qk.last_clipped)
        if mode != "none":
            row["max_logit_after_clip"] = after_LH.max().item()
        rows.append(row)
        if step % 50 == 0 or step == a.steps - 1:
            print(f"{LABELS[mode]} step {step}: loss {row['loss']:.3f} max logit {row['max_logit']:.1f}"
                  + (f" -> {row['max_logit_after_update']:.2f} after update -> {row['max_logit_after_clip']:.2f} "
                     "after clip" if mode != "none" else ""), flush=True)
    return rows


def write_outputs(a, runs: dict[str, list[dict]]) -> tuple[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(a.out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(a.out_dir, "qk_clip.csv"), os.path.join(a.out_dir, "qk_clip.png")
    cols = {"none": ["loss", "max_logit"],
            "forward": ["loss", "max_logit", "max_logit_after_update", "max_logit_after_clip", "clipped_heads",
                        "clip_rel_error"],
            "post_step": ["loss", "max_logit", "max_logit_after_update", "max_logit_after_clip", "clipped_heads"]}
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [f"{c}_{m}" for m in MODES for c in cols[m]])
        for step, rows in enumerate(zip(*(runs[m] for m in MODES))):
            w.writerow([step] + [f"{r[c]:.6g}" for m, r in zip(MODES, rows) for c in cols[m]])
    steps = [r["step"] for r in runs["none"]]
    colors = {"none": "tab:red", "forward": "tab:blue", "post_step": "tab:green"}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    for m in MODES:
        ax1.plot(steps, [r["max_logit"] for r in runs[m]], label=LABELS[m], color=colors[m], lw=1)
    ax1.axhline(a.tau, color="k", ls="--", lw=0.8, label=f"tau = {a.tau:g}")
    ax1.set_yscale("log")
    ax1.set(xlabel="step", ylabel="max attention logit (all layers, heads)",
            title="Training forward (what W&B shows)")
    ax1.legend(fontsize=8)
    for m in ("forward", "post_step"):
        ax2.plot(steps, [r["max_logit_after_clip"] for r in runs[m]], label=LABELS[m], color=colors[m], lw=1)
    ax2.axhline(a.tau, color="k", ls="--", lw=0.8, label=f"tau = {a.tau:g}")
    ax2.set(xlabel="step", ylabel="max attention logit on the step's batch",
            title="Re-measured after each step's update + clip")
    ax2.legend(fontsize=8)
    for m in MODES:
        ax3.plot(steps, [r["loss"] for r in runs[m]], label=LABELS[m], color=colors[m], lw=1)
    ax3.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax3.legend(fontsize=8)
    fig.suptitle(f"MLA MoE dim {a.dim}, {a.layers} layers, Muon lr {a.lr:g} (no weight decay), "
                 f"batch {a.batch}x{a.seq}, seed {a.seed}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    return csv_path, png_path


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    datasets = embedded_data(a)
    cfg = model_config(a, datasets.tokenizer.vocab_size)
    t0 = time.perf_counter()
    runs = {m: run(a, cfg, datasets.train, m) for m in MODES}
    csv_path, png_path = write_outputs(a, runs)
    tail = max(10, a.steps // 10)
    print(f"\nwrote {png_path} and {csv_path} ({time.perf_counter() - t0:.0f} s)")
    peak = {m: max(r["max_logit"] for r in runs[m]) for m in MODES}
    for m in MODES:
        rows = runs[m]
        line = (f"{LABELS[m]:32s}: training-forward peak max logit {peak[m]:8.2f}, final loss (mean of last "
                f"{tail} steps) {sum(r['loss'] for r in rows[-tail:]) / tail:.3f}")
        if m != "none":
            after = [r["max_logit_after_clip"] for r in rows]
            over = sum(v > a.tau * (1 + 1e-5) for v in after)
            line += (f"; clipped on {sum(r['clipped_heads'] > 0 for r in rows)}/{a.steps} steps; after each step: "
                     f"max {max(after):.3f}, above tau on {over}/{a.steps} steps")
        print(line)
    worst_err = max(r["clip_rel_error"] for r in runs["forward"])
    worst_post = max(r["max_logit_after_clip"] for r in runs["post_step"])
    print(f"forward-mode exactness: after the clip every head's max logit on the step's batch = gamma * its value "
          f"before the clip (max relative error {worst_err:.1e})")
    print(f"post-step mode: max logit after every step <= tau = {a.tau:g}: worst {worst_post:.4f}")
    failures = []
    if worst_err >= 1e-4:
        failures.append("the forward-mode clip did not scale the logits as specified")
    if worst_post > a.tau * (1 + 1e-5):
        failures.append(f"post-step mode left a max logit of {worst_post:.4f} > tau after a step")
    if peak["none"] > a.tau and not all(peak[m] < peak["none"] for m in ("forward", "post_step")):
        failures.append("a clipped run did not lower the peak max logit")
    print("OK" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
