"""Newton–Schulz orthogonalisation (pure function, 2-D and batched 3-D).

Given G = U S V^T, the iteration X <- a X + b (X X^T) X + c (X X^T)^2 X applied to X_0 = G / ||G||_F keeps
U and V and maps every singular value s through the same odd scalar polynomial. The quintic coefficients
(3.4445, -4.7750, 2.0315) maximise the slope at zero, so after 5 steps singular values land in a band around 1
(about [0.68, 1.13]) rather than exactly at 1; that is the Muon update direction "approximately U V^T".

The op sequence (gram matrix, addmm/baddbmm, Frobenius normalisation with eps clamp, transpose when A > C)
mirrors ``torch.optim.Muon`` so that both give the same numbers when run in the same dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    *,
    dtype: torch.dtype | None = torch.float32,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> Tensor:
    """Approximate orthogonal factor of ``G`` ([A, C] or a batch [B, A, C], one matrix per leading index).

    ``dtype`` is the compute dtype (float32 default; bfloat16 is the usual fast choice on GPUs; float64 for
    references; None keeps G's dtype). The result is returned in the compute dtype; ``G`` is never modified.
    Each matrix is normalised by its own Frobenius norm (clamped below at ``eps``), so an all-zero matrix maps
    to zeros.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz expects a 2-D matrix or a 3-D batch of matrices, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"newton_schulz steps must be >= 0, got {steps}")
    if len(coefficients) != 3:
        raise ValueError(f"newton_schulz needs 3 coefficients (a, b, c), got {coefficients!r}")
    dtype = G.dtype if dtype is None else dtype
    if dtype not in NS_DTYPES:
        raise ValueError(f"newton_schulz compute dtype must be one of {NS_DTYPES}, got {dtype}")
    a, b, c = coefficients
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the smaller gram matrix
        X = X.mT
    if X.ndim == 2:
        X = X / X.norm().clamp(min=eps)
        for _ in range(steps):
            gram = X @ X.mT
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            X = torch.addmm(X, poly, X, beta=a)
    else:
        X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = X @ X.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            X = torch.baddbmm(X, poly, X, beta=a)
    return X.mT if transposed else X
