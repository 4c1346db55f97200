"""The model FLOP count per trained token (forward + backward) from the config, as Megatron and torchtitan log
MFU: 6 x the weights a token multiplies (every projection, the router, the dense and shared FFNs, the top-k of the
routed experts, the LM head; not the embedding lookup) plus the attention scores and the weighted sum over the
causal context: 3 x 2 x heads x (q/k head dim + v head dim) x (T + 1) / 2 per layer (a token attends to
(T + 1) / 2 keys on average; torchtitan counts all T). Elementwise work (norms, RoPE, SwiGLU, softmax) is left out."""
from __future__ import annotations

import torch

from .config import ModelConfig
from .layers import probe_pairs
from .transformer import Transformer


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights one token multiplies in a forward pass: the routed experts' k of n, everything else whole."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.startswith("embed_tokens"):
            continue  # norms and biases are elementwise; the embedding is a lookup
        n = p.numel()
        if ".mlp.experts." in name:
            n = n * cfg.n_activated_experts // cfg.n_routed_experts
        total += n
    return total


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of q.k^T and the weighted sum of v, per token, averaged over a causal sequence."""
    if cfg.attn_type == "mla":
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.head_dim
    return 3 * 2 * cfg.n_layers * cfg.n_heads * (qk + v) * (seq_len + 1) / 2


def probe_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs per token of one run of the max-logit probe over every layer (models/layers.py
    ``causal_max_logits``): q.k^T of each head over the keys up to its query block's end (``probe_pairs``), no
    backward. Not part of the model FLOPs (no model computes it; MFU leaves it out as it leaves out the
    optimizer)."""
    return 2 * cfg.n_layers * cfg.n_heads * cfg.qk_head_dim * probe_pairs(seq_len) / seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul weights per token + causal attention."""
    return 6 * matmul_params_per_token(cfg) + attention_flops_per_token(cfg, seq_len)


__all__ = ["attention_flops_per_token", "flops_per_token", "matmul_params_per_token", "probe_flops_per_token"]
