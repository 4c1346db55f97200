"""Builders of a run's parts from a ``JobConfig`` and a ``Runtime``: the data (rank 0 builds, the others open),
the model (meta -> parallelize -> sharded init) and the optimizer (MuonClip or ZeRO-1 DistributedMuonClip)."""
from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data as data_lib
import muonclip
from configs import JobConfig
from launch.runtime import Runtime
from models import Transformer
from parallel.init import init_sharded, load_hf_sharded
from parallel.parallelize import apply_compile, parallelize
from parallel.pipeline_parallel import Pipeline, StagePlan, pipeline_schedule, plan_stages, prune_to_stage
from parallel.precision import PrecisionPolicy


def build_model(cfg: JobConfig, rt: Runtime) -> tuple[Transformer, dict[str, Any]]:
    """Build on meta -> keep this pipeline rank's layers (all of them without PP) -> parallelize (EP/TP, the
    precision policy's parameter dtypes, AC) -> allocate and initialise only this rank's shards
    (parallel/init.py): the global weights equal one process's for ``train.seed`` at any layout (bf16 parameters:
    the float32 draws rounded) -> ``train.compile``: torch.compile per block."""
    if cfg.model.attention_impl == "flex" and rt.device.type != "cuda":
        raise ValueError(f"model.attention_impl: flex needs train.device cuda (flex attention's max scores are not "
                         f"implemented on {rt.device.type}); use attention_impl: sdpa")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    rules, shapes = model.init_rules(), {name: tuple(p.shape) for name, p in model.named_parameters()}
    p = cfg.parallel
    if p.pp > 1:
        plan = stage_plan(cfg, rt)
        model = prune_to_stage(model, plan.layers, first=plan.has_first, last=plan.has_last)
    # EP/TP of size 1 change nothing; placements all the same
    placements = parallelize(model, rt.pdims, rt.groups, p, PrecisionPolicy.from_config(cfg))
    init_sharded(model, rules, shapes, placements, rt.groups.ep_rank, cfg.train.seed, rt.device)
    if cfg.train.compile:
        plain = p.recompute_mode == "none" and not p.fp8_activations and not p.activation_offload
        apply_compile(model, fullgraph_dense=rt.groups.tp_size == 1 and plain)
    return model, placements


def load_released_weights(cfg: JobConfig, rt: Runtime, model: Transformer, placements: dict[str, Any],
                          optimizer: Any) -> int:
    """``train.init_from``: this rank's parameters from an HF directory (checked against the run's model), into the
    float32 masters this rank keeps (then rounded into the bf16 parameters) and the parameters elsewhere.
    Returns the number of multi-token-prediction layers the directory has (not read: our model has none)."""
    from models.hf_interop import HFTensors, from_hf_config, read_hf_config

    path = cfg.train.init_from
    hf_cfg = read_hf_config(path)
    released = from_hf_config(hf_cfg)
    free = {"bias_update_speed", "seq_aux_loss_alpha", "init_std", "max_seq_len", "attention_impl",  # training-only
            *(("n_kv_heads", "head_dim") if released.attn_type == "mla" else ())}  # MHA-only fields
    diff = [f"model.{f}: run {getattr(cfg.model, f)!r} vs {getattr(released, f)!r}"
            for f in vars(released) if f not in free and getattr(cfg.model, f) != getattr(released, f)]
    if diff:
        raise ValueError(f"train.init_from {path}: its config.json does not match the run's model section ("
                         f"{'; '.join(diff[:5])}); print the matching section with scripts/export_hf.py --import "
                         f"{path} --print-config")
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Transformer(cfg.model).named_parameters()}
    load_hf_sharded(model, shapes, placements, rt.groups.ep_rank, HFTensors(path), targets=optimizer.master_params())
    optimizer.sync_params_from_masters()
    return getattr(hf_cfg, "num_nextn_predict_layers", 0) or 0


