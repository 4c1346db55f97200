"""Small GPU measurements for benchmarks/gpu_check.sh (each a subcommand; none is needed on CPU machines).

    torchrun --nproc_per_node=1 -m benchmarks.gpu_probe nccl      # NCCL init + all-reduce
    python -m benchmarks.gpu_probe mfu --config C --metrics M     # tokens/s and MFU of a training run
    python -m benchmarks.gpu_probe max_logits                     # flex attention max scores vs our probe
    python -m benchmarks.gpu_probe bf16                           # bf16 step: CUDA syncs, GEMM dtypes, offload;
                                                                  # float32 step: its syncs counted
    python -m benchmarks.gpu_probe memory                         # recompute / FP8 / activation offload on CUDA
    python -m benchmarks.gpu_probe safety                         # issue 26's fixes on the device, PASS/FAIL each
                                                                  # (--device cpu: a dry run, CUDA-only parts SKIP)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

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
    same losses as without, and the state resident on the host; (4) peak device memory of each; (5) the same step
    in float32, its host synchronisations counted (``float32_syncs``). ``device="cpu"`` runs (2)-(3) and a float32
    step only (a dry run of this probe)."""
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
    float32_syncs(common, cuda)


def float32_syncs(common: list[str], cuda: bool) -> None:
    """The bf16 probe's step with float32 parameters and compute, its host synchronisations counted under
    ``torch.cuda.set_sync_debug_mode("warn")`` (one warning each, with the line that made it). The routed experts
    take the loop path there (models/moe.py ``expert_path``: torch's float32 grouped GEMM reads its offsets on the
    host in each of a layer's nine calls), which reads the counts once per MoE layer and micro batch: expected are
    those and nothing else. On CPU a dry run (one step, nothing to count)."""
    from configs import load_config
    from launch.trainer import Trainer, init_runtime
    from models.moe import expert_path

    cfg = load_config("configs/tiny.yaml", [*common, "--train.dtype=float32", "--train.param_dtype=float32",
                                            "--train.output_dir=outputs/gpu_float32"])
    capability = torch.cuda.get_device_capability() if cuda else None
    path = expert_path("cuda" if cuda else "cpu", capability, torch.float32, (cfg.model.dim, cfg.model.moe_inter_dim))
    torch.manual_seed(0)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.train_step()
    if not cuda:
        print(f"float32 (dry run): experts on the {path} path; a step ran")
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    expected = (cfg.model.n_layers - cfg.model.first_k_dense) * cfg.data.grad_accum
    found = sum(where.values())
    print(f"float32: experts on the {path} path (sm{capability[0]}{capability[1]}); {found} host synchronisations "
          f"in a step, expected {expected} (the loop's counts, one per MoE layer and micro batch): "
          f"{'as expected' if found == expected else 'UNEXPECTED'}; where: {dict(where.most_common(6))}")


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


# ------------------------------------------------------------------------------------------------ safety (issue 26)
def safety(device: str = "cuda") -> None:
    """Issue 26's fixes on the device, one line per check (``name: PASS|FAIL|SKIP figures``), exit status 1 if any
    fails: activation offload's streams, offloaded optimizer state through a checkpoint, pinned bytes against the
    arenas, document masks' memory, syncs and recompilations, the max-logit probe's cost and the expert path's
    syncs. ``device="cpu"``: a dry run of what runs on a CPU (memory as tensor bytes, small shapes, no timing
    verdict); the CUDA-only parts are left out or SKIP."""
    arenas: dict = {}  # the host arenas of checks 1 and 2 (muonclip/host_arena.py), kept for check 3
    checks = [("activation_offload", check_activation_offload), ("state_offload_resume", check_state_offload),
              ("pinned_host_bytes", check_pinned_bytes), ("probe_cost", check_probe_cost),
              ("expert_path", check_expert_path), ("loss_accumulation", check_loss_accumulation),
              ("document_masks", check_document_masks)]  # last: its flex part compiles (the longest)
    failed = []
    for name, check in checks:
        try:
            ok, figures = check(device, arenas)
        except Exception as e:  # noqa: BLE001 - a check that crashes fails; the others still run
            traceback.print_exc()
            ok, figures = False, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        print(f"{name}: {'SKIP' if ok is None else 'PASS' if ok else 'FAIL'} {figures}", flush=True)
        if ok is False:
            failed.append(name)
    if failed:
        raise SystemExit(f"safety: {len(failed)} failed: {', '.join(failed)}")


