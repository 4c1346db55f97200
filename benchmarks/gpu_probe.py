"""Small GPU measurements for benchmarks/gpu_check.sh (each a subcommand; none is needed on CPU machines).

    torchrun --nproc_per_node=1 -m benchmarks.gpu_probe nccl      # NCCL init + all-reduce
    python -m benchmarks.gpu_probe mfu --config C --metrics M     # tokens/s and MFU of a training run
    python -m benchmarks.gpu_probe max_logits                     # flex attention max scores vs our probe
    python -m benchmarks.gpu_probe bf16                           # bf16 step: CUDA syncs, GEMM dtypes, offload
    python -m benchmarks.gpu_probe memory                         # recompute / FP8 / activation offload on CUDA
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch



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


def mfu(config: str, metrics: str) -> None:
    """Tokens/s, model TFLOP/s and MFU of a training run's metrics, with the trainer's FLOP model."""
    from configs import load_config
    from launch.mfu import peak_tflops, throughput_metrics
    from models.flops import flops_per_token, matmul_params_per_token

    cfg = load_config(config)
    records = [json.loads(line) for line in open(metrics) if '"tokens_per_s"' in line]
    rates = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]
    tps = statistics.median(rates)
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    got = throughput_metrics(tps, per_token, 1, peak_tflops(cfg.train.peak_tflops, device))
    print(f"mfu: {name}; {matmul_params_per_token(cfg.model) / 1e9:.3f}B matmul weights per token; median "
          f"{tps:,.0f} tokens/s over {len(rates)} logged intervals; {per_token / 1e9:.2f} GFLOP/token -> "
          f"{got['tflops_per_device']:.1f} TFLOP/s" + (f", MFU {got['mfu']:.1%}" if "mfu" in got else ""))


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
            fn()
        torch.cuda.synchronize()
        times[fn.__name__] = (time.perf_counter() - t0) / 10 * 1e3
    ref, got = sdpa_and_probe(), with_flex()
    rel = ((got - ref).abs() / ref.abs()).max().item()
    print(f"max_logits: B{B} H{H} T{T} d{d} bf16: flex max_scores vs float32 probe max rel. diff {rel:.2e}; "
          f"flex attention + max scores {times['with_flex']:.2f} ms, SDPA + chunked probe {times['sdpa_and_probe']:.2f} ms")


def bf16(device: str = "cuda") -> None:
    """A bf16-parameter training step of a small MoE on the GPU, as the CPU tests prove it by measurement:
    (1) ``torch.cuda.set_sync_debug_mode("error")`` over a whole step (forward, backward, optimizer, QK-Clip,
    router bias): no op may synchronise with the host; (2) the dtype audit (tests/audit.py): share of matmul FLOPs
    in bf16 and the float32 regions; (3) optim.offload_state (pinned host memory, copies on a side stream): the
    same losses as without, and the state resident on the host; (4) peak device memory of each. ``device="cpu"``
    runs (2)-(3) only (a dry run of this probe)."""
    from configs import load_config
    from launch.trainer import Trainer, init_runtime
    from tests.audit import OpAudit

    cuda = device == "cuda"
    common = [f"--train.device={device}", "--train.dtype=bfloat16", "--train.param_dtype=bfloat16", "--train.steps=8",
              "--train.eval_interval=0", "--train.ckpt_interval=0", "--schedule.warmup_steps=1", "--data.grad_accum=2",
              "--data.micro_batch_size=4", "--train.resume=none", "--logging.wandb_mode=disabled",
              "--logging.progress_bar=false", "--model.dim=512", "--model.n_layers=4", "--model.n_routed_experts=16",
              "--model.moe_inter_dim=512", "--data.seq_len=256", "--model.max_seq_len=256"]
    losses = {}
    for offload in (False, True):
        cfg = load_config("configs/tiny.yaml", [*common, f"--optim.offload_state={offload}",
                                                f"--train.output_dir=outputs/gpu_bf16_{offload}"])
        torch.manual_seed(0)
        trainer = Trainer(cfg, init_runtime(cfg))
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.set_sync_debug_mode("error")
            try:
                trainer.train_step()
                print(f"bf16 offload={offload}: a whole training step ran under sync_debug_mode('error'): no sync")
            except RuntimeError as e:
                print(f"bf16 offload={offload}: HOST SYNC in a training step: {str(e).splitlines()[0]}")
            finally:
                torch.cuda.set_sync_debug_mode(0)
        with OpAudit() as audit:  # both runs take the same steps
            trainer.train_step()
        if not offload:
            model = [r for r in audit.records if r.region != "optimizer"]
            bf = sum(r.flops for r in model if set(r.dtypes) == {torch.bfloat16})
            regions = sorted({r.region.rsplit(".", 1)[-1] for r in model if set(r.dtypes) != {torch.bfloat16}})
            print(f"bf16 audit: {bf / sum(r.flops for r in model):.1%} of matmul FLOPs in bf16; float32 in {regions}")
        result = trainer.fit()
        losses[offload] = [result.losses[s] for s in sorted(result.losses)]
        opt = trainer.optimizer
        print(f"bf16 offload={offload}: losses {[round(x, 4) for x in losses[offload]]}; optimizer state on device "
              f"{opt.state_bytes('device') / 2**20:.1f} MiB, host {opt.state_bytes('host') / 2**20:.1f} MiB"
              + (f"; peak device memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""))
    diff = max(abs(a - b) for a, b in zip(losses[False], losses[True]))
    print(f"bf16 offload vs not: max loss difference {diff:.2e} (0 unless CUDA kernels are nondeterministic)")


def memory(device: str = "cuda") -> None:
    """The memory techniques on the GPU (bf16 parameters, a small MoE at micro batch 8 x 1024): per setting the peak
    device memory of a step against the planner's peak (parallel/plan.py, checked against tensor bytes on a CPU),
    the step time (median of 5) and the losses of 4 steps; activation offload (pinned host buffers, a side stream,
    prefetch) must give the losses of the same setting without it and a lower peak,
    and a step with it runs under ``sync_debug_mode("error")``. ``device="cpu"``: a dry run."""
    from configs import load_config
    from launch.trainer import Trainer, init_runtime
    from parallel.plan import plan_layout

    cuda = device == "cuda"
    common = [f"--train.device={device}", "--train.dtype=bfloat16", "--train.param_dtype=bfloat16",
              "--train.eval_interval=0", "--train.ckpt_interval=0", "--schedule.warmup_steps=1", "--train.resume=none",
              "--logging.wandb_mode=disabled", "--logging.progress_bar=false", "--model.dim=512", "--model.n_layers=4",
              "--model.n_routed_experts=16", "--model.moe_inter_dim=512", "--data.micro_batch_size=8",
              "--data.seq_len=1024" if cuda else "--data.seq_len=256", "--model.max_seq_len=1024",
              "--model.loss_chunk_tokens=-1"]
    fp8 = "--parallel.fp8_activations=[moe_up_input, swiglu_input]"
    settings = {"none": [], "selective": ["--parallel.recompute=selective"],
                "selective+fp8": ["--parallel.recompute=selective", fp8],
                "selective+fp8+offload": ["--parallel.recompute=selective", fp8, "--parallel.activation_offload=true"],
                "full": ["--parallel.recompute=full"]}
    losses = {}
    for name, overrides in settings.items():
        cfg = load_config("configs/tiny.yaml", [*common, *overrides, f"--train.output_dir=outputs/gpu_memory_{name}"])
        torch.manual_seed(0)
        trainer = Trainer(cfg, init_runtime(cfg))
        losses[name] = [float(trainer.train_step().loss_t) for _ in range(4)]
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(5):
            t0 = time.perf_counter()
            trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        planned = plan_layout(cfg, 1)[0].peak / 2**30
        sync = ""
        if cuda and "offload" in name:
            torch.cuda.set_sync_debug_mode("error")
            try:
                trainer.train_step()
                sync = "; a step ran under sync_debug_mode('error')"
            except RuntimeError as e:
                sync = f"; HOST SYNC: {str(e).splitlines()[0]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        print(f"memory {name}: peak {peak:.2f} GiB (planned {planned:.2f}, {100 * (planned / peak - 1):+.0f}%), "
              f"step {statistics.median(times) * 1e3:.0f} ms, "
              f"losses {[round(x, 4) for x in losses[name]]}{sync}")
        del trainer
        if cuda:
            torch.cuda.empty_cache()
    diff = max(abs(a - b) for a, b in zip(losses["selective+fp8"], losses["selective+fp8+offload"]))
    print(f"memory: offload vs not, max loss difference {diff:.2e} (0 unless CUDA kernels are nondeterministic)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["nccl", "mfu", "max_logits", "bf16", "memory"])
    p.add_argument("--config")
    p.add_argument("--metrics")
    p.add_argument("--device", default="cuda", help="bf16, memory: cpu for a dry run")
    a = p.parse_args()
    if a.what == "nccl":
        nccl()
    elif a.what == "mfu":
        mfu(a.config, a.metrics)
    elif a.what == "bf16":
        bf16(a.device)
    elif a.what == "memory":
        memory(a.device)
    else:
        max_logits()


if __name__ == "__main__":
    main()
