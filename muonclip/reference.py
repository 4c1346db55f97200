"""Slow, obviously-correct references for tests: one matrix / one head at a time, in float64, textbook formulas.

Nothing here is used on the training path; ``tests/test_muon.py`` and ``tests/test_qk_clip.py`` check that the
fast implementations agree with these.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from muonclip.newton_schulz import NS_COEFFICIENTS


def reference_newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7,
                            coefficients: Any = NS_COEFFICIENTS) -> Tensor:
    """X <- a X + b (X X^T) X + c (X X^T)^2 X from X = G / max(||G||_F, eps), per matrix, float64.
    ``coefficients``: one (a, b, c) for every step, or a list with one per step (the last repeats)."""
    if G.ndim == 3:
        return torch.stack([reference_newton_schulz(g, steps, eps, coefficients) for g in G])
    per_step = [coefficients] if isinstance(coefficients[0], (int, float)) else list(coefficients)
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / max(math.sqrt((X * X).sum().item()), eps)
    for k in range(steps):
        a, b, c = per_step[min(k, len(per_step) - 1)]
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    return X.T if tall else X


def reference_muon_step(param: Tensor, grad: Tensor, buf: Tensor, *, lr: float, momentum: float, nesterov: bool,
                        weight_decay: float, ns_steps: int = 5) -> tuple[Tensor, Tensor]:
    """One Muon step on a [A, B] matrix or an [E, A, B] stack, matrix by matrix. Returns (new param, new buf)."""
    if param.ndim == 3:
        outs = [reference_muon_step(p, g, b, lr=lr, momentum=momentum, nesterov=nesterov,
                                    weight_decay=weight_decay, ns_steps=ns_steps) for p, g, b in zip(param, grad, buf)]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    p, g, b = param.double(), grad.double(), buf.double()
    b = momentum * b + (1 - momentum) * g
    u = (1 - momentum) * g + momentum * b if nesterov else b
    o = reference_newton_schulz(u, ns_steps)
    rows, cols = p.shape
    p = p * (1 - lr * weight_decay) - lr * 0.2 * math.sqrt(max(rows, cols)) * o
    return p, b


def reference_adamw_step(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: int, *, lr: float,
                         betas: tuple[float, float], eps: float, weight_decay: float) -> tuple[Tensor, Tensor, Tensor]:
    """Textbook AdamW (decoupled decay, bias-corrected); ``step`` counts from 1. Returns (param, m, v)."""
    b1, b2 = betas
    p, g = param.double(), grad.double()
    p = p * (1 - lr * weight_decay)
    m = b1 * m.double() + (1 - b1) * g
    v = b2 * v.double() + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


class ReferenceMuonClip:
    """Float64 loop version of ``MuonClip.step`` over the same param groups (params updated in place)."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.1, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_eps: float = 1e-8) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        adamw_betas=adamw_betas, adamw_eps=adamw_eps)
        self.groups = [{**defaults, **g} for g in groups]
        self.state: dict[int, dict[str, Any]] = {}

    @torch.no_grad()
    def step(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state.setdefault(id(p), {})
                if g["use_muon"]:
                    buf = st.get("buf", torch.zeros_like(p, dtype=torch.float64))
                    new_p, st["buf"] = reference_muon_step(p, p.grad, buf, lr=g["lr"], momentum=g["momentum"],
                                                           nesterov=g["nesterov"], weight_decay=g["weight_decay"],
                                                           ns_steps=g["ns_steps"])
                else:
                    st["step"] = st.get("step", 0) + 1
                    m = st.get("m", torch.zeros_like(p, dtype=torch.float64))
                    v = st.get("v", torch.zeros_like(p, dtype=torch.float64))
                    new_p, st["m"], st["v"] = reference_adamw_step(
                        p, p.grad, m, v, st["step"], lr=g["lr"], betas=g["adamw_betas"], eps=g["adamw_eps"],
                        weight_decay=g["weight_decay"])
                p.copy_(new_p)


def reference_qk_clip(specs: list[dict[str, Any]], tau: float) -> list[dict[str, Tensor]]:
    """Clipped copies of each layer's weights ({"q_weight": ..., "k_weight"/"kv_b_weight": ...}), head by head."""
    out = []
    for spec in specs:
        H = spec["n_heads"]
        if spec["kind"] == "mha":
            new = {"q_weight": spec["q_weight"].detach().double().clone(),
                   "k_weight": spec["k_weight"].detach().double().clone()}
        else:
            new = {"q_weight": spec["q_weight"].detach().double().clone(),
                   "kv_b_weight": spec["kv_b_weight"].detach().double().clone()}
        for h in range(H):
            s_max = float(spec["max_logits"][h])
            if not s_max > tau:
                continue
            gamma = tau / s_max
            if spec["kind"] == "mha":
                hd, Hkv = spec["head_dim"], spec["n_kv_heads"]
                q_rows = slice(h * hd, (h + 1) * hd)
                if Hkv == H:
                    new["q_weight"][q_rows] *= math.sqrt(gamma)
                    new["k_weight"][q_rows] *= math.sqrt(gamma)
                else:
                    new["q_weight"][q_rows] *= gamma
            else:
                dn, dr, dv = spec["qk_nope_head_dim"], spec["qk_rope_head_dim"], spec["v_head_dim"]
                q0, k0 = h * (dn + dr), h * (dn + dv)
                new["q_weight"][q0:q0 + dn] *= math.sqrt(gamma)
                new["q_weight"][q0 + dn:q0 + dn + dr] *= gamma
                new["kv_b_weight"][k0:k0 + dn] *= math.sqrt(gamma)
        out.append(new)
    return out
