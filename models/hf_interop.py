"""Hugging Face interop: our ``Transformer`` <-> a transformers ``DeepseekV3ForCausalLM`` directory.

The directory holds ``config.json`` and ``model.safetensors`` in the layout ``save_pretrained`` writes:
``model.`` prefix on the decoder, ``lm_head.weight`` at top level, routed experts split per expert
(``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``). Reading also accepts a sharded
checkpoint (``model.safetensors.index.json``) and the fused in-memory expert layout
(``mlp.experts.gate_up_proj [E, 2I, D]`` with gate rows first, ``mlp.experts.down_proj [E, D, I]``).

Our parameter names already mirror DeepseekV3, so the mapping is a prefix plus the expert split.
transformers is imported lazily: importing ``models`` stays cheap.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Mapping

import torch

from .config import ModelConfig
from .transformer import Transformer

# HF DeepseekV3 (like the DeepSeek-V3 reference) builds q_a_layernorm/kv_a_layernorm with a fixed eps of 1e-6
# (rms_norm_eps is for the other norms): our latent_norm_eps is that eps.
HF_LATENT_NORM_EPS = 1e-6
_EXPERT_RE = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)")
_MTP_KEY_RE = re.compile(r"model\.layers\.(\d+)\.")


def to_hf_config(cfg: ModelConfig, **overrides):
    """``transformers.DeepseekV3Config`` equivalent to ``cfg``; ValueError for what DeepseekV3 cannot express.

    ``overrides`` are passed to the HF config (e.g. ``bos_token_id``, ``eos_token_id``; they default to None
    because the model config does not know the tokenizer).
    """
    from transformers import DeepseekV3Config

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"to_hf_config: {msg}")

    need(cfg.attn_type == "mla", f"attn_type {cfg.attn_type!r} cannot be exported: transformers DeepseekV3 only "
         "implements MLA (set attn_type: mla)")
    need(cfg.latent_norm_eps == HF_LATENT_NORM_EPS, f"latent_norm_eps={cfg.latent_norm_eps} cannot be exported: "
         f"DeepseekV3 hard-codes eps {HF_LATENT_NORM_EPS} for q_a_layernorm/kv_a_layernorm")
    need(not getattr(cfg, "tie_embeddings", False), "tied embeddings are not supported by this exporter")
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank if cfg.q_lora_rank > 0 else None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_parameters=_rope_parameters(cfg), rope_interleave=True,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        first_k_dense_replace=cfg.first_k_dense, moe_intermediate_size=cfg.moe_inter_dim,
        # HF sizes the shared-expert MLP as moe_intermediate_size * n_shared_experts, like our MoE
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.n_activated_experts, n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=float(cfg.route_scale), hidden_act="silu",
        attention_bias=cfg.attention_bias, tie_word_embeddings=False, num_mtp_layers=0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, architectures=["DeepseekV3ForCausalLM"],
    )
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def _rope_parameters(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.yarn_factor > 1:
        rope.update(rope_type="yarn", factor=float(cfg.yarn_factor),
                    original_max_position_embeddings=cfg.yarn_original_max_seq_len,
                    beta_fast=float(cfg.yarn_beta_fast), beta_slow=float(cfg.yarn_beta_slow),
                    mscale=float(cfg.yarn_mscale), mscale_all_dim=float(cfg.yarn_mscale_all_dim))
    return rope


def _yarn_fields(rope: dict, max_positions: int, need) -> dict:
    """ModelConfig fields for a DeepseekV3 ``rope_parameters`` dict (plain RoPE or YaRN)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {}
    need(rope_type == "yarn", f"rope_parameters type {rope_type!r} is not supported: plain RoPE and YaRN only")
    need(rope.get("attention_factor") is None, "rope_parameters.attention_factor is not supported (YaRN derives it "
         "from factor, mscale and mscale_all_dim)")
    need(rope.get("truncate", True), "rope_parameters.truncate=false is not supported")
    original = rope.get("original_max_position_embeddings")
    need(original, "YaRN rope_parameters need original_max_position_embeddings")
    factor = rope.get("factor") or max_positions / original
    return dict(yarn_factor=float(factor), yarn_original_max_seq_len=int(original),
                yarn_beta_fast=float(rope.get("beta_fast") or 32), yarn_beta_slow=float(rope.get("beta_slow") or 1),
                yarn_mscale=float(rope.get("mscale") or 0.0),
                yarn_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))


