"""Builders of a run's parts from a ``JobConfig`` and a ``Runtime``: the data (rank 0 builds, the others open),
the model (meta -> parallelize -> sharded init) and the optimizer (MuonClip or ZeRO-1 DistributedMuonClip)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
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
    model.reset_positions = cfg.data.reset_positions  # with data.document_mask (the loader gives the segments)
    placements = parallelize(model, rt.pdims, rt.groups, p, PrecisionPolicy.from_config(cfg))
    init_sharded(model, rules, shapes, placements, rt.groups.ep_rank, cfg.train.seed, rt.device)
    if cfg.train.compile:
        plain = p.recompute_mode == "none" and not p.fp8_activations and not p.activation_offload
        # per-document SDPA runs eagerly (a graph break: models/document_mask.py)
        plain = plain and not (cfg.data.document_mask and cfg.model.attention_impl == "sdpa")
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
    load_hf_sharded(model, shapes, placements, rt.groups.ep_rank, HFTensors(path), targets=optimizer.master_params(),
                    row_shards=optimizer.row_shards())
    optimizer.sync_params_from_masters()
    return getattr(hf_cfg, "num_nextn_predict_layers", 0) or 0


def token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """The training loss: mean cross entropy over the tokens, in float32."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())


def stage_plan(cfg: JobConfig, rt: Runtime) -> StagePlan:
    p = cfg.parallel
    return plan_stages(cfg.model, rt.groups.pp_rank, p.pp, p.pp_virtual_stages, p.schedule, p.pp_layers or None)


def build_pipeline(cfg: JobConfig, rt: Runtime, model: Transformer) -> Pipeline:
    """The schedule that runs this rank's stages of ``model`` (build_model's pruned model), all the step's
    ``data.grad_accum`` micro batches per call (or a round of ``parallel.pp_microbatches``),
    the loss (float32 mean cross entropy per micro batch) on the last stage. The stages' gradients are the sum over
    micro batches: DistributedMuonClip divides them (``grad_sum_divisor``), since its reductions start inside the
    schedule's backward, before torch's own in-place scaling would run."""
    d, p = cfg.data, cfg.parallel
    per_round = p.microbatches_per_round(d.grad_accum)
    tokens = d.seq_len // p.cp  # the ids of a micro batch; the hidden states 1/tp of them under sequence parallelism
    hidden = tokens // p.tp if p.sequence_parallel else tokens
    return pipeline_schedule(model, stage_plan(cfg, rt), rt.groups.pp_group, rt.device, per_round, None,
                             p.schedule, micro_batch=(d.micro_batch_size, tokens, hidden),
                             dtype=PrecisionPolicy.from_config(cfg).activation_dtype, scale_grads=False)


def use_zero1(cfg: JobConfig, rt: Runtime) -> bool:
    if cfg.parallel.optimizer != "zero1" or rt.world_size == 1:
        return False
    try:
        import muonclip.distributed  # noqa: F401
        return True
    except ImportError:
        if rt.groups.ep_size > 1 or rt.groups.tp_size > 1:  # plain MuonClip neither gathers TP shards nor sums
            raise  # folded experts' gradients over the stage
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
    """Rank 0 tokenizes raw sources and builds the document tables and sample indices (data/sources.py), posting
    its progress; the others wait (at most ``data.build_timeout_s``) and open what it wrote from its manifest. A
    data error on rank 0 is sent to every rank, so each ends with the same message (no hang)."""
    d = cfg.data
    global_batch = tokens_per_step(cfg, rt) // d.seq_len  # samples per optimizer step, all ranks
    kwargs = dict(model_vocab_size=cfg.model.vocab_size, global_batch=global_batch,
                  planned_samples=cfg.train.steps * global_batch, with_val=cfg.train.eval_interval > 0)
    store = dist.distributed_c10d._get_default_store() if rt.world_size > 1 else None
    # keyed by what is built: a second build in the same process group (tests) never reads the first one's answer
    key = hashlib.sha256(json.dumps([dataclasses.asdict(d), kwargs], sort_keys=True).encode()).hexdigest()[:16]
    done_key, status_key = f"data_built/{key}", f"data_status/{key}"
    if rt.rank == 0:
        def log(message: str) -> None:
            _log_stderr(message)
            if store is not None:
                store.set(status_key, message)

        try:
            datasets = data_lib.build_datasets(d, builder=True, log=log, **kwargs)
        except (ValueError, OSError) as e:
            if store is None:
                raise
            store.set(done_key, json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise ValueError(f"rank 0 could not build the data: {type(e).__name__}: {e}") from None
        if store is not None:
            store.set(done_key, json.dumps({"manifest": datasets.manifest}))
    else:
        posted = json.loads(_wait_for_rank0(store, done_key, status_key, d.build_timeout_s))
        if "error" in posted:
            raise ValueError(f"rank 0 could not build the data: {posted['error']}")
        datasets = data_lib.build_datasets(d, builder=False, log=lambda _: None, manifest=posted["manifest"],
                                           **kwargs)
    loader = data_lib.BatchLoader(datasets.train, d.micro_batch_size, dp_rank=rt.groups.data_rank,
                                  dp_size=rt.groups.data_size, document_mask=d.document_mask,
                                  cp_rank=rt.groups.cp_rank, cp_size=rt.groups.cp_size)
    return loader, datasets


def _wait_for_rank0(store, key: str, status_key: str, timeout_s: float) -> str:
    """What rank 0 posts under ``key`` in this attempt's store (launch/runtime.py), polled without a collective
    (tokenizing may take long; a dead rank 0 is the watchdog's to report), at most ``timeout_s``: then an error
    naming rank 0's last progress message."""
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if time.monotonic() > deadline:
            last = store.get(status_key).decode() if store.check([status_key]) else "nothing yet"
            raise ValueError(f"rank 0 has not finished building the data after data.build_timeout_s={timeout_s:g} s "
                             f"(its last message: {last}); tokenize large corpora beforehand (python -m "
                             f"data.preprocess) or raise data.build_timeout_s")
        time.sleep(0.2)
    return store.get(key).decode()


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tokens_per_step(cfg: JobConfig, rt: Runtime) -> int:
    d = cfg.data
    return d.seq_len * d.micro_batch_size * d.grad_accum * rt.groups.data_size
