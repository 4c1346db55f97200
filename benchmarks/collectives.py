"""Time the collectives ZeRO-1 chooses between, on this machine's backend (a script, not a test).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/collectives.py
    torchrun --nproc_per_node=2 benchmarks/collectives.py --sizes-mb 1,4,8,32 --repeats 9

For each buffer size N: the gradient reduction of one bucket (reduce to one rank vs all-reduce: what
``muonclip._dist_comm.reduce_by_all_reduce`` picks between), the parameter return (broadcast of the bucket vs
all-gather of the same bytes), and the reduce-scatter a padded one-bucket-per-group layout would use. The
collectives take turns within each repeat (barrier before each); medians over ``--repeats`` on rank 0.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", default="1,4,8,32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    if rank == 0:
        print(f"# {dist.get_backend()} x{world}, 1 thread/rank, medians of {args.repeats} interleaved repeats (ms)")
        print(f"{'MB':>6}{'reduce':>9}{'all_reduce':>12}{'broadcast':>11}{'all_gather':>12}{'reduce_scatter':>16}")
    for mb in (float(x) for x in args.sizes_mb.split(",")):
        n = int(mb * 2**20) // 4 // world * world
        buf = torch.randn(n, device=device)
        shard = torch.empty(n // world, device=device)
        ops = {"reduce": lambda: dist.reduce(buf, 0), "all_reduce": lambda: dist.all_reduce(buf),
               "broadcast": lambda: dist.broadcast(buf, 0), "all_gather": lambda: dist.all_gather_single(buf, shard),
               "reduce_scatter": lambda: dist.reduce_scatter_single(shard, buf)}
        times: dict[str, list[float]] = {k: [] for k in ops}
        for _ in range(args.repeats + 1):
            for name, op in ops.items():
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                op()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        if rank == 0:
            med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
            print(f"{mb:>6g}{med['reduce']:>9.2f}{med['all_reduce']:>12.2f}{med['broadcast']:>11.2f}"
                  f"{med['all_gather']:>12.2f}{med['reduce_scatter']:>16.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