def from_hf_config(hf_cfg, **overrides) -> ModelConfig:
    """``ModelConfig`` for a DeepseekV3 config (object or dict); ValueError for features our model lacks.

    ``overrides`` set fields HF does not store (e.g. ``bias_update_speed``) or replace mapped ones.
    """
    if isinstance(hf_cfg, Mapping):
        from transformers import DeepseekV3Config
        hf_cfg = DeepseekV3Config.from_dict(dict(hf_cfg))

    def get(name, default=None):
        return getattr(hf_cfg, name, default)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"from_hf_config: {msg}")

    rope = dict(get("rope_parameters") or {})
    yarn = _yarn_fields(rope, get("max_position_embeddings"), need)
    need(get("rope_interleave", True), "rope_interleave=False is not supported (our RoPE rotates interleaved pairs)")
    need(get("hidden_act", "silu") == "silu", f"hidden_act {get('hidden_act')!r} is not supported (SwiGLU only)")
    need(not get("tie_word_embeddings", False), "tie_word_embeddings=True is not supported")
    n_heads = get("num_attention_heads")
    need(get("num_key_value_heads") in (None, n_heads),
         f"num_key_value_heads ({get('num_key_value_heads')}) must equal num_attention_heads ({n_heads}) for MLA")
    eps = get("rms_norm_eps", 1e-6)
    kwargs = dict(
        vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"), attn_type="mla",
        n_heads=n_heads, n_kv_heads=n_heads, q_lora_rank=get("q_lora_rank") or 0, kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"), attention_bias=bool(get("attention_bias", False)),
        rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
        max_seq_len=get("max_position_embeddings"), norm_eps=eps, latent_norm_eps=HF_LATENT_NORM_EPS,
        inter_dim=get("intermediate_size"), norm_topk_prob=bool(get("norm_topk_prob", True)),
        # first_k_dense_replace >= num_hidden_layers means all layers dense in HF; we require <= n_layers
        first_k_dense=min(get("first_k_dense_replace") or 0, get("num_hidden_layers")),
        moe_inter_dim=get("moe_intermediate_size"),
        n_routed_experts=get("n_routed_experts"), n_shared_experts=get("n_shared_experts") or 0,
        n_activated_experts=get("num_experts_per_tok"), n_expert_groups=get("n_group") or 1,
        n_limited_groups=get("topk_group") or 1, route_scale=float(get("routed_scaling_factor", 1.0)),
        init_std=get("initializer_range", 0.02), **yarn,
    )
    known = {f.name for f in fields(ModelConfig)}
    bad = sorted(set(overrides) - known)
    need(not bad, f"unknown ModelConfig fields in overrides: {bad}")
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


# ---------------------------------------------------------------- state dict mapping (pure functions)

