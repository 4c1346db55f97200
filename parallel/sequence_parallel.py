"""Sequence parallelism (``parallel.sequence_parallel``, Megatron's ``--sequence-parallel``): outside the
tensor-parallel regions each rank of a ``tp_group`` holds 1/tp of every sequence.

Rank t of the TP group holds tokens ``[t*T/tp, (t+1)*T/tp)`` of each sequence of its micro batch (under context
parallelism, of its CP chunk: rank (c, t) holds ``[(c*tp + t)*T/(cp*tp), ...)``). The residual stream between
blocks, the norms and what they keep for backward, MLA's down projections and latent norms, the routers and the
routed experts are ``[B, T/tp, ...]``: each token is routed once (at ep 1 a rank's experts see its own tokens only,
where without sequence parallelism every TP rank ran the same tokens through them). The loader is unchanged: TP
peers read the same ids and the embedding's output is cut (``split``). A pipeline stage sends ``[B, T/tp, D]``.

The TP regions (parallel/tensor_parallel.py) enter and leave through this module's collectives instead of
``copy_to_tp`` / ``reduce_from_tp``:

| where | forward | backward |
|---|---|---|
| column region entry (1) | all-gather | reduce-scatter |
| row region exit: ``o_proj``, ``down_proj`` | reduce-scatter | all-gather |
| embedding output | own part | all-gather |
| LM head input (logits and the loss: the head stays whole, the loss is the same on TP peers) | all-gather | own part |

(1) MHA's q/k/v input; MLA's latents, q's, kv's and the shared rotary key packed into one (``q_proj``'s input
without q compression); the dense FFN's and the shared experts' input.

An all-gather and a reduce-scatter each send (tp-1)/tp of the whole tensor, so a region costs the bytes of TP's
all-reduce. Attention's inputs are gathered in sequence order (``[B, T, F]``: a layout copy per collective when
B > 1); the token-local FFNs gather rows (``[tp * B * T/tp, D]``, rank-major: no copy at any B). Every collective
goes through ``SequenceComm``, which counts the bytes each sends (``bytes_sent``, CountingComm's convention); the
object is ``model.sequence_parallel``.

Gradients: a parameter each TP rank holds whole but applies to its own tokens only (norms, routers, MLA's
``q_a_proj``/``kv_a_proj_with_mqa`` and latent norms, row-parallel biases, the routed experts at ep 1) gets those
tokens' gradient; it is summed over the TP group (Megatron's ``finalize_model_grads`` all-reduce of its
``sequence_parallel`` weights) by a hook on the gradient autograd hands the parameter, BEFORE it accumulates into
``.grad``: each micro batch's contribution is summed as it arrives, so the result is exact under gradient
accumulation, pipeline schedules (torch also runs such a hook in ``autograd.grad``, which the zero-bubble
schedules' weight passes use; tested with 1f1b) and ZeRO-1's post-accumulate-grad bucket hooks, which then see the
summed gradient (a hook after accumulation would add earlier micro batches' sums again, and bf16 gradients leave
``.grad`` for a float32 bucket at every micro batch). The sum runs in float32 (low-precision gradients are widened
for it). Megatron sums once per step after the last micro batch; this costs one all-reduce of those gradients per
micro batch. Summing them in ZeRO-1's buckets instead, one reduce over the whole stage per step with their optimizer
state sharded dp x cp x tp ways (design note, issue #27), needs the optimizer to know them and is left for later.
The hooks are (re)attached at each forward to the parameter objects the model then holds (sharded initialisation
allocates new ones after ``parallelize``). The embedding (whole lookup, then ``split``) and the head (gathered
input, ``split`` backward) get their full gradient on every rank and need no sum.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from models import MLAttention


class SequenceComm:
    """All-gather / reduce-scatter / all-reduce over one TP group, counting the bytes this rank sends
    (``bytes_sent``: all-gather and reduce-scatter (G-1)/G of the whole tensor, all-reduce 2(G-1)/G)."""

    def __init__(self, group: Any, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.bytes_sent: dict[str, int] = defaultdict(int)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[...] on each rank -> [G, ...] in rank order."""
        out = x.new_empty((self.size * x.shape[0],) + tuple(x.shape[1:]))  # gloo takes the parts along dim 0
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        self.bytes_sent["sp_all_gather"] += (self.size - 1) * x.numel() * x.element_size()
        return out.view((self.size,) + tuple(x.shape))

    def reduce_scatter(self, x_G: torch.Tensor) -> torch.Tensor:
        """[G, ...] on each rank -> this rank's [...] of the sum."""
        out = x_G.new_empty(tuple(x_G.shape[1:]))
        dist.reduce_scatter_tensor(out, x_G.contiguous().flatten(0, 1), group=self.group)
        self.bytes_sent["sp_reduce_scatter"] += (self.size - 1) * out.numel() * out.element_size()
        return out

    def all_reduce_(self, t: torch.Tensor, key: str) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        self.bytes_sent[key] += 2 * (self.size - 1) * t.numel() * t.element_size() // self.size
        return t


