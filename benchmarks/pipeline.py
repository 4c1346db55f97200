"""Pipeline parallelism at pp=2 on CPU: step time and measured bubble per schedule, against the textbook bubble.

    python benchmarks/pipeline.py                  # 2 gloo processes, 1 thread each, tiny-ish MoE, m=8
    python benchmarks/pipeline.py --micro 4 --repeats 5

Setups, interleaved in every round (median over ``--repeats`` rounds):

- ``1 process``: rank 0 runs the whole model's forward + backward over the ``m`` micro batches (rank 1 waits);
- ``1f1b``, ``interleaved_1f1b``, ``zbv``, ``dualpipev``: both ranks run one ``schedule.step`` on the same batch.

Measured bubble = 1 - (1-process time / pp) / step time: the fraction of the pipeline step the ideal even split
of the same work would not need (idle time, imbalance and send/recv together). Textbook: (p-1)/(m+p-1) for
1F1B (GPipe-like fill and drain), (p-1)/(v m + p - 1) with v stages per rank for the interleaved schedule.
The communication PP adds per step is exact: every micro batch crosses each stage boundary that lies between
two ranks once forward (activations) and once backward (their gradients), B x T x D float32 each way.
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
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import ModelConfig, Transformer  # noqa: E402
from parallel.init import init_sharded  # noqa: E402
from parallel.pipeline_parallel import pipeline_schedule, plan_stages, prune_to_stage  # noqa: E402

SCHEDULES = [("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2), ("dualpipev", 2)]
MODEL = dict(vocab_size=8192, dim=256, n_layers=8, first_k_dense=1, attn_type="mla", n_heads=4, kv_lora_rank=64,
             qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_seq_len=128, inter_dim=768,
             moe_inter_dim=192, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1)


def loss_fn(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build(cfg, rank, schedule, virtual, micro, batch, seq):
    with torch.device("meta"):
        model = Transformer(cfg)
    rules, shapes = model.init_rules(), {n: tuple(p.shape) for n, p in model.named_parameters()}
    plan = plan_stages(cfg, rank, 2, virtual, schedule)
    holder = prune_to_stage(model, plan.layers, first=plan.has_first, last=plan.has_last)
    init_sharded(holder, rules, shapes, {}, 0, 0, torch.device("cpu"))
    return pipeline_schedule(holder, plan, dist.group.WORLD, torch.device("cpu"), micro, loss_fn, schedule,
                             micro_batch=(batch, seq))


def worker(rank, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = ModelConfig(**MODEL)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, cfg.vocab_size, (args.micro * args.batch, args.seq), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (args.micro * args.batch, args.seq), generator=g)
    pipes = {name: build(cfg, rank, name, v, args.micro, args.batch, args.seq) for name, v in SCHEDULES}
    full = None
    if rank == 0:
        full = Transformer(cfg)
        full.init_weights(0)
    times: dict[str, list[float]] = {name: [] for name in ["1 process", *pipes]}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            for x, y in zip(inputs.chunk(args.micro), targets.chunk(args.micro)):
                (loss_fn(full(x), y) / args.micro).backward()
        dist.barrier()
        if round_:
            times["1 process"].append(time.perf_counter() - t0)
        for name, pipe in pipes.items():
            dist.barrier()
            t0 = time.perf_counter()
            pipe.schedule.step(*([inputs] if pipe.has_first else []), target=targets if pipe.has_last else None)
            dist.barrier()
            if round_:
                times[name].append(time.perf_counter() - t0)
            for m in pipe.modules:
                m.zero_grad(set_to_none=True)
    if rank == 0:
        stage_ranges = {name: (pipe.owners, pipe.n_stages) for name, pipe in pipes.items()}
        queue.put(({k: statistics.median(v) for k, v in times.items()}, stage_ranges))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro", type=int, default=8, help="micro batches per step m (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="micro batch size (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    args = p.parse_args()
    from tests.dist_utils import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, args, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    medians, owners = queue.get()
    for proc in procs:
        proc.join()
    pp, m = 2, args.micro
    ideal = medians["1 process"] / pp
    act_bytes = args.batch * args.seq * MODEL["dim"] * 4
    print(f"pp={pp}, m={m} micro batches of {args.batch} x {args.seq}, model dim {MODEL['dim']}, "
          f"{MODEL['n_layers']} layers; medians of {args.repeats} interleaved rounds, 1 thread per process\n")
    print("| setup | step s | vs 1 process | measured bubble | textbook (p-1)/(vm+p-1) | PP send+recv per step |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| 1 process | {medians['1 process']:.3f} | 1.00x | | | |")
    for name, v in SCHEDULES:
        own, n_stages = owners[name]
        crossings = sum(own[s] != own[s + 1] for s in range(n_stages - 1))
        textbook = (pp - 1) / (v * m + pp - 1)
        bubble = 1 - ideal / medians[name]
        mb = 2 * crossings * m * act_bytes / 2**20
        print(f"| {name} (v={v}) | {medians[name]:.3f} | {medians['1 process'] / medians[name]:.2f}x | "
              f"{bubble:.1%} | {textbook:.1%} | {mb:.1f} MiB |")


if __name__ == "__main__":
    main()
