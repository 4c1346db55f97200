"""Document masking of packed samples (``data.document_mask``) without any [T, T] tensor: a token attends only to
earlier tokens of its own document, at memory O(T) whatever the documents.

``Documents`` holds one micro batch's documents as the attention implementation that runs needs them. It is built
once per forward (``Transformer.forward``) and every layer gets the same one:

- SDPA: each row's document lengths, on the host; attention is causal SDPA over each document's span
  (``document_attention``), so the fused kernels (flash attention on CUDA) run, each on one document, and what
  backward keeps is what causal SDPA keeps: no mask. Each document attends exactly as if it ran alone. The boolean
  [B, 1, T, T] mask this replaces ruled the fused kernels out and was kept for backward by every layer (1 GiB per
  sequence at 32k as booleans, more as the additive mask SDPA makes of it). Kernel launches per document need the
  boundaries on the host, as a varlen kernel's maximum length does (Megatron-LM's packed-sequence parameters carry
  it as a host int, computed by its data pipeline): the trainer hands the model the loader's segments while they
  are still in host memory, ``build`` reads the lengths there and moves the segments to the device (an
  asynchronous copy). Segments already on an accelerator are read back once per forward (``document_lengths``),
  a host synchronisation on CUDA, per micro batch and pipeline stage, not per layer.
- flex: one block mask, made by a compiled ``create_block_mask`` (torchtitan builds one per batch the same way):
  dynamo compiles it once per shape, and new documents are new values of the same input, not a recompilation.
  Uncompiled, ``create_block_mask`` materialises the whole [T, T] mask (pytorch#134756).

``segments_BT`` (each token's document index in its packed sample, non-decreasing along T; on the model's device)
stays beside them for what works on the device: the max-logit probe's per-chunk masks
(``models.layers.causal_max_logits``, which the host lengths also let skip the keys before a block's first
document: ``probe_kwargs``) and ``document_positions``.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .layers import causal_max_logits


@dataclass(frozen=True, eq=False)
class Documents:
    segments_BT: torch.Tensor
    lengths: tuple[tuple[int, ...], ...] | None = None  # SDPA: each row's document lengths, in order
    block_mask: Any = None  # flex: a BlockMask
    # SDPA attends per document (the lengths are known; not on the planner's meta model): a flag of its own, so
    # compiled code reads a bool, not the lengths (whose every value dynamo would guard on)
    per_document: bool = False

    @classmethod
    def build(cls, segments_BT: torch.Tensor, attention_impl: str, device: torch.device | None = None
              ) -> "Documents":
        """The documents of ``segments_BT`` for attention on ``device`` (the segments' own by default). Segments
        in host memory with ``device`` an accelerator: the lengths are read there, without a synchronisation."""
        device = torch.device(device) if device is not None else segments_BT.device
        host = segments_BT if segments_BT.device.type == "cpu" else None
        segments_BT = to_device(segments_BT, device)
        if device.type == "meta" and (host is None or attention_impl == "flex"):  # shapes only (the memory
            return cls(segments_BT)  # planner's meta model): causal
        if attention_impl == "flex":
            return cls(segments_BT, block_mask=_compiled_block_mask()(segments_BT))
        lengths = document_lengths(host if host is not None else segments_BT)
        return cls(segments_BT, lengths=lengths, per_document=True)

    def probe_kwargs(self) -> dict[str, Any]:
        """What the max-logit probe masks with (``models.layers.causal_max_logits``)."""
        return {"segments_BT": self.segments_BT, "lengths": self.lengths}


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without waiting for it: on CUDA through pinned memory (a copy from pageable memory
    may synchronise with the stream; the caching host allocator keeps the pinned copy until the transfer is
    done)."""
    if host.device.type == "cpu" and torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@torch.compiler.disable  # eager: compiled, the documents' lengths would be guarded on (a recompile per layout)
def document_max_logits(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, scale: float, documents: Documents
                        ) -> torch.Tensor:
    """The max-logit probe over the pairs within each document (``models.layers.causal_max_logits``)."""
    return causal_max_logits(q_BHTd, k_BHTd, scale, **documents.probe_kwargs())


def document_lengths(segments_BT: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """The lengths of each row's runs of equal segment values: its documents' lengths, in order. Reads the segments
    to the host (``tolist``: on CUDA a host synchronisation; ``Documents`` does it once per forward)."""
    return tuple(tuple(sum(1 for _ in run) for _, run in itertools.groupby(row)) for row in segments_BT.tolist())


@torch.compiler.disable  # kernel calls per document: a compiled block would specialise on the lengths
def document_attention(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTe: torch.Tensor, scale: float,
                       documents: Documents) -> torch.Tensor:
    """Causal SDPA over each document's span of each row: [B, H, T, e]. The spans are views of q, k, v (what SDPA
    keeps for backward is theirs), the outputs are joined by one concatenation; backward joins each input's
    gradients the same way (``split``'s backward is one ``cat``, ``unbind``'s one ``stack``)."""
    B, H, T, _ = q_BHTd.shape
    outs = []
    for q_HTd, k_HTd, v_HTe, row in zip(q_BHTd.unbind(0), k_BHTd.unbind(0), v_BHTe.unbind(0), documents.lengths):
        for q_HNd, k_HNd, v_HNe in zip(q_HTd.split(row, 1), k_HTd.split(row, 1), v_HTe.split(row, 1)):
            out = F.scaled_dot_product_attention(q_HNd[None], k_HNd[None], v_HNe[None], is_causal=True, scale=scale)
            outs.append(out[0])
    return torch.cat(outs, dim=1).view(H, B, T, -1).transpose(0, 1)


@functools.cache
def _compiled_block_mask():
    """segments_BT -> the flex BlockMask of causal attention within each document (compiled once per shape)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def build(segments_BT: torch.Tensor):
        B, T = segments_BT.shape

        def same_document(b, h, q, kv):
            return (q >= kv) & (segments_BT[b, q] == segments_BT[b, kv])

        return create_block_mask(same_document, B, None, T, T, device=segments_BT.device)

    return torch.compile(build, dynamic=False)


def block_mask_bytes(batch: int, seq_len: int, block: int = 128) -> int:
    """The device bytes of a document BlockMask for [batch, seq_len] (int32): the (partial and full) block counts
    and indices by query block, and their transposes by key block (flex's backward)."""
    n = -(-seq_len // block)
    return 4 * batch * 4 * (n + n * n)


__all__ = ["Documents", "block_mask_bytes", "document_attention", "document_lengths",
           "document_max_logits", "to_device"]