def token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """The training loss: mean cross entropy over the tokens, in float32."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())


def stage_plan(cfg: JobConfig, rt: Runtime) -> StagePlan:
    p = cfg.parallel
    return plan_stages(cfg.model, rt.groups.pp_rank, p.pp, p.pp_virtual_stages, p.schedule, p.pp_layers or None)


def build_pipeline(cfg: JobConfig, rt: Runtime, model: Transformer) -> Pipeline:
    """The schedule that runs this rank's stages of ``model`` (build_model's pruned model), one round of
    ``parallel.pp_microbatches`` micro batches per call (the trainer runs ``data.grad_accum`` of them per step),
    the loss (float32 mean cross entropy per micro batch) on the last stage. The stages' gradients are the sum over
    micro batches: DistributedMuonClip divides them (``grad_sum_divisor``), since its reductions start inside the
    schedule's backward, before torch's own in-place scaling would run."""
    d = cfg.data
    per_round = cfg.parallel.microbatches_per_round(d.grad_accum)
    return pipeline_schedule(model, stage_plan(cfg, rt), rt.groups.pp_group, rt.device, per_round, None,
                             cfg.parallel.schedule, micro_batch=(d.micro_batch_size, d.seq_len),
                             dtype=PrecisionPolicy.from_config(cfg).activation_dtype, scale_grads=False)


def use_zero1(cfg: JobConfig, rt: Runtime) -> bool:
    if cfg.parallel.optimizer != "zero1" or rt.world_size == 1:
        return False
    try:
        import muonclip.distributed  # noqa: F401
        return True
    except ImportError:
        if rt.groups.ep_size > 1:
            raise
        return False


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """``optim.ns_dtype``: "auto" is bfloat16 on CUDA (tensor cores) and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_optimizer(cfg: JobConfig, model: Transformer, placements: dict, rt: Runtime, zero1: bool):
    """ZeRO-1 ``DistributedMuonClip``, or ``MuonClip``: alone, under DDP (float32 parameters), or averaging its
    float32 gradient buffers over dp itself (bf16 parameters: DDP's buckets would hold bf16 gradients)."""
    o, policy = cfg.optim, PrecisionPolicy.from_config(cfg)
    adamw_lr = {"lr": o.lr * o.adamw_lr_scale}
    groups = muonclip.build_param_groups(model.named_parameters(), weight_decay=o.weight_decay,
                                         group_options={"adamw": adamw_lr, "adamw_no_decay": adamw_lr})
    kwargs = dict(lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, ns_steps=o.ns_steps,
                  weight_decay=o.weight_decay, adamw_betas=o.adamw_betas, adamw_eps=o.adamw_eps,
                  ns_dtype=ns_dtype(o.ns_dtype, rt.device), ns_coefficients=o.ns_coefficients, ns_path=o.ns_path,
                  master_weights=policy.master_weights, offload_state=o.offload_state, reduce_dtype=policy.reduce_dtype)
    if zero1:
        from muonclip.distributed import DistributedMuonClip
        opt = DistributedMuonClip(groups, placements, rt.groups, norm_group=rt.groups.stage_group,
                                  pipeline_group=rt.groups.pp_group, bucket_cap_mb=cfg.parallel.zero1_bucket_mb,
                                  overlap_reduce=cfg.parallel.zero1_overlap,
                                  param_order=[n for n, _ in model.named_parameters()], **kwargs)
        opt.backward_passes_per_step = cfg.data.grad_accum  # micro batches, in a loop or a pipeline schedule
        if cfg.parallel.pp > 1:
            opt.grad_sum_divisor = cfg.data.grad_accum  # build_pipeline: backward sums the micro batches
    else:
        reduce_group = rt.groups.dp_group if rt.groups.dp_size > 1 and policy.low_precision else None
        opt = muonclip.MuonClip(groups, reduce_group=reduce_group, **kwargs)
    opt.init_state()  # zero state for every owned trainable param now: checkpoints always hold the same keys
    return opt


def wraps_in_ddp(cfg: JobConfig, rt: Runtime, zero1: bool) -> bool:
    """Plain data parallelism of float32 parameters goes through DDP (bf16 ones: ``MuonClip`` reduces them)."""
    return rt.groups.dp_size > 1 and not zero1 and not PrecisionPolicy.from_config(cfg).low_precision


def build_data(cfg: JobConfig, rt: Runtime) -> tuple[data_lib.BatchLoader, data_lib.Datasets]:
    """Rank 0 tokenizes raw sources and builds the sample indices (data/sources.py), the others wait and then
    open them. A data error on rank 0 is sent to every rank, so each ends with the same message (no hang)."""
    d = cfg.data
    global_batch = tokens_per_step(cfg, rt) // d.seq_len  # samples per optimizer step, all ranks
    kwargs = dict(model_vocab_size=cfg.model.vocab_size, global_batch=global_batch,
                  planned_samples=cfg.train.steps * global_batch, with_val=cfg.train.eval_interval > 0)
    datasets, error = None, None
    if rt.rank == 0:
        try:
            datasets = data_lib.build_datasets(d, builder=True, log=_log_stderr, **kwargs)
        except (ValueError, OSError) as e:
            if rt.world_size == 1:
                raise
            error = f"{type(e).__name__}: {e}"
    if rt.world_size > 1:
        error = _wait_for_rank0("data_built", error, rt.rank)
        if error is not None:
            raise ValueError(f"rank 0 could not build the data: {error}")
    if datasets is None:  # built by rank 0 by now: this only opens it
        datasets = data_lib.build_datasets(d, builder=False, log=lambda _: None, **kwargs)
    loader = data_lib.BatchLoader(datasets.train, d.micro_batch_size, dp_rank=rt.groups.data_rank,
                                  dp_size=rt.groups.data_size)
    return loader, datasets


def _wait_for_rank0(key: str, error: str | None, rank: int) -> str | None:
    """Rank 0 posts ``error`` (None: done) under ``key`` in this attempt's store (launch/runtime.py); the others
    poll for it. No collective timeout applies: tokenizing a corpus may take hours; a dead rank 0 is the
    watchdog's to report."""
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        store.set(key, error or "")
        return error
    while not store.check([key]):
        time.sleep(0.2)
    return store.get(key).decode() or None


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tokens_per_step(cfg: JobConfig, rt: Runtime) -> int:
    d = cfg.data
    return d.seq_len * d.micro_batch_size * d.grad_accum * rt.groups.data_size
