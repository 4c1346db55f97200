"""Vocabulary parallelism (Megatron's VocabParallelEmbedding and vocab-parallel cross entropy), applied whenever
tp > 1: the embedding's and the LM head's rows are split over the TP group, rank t holding vocabulary rows
``[t*V/tp, (t+1)*V/tp)`` (``model.vocab_size % tp == 0``; no padding, so HF and DCP shapes stay the model's).

- Embedding (``embed_tokens.weight`` [V/tp, D]): ids outside the rank's rows look up row 0 and are zeroed, then the
  partial outputs are summed over TP: ``reduce_from_tp`` (an all-reduce), or under sequence parallelism ONE
  reduce-scatter that sums and keeps the rank's part of the sequence (backward: an all-gather). Exact in any dtype:
  each token has one non-zero term.
- Head (``lm_head.weight`` [V/tp, D]): a column region, its input entering by ``copy_to_tp`` (backward all-reduce)
  or sequence parallelism's ``column_region`` (all-gather, backward reduce-scatter; it keeps the local input and
  gathers it again in backward), in the GEMM's dtype under autocast. Logits
  (the model's forward without targets: evaluation) are gathered along the vocabulary, float32 [B, T, V] as
  before; the training loss (``model.head_loss``, which ``Transformer.forward`` and a pipeline's last stage call)
  never forms them on one rank.
- Loss (``_VocabParallelCrossEntropy``, models/loss.py's chunked head cross entropy with the vocabulary split):
  per chunk of ``model.loss_chunk_tokens`` tokens (0: one chunk of all tokens; -1: chunks sized from V/tp) the
  local logits [c, V/tp] in float32, one MAX all-reduce of the row maxima [c], one SUM all-reduce of [c, 2] packed
  (sum of exp(logit - max), the target's logit: non-zero on its owner only); it keeps the log-sum-exp per token.
  Backward recomputes each chunk's local logits (chunk 0 keeps the [N, V/tp] softmax instead, as Megatron does)
  and has no collective: the partial gradient of the head's input is summed by its entry's backward (all-reduce or
  reduce-scatter). Every TP rank gets the same loss.

The loss's all-reduces go through a ``SequenceComm`` (``model.vocab_parallel``; ``bytes_sent["ce_all_reduce"]``,
the planner's key); the embedding's and the head's entries are sequence parallelism's (counted there) or TP's.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.layers import autocast_off, gemm_dtype
from models.loss import _add_product_, _wide, chunk_size
from muonclip.placement import Placement
from parallel.sequence_parallel import SequenceComm, in_gemm_dtype
from parallel.tensor_parallel import copy_to_tp, reduce_from_tp


class _GatherVocab(torch.autograd.Function):
    """[..., V/tp] on each rank -> [..., V] in rank order; backward keeps this rank's columns."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: SequenceComm) -> torch.Tensor:
        ctx.comm = comm
        parts = comm.all_gather(x.movedim(-1, 0), key="vocab_all_gather")  # [G, V/tp, ...]
        return parts.movedim(1, -1).movedim(0, -2).flatten(-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = grad.shape[-1] // ctx.comm.size
        return grad[..., ctx.comm.rank * n:(ctx.comm.rank + 1) * n], None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of ``h @ w^T`` whose vocabulary rows are split over ``comm``'s group (``w``: rows
    ``[start, start + V/tp)``); ``keep_probs``: one chunk, its softmax kept for backward (else recomputed)."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, chunk: int, keep_probs: bool, dtype: torch.dtype, comm: SequenceComm,
                start: int):
        n, v = h_ND.shape[0], w_VD.shape[0]
        wide = _wide(dtype)
        local = t_N - start
        own = (local >= 0) & (local < v)
        local = local.clamp(0, v - 1)
        lse = torch.empty(n, dtype=wide, device=h_ND.device)
        total = torch.zeros((), dtype=wide, device=h_ND.device)
        probs = None
        with autocast_off(h_ND.device.type):
            w = w_VD.to(dtype)
            for s in range(0, n, chunk):
                logits = (h_ND[s:s + chunk].to(dtype) @ w.T).to(wide)  # [c, V/tp]
                top = logits.amax(-1)
                comm.all_reduce_(top, "ce_all_reduce", dist.ReduceOp.MAX)
                exp = torch.exp(logits - top[:, None])
                target = torch.where(own[s:s + chunk], logits.gather(1, local[s:s + chunk, None])[:, 0], 0)
                packed = torch.stack([exp.sum(-1), target], -1)  # [c, 2]
                comm.all_reduce_(packed, "ce_all_reduce")
                lse[s:s + chunk] = packed[:, 0].log() + top
                total += (lse[s:s + chunk] - packed[:, 1]).sum()
                if keep_probs:
                    probs = exp.div_(packed[:, :1])
        ctx.save_for_backward(h_ND, w_VD, local, own, lse, *([probs] if keep_probs else []))
        ctx.chunk, ctx.dtype = chunk, dtype
        return total / n

    @staticmethod
    def backward(ctx, grad):
        h_ND, w_VD, local, own, lse, *kept = ctx.saved_tensors
        dtype, n, chunk = ctx.dtype, h_ND.shape[0], ctx.chunk
        wide = _wide(dtype)
        grad_h = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w_VD.shape, dtype=wide, device=w_VD.device) if ctx.needs_input_grad[1] else None
        with autocast_off(h_ND.device.type):
            w = w_VD.to(dtype)
            scale = grad.to(wide) / n
            for s in range(0, n, chunk):
                h = h_ND[s:s + chunk].to(dtype)
                if kept:
                    g = kept[0] * scale
                else:
                    g = torch.exp((h @ w.T).to(wide) - lse[s:s + chunk, None]).mul_(scale)
                g.scatter_add_(1, local[s:s + chunk, None], (own[s:s + chunk].to(wide) * -scale)[:, None])
                g = g.to(dtype)  # d loss / d local logits of the chunk
                if grad_h is not None:
                    grad_h[s:s + chunk] = g @ w  # partial over the vocabulary: the head's entry sums it
                if grad_w is not None:
                    _add_product_(grad_w, g.T, h)
        return grad_h, (grad_w.to(w_VD.dtype) if grad_w is not None else None), None, None, None, None, None, None