def _hf_name(key: str) -> str:
    return key if key == "lm_head.weight" else f"model.{key}"


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our state-dict keys and shapes for ``cfg`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _zero_shared_keys(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF always builds shared experts; with n_shared_experts=0 they are empty [0, D] / [D, 0] tensors."""
    if cfg.n_shared_experts > 0:
        return {}
    out = {}
    for i in range(cfg.first_k_dense, cfg.n_layers):
        base = f"model.layers.{i}.mlp.shared_experts"
        out.update({f"{base}.gate_proj.weight": (0, cfg.dim), f"{base}.up_proj.weight": (0, cfg.dim),
                    f"{base}.down_proj.weight": (cfg.dim, 0)})
    return out


def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict -> on-disk HF keys (per-expert split). ValueError when keys/shapes don't match ``cfg``."""
    expected = expected_shapes(cfg)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"export: model state does not match its config: missing {missing[:5]}, unexpected "
                         f"{extra[:5]} (export the plain model, not a compiled/DDP/parallelized wrapper)")
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        out.update(hf_items(key, state[key], shape, dtype))
    for name, shape in _zero_shared_keys(cfg).items():
        out[name] = torch.zeros(shape, dtype=dtype or state["embed_tokens.weight"].dtype)
    return out


def hf_items(key: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None
             ) -> list[tuple[str, torch.Tensor]]:
    """One of our tensors as the HF tensors it becomes (an expert stack splits per expert); views where no cast
    is needed (``ShardWriter`` copies what it keeps)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"export: {key} has shape {list(t.shape)}, config expects {list(shape)} "
                         "(export the plain, unsharded model)")

    def cast(name: str, x: torch.Tensor) -> tuple[str, torch.Tensor]:
        # the router bias stays float32, as transformers keeps it (_keep_in_fp32_modules_strict)
        target = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        x = x.detach()
        return name, (x.to(target) if target is not None else x).contiguous()

    m = _EXPERT_RE.fullmatch(key)
    if m:
        return [cast(f"model.layers.{m[1]}.mlp.experts.{e}.{m[2]}.weight", t[e]) for e in range(t.shape[0])]
    return [cast(_hf_name(key), t)]


class _Reader:
    """Tracks which HF keys were used, checks shapes, and names the offending key in every error."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str):
        self.tensors, self.where, self.used = tensors, where, set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"{self.where}: missing key {name!r} (expected shape {list(shape)}); the checkpoint "
                             "does not match its config.json")
        t = self.tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.where}: key {name!r} has shape {list(t.shape)}, config.json implies "
                             f"{list(shape)}")
        self.used.add(name)
        return t


def from_hf_state_dict(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str = "HF checkpoint",
                       n_mtp_layers: int = 0) -> dict[str, torch.Tensor]:
    """HF keys (per-expert or fused experts) -> our state dict; ValueError naming any missing/unexpected/bad key.

    Keys of the ``n_mtp_layers`` multi-token-prediction layers after the last decoder layer are ignored
    (transformers ignores them too).
    """
    r = _Reader(tensors, where)
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes(cfg).items():
        m = _EXPERT_RE.fullmatch(key)
        if not m:
            out[key] = r.take(_hf_name(key), tuple(shape))
            continue
        base, proj = f"model.layers.{m[1]}.mlp.experts", m[2]
        E, rows, cols = shape
        if proj != "down_proj" and r.has(f"{base}.gate_up_proj"):
            fused = r.take(f"{base}.gate_up_proj", (E, 2 * rows, cols))
            out[key] = fused[:, :rows] if proj == "gate_proj" else fused[:, rows:]
        elif proj == "down_proj" and r.has(f"{base}.down_proj"):
            out[key] = r.take(f"{base}.down_proj", (E, rows, cols))
        else:
            out[key] = torch.stack([r.take(f"{base}.{e}.{proj}.weight", (rows, cols)) for e in range(E)])
    for name, shape in _zero_shared_keys(cfg).items():
        if r.has(name):
            r.take(name, shape)
    unexpected, n_mtp_keys = [], 0
    for name in sorted(set(tensors) - r.used):
        m = _MTP_KEY_RE.match(name)
        if m and cfg.n_layers <= int(m[1]) < cfg.n_layers + n_mtp_layers:
            n_mtp_keys += 1
            continue
        if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved this buffer; recomputed from rope_theta
            continue
        unexpected.append(name)
    if unexpected:
        raise ValueError(f"{where}: unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                         f"({len(unexpected)} in all): the checkpoint does not match its config.json")
    if n_mtp_keys:
        warnings.warn(f"{where}: skipped {n_mtp_keys} tensors of {n_mtp_layers} multi-token-prediction layer(s) "
                      f"(model.layers.{cfg.n_layers}..): the model here has no MTP head", stacklevel=2)
    return out


# ---------------------------------------------------------------- files

def export_hf(model: Transformer, out_dir: str | Path, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 5 * 10**9, **config_overrides) -> Path:
    """Write ``model`` (plain, unparallelized) as a DeepseekV3ForCausalLM directory; returns ``out_dir``.

    ``dtype`` casts the weights (default: as they are); shards of at most ``max_shard_bytes``;
    ``config_overrides`` go to ``to_hf_config``.
    """
    cfg: ModelConfig = model.cfg
    out = write_hf_config(cfg, out_dir, dtype or next(model.parameters()).dtype, **config_overrides)
    with ShardWriter(out, max_shard_bytes) as writer:
        for name, t in to_hf_state_dict(model.state_dict(), cfg, dtype).items():
            writer.add(name, t)
    return out


def write_hf_config(cfg: ModelConfig, out_dir: str | Path, dtype: torch.dtype, **config_overrides) -> Path:
    """config.json of an export (with transformers 4.x's legacy RoPE fields); warns about transformers 5's
    expert kernel where it cannot run."""
    hf_cfg = to_hf_config(cfg, **config_overrides)
    hf_cfg.dtype = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg.save_pretrained(out)
    add_legacy_rope_fields(out / "config.json")
    if (cfg.moe_inter_dim * 4) % 16:
        warnings.warn(f"moe_intermediate_size={cfg.moe_inter_dim}: transformers 5's default expert kernel "
                      "(grouped_mm) needs row strides that are a multiple of 16 bytes and fails on this model; load "
                      "it with from_pretrained(..., experts_implementation='eager')", stacklevel=3)
    return out


class ShardWriter:
    """Safetensors shards of at most ``max_bytes`` each (one tensor larger than that gets a shard of its own),
    written as tensors arrive, so memory holds one shard: ``model.safetensors`` when one is enough, else
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, the names save_pretrained uses."""

    def __init__(self, out: Path, max_bytes: int = 5 * 10**9):
        self.out, self.max_bytes = Path(out), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.files, self.weight_map, self.total = 0, [], {}, 0

    def reserve(self, size: int) -> None:
        """Start a new shard now if ``size`` more bytes would not fit (call before reading a tensor, so the
        read and the shard in memory together stay within about two shards)."""
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        self.reserve(size)
        self.pending[name] = t.clone()  # its own storage: t may be a view of a larger tensor or a live parameter
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file
        path = self.out / f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is not None:
            for path, _ in self.files:
                path.unlink(missing_ok=True)
            return
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        for i, (path, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.replace(self.out / final)
            self.weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def add_legacy_rope_fields(config_json: Path) -> None:
    """transformers 5 writes RoPE settings only in ``rope_parameters``; transformers 4.x reads only the top-level
    ``rope_theta`` / ``rope_scaling`` and would silently use theta 10000. Write both, with the same values."""
    data = json.loads(config_json.read_text())
    rope = dict(data.get("rope_parameters") or {})
    data["rope_theta"] = rope.get("rope_theta", data.get("rope_theta"))
    extra = {k: v for k, v in rope.items() if k != "rope_theta"}
    data["rope_scaling"] = None if extra.get("rope_type", "default") == "default" else extra
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_hf_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: ``model.safetensors`` or the shards named by its index file."""
    from safetensors.torch import load_file

    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(path / shard)))
        return tensors
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (an HF model directory "
                            "written by save_pretrained or export_hf is expected)")


HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2")  # Kimi K2's config.json names DeepseekV3 as its architecture


def read_hf_config(path: str | Path):
    """The DeepseekV3Config of a model directory, after checking the keys DeepseekV3Config itself ignores:
    ``model_type`` (deepseek_v3 or kimi_k2), ``scoring_func`` (sigmoid) and ``topk_method`` (noaux_tc), which
    released DeepSeek-V3 / Kimi K2 configs carry."""
    from transformers import DeepseekV3Config

    path = Path(path)
    config_json = path / "config.json"
    if not config_json.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected an HF DeepseekV3 model directory)")
    try:
        raw = json.loads(config_json.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_json}: not valid JSON ({e})") from e
    checks = [("model_type", raw.get("model_type"), HF_MODEL_TYPES),
              ("scoring_func", raw.get("scoring_func", "sigmoid"), ("sigmoid",)),
              ("topk_method", raw.get("topk_method", "noaux_tc"), ("noaux_tc",))]
    for key, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"{config_json}: {key} {value!r} is not supported (supported: {', '.join(allowed)}); "
                             "this model is DeepSeek-V3 / Kimi K2 style: sigmoid router scores with aux-loss-free "
                             "bias (noaux_tc)")
    raw = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type")}
    try:
        return DeepseekV3Config.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:  # transformers' checks (e.g. rope_scaling without its keys)
        raise ValueError(f"{config_json}: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from e


class HFTensors:
    """Read tensors of an HF directory one at a time, or slices of them (``model.safetensors`` or the shards of
    its index): memory for what is asked, never the whole checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.path / "model.safetensors").is_file():
            from safetensors import safe_open
            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                self.files = {k: self.path / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _part(self, name: str):
        from safetensors import safe_open
        if name not in self.files:
            raise ValueError(f"{self.path}: missing key {name!r}; the checkpoint does not match its config.json")
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), "pt")
        return self._open[file].get_slice(name)

    def slice(self, name: str, index: tuple = ()) -> torch.Tensor:
        part = self._part(name)
        return part[index] if index else part[:]

    def shape(self, name: str) -> list[int]:
        """The stored shape of tensor ``name`` (from the file's header)."""
        return list(self._part(name).get_shape())

    def local(self, key: str, local_shape: tuple[int, ...], expert_offset: int = 0,
              shard: tuple[int, int] | None = None) -> torch.Tensor:
        """Our parameter ``key`` as this rank holds it: experts ``expert_offset`` onward of a stack (with ``shard`` =
        (dim, offset), each expert's slice along the stack's ``dim``), or the slice ``shard`` of a tensor-parallel
        matrix."""
        m = _EXPERT_RE.fullmatch(key)
        if m:  # ``shard`` = (dim, offset) of a stack: each expert's slice (expert tensor parallelism)
            base, proj = f"model.layers.{m[1]}.mlp.experts", m[2]
            E, rows, cols = local_shape
            experts = range(expert_offset, expert_offset + E)
            first, count = (shard[1], local_shape[shard[0]]) if shard else (0, None)
            part = slice(first, None if count is None else first + count)
            if f"{base}.{expert_offset}.{proj}.weight" in self:  # [I, H] gate/up, [H, I] down
                index = (slice(None), part) if proj == "down_proj" else (part,)
                return torch.stack([self.slice(f"{base}.{e}.{proj}.weight", index) for e in experts])
            if proj == "down_proj":
                return self.slice(f"{base}.down_proj", (slice(experts.start, experts.stop), slice(None), part))
            inter = self.shape(f"{base}.gate_up_proj")[1] // 2  # [E, 2I, H], the first I rows gate
            start = first + (0 if proj == "gate_proj" else inter)
            return self.slice(f"{base}.gate_up_proj", (slice(experts.start, experts.stop), slice(start, start + rows)))
        if shard is None:
            t = self.slice(_hf_name(key))
        else:
            dim, offset = shard
            index = tuple(slice(offset, offset + local_shape[d]) if d == dim else slice(None)
                          for d in range(len(local_shape)))
            t = self.slice(_hf_name(key), index)
        if tuple(t.shape) != tuple(local_shape):
            raise ValueError(f"{self.path}: key {_hf_name(key)!r} gives shape {list(t.shape)}, this rank expects "
                             f"{list(local_shape)}; the checkpoint does not match its config.json")
        return t


def import_hf(path: str | Path, dtype: torch.dtype | None = None, **config_overrides) -> Transformer:
    """Build our ``Transformer`` from a DeepseekV3 directory (config.json + safetensors).

    ``config_overrides`` set ModelConfig fields HF does not store (e.g. ``bias_update_speed``).
    """
    path = Path(path)
    hf_cfg = read_hf_config(path)
    cfg = from_hf_config(hf_cfg, **config_overrides)
    state = from_hf_state_dict(load_hf_tensors(path), cfg, where=str(path),
                               n_mtp_layers=getattr(hf_cfg, "num_nextn_predict_layers", 0) or 0)
    model = Transformer(cfg)  # real construction, so every non-persistent buffer is set up as usual
    model.load_state_dict(state, strict=True)  # copies (and casts from the file's dtype) into float32 params
    return model if dtype is None else model.to(dtype)


__all__ = ["to_hf_config", "from_hf_config", "to_hf_state_dict", "from_hf_state_dict", "expected_shapes",
           "export_hf", "import_hf", "load_hf_tensors", "read_hf_config", "HFTensors", "HF_LATENT_NORM_EPS", "HF_MODEL_TYPES"]
