"""Pure update math: the Muon direction, its RMS-matching scale, and one AdamW step.

Formulation (same as ``torch.optim.Muon`` where both are defined):
    B <- lerp(B, g, 1 - mu)                       (momentum as an EMA)
    U <- lerp(g, B, mu) if nesterov else B        (Nesterov look-ahead)
    O <- NS_5(U)                                  (Newton–Schulz, per matrix)
    W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(A, B)) * O
The 0.2*sqrt(max(A, B)) factor ("match_rms_adamw", Moonlight / Kimi K2) gives the update the RMS of a typical
AdamW update, so Muon can share AdamW's learning rate and weight decay.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from muonclip.newton_schulz import CoefficientSpec, newton_schulz


def muon_scale(shape: Sequence[int]) -> float:
    """0.2 * sqrt(max(A, B)) for a matrix [A, B] or a stack [..., A, B] (each matrix scaled alike)."""
    if len(shape) < 2:
        raise ValueError(f"muon_scale needs a matrix shape (>= 2 dims), got {tuple(shape)}")
    A, B = shape[-2], shape[-1]
    return 0.2 * math.sqrt(max(A, B))


def muon_update(
    grad: Tensor,
    momentum_buf: Tensor,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    *,
    eps: float = 1e-7,
    ns_dtype: torch.dtype | None = torch.float32,
    coefficients: CoefficientSpec = "quintic",
    path: str = "standard",
) -> Tensor:
    """Advance ``momentum_buf`` in place and return the orthogonalised update (in ``ns_dtype``, unscaled).

    ``grad`` is [A, B] or a stack [E, A, B] (each of the E matrices orthogonalised on its own); more leading
    dimensions are flattened into the batch. ``coefficients``/``path``: see ``muonclip.newton_schulz``.
    """
    if grad.ndim < 2:
        raise ValueError(f"muon_update needs a >= 2-D gradient, got shape {tuple(grad.shape)}")
    return orthogonalize(muon_momentum_(grad, momentum_buf, momentum, nesterov), ns_steps, eps=eps, ns_dtype=ns_dtype,
                         coefficients=coefficients, path=path)


def muon_momentum_(grad: Tensor, momentum_buf: Tensor, momentum: float = 0.95, nesterov: bool = True) -> Tensor:
    """B <- lerp(B, g, 1 - mu) in place; return lerp(g, B, mu) (Nesterov) or B itself."""
    if grad.shape != momentum_buf.shape:
        raise ValueError(f"momentum buffer shape {tuple(momentum_buf.shape)} != gradient shape {tuple(grad.shape)}")
    momentum_buf.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buf, momentum) if nesterov else momentum_buf


def orthogonalize(update: Tensor, ns_steps: int = 5, *, eps: float = 1e-7,
                  ns_dtype: torch.dtype | None = torch.float32, coefficients: CoefficientSpec = "quintic",
                  path: str = "standard") -> Tensor:
    """Newton–Schulz per matrix of a [A, B] or [..., A, B] tensor (leading dims flattened into one batch)."""
    ns = dict(dtype=ns_dtype, coefficients=coefficients, path=path)
    if update.ndim > 3:
        return newton_schulz(update.flatten(0, -3), ns_steps, eps, **ns).reshape(update.shape)
    return newton_schulz(update, ns_steps, eps, **ns)


def apply_muon_update_(param: Tensor, update: Tensor, *, lr: float, weight_decay: float,
                       shape: Sequence[int] | None = None) -> None:
    """W <- W * (1 - lr * wd) - lr * muon_scale(shape) * update (decoupled weight decay).

    ``shape`` is the full matrix shape (defaults to ``param.shape``; pass the global shape for a local shard).
    """
    adjusted_lr = lr * muon_scale(param.shape if shape is None else shape)
    param.mul_(1 - lr * weight_decay)
    param.add_(update, alpha=-adjusted_lr)


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int | float,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step (decoupled weight decay, bias-corrected) applied in place; ``step`` counts from 1.

    Same op order as ``torch.optim.AdamW`` (single-tensor path), so both agree bit for bit.
    """
    beta1, beta2 = betas
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
