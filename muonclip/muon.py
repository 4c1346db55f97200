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
from muonclip.skip_nonfinite import APPLIES, Gate


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


def muon_momentum_(grad: Tensor, momentum_buf: Tensor, momentum: float = 0.95, nesterov: bool = True,
                   gate: Gate = APPLIES) -> Tensor:
    """B <- lerp(B, g, 1 - mu) in place; return lerp(g, B, mu) (Nesterov) or B itself. Where ``gate`` skips the
    step, ``grad`` must be zero (``Gate.zero_``) and mu is 1: B stays, the look-ahead is B (skip_nonfinite.py)."""
    if grad.shape != momentum_buf.shape:
        raise ValueError(f"momentum buffer shape {tuple(momentum_buf.shape)} != gradient shape {tuple(grad.shape)}")
    momentum_buf.lerp_(grad, gate.pick(1 - momentum, 0.0, momentum_buf))
    return grad.lerp(momentum_buf, gate.pick(momentum, 1.0, grad)) if nesterov else momentum_buf


def orthogonalize(update: Tensor, ns_steps: int = 5, *, eps: float = 1e-7,
                  ns_dtype: torch.dtype | None = torch.float32, coefficients: CoefficientSpec = "quintic",
                  path: str = "standard") -> Tensor:
    """Newton–Schulz per matrix of a [A, B] or [..., A, B] tensor (leading dims flattened into one batch)."""
    ns = dict(dtype=ns_dtype, coefficients=coefficients, path=path)
    if update.ndim > 3:
        return newton_schulz(update.flatten(0, -3), ns_steps, eps, **ns).reshape(update.shape)
    return newton_schulz(update, ns_steps, eps, **ns)


def apply_muon_update_(param: Tensor, update: Tensor, *, lr: float, weight_decay: float,
                       shape: Sequence[int] | None = None, gate: Gate = APPLIES) -> None:
    """W <- W * (1 - lr * wd) - lr * muon_scale(shape) * update (decoupled weight decay).

    ``shape`` is the full matrix shape (defaults to ``param.shape``; pass the global shape for a local shard). Where
    ``gate`` skips the step, ``update`` (a temporary of the step) is zeroed in place and the decay factor is 1:
    W * 1 + (-a) * 0 = W bit for bit (skip_nonfinite.py).
    """
    adjusted_lr = lr * muon_scale(param.shape if shape is None else shape)
    gate.zero_(update)
    param.mul_(gate.pick(1 - lr * weight_decay, 1.0, param))
    param.add_(update, alpha=-adjusted_lr)


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int | float | Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    gate: Gate = APPLIES,
) -> None:
    """One AdamW step (decoupled weight decay, bias-corrected) applied in place; ``step`` counts from 1.

    The same arithmetic as ``torch.optim.AdamW`` (single-tensor path), so both agree bit for bit on CPU (tested).
    """
    adamw_moments_(grad, exp_avg, exp_avg_sq, betas, gate)
    adamw_apply_(param, exp_avg, exp_avg_sq, step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gate=gate)


def adamw_moments_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, betas: tuple[float, float],
                   gate: Gate = APPLIES) -> None:
    """AdamW's first and second moments, advanced in place. Where ``gate`` skips the step, ``grad`` must be zero
    (``Gate.zero_``) and the betas are 1: both moments stay (skip_nonfinite.py)."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, gate.pick(1 - beta1, 0.0, exp_avg))
    exp_avg_sq.mul_(gate.pick(beta2, 1.0, exp_avg_sq)).addcmul_(grad, grad, value=1 - beta2)


def adamw_apply_(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | float | Tensor, *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, gate: Gate = APPLIES,
                 scratch: Tensor | None = None) -> None:
    """W <- W * (1 - lr * wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), from the advanced moments.

    Temporaries: the denominator (one tensor of ``exp_avg``'s size, divided and shifted in place) and the update,
    computed in ``scratch`` where given (a tensor of ``exp_avg``'s shape and dtype the caller has no more use for,
    e.g. the spent gradient: ZeRO-1's bucket slice), else in a second temporary.

    ``step`` may be a 0-dim tensor (the optimizers keep their counters on the device, so a skipped step is decided
    there: muonclip/skip_nonfinite.py): the bias corrections are computed there in float64, as Python computes them
    from a number, and enter the float32 arithmetic rounded as a Python scalar would be (equal bits on CPU). Where
    ``gate`` skips the step, the decay factor is 1, lr 0 and eps 1, the bias corrections are taken at max(step, 1)
    (1 - beta**0 = 0 would divide by zero): the update is a finite +-0.
    """
    beta1, beta2 = betas
    if weight_decay != 0:
        param.mul_(gate.pick(1 - lr * weight_decay, 1.0, param))
    step_t = torch.as_tensor(step, dtype=torch.float64, device=exp_avg.device).clamp(min=1)
    step_size = (1 - beta1**step_t).reciprocal() * gate.pick(lr, 0.0, exp_avg, torch.float64)  # = lr / bc1 as torch
    denom = exp_avg_sq.sqrt()  # then in place: torch's (sqrt(v) / sqrt(bc2)) + eps, without a second temporary
    denom.div_((1 - beta2**step_t).sqrt()).add_(gate.pick(eps, 1.0, exp_avg_sq))
    update = exp_avg * -step_size if scratch is None else torch.mul(exp_avg, -step_size, out=scratch)
    param.add_(update.div_(denom))  # addcdiv_'s value must be a number: value * m / d, its order