class VocabParallelEmbedding(nn.Module):
    """Rows ``[rank*V/tp, (rank+1)*V/tp)`` of an ``nn.Embedding``; ``reduce`` sums the partial outputs."""

    def __init__(self, full: nn.Embedding, rank: int, size: int, reduce: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        n = full.num_embeddings // size
        self.weight = nn.Parameter(full.weight.detach()[rank * n:(rank + 1) * n].clone())
        self.num_embeddings, self.embedding_dim, self.start, self.reduce = n, full.embedding_dim, rank * n, reduce

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        own = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.reduce(out.masked_fill(~own[..., None], 0))


class VocabParallelHead(nn.Module):
    """Rows ``[rank*V/tp, (rank+1)*V/tp)`` of the LM head; ``region(h, fn)`` runs ``fn`` on its input brought
    into the TP region.
    ``forward``: float32 logits gathered along the vocabulary; ``loss``: the vocab-parallel cross entropy."""

    def __init__(self, full: nn.Linear, rank: int, size: int, comm: SequenceComm,
                 region: Callable[[torch.Tensor, Callable[[torch.Tensor], Any]], Any], chunk_tokens: int):
        super().__init__()
        n = full.out_features // size
        self.weight = nn.Parameter(full.weight.detach()[rank * n:(rank + 1) * n].clone())
        self.in_features, self.out_features, self.start = full.in_features, n, rank * n
        self.comm, self.region, self.chunk_tokens = comm, region, chunk_tokens

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = _GatherVocab.apply(self.region(h, lambda x: F.linear(x, self.weight)), self.comm)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def loss(self, h_BTD: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy (float32 scalar), the same on every TP rank; chunked as ``models.loss.head_loss``."""
        return self.region(h_BTD, lambda h: self._loss(h.reshape(-1, h.shape[-1]), targets_BT.reshape(-1)))

    def _loss(self, h_ND: torch.Tensor, t_N: torch.Tensor) -> torch.Tensor:
        keep = self.chunk_tokens == 0
        chunk = max(1, h_ND.shape[0]) if keep else chunk_size(self.chunk_tokens, self.out_features)
        return _VocabParallelCrossEntropy.apply(h_ND, self.weight, t_N, chunk, keep,
                                                gemm_dtype(self.weight.device.type, self.weight.dtype),
                                                self.comm, self.start)


def apply_vocab_parallel(model: nn.Module, tp_rank: int, tp_size: int, tp_group: Any, seq: Any = None
                         ) -> SequenceComm:
    """Split ``model``'s embedding and head (where this stage holds them) over the TP group and make its
    ``head_loss`` the vocab-parallel loss; ``seq``: sequence parallelism's ``SequenceParallel`` (its reduce-scatter
    leaves the embedding, its all-gather enters the head). Returns the loss's counting comm."""
    comm = SequenceComm(tp_group, tp_size, tp_rank)
    if getattr(model, "embed_tokens", None) is not None:
        reduce = seq.reduce_scatter if seq is not None else (lambda x: reduce_from_tp(x, tp_group))
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, tp_rank, tp_size, reduce)
    if getattr(model, "lm_head", None) is not None:
        region = seq.column_region if seq is not None else (lambda h, fn: fn(copy_to_tp(in_gemm_dtype(h), tp_group)))
        model.lm_head = VocabParallelHead(model.lm_head, tp_rank, tp_size, comm, region, model.cfg.loss_chunk_tokens)
        model.head_loss = model.lm_head.loss  # read by Transformer.forward and a pipeline's loss_fn
    return comm


def vocab_placements(model: nn.Module, tp_group: Any) -> dict[str, Placement]:
    """``tp_sharded`` (rows, Shard(0) over TP in checkpoints) placements of the split embedding and head."""
    return {f"{name}.weight": Placement("tp_sharded", shard_dim=0, tp_group=tp_group)
            for name in ("embed_tokens", "lm_head")
            if isinstance(getattr(model, name, None), (VocabParallelEmbedding, VocabParallelHead))}


__all__ = ["VocabParallelEmbedding", "VocabParallelHead", "apply_vocab_parallel", "vocab_placements"]
