"""DeepSpeed's Ulysses (``deepspeed.sequence.layer.DistributedAttention``) against this project's all-to-all over
heads (parallel/context_parallel.py), on 2 gloo processes: exactness against one process's causal attention and
forward + backward time, MLA-shaped heads (q/k 192 wide, v 128: DeepSeek-V3/K2's head dims).

    bash benchmarks/deepspeed_muon.sh makes the venv on first use, or:
    python -m venv --system-site-packages /tmp/muonclip-deepspeed-venv
    DS_BUILD_OPS=0 /tmp/muonclip-deepspeed-venv/bin/pip install deepspeed==0.19.8
    OMP_NUM_THREADS=1 /tmp/muonclip-deepspeed-venv/bin/python -m torch.distributed.run --standalone \\
        --nproc_per_node=2 benchmarks/ulysses_deepspeed.py

Results: printed by rank 0 (medians of interleaved repeats); benchmarks/README.md records them.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel.context_parallel import heads_to_seq, seq_to_heads  # noqa: E402

B, T, H, DQ, DV = 1, 2048, 16, 192, 128
REPEATS = 9


def reference(q, k, v):  # [B, H, T, d]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=DQ ** -0.5)


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    try:
        import deepspeed
        import deepspeed.comm as ds_comm
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError as e:
        print(f"ulysses_deepspeed.py: deepspeed is not installed ({e}); make the venv its docstring shows")
        return 0

    deepspeed.init_distributed(dist_backend="gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(cp)))
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, T, DQ, generator=gen) for _ in range(2))
    v = torch.randn(B, H, T, DV, generator=gen)
    grad = torch.randn(B, H, T, DV, generator=gen)
    n = T // cp
    mine = slice(rank * n, (rank + 1) * n)
    ref_out = reference(q, k, v)[:, :, mine]

    def local_attention(q_BTHd, k_BTHd, v_BTHe, *args, **kwargs):  # DeepSpeed's layout: [B, T, H/cp, d]
        out = reference(q_BTHd.transpose(1, 2), k_BTHd.transpose(1, 2), v_BTHe.transpose(1, 2))
        return out.transpose(1, 2)

    ds_attn = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)

    def run_deepspeed():
        ql, kl, vl = (t[:, :, mine].transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        out = ds_attn(ql, kl, vl, 0).transpose(1, 2)  # batch_dim_idx 0
        out.backward(grad[:, :, mine])
        return out.detach()

    def run_ours():
        ql, kl, vl = (t[:, :, mine].contiguous().requires_grad_() for t in (q, k, v))
        qh, kh, vh = (seq_to_heads(t, group, cp) for t in (ql, kl, vl))
        out = heads_to_seq(reference(qh, kh, vh), group, cp)
        out.backward(grad[:, :, mine])
        return out.detach()

    results = {"deepspeed": run_deepspeed(), "ours": run_ours()}
    times: dict[str, list[float]] = {name: [] for name in results}
    for _ in range(REPEATS):
        for name, fn in (("deepspeed", run_deepspeed), ("ours", run_ours)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    if rank == 0:
        print(f"cp={cp}, B={B}, T={T}, H={H}, q/k head {DQ}, v head {DV}, float32, gloo, one thread per process")
        for name, out in results.items():
            err = (out - ref_out).abs().max().item()
            print(f"{name:9s}: max |out - one process| = {err:.2e}, forward+backward median "
                  f"{statistics.median(times[name]) * 1e3:.1f} ms over {REPEATS} interleaved repeats")
    ds_comm.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
