"""Per-rank optimizer step cost: ZeRO-1 DistributedMuonClip vs one process vs naive Muon vs ZeRO-1 AdamW (a script).

    torchrun --nproc_per_node=2 benchmarks/dist_optimizer.py                 # default models.ModelConfig()
    torchrun --nproc_per_node=2 benchmarks/dist_optimizer.py --dim 1024 --iters 3 --schemes local_muonclip,zero1_muonclip
    torchrun --nproc_per_node=2 benchmarks/dist_optimizer.py --backward      # + rows with a real backward

Pure data parallelism (every parameter "replicated"; expert stacks are owned whole, batched Newton–Schulz).
Gradients are deterministic random tensors written into the parameters' gradients (no forward/backward), so
only the optimizer is timed:

- zero1_muonclip: ``reduce_gradients()`` (one reduce per bucket to its owner; all-reduce for buckets >= 4 MiB
  on gloo) + ``step()`` (Muon/AdamW on owned params, each matrix orthogonalised once in the world, each
  bucket's broadcast overlapping the next buckets' updates). zero1_muonclip_reduce: reduce forced everywhere.
- local_muonclip: ``MuonClip.step()`` on each rank's own gradients, no communication: what one process does
  (dp=1); ``speedup`` = its step time over zero1_muonclip's, the same machine load on both.
- naive_muonclip: one flat all-reduce of the gradients, then ``MuonClip.step()`` on every rank (every rank
  orthogonalises every matrix, full optimizer state everywhere) - what DDP + MuonClip does.
- zero1_adamw: element-sharded ZeRO-1 AdamW baseline: flat reduce-scatter, AdamW on the local 1/dp slice,
  flat all-gather (the communication pattern of DeepSpeed / Megatron distributed optimizers).
- with ``--backward``: zero1_bwd_overlap / zero1_bwd_after time backward + reduce + step of a real micro batch
  (``--micro-batch`` x ``--seq-len``), gradient buckets reduced from backward's hooks vs after backward.

Bytes are what each rank sends per step under ring algorithms (reduce / broadcast / reduce-scatter / all-gather
(G-1)/G of the buffer, all-reduce 2(G-1)/G). Times are medians over ``--iters`` steps after one warm-up, per
rank, then over ``--repeats`` rounds in which the schemes take turns. ``max RSS`` is the process's peak so far
(meaningful per scheme when one scheme runs: ``--schemes``).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script / torchrun
import muonclip.optimizer as mc_optimizer  # noqa: E402
from launch.build import token_loss  # noqa: E402
from models import ModelConfig, Transformer  # noqa: E402
from muonclip import MuonClip, adamw_step_, build_param_groups  # noqa: E402
from muonclip.distributed import DistributedMuonClip, OptimizerGroups  # noqa: E402


def fake_grads(params: list[tuple[str, torch.Tensor]], rank: int, it: int) -> None:
    """Seeded gradients, written into ``p.grad`` in place where it exists (as backward accumulates)."""
    for i, (_, p) in enumerate(params):
        g = torch.Generator().manual_seed(1_000_003 * rank + 1009 * it + i)
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)


class NSTimer:
    """Wraps ``muonclip.optimizer.orthogonalize`` (what MuonClip calls) to time Newton–Schulz."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._orig = mc_optimizer.orthogonalize
        mc_optimizer.orthogonalize = self

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self._orig(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def bench_zero1_muonclip(model, rank, world, iters, lr, all_reduce_min_bytes=None):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = DistributedMuonClip(build_param_groups(model.named_parameters()), {}, OptimizerGroups(), lr=lr,
                              all_reduce_min_bytes=all_reduce_min_bytes)
    times, ns = [], []
    for it in range(iters + 1):
        with opt.grads_added_by_hand([p for _, p in named]):  # set by hand, they count as gradients (in place: not)
            fake_grads(named, rank, it)
        opt.comm.bytes_sent.clear()  # so comm_bytes is one step's
        t0 = time.perf_counter()
        opt.reduce_gradients()
        opt.step()
        times.append(time.perf_counter() - t0)
        ns.append(opt.last_step_stats["ns_seconds"])
        opt.zero_grad()
    return dict(step_s=statistics.median(times[1:]), ns_s=statistics.median(ns[1:]),
                bytes=sum(opt.comm_bytes.values()), state=opt.state_bytes(),
                ns_matrices=opt.last_step_stats["ns_matrices"])


def bench_zero1_backward(model, rank, world, iters, lr, overlap, batch):
    """backward + reduce + step of a real micro batch (forward untimed), reductions from hooks or after."""
    opt = DistributedMuonClip(build_param_groups(model.named_parameters()), {}, OptimizerGroups(), lr=lr,
                              overlap_reduce=overlap)
    g = torch.Generator().manual_seed(7 + rank)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch[0], batch[1] + 1), generator=g)
    times, started = [], 0
    for it in range(iters + 1):
        logits = model(tokens[:, :-1])
        loss = token_loss(logits, tokens[:, 1:])
        t0 = time.perf_counter()
        loss.backward()
        opt.reduce_gradients()
        opt.step()
        times.append(time.perf_counter() - t0)
        started = opt.last_step_stats["reduced_in_backward"]
        opt.zero_grad()
    return dict(step_s=statistics.median(times[1:]), ns_s=0.0, bytes=sum(opt.comm_bytes.values()) // (iters + 1),
                state=opt.state_bytes(), ns_matrices=f"{started}/{len(opt.buckets)}b")


