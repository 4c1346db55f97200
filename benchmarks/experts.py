"""Routed-expert cost against load imbalance: grouped GEMM (models/moe.py) vs the padded bmm it replaced vs the loop.

    python benchmarks/experts.py            # tiny.yaml's expert shapes, forward + backward, 1 thread

"padding p": the busiest expert gets p times the mean load (the padded bmm computes E * p * mean rows, the
grouped GEMM exactly the routed rows). For each p the three setups are interleaved, ``--repeats`` times; the
median is reported. The padded bmm is reproduced here as it was in models/moe.py before grouped GEMM replaced it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import GroupedExperts  # noqa: E402


def padded_bmm(ex: GroupedExperts, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The previous grouped path: scatter rows into [E, capacity, D], three bmm, gather back."""
    E, T = counts_E.numel(), x_TD.shape[0]
    capacity = int(counts_E.max())
    expert_of_T = torch.repeat_interleave(torch.arange(E), counts_E)
    slot_of_T = torch.arange(T) - (torch.cumsum(counts_E, 0) - counts_E)[expert_of_T]
    x_ECD = x_TD.new_zeros(E, capacity, x_TD.shape[1])
    x_ECD[expert_of_T, slot_of_T] = x_TD
    h_ECI = F.silu(torch.bmm(x_ECD, ex.gate_proj.transpose(1, 2))) * torch.bmm(x_ECD, ex.up_proj.transpose(1, 2))
    return torch.bmm(h_ECI, ex.down_proj.transpose(1, 2))[expert_of_T, slot_of_T]


def counts_for(padding: float, rows: int, experts: int) -> torch.Tensor:
    mean = rows / experts
    busiest = int(round(padding * mean))
    rest = rows - busiest
    counts = torch.full((experts,), rest // (experts - 1), dtype=torch.int64)
    counts[: rest % (experts - 1)] += 1
    counts[-1] = 0
    counts = torch.cat([torch.tensor([busiest]), counts[:-1]])
    assert int(counts.sum()) == rows
    return counts


def time_setup(fn, ex, x, counts, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        y = fn(ex, x, counts)
        y.backward(torch.ones_like(y).contiguous())
    return (time.perf_counter() - t0) / iters * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--inter", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rows", type=int, default=8 * 256 * 2, help="routed rows: tokens x top-k (tiny.yaml: 4096)")
    p.add_argument("--paddings", type=float, nargs="+", default=[1.0, 1.5, 2.0, 4.0])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "experts.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ex = GroupedExperts(a.experts, a.dim, a.inter)
    ex.init_weights(0.02, 0.02)
    assert ex.path(torch.device("cpu"), torch.float32) == "grouped"
    x = torch.randn(a.rows, a.dim, requires_grad=True)
    setups = {"grouped GEMM (now)": lambda e, xx, c: e._grouped(xx, c),
              "padded bmm (before)": padded_bmm,
              "loop (reference)": lambda e, xx, c: e._loop(xx, c)}
    rows = []
    for padding in a.paddings:
        counts = counts_for(padding, a.rows, a.experts)
        y_ref = ex._loop(x, counts)
        for fn in setups.values():
            torch.testing.assert_close(fn(ex, x, counts), y_ref, rtol=1e-5, atol=1e-5)
        times = {name: [] for name in setups}
        for _ in range(a.repeats):
            for name, fn in setups.items():
                times[name].append(time_setup(fn, ex, x, counts, a.iters))
        rows.append((padding, {name: statistics.median(t) for name, t in times.items()}))
        print(f"padding {padding}: " + ", ".join(f"{n} {m:.1f} ms" for n, m in rows[-1][1].items()), flush=True)
    names = list(setups)
    lines = [f"# Routed experts vs load imbalance ({time.strftime('%Y-%m-%d')})", "",
             f"`python benchmarks/experts.py` — E={a.experts}, dim {a.dim}, inter {a.inter}, {a.rows} routed rows, "
             f"forward + backward, 1 thread, median of {a.repeats} interleaved repeats of {a.iters} iterations.", "",
             "| padding (busiest / mean) | " + " | ".join(f"{n} ms" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for padding, med in rows:
        lines.append(f"| {padding:g} | " + " | ".join(f"{med[n]:.1f}" for n in names) + " |")
    first, last = rows[0][1], rows[-1][1]
    lines += ["", f"Grouped GEMM at padding {rows[-1][0]:g} vs {rows[0][0]:g}: "
              f"{last[names[0]] / first[names[0]]:.2f}x (target: within 10%); padded bmm: "
              f"{last[names[1]] / first[names[1]]:.2f}x."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
