"""The max-logit probe QK-Clip acts on (models/layers.py ``causal_max_logits``): equal to a brute-force max over the
causal (and same-document) pairs, it multiplies only the causal query/key blocks, converts k once, and on CUDA
multiplies bf16 q and k with float32 accumulation and output (its shapes and dtypes checked on the meta device,
which stands in for CUDA: CPU has no such kernel)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention import Attention, MLAttention
from models.config import ModelConfig
from models.document_mask import Documents
from models.layers import (MAX_LOGIT_CHUNK, causal_max_logits, probe_logits, probe_operands, probe_pairs,
                           probe_spans)
from tests.audit import OpAudit
from tests.test_document_mask import dense_document_mask

BF16 = torch.bfloat16


def brute_force(q_BHTd, k_BHTd, scale, segments_BT=None):
    """max of scale * q.k over the allowed pairs, per head, in float64 from the probe's own inputs."""
    T = q_BHTd.shape[2]
    s = (q_BHTd.double() @ k_BHTd.double().transpose(-1, -2)) * scale
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if segments_BT is None else dense_document_mask(segments_BT)
    return s.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))


@pytest.mark.parametrize("T,chunk", [(64, 16), (50, 16), (7, 16)], ids=["whole-blocks", "last-block-short", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("documents", [None, "segments", "lengths"])
def test_probe_equals_the_brute_force_max(T, chunk, dtype, documents):
    """Blocks of 16 queries, keys up to each block's end (with the documents' host lengths, from the block's first
    document's start): the max over every causal (same-document) pair, as a float64 reference computes it from
    the same inputs (float32 accumulation of d products: d units of float32 rounding at most, relative to the
    largest logit)."""
    g = torch.Generator().manual_seed(T)
    d = 24
    q, k = (torch.randn(2, 3, T, d, generator=g).to(dtype) for _ in range(2))
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, d] seen as [B, H, T, d], as Attention makes it
    segments = torch.stack([torch.arange(T) // 5, torch.arange(T) // 11]) if documents else None
    expected = brute_force(q, k, 0.3, segments)
    kwargs = {"segments_BT": segments} if documents else {}
    if documents == "lengths":
        kwargs = Documents.build(segments, "sdpa").probe_kwargs()
    got = causal_max_logits(q, k, 0.3, chunk=chunk, **kwargs)
    assert got.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got.double(), expected, rtol=d * eps, atol=d * eps * expected.abs().max().item())


def test_a_block_keeps_the_keys_of_its_first_document_before_it():
    """Documents of 6 and 26 tokens, blocks of 8 queries: the largest logit is query 8's with key 7 (one document,
    across the block's start): the block from 8 multiplies the keys from 6, its first document's start, on."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 32, 4, generator=g) for _ in range(2))
    q[:, :, 8], k[:, :, 7] = 10.0, 10.0
    segments = torch.tensor([[0] * 6 + [1] * 26])
    got = causal_max_logits(q, k, 1.0, chunk=8, **Documents.build(segments, "sdpa").probe_kwargs())
    torch.testing.assert_close(got, torch.full((2,), 400.0))


def _attention(attn_type: str, T: int) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, inter_dim=64, max_seq_len=T,
                      attn_type=attn_type, first_k_dense=1)
    torch.manual_seed(0)
    attn = (MLAttention if attn_type == "mla" else Attention)(cfg).train()
    attn.init_weights(0.02, 0.02)
    return attn


@pytest.mark.parametrize("attn_type", ["mha", "mla"])
def test_the_probe_multiplies_only_the_causal_blocks(attn_type):
    """T = 2048 in 4 blocks of 512 queries: the probe's matmul FLOPs are (n + 1) / 2n = 5/8 of a full q.k^T
    (2 B H T^2 d; all of it before, 1.00), in one GEMM per block, also with document masks (whose first key in a
    block is a device value: slicing by it would synchronise a CUDA stream, so the blocks stay the causal ones)."""
    B, T = 1, 2048
    attn = _attention(attn_type, T)
    x = torch.randn(B, T, 32)
    n = T // MAX_LOGIT_CHUNK
    d = 16
    full = 2 * B * attn.n_heads * T * T * d
    with OpAudit() as audit:
        attn(x)
    probe = [r for r in audit.records if r.region == "max_logit_probe"]
    assert len(probe) == n and {r.op for r in probe} == {"bmm"}
    ratio = sum(r.flops for r in probe) / full
    assert ratio == probe_pairs(T) / T ** 2 == (n + 1) / (2 * n), ratio
    # documents of 300 tokens: each block multiplies the keys from its first document's start on
    documents = Documents.build((torch.arange(T) // 300)[None], "sdpa")
    with OpAudit() as audit:
        attn(x, documents)
    probe = [r for r in audit.records if r.region == "max_logit_probe"]
    pairs = sum((end - start) * (end - start // 300 * 300) for start, end in probe_spans(T))
    assert len(probe) == n and sum(r.flops for r in probe) / full == pairs / T ** 2 < 0.3, pairs / T ** 2


class _Ops(TorchDispatchMode):
    """Every aten op with its output, for the probe's conversions and products."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, out))
        return out


def test_on_cpu_k_is_converted_to_float32_once():
    """bf16 q and k on CPU (no bf16 x bf16 -> float32 kernel there): k goes to float32 once for all 4 blocks (it
    was converted per block), each q block once."""
    q, k = (torch.randn(1, 2, 2048, 16).to(BF16) for _ in range(2))
    with _Ops() as ops:
        causal_max_logits(q, k, 0.25)
    converted = [out.numel() for func, out in ops.calls if func is torch.ops.aten._to_copy.default
                 and out.dtype == torch.float32]
    assert sorted(converted) == [2 * 512 * 16] * 4 + [k.numel()], converted


def test_on_cuda_bf16_q_and_k_are_multiplied_with_float32_output():
    """The CUDA branch, on the meta device: q and k stay bf16 (no float32 copy), each block is one
    ``bmm(..., out_dtype=float32)`` of [B*H, C, d] x [B*H, d, keys up to the block's end]."""
    B, H, T, d = 2, 3, 1536, 64
    q = torch.empty(B, H, T, d, dtype=BF16, device="meta")
    k = torch.empty(B, T, H, d, dtype=BF16, device="meta").transpose(1, 2)
    q_GTd, kT_GdT = probe_operands(q, k)
    assert (q_GTd.dtype, kT_GdT.dtype) == (BF16, BF16)
    assert q_GTd.shape == (B * H, T, d) and kT_GdT.shape == (B * H, d, T)
    with _Ops() as ops:
        s = probe_logits(q_GTd[:, 512:1024], kT_GdT[:, :, :1024])
    assert s.dtype == torch.float32 and s.shape == (B * H, 512, 1024)
    computed = [func for func, _ in ops.calls if func is not torch.ops.aten.slice.Tensor]  # (views of q, k)
    assert computed == [torch.ops.aten.bmm.dtype]  # no conversion, no float32 copy
    q32, k32 = probe_operands(q.float(), k.float())  # a float32 run: the float32 product, no out_dtype
    assert (q32.dtype, k32.dtype) == (torch.float32, torch.float32)