def bench_muonclip(model, rank, world, iters, lr, sync):
    """``MuonClip.step()`` on every rank: ``sync`` = after one flat all-reduce of the gradients (DDP + MuonClip,
    "naive"), else on this rank's own gradients with no communication (one process, "local")."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = MuonClip(build_param_groups(model.named_parameters()), lr=lr)
    timer = NSTimer()
    numel = sum(p.numel() for _, p in named)
    times, ns = [], []
    for it in range(iters + 1):
        fake_grads(named, rank, it)
        timer.seconds = 0.0
        t0 = time.perf_counter()
        if sync:
            flat = torch.cat([p.grad.reshape(-1) for _, p in named])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for _, p in named:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        opt.step()
        times.append(time.perf_counter() - t0)
        ns.append(timer.seconds)
        opt.zero_grad()
    mc_optimizer.orthogonalize = timer._orig
    matrices = sum(p.numel() // (p.shape[-1] * p.shape[-2]) for g in opt.param_groups if g["use_muon"]
                   for p in g["params"] if p.requires_grad)
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
    return dict(step_s=statistics.median(times[1:]), ns_s=statistics.median(ns[1:]),
                bytes=2 * (world - 1) * numel * 4 // world if sync else 0, state=state, ns_matrices=matrices)


def bench_zero1_adamw(model, rank, world, iters, lr):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    numel = sum(p.numel() for _, p in named)
    shard = -(-numel // world)
    lo = rank * shard
    flat_params = torch.zeros(shard * world)
    flat_params[:numel] = torch.cat([p.detach().reshape(-1) for _, p in named])
    param_shard = flat_params[lo:lo + shard].clone()
    exp_avg, exp_avg_sq = torch.zeros(shard), torch.zeros(shard)
    times = []
    for it in range(iters + 1):
        fake_grads(named, rank, it)
        t0 = time.perf_counter()
        flat = torch.zeros(shard * world)
        flat[:numel] = torch.cat([p.grad.reshape(-1) for _, p in named])
        grad_shard = torch.empty(shard)
        dist.reduce_scatter_single(grad_shard, flat)
        grad_shard.div_(world)
        adamw_step_(param_shard, grad_shard, exp_avg, exp_avg_sq, it + 1, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                    weight_decay=0.1)
        dist.all_gather_single(flat_params, param_shard)
        offset = 0
        with torch.no_grad():
            for _, p in named:
                p.copy_(flat_params[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        times.append(time.perf_counter() - t0)
    return dict(step_s=statistics.median(times[1:]), ns_s=0.0, bytes=2 * (world - 1) * shard * 4,
                state=2 * shard * 4, ns_matrices=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=ModelConfig.dim)
    ap.add_argument("--n-layers", type=int, default=ModelConfig.n_layers)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of all schemes in turn (medians over rounds)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--schemes", default="", help="comma-separated subset of the schemes (default: all)")
    ap.add_argument("--backward", action="store_true", help="add the real-backward rows")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers)
    batch = (args.micro_batch, args.seq_len)
    schemes = [("zero1_muonclip", bench_zero1_muonclip),  # its default: all-reduce for large buckets on gloo
               ("zero1_muonclip_reduce", lambda *a: bench_zero1_muonclip(*a, all_reduce_min_bytes=2**62)),
               ("local_muonclip", lambda *a: bench_muonclip(*a, sync=False)),
               ("naive_muonclip", lambda *a: bench_muonclip(*a, sync=True)),
               ("zero1_adamw", bench_zero1_adamw)]
    if args.backward:
        schemes += [("zero1_bwd_overlap", lambda *a: bench_zero1_backward(*a, overlap=True, batch=batch)),
                    ("zero1_bwd_after", lambda *a: bench_zero1_backward(*a, overlap=False, batch=batch))]
    if args.schemes:
        wanted = args.schemes.split(",")
        unknown = sorted(set(wanted) - {n for n, _ in schemes})
        if unknown:
            raise SystemExit(f"dist_optimizer.py: unknown --schemes {unknown}; known: {[n for n, _ in schemes]}")
        schemes = [(n, fn) for n, fn in schemes if n in wanted]
    results: dict[str, list[dict]] = {name: [] for name, _ in schemes}
    for _ in range(args.repeats):  # the schemes take turns, so load changes hit them alike
        for name, fn in schemes:
            torch.manual_seed(0)
            model = Transformer(cfg)
            dist.barrier()
            results[name].append(fn(model, rank, world, args.iters, args.lr))
    rows = []
    for name, _ in schemes:
        runs = results[name]
        res = dict(runs[0], step_s=statistics.median(r["step_s"] for r in runs),
                   ns_s=statistics.median(r["ns_s"] for r in runs),
                   rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        rows.append((name, gathered))
    if rank == 0:
        n_params = sum(p.numel() for p in Transformer(cfg).parameters())
        print(f"# world={world} (gloo, CPU, {args.threads} thread/rank) model dim={cfg.dim} layers={cfg.n_layers} "
              f"experts={cfg.n_routed_experts} params={n_params / 1e6:.2f}M fp32, iters={args.iters}, "
              f"{args.repeats} interleaved rounds" + (f", backward rows: micro batch {batch[0]}x{batch[1]}"
                                                      if args.backward else ""))
        print(f"{'scheme':<22}{'rank':>5}{'step ms':>10}{'NS ms':>9}{'NS mats':>9}{'sent MB':>9}{'state MB':>10}"
              f"{'max RSS MB':>12}")
        for name, gathered in rows:
            for r, res in enumerate(gathered):
                print(f"{name:<22}{r:>5}{res['step_s'] * 1e3:>10.1f}{res['ns_s'] * 1e3:>9.1f}{res['ns_matrices']:>9}"
                      f"{res['bytes'] / 2**20:>9.2f}{res['state'] / 2**20:>10.2f}{res['rss'] / 2**20:>12.0f}")
        by_name = dict(rows)
        if "local_muonclip" in by_name and "zero1_muonclip" in by_name:
            local = max(r["step_s"] for r in by_name["local_muonclip"])
            zero1 = max(r["step_s"] for r in by_name["zero1_muonclip"])  # the slowest rank sets the step
            print(f"speedup dp={world} (ZeRO-1) over one process (local_muonclip), slowest ranks: "
                  f"{local / zero1:.2f}x")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    main()
