"""Building blocks: RMSNorm, interleaved RoPE (optionally YaRN-scaled), SwiGLU FFN, causal max-logit probe."""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .init import ONES, InitRule, init_module_, normal


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Statistics in >= float32; the output in the narrower of the input's and the weight's dtypes, so a
        float32 residual stream (``fp32_residual``) still feeds bf16 into the bf16 projections after it."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> float32; float64 stays
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out_dtype = min(x.dtype, self.weight.dtype, key=lambda dt: dt.itemsize)
        return self.weight * xf.to(out_dtype)

    def init_rules(self) -> dict[str, InitRule]:
        return {"weight": ONES}

    def init_weights(self) -> None:
        init_module_(self, self.init_rules())


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling (Peng et al. 2023, arXiv:2309.00071), as DeepSeek-V3 / Kimi K2 configure it.

    Frequencies: dimensions that rotate fewer than ``beta_slow`` times over ``original_max_seq_len`` positions
    are interpolated (divided by ``factor``), those rotating more than ``beta_fast`` times are kept, with a
    linear ramp between (the ramp ends rounded outwards to whole dimensions). cos/sin are multiplied by
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (``mscale(factor)`` when either is 0), and the
    attention softmax scale by ``mscale(factor, mscale_all_dim) ** 2`` when ``mscale_all_dim`` is set: the logit
    scale QK-Clip measures and clips includes it. mscale(s, m) = 0.1 m ln(s) + 1 (1 for s <= 1).
    """

    factor: float
    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "Yarn | None":
        if cfg.yarn_factor <= 1.0:
            return None
        return cls(cfg.yarn_factor, cfg.yarn_original_max_seq_len, cfg.yarn_beta_fast, cfg.yarn_beta_slow,
                   cfg.yarn_mscale, cfg.yarn_mscale_all_dim)

    @staticmethod
    def magnitude(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        if self.mscale and self.mscale_all_dim:
            return self.magnitude(self.factor, self.mscale) / self.magnitude(self.factor, self.mscale_all_dim)
        return self.magnitude(self.factor)

    @property
    def softmax_scale(self) -> float:
        return self.magnitude(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    def inv_freq(self, dim: int, theta: float, device) -> torch.Tensor:
        def dim_rotating(n_rotations: float) -> float:  # the dimension that turns n times over the context
            return dim * math.log(self.original_max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dim_rotating(self.beta_fast)), 0)
        high = min(math.ceil(dim_rotating(self.beta_slow)), dim - 1)
        high = high if high != low else high + 0.001
        ramp_F = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        base_F = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        keep_F = 1 - ramp_F  # 1: extrapolate (high frequencies), 0: interpolate
        return (1.0 / (self.factor * base_F)) * (1 - keep_F) + (1.0 / base_F) * keep_F


def rope_cos_sin(seq_len: int, dim: int, theta: float, device, dtype=torch.float32, yarn: Yarn | None = None,
                 positions_BT: torch.Tensor | None = None):
    """cos/sin of shape [T, dim/2] for rotating adjacent pairs (x[2i], x[2i+1]); YaRN-scaled with ``yarn``. With
    ``positions_BT`` (each token's position, e.g. restarting per document): [B, 1, T, dim/2]."""
    if yarn is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
        scale = 1.0
    else:
        inv_freq, scale = yarn.inv_freq(dim, theta, device), yarn.cos_sin_scale
    if positions_BT is not None:
        angles = (positions_BT.float()[..., None] * inv_freq).unsqueeze(1)  # the same products as torch.outer
    else:
        angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def document_positions(segments_BT: torch.Tensor) -> torch.Tensor:
    """Each token's position in its own document of a packed sample: t minus the index of its document's first
    token (``segments_BT``: the document index of each token, non-decreasing along T). No host sync."""
    seg = segments_BT.contiguous()
    start_BT = torch.searchsorted(seg, seg)  # first index holding the same document
    return torch.arange(seg.shape[-1], device=seg.device) - start_BT


def document_causal_mask(segments_BT: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True where query t may attend key s: s <= t within the same document."""
    T = segments_BT.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments_BT.device).tril()
    return (segments_BT[:, None, :, None] == segments_BT[:, None, None, :]) & causal


def apply_rope(x_BHTd: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim (DeepSeek layout; HF ``rope_interleave=True``)."""
    x_even, x_odd = x_BHTd[..., 0::2], x_BHTd[..., 1::2]
    out_even = x_even * cos_TF - x_odd * sin_TF
    out_odd = x_even * sin_TF + x_odd * cos_TF
    return torch.stack((out_even, out_odd), dim=-1).flatten(-2)


def autocast_off(device_type: str):
    """Autocast disabled (for a float32 computation under bf16 autocast); nothing to disable on meta tensors (the
    memory planner runs the model on them), which autocast does not know."""
    return nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


def gemm_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype autocast runs GEMMs in where it is on, else ``default`` (for ops autocast does not cover, e.g.
    ``grouped_mm``, or that run with autocast off and cast themselves)."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). ``act`` is the SwiGLU itself (a region memory techniques wrap:
    parallel/regions.py)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)

    def init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        return {"gate_proj.weight": normal(std), "up_proj.weight": normal(std), "down_proj.weight": normal(out_std)}

    def init_weights(self, std: float, out_std: float) -> None:
        init_module_(self, self.init_rules(std, out_std))


@torch.no_grad()
def causal_max_logits(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, scale: float, chunk: int = 512,
                      segments_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head max over batch and causal (query, key) pairs of scale * q.k, shape [H], float32; with
    ``segments_BT`` (document masking) only over pairs within one document: exactly the logits softmax sees.

    Computed in query chunks so memory stays O(chunk * T) whatever kernel the attention itself uses, in float32
    also under autocast (which would run the matmul in bf16: QK-Clip would then clip to tau within ~0.5%).
    """
    B, H, T, _ = q_BHTd.shape
    out_H = torch.full((H,), float("-inf"), device=q_BHTd.device, dtype=torch.float32)
    if q_BHTd.is_meta:  # shapes only (the memory planner runs the model on meta tensors): nothing to measure
        return out_H
    key_pos = torch.arange(T, device=q_BHTd.device)
    for start in range(0, T, chunk):
        q_chunk = q_BHTd[:, :, start:start + chunk].float()
        with autocast_off(q_BHTd.device.type):
            s_BHCT = torch.matmul(q_chunk, k_BHTd.float().transpose(-1, -2)) * scale
        q_pos = torch.arange(start, start + q_chunk.shape[2], device=q_BHTd.device)
        hidden = key_pos[None, :] > q_pos[:, None]
        if segments_BT is not None:  # [B, 1, C, T]: another document's keys
            hidden = hidden | (segments_BT[:, None, start:start + q_chunk.shape[2], None]
                               != segments_BT[:, None, None, :])
        s_BHCT = s_BHCT.masked_fill(hidden, float("-inf"))
        out_H = torch.maximum(out_H, s_BHCT.amax(dim=(0, 2, 3)))
    return out_H
