"""Newton–Schulz orthogonalisation (pure function, 2-D and batched 3-D): coefficient schedules and two paths.

Given G = U S V^T, the iteration X <- a X + b (X X^T) X + c (X X^T)^2 X applied to X_0 = G / ||G||_F keeps
U and V and maps every singular value s through the same odd scalar polynomial p(s) = a s + b s^3 + c s^5.

Coefficient schedules (``coefficients``: a name, one (a, b, c) used at every step, or one per step; past the end
of a schedule its last triple repeats):

- ``quintic``: (3.4445, -4.7750, 2.0315) at every step, Keller Jordan's Muon coefficients ("Muon: An optimizer
  for hidden layers in neural networks", kellerjordan.github.io/posts/muon, 2024). They maximise the slope at
  zero, so after 5 steps singular values land in a band around 1 (about [0.68, 1.13]), not at 1.
- ``polar_express``: one triple per step from Amsel, Persson, Musco and Gower, "The Polar Express: Optimal
  Matrix Sign Methods and Their Application to the Muon Algorithm" (arXiv:2505.16932, 2025), computed there
  for 5 iterations with safety factor 2e-2 and cushion 2: each step is the minimax-optimal odd quintic for the
  interval of singular values the previous steps leave, so 5 steps bring them much closer to 1.

Paths (``path``), for a matrix [A, C] with A <= C (the transpose is taken when A > C):

- ``standard``: the iteration above on X; per step 4 A^2 C + 2 A^3 multiply-adds x 2 (X X^T, its square, the
  product with X).
- ``gram``: iterate on the A x A Gram matrix only. With M_k = X_k X_k^T and P_k = a I + b M_k + c M_k^2,
  X_{k+1} = P_k X_k, so X_n = Q_n X_0 with Q_n = P_{n-1} ... P_0, and M_{k+1} = P_k^2 M_k (P_k is a polynomial
  in M_k, so they commute). X_0 is touched twice (M_0 and the final Q_n X_0): 4 A^2 C + (8 n - 6) A^3 in all.
  Cheaper when C > 1.5 A (n = 5); in exact arithmetic identical to ``standard``.
  It is less stable: rounding errors in M (which should be positive semi-definite) are multiplied by every
  P_k, where the standard path recomputes X X^T from X each step. Measured on matrices with singular values
  spread over 1e4 (like low-rank momentum), relative error against float64: float32 standard 5e-6, float32 gram
  1e-4 to 1e-3; in bfloat16 gram diverges (errors of 1 to 1e21), so gram runs in float32/float64 only.
- ``auto``: the path with fewer FLOPs by that model (``ns_flops``), per shape; always standard in bfloat16.

The standard path's op sequence (gram matrix, addmm/baddbmm, Frobenius normalisation with eps clamp,
transpose when A > C) mirrors ``torch.optim.Muon`` so that both give the same numbers in the same dtype.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]
NS_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)
NS_SCHEDULES: dict[str, tuple[Coefficients, ...]] = {
    "quintic": (NS_COEFFICIENTS,),
    # arXiv:2505.16932 (Polar Express), num_iters=5, safety_factor=2e-2, cushion=2
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
NS_DTYPES = (torch.float64, torch.float32, torch.bfloat16)
NS_PATHS = ("auto", "standard", "gram")
CoefficientSpec = Union[str, Coefficients, Sequence[Coefficients]]


def ns_schedule(coefficients: CoefficientSpec, steps: int) -> list[Coefficients]:
    """The (a, b, c) of each of ``steps`` steps: a schedule name, one triple, or a per-step list (the last
    triple repeats past its end)."""
    if isinstance(coefficients, str):
        if coefficients not in NS_SCHEDULES:
            raise ValueError(f"unknown Newton-Schulz coefficients {coefficients!r}; choose from {sorted(NS_SCHEDULES)}")
        schedule = NS_SCHEDULES[coefficients]
    elif len(coefficients) and all(isinstance(x, (int, float)) for x in coefficients):
        schedule = (tuple(coefficients),)
    else:
        schedule = tuple(tuple(t) for t in coefficients)
    if not schedule or any(len(t) != 3 for t in schedule):
        raise ValueError(f"newton_schulz needs (a, b, c) triples, got {coefficients!r}")
    return [tuple(float(x) for x in schedule[min(k, len(schedule) - 1)]) for k in range(steps)]


def ns_flops(shape: Sequence[int], steps: int, path: str) -> int:
    """Multiply-add FLOPs (x 2) of one matrix of ``shape`` ([..., A, C]; per matrix) on ``path``."""
    A, C = sorted(shape[-2:])
    if path == "standard":
        return 2 * steps * (2 * A * A * C + A**3)
    if path == "gram":
        return 2 * (2 * A * A * C + max(4 * steps - 3, 0) * A**3) if steps else 0
    raise ValueError(f"ns_flops: path must be 'standard' or 'gram', got {path!r}")


def choose_path(shape: Sequence[int], steps: int, path: str = "auto", dtype: torch.dtype = torch.float32) -> str:
    """``path`` itself, or for ``auto`` the cheaper of standard and gram by ``ns_flops`` (standard in bfloat16)."""
    if path not in NS_PATHS:
        raise ValueError(f"Newton-Schulz path must be one of {NS_PATHS}, got {path!r}")
    low_precision = dtype not in (torch.float32, torch.float64)
    if path == "gram" and low_precision:
        raise ValueError(f"the gram Newton-Schulz path diverges in {dtype} (see muonclip/newton_schulz.py); use "
                         "float32 or the standard path")
    if path != "auto":
        return path
    if low_precision:
        return "standard"
    return "gram" if ns_flops(shape, steps, "gram") < ns_flops(shape, steps, "standard") else "standard"


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    *,
    dtype: torch.dtype | None = torch.float32,
    coefficients: CoefficientSpec = NS_COEFFICIENTS,
    path: str = "standard",
) -> Tensor:
    """Approximate orthogonal factor of ``G`` ([A, C] or a batch [B, A, C], one matrix per leading index).

    ``dtype`` is the compute dtype (float32 default; bfloat16 is the usual fast choice on GPUs; float64 for
    references; None keeps G's dtype). The result is returned in the compute dtype; ``G`` is never modified.
    Each matrix is normalised by its own Frobenius norm (clamped below at ``eps``), so an all-zero matrix maps
    to zeros. ``coefficients`` and ``path``: see the module docstring.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz expects a 2-D matrix or a 3-D batch of matrices, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"newton_schulz steps must be >= 0, got {steps}")
    schedule = ns_schedule(coefficients, steps)
    dtype = G.dtype if dtype is None else dtype
    if dtype not in NS_DTYPES:
        raise ValueError(f"newton_schulz compute dtype must be one of {NS_DTYPES}, got {dtype}")
    path = choose_path(G.shape, steps, path, dtype)
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the smaller gram matrix
        X = X.mT
    # the paths normalise themselves: no iterate outlives its step (a batched expert stack is large)
    X = _gram(X, schedule, eps) if path == "gram" else _standard(X, schedule, eps)
    return X.mT if transposed else X


def _normalized(X: Tensor, eps: float) -> Tensor:
    if X.ndim == 2:
        return X / X.norm().clamp(min=eps)
    return X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)


def _standard(X: Tensor, schedule: list[Coefficients], eps: float) -> Tensor:
    X = _normalized(X, eps)
    addmm = torch.addmm if X.ndim == 2 else torch.baddbmm
    for a, b, c in schedule:
        gram = X @ X.mT
        poly = addmm(gram, gram, gram, beta=b, alpha=c)
        X = addmm(X, poly, X, beta=a)
    return X


def _gram(X: Tensor, schedule: list[Coefficients], eps: float) -> Tensor:
    X = _normalized(X, eps)
    if not schedule:
        return X
    addmm = torch.addmm if X.ndim == 2 else torch.baddbmm
    M = X @ X.mT
    Q = None
    for k, (a, b, c) in enumerate(schedule):
        P = addmm(M, M, M, beta=b, alpha=c)  # b M + c M^2
        P.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I
        Q = P if Q is None else P @ Q
        if k < len(schedule) - 1:
            M = P @ (P @ M)
    return Q @ X
