"""What autograd keeps for backward, per micro batch and rank, as the planner counts it (parallel/plan.py): the
list of storages each layer saves (``saved_items``), then what the memory techniques do to that list, the way the
mechanisms themselves act (parallel/recompute.py, fp8_storage.py, activation_offload.py, models/loss.py):

- ``selective`` recompute drops the storages its regions stop keeping and adds the region inputs nobody else keeps;
- ``full`` recompute keeps each block's input and the results of its collectives (replayed, not re-sent), and
  rebuilds one block's activations during its backward (``recompute_transient``);
- FP8 storage stores its points' tensors as 1 byte per element + a float32 scale per 128;
- activation offload moves every storage a block keeps (>= 64 KiB, FP8 tiles too) to the host;
- the chunked loss keeps no [tokens, vocab] log-probabilities.

Each storage counts once (what tests/audit.py ``SavedBytes`` measures), in its dtype: the activation dtype of the
residual stream, the compute dtype of GEMM outputs, float32 for norm statistics, router scores and the MoE combine.
Routed rows are the tokens times top-k on every rank (uniform routing; expert parallelism moves rows, not their
number, in expectation). Checked against measured saved bytes for every setting in tests/test_plan.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from parallel.activation_offload import ActivationOffload
from parallel.fp8_storage import TILE
from parallel.precision import PrecisionPolicy
from parallel.recompute import RECOMPUTE_MODULES

OFFLOAD_MIN_BYTES = ActivationOffload().min_bytes


@dataclass(frozen=True)
class Saved:
    """One storage kept for backward: ``rows`` x ``cols`` elements of ``itemsize`` bytes."""

    name: str
    rows: int
    cols: int
    itemsize: int
    dropped_by: tuple[str, ...] = ()  # selective recompute modules that stop keeping it
    added_by: tuple[str, ...] = ()  # selective recompute modules that keep it (it exists only with one of them)
    fp8: str | None = None  # the FP8 point that stores it
    fp8_stored: bool = False

    @property
    def nbytes(self) -> int:
        if self.fp8_stored:
            tiles = math.ceil(self.cols / TILE)
            return self.rows * tiles * (TILE + 4)
        return self.rows * self.cols * self.itemsize

    def offloaded(self, min_bytes: int) -> int:
        """The bytes activation offload moves to the host: each storage of at least ``min_bytes`` (FP8 tiles are
        two, their data and their scales)."""
        if self.fp8_stored:
            tiles = self.rows * math.ceil(self.cols / TILE)
            return sum(n for n in (tiles * TILE, tiles * 4) if n >= min_bytes)
        return self.nbytes if self.nbytes >= min_bytes else 0


@dataclass(frozen=True)
class Techniques:
    recompute: str = "none"
    modules: frozenset = frozenset(RECOMPUTE_MODULES)
    fp8: frozenset = frozenset()
    offload: bool = False
    loss_chunk_tokens: int = 0

    @classmethod
    def from_config(cls, cfg) -> "Techniques":
        p = cfg.parallel
        return cls(p.recompute_mode, frozenset(p.recompute_modules or RECOMPUTE_MODULES), frozenset(p.fp8_activations),
                   p.activation_offload, cfg.model.loss_chunk_tokens)

    @property
    def selective(self) -> frozenset:
        return self.modules if self.recompute == "selective" else frozenset()


@dataclass
class MicroBatch:
    """Bytes one micro batch keeps on this rank until its backward: ``device`` and ``host`` (offloaded)."""

    device: int = 0
    host: int = 0
    per_layer: dict[int, int] = field(default_factory=dict)  # device + host of each layer (full recompute's transient)
    quantize_transient: int = 0  # float32 working copies while the largest FP8 tensor is quantized (4 of them)
    largest: int = 0  # the largest activation of a layer, whatever the techniques keep (its ops make it anyway)
    block_hosts: list[int] = field(default_factory=list)  # what each block offloads (offload works in blocks)
    replayed: int = 0  # full recompute: the collectives' results kept for the recomputation (not autograd's)


def _norm(name: str, n: int, d: int, x: int, w: int, stored_cols: int | None = None) -> list[Saved]:
    """RMSNorm of [n, d] in dtype ``x`` with weights ``w``: its float32 input (the input's own storage, ``stored_cols``
    wide, when that is float32), the rsqrt, the normalised input in min(x, w) (for the weight's gradient) and the
    output (its consumer keeps that with recompute too); recomputed, it keeps its input instead of the rest."""
    items = [Saved(f"{name}.rsqrt", n, 1, 4, dropped_by=("norm",)),
             Saved(f"{name}.normed", n, d, min(x, w), dropped_by=("norm",)),  # for the weight's gradient
             Saved(f"{name}.out", n, d, min(x, w))]
    if x == 4:
        return items + [Saved(f"{name}.in", n, stored_cols or d, 4)]
    return items + [Saved(f"{name}.in_f32", n, d, 4, dropped_by=("norm",)),
                    Saved(f"{name}.in", n, stored_cols or d, x, added_by=("norm",))]


def _swiglu(name: str, rows: int, inter: int, c: int, routed: bool = False) -> list[Saved]:
    """gate, up, silu(gate) (what the SwiGLU keeps) and its output (the down GEMM's input); the routed experts'
    SwiGLU sits inside ``moe_down_proj``'s region, which keeps only gate and up."""
    down = ("moe_down_proj",) if routed else ()
    return [Saved(f"{name}.gate", rows, inter, c, fp8="swiglu_input"),
            Saved(f"{name}.up", rows, inter, c, fp8="swiglu_input"),
            Saved(f"{name}.silu", rows, inter, c, dropped_by=("swiglu", *down), fp8="swiglu_input"),
            Saved(f"{name}.h", rows, inter, c, dropped_by=down)]


def saved_items(cfg, layer: int, tp: int, ep: int, policy: PrecisionPolicy, tech: Techniques) -> list[Saved]:
    """The storages layer ``layer`` keeps for one micro batch on a rank, after selective recompute and FP8."""
    m, d = cfg.model, cfg.data
    N, D = d.micro_batch_size * d.seq_len, m.dim
    a = policy.activation_dtype.itemsize
    w = policy.param_dtype.itemsize
    c = min(policy.compute_dtype.itemsize, w)  # GEMM outputs: bf16 under bf16 parameters or autocast
    o = min(a, w)  # norm outputs
    H = m.n_heads // tp
    items = _norm(f"l{layer}.input_norm", N, D, a, w)
    if m.attn_type == "mla":
        dq = m.qk_nope_head_dim + m.qk_rope_head_dim
        kv_cols = m.kv_lora_rank + m.qk_rope_head_dim
        if m.q_lora_rank:
            items += _norm(f"l{layer}.q_norm", N, m.q_lora_rank, c, w)
        else:
            items.append(Saved(f"l{layer}.q_proj_out", N, H * dq, c, added_by=("mla_up_proj",)))  # the up input
        # kv_a's output [N, kv_lora_rank + rope]: the kv norm's input (a view), and the rotary key the recomputed
        # up region starts from (its recipe keeps it); one storage
        items += _norm(f"l{layer}.kv_norm", N, m.kv_lora_rank, c, w, stored_cols=kv_cols)
        if c != 4:
            items.append(Saved(f"l{layer}.kv_norm.in", N, kv_cols, c, added_by=("norm", "mla_up_proj")))
        v_cols = dq if m.v_head_dim < dq else m.v_head_dim
        items += [Saved(f"l{layer}.rope_cos_sin", 2 * d.seq_len, m.qk_rope_head_dim // 2, c),
                  Saved(f"l{layer}.q", N, H * dq, c, dropped_by=("mla_up_proj",)),
                  Saved(f"l{layer}.k", N, H * dq, c, dropped_by=("mla_up_proj",)),
                  Saved(f"l{layer}.v", N, H * v_cols, c, dropped_by=("mla_up_proj",)),
                  Saved(f"l{layer}.attn_out", N, H * v_cols, c), Saved(f"l{layer}.lse", N, H, 4),
                  Saved(f"l{layer}.o_proj_in", N, H * m.v_head_dim, c)]
    else:
        hd, Hkv = m.head_dim, m.n_kv_heads // tp
        items += [Saved(f"l{layer}.q", N, H * hd, c), Saved(f"l{layer}.k", N, H * hd, c),
                  Saved(f"l{layer}.v", N, (H if H != Hkv else Hkv) * hd, c), Saved(f"l{layer}.attn_out", N, H * hd, c),
                  Saved(f"l{layer}.lse", N, H, 4), Saved(f"l{layer}.o_proj_in", N, H * hd, c),
                  Saved(f"l{layer}.rope_cos_sin", 2 * d.seq_len, hd // 2, c)]
    items += _norm(f"l{layer}.post_norm", N, D, a, w)
    if layer < m.first_k_dense:
        items += _swiglu(f"l{layer}.ffn", N, m.inter_dim // tp, c)
    else:
        R, E = N * m.n_activated_experts, m.n_routed_experts
        items += [Saved(f"l{layer}.router_in_f32", N, D, 4)] if o != 4 else []
        items += [Saved(f"l{layer}.scores", N, E, 4), Saved(f"l{layer}.topk_idx", N, m.n_activated_experts, 8),
                  Saved(f"l{layer}.topk_w", N, m.n_activated_experts, 4),
                  *([Saved(f"l{layer}.topk_denominator", N, 1, 4)] if m.norm_topk_prob else []),
                  Saved(f"l{layer}.token_of", R, 1, 8), Saved(f"l{layer}.order", R, 1, 8),
                  Saved(f"l{layer}.rows", R, D, c, fp8="moe_up_input"),
                  *_swiglu(f"l{layer}.experts", R, m.moe_inter_dim, c, routed=True),
                  Saved(f"l{layer}.expert_out_f32", R, D, 4), Saved(f"l{layer}.combine_w", R, 1, 4),
                  Saved(f"l{layer}.combined", R, D, 4)]
        if ep > 1:
            items.append(Saved(f"l{layer}.ep_order", R, 1, 8))
        if m.n_shared_experts:
            items += _swiglu(f"l{layer}.shared", N, m.moe_inter_dim * m.n_shared_experts // tp, c)
    return _apply(items, tech)


def _apply(items: list[Saved], tech: Techniques) -> list[Saved]:
    """Selective recompute (drop and add) and FP8 storage on a layer's storages; one storage per name."""
    sel = tech.selective
    kept: dict[str, Saved] = {}
    for x in items:
        if set(x.dropped_by) & sel or (x.added_by and not set(x.added_by) & sel):
            continue
        kept.setdefault(x.name, replace(x, fp8_stored=x.fp8 in tech.fp8))
    return list(kept.values())


def block_input(cfg, policy: PrecisionPolicy) -> Saved:
    d = cfg.data
    return Saved("block_in", d.micro_batch_size * d.seq_len, cfg.model.dim, policy.activation_dtype.itemsize)


def replayed(cfg, layer: int, tp: int, ep: int, policy: PrecisionPolicy) -> list[Saved]:
    """What full recompute keeps of a block's collectives (their results, handed back to the recomputation)."""
    m, d = cfg.model, cfg.data
    N, D = d.micro_batch_size * d.seq_len, m.dim
    c = min(policy.compute_dtype.itemsize, policy.param_dtype.itemsize)
    out = []
    if ep > 1 and layer >= m.first_k_dense:
        R = N * m.n_activated_experts
        out += [Saved(f"l{layer}.a2a_dispatch", R, D, c), Saved(f"l{layer}.a2a_combine", R, D, c)]
    if tp > 1:
        out += [Saved(f"l{layer}.tp_attn", N, D, c), Saved(f"l{layer}.tp_ffn", N, D, c)]
    return out


def micro_batch(cfg, layers: list[int], has_first: bool, has_last: bool, tp: int, ep: int,
                policy: PrecisionPolicy, tech: Techniques) -> MicroBatch:
    """Device and host bytes one micro batch keeps on this rank (its layers, the embedding and the head)."""
    m, d = cfg.model, cfg.data
    N = d.micro_batch_size * d.seq_len
    out = MicroBatch()
    for layer in layers:
        if tech.recompute == "full":
            kept = replayed(cfg, layer, tp, ep, policy)
            out.replayed += sum(x.nbytes for x in kept)
            items = [block_input(cfg, policy), *kept]
        else:
            items = saved_items(cfg, layer, tp, ep, policy, tech)
        out.quantize_transient = max([out.quantize_transient] + [16 * x.rows * x.cols for x in items if x.fp8_stored])
        host = sum(x.offloaded(OFFLOAD_MIN_BYTES) for x in items) if tech.offload else 0
        total = sum(x.nbytes for x in items)
        out.device += total - host
        out.host += host
        out.block_hosts.append(host)
        plain = saved_items(cfg, layer, tp, ep, policy, Techniques())
        out.largest = max([out.largest] + [x.nbytes for x in plain])
        out.per_layer[layer] = sum(x.nbytes for x in saved_items(cfg, layer, tp, ep, policy, replace(tech, fp8=frozenset())))
    if has_first:
        out.device += N * 8  # token ids (the embedding's backward)
    if has_last:
        a, w = policy.activation_dtype.itemsize, policy.param_dtype.itemsize
        out.device += sum(x.nbytes for x in _apply(_norm("final_norm", N, m.dim, a, w), tech)) + N * 8  # + targets
        if not tech.loss_chunk_tokens:
            out.device += N * m.vocab_size * 4  # the float32 log-probabilities
    return out


def loss_transient(cfg, policy: PrecisionPolicy, tech: Techniques) -> int:
    """The loss's backward working set: chunked, one chunk's logits, float32 probabilities and their scaled copy,
    and the head weight's float32 gradient sum with one chunk's contribution (in the compute dtype and float32);
    whole, the float32 and compute-dtype gradients of all logits and the head weight's gradient (the float32
    log-probabilities are kept activations)."""
    from models.loss import chunk_size

    m, d = cfg.model, cfg.data
    N, V = d.micro_batch_size * d.seq_len, m.vocab_size
    c = min(policy.compute_dtype.itemsize, policy.param_dtype.itemsize)
    if not tech.loss_chunk_tokens:
        return N * V * (4 + c) + V * m.dim * policy.param_dtype.itemsize
    rows = min(N, chunk_size(tech.loss_chunk_tokens, V))
    return rows * V * (c + 4 + 4) + V * m.dim * (4 + c + (4 if c != 4 else 0))


def recompute_transient(mb: MicroBatch, tech: Techniques) -> int:
    """Full recompute rebuilds one block's activations during its backward (once, not per micro batch)."""
    return max(mb.per_layer.values(), default=0) if tech.recompute == "full" else 0


__all__ = ["MicroBatch", "Saved", "Techniques", "loss_transient", "micro_batch", "recompute_transient", "saved_items"]
