"""Mixture of experts: sigmoid top-k router with aux-loss-free bias, stacked routed experts, shared experts."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .init import ZEROS, InitRule, init_module_, normal, prefixed
from .layers import FeedForward, autocast_off, gemm_dtype, swiglu


class _AddAuxLoss(torch.autograd.Function):
    """Identity on ``x``; its backward also gives ``aux`` (a scalar loss computed inside the layer) the gradient
    ``scale``. A loss added this way reaches its parameters from any layer, also inside a pipeline stage that
    never sees the total loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.aux_dtype = scale, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


class Router(nn.Module):
    """DeepSeek-V3 routing: sigmoid scores, bias only for selection, optional group-limited top-k.

    ``e_score_correction_bias`` is a parameter without gradient: it is moved only by ``update_bias`` (the
    aux-loss-free rule), from loads summed over every rank that saw different tokens.

    With ``seq_aux_loss_alpha > 0`` training forwards also compute DeepSeek-V3's sequence-wise balance loss
    (eq. 17-20 of arXiv:2412.19437): per sequence, ``alpha * sum_i f_i * P_i`` with
    ``f_i = E / (K * T) * (tokens that selected expert i)`` and ``P_i`` the mean over the sequence's tokens of
    expert i's score normalised over all experts; the mean over the micro batch's sequences. ``MoE`` adds it to
    the training objective; ``seq_aux_loss_stat`` keeps [sum, count] of its values over the step's forwards.

    ``sequence_shards`` (set by parallel/ where ranks split each sequence: sequence or context parallelism): ``(n,
    total, grad_scale)``, this router sees 1/n of each sequence's tokens and ``total`` sums a tensor over the n ranks
    holding them. The token counts and the probability means are then summed over them (one collective of [S, 2E]),
    so every rank's loss has the whole sequences' value, and its gradient reaches this rank's tokens' scores only,
    times ``grad_scale``: the sum over the n ranks is one process's gradient once the data-parallel average (over
    context-parallel ranks too: ``grad_scale`` = cp) is taken.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.n_activated_experts
        self.n_groups, self.n_limited_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.route_scale, self.bias_update_speed = cfg.route_scale, cfg.bias_update_speed
        self.norm_topk_prob, self.seq_aux_loss_alpha = cfg.norm_topk_prob, cfg.seq_aux_loss_alpha
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)
        self.register_buffer("expert_load_E", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("seq_aux_loss_stat", torch.zeros(2), persistent=False)
        self.record_stats = True  # False while activation checkpointing recomputes this forward
        self.sequence_shards: tuple[int, Callable[[torch.Tensor], torch.Tensor], int] | None = None

    def forward(self, x_TD: torch.Tensor, n_seqs: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor | None]:
        """Returns (expert ids [T, K] int64, combine weights [T, K] float32, tokens per expert [E] int64, the
        sequence-wise balance loss or None); ``x_TD`` holds ``n_seqs`` sequences of equal length one after the
        other. The weight and the bias may be bf16 and float32 respectively: scores are computed in float32."""
        ct = torch.promote_types(x_TD.dtype, torch.float32)  # routing in >= float32
        with autocast_off(x_TD.device.type):  # autocast would run this linear in bf16
            scores_TE = torch.sigmoid(F.linear(x_TD.to(ct), self.weight.to(ct)))
        choice_TE = scores_TE.detach() + self.e_score_correction_bias.to(ct)
        if self.n_groups > 1:
            T = x_TD.shape[0]
            group_TG = choice_TE.view(T, self.n_groups, -1).topk(2, dim=-1).values.sum(-1)
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_TG.topk(self.n_limited_groups, dim=-1).indices, True)
            keep_TE = keep_TG.repeat_interleave(self.n_experts // self.n_groups, dim=1)
            # -inf (as DeepSeek-V3's reference), not 0.0: biased scores can be negative
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        w_TK = scores_TE.gather(1, idx_TK)
        if self.norm_topk_prob:
            w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
        w_TK = w_TK * self.route_scale
        counts_E = expert_counts(idx_TK, self.n_experts)
        if self.record_stats:
            with torch.no_grad():
                self.expert_load_E += counts_E
        aux = self._seq_aux_loss(scores_TE, idx_TK, n_seqs) if self.training and self.seq_aux_loss_alpha else None
        return idx_TK, w_TK, counts_E, aux

    def _seq_aux_loss(self, scores_TE: torch.Tensor, idx_TK: torch.Tensor, n_seqs: int) -> torch.Tensor:
        E, K = self.n_experts, self.top_k
        T = scores_TE.shape[0] // n_seqs  # this router's tokens of each sequence
        probs_STE = (scores_TE / scores_TE.sum(-1, keepdim=True)).view(n_seqs, T, E)
        selected_SE = torch.zeros(n_seqs, E, device=scores_TE.device, dtype=scores_TE.dtype)
        selected_SE.scatter_add_(1, idx_TK.view(n_seqs, T * K), torch.ones_like(idx_TK, dtype=scores_TE.dtype).view(
            n_seqs, T * K))
        P_SE = probs_STE.mean(1)
        if self.sequence_shards is not None:
            n, total, grad_scale = self.sequence_shards
            both_SE2 = total(torch.cat([selected_SE, P_SE.detach()], -1))
            selected_SE, T = both_SE2[:, :E], T * n
            own_SE = P_SE * grad_scale
            P_SE = (own_SE + (both_SE2[:, E:] - own_SE).detach()) / n  # the whole value, the own tokens' gradient
        f_SE = selected_SE * (E / (K * T))
        aux = self.seq_aux_loss_alpha * (f_SE * P_SE).sum(-1).mean()
        if self.record_stats:
            with torch.no_grad():
                self.seq_aux_loss_stat += torch.stack([aux.detach().float(), aux.new_ones((), dtype=torch.float32)])
        return aux

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        load_E = load_E.to(self.e_score_correction_bias)
        self.e_score_correction_bias.add_(self.bias_update_speed * torch.sign(load_E.mean() - load_E))

    def reset_step_stats(self) -> None:
        self.expert_load_E.zero_()
        self.seq_aux_loss_stat.zero_()

    def init_rules(self, std: float) -> dict[str, InitRule]:
        return {"weight": normal(std), "e_score_correction_bias": ZEROS}

    def init_weights(self, std: float) -> None:
        init_module_(self, self.init_rules(std))


def expert_counts(idx_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, int64 [E]: a scatter-add into zeros (``torch.bincount`` reads its input's
    minimum on the host on CUDA, a synchronisation)."""
    flat = idx_TK.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class GroupedExperts(nn.Module):
    """Routed experts as stacked [E, ...] SwiGLU weights.

    ``forward(x_TD, counts_E)`` takes token rows sorted by expert id with ``counts_E`` tokens per expert.
    The grouped path runs each projection for all experts as one grouped GEMM (``F.grouped_mm`` over the rows,
    expert boundaries from a cumulative sum of the counts): no padding, so its cost does not follow the load
    imbalance, and no host synchronisation. The loop path runs the experts one by one (the reference; it reads the
    counts on the host once per forward). ``expert_path`` chooses between them from the device, its compute
    capability and the dtype (``use_grouped=False``: always the loop). Expert parallelism wraps this module and
    changes which experts it holds.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, use_grouped: bool = True):
        super().__init__()
        self.use_grouped = use_grouped
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if self.path(x_TD.device, x_TD.dtype) == "grouped":
            if torch.compiler.is_compiling() and x_TD.dtype != torch.bfloat16:
                # torch 2.13's fake (tracing) kernel of grouped_mm accepts bf16 only, while the eager CPU kernel
                # also runs float32: under torch.compile these run eagerly (a graph break)
                return _eager_grouped(self, x_TD, counts_E)
            return self._grouped(x_TD, counts_E)
        return self._loop(x_TD, counts_E)

    def path(self, device: torch.device, dtype: torch.dtype) -> str:
        """``"grouped"`` or ``"loop"``: how rows of ``dtype`` on ``device`` run (``expert_path``)."""
        if not self.use_grouped:
            return "loop"
        capability = None
        if device.type == "cuda":  # the properties, not get_device_capability: torch.compile folds them to constants
            props = torch.cuda.get_device_properties(device)
            capability = (props.major, props.minor)
        return expert_path(device.type, capability, dtype, tuple(self.down_proj.shape[1:]))  # dim, inter_dim

    def _loop(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        outs = []
        for e, x_e in enumerate(torch.split(x_TD, counts_E.tolist())):
            h = self.act(x_e @ self.gate_proj[e].T, x_e @ self.up_proj[e].T)
            outs.append(h @ self.down_proj[e].T)
        return torch.cat(outs) if outs else x_TD.new_zeros(0, self.down_proj.shape[1])

    def compute_dtype(self, device_type: str) -> torch.dtype:
        """The dtype the expert GEMMs run in: autocast's where it is on (``grouped_mm`` has no autocast kernel, so
        the MoE casts for it, as autocast does for a matmul), else the weights' (bf16 with bf16 parameters)."""
        return gemm_dtype(device_type, self.down_proj.dtype)

    def _grouped(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if x_TD.shape[0] == 0:
            return x_TD.new_zeros(0, self.down_proj.shape[1])
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)  # end row of each expert's block
        gate_TI, up_TI = self.up_gemms(x_TD, offs_E)
        return self.act_down(gate_TI, up_TI, offs_E)

    # the regions memory techniques wrap (parallel/regions.py): the up GEMMs (their input rows are what they keep
    # for backward), the SwiGLU, and the SwiGLU with the down GEMM
    def up_gemms(self, x_TD: torch.Tensor, offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = x_TD.dtype  # the MoE cast the rows to compute_dtype; float32 weights are cast to it here
        return (F.grouped_mm(x_TD, self.gate_proj.to(dt).transpose(1, 2), offs=offs_E),
                F.grouped_mm(x_TD, self.up_proj.to(dt).transpose(1, 2), offs=offs_E))

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)

    def act_down(self, gate_TI: torch.Tensor, up_TI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        h_TI = self.act(gate_TI, up_TI)
        return F.grouped_mm(h_TI, self.down_proj.to(h_TI.dtype).transpose(1, 2), offs=offs_E)

    def init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        return {"gate_proj": normal(std, per_expert=True), "up_proj": normal(std, per_expert=True),
                "down_proj": normal(out_std, per_expert=True)}

    def init_weights(self, std: float, out_std: float) -> None:
        init_module_(self, self.init_rules(std, out_std))


# CUDA compute capabilities (major) on which torch runs ``grouped_mm`` as one kernel, for bf16 operands and output
# only: sm90 (H100, H200) and sm100 (B200, GB200). Anything else (float32 or fp16 on any GPU, A100's sm80, sm120)
# takes torch's fallback, which copies the offsets to the host in every call (``_grouped_mm_fallback``, ATen's
# cuda/GroupedBlas.cpp: ``offs.cpu()``, then one GEMM per group).
GROUPED_MM_CAPABILITIES = (9, 10)


def expert_path(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                dims: tuple[int, ...]) -> str:
    """How the routed experts run: ``"grouped"`` (grouped GEMMs, no host synchronisation) or ``"loop"`` (one GEMM
    per expert after reading the counts on the host, once per forward).

    ``grouped_mm`` takes float32/bf16/fp16 rows whose ``dims`` (dim, inter_dim) times the element size are
    multiples of 16 bytes, on every device. On CUDA (``capability``: the device's (major, minor)) it runs without
    a host synchronisation only for bf16 on ``GROUPED_MM_CAPABILITIES``; elsewhere its fallback reads the offsets
    on the host in each of a layer's nine grouped GEMMs (three forward, six backward), so the loop, which reads
    them once, is the cheaper choice (torchtitan likewise turns grouped GEMMs off below sm90). CPU and meta
    tensors have no device to synchronise with: the grouped path wherever the kernel takes the rows."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) or any(n * dtype.itemsize % 16 for n in dims):
        return "loop"
    if device_type == "cuda" and not (dtype == torch.bfloat16 and capability is not None
                                      and capability[0] in GROUPED_MM_CAPABILITIES):
        return "loop"
    return "grouped"


@torch.compiler.disable
def _eager_grouped(experts: GroupedExperts, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return experts._grouped(x_TD, counts_E)


class _Combine(torch.autograd.Function):
    """``out[t] = sum of w[r] * y[r] over the rows r of token t``: the top-k expert outputs ``y_RD`` (sorted by
    expert) weighted by their combine weights ``w_R`` and summed per token, in y's dtype widened to >= float32.
    Backward needs ``y`` for the weights' gradient: it keeps it in its own dtype (bf16 under bf16 compute), where
    autograd of the plain ops keeps a float32 copy and the float32 weighted rows (8 bytes per element of the
    [T*K, D] rows instead of 2); the gradients are the same float32 products."""

    @staticmethod
    def forward(ctx, y_RD: torch.Tensor, w_R: torch.Tensor, token_of_R: torch.Tensor, n_tokens: int) -> torch.Tensor:
        ctx.save_for_backward(y_RD, w_R, token_of_R)
        acc = torch.promote_types(y_RD.dtype, torch.float32)  # bf16 -> float32; float64 stays
        out_TD = torch.zeros(n_tokens, y_RD.shape[1], dtype=acc, device=y_RD.device)
        return out_TD.index_add_(0, token_of_R, y_RD * w_R[:, None].to(acc))  # the product in acc (promotion)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_RD, w_R, token_of_R = ctx.saved_tensors
        grad_RD = grad_TD.index_select(0, token_of_R)  # each row's token's gradient, in acc
        grad_w = (grad_RD * y_RD).sum(-1).to(w_R.dtype) if ctx.needs_input_grad[1] else None
        grad_y = grad_RD.mul_(w_R[:, None]).to(y_RD.dtype) if ctx.needs_input_grad[0] else None
        return grad_y, grad_w, None, None


class MoE(nn.Module):
    """Routed experts (``GroupedExperts``, or its expert-parallel replacement) plus shared experts.

    ``aux_loss_scale``: the gradient the router's sequence-wise balance loss gets, i.e. the weight of this micro
    batch's loss in the step's objective (the trainer sets 1 / grad_accum; 1 under pipeline schedules, which
    average the micro batches' gradients themselves)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.aux_loss_scale = cfg.n_activated_experts, 1.0
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = (FeedForward(cfg.dim, cfg.moe_inter_dim * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Dispatch rows in the experts' compute dtype (bf16 under bf16 parameters or autocast, so an expert-parallel
        all-to-all moves bf16), combine the top-k outputs weighted in >= float32 (``_Combine``), return the input's
        dtype."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(-1, D)
        idx_TK, w_TK, counts_E, aux = self.gate(x_TD, n_seqs=B)
        order = torch.argsort(idx_TK.flatten(), stable=True)
        token_of = order // self.top_k
        y_sorted = self.experts(x_TD[token_of].to(self.experts.compute_dtype(x_TD.device.type)), counts_E)
        out_TD = _Combine.apply(y_sorted, w_TK.flatten()[order], token_of, x_TD.shape[0])
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        out_TD = out_TD.to(x_TD.dtype)
        if aux is not None:
            out_TD = _AddAuxLoss.apply(out_TD, aux, self.aux_loss_scale)
        return out_TD.view(B, T, D)

    def init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        rules = {**prefixed("gate", self.gate.init_rules(std)), **prefixed("experts", self.experts.init_rules(std, out_std))}
        if self.shared_experts is not None:
            rules.update(prefixed("shared_experts", self.shared_experts.init_rules(std, out_std)))
        return rules
