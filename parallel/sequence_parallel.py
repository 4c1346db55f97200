"""Sequence parallelism (``parallel.sequence_parallel``, Megatron's ``--sequence-parallel``): outside the
tensor-parallel regions each rank of a ``tp_group`` holds 1/tp of every sequence.

Rank t of the TP group holds tokens ``[t*T/tp, (t+1)*T/tp)`` of each sequence of its micro batch (under context
parallelism, of its CP chunk: rank (c, t) holds ``[(c*tp + t)*T/(cp*tp), ...)``). The residual stream between
blocks, the norms and what they keep for backward, MLA's down projections and latent norms, the routers and the
routed experts are ``[B, T/tp, ...]``: each token is routed once (the expert groups are folded over the stage's
ranks, parallel/dims.py: at ep 1 a rank's experts see its own tokens only, at ep > 1 its tokens go to the experts'
owners in its expert group, which may span TP ranks; without sequence parallelism every TP rank ran the same tokens
through them). The loader is unchanged: TP peers read the same ids and the vocab-split embedding's partial outputs
are reduce-scattered. A pipeline stage sends ``[B, T/tp, D]``.

The TP regions (parallel/tensor_parallel.py) enter and leave through this module's collectives instead of
``copy_to_tp`` / ``reduce_from_tp``:

| where | forward | backward |
|---|---|---|
| column region entry (1) | all-gather | reduce-scatter |
| row region exit: ``o_proj``, ``down_proj`` | reduce-scatter | all-gather |
| embedding output (vocab-split: partial sums, parallel/vocab_parallel.py) | reduce-scatter | all-gather |
| LM head input (vocab-split head: logits and the loss) | all-gather | reduce-scatter |

(1) MHA's q/k/v input; MLA's latents, q's, kv's and the shared rotary key packed into one (``q_proj``'s input
without q compression); the dense FFN's and the shared experts' input.

An all-gather and a reduce-scatter each send (tp-1)/tp of the whole tensor, so a region costs the bytes of TP's
all-reduce (and a column region one all-gather more in backward, below). Attention's inputs are gathered in sequence order (``[B, T, F]``: a layout copy per collective when
B > 1); the token-local FFNs gather rows (``[tp * B * T/tp, D]``, rank-major: no copy at any B). Every collective
goes through ``SequenceComm``, which counts the bytes each sends (``bytes_sent``, CountingComm's convention); the
object is ``model.sequence_parallel``.

A column region keeps only its LOCAL input for backward (``column_region``, ``_Regather``: Megatron's column-parallel
linears under sequence parallelism): what its GEMMs save of the gathered input is packed as this rank's part and
all-gathered again when backward reads it, once per backward pass (the zero-bubble schedules' input pass and weight
pass each gather it; every TP rank runs the same passes in the same order). The values are the forward gather's, so
the gradients are bitwise those of saving the gathered input; the regions keep 1/tp of the bytes, and their
all-gathers send once more in backward. The local part is packed by the hooks around the region: activation offload
moves it (never the gathered tensor), a checkpointed block (full recomputation) keeps nothing.

Gradients: a parameter each TP rank holds whole but applies to its own tokens only (norms, routers, MLA's
``q_a_proj``/``kv_a_proj_with_mqa`` and latent norms, row-parallel biases: ``per_token_params``) gets those tokens'
gradient on each rank. Its placement says so (``Placement("replicated", tp_copies=False)``, ``sp_placements``):
ZeRO-1 (muonclip/distributed.py) owns it on one rank of the pipeline stage and sums its gradient over the stage's dp
x cp x tp ranks in its buckets, once per step, as Megatron's ``finalize_model_grads`` all-reduces its
``sequence_parallel`` weights over TP once per step (one reduce instead of an all-reduce over TP followed by a
reduce over dp, and its optimizer state sharded tp times finer). The embedding's and the head's vocabulary rows
(split over TP) get their whole gradient on their rank; the routed experts' gradients are summed over the
expert-data-parallel group, which under folding spans the TP ranks (Megatron: the expert-DP reduce).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from models import GroupedExperts, MLAttention
from muonclip.placement import Placement
from parallel.regions import outer_hooks, saved_tensors_chain


class SequenceComm:
    """All-gather / reduce-scatter / all-reduce over one TP group, counting the bytes this rank sends
    (``bytes_sent``: all-gather and reduce-scatter (G-1)/G of the whole tensor, all-reduce 2(G-1)/G)."""

    def __init__(self, group: Any, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.bytes_sent: dict[str, int] = defaultdict(int)

    def all_gather(self, x: torch.Tensor, key: str = "sp_all_gather") -> torch.Tensor:
        """[...] on each rank -> [G, ...] in rank order."""
        out = x.new_empty((self.size * x.shape[0],) + tuple(x.shape[1:]))  # gloo takes the parts along dim 0
        dist.all_gather_single(out, x.contiguous(), group=self.group)
        self.bytes_sent[key] += (self.size - 1) * x.numel() * x.element_size()
        return out.view((self.size,) + tuple(x.shape))

    def reduce_scatter(self, x_G: torch.Tensor) -> torch.Tensor:
        """[G, ...] on each rank -> this rank's [...] of the sum."""
        out = x_G.new_empty(tuple(x_G.shape[1:]))
        dist.reduce_scatter_single(out, x_G.contiguous().flatten(0, 1), group=self.group)
        self.bytes_sent["sp_reduce_scatter"] += (self.size - 1) * out.numel() * out.element_size()
        return out

    def all_reduce_(self, t: torch.Tensor, key: str, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(t, op=op, group=self.group)
        self.bytes_sent[key] += 2 * (self.size - 1) * t.numel() * t.element_size() // self.size
        return t


def in_gemm_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's GEMM dtype where autocast is on (what a region's GEMMs read anyway), else unchanged."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


