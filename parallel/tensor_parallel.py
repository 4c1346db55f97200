"""Megatron-style tensor parallelism applied to the plain ``models.Transformer`` after construction.

What is split (``tp`` ranks of one ``tp_group``, slices in tp-rank order, rank r holds slice r):

- Attention heads. MHA/GQA: ``q_proj`` and ``k_proj``/``v_proj`` column-split by (q / kv) heads; ``o_proj``
  row-split. MLA: ``q_b_proj`` (or ``q_proj``) and ``kv_b_proj`` column-split by heads, ``o_proj`` row-split;
  the low-rank ``q_a_proj``/``kv_a_proj_with_mqa`` and the norms are replicated. Each rank then runs
  ``n_heads / tp`` heads; ``max_logits_H`` and ``qk_clip_specs()`` become local (the model derives head counts
  from weight shapes).
- Dense FFN and shared experts: ``gate_proj``/``up_proj`` column-split, ``down_proj`` row-split.

Replicated (computed redundantly on each TP rank, same tokens): all norms, the router, and the ROUTED experts
(expert parallelism shards those, over the dp axis). The embedding, ``lm_head`` and the loss are split over the
vocabulary by parallel/vocab_parallel.py, which ``parallelize`` applies after this.

Communication (autograd-correct, one op per split region):
- column input: ``copy_to_tp`` = identity forward / all-reduce backward. Placed where the replicated input
  enters the split region: the attention input for MHA (q, k, v share it), the FFN input (gate and up
  share it), and for MLA at the inputs of ``q_b_proj``/``q_proj`` and ``kv_b_proj`` (after the replicated
  low-rank projections, so the replicated params downstream of them get full gradients).
- MLA's shared rotary key (last ``dr`` outputs of ``kv_a_proj_with_mqa``) feeds every local head directly, so
  its gradient is partial per rank: ``kv_a_proj_with_mqa`` all-reduces just that slice of its output gradient.
- row output: ``reduce_from_tp`` = all-reduce forward / identity backward.
As a result every replicated parameter gets the same (full) gradient on all TP ranks with no extra reduction.

Under sequence parallelism (``seq``: parallel/sequence_parallel.py) the replicated parts run on 1/tp of each
sequence instead: the regions are entered by an all-gather (MLA: one for its latents and rotary key, in place of
the copies above and the rotary key's gradient all-reduce) and left by a reduce-scatter.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models import Attention, FeedForward, MLAttention
from muonclip.placement import Placement
from parallel.recompute import collective


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        def all_reduce() -> torch.Tensor:
            out = x.contiguous().clone()
            dist.all_reduce(out, group=group)
            return out
        return collective(all_reduce)  # a recomputed block gets its forward's result back

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReduceGradTail(torch.autograd.Function):
    """Identity forward; backward all-reduces the last ``n`` features of the gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, group: Any) -> torch.Tensor:
        ctx.n, ctx.group = n, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        tail = grad[..., -ctx.n:].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., -ctx.n:] = tail
        return grad, None, None


def copy_to_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


class ColumnParallelLinear(nn.Linear):
    """Holds rows [rank*out/tp, (rank+1)*out/tp) of a full ``nn.Linear`` weight; output is split by features.

    ``copy_input``: apply ``copy_to_tp`` to the input (when this linear alone consumes a replicated input).
    """

    def __init__(self, full: nn.Linear, rank: int, size: int, group: Any, copy_input: bool):
        n = full.out_features // size
        super().__init__(full.in_features, n, bias=False, device="meta")
        self.weight = nn.Parameter(full.weight.detach()[rank * n:(rank + 1) * n].clone())
        self.tp_group, self.copy_input = group, copy_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.tp_group) if self.copy_input else x, self.weight)


