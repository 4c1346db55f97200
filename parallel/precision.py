"""The precision policy: which dtype the parameters, activations, gradients, master weights, reductions and each
compute op use, stated once (as FSDP2's MixedPrecisionPolicy) and read by the model build (``apply_precision``,
called by ``parallelize``), the trainer (autocast, pipeline shapes), the optimizer (master weights, gradient
buffers, reduce dtype) and the planner (bytes per element).

With ``train.param_dtype: bfloat16`` (Kimi K2's "model parameters in BF16 and their gradient accumulation buffer
in FP32", Megatron's bf16 + distributed optimizer):

| what | float32 run | bfloat16 run |
|---|---|---|
| parameters (the model's copy) | float32 | bf16, except ``FP32_PARAMETERS`` |
| activations, residual stream | float32 | bf16 (``model.fp32_residual``: the residual stream float32) |
| GEMMs: linear, grouped experts, SDPA | float32 (bf16 under ``train.dtype: bfloat16`` autocast) | bf16 |
| gradient accumulation | float32 (``.grad``) | float32 buffers (bf16 ``.grad`` added in and dropped) |
| master weights | the parameters | float32, with the optimizer state (ZeRO-1: on the owner only) |
| optimizer state (Muon momentum, AdamW moments) | float32 | float32 |
| data-parallel gradient reduction | ``parallel.grad_reduce_dtype`` | ``parallel.grad_reduce_dtype`` |
| ZeRO-1 parameter broadcast | float32 | bf16 (the owner rounds its master) |
| EP all-to-all, PP send/recv, TP all-reduces | activation dtype | bf16 (PP: float32 with ``fp32_residual``) |
| checkpoints, export | float32 | float32: the master weights |

``FP32_COMPUTE`` lists the float32 exceptions inside a bf16 step and why; tests/test_precision.py audits every
matmul-class op of a training step against it.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)

# parameters kept float32 in a bf16 model (by the last component of their name), with the reason
FP32_PARAMETERS = {
    "e_score_correction_bias": "the router bias moves by +-bias_update_speed (1e-3) per step, which bf16's 8-bit "
                               "mantissa rounds away near 1 (spacing 2^-7); it is no gradient-trained weight",
}

# float32 computations inside a bf16 training step (the keys name them in the precision audit)
FP32_COMPUTE = {
    "router": "router scores sigmoid(x W^T): top-k selection and combine weights in float32 (bf16 ties and "
              "misroutes near-equal experts); one [tokens, dim] x [dim, experts] GEMM per MoE layer",
    "max_logit_probe": "the per-head max logit QK-Clip acts on, q.k^T with a float32 result (a bf16 one would "
                       "clip to tau within ~0.5%); no gradient. On CUDA bf16 q and k go into the tensor cores with "
                       "float32 accumulation and output (exact products); CPU has no such kernel: float32 there",
    "rmsnorm_statistics": "mean of squares and rsqrt in float32 (elementwise, no GEMM)",
    "loss": "logits cast to float32 for log-softmax and cross entropy (no GEMM)",
    "grad_norm": "the global gradient norm over the float32 gradient buffers (no GEMM)",
    "optimizer": "momentum, AdamW moments and the update of the float32 master weights (Newton-Schulz in "
                 "optim.ns_dtype: bf16 on CUDA)",
}


@dataclass(frozen=True)
class PrecisionPolicy:
    param_dtype: torch.dtype = torch.float32  # the model's parameters (except FP32_PARAMETERS)
    compute_dtype: torch.dtype = torch.float32  # autocast dtype of the GEMMs (float32: no autocast)
    reduce_dtype: torch.dtype = torch.float32  # data-parallel gradient reductions
    master_weights: bool = True  # float32 masters for low-precision parameters (False: update them directly)
    fp32_residual: bool = False  # the model keeps its residual stream in float32

    @classmethod
    def from_config(cls, cfg) -> "PrecisionPolicy":
        """From a ``JobConfig`` (train.param_dtype, train.dtype, parallel.grad_reduce_dtype, optim.master_weights,
        model.fp32_residual)."""
        return cls(param_dtype=getattr(torch, cfg.train.param_dtype), compute_dtype=getattr(torch, cfg.train.dtype),
                   reduce_dtype=getattr(torch, cfg.parallel.grad_reduce_dtype),
                   master_weights=cfg.optim.master_weights, fp32_residual=cfg.model.fp32_residual)

    @property
    def low_precision(self) -> bool:
        return self.param_dtype in LOW_PRECISION

    @property
    def activation_dtype(self) -> torch.dtype:
        """The residual stream's dtype: what pipeline stages send and receive."""
        return torch.float32 if self.fp32_residual or not self.low_precision else self.param_dtype

    @property
    def grad_dtype(self) -> torch.dtype:
        """Gradient accumulation (and master weight) dtype."""
        return torch.promote_types(self.param_dtype, torch.float32)

    def autocast(self, device_type: str):
        """The forward's autocast context (none in float32)."""
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype)

    def param_bytes(self, name: str) -> int:
        """Bytes per element of parameter ``name`` in the model."""
        return (torch.float32 if keeps_fp32(name) else self.param_dtype).itemsize


def keeps_fp32(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in FP32_PARAMETERS


def apply_precision(model: nn.Module, policy: PrecisionPolicy) -> None:
    """Cast the parameters (not the buffers: per-step statistics stay float32) to ``policy.param_dtype`` in place,
    keeping each Parameter object (tensor-parallel layers share some) and ``FP32_PARAMETERS`` in float32. Works on
    a model built on the meta device (then ``init_sharded`` allocates bf16 storage and rounds float32 draws)."""
    if not policy.low_precision:
        return
    for name, p in model.named_parameters():
        if p.is_floating_point() and not keeps_fp32(name):
            p.data = p.data.to(policy.param_dtype)


__all__ = ["FP32_COMPUTE", "FP32_PARAMETERS", "LOW_PRECISION", "PrecisionPolicy", "apply_precision", "keeps_fp32"]