# the sequence (or row) dimension is -2 everywhere: [B, T, F] (attention) or [rows, F] (token-local regions)
def _parts(x: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n*t, F] -> [n, ..., t, F]: the parts in rank order, each contiguous."""
    return x.unflatten(-2, (n, -1)).movedim(-3, 0).contiguous()


def _joined(x_G: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_parts``: [n, ..., t, F] -> [..., n*t, F] (a view for rows or B = 1)."""
    return x_G.movedim(0, -3).flatten(-3, -2)


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim -2; backward reduce-scatters (the consumer holds a column or vocabulary shard: partial
    gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: SequenceComm) -> torch.Tensor:
        ctx.comm = comm
        return _joined(comm.all_gather(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.reduce_scatter(_parts(grad, ctx.comm.size)), None


class _ReduceScatterSeq(torch.autograd.Function):
    """Sum over the group and keep this rank's part along dim -2; backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: SequenceComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.reduce_scatter(_parts(x, comm.size))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _joined(ctx.comm.all_gather(grad)), None


class SequenceParallel:
    """The collectives of one TP group's sequence split, and the TP regions' entries and exits built from them
    (what ``apply_tensor_parallel`` calls under sequence parallelism)."""

    def __init__(self, group: Any, size: int, rank: int):
        self.comm = SequenceComm(group, size, rank)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherSeq.apply(x, self.comm)

    def gather_for_gemms(self, x: torch.Tensor) -> torch.Tensor:
        """``gather`` of what only autocast's GEMMs read: under autocast (bf16 compute, float32 parameters) in the
        compute dtype, which they read anyway (a norm's float32 output would move twice the bytes; Megatron gathers
        bf16 too, and its gradient's reduce-scatter sums in bf16). The head's GEMMs too (models/loss.py: the
        autocast dtype where autocast is on; its input gradient is that GEMM's bf16 product either way)."""
        return self.gather(in_gemm_dtype(x))

    def column_region(self, x: torch.Tensor, region: Callable[[torch.Tensor], Any]) -> Any:
        """``region(x gathered for its GEMMs)``, keeping only ``x``'s local part for backward: a saved tensor that
        is the gathered input (or a view of it) is packed as this rank's part and all-gathered again when backward
        asks for it (``_Regather``), as Megatron's column-parallel linears do under sequence parallelism."""
        local = in_gemm_dtype(x)
        whole = self.gather(local)
        if not torch.is_grad_enabled():
            return region(whole)
        regather = _Regather(self.comm, local, whole)
        try:
            with saved_tensors_chain(regather.pack, _Regather.unpack):
                return region(whole)
        finally:
            regather.close()

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceScatterSeq.apply(x, self.comm)

    # ---------------------------------------------------------------- TP regions' entries
    def enter_sequence(self, module: nn.Module, name: str) -> None:
        """``module.<name>(x, ...)`` gets ``x`` gathered in sequence order (MHA's ``_qkv``; a column linear)."""
        method = getattr(module, name)

        def gathered(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return self.column_region(x, lambda whole: method(whole, *args, **kwargs))

        setattr(module, name, gathered)

    def enter_rows(self, ffn: nn.Module) -> None:
        """A token-local region (dense FFN, shared experts): its input's rows gathered rank-major, its output (the
        row-parallel ``down_proj``'s reduce-scatter) back in the input's shape."""
        forward = ffn.forward

        def gathered(x: torch.Tensor) -> torch.Tensor:
            return self.column_region(x.reshape(-1, x.shape[-1]), forward).view(x.shape)

        ffn.forward = gathered

    def enter_latents(self, attn: MLAttention) -> None:
        """MLA: ``qkv_up``'s local latents (q's with q compression, kv's, the shared rotary key) gathered in ONE
        collective, packed along features; without q compression ``q_proj`` gathered its own input. The latents go
        to the up projections' GEMMs as gathered (autocast's dtype: what those GEMMs read, so what they save is the
        gathered tensor), the rotary key back in its own dtype (RoPE is elementwise)."""
        qkv_up, q_local = attn.qkv_up, hasattr(attn, "q_b_proj")

        def gathered(q_in: torch.Tensor, kv_c: torch.Tensor, k_rope: torch.Tensor, *positions: torch.Tensor):
            local = [q_in, kv_c, k_rope] if q_local else [kv_c, k_rope]

            def up(whole: torch.Tensor):
                *latents, rope = whole.split([t.shape[-1] for t in local], -1)
                if not torch.is_autocast_enabled(whole.device.type):  # autocast's GEMMs read the gathered dtype
                    latents = [w.to(t.dtype) for w, t in zip(latents, local)]
                return qkv_up(*(latents if q_local else [q_in, *latents]), rope.to(k_rope.dtype), *positions)

            return self.column_region(torch.cat(local, -1), up)

        attn.qkv_up = gathered
        if not q_local:
            self.enter_sequence(attn.q_proj, "forward")


class _Regather:
    """One column region's gathered input as backward gets it back (Megatron's column-parallel linear under sequence
    parallelism saves its un-gathered input and all-gathers it again for the weight gradient).

    While the region runs, a tensor autograd saves whose storage is the gathered input's (MHA's q/k/v GEMMs, the
    FFN's gate/up, MLA's up projections: the input or a view of it) is packed as this record and its view; the
    record keeps the LOCAL input, packed once by the hooks around the region (activation offload moves it like any
    saved tensor; under full recomputation the checkpoint keeps nothing), so the whole input is never offloaded or
    kept. Backward's first unpack all-gathers the local part again (through ``SequenceComm``: ``sp_all_gather``
    counts it) and hands out each view of it; the gathered tensor is let go once every saved view has been handed
    out, and gathered again if they are asked for again (the zero-bubble schedules' input pass, then the weight
    pass). Its values are those of the forward's gather, so gradients are bitwise those of saving it. Every TP rank
    builds the same graph, so backward reaches the same regions in the same order on each: the collectives match.
    """

    def __init__(self, comm: SequenceComm, local: torch.Tensor, whole: torch.Tensor):
        self.comm = comm
        self.storage: int | None = whole.untyped_storage().data_ptr()  # only while the region runs
        self.offset = whole.storage_offset()
        self.outer = outer_hooks()
        self.local, self.views, self.left = local, 0, 0
        self.packed: Any = None  # the local part as the hooks around packed it
        self.value: torch.Tensor | None = None  # the gathered input, between the first and the last unpack

    def pack(self, t: torch.Tensor) -> tuple | None:
        if self.storage is None or t.untyped_storage().data_ptr() != self.storage:
            return None
        if self.packed is None:
            self.packed = self.outer[0](self.local.detach())
        self.views += 1
        return self, t.storage_offset() - self.offset, tuple(t.shape), t.stride()

    def close(self) -> None:
        """The region is done: forget the gathered tensor's address and the local tensor (the packed copy stays)."""
        self.storage = self.local = None

    @staticmethod
    def unpack(packed: tuple) -> torch.Tensor:
        record, offset, shape, stride = packed
        if record.value is None:
            with torch.no_grad():
                record.value = _joined(record.comm.all_gather(record.outer[1](record.packed)))
            record.left = record.views
        value = record.value
        record.left -= 1
        if record.left == 0:
            record.value = None
        return value.as_strided(shape, stride, value.storage_offset() + offset)


def per_token_params(model: nn.Module) -> list[str]:
    """Names of the trainable parameters applied to this rank's tokens only and whole on every TP rank: all but the
    TP-split weights, the embedding, the head and the routed experts (folded over the stage: their gradients are
    reduced over the expert-data-parallel group by the optimizer, parallel/dims.py)."""
    from parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    whole = {id(m) for m in (getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)) if m is not None}
    whole |= {id(m) for m in model.modules() if isinstance(m, GroupedExperts)}
    out, seen = [], set()
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            split = name == "weight" and isinstance(module, (ColumnParallelLinear, RowParallelLinear))
            if p.requires_grad and not split and id(module) not in whole and id(p) not in seen:
                seen.add(id(p))
                out.append(f"{prefix}.{name}" if prefix else name)
    return out


def sp_placements(model: nn.Module) -> dict[str, Placement]:
    """The per-token parameters' placements: whole on every rank, but no copy on the TP peers (their gradients are
    partial sums over the rank's tokens, summed over the pipeline stage by ZeRO-1)."""
    return {name: Placement("replicated", tp_copies=False) for name in per_token_params(model)}


__all__ = ["SequenceComm", "SequenceParallel", "per_token_params", "sp_placements"]