class RowParallelLinear(nn.Linear):
    """Holds columns [rank*in/tp, (rank+1)*in/tp) of a full weight; sums the partial outputs over the group
    (``reduce``: ``reduce_from_tp`` by default; sequence parallelism's reduce-scatter).
    A bias stays replicated and is added once, after the sum."""

    def __init__(self, full: nn.Linear, rank: int, size: int, group: Any,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        n = full.in_features // size
        super().__init__(n, full.out_features, bias=False, device="meta")
        self.weight = nn.Parameter(full.weight.detach()[:, rank * n:(rank + 1) * n].clone())
        self.bias = full.bias  # same Parameter (or None): replicated
        self.tp_group = group
        self.reduce = reduce or (lambda out: reduce_from_tp(out, group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class LatentRopeLinear(nn.Linear):
    """Replicated ``kv_a_proj_with_mqa``: all-reduces the gradient of its last ``n_rope`` outputs (the shared
    rotary key, consumed directly by the rank-local heads)."""

    def __init__(self, full: nn.Linear, n_rope: int, group: Any):
        super().__init__(full.in_features, full.out_features, bias=False, device="meta")
        self.weight, self.bias = full.weight, full.bias  # same Parameters: replicated
        self.n_rope, self.tp_group = n_rope, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceGradTail.apply(F.linear(x, self.weight, self.bias), self.n_rope, self.tp_group)


def _copy_input_hook(group: Any):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (copy_to_tp(args[0], group),) + tuple(args[1:])
    return hook


def _local_max_logits(attn: nn.Module, n_local: int) -> None:
    buf = attn.max_logits_H
    attn.max_logits_H = torch.full((n_local,), float("-inf"), device=buf.device, dtype=buf.dtype)
    attn.n_heads = n_local


def _split_attention(attn: nn.Module, rank: int, size: int, group: Any, seq: Any) -> None:
    """``seq`` (sequence parallelism, parallel/sequence_parallel.py): the regions gather their inputs and
    reduce-scatter their outputs through it."""
    reduce = seq.reduce_scatter if seq is not None else None
    if isinstance(attn, Attention):
        n_local = attn.q_proj.out_features // attn.head_dim // size
        if seq is None:
            attn.register_forward_pre_hook(_copy_input_hook(group))
        else:
            seq.enter_sequence(attn, "_qkv")  # the forward and QK-Clip's probe both reach it
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), rank, size, group, copy_input=False))
        attn.n_kv_heads = attn.k_proj.out_features // attn.head_dim
    elif isinstance(attn, MLAttention):
        n_local = attn.kv_b_proj.out_features // (attn.dn + attn.dv) // size
        q_name = "q_b_proj" if hasattr(attn, "q_b_proj") else "q_proj"
        for name in (q_name, "kv_b_proj"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), rank, size, group,
                                                     copy_input=seq is None))
        if seq is None:
            attn.kv_a_proj_with_mqa = LatentRopeLinear(attn.kv_a_proj_with_mqa, attn.dr, group)
        else:  # the rotary key goes with the latents: the gather's reduce-scatter sums its partial gradients
            seq.enter_latents(attn)
    else:
        raise TypeError(f"tensor parallel: unsupported attention module {type(attn).__name__}")
    attn.o_proj = RowParallelLinear(attn.o_proj, rank, size, group, reduce)
    _local_max_logits(attn, n_local)


def _split_ffn(ffn: FeedForward, rank: int, size: int, group: Any, seq: Any) -> None:
    if seq is None:
        ffn.register_forward_pre_hook(_copy_input_hook(group))
    else:
        seq.enter_rows(ffn)
    ffn.gate_proj = ColumnParallelLinear(ffn.gate_proj, rank, size, group, copy_input=False)
    ffn.up_proj = ColumnParallelLinear(ffn.up_proj, rank, size, group, copy_input=False)
    ffn.down_proj = RowParallelLinear(ffn.down_proj, rank, size, group,
                                      seq.reduce_scatter if seq is not None else None)


def apply_tensor_parallel(model: nn.Module, tp_rank: int, tp_size: int, tp_group: Any, seq: Any = None) -> None:
    """Shard ``model`` in place (weights sliced from the full initialised ones; meta tensors work too).

    Call on the model built identically on every TP rank, before the optimizer and QK-Clip specs are built.
    Divisibility (heads, kv heads, FFN widths by ``tp_size``) is checked by ``ParallelDims.check_model``.
    ``seq``: a ``parallel.sequence_parallel.SequenceParallel`` whose all-gathers and reduce-scatters enter and
    leave the regions instead of ``copy_to_tp`` / ``reduce_from_tp``.
    """
    if tp_size == 1:
        return
    for block in model.layers:
        _split_attention(block.self_attn, tp_rank, tp_size, tp_group, seq)
        mlp = block.mlp
        if isinstance(mlp, FeedForward):
            _split_ffn(mlp, tp_rank, tp_size, tp_group, seq)
        elif getattr(mlp, "shared_experts", None) is not None:
            _split_ffn(mlp.shared_experts, tp_rank, tp_size, tp_group, seq)


def tp_placements(model: nn.Module, tp_group: Any) -> dict[str, Placement]:
    """``tp_sharded`` placements of the split weights (column: shard_dim 0, row: shard_dim 1)."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ColumnParallelLinear):
            out[f"{mod_name}.weight"] = Placement("tp_sharded", shard_dim=0, tp_group=tp_group)
        elif isinstance(mod, RowParallelLinear):
            out[f"{mod_name}.weight"] = Placement("tp_sharded", shard_dim=1, tp_group=tp_group)
    return out


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "LatentRopeLinear", "apply_tensor_parallel",
           "tp_placements", "copy_to_tp", "reduce_from_tp"]
