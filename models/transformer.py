"""The decoder: embeddings, pre-norm blocks (attention + dense FFN or MoE), final norm, LM head."""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import build_attention
from .config import ModelConfig
from .document_mask import Documents
from .init import InitRule, init_module_, normal, prefixed, reset_step_stats_
from .layers import FeedForward, RMSNorm, document_positions
from .loss import head_loss
from .moe import MoE, Router


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg.dim, cfg.inter_dim) if layer_id < cfg.first_k_dense else MoE(cfg)

    def forward(self, x_BTD: torch.Tensor, *documents: Documents | torch.Tensor | None) -> torch.Tensor:
        """``documents``: (Documents[, positions_BT]) under document masking, (None, positions_BT) for positions
        alone (see ``Transformer.forward``)."""
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), *documents)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))

    def init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        return {**prefixed("input_layernorm", self.input_layernorm.init_rules()),
                **prefixed("self_attn", self.self_attn.init_rules(std, out_std)),
                **prefixed("post_attention_layernorm", self.post_attention_layernorm.init_rules()),
                **prefixed("mlp", self.mlp.init_rules(std, out_std))}


class LayerStack(nn.ModuleDict):
    """The blocks keyed by their global layer index: ``stack[i]`` is layer i, iterating yields the blocks in order.
    A pipeline stage deletes the layers it does not run and keeps the global names (``layers.{i}.…``)."""

    def __getitem__(self, i: int | str) -> Block:
        if isinstance(i, slice):
            raise TypeError("model.layers is indexed by global layer index (a stage holds some of them): "
                            "use list(model.layers)[a:b] for positions")
        return super().__getitem__(str(i))

    def __iter__(self):
        return iter(self.values())

    def indices(self) -> list[int]:
        return [int(k) for k in self.keys()]


class Transformer(nn.Module):
    """DeepSeek-V3 / Kimi-K2 style MoE decoder in plain PyTorch (no parallelism inside).

    Build on any device (including ``meta``), then call ``init_weights()`` after allocation. A pipeline stage is
    this model with some layers deleted and ``embed_tokens`` (first stage) / ``norm`` + ``lm_head`` (last stage)
    set to None where it does not hold them: it then maps hidden states to hidden states or to logits.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = LayerStack({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head_in_loss = False  # a pipeline's last stage: return the normed hidden states, the loss applies the head
        self.reset_positions = False  # under document masking: RoPE positions restart at each document (data config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, D] on a stage without embeddings) -> float32 logits [B, T, V], or
        with ``targets`` [B, T] the mean cross entropy (float32; ``head_loss``: chunked with
        ``cfg.loss_chunk_tokens``, never forming the logits) (or hidden states on a stage without the head).

        ``segments`` [B, T] (document masking): the index of each token's document in its packed sample, non-
        decreasing along T; a token then attends only to earlier tokens of its own document, the recorded max
        logits cover exactly those pairs, and with ``reset_positions`` RoPE positions restart at each document.
        ``positions`` [B, T]: each token's RoPE position when ``x`` is part of a longer sequence (context
        parallelism gives them; ``segments`` then cover the whole sequence). The segments become one ``Documents``
        (models/document_mask.py) for all layers: on SDPA their lengths are read here, from host memory when the
        segments come in it (the trainer's way: they are then copied to the device asynchronously), else from the
        device (a host synchronisation on CUDA, once per forward); on flex their block mask is built here."""
        if x.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}")
        h_BTD = self.embed_tokens(x) if self.embed_tokens is not None else x
        if self.cfg.fp32_residual:  # bf16 parameters, float32 residual stream (blocks add bf16 outputs into it)
            h_BTD = h_BTD.to(torch.promote_types(h_BTD.dtype, torch.float32))
        masked = Documents.build(segments, self.cfg.attention_impl, h_BTD.device) if segments is not None else None
        if positions is None and masked is not None and self.reset_positions:
            positions = document_positions(masked.segments_BT)
        documents = (masked,) if masked is not None else ()
        if positions is not None:
            documents = (masked, positions)
        for layer in self.layers:
            h_BTD = layer(h_BTD, *documents)
        if self.lm_head is None:
            return h_BTD
        h_BTD = self.norm(h_BTD)
        if self.head_in_loss:
            return h_BTD
        if targets is not None:
            return self.head_loss(h_BTD, targets)
        logits_BTV = self.lm_head(h_BTD)
        return logits_BTV.to(torch.promote_types(logits_BTV.dtype, torch.float32))  # bf16 -> float32

    def head_loss(self, h_BTD: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """The LM head and the mean cross entropy on final-normed hidden states (models/loss.py)."""
        return head_loss(h_BTD, self.lm_head.weight, targets_BT, self.cfg.loss_chunk_tokens)

    def init_rules(self) -> dict[str, InitRule]:
        """How each parameter (global name) starts: normal(init_std), normal(init_std / sqrt(2 n_layers)) for the
        output projections (o_proj, down_proj), ones for norms, zeros for the router biases."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        rules = {"embed_tokens.weight": normal(std)} if self.embed_tokens is not None else {}
        for i in self.layers.indices():
            rules.update(prefixed(f"layers.{i}", self.layers[i].init_rules(std, out_std)))
        if self.lm_head is not None:
            rules.update({**prefixed("norm", self.norm.init_rules()), "lm_head.weight": normal(std)})
        return rules

    def init_weights(self, seed: int | None = None) -> int:
        """Initialise every parameter from its own generator (models/init.py): the weights depend only on
        ``seed`` (None: drawn from torch's global generator) and the parameter names. Returns the seed."""
        return init_module_(self, self.init_rules(), seed)

    def reset_step_stats(self) -> None:
        """Clear per-step statistics (attention max logits, expert loads); call before each step."""
        reset_step_stats_(self)

    def qk_clip_specs(self) -> list[dict]:
        return [layer.self_attn.qk_clip_spec() for layer in self.layers]

    def moe_routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def set_aux_loss_scale(self, scale: float) -> None:
        """The weight of one forward's loss in the objective the backward computes (1 / micro batches per step):
        the gradient the routers' sequence-wise balance losses get (``MoE.aux_loss_scale``)."""
        for m in self.modules():
            if isinstance(m, MoE):
                m.aux_loss_scale = float(scale)
