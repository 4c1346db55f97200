"""What autograd keeps for backward, per micro batch and rank, as the planner counts it (parallel/plan.py): the
list of storages each layer saves (``saved_items``), then what the memory techniques do to that list, the way the
mechanisms themselves act (parallel/recompute.py, fp8_storage.py, activation_offload.py, models/loss.py):

- ``selective`` recompute drops the storages its regions stop keeping and adds the region inputs nobody else keeps;
- ``full`` recompute keeps each block's input and the results of its collectives (replayed, not re-sent), and
  rebuilds one block's activations during its backward (``recompute_transient``);
- FP8 storage stores its points' tensors as 1 byte per element + a float32 scale per 128;
- activation offload moves every storage a block keeps (>= 64 KiB, FP8 tiles too) to the host;
- the chunked loss keeps no [tokens, vocab] log-probabilities;
- document masking keeps no [T, T] mask: SDPA attends per document (their lengths are host ints), flex keeps one
  block mask per micro batch and stage (``document_mask_bytes``); the max-logit probe's chunk is a forward
  working set (``attention_transient``).

Each storage counts once (what tests/audit.py ``SavedBytes`` measures), in its dtype: the activation dtype of the
residual stream, the compute dtype of GEMM outputs (the routed experts' outputs the MoE combine keeps included),
float32 for norm statistics, router scores and the combine weights.
Routed rows are the tokens times top-k on every rank (uniform routing; expert parallelism moves rows, not their
number, in expectation). Checked against measured saved bytes for every setting in tests/test_plan.py.

Under sequence parallelism (parallel/sequence_parallel.py) what lies outside the TP regions has this rank's N/tp
rows (``local_rows``): the block input, the norms, MLA's down projections and latent norms, the router, the routed
rows (N * top-k / tp) and the combine; inside a region the rows are N at features/tp. A column region keeps its
local input and gathers it again in backward (``sp_column_input``: MHA's, the dense FFN's and shared experts' [N/tp,
D], MLA's packed latents, the vocab-split head's). The norm output a region gathers is kept only
where a per-token layer reads it too (MLA's down projections, a float32 router) or ``mla_up_proj`` keeps it as the
region's input. Checked against measured saved
bytes in tests/test_sequence_parallel.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from models.document_mask import block_mask_bytes
from models.layers import MAX_LOGIT_CHUNK
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

    def copies(self, min_bytes: int) -> list[int]:
        """The bytes of each host copy activation offload makes of it: one per storage of at least ``min_bytes``
        (FP8 tiles are two, their data and their scales)."""
        if self.fp8_stored:
            tiles = self.rows * math.ceil(self.cols / TILE)
            return [n for n in (tiles * TILE, tiles * 4) if n >= min_bytes]
        return [self.nbytes] if self.nbytes >= min_bytes else []


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
    largest: int = 0  # the largest activation of a layer, whatever the techniques keep (its ops make it anyway; the
    # MoE combine's float32 rows included)
    block_hosts: list[int] = field(default_factory=list)  # what each block offloads (offload works in blocks)
    block_copies: list[list[int]] = field(default_factory=list)  # the bytes of each host copy of each block
    replayed: int = 0  # full recompute: the collectives' results kept for the recomputation (not autograd's)


def _norm(name: str, n: int, d: int, x: int, w: int, stored_cols: int | None = None) -> list[Saved]:
    """RMSNorm of [n, d] in dtype ``x`` with weights ``w``, in the order it saves them (activation offload lays out its
    host copies in that order): its float32 input (the input's own storage, ``stored_cols`` wide, when that is
    float32), the rsqrt, the normalised input in min(x, w) (for the weight's gradient) and the output (its consumer
    keeps that with recompute too); recomputed, it keeps its input instead of the rest."""
    items = [Saved(f"{name}.rsqrt", n, 1, 4, dropped_by=("norm",)),
             Saved(f"{name}.normed", n, d, min(x, w), dropped_by=("norm",)),  # for the weight's gradient
             Saved(f"{name}.out", n, d, min(x, w))]
    if x == 4:
        return [Saved(f"{name}.in", n, stored_cols or d, 4), *items]
    return [Saved(f"{name}.in", n, stored_cols or d, x, added_by=("norm",)),
            Saved(f"{name}.in_f32", n, d, 4, dropped_by=("norm",)), *items]


def _swiglu(name: str, rows: int, inter: int, c: int, routed: bool = False) -> list[Saved]:
    """gate, up, silu(gate) (what the SwiGLU keeps) and its output (the down GEMM's input); the routed experts'
    SwiGLU sits inside ``moe_down_proj``'s region, which keeps only gate and up."""
    down = ("moe_down_proj",) if routed else ()
    return [Saved(f"{name}.gate", rows, inter, c, fp8="swiglu_input"),
            Saved(f"{name}.up", rows, inter, c, fp8="swiglu_input"),
            Saved(f"{name}.silu", rows, inter, c, dropped_by=("swiglu", *down), fp8="swiglu_input"),
            Saved(f"{name}.h", rows, inter, c, dropped_by=down)]


def local_rows(cfg, N: int) -> int:
    """The rows of ``N`` tokens a rank holds outside the tensor-parallel regions: N/tp under sequence parallelism."""
    p = cfg.parallel
    return N // p.tp if p.sequence_parallel and p.tp > 1 else N


def sp_column_input(name: str, N: int, tp: int, cols: int, c: int) -> Saved:
    """What a column region keeps of its input under sequence parallelism: this rank's [N/tp, cols] part in the
    compute dtype ``c`` (``gather_for_gemms``); backward all-gathers it again (parallel/sequence_parallel.py
    ``column_region``, Megatron's way)."""
    return Saved(f"{name}.sp_column_input", N // tp, cols, c)


def moe_items(name: str, m, N: int, tp: int, ep: int, c: int, o: int, n: int | None = None) -> list[Saved]:
    """What an MoE layer (config ``m``) keeps for ``N`` tokens beside its input: the router's float32 input (when
    the norm output ``o`` is not float32), scores and top-k choice, the dispatch indices and rows, the routed
    experts' SwiGLU, the combine's expert outputs (compute dtype ``c``) and weights, the shared experts. ``n``: the
    rank's own rows under sequence parallelism (router, routed rows, combine); the shared experts then keep their
    local [n, D] input."""
    sp = n is not None and n != N
    n = N if n is None else n
    R, E, D = n * m.n_activated_experts, m.n_routed_experts, m.dim
    items = [Saved(f"{name}.router_in_f32", n, D, 4)] if o != 4 else []
    items += [Saved(f"{name}.scores", n, E, 4), Saved(f"{name}.topk_idx", n, m.n_activated_experts, 8),
              Saved(f"{name}.topk_w", n, m.n_activated_experts, 4),
              *([Saved(f"{name}.topk_denominator", n, 1, 4)] if m.norm_topk_prob else []),
              Saved(f"{name}.token_of", R, 1, 8), Saved(f"{name}.order", R, 1, 8),
              Saved(f"{name}.rows", R, D, c, fp8="moe_up_input"),
              *_swiglu(f"{name}.experts", R, m.moe_inter_dim, c, routed=True),
              Saved(f"{name}.expert_out", R, D, c), Saved(f"{name}.combine_w", R, 1, 4)]
    if ep > 1:  # the permutation to the local experts' order and back
        items += [Saved(f"{name}.ep_order", R, 1, 8), Saved(f"{name}.ep_inverse", R, 1, 8)]
    items.append(Saved(f"{name}.expert_offsets", 1, E // ep, 4))  # the grouped GEMMs' int32 ends of blocks
    if m.n_shared_experts:
        if sp and not c == o == 4:  # its local input: a cast of the norm's output, or (bf16) the output itself,
            # which the caller then drops; a float32 output the router keeps is that input already
            items.append(sp_column_input(f"{name}.shared", N, tp, D, c))
        items += _swiglu(f"{name}.shared", N, m.moe_inter_dim * m.n_shared_experts // tp, c)
    return items


def saved_items(cfg, layer: int, tp: int, ep: int, policy: PrecisionPolicy, tech: Techniques) -> list[Saved]:
    """The storages layer ``layer`` keeps for one micro batch on a rank, after selective recompute and FP8."""
    m, d = cfg.model, cfg.data
    N, D = d.micro_batch_size * d.seq_len, m.dim
    n = local_rows(cfg, N)  # outside the TP regions
    sp = n != N
    a = policy.activation_dtype.itemsize
    w = policy.param_dtype.itemsize
    c = min(policy.compute_dtype.itemsize, w)  # GEMM outputs: bf16 under bf16 parameters or autocast
    o = min(a, w)  # norm outputs
    H = m.n_heads // tp
    # RoPE's cos and sin: [T, d/2], or [B, 1, T, d/2] from per-token positions (context parallelism, reset_positions)
    rope_rows = 2 * d.seq_len * (d.micro_batch_size if cfg.parallel.cp > 1 or d.reset_positions else 1)
    items = _norm(f"l{layer}.input_norm", n, D, a, w)
    if sp and m.attn_type != "mla":  # only the gather reads it: q, k and v keep the gathered input
        items = _gathered_out(items, f"l{layer}.input_norm", [sp_column_input(f"l{layer}.qkv", N, tp, D, c)])
    if m.attn_type == "mla":
        dq = m.qk_nope_head_dim + m.qk_rope_head_dim
        kv_cols = m.kv_lora_rank + m.qk_rope_head_dim
        if m.q_lora_rank:
            items += _norm(f"l{layer}.q_norm", n, m.q_lora_rank, c, w)
        else:
            if sp:  # q_proj gathers the norm's output for itself
                items.append(sp_column_input(f"l{layer}.q_proj", N, tp, D, c))
            items.append(Saved(f"l{layer}.q_proj_out", N, H * dq, c, added_by=("mla_up_proj",)))  # the up input
        # kv_a's output [N, kv_lora_rank + rope]: the kv norm's input (a view), and the rotary key the recomputed
        # up region starts from (its recipe keeps it); one storage
        items += _norm(f"l{layer}.kv_norm", n, m.kv_lora_rank, c, w, stored_cols=kv_cols)
        if c != 4:
            items.append(Saved(f"l{layer}.kv_norm.in", n, kv_cols, c, added_by=("norm", "mla_up_proj")))
        if sp:  # the up projections keep their local latents, packed (their region's input); the local latent
            # norms' outputs (in the weights' dtype) are kept only as the recomputed up region's input
            items = [replace(x, itemsize=w, added_by=("mla_up_proj",))
                     if x.name in (f"l{layer}.q_norm.out", f"l{layer}.kv_norm.out") else x for x in items]
            up = m.kv_lora_rank + m.qk_rope_head_dim + m.q_lora_rank
            items.append(sp_column_input(f"l{layer}.latents", N, tp, up, c))
        v_cols = dq if m.v_head_dim < dq else m.v_head_dim
        items += [Saved(f"l{layer}.rope_cos_sin", rope_rows, m.qk_rope_head_dim // 2, c),
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
                  Saved(f"l{layer}.rope_cos_sin", rope_rows, hd // 2, c)]
    items += _norm(f"l{layer}.post_norm", n, D, a, w)
    if layer < m.first_k_dense:
        if sp:  # only the gather reads the norm's output
            items = _gathered_out(items, f"l{layer}.post_norm", [sp_column_input(f"l{layer}.ffn", N, tp, D, c)])
        items += _swiglu(f"l{layer}.ffn", N, m.inter_dim // tp, c)
    else:
        moe = moe_items(f"l{layer}", m, N, tp, ep, c, o, n)
        if sp and o != 4:  # a float32 copy goes to the router, the gathered rows to the shared experts
            items = _gathered_out(items, f"l{layer}.post_norm", [])
        elif m.n_shared_experts and o != 4:  # the router reads a float32 copy: the shared experts save the norm's
            # output, after the routed experts' tensors
            out = next(i for i, x in enumerate(items) if x.name == f"l{layer}.post_norm.out")
            moe.insert(next(i for i, x in enumerate(moe) if x.name.startswith(f"l{layer}.shared")), items.pop(out))
        items += moe
    return _apply(items, tech)


def _gathered_out(items: list[Saved], norm: str, gathered: list[Saved]) -> list[Saved]:
    """A norm's output only a sequence-parallel gather reads: the consumers keep ``gathered`` in its place."""
    at = next(i for i, x in enumerate(items) if x.name == f"{norm}.out")
    return items[:at] + gathered + items[at + 1:]


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
    return Saved("block_in", local_rows(cfg, d.micro_batch_size * d.seq_len), cfg.model.dim,
                 policy.activation_dtype.itemsize)


def replayed(cfg, layer: int, tp: int, ep: int, policy: PrecisionPolicy) -> list[Saved]:
    """What full recompute keeps of a block's collectives (their results, handed back to the recomputation);
    sequence parallelism's all-gathers and reduce-scatters are run again instead (parallel/recompute.py)."""
    m, d = cfg.model, cfg.data
    N, D = d.micro_batch_size * d.seq_len, m.dim
    c = min(policy.compute_dtype.itemsize, policy.param_dtype.itemsize)
    out = []
    if ep > 1 and layer >= m.first_k_dense:
        R = local_rows(cfg, N) * m.n_activated_experts
        out += [Saved(f"l{layer}.a2a_dispatch", R, D, c), Saved(f"l{layer}.a2a_combine", R, D, c)]
    if tp > 1 and not cfg.parallel.sequence_parallel:
        out += [Saved(f"l{layer}.tp_attn", N, D, c), Saved(f"l{layer}.tp_ffn", N, D, c)]
    if cfg.parallel.cp > 1:  # q, k, v over heads and the attention output back (parallel/context_parallel.py)
        H = m.n_heads // tp
        dq = m.qk_head_dim
        dv = m.v_head_dim if m.attn_type == "mla" else m.head_dim
        v_cols = dq if dv < dq else dv  # MLA's v goes padded to the q/k width
        out += [Saved(f"l{layer}.cp_q", N, H * dq, c), Saved(f"l{layer}.cp_k", N, H * dq, c),
                Saved(f"l{layer}.cp_v", N, H * v_cols, c), Saved(f"l{layer}.cp_out", N, H * dv, c)]
    return out


def _positions(cfg, tech: Techniques) -> int:
    """The per-token RoPE positions a recomputation runs RoPE from again (the block's, or the up region's input),
    one tensor for every layer of a micro batch: under context parallelism an arange of this rank's T/cp tokens
    expanded over the batch, with ``reset_positions`` a view of the whole sequence's [B, T] (int64)."""
    m, d, cp = cfg.model, cfg.data, cfg.parallel.cp
    if not (tech.recompute == "full" or "mla_up_proj" in tech.selective and m.attn_type == "mla"):
        return 0
    if d.reset_positions:
        return d.micro_batch_size * d.seq_len * cp * 8
    return d.seq_len * 8 if cp > 1 else 0


def combine_rows(cfg, layer: int, policy: PrecisionPolicy) -> int:
    """The MoE combine's rows in >= float32 ([tokens x top-k, dim]: the weighted expert outputs in forward, their
    gradients in backward), which its ops make though it keeps the outputs in the compute dtype; 0 for a dense
    layer."""
    m, d = cfg.model, cfg.data
    if layer < m.first_k_dense:
        return 0
    acc = max(4, min(policy.compute_dtype.itemsize, policy.param_dtype.itemsize))
    return local_rows(cfg, d.micro_batch_size * d.seq_len) * m.n_activated_experts * m.dim * acc


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
        copies = [n for x in items for n in x.copies(OFFLOAD_MIN_BYTES)] if tech.offload else []
        host = sum(copies)
        total = sum(x.nbytes for x in items)
        out.device += total - host
        out.host += host
        out.block_hosts.append(host)
        out.block_copies.append(copies)
        plain = saved_items(cfg, layer, tp, ep, policy, Techniques())
        out.largest = max([out.largest, combine_rows(cfg, layer, policy)] + [x.nbytes for x in plain])
        out.per_layer[layer] = sum(x.nbytes for x in saved_items(cfg, layer, tp, ep, policy, replace(tech, fp8=frozenset())))
    out.device += document_mask_bytes(cfg)
    out.device += _positions(cfg, tech)
    if has_first:  # token ids (the embedding's backward); split over TP, the mask of the rank's own ids too
        out.device += N * 8 + (N if tp > 1 else 0)
    if has_last:
        a, w = policy.activation_dtype.itemsize, policy.param_dtype.itemsize
        final = _norm("final_norm", local_rows(cfg, N), m.dim, a, w)
        if local_rows(cfg, N) != N:  # the head keeps its local states (a column region)
            c = min(policy.compute_dtype.itemsize, w)
            final = _gathered_out(final, "final_norm", [sp_column_input("head", N, tp, m.dim, c)])
        # + the targets; split over TP (parallel/vocab_parallel.py) their local ids, the owner mask and the
        # float32 log-sum-exp per token
        out.device += sum(x.nbytes for x in _apply(final, tech)) + N * (8 if tp == 1 else 8 + 1 + 4)
        if not tech.loss_chunk_tokens:
            out.device += N * (m.vocab_size // tp) * 4  # the float32 log-probabilities (tp > 1: of V/tp rows)
    return out


def loss_transient(cfg, policy: PrecisionPolicy, tech: Techniques, tp: int = 1) -> int:
    """The loss's backward working set: chunked, the larger of its loop (one chunk's logits, float32 probabilities
    and their scaled copy, beside the head weight's float32 gradient sum, which each chunk's GEMM adds to in place,
    and the weight's copy in the compute dtype under autocast) and its end (the sum and its cast to the parameters'
    dtype); whole, the float32 and compute-dtype gradients of all logits and the head weight's gradient (the float32
    log-probabilities are kept activations). Under TP (parallel/vocab_parallel.py) of this rank's V/tp rows."""
    from models.loss import chunk_size

    m, d = cfg.model, cfg.data
    N, V = d.micro_batch_size * d.seq_len, m.vocab_size // tp
    p = policy.param_dtype.itemsize
    c = min(policy.compute_dtype.itemsize, p)
    if not tech.loss_chunk_tokens:
        return N * V * (4 + c) + V * m.dim * p
    rows = min(N, chunk_size(tech.loss_chunk_tokens, V))
    loop = rows * V * (c + 4 + 4) + V * m.dim * (4 + (c if c != p else 0))
    return max(loop, V * m.dim * (4 + (p if p != 4 else 0)))


def document_mask_bytes(cfg) -> int:
    """What document masking keeps per micro batch on a stage: flex's block mask (models/document_mask.py), held by
    every layer's attention until backward; nothing on SDPA (each document's span is a view of q, k, v)."""
    d = cfg.data
    if not d.document_mask or cfg.model.attention_impl != "flex":
        return 0
    return block_mask_bytes(d.micro_batch_size, d.seq_len * cfg.parallel.cp)


def attention_transient(cfg, tp: int, policy: PrecisionPolicy) -> int:
    """What the attention core holds while it runs, on top of q, k and v: on SDPA the max-logit probe's block
    (models/layers.py ``causal_max_logits``, in training), over the whole sequence and this rank's heads (after
    context parallelism's exchange), at its largest, the last block: k in float32 (converted once) and the block's
    float32 scores [B, H, C, T], the causal [C, C] square (made once per call), and either the block's float32
    queries (while the GEMM runs) or, with documents, its [B, 1, C, T] mask (after). Flex takes the max logits from
    its kernel."""
    m, d, p = cfg.model, cfg.data, cfg.parallel
    if m.attention_impl != "sdpa":
        return 0
    B, T, H = d.micro_batch_size, d.seq_len * p.cp, m.n_heads // tp // p.cp
    dq = m.qk_head_dim
    C = min(MAX_LOGIT_CHUNK, T)
    low = min(policy.compute_dtype.itemsize, policy.param_dtype.itemsize) != 4  # q and k are copied to float32
    scores = B * H * C * T * 4
    q_f32, k_f32 = (B * H * C * dq * 4, B * H * T * dq * 4) if low else (0, 0)
    document_mask = B * C * T if d.document_mask else 0
    return k_f32 + scores + C * C + max(q_f32, document_mask)  # the causal [C, C] square lives through the loop


def recompute_transient(mb: MicroBatch, tech: Techniques) -> int:
    """Full recompute rebuilds one block's activations during its backward (once, not per micro batch)."""
    return max(mb.per_layer.values(), default=0) if tech.recompute == "full" else 0


__all__ = ["MicroBatch", "Saved", "Techniques", "attention_transient", "combine_rows", "document_mask_bytes",
           "local_rows", "loss_transient", "micro_batch", "moe_items", "recompute_transient", "saved_items",
           "sp_column_input"]
