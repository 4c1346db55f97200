"""Model FLOPs utilisation in the logs: per optimizer step, the model FLOPs it trained (models/flops.py, per token,
times the step's tokens) over the time it took, per device, and as a share of the device's peak
(``train.peak_tflops``, or the dense bf16 tensor-core peak of a known CUDA device: vendor data sheets, SXM parts).
Logged as ``tflops_per_device`` and, when the peak is known, ``mfu`` (console, metrics.jsonl, W&B)."""
from __future__ import annotations

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "B200": 2250.0}


def peak_tflops(configured: float, device: torch.device) -> float | None:
    """``train.peak_tflops`` if set, else the table's entry for this CUDA device's name, else None."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def throughput_metrics(tokens_per_s: float, flops_per_token: float, world_size: int,
                       peak: float | None) -> dict[str, float]:
    """``tflops_per_device`` (model TFLOP/s per device) and ``mfu`` (its share of ``peak`` TFLOP/s)."""
    per_device = tokens_per_s * flops_per_token / world_size / 1e12
    return {"tflops_per_device": per_device, **({"mfu": per_device / peak} if peak else {})}


__all__ = ["PEAK_BF16_TFLOPS", "peak_tflops", "throughput_metrics"]
