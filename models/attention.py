"""Causal self-attention: MHA/GQA and MLA (multi-head latent attention), both recording per-head max logits."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .document_mask import Documents, document_attention, document_max_logits
from .init import ZEROS, InitRule, init_module_, normal, prefixed
from .layers import RMSNorm, Yarn, apply_rope, causal_max_logits, rope_cos_sin


class _AttentionBase:
    """Shared forward of both attentions (``_qkv`` -> record max logits -> SDPA -> o_proj) and ``max_logits_H``:
    the running max of the pre-softmax scaled logit per head since the last reset (recorded in train mode, unless
    ``record_stats`` is off: activation checkpointing turns it off while it recomputes, so the float32 probe runs
    once per layer and micro batch)."""

    def _init_stats(self, cfg: ModelConfig) -> None:
        self.register_buffer("max_logits_H", torch.full((cfg.n_heads,), float("-inf")), persistent=False)
        self.attention_impl = cfg.attention_impl
        self.record_stats = True  # False while activation checkpointing recomputes this forward (no second probe)

    def reset_step_stats(self) -> None:
        self.max_logits_H.fill_(float("-inf"))

    def init_weights(self, std: float, out_std: float) -> None:
        init_module_(self, self.init_rules(std, out_std))

    def _records(self) -> bool:
        return self.training and self.record_stats

    def _record(self, q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, documents: Documents | None) -> None:
        if self._records():
            # in place: QK-Clip specs hold a reference to this buffer
            if documents is None:
                max_H = causal_max_logits(q_BHTd, k_BHTd, self.scale)
            else:  # eager: compiled, the documents' lengths would be guarded on (a recompile per new layout)
                max_H = document_max_logits(q_BHTd, k_BHTd, self.scale, documents)
            torch.maximum(self.max_logits_H, max_H, out=self.max_logits_H)

    @torch.no_grad()
    def probe_max_logits(self, x_BTD: torch.Tensor, documents: Documents | None = None,
                         positions_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head max logit [H] (float32) of the CURRENT weights on this layer's input (the forward's arguments);
        records nothing. QK-Clip's post-step mode calls it from a forward pre-hook (the spec's ``measure``)."""
        q, k, _ = self._qkv(x_BTD, positions_BT)
        if documents is None:
            return causal_max_logits(q, k, self.scale)
        return document_max_logits(q, k, self.scale, documents)

    def forward(self, x_BTD: torch.Tensor, documents: Documents | None = None,
                positions_BT: torch.Tensor | None = None) -> torch.Tensor:
        """``documents`` (document masking, models/document_mask.py): the packed sample's documents, a token attends
        only to its own; ``positions_BT``: RoPE positions (default 0..T-1), e.g. restarting per document."""
        masked = () if documents is None else (documents,)
        out = self.attend(*self._qkv(x_BTD, positions_BT), *masked)
        # the output's own length (sequence parallelism gathers the sequence inside ``_qkv``: x holds a part of it)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def attend(self, q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTe: torch.Tensor,
               documents: Documents | None = None) -> torch.Tensor:
        """The attention core (recording the max logits): [B, H, T, value head dim]. A region memory techniques wrap
        (parallel/regions.py): what it keeps for backward are q, k and v (views of them with documents)."""
        if self.attention_impl == "flex":
            out, max_H = _flex_with_max(q_BHTd, k_BHTd, v_BHTe, self.scale, documents)
            if self._records():
                torch.maximum(self.max_logits_H, max_H, out=self.max_logits_H)
        else:
            self._record(q_BHTd, k_BHTd, documents)
            out = _sdpa(q_BHTd, k_BHTd, v_BHTe, self.scale, documents)
        return out[..., :self.v_dim]  # MLA's v may arrive padded to the q/k width (qkv_up)