def _build(cls, device: str, dtype: torch.dtype, **kw):
    """``cls`` of tests/test_model.py's TINY config with ``kw``, made on ``device`` (seed 0) in train mode, its
    parameters in ``dtype`` as the precision policy casts them (parallel/precision.py: its float32 exceptions)."""
    from models import ModelConfig
    from parallel.precision import PrecisionPolicy, apply_precision
    from tests.test_model import TINY

    torch.manual_seed(0)
    with torch.device(device):
        module = cls(ModelConfig(**{**TINY, **kw}))
    apply_precision(module, PrecisionPolicy(param_dtype=dtype))
    return module.train()


@contextmanager
def _sync_debug(cuda: bool, mode: str):
    """The block under ``torch.cuda.set_sync_debug_mode(mode)`` (nothing on CPU). Yields a list that holds, once the
    block is done, the synchronisation warnings it raised (``"warn"``; ``"error"`` raises at the first)."""
    found: list = []
    if not cuda:
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found.extend(w for w in caught if "synchroniz" in str(w.message))


def _peak_bytes(fn, cuda: bool):
    """(the most bytes held at once while ``fn`` runs beyond those allocated before, ``fn()``): the CUDA caching
    allocator's peak, on CPU the tensor bytes of tests/audit.py ``LiveBytes``."""
    if not cuda:
        from tests.audit import LiveBytes

        with LiveBytes() as live:
            out = fn()
        return live.peak, out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start, out


