"""The training loss: the LM head and cross entropy over the vocabulary, optionally in token chunks.

``head_loss(h, weight, targets, chunk_tokens)``: mean cross entropy (float32) of ``h @ weight^T`` against
``targets``. With ``chunk_tokens = 0`` it forms the [tokens, vocab] logits (float32 for the log-softmax, which
autograd keeps for backward): Kimi K2's 163,840-token vocabulary makes that 2.7 GB per 4k-token sequence. With
``chunk_tokens > 0`` a custom autograd function runs the head and the log-softmax ``chunk_tokens`` rows at a time
and keeps only ``h`` (and the weight) for backward, where it recomputes each chunk's logits: at most one chunk of
logits exists at a time, at the price of the head GEMM once more. Both run the head GEMM in the autocast dtype
where autocast is on, else in the weight's dtype, and the softmax in float32, so they agree to rounding
(the weight gradient sums the chunks' GEMMs in float32, accumulated in place: no [vocab, dim] temporary per chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import autocast_off, gemm_dtype

AUTO_CHUNK_BYTES = 256 * 2**20  # chunk_tokens -1: chunks of at most this many bytes of float32 logits
# devices with ``out_dtype`` matmul kernels (torch 2.13: CUDA, and meta, whose shape and dtype rules let CPU tests
# check the call; not CPU)
OUT_DTYPE_MATMUL = ("cuda", "meta")
CAST_ROWS = 1024  # elsewhere: rows of the weight gradient's left operand cast to float32 at a time


def chunk_size(chunk_tokens: int, vocab: int) -> int:
    """Tokens per chunk: ``chunk_tokens``, or with -1 (automatic) as many as fit AUTO_CHUNK_BYTES of logits."""
    return max(1, AUTO_CHUNK_BYTES // (4 * vocab)) if chunk_tokens < 0 else chunk_tokens


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16 -> float32; float64 stays


def head_loss(h_BTD: torch.Tensor, weight_VD: torch.Tensor, targets_BT: torch.Tensor,
              chunk_tokens: int = 0) -> torch.Tensor:
    """Mean cross entropy (float32 scalar) of the logits ``h @ weight^T``; chunked when ``chunk_tokens != 0``."""
    h_ND, t_N = h_BTD.reshape(-1, h_BTD.shape[-1]), targets_BT.reshape(-1)
    if chunk_tokens == 0:
        logits = F.linear(h_ND, weight_VD)
        return F.cross_entropy(logits.to(_wide(logits.dtype)), t_N)
    return _ChunkedHeadCrossEntropy.apply(h_ND, weight_VD, t_N, chunk_size(chunk_tokens, weight_VD.shape[0]),
                                          gemm_dtype(weight_VD.device.type, weight_VD.dtype))


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, chunk: int, dtype: torch.dtype):
        ctx.save_for_backward(h_ND, w_VD, t_N)
        ctx.chunk, ctx.dtype = chunk, dtype
        total = torch.zeros((), dtype=_wide(dtype), device=h_ND.device)
        with autocast_off(h_ND.device.type):
            w = w_VD.to(dtype)
            for start in range(0, h_ND.shape[0], chunk):
                logits = (h_ND[start:start + chunk].to(dtype) @ w.T).to(total.dtype)
                t = t_N[start:start + chunk]
                total += (torch.logsumexp(logits, -1) - logits.gather(1, t[:, None])[:, 0]).sum()
        return total / h_ND.shape[0]

    @staticmethod
    def backward(ctx, grad):
        h_ND, w_VD, t_N = ctx.saved_tensors
        dtype, n = ctx.dtype, h_ND.shape[0]
        grad_h = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        wide = _wide(dtype)
        grad_w = torch.zeros(w_VD.shape, dtype=wide, device=w_VD.device) if ctx.needs_input_grad[1] else None
        with autocast_off(h_ND.device.type):
            w = w_VD.to(dtype)
            scale = grad.to(wide) / n
            for start in range(0, n, ctx.chunk):
                h = h_ND[start:start + ctx.chunk].to(dtype)
                t = t_N[start:start + ctx.chunk]
                probs = torch.softmax((h @ w.T).to(wide), -1)
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1
                g = (probs * scale).to(dtype)  # d loss / d logits of the chunk
                if grad_h is not None:
                    grad_h[start:start + ctx.chunk] = g @ w
                if grad_w is not None:
                    _add_product_(grad_w, g.T, h)
        return grad_h, (grad_w.to(w_VD.dtype) if grad_w is not None else None), None, None, None


def _add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in ``acc``'s dtype, in place: ``a`` and ``b`` in the compute dtype (bf16) and ``acc`` wider
    (float32), without an ``acc``-sized temporary and without rounding the product to the compute dtype first.
    On CUDA one bf16 GEMM accumulates into ``acc`` (``addmm`` with ``out_dtype``: float32 accumulation, cuBLAS's
    beta = 1; as Megatron's fused weight-gradient accumulation); elsewhere (``out_dtype`` matmuls are CUDA-only)
    the operands are cast exactly to ``acc``'s dtype, ``a`` a slice of ``CAST_ROWS`` rows at a time (so the
    working set is CUDA's). Both sum the same exact products in float32."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if acc.device.type in OUT_DTYPE_MATMUL:
        return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    b = b.to(acc.dtype)
    for start in range(0, a.shape[0], CAST_ROWS):
        acc[start:start + CAST_ROWS].addmm_(a[start:start + CAST_ROWS].to(acc.dtype), b)
    return acc
