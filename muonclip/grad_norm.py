"""The global gradient norm's arithmetic, one function for ``MuonClip`` and ``DistributedMuonClip``.

``sum_of_squares(t)``: the squared L2 norm of ``t`` as a float64 scalar on its device, from the norms of its rows
(the last dimension; float32 at least) summed in float64. A row is what every layout keeps whole where it splits a
tensor by rows (ZeRO-1's row slices of the embedding and the head, expert stacks per expert), so one process and
those layouts add up the same row norms and agree to float64 rounding (with TP's column shards, to float32 rounding
of each partial row). ``torch.nn.utils.clip_grad_norm_``'s arithmetic (one float32 ``vector_norm`` per tensor) does
not: on CPU it accumulates a whole tensor sequentially (a 4M-element tensor: 5.3e-6 relative off its float64
value; this project's debug embedding at dp2: the norm moves by 5.8e-5 when ZeRO-1 splits it in two, which the
clip coefficient passes on to every parameter). The transient is one float per row; no host sync.
"""
from __future__ import annotations

import torch
from torch import Tensor


def sum_of_squares(t: Tensor) -> Tensor:
    rows = t.reshape(1, -1) if t.ndim < 2 else t.reshape(-1, t.shape[-1])
    precision = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(rows, dim=-1, dtype=precision).double().square().sum()


__all__ = ["sum_of_squares"]