def _median_ms(fn, cuda: bool, n: int = 10) -> float:
    """Median of ``n`` timed calls after one warm-up (CUDA events on the device)."""
    fn()
    times = []
    for _ in range(n):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_activation_offload(device: str, arenas: dict):
    """Item 1: a 4-layer bf16 MoE with activation offload (parallel/activation_offload.py: pinned arena, side
    stream, prefetch) against the same model without, forward + backward 5 times on new tokens, each under
    ``sync_debug_mode("error")``: gradients bitwise equal every time (a fetch reusing memory backward still reads
    would show as mismatches). SDPA's math kernel, since flash attention's backward accumulates in a nondeterministic
    order; one repeat of the plain model is the control. Figures: the peaks over the 5 and the most blocks with a
    fetched copy not yet handed back to backward (the planner assumes 2)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models import Transformer
    from parallel.activation_offload import apply_activation_offload

    cuda = device == "cuda"
    B, T = (4, 512) if cuda else (2, 128)
    plain = _build(Transformer, device, torch.bfloat16, attn_type="mha", dim=256, n_heads=4, n_kv_heads=4,
                   head_dim=64, inter_dim=512, moe_inter_dim=128, n_layers=4, vocab_size=1024, max_seq_len=T)
    offloaded = copy.deepcopy(plain)
    offload = apply_activation_offload(offloaded)
    back: list[int] = []  # after each fetch: the blocks with a fetched copy still pending
    fetch = offload._fetch

    def counted_fetch(c) -> None:
        fetch(c)
        back.append(len({x.block_call for x in offload._copies if x.fetched is not None}))

    offload._fetch = counted_fetch

    def grads(model, tokens, mode="error"):
        with sdpa_kernel(SDPBackend.MATH), _sync_debug(cuda, mode):
            model(tokens, tokens.roll(-1, 1)).backward()
        out = [p.grad for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        return out

    def same(a, b) -> int:  # gradients that differ
        return sum(not torch.equal(x, y) for x, y in zip(a, b)) + abs(len(a) - len(b))

    tokens = torch.randint(0, 1024, (B, T), device=device)
    control = same(grads(plain, tokens, "default"), grads(plain, tokens, "default"))  # warm-up, unchecked syncs
    grads(offloaded, tokens, "default")
    peaks, differ = {"plain": 0, "offload": 0}, []
    for _ in range(5):
        tokens = torch.randint(0, 1024, (B, T), device=device)
        peak, ref = _peak_bytes(lambda: grads(plain, tokens), cuda)
        peaks["plain"] = max(peaks["plain"], peak)
        peak, got = _peak_bytes(lambda: grads(offloaded, tokens), cuda)
        peaks["offload"] = max(peaks["offload"], peak)
        differ.append(same(ref, got))
    arenas["activation"] = offload.arena
    ok = control == 0 and not any(differ) and max(back, default=0) <= 2 and offload.host_bytes == 0
    return ok, (f"{'no host sync, ' if cuda else ''}gradients differing per run {differ} of {len(ref)} (control "
                f"{control}); peak {peaks['plain'] / 2**20:.1f} MiB without offload, {peaks['offload'] / 2**20:.1f} "
                f"MiB with ({'allocator' if cuda else 'tensor bytes'}); at most {max(back, default=0)} blocks "
                f"fetched back; host arena {offload.arena.reserved / 2**20:.0f} MiB, {offload.host_bytes} B left")


def check_state_offload(device: str, arenas: dict):
    """Item 2: MuonClip with ``offload_state`` on a bf16 model for 3 steps (float32 masters and moments in the
    pinned arena, parameters on the device); the checkpoint's tensors (launch/checkpoint: masters, parameters,
    optimizer state) saved with DCP in one gloo process, the host states perturbed, loaded: every host state holds
    the saved values and is still the same tensor, in the arena (``is_home``) and pinned."""
    import torch.distributed as dist

    import muonclip
    from launch.checkpoint import load_checkpoint, model_state, optimizer_state, save_checkpoint, step_dir
    from models import Transformer

    model = _build(Transformer, device, torch.bfloat16)
    opt = muonclip.MuonClip(muonclip.build_param_groups(model.named_parameters()), lr=0.02, offload_state=True)
    arenas["state"] = opt.offload.arena
    for _ in range(3):
        tokens = torch.randint(0, 97, (2, 32), device=device)
        model(tokens, tokens.roll(-1, 1)).backward()
        opt.step()
        opt.zero_grad()

    def checkpoint_tensors():
        return {**model_state(model, opt, saving=True), **optimizer_state(opt)}

    tensors = checkpoint_tensors()
    homes = {k: t for k, t in tensors.items() if opt.offload.is_home(t)}
    saved = {k: t.clone() for k, t in homes.items()}
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            save_checkpoint(Path(tmp, "ckpt"), 3, tensors, meta={}, extra={})
            for t in homes.values():
                t.add_(1.0)
            load_checkpoint(step_dir(Path(tmp, "ckpt"), 3), tensors)
        finally:
            dist.destroy_process_group()
    now = checkpoint_tensors()
    restored = sum(torch.equal(t, saved[k]) for k, t in homes.items())
    same = sum(now[k] is t and opt.offload.is_home(t) for k, t in homes.items())
    pinned = sum(t.is_pinned() for t in homes.values()) if device == "cuda" else len(homes)
    on_device = sum(t.device.type != "cpu" for t in tensors.values())  # parameters without a master
    ok = len(homes) > 0 and restored == same == pinned == len(homes)
    return ok, (f"{len(homes)} host states ({sum(t.nbytes for t in homes.values()) / 2**20:.2f} MiB) among the "
                f"checkpoint's {len(tensors)} tensors ({on_device} on the device): {restored} hold the saved values "
                f"after the load, {same} are the same tensor in the arena, "
                + (f"{pinned} pinned" if device == "cuda" else "pinning not checked (no CUDA)"))


def check_pinned_bytes(device: str, arenas: dict):
    """Item 5: after checks 1 and 2, CUDA's pinned host allocator holds exactly the two arenas' chunks (powers of
    two, which its rounding leaves as they are): ``host_memory_stats`` bytes and blocks against the arenas', once
    the cached blocks nobody holds are released (DCP's save stages device tensors in pinned memory of its own)."""
    planned, chunks = sum(a.reserved for a in arenas.values()), sum(len(a.layout.chunks) for a in arenas.values())
    figures = "; ".join(f"{name} arena {a.reserved / 2**20:.0f} MiB in {len(a.layout.chunks)} chunks"
                        for name, a in arenas.items())
    if device != "cuda":
        return None, f"(no CUDA) {figures}"
    torch.cuda.synchronize()
    cached = torch.cuda.memory.host_memory_stats().get("allocated_bytes.current", 0)
    torch.accelerator.empty_host_cache()  # the cached blocks no tensor holds
    stats = torch.cuda.memory.host_memory_stats()
    allocated, blocks = stats.get("allocated_bytes.current", 0), stats.get("allocations.current", 0)
    return allocated == planned and blocks == chunks, (
        f"pinned allocator {allocated} B in {blocks} blocks ({cached} B with its cache), active "
        f"{stats.get('active_bytes.current', 0)} B, vs the arenas' {planned} B in {chunks} chunks; {figures}")


def check_document_masks(device: str, arenas: dict):
    """Item 3: (a) one document-masked MLA attention layer (K2's head dims, 1 head; train mode: the max-logit probe
    runs) forward + backward at T = 2k, 4k, 8k, documents of 100 to 836 tokens given by host segments
    (``Documents.build`` as the model does): peak memory per doubling <= 2.2x, and on CUDA no host sync;
    (b) on CUDA, ``attention_impl: flex`` through a compiled model (``apply_compile``), three micro batches of
    other documents forward + backward: dynamo's graph count grows at the first only."""
    from models import Transformer
    from models.attention import build_attention
    from models.document_mask import Documents

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    peaks = []
    for T in (2048, 4096, 8192):
        attn = _build(build_attention, device, dtype, n_heads=1, dim=256, kv_lora_rank=64, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, max_seq_len=T)
        lengths = (100, 412, 700, 836) * (T // 2048)
        segments_BT = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        x = torch.randn(1, T, 256, device=device, dtype=dtype, requires_grad=True)

        def step():
            x.grad = None
            attn.zero_grad()
            with _sync_debug(cuda, "error"):
                attn(x, Documents.build(segments_BT, "sdpa", device)).sum().backward()

        step()  # warm-up (the GEMM library's workspace is no activation)
        peaks.append(_peak_bytes(step, cuda)[0])
    ratios = [b / a for a, b in zip(peaks, peaks[1:])]
    figures = (f"sdpa peaks {[round(p / 2**20, 1) for p in peaks]} MiB at T 2k/4k/8k "
               f"({'allocator' if cuda else 'tensor bytes'}), ratios {[round(r, 2) for r in ratios]}"
               + ("; no host sync" if cuda else "; syncs and flex not checked (no CUDA)"))
    ok = max(ratios) <= 2.2
    if cuda:
        from torch._dynamo.utils import counters

        from parallel.parallelize import apply_compile

        model = _build(Transformer, device, torch.bfloat16, attention_impl="flex", attn_type="mha", dim=256, n_heads=4,
                       n_kv_heads=4, head_dim=64, inter_dim=512, n_layers=2, first_k_dense=2, max_seq_len=1024)
        apply_compile(model)
        graphs = [counters["stats"]["unique_graphs"]]
        for lengths in ((300, 200, 524), (1024,), (1, 600, 23, 400)):
            segments_BT = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                                       for row in (lengths, (512, 512))])
            tokens = torch.randint(0, 97, (2, 1024), device=device)
            model(tokens, tokens.roll(-1, 1), segments_BT).backward()
            graphs.append(counters["stats"]["unique_graphs"])
        ok = ok and graphs[1] > graphs[0] and graphs[3] == graphs[1]
        figures += f"; flex compiled model: dynamo graphs {graphs} (before, after each micro batch)"
    return ok, figures


