"""Plain-PyTorch DeepSeek-V3 / Kimi-K2 style MoE decoder. No torch.distributed in here."""
from .attention import Attention, MLAttention
from .config import ModelConfig
from .layers import FeedForward, RMSNorm, apply_rope, causal_max_logits, rope_cos_sin
from .moe import MoE, GroupedExperts, Router
from .transformer import Block, Transformer

__all__ = ["Attention", "MLAttention", "ModelConfig", "FeedForward", "RMSNorm", "apply_rope",
           "causal_max_logits", "rope_cos_sin", "MoE", "GroupedExperts", "Router", "Block", "Transformer"]
