"""Context parallelism, Ulysses style (all-to-all over heads): the ``cp`` ranks of a ``cp_group`` split each
sequence.

Rank c of a CP group holds tokens ``[c*T/cp, (c+1)*T/cp)`` of every sequence of its batch (the loader cuts them,
data/loader.py; under document masking it also gives the whole sequence's segments). Everything but attention is
token-local and runs on those tokens. ``apply_context_parallel``:
- a forward pre-hook on the model gives each token its global RoPE position (its offset in the sequence, or its
  position in its document with ``reset_positions``), so RoPE is the one-process RoPE;
- q, k and v [B, H, T/cp, d] go through one all-to-all to [B, H/cp, T, d] where they are made (MLA's ``qkv_up``,
  else ``_qkv``), and each rank's attention core (``attend``) attends over the WHOLE sequence for its 1/cp of the
  heads (causal, or within each document), then its output [B, H/cp, T, dv] goes back by the inverse all-to-all.
  The per-head max logits are therefore exact and local: each rank records its heads' slice of the [H] buffer (the
  others stay -inf) and QK-Clip's MAX reduction over dp x cp (its process group) completes it;
- QK-Clip's post-step probe does the same exchange for q and k.

Why Ulysses rather than a ring (ring attention passes K/V blocks around and combines partial softmaxes): the max
logits need no cross-rank reduction per query block and stay exact by construction; every rank does the same
causal work without a zigzag split; the exchange is two all-to-alls per layer (q, k, v and the output, each
1/cp of the rank's activations to each peer), which stays within a node at K2's sizes; the price is that cp
must divide the heads of a tensor-parallel rank (K2: 64 heads leave room for cp x tp up to 64). DeepSpeed's
``DistributedAttention`` implements the same exchange, but it wraps a local attention callable on
[T, B, H, d] tensors and this model's attention core records max logits in place; the exchange here is the
expert-parallel all-to-all (parallel/expert_parallel.py), so full recomputation replays it like the expert
exchange, and selective recomputation's ``mla_up_proj``, which drops the exchanged q, k and v attention keeps,
sends them again when it rebuilds them (parallel/recompute.py).

Losses: each rank's mean over its tokens; with equal token counts the mean over dp x cp is the global mean, and
the gradients are reduced over dp x cp (parallel/dims.py: ``dp_group`` is that axis).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from models.document_mask import document_max_logits, to_device
from models.layers import causal_max_logits, document_positions
from parallel.expert_parallel import _all_to_all


def local_tokens(t: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Rank ``cp_rank``'s contiguous 1/cp of the sequence dimension (dim 1) of ``t``."""
    n = t.shape[1] // cp_size
    return t[:, cp_rank * n:(cp_rank + 1) * n]