def check_probe_cost(device: str, arenas: dict):
    """Item 6: ``causal_max_logits`` on a K2 layer's q, k (B 1, H 64, T 4096, d_qk 192, d_v 128, bf16; on CPU
    H 4, T 1024) against the attention core's forward + backward on the same q, k, v (``_sdpa``, as the model runs
    it: flash on CUDA), medians of 10: the probe must cost < 25% of it (judged on CUDA only); and its result on the
    first 1024 positions equals a float64 brute-force max over the causal pairs within 1e-2 relative."""
    from models.attention import _sdpa
    from models.layers import causal_max_logits

    cuda = device == "cuda"
    B, H, T, d, e = (1, 64, 4096, 192, 128) if cuda else (1, 4, 1024, 192, 128)
    torch.manual_seed(0)
    q, k = (torch.randn(B, H, T, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, T, e, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(B, H, T, e, device=device, dtype=torch.bfloat16)
    scale = d ** -0.5
    attention_ms = _median_ms(lambda: torch.autograd.grad(_sdpa(q, k, v, scale), (q, k, v), grad), cuda)
    probe_ms = _median_ms(lambda: causal_max_logits(q.detach(), k.detach(), scale), cuda)
    n = 1024
    qs, ks = q.detach()[:, :, :n], k.detach()[:, :, :n]
    s = (qs.double() @ ks.double().transpose(-1, -2)) * scale
    ref = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), float("-inf")).amax(dim=(0, 2, 3))
    rel = ((causal_max_logits(qs, ks, scale).double() - ref).abs() / ref.abs()).max().item()
    ratio = probe_ms / attention_ms
    return rel < 1e-2 and (ratio < 0.25 or not cuda), (
        f"B{B} H{H} T{T} d{d}/{e} bf16: probe {probe_ms:.2f} ms, attention forward+backward {attention_ms:.2f} ms, "
        f"ratio {ratio:.1%}{'' if cuda else ' (not judged on CPU)'}; max rel. diff vs float64 at T{n} {rel:.1e}")


