"""ZeRO-1 MuonClip (DistributedMuonClip) vs DeepSpeed 0.19.8's ZeRO-1 Muon, same model and batches (a script).

    bash benchmarks/deepspeed_muon.sh            # makes a throwaway venv with deepspeed, then runs this file
    torchrun --nproc_per_node=2 benchmarks/deepspeed_muon.py --dim 256 --n-layers 4   # where deepspeed is installed

Each rank builds the same model twice from one seed: one copy trained by our DistributedMuonClip (gradient
buckets reduced from backward, each matrix orthogonalised once), one by ``deepspeed.initialize`` with the
built-in Muon (``optimizer.type: Muon``; a client Muon does not work under DeepSpeed's ZeRO-1, which hands it
flat partitions) under ``zero_optimization.stage: 1``. Every parameter is tagged ``use_muon`` from
``muonclip.build_param_groups``, so both run Muon on the same matrices and AdamW on the rest. Both take the
same micro batch (a different one per rank, repeated every step so the loss can fall: the first and last loss
are printed) and take turns, step by step, so machine load hits them alike. Gradient clipping is off in both
(DeepSpeed's default clips after orthogonalising).

Timed per step (medians over ``--iters`` after ``--warmup``): forward, backward, and the optimizer step
(ours: ``reduce_gradients()`` + ``step()`` + ``zero_grad()``; DeepSpeed: ``engine.step()``). The gradient
reduction runs partly inside backward in both (bucket hooks), so "bwd+opt" is the figure to compare; "opt"
is reported too. Newton–Schulz runs in the dtype DeepSpeed picks for its "standard" method on this device
(bfloat16 where supported), ours set to the same. The update rules differ in their scale (ours
0.2*sqrt(max(A,B)), DeepSpeed sqrt(max(1, A/B))), not in their cost.

Exits 0 with a note when deepspeed is not importable.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # DeepSpeed's Newton–Schulz is torch.compile'd otherwise

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script / torchrun
from launch.build import token_loss  # noqa: E402
from models import ModelConfig, Transformer  # noqa: E402
from muonclip import build_param_groups  # noqa: E402
from muonclip.distributed import DistributedMuonClip, OptimizerGroups  # noqa: E402


def batches(cfg: ModelConfig, rank: int, n: int, micro_batch: int, seq_len: int, fresh: bool) -> list[torch.Tensor]:
    """One random micro batch per rank, taken ``n`` times (random tokens are unpredictable across batches, so
    only a repeated batch shows that both optimizers train: their losses fall), or ``fresh`` ones per step."""
    g = torch.Generator().manual_seed(1234 + rank)
    draw = lambda: torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=g)  # noqa: E731
    return [draw() for _ in range(n)] if fresh else [draw()] * n


def tag_use_muon(model: torch.nn.Module) -> None:
    for group in build_param_groups(model.named_parameters()):
        for p in group["params"]:
            p.use_muon = bool(group["use_muon"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh-batches", action="store_true", help="a new random batch every step (loss cannot fall)")
    args = ap.parse_args()
    try:
        import deepspeed
        import deepspeed.ops
        from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype
    except ImportError as e:
        print(f"deepspeed_muon.py: deepspeed is not installed ({e}); run benchmarks/deepspeed_muon.sh")
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no op build on first use
    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers)
    ns_dtype = ns_compute_dtype("standard")

    torch.manual_seed(0)
    ours = Transformer(cfg)
    torch.manual_seed(0)
    theirs = Transformer(cfg)
    tag_use_muon(theirs)
    opt = DistributedMuonClip(build_param_groups(ours.named_parameters()), {}, OptimizerGroups(), lr=args.lr,
                              ns_dtype=ns_dtype)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "Muon", "params": {"lr": args.lr, "momentum": 0.95, "weight_decay": 0.1,
                                                  "ns_method": "standard", "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=theirs, model_parameters=[p for p in theirs.parameters()
                                                                      if p.requires_grad], config=ds_config)
    data = batches(cfg, rank, args.warmup + args.iters, args.micro_batch, args.seq_len, args.fresh_batches)
    times: dict[str, dict[str, list[float]]] = {k: {"fwd": [], "bwd": [], "opt": []} for k in ("ours", "deepspeed")}

    def run(name: str, tokens: torch.Tensor, keep: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        loss = token_loss((ours if name == "ours" else engine)(tokens[:, :-1]), tokens[:, 1:])
        t1 = time.perf_counter()
        if name == "ours":
            loss.backward()
        else:
            engine.backward(loss)
        t2 = time.perf_counter()
        if name == "ours":
            opt.reduce_gradients()
            opt.step()
            opt.zero_grad()
        else:
            engine.step()
        t3 = time.perf_counter()
        if keep:
            for key, dt in zip(("fwd", "bwd", "opt"), (t1 - t0, t2 - t1, t3 - t2)):
                times[name][key].append(dt)
        return loss.item()

    losses: dict[str, list[float]] = {"ours": [], "deepspeed": []}
    for i, tokens in enumerate(data):
        for name in (("ours", "deepspeed") if i % 2 == 0 else ("deepspeed", "ours")):  # alternate who goes first
            losses[name].append(run(name, tokens, keep=i >= args.warmup))
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    for name in med:  # both really train: first and last step's loss on this rank
        med[name]["loss"] = (losses[name][0], losses[name][-1])
    gathered = [None] * world
    dist.all_gather_object(gathered, med)
    if rank == 0:
        n_params = sum(p.numel() for p in ours.parameters())
        print(f"# world={world} (gloo, CPU, {args.threads} thread/rank) deepspeed {deepspeed.__version__}, model "
              f"dim={cfg.dim} layers={cfg.n_layers} experts={cfg.n_routed_experts} params={n_params / 1e6:.2f}M, "
              f"micro batch {args.micro_batch}x{args.seq_len}, NS {ns_dtype}, {args.iters} steps after "
              f"{args.warmup}, alternating, {'fresh batches' if args.fresh_batches else 'one repeated batch'}")
        print(f"{'setup':<11}{'rank':>5}{'fwd ms':>9}{'bwd ms':>9}{'opt ms':>9}{'bwd+opt':>9}{'loss first->last':>19}")
        for name in ("ours", "deepspeed"):
            for r, m in enumerate(gathered):
                t = m[name]
                print(f"{name:<11}{r:>5}{t['fwd'] * 1e3:>9.1f}{t['bwd'] * 1e3:>9.1f}{t['opt'] * 1e3:>9.1f}"
                      f"{(t['bwd'] + t['opt']) * 1e3:>9.1f}{t['loss'][0]:>10.3f} ->{t['loss'][1]:>6.3f}")
        for r, m in enumerate(gathered):
            o, d = m["ours"], m["deepspeed"]
            print(f"rank {r}: ours/deepspeed opt {o['opt'] / d['opt']:.2f}x, bwd+opt "
                  f"{(o['bwd'] + o['opt']) / (d['bwd'] + d['opt']):.2f}x")
    dist.barrier()
    os._exit(0)  # gloo aborts in DeepSpeed's exit handlers otherwise (FACTS.md)


if __name__ == "__main__":
    main()
