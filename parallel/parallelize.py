"""One place that turns the plain model into the parallel one, in a fixed order: EP, TP, precision (bf16
parameters, parallel/precision.py), activation checkpointing (``parallelize``); ``apply_compile``
(``train.compile``) comes last, on the parallel model.

Data-parallel gradient synchronisation is not applied here: ``DistributedMuonClip`` (ZeRO-1) reduces
gradients itself (or the trainer wraps with DDP). The returned placements tell the optimizer how each
parameter is laid out.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Protocol

from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint

from muonclip.placement import Placement

from parallel.expert_parallel import apply_expert_parallel, expert_placements
from parallel.dims import ParallelDims, ParallelGroups
from parallel.precision import PrecisionPolicy, apply_precision
from parallel.tensor_parallel import apply_tensor_parallel, tp_placements


class _ParallelizeOptions(Protocol):
    activation_checkpointing: bool


@dataclass(frozen=True)
class ParallelizeConfig:
    """Options of the parallelize step (any object with these attributes is accepted)."""

    activation_checkpointing: bool = False


@contextmanager
def _no_step_stats(module: nn.Module) -> Iterator[None]:
    """A recomputation records no per-step statistics (max logits, expert loads, balance-loss values): the modules
    that keep them skip it (the float32 max-logit probe is not run again), so each forward counts once."""
    recording = [m for m in module.modules() if getattr(m, "record_stats", False)]
    for m in recording:
        m.record_stats = False
    try:
        yield
    finally:
        for m in recording:
            m.record_stats = True


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (composable API: parameter names unchanged)."""
    for block in model.layers:
        composable_checkpoint(block, context_fn=lambda b=block: (nullcontext(), _no_step_stats(b)))


def apply_compile(model: nn.Module, fullgraph_dense: bool = True) -> None:
    """``torch.compile`` each transformer block in place (torchtitan style; parameter names unchanged). Dense blocks
    compile as one graph (``fullgraph``; pass False where collectives run inside them, i.e. tensor parallelism);
    MoE blocks may break the graph: at the data-dependent token counts of the dispatch and, in float32, around
    the grouped expert GEMMs (models/moe.py). Compilation happens at the first forward of each block."""
    dense = set(range(model.cfg.first_k_dense))
    for i, block in zip(model.layers.indices(), model.layers):
        block.compile(fullgraph=fullgraph_dense and i in dense)


def parallelize(model: nn.Module, pdims: ParallelDims, groups: ParallelGroups,
                cfg: _ParallelizeOptions = ParallelizeConfig(),
                precision: PrecisionPolicy = PrecisionPolicy()) -> dict[str, Placement]:
    """Apply EP, then TP, then the precision policy (parameter dtypes), then activation checkpointing to ``model``
    in place; return a placement per param.

    ``model``: a ``models.Transformer`` built on meta (then allocate and initialise the shards with
    ``parallel.init.init_sharded``: the same global weights at any layout) or built and initialised identically
    on every rank. Build the optimizer and ``model.qk_clip_specs()`` after this call (parameters and max-logit
    buffers are replaced).
    """
    if groups.dims != pdims:
        raise ValueError(f"parallelize: groups were built for {groups.dims}, not {pdims}")
    pdims.check_model(model.cfg)
    apply_expert_parallel(model, groups.ep_rank, groups.ep_size, groups.ep_group)
    apply_tensor_parallel(model, groups.tp_rank, groups.tp_size, groups.tp_group)
    apply_precision(model, precision)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    placements = {name: Placement("replicated") for name, _ in model.named_parameters()}
    placements.update(expert_placements(model))
    placements.update(tp_placements(model, groups.tp_group))
    return placements


__all__ = ["ParallelizeConfig", "parallelize", "apply_activation_checkpointing", "apply_compile"]
