"""One place that turns the plain model into the parallel one, in a fixed order: EP, TP (the vocabulary-split
embedding, head and loss, parallel/vocab_parallel.py; with sequence parallelism, parallel/sequence_parallel.py, when
``ParallelDims.sp``), CP (the all-to-all over
heads around attention, parallel/context_parallel.py), precision (bf16 parameters, parallel/precision.py), recomputation (parallel/recompute.py), FP8 activation storage
(parallel/fp8_storage.py), activation offload (parallel/activation_offload.py) (``parallelize``);
``apply_compile`` (``train.compile``) comes last, on the parallel model.

The memory techniques stack in that order: FP8 storage wraps the regions recomputation wrapped, so it compresses
what the recomputation keeps; offload wraps every block outermost, so it moves what is left (the FP8 tensors stay on
the device: the innermost saved-tensor hooks decide).

Data-parallel gradient synchronisation is not applied here: ``DistributedMuonClip`` (ZeRO-1) reduces
gradients itself (or the trainer wraps with DDP). The returned placements tell the optimizer how each
parameter is laid out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from muonclip.placement import Placement

from parallel.activation_offload import apply_activation_offload
from parallel.context_parallel import apply_context_parallel
from parallel.dims import ParallelDims, ParallelGroups
from parallel.expert_parallel import apply_expert_parallel, expert_placements
from parallel.fp8_storage import apply_fp8_storage
from parallel.precision import PrecisionPolicy, apply_precision
from parallel.recompute import RECOMPUTE_MODULES, apply_recompute
from parallel.router_stats import apply_sequence_shards
from parallel.sequence_parallel import SequenceParallel, sp_placements
from parallel.tensor_parallel import apply_tensor_parallel, tp_placements
from parallel.vocab_parallel import apply_vocab_parallel, vocab_placements


@dataclass(frozen=True)
class ParallelizeConfig:
    """Options of the parallelize step (``configs.ParallelConfig`` has them all; any object with these attributes
    is accepted)."""

    activation_checkpointing: bool = False  # = recompute "full"
    recompute: str = "none"  # "none", "full", "selective"
    recompute_modules: list[str] = field(default_factory=list)  # selective: [] = all of RECOMPUTE_MODULES
    fp8_activations: list[str] = field(default_factory=list)
    activation_offload: bool = False


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (``apply_recompute(model, "full")``)."""
    apply_recompute(model, "full")


def apply_compile(model: nn.Module, fullgraph_dense: bool = True) -> None:
    """``torch.compile`` each transformer block in place (torchtitan style; parameter names unchanged). Dense blocks
    compile as one graph (``fullgraph``; pass False where collectives run inside them, i.e. tensor parallelism);
    MoE blocks may break the graph: at the data-dependent token counts of the dispatch and, in float32, around
    the grouped expert GEMMs (models/moe.py). Compilation happens at the first forward of each block."""
    dense = set(range(model.cfg.first_k_dense))
    for i, block in zip(model.layers.indices(), model.layers):
        block.compile(fullgraph=fullgraph_dense and i in dense)


def parallelize(model: nn.Module, pdims: ParallelDims, groups: ParallelGroups,
                cfg: ParallelizeConfig = ParallelizeConfig(),
                precision: PrecisionPolicy = PrecisionPolicy()) -> dict[str, Placement]:
    """Apply EP, TP, CP, the precision policy (parameter dtypes), recomputation, FP8 storage and activation offload
    to ``model`` in place, in that order; return a placement per param.

    ``model``: a ``models.Transformer`` built on meta (then allocate and initialise the shards with
    ``parallel.init.init_sharded``: the same global weights at any layout) or built and initialised identically
    on every rank. Build the optimizer and ``model.qk_clip_specs()`` after this call (parameters and max-logit
    buffers are replaced).
    """
    if groups.dims != pdims:
        raise ValueError(f"parallelize: groups were built for {groups.dims}, not {pdims}")
    pdims.check_model(model.cfg)
    apply_expert_parallel(model, groups.ep_rank, groups.ep_size, groups.ep_group, groups.etp_rank, groups.etp_size,
                          groups.etp_group)
    seq = SequenceParallel(groups.tp_group, groups.tp_size, groups.tp_rank) if pdims.sp else None
    apply_tensor_parallel(model, groups.tp_rank, groups.tp_size, groups.tp_group, seq)
    if groups.tp_size > 1:
        model.vocab_parallel = apply_vocab_parallel(model, groups.tp_rank, groups.tp_size, groups.tp_group, seq)
    if seq is not None:
        model.sequence_parallel = seq
    apply_context_parallel(model, groups.cp_rank, groups.cp_size, groups.cp_group,
                           hidden_parts=groups.tp_size if seq is not None else 1)
    apply_sequence_shards(model, sp=(groups.tp_group, groups.tp_size if seq is not None else 1),
                          cp=(groups.cp_group, groups.cp_size))
    apply_precision(model, precision)
    mode = "full" if cfg.activation_checkpointing else cfg.recompute
    modules = cfg.recompute_modules or RECOMPUTE_MODULES
    apply_recompute(model, mode, modules)
    apply_fp8_storage(model, cfg.fp8_activations, recomputed=set(modules) if mode == "selective" else set())
    if cfg.activation_offload:
        model.activation_offload = apply_activation_offload(model)
    return model_placements(model, pdims.sp, groups.tp_group)


def model_placements(model: nn.Module, sp: bool, tp_group: Any) -> dict[str, Placement]:
    """A placement per parameter of a model ``parallelize`` split (the planner's meta models too): the TP and
    vocabulary shards, the expert stacks (folded over TP under sequence parallelism), sequence parallelism's
    per-token tensors, the rest replicated."""
    placements = {name: Placement("replicated") for name, _ in model.named_parameters()}
    placements.update(sp_placements(model) if sp else {})
    placements.update(expert_placements(model, tp_copies=not sp))
    placements.update(tp_placements(model, tp_group))
    placements.update(vocab_placements(model, tp_group))
    return placements


__all__ = ["ParallelizeConfig", "parallelize", "model_placements", "apply_activation_checkpointing", "apply_compile"]
