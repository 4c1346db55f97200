"""Building blocks: RMSNorm, interleaved RoPE (optionally YaRN-scaled), SwiGLU FFN, causal max-logit probe."""
from __future__ import annotations

import bisect
import itertools
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


MAX_LOGIT_CHUNK = 512  # queries per block of the max-logit probe: its scores hold chunk x T floats at a time


def probe_spans(T: int, chunk: int = MAX_LOGIT_CHUNK) -> list[tuple[int, int]]:
    """The query blocks [start, end) of the max-logit probe; block [start, end) multiplies the keys [0, end) only
    (the keys after ``end`` are above the causal diagonal for all its queries)."""
    return [(start, min(start + chunk, T)) for start in range(0, T, chunk)]


def probe_pairs(T: int, chunk: int = MAX_LOGIT_CHUNK) -> int:
    """(query, key) products the probe forms per sequence and head: (n + 1) / 2n of T^2 for n whole blocks
    (what models/flops.py and the planner count)."""
    return sum((end - start) * end for start, end in probe_spans(T, chunk))


def _native_low_precision(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the probe multiplies bf16/fp16 q and k as they are, accumulating and writing float32
    (``bmm(..., out_dtype=float32)``: registered for CUDA and Meta, which stands in for CUDA in the planner and the
    tests, not for CPU)."""
    return q.device.type in ("cuda", "meta") and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype


def probe_operands(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q as [B*H, T, d] and k^T as [B*H, d, T], as the probe multiplies them: in their own bf16/fp16 on CUDA
    (``_native_low_precision``), else k converted to float32 here, once for all query blocks (each q block is
    converted by ``probe_logits``: the blocks are disjoint)."""
    B, H, T, d = q_BHTd.shape
    if not _native_low_precision(q_BHTd, k_BHTd):
        k_BHTd = k_BHTd.float()
    return q_BHTd.reshape(B * H, T, d), k_BHTd.reshape(B * H, T, d).transpose(1, 2)


def probe_logits(q_GCd: torch.Tensor, kT_GdK: torch.Tensor) -> torch.Tensor:
    """q.k^T of one query block [G, C, K], float32 (without the scale), autocast off: bf16 operands with float32
    accumulation and output on CUDA (the product of two bf16 is exact in float32, so this equals the float32
    product up to summation order, at the bf16 tensor-core rate), float32 operands elsewhere."""
    with autocast_off(q_GCd.device.type):
        if kT_GdK.dtype != torch.float32:
            return torch.bmm(q_GCd, kT_GdK, out_dtype=torch.float32)
        return torch.bmm(q_GCd.float(), kT_GdK)


def document_starts(lengths: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    """Each row's document start positions, from its document lengths in order."""
    return [list(itertools.accumulate(row[:-1], initial=0)) for row in lengths]


def first_document_key(starts: list[list[int]], query: int) -> int:
    """The earliest position, over the rows, where the document holding position ``query`` starts (``starts``:
    ``document_starts``): no query at or after ``query`` attends to a key before it."""
    return min(row[bisect.bisect_right(row, query) - 1] for row in starts)


@torch.no_grad()
def causal_max_logits(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, scale: float, chunk: int = MAX_LOGIT_CHUNK,
                      segments_BT: torch.Tensor | None = None,
                      lengths: tuple[tuple[int, ...], ...] | None = None) -> torch.Tensor:
    """Per-head max over batch and causal (query, key) pairs of scale * q.k, shape [H], float32; with
    ``segments_BT`` (document masking) only over pairs within one document: exactly the logits softmax sees.

    Computed in query blocks (``probe_spans``) so memory stays O(chunk * T) whatever kernel the attention itself
    uses (a document mask too: [B, 1, chunk, keys] per block); a block multiplies only the keys up to its last
    query, (n + 1) / 2n of the q.k^T products for n blocks; the scores are masked in place and scaled after the
    max (three passes over each block's scores: the GEMM's write, the mask, the max).
    The products are float32 also under autocast (a bf16 result would make QK-Clip clip to tau within ~0.5%):
    ``probe_logits``. With documents, ``lengths`` (each row's document lengths, host ints:
    models/document_mask.py) also skip the keys before the block's first document (the earliest over the rows):
    about the sum of the documents' own blocks; without them (segments only: where a document starts is a device
    value, and slicing by it would read it on the host, a stream synchronisation on CUDA) the keys before it are
    computed and masked.
    """
    B, H, T, _ = q_BHTd.shape
    out_H = torch.full((H,), float("-inf"), device=q_BHTd.device, dtype=torch.float32)
    if q_BHTd.is_meta:  # shapes only (the memory planner runs the model on meta tensors): nothing to measure
        return out_H
    q_GTd, kT_GdT = probe_operands(q_BHTd, k_BHTd)
    starts = None if lengths is None else document_starts(lengths)
    above_CC = torch.ones(min(chunk, T), min(chunk, T), dtype=torch.bool, device=q_BHTd.device).triu_(1)
    for start, end in probe_spans(T, chunk):
        first = 0 if starts is None else first_document_key(starts, start)
        C = end - start
        s_BHCK = probe_logits(q_GTd[:, start:end], kT_GdT[:, :, first:end]).view(B, H, C, end - first)
        # masked in place, one score tensor at a time: causally only the square on the diagonal (the keys before
        # the block precede all its queries: ``above_CC``, made once); with documents every pair across documents
        if segments_BT is None:
            s_BHCK[..., start - first:].masked_fill_(above_CC[:C, :C], float("-inf"))
        else:
            hidden_B1CK = segments_BT[:, None, start:end, None] != segments_BT[:, None, None, first:end]
            hidden_B1CK[..., start - first:] |= above_CC[:C, :C]
            s_BHCK.masked_fill_(hidden_B1CK, float("-inf"))
            del hidden_B1CK
        out_H = torch.maximum(out_H, s_BHCK.amax(dim=(0, 2, 3)))
        del s_BHCK
    # scaled once, at the end: rounding is monotonic, so the max of the scaled logits is the scaled max (scale > 0)
    return out_H * scale