def seq_to_heads(x_BHtd: torch.Tensor, group: Any, cp: int) -> torch.Tensor:
    """[B, H, T/cp, d] (this rank's tokens, all heads) -> [B, H/cp, T, d] (all tokens, this rank's heads)."""
    B, H, t, d = x_BHtd.shape
    send = x_BHtd.reshape(B, cp, H // cp, t, d).transpose(0, 1).contiguous()  # [dest head group, B, H/cp, t, d]
    recv = _all_to_all(send, [1] * cp, [1] * cp, group)  # [source token chunk, B, H/cp, t, d]
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // cp, cp * t, d)


def heads_to_seq(x_BhTd: torch.Tensor, group: Any, cp: int) -> torch.Tensor:
    """The inverse of ``seq_to_heads``: [B, H/cp, T, d] -> [B, H, T/cp, d]."""
    B, h, T, d = x_BhTd.shape
    send = x_BhTd.reshape(B, h, cp, T // cp, d).permute(2, 0, 1, 3, 4).contiguous()  # [dest token chunk, ...]
    recv = _all_to_all(send, [1] * cp, [1] * cp, group)  # [source head group, B, H/cp, T/cp, d]
    return recv.transpose(0, 1).reshape(B, cp * h, T // cp, d)


def apply_context_parallel(model: nn.Module, cp_rank: int, cp_size: int, cp_group: Any,
                           hidden_parts: int = 1) -> None:
    """Context parallelism on a ``models.Transformer`` in place (see the module docstring); nothing at cp 1.
    Apply before the memory techniques, which wrap what this leaves as the attention core. ``hidden_parts``: the
    hidden states a pipeline stage receives hold 1/hidden_parts of the chunk (sequence parallelism: tp)."""
    if cp_size == 1:
        return
    model.register_forward_pre_hook(_positions_hook(cp_rank, cp_size, hidden_parts), with_kwargs=True)
    for module in model.modules():
        if hasattr(module, "attend") and hasattr(module, "max_logits_H"):
            _exchange_heads(module, cp_rank, cp_size, cp_group)


def _positions_hook(cp_rank: int, cp_size: int, hidden_parts: int = 1) -> Callable:
    """Adds ``positions`` (global, [B, T/cp]) to the model's forward: its tokens are a slice of the sequence."""

    def hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        names = ("x", "targets", "segments", "positions")
        call = {**dict(zip(names, args)), **kwargs}
        if call.get("positions") is None:
            x, segments = call["x"], call.get("segments")
            n = x.shape[1] * (hidden_parts if x.is_floating_point() else 1)  # ids, or a stage's hidden states
            if segments is not None and model.reset_positions:
                # the segments may be in host memory (the trainer's: models/document_mask.py)
                positions = local_tokens(document_positions(segments), cp_rank, cp_size)
                call["positions"] = to_device(positions, x.device)
            else:
                start = cp_rank * n
                call["positions"] = torch.arange(start, start + n, device=x.device).expand(x.shape[0], n)
        return (call.pop("x"),), call

    return hook


def _exchange_heads(attn: nn.Module, cp_rank: int, cp_size: int, group: Any) -> None:
    """The all-to-alls over heads: q, k and v go to [B, H/cp, T, d] where they are made (``qkv_up`` on MLA, the
    ``mla_up_proj`` region, so selective recomputation rebuilds the exchanged tensors attention keeps; ``_qkv``
    otherwise), ``attend`` records this rank's heads and sends its output back, ``probe_max_logits`` likewise."""
    name = "qkv_up" if hasattr(attn, "qkv_up") else "_qkv"
    make, attend = getattr(attn, name), attn.attend

    def heads(n_heads: int) -> slice:
        n = n_heads // cp_size
        return slice(cp_rank * n, (cp_rank + 1) * n)

    def make_cp(*args):
        return tuple(seq_to_heads(t, group, cp_size) for t in make(*args))

    def attend_cp(q_BhTd, k_BhTd, v_BhTe, *documents):
        full = attn.max_logits_H
        attn.max_logits_H = full[heads(full.numel())]  # a view: the core records into this rank's heads
        try:
            out = attend(q_BhTd, k_BhTd, v_BhTe, *documents)
        finally:
            attn.max_logits_H = full
        return heads_to_seq(out, group, cp_size)

    @torch.no_grad()
    def probe_cp(x_BTD, documents=None, positions_BT=None):
        q, k, _ = attn._qkv(x_BTD, positions_BT)  # this rank's heads over the whole sequence
        out_H = torch.full((attn.max_logits_H.numel(),), float("-inf"), device=q.device)
        probe = causal_max_logits(q, k, attn.scale) if documents is None else document_max_logits(q, k, attn.scale,
                                                                                                  documents)
        out_H[heads(out_H.numel())] = probe
        return out_H

    setattr(attn, name, make_cp)
    attn.attend, attn.probe_max_logits = attend_cp, probe_cp


__all__ = ["apply_context_parallel", "heads_to_seq", "local_tokens", "seq_to_heads"]