def check_expert_path(device: str, arenas: dict):
    """Item 7: the expert path ``expert_path`` chooses for bf16 and float32 on this device, and the host syncs of one
    MoE forward + backward in each counted under ``sync_debug_mode("warn")``: the loop reads the counts once per
    forward, the grouped path never."""
    from models import MoE
    from models.moe import expert_path

    cuda = device == "cuda"
    capability = torch.cuda.get_device_capability() if cuda else None
    dims = (256, 512)  # dim, moe_inter_dim
    ok, figures = True, []
    for dtype in (torch.bfloat16, torch.float32):
        path = expert_path(device, capability, dtype, dims)
        moe = _build(MoE, device, dtype, dim=dims[0], moe_inter_dim=dims[1], n_routed_experts=16)
        x = torch.randn(4, 256, dims[0], device=device, dtype=dtype, requires_grad=True)
        moe(x).float().sum().backward()  # warm-up
        with _sync_debug(cuda, "warn") as syncs:
            moe(x).float().sum().backward()
        where = Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in syncs)
        expected = 1 if path == "loop" else 0
        ok = ok and (len(syncs) == expected or not cuda)
        figures.append(f"{str(dtype)[6:]} {path}: " + (f"{len(syncs)} syncs (expected {expected}) {dict(where)}"
                                                        if cuda else "syncs not counted"))
    if not cuda:
        figures.append("on sm90: " + "/".join(expert_path("cuda", (9, 0), dt, dims)
                                              for dt in (torch.bfloat16, torch.float32)))
    return ok if cuda else None, (f"sm{capability[0]}{capability[1]}: " if cuda else "cpu: ") + "; ".join(figures)


def check_loss_accumulation(device: str, arenas: dict):
    """Item 7: the chunked loss's weight-gradient GEMM accumulating into the float32 sum (models/loss.py
    ``_add_product_``: on CUDA ``addmm`` with ``out_dtype=float32`` into the sum itself) equals a float64 sum of
    the same bf16 products to float32 rounding, and writes into the sum (no temporary)."""
    from models.loss import _add_product_

    g = torch.Generator(device=device).manual_seed(0)
    V, D, N = 4096, 512, 256
    acc = torch.randn(V, D, device=device, generator=g)
    a, b = (torch.randn(n, m, device=device, generator=g).bfloat16() for n, m in ((V, N), (N, D)))
    ref = acc.double() + a.double() @ b.double()
    ptr = acc.data_ptr()
    out = _add_product_(acc, a, b)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    ok = out.data_ptr() == ptr and out.dtype == torch.float32 and err < N * torch.finfo(torch.float32).eps
    eps = torch.finfo(torch.float32).eps
    return ok, f"relative error {err:.1e} (float32 eps {eps:.1e}), in place {out.data_ptr() == ptr}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["nccl", "mfu", "max_logits", "bf16", "memory", "safety"])
    p.add_argument("--config")
    p.add_argument("--metrics")
    p.add_argument("--device", default="cuda", help="bf16, memory, safety: cpu for a dry run")
    a = p.parse_args()
    if a.what == "nccl":
        nccl()
    elif a.what == "mfu":
        mfu(a.config, a.metrics)
    elif a.what == "bf16":
        bf16(a.device)
    elif a.what == "memory":
        memory(a.device)
    elif a.what == "safety":
        safety(a.device)
    else:
        max_logits()


if __name__ == "__main__":
    main()