def _sdpa(q_BHTd, k_BHTd, v_BHTe, scale: float, documents: Documents | None = None) -> torch.Tensor:
    """Causal SDPA (with ``documents``: causal SDPA over each document's span, ``document_attention``). MLA's
    value heads (e) are narrower than its q/k heads (d): the fused kernels (CPU and CUDA flash attention) need
    e == d, so v is zero-padded to d and the output sliced back (the same values to float rounding; 1.55x faster
    forward+backward on CPU for tiny.yaml's 48/32 heads, where SDPA otherwise falls back to its unfused math
    path)."""
    d, e = q_BHTd.shape[-1], v_BHTe.shape[-1]
    v_BHTd = F.pad(v_BHTe, (0, d - e)) if e < d else v_BHTe
    if documents is None or not documents.per_document:  # no documents (or the planner's meta model: shapes only)
        out = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, scale=scale, is_causal=True)
    else:
        out = document_attention(q_BHTd, k_BHTd, v_BHTd, scale, documents)
    return out[..., :e]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device=device)


def _flex_with_max(q_BHTd, k_BHTd, v_BHTe, scale: float, documents: Documents | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal flex attention (with ``documents``: within each document, by their block mask, built once per
    forward) and the per-head max of its scaled logits [H] (float32), from flex's per-row max scores
    (``AuxRequest(max_scores=True)``, CUDA only: torch raises on CPU), so no second q.k^T is formed. Checked against
    SDPA + ``causal_max_logits`` by tests/test_model.py on CUDA (benchmarks/gpu_check.sh)."""
    if not q_BHTd.is_cuda:
        raise ValueError("model.attention_impl: flex needs CUDA tensors (flex attention's max scores are not "
                         "implemented on CPU); use attention_impl: sdpa there")
    from torch.nn.attention.flex_attention import AuxRequest

    T = q_BHTd.shape[2]
    block_mask = _causal_block_mask(T, str(q_BHTd.device)) if documents is None else documents.block_mask
    out, aux = _compiled_flex()(q_BHTd, k_BHTd, v_BHTe, block_mask=block_mask,
                                scale=scale, return_aux=AuxRequest(max_scores=True))
    return out, aux.max_scores.detach().float().amax(dim=(0, 2))


class Attention(_AttentionBase, nn.Module):
    """Multi-head attention with grouped KV heads (n_kv_heads == n_heads is plain MHA)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.yarn = Yarn.from_config(cfg)
        self.scale = cfg.head_dim ** -0.5 * (self.yarn.softmax_scale if self.yarn else 1.0)
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.v_dim = cfg.head_dim
        self._init_stats(cfg)

    def _qkv(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k [B, H, T, hd] after RoPE (k, v repeated to the query heads) and v [B, H, T, hd]."""
        B, T, _ = x_BTD.shape
        # head counts come from the weights so tensor parallelism can shard heads without touching this code
        hd = self.head_dim
        q = self.q_proj(x_BTD).view(B, T, -1, hd).transpose(1, 2)
        k = self.k_proj(x_BTD).view(B, T, -1, hd).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, -1, hd).transpose(1, 2)
        cos, sin = rope_cos_sin(T, hd, self.rope_theta, x_BTD.device, q.dtype, self.yarn, positions_BT)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return q, k, v

    def qk_clip_spec(self) -> dict:
        return {"kind": "mha", "q_weight": self.q_proj.weight, "k_weight": self.k_proj.weight,
                "n_heads": self.q_proj.weight.shape[0] // self.head_dim,
                "n_kv_heads": self.k_proj.weight.shape[0] // self.head_dim,
                "head_dim": self.head_dim, "max_logits": self.max_logits_H,
                "module": self, "measure": self.probe_max_logits}

    def init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        return {"q_proj.weight": normal(std), "k_proj.weight": normal(std), "v_proj.weight": normal(std),
                "o_proj.weight": normal(out_std)}


class MLAttention(_AttentionBase, nn.Module):
    """DeepSeek-V3 multi-head latent attention: low-rank KV (and optionally Q) with a shared rotary key."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.rope_theta = cfg.kv_lora_rank, cfg.rope_theta
        self.yarn = Yarn.from_config(cfg)
        self.scale = (self.dn + self.dr) ** -0.5 * (self.yarn.softmax_scale if self.yarn else 1.0)
        q_out = cfg.n_heads * (self.dn + self.dr)
        # DeepseekV3's attention_bias (q_a, kv_a, o): QK-Clip stays exact, as q_a's and kv_a's outputs feed RMSNorms
        # or the shared rotary key, which clipping never scales, and o_proj comes after the logits
        bias = cfg.attention_bias
        if cfg.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, cfg.kv_lora_rank + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.dv, cfg.dim, bias=bias)
        self.v_dim = self.dv
        self._init_stats(cfg)

    @property
    def _q_weight(self) -> torch.Tensor:
        return self.q_b_proj.weight if hasattr(self, "q_b_proj") else self.q_proj.weight

    def _qkv(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k [B, H, T, dn + dr] (nope | rope parts, the rotary key shared by all heads) and v [B, H, T, dv]."""
        q_in = self.q_a_layernorm(self.q_a_proj(x_BTD)) if hasattr(self, "q_b_proj") else self.q_proj(x_BTD)
        kv_c, k_rope = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.dr], dim=-1)
        positions = () if positions_BT is None else (positions_BT,)
        return self.qkv_up(q_in, self.kv_a_layernorm(kv_c), k_rope, *positions)

    def qkv_up(self, q_in: torch.Tensor, kv_c: torch.Tensor, k_rope: torch.Tensor,
               positions_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The up-projections from the latents (q_b_proj, or q itself without q compression; kv_b_proj), RoPE and
        the assembly of q, k, v (v zero-padded to the q/k width for SDPA: see ``_sdpa``): a region memory techniques
        wrap (parallel/regions.py)."""
        B, T, _ = q_in.shape
        dn, dr, dv = self.dn, self.dr, self.dv
        q = self.q_b_proj(q_in) if hasattr(self, "q_b_proj") else q_in
        q = q.view(B, T, -1, dn + dr).transpose(1, 2)
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        kv = self.kv_b_proj(kv_c).view(B, T, -1, dn + dv).transpose(1, 2)
        k_nope, v = kv.split([dn, dv], dim=-1)
        H = q.shape[1]
        cos, sin = rope_cos_sin(T, dr, self.rope_theta, q.device, q.dtype, self.yarn, positions_BT)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(B, 1, T, dr), cos, sin).expand(B, H, T, dr)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        if self.attention_impl == "sdpa" and dv < dn + dr:
            v = F.pad(v, (0, dn + dr - dv))
        return q, k, v

    def qk_clip_spec(self) -> dict:
        return {"kind": "mla", "q_weight": self._q_weight, "kv_b_weight": self.kv_b_proj.weight,
                "n_heads": self.kv_b_proj.weight.shape[0] // (self.dn + self.dv),
                "qk_nope_head_dim": self.dn, "qk_rope_head_dim": self.dr, "v_head_dim": self.dv,
                "max_logits": self.max_logits_H, "module": self, "measure": self.probe_max_logits}

    def init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        rules = {f"{name}.weight": normal(std) for name in ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa",
                                                             "kv_b_proj") if hasattr(self, name)}
        for name in ("q_a_layernorm", "kv_a_layernorm"):
            if hasattr(self, name):
                rules.update(prefixed(name, getattr(self, name).init_rules()))
        rules["o_proj.weight"] = normal(out_std)
        rules.update({f"{name}.bias": ZEROS for name in ("q_a_proj", "kv_a_proj_with_mqa", "o_proj")
                      if hasattr(self, name) and getattr(self, name).bias is not None})
        return rules


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLAttention(cfg) if cfg.attn_type == "mla" else Attention(cfg)


__all__ = ["Attention", "MLAttention", "build_attention"]