# the sequence (or row) dimension is -2 everywhere: [B, T, F] (attention) or [rows, F] (token-local regions)
def _parts(x: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n*t, F] -> [n, ..., t, F]: the parts in rank order, each contiguous."""
    return x.unflatten(-2, (n, -1)).movedim(-3, 0).contiguous()


def _joined(x_G: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_parts``: [n, ..., t, F] -> [..., n*t, F] (a view for rows or B = 1)."""
    return x_G.movedim(0, -3).flatten(-3, -2)


def _own(x: torch.Tensor, comm: SequenceComm) -> torch.Tensor:
    return x.unflatten(-2, (comm.size, -1)).select(-3, comm.rank).contiguous()


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim -2; backward reduce-scatters (the consumer holds a column shard: partial gradients)
    or, with ``split_grad``, takes this rank's part (the consumer is replicated: every rank has the whole
    gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: SequenceComm, split_grad: bool) -> torch.Tensor:
        ctx.comm, ctx.split_grad = comm, split_grad
        return _joined(comm.all_gather(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        comm = ctx.comm
        return (_own(grad, comm) if ctx.split_grad else comm.reduce_scatter(_parts(grad, comm.size))), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    """Sum over the group and keep this rank's part along dim -2; backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: SequenceComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.reduce_scatter(_parts(x, comm.size))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _joined(ctx.comm.all_gather(grad)), None


class _SplitSeq(torch.autograd.Function):
    """This rank's part along dim -2; backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: SequenceComm) -> torch.Tensor:
        ctx.comm = comm
        return _own(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _joined(ctx.comm.all_gather(grad)), None


class SequenceParallel:
    """The collectives of one TP group's sequence split, and the TP regions' entries and exits built from them
    (what ``apply_tensor_parallel`` calls under sequence parallelism)."""

    def __init__(self, group: Any, size: int, rank: int):
        self.comm = SequenceComm(group, size, rank)

    def gather(self, x: torch.Tensor, split_grad: bool = False) -> torch.Tensor:
        return _GatherSeq.apply(x, self.comm, split_grad)

    def gather_for_gemms(self, x: torch.Tensor, split_grad: bool = False) -> torch.Tensor:
        """``gather`` of what only autocast's GEMMs read: under autocast (bf16 compute, float32 parameters) in the
        compute dtype, which they read anyway (a norm's float32 output would move twice the bytes; Megatron gathers
        bf16 too, and its gradient's reduce-scatter sums in bf16). The head's GEMMs too (models/loss.py: the
        autocast dtype where autocast is on; its input gradient is that GEMM's bf16 product either way)."""
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return self.gather(x, split_grad)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceScatterSeq.apply(x, self.comm)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return _SplitSeq.apply(x, self.comm)

    # ---------------------------------------------------------------- TP regions' entries
    def enter_sequence(self, module: nn.Module, name: str) -> None:
        """``module.<name>(x, ...)`` gets ``x`` gathered in sequence order (MHA's ``_qkv``; a column linear)."""
        method = getattr(module, name)

        def gathered(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return method(self.gather_for_gemms(x), *args, **kwargs)

        setattr(module, name, gathered)

    def enter_rows(self, ffn: nn.Module) -> None:
        """A token-local region (dense FFN, shared experts): its input's rows gathered rank-major, its output (the
        row-parallel ``down_proj``'s reduce-scatter) back in the input's shape."""
        forward = ffn.forward

        def gathered(x: torch.Tensor) -> torch.Tensor:
            return forward(self.gather_for_gemms(x.reshape(-1, x.shape[-1]))).view(x.shape)

        ffn.forward = gathered

    def enter_latents(self, attn: MLAttention) -> None:
        """MLA: ``qkv_up``'s local latents (q's with q compression, kv's, the shared rotary key) gathered in ONE
        collective, packed along features; without q compression ``q_proj`` gathered its own input."""
        qkv_up, q_local = attn.qkv_up, hasattr(attn, "q_b_proj")

        def gathered(q_in: torch.Tensor, kv_c: torch.Tensor, k_rope: torch.Tensor, *positions: torch.Tensor):
            local = [q_in, kv_c, k_rope] if q_local else [kv_c, k_rope]
            whole = self.gather_for_gemms(torch.cat(local, -1)).split([t.shape[-1] for t in local], -1)
            whole = [w.to(t.dtype) for w, t in zip(whole, local)]
            return qkv_up(*(whole if q_local else [q_in, *whole]), *positions)

        attn.qkv_up = gathered
        if not q_local:
            self.enter_sequence(attn.q_proj, "forward")


def per_token_params(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every trainable parameter applied to this rank's tokens only: all but the TP-split
    weights, the embedding and the head."""
    from parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    whole = {id(m) for m in (getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)) if m is not None}
    out, seen = [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            split = name == "weight" and isinstance(module, (ColumnParallelLinear, RowParallelLinear))
            if p.requires_grad and not split and id(module) not in whole and id(p) not in seen:
                seen.add(id(p))
                out.append((module, name))
    return out


def _grad_sum_hooks(params: list[tuple[nn.Module, str]], comm: SequenceComm) -> Callable:
    """A forward pre-hook attaching ``sum over TP`` to each gradient of the parameters the modules hold now."""
    hooked: dict[int, weakref.ref] = {}  # id -> the parameter (tensors compare elementwise: no WeakSet)

    def summed(grad: torch.Tensor) -> torch.Tensor:
        wide = grad.to(torch.promote_types(grad.dtype, torch.float32), memory_format=torch.contiguous_format,
                       copy=True)  # a new tensor: a hook must not change the gradient it is handed
        return comm.all_reduce_(wide, "sp_grad_all_reduce").to(grad.dtype)

    def attach(*_: Any) -> None:
        for module, name in params:
            p = getattr(module, name)
            known = hooked.get(id(p))
            if known is None or known() is not p:
                p.register_hook(summed)
                hooked[id(p)] = weakref.ref(p)

    return attach


def apply_sequence_parallel(model: nn.Module, seq: SequenceParallel) -> SequenceParallel:
    """The parts of sequence parallelism outside the TP regions, on a model ``apply_tensor_parallel(..., seq)``
    split: the embedding's output cut to this rank's part, the head's input gathered (logits and ``head_loss``,
    which a pipeline's last stage calls as its loss), the per-token parameters' gradients summed over TP. Returns
    ``seq`` (its ``comm`` counts the bytes)."""
    if getattr(model, "embed_tokens", None) is not None:
        model.embed_tokens.register_forward_hook(lambda module, args, out: seq.split(out))
    if getattr(model, "lm_head", None) is not None:
        model.lm_head.register_forward_pre_hook(
            lambda module, args: (seq.gather_for_gemms(args[0], split_grad=True),))
        head_loss = model.head_loss

        def gathered_head_loss(h_BTD: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
            return head_loss(seq.gather_for_gemms(h_BTD, split_grad=True), targets_BT)

        model.head_loss = gathered_head_loss
    model.register_forward_pre_hook(_grad_sum_hooks(per_token_params(model), seq.comm))
    return seq


__all__ = ["SequenceComm", "SequenceParallel", "apply_sequence_parallel", "per_token_params"]
