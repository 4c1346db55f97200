"""Model hyper-parameters (DeepSeek-V3 / Kimi-K2 style MoE decoder)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    # attention
    attn_type: str = "mla"  # "mha" (covers GQA via n_kv_heads) or "mla"
    n_heads: int = 4
    n_kv_heads: int = 4  # mha only
    head_dim: int = 64  # mha only
    q_lora_rank: int = 0  # mla: 0 = plain q_proj, >0 = q_a_proj/q_b_proj
    kv_lora_rank: int = 64  # mla
    qk_nope_head_dim: int = 32  # mla
    qk_rope_head_dim: int = 16  # mla (shared rotary key)
    v_head_dim: int = 32  # mla
    attention_bias: bool = False  # mla: biases on q_a_proj, kv_a_proj_with_mqa and o_proj (DeepseekV3's attention_bias)
    # "sdpa": scaled_dot_product_attention + the chunked float32 max-logit probe (the reference, any device);
    # "flex" (CUDA only): compiled flex attention, whose per-row max scores are the recorded max logits
    attention_impl: str = "sdpa"
    rope_theta: float = 10000.0
    # YaRN RoPE scaling (models/layers.py Yarn), on when yarn_factor > 1; DeepSeek-V3: 40, 4096, 32, 1, 1, 1
    yarn_factor: float = 1.0
    yarn_original_max_seq_len: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    max_seq_len: int = 512
    # keep the residual stream (embeddings, block inputs/outputs) in float32 when the parameters are bf16
    # (Megatron's --fp32-residual-connection); norms still feed bf16 into the GEMMs. Changes no weight.
    fp32_residual: bool = False
    # the loss over token chunks of this many tokens without forming the [tokens, vocab] float32 logits
    # (models/loss.py); 0 = the whole logits at once; -1 = automatic (chunks of <= 256 MiB of float32 logits)
    loss_chunk_tokens: int = 0
    norm_eps: float = 1e-6  # the block and final RMSNorms (DeepseekV3's rms_norm_eps)
    latent_norm_eps: float = 1e-6  # MLA's q_a / kv_a RMSNorms (DeepseekV3 hard-codes 1e-6 for them)
    # feed-forward
    inter_dim: int = 512  # dense SwiGLU layers (first_k_dense)
    first_k_dense: int = 1
    moe_inter_dim: int = 128
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # top-k
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    route_scale: float = 1.0
    norm_topk_prob: bool = True  # renormalise the top-k scores to sum 1 before route_scale (DeepSeek-V3: True)
    bias_update_speed: float = 1e-3  # aux-loss-free balancing step (gamma in DeepSeek-V3)
    seq_aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (alpha in DeepSeek-V3, which uses 1e-4); 0 = off
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"model config: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "inter_dim", "moe_inter_dim"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.attn_type in ("mha", "mla"), f"attn_type must be 'mha' or 'mla', got {self.attn_type!r}")
        need(self.attention_impl in ("sdpa", "flex"),
             f"attention_impl must be 'sdpa' or 'flex' (CUDA), got {self.attention_impl!r}")
        if self.attn_type == "mha":
            need(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
                 f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
            need(self.head_dim > 0 and self.head_dim % 2 == 0, f"head_dim must be even and > 0, got {self.head_dim}")
            need(not self.attention_bias, "attention_bias is implemented for attn_type mla only (as in DeepseekV3)")
        else:
            need(self.q_lora_rank >= 0, "q_lora_rank must be >= 0 (0 disables q compression)")
            need(self.kv_lora_rank > 0, "kv_lora_rank must be > 0 for mla")
            need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim must be even and > 0, got {self.qk_rope_head_dim}")
            need(self.qk_nope_head_dim > 0 and self.v_head_dim > 0, "qk_nope_head_dim and v_head_dim must be > 0")
        need(self.yarn_factor >= 1.0, f"yarn_factor must be >= 1 (1 = plain RoPE), got {self.yarn_factor}")
        if self.yarn_factor > 1:
            need(self.yarn_original_max_seq_len > 0 and self.yarn_beta_fast >= self.yarn_beta_slow > 0,
                 "YaRN needs yarn_original_max_seq_len > 0 and yarn_beta_fast >= yarn_beta_slow > 0")
        need(0 <= self.first_k_dense <= self.n_layers,
             f"first_k_dense ({self.first_k_dense}) must be in [0, n_layers={self.n_layers}]")
        if self.first_k_dense < self.n_layers:
            e, g = self.n_routed_experts, self.n_expert_groups
            need(e > 0, "n_routed_experts must be > 0 when any layer is MoE")
            need(0 < self.n_activated_experts <= e,
                 f"n_activated_experts ({self.n_activated_experts}) must be in [1, n_routed_experts={e}]")
            need(g > 0 and e % g == 0, f"n_routed_experts ({e}) must be divisible by n_expert_groups ({g})")
            need(0 < self.n_limited_groups <= g, f"n_limited_groups must be in [1, n_expert_groups={g}]")
            need(g == 1 or e // g >= 2, "group-limited routing scores groups by their top-2 experts: need >= 2 per group")
            need(self.n_limited_groups * (e // g) >= self.n_activated_experts,
                 "n_limited_groups * experts_per_group must be >= n_activated_experts")
            need(self.n_shared_experts >= 0, "n_shared_experts must be >= 0")
        need(self.bias_update_speed >= 0, "bias_update_speed must be >= 0")
        need(self.seq_aux_loss_alpha >= 0, f"seq_aux_loss_alpha must be >= 0, got {self.seq_aux_loss_alpha}")
        need(self.loss_chunk_tokens >= -1, f"loss_chunk_tokens must be >= 0 tokens, or -1 (automatic), got "
             f"{self.loss_chunk_tokens}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attn_type == "mla" else self.head_dim
