"""A step whose global gradient norm is not finite is skipped, decided on the device (no host synchronisation).

One NaN in one gradient element makes the clip coefficient NaN and every gradient with it; an inf makes it 0, and
Newton–Schulz then turns the momentum alone into a full-size step. So ``clip_grad_norm_`` of the MuonClip
optimizers keeps ``step_ok = isfinite(norm)`` as a 0-dim bool on the device. The norm is the one the clipping uses,
summed over every rank and shard before its square root, so every rank holds the same decision without another
collective. ``step_ok`` is None until a norm was measured (the step applies, with Python numbers as ever).

The step runs as always; a ``Gate`` on ``step_ok`` chooses its coefficients on the device, so that where it is
false the step is an exact no-op:

- the gradient the step reads is zeroed in place (``Gate.zero_``), so everything made from it is finite (the
  optimizers' gradient buffers are spent after a step anyway; clipping has already scaled them by NaN or 0);
- Muon's momentum and AdamW's betas are 1: each moment is B + 0 * (0 - B) = B, v * 1 + c * 0 * 0 = v, and the
  Nesterov look-ahead lerp(0, B, 1) is B;
- the weight decay factor is 1 (W * 1 = W); Muon's orthogonalised update is zeroed in place (a temporary of the
  step; whatever Newton–Schulz made of the momentum), so W - a * 0 = W + (-0) = W bit for bit; AdamW's lr is 0, so
  its step size lr / bc1 is 0 and its update 0 * m / d is +-0, finite because its eps is 1 then (d >= 1) and its
  bias corrections are taken at max(step, 1) (a skipped first step has step 0, where 1 - beta**0 = 0);
- AdamW's step counter (a float32 tensor on the device) advances by ``step_ok``, so the next applied step has the
  bias corrections it would have had.

Values are kept exactly; x + 0 turns a -0.0 into +0.0 (momentum, moments, an AdamW weight), value-equal, as
``torch.equal`` compares. A bf16 parameter is its float32 master rounded again, the same bits for the same master.
QK-Clip's gammas are exactly 1 on a skipped step (muonclip/qk_clip.py), and the router bias update (launch/hooks.py)
reads zero expert loads, so sign(0) = 0 moves no bias. ``DistributedMuonClip`` gates a parameter that got no
gradient on any rank the same way (``Gate & has``). Where the step applies, each coefficient is the number the
ungated step uses (computed in double on the host, stored once in the dtype the kernel computes in), so an applied
step equals the step without a decision bit for bit.

Cost: no tensor the size of a parameter (tests/test_skip_nonfinite.py measures the step's live bytes: 25 bytes
more than the step without a decision). Per step, one in-place pass over each gradient and each Muon update
(``masked_fill_``), and a few 0-dim tensors per gate, made once (``Gate.pick``). The previous way, a draft copy of
each state tensor kept by ``torch.where``, held up to three parameter-sized temporaries at a time (14 GB for Kimi
K2's head owned whole for AdamW). Measured on CPU, 1 thread, a 4M-element AdamW embedding: the step with a decision
took 1.13x the step without one (was 1.56x); Muon matrices with Newton–Schulz: within noise. On CPU a
``masked_fill_`` by a 0-dim mask is not vectorised (about 5x a ``mul_``), most of what remains.

Where Megatron-LM differs: it skips a step only under fp16 loss scaling (``found_inf``, MAX-reduced over the model
parallel group and read on the host, ``found_inf.item()``: one synchronisation per step), and then holds its lr
schedule; a NaN/inf gradient norm otherwise stops the run (``check_for_nan_in_loss_and_grad``, on by default).
Here every precision skips, without a host read, and the lr schedule and data go on with the step count (the host
learns of the skip only at the next log step: launch/skipped_steps.py counts it and stops a run that keeps skipping).
"""
from __future__ import annotations

import torch
from torch import Tensor


def decide(norm: Tensor) -> Tensor:
    """``step_ok`` for a global gradient norm: a 0-dim bool on its device (a DTensor norm is made whole first)."""
    whole = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return torch.isfinite(whole)


class Gate:
    """Whether a step applies: ``ok``, a 0-dim bool on the device, or None (it applies, and every method gives what
    the ungated step uses). One per decision and step: each 0-dim coefficient is made once."""

    def __init__(self, ok: Tensor | None) -> None:
        self.ok = ok
        self._skipped = None if ok is None else ~ok
        self._made: dict[tuple, Tensor] = {}

    def __and__(self, has: Tensor) -> Gate:
        """The gate of one parameter that may have had no gradient on any rank (``has``: a 0-dim bool)."""
        return Gate(has if self.ok is None else self.ok & has)

    def zero_(self, t: Tensor) -> None:
        """``t`` <- 0 where the step is skipped, in place: one pass, no temporary (NaN and inf included)."""
        if self._skipped is not None:
            t.masked_fill_(self._skipped, 0)

    def pick(self, value: float, skipped: float, like: Tensor, dtype: torch.dtype | None = None) -> float | Tensor:
        """``value`` where the step applies, else ``skipped``: the number itself without a decision (or when the two
        are equal), else a tensor on ``like``'s device holding ``value`` rounded as the kernel rounds a Python
        number: ``dtype`` or the dtype ``like``'s arithmetic runs in (float32 for bf16/fp16). 0-dim, but [1, ..., 1]
        for a bf16/fp16 ``like`` (a weight without a master): a 0-dim operand would be rounded to bf16 on CUDA, this
        one makes the op compute in float32, as a Python number does."""
        if self.ok is None or value == skipped:
            return value
        wide = torch.promote_types(like.dtype, torch.float32)
        dtype, shape = dtype or wide, (1,) * like.ndim if wide != like.dtype else ()
        key = (value, skipped, dtype, shape, like.device)
        if key not in self._made:
            self._made[key] = torch.where(self.ok, torch.full(shape, value, dtype=dtype, device=like.device), skipped)
        return self._made[key]


APPLIES = Gate(None)  # no decision: the step applies
