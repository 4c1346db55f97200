"""FP8 activation storage (``parallel.fp8_activations``), Kimi K2's "inputs of MoE up-projections and SwiGLU are
compressed to FP8-E4M3 in 1 x 128 tiles with FP32 scales ... we do not apply FP8 in computation".

A saved-tensor hook pair (``torch.autograd.graph.saved_tensors_hooks``) around a region of the model
(parallel/regions.py): every floating-point tensor autograd keeps there for backward, except parameters (and views
of them), is stored as ``float8_e4m3fn`` in tiles of 128 consecutive elements of its last dimension, each with a
float32 scale amax / 448 (so every tile's largest element maps to E4M3's largest finite value and nothing is
clipped: the quotient is clamped to +-448 before the cast, not left to the cast's saturation), and dequantised when
backward asks for it. The forward is unchanged; only the gradients see the rounding (3 mantissa bits: a relative
error of at most 2^-4 per element, or half of the subnormal spacing 2^-9 of the tile scale for small elements).

| point | region | what is stored in FP8 |
|---|---|---|
| ``moe_up_input`` | the routed experts' gate/up GEMMs (``moe_up``) | the rows they keep for their weight gradients |
| ``swiglu_input`` | every SwiGLU (``swiglu``; with its recompute, the region's saved inputs) | gate and up (and silu(gate) without recompute) |

With ``recompute`` on the same region the hooks compress what the recomputation keeps (its inputs): apply FP8
after recompute (``parallelize`` does).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models import GroupedExperts
from parallel.regions import is_weight, param_storages, saved_tensors_chain, wrap_region

FP8_POINTS = ("moe_up_input", "swiglu_input")
_REGION = {"moe_up_input": "moe_up", "swiglu_input": "swiglu"}
TILE = 128
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@dataclass
class Fp8Tiles:
    """A tensor stored as FP8 tiles: ``data`` [rows, tiles, 128] float8_e4m3fn, ``scale`` [rows, tiles] float32."""

    data: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    stored: ClassVar[tuple[str, ...]] = ("data", "scale")  # what activation offload moves to the host

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def quantize(x: torch.Tensor) -> Fp8Tiles:
    """FP8-E4M3 in 1 x 128 tiles along the last dimension (zero-padded to a multiple of 128), float32 scales."""
    last = x.shape[-1] if x.ndim else 1
    rows = x.reshape(-1, last).float()
    pad = (-last) % TILE
    tiles = F.pad(rows, (0, pad)).view(rows.shape[0], -1, TILE)
    scale = tiles.abs().amax(-1) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero tile
    data = (tiles / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return Fp8Tiles(data, scale, x.shape, x.dtype)


def dequantize(q: Fp8Tiles) -> torch.Tensor:
    rows = (q.data.float() * q.scale[..., None]).flatten(1)
    last = q.shape[-1] if len(q.shape) else 1
    return rows[:, :last].reshape(q.shape).to(q.dtype)


def _pack(param_storages: set[int], seen: dict, t: torch.Tensor) -> Fp8Tiles | None:
    """``t`` as FP8 tiles; the same tensor saved again in this call (the experts' gate and up GEMMs both keep
    their input rows) gets the same tiles. ``seen`` holds the tensors while the call runs, so no other takes their
    address."""
    if not t.is_floating_point() or t.ndim == 0 or is_weight(t, param_storages):
        return None  # weights, integer and scalar tensors: left to the hooks around (offload) or kept
    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
    if key not in seen:
        seen[key] = (t, quantize(t))
    return seen[key][1]


def fp8_saved(module: nn.Module, method: Callable) -> Callable:
    """``method`` with every non-weight floating-point tensor autograd saves in it stored as FP8 tiles."""
    def run(*args, **kwargs):
        seen: dict = {}
        try:
            with saved_tensors_chain(partial(_pack, param_storages(module), seen), dequantize, pass_on=True):
                return method(*args, **kwargs)
        finally:
            # autograd keeps the pack hook (and so ``seen``) with every tensor it saved until backward: let go of
            # the originals now, or they stay alive beside their FP8 tiles
            seen.clear()
    return run


def apply_fp8_storage(model: nn.Module, points: list[str] | tuple[str, ...], recomputed: set[str] = frozenset()
                      ) -> None:
    """FP8 storage at ``points``; ``recomputed``: the selective recompute modules, since a point inside a
    recomputed region is compressed where that region keeps it (``swiglu_input`` of the routed experts at
    ``moe_down_proj``'s inputs when that is recomputed: inside, the recomputation keeps nothing)."""
    unknown = sorted(set(points) - set(FP8_POINTS))
    if unknown:
        raise ValueError(f"unknown fp8_activations point(s) {unknown}: choose from {list(FP8_POINTS)}")
    for point in points:
        region = _REGION[point]
        if point == "swiglu_input" and "moe_down_proj" in recomputed:
            wrap_region(model, "moe_down_proj", fp8_saved)  # the routed experts
            wrap_region(model, region, lambda m, f: f if isinstance(m, GroupedExperts) else fp8_saved(m, f))
        else:
            wrap_region(model, region, fp8_saved)


__all__ = ["FP8_POINTS", "Fp8Tiles", "apply_fp8_storage", "dequantize", "fp8_saved", "quantize"]
