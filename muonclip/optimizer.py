"""MuonClip: Muon for hidden matrices, AdamW for the rest, in one ``torch.optim.Optimizer``.

QK-Clip is a separate hook (``muonclip.QKClip``) registered on this optimizer, because it needs the model's
attention statistics; the optimizer itself never looks inside the model.

Usage with any model::

    groups = muonclip.build_param_groups(model.named_parameters(), weight_decay=0.1)
    opt = muonclip.MuonClip(groups, lr=2e-3)

Per-parameter state: Muon ``momentum_buffer``; AdamW ``exp_avg``, ``exp_avg_sq``, ``step`` (float32 scalar
tensor, as in ``torch.optim.AdamW``, but on the parameter's device, as its ``capturable`` mode keeps it), so
``state_dict``/``load_state_dict`` behave like torch optimizers.

A step whose global gradient norm, as ``clip_grad_norm_`` measured it, is not finite leaves the parameters, masters
and state as they were (equal values), decided on the device (``step_ok``): its gradients are zeroed and its
coefficients make it a no-op (muonclip/skip_nonfinite.py).

bf16 (or fp16) parameters, Megatron-style: each gets a float32 ``master`` in its state (``master_weights``), the
state is float32, the update is applied to the master and the parameter is its rounded copy; gradients accumulate
in float32 buffers (``muonclip.main_grads``: the bf16 ``.grad`` is added in and dropped after every backward, so
read them with ``opt.grad(p)``, clip with ``opt.clip_grad_norm_`` and zero with ``opt.zero_grad()``). With
``reduce_group`` the float32 gradients are averaged over that data-parallel group by ``reduce_gradients()`` (DDP's
buckets would hold bf16). ``register_update_hook`` runs code on the master right after each update (QK-Clip
clips there, so master and parameter stay consistent); ``offload_state`` keeps the state in host memory
(``muonclip.offload``).

Distributed parameters (``DTensor``, e.g. after FSDP2 ``fully_shard``): momentum and AdamW run on the local
shard. Newton–Schulz needs whole matrices: replicated tensors and expert stacks sharded on the expert dim
(Shard(0) of a 3-D tensor) are orthogonalised locally; matrix-sharded tensors are all-gathered, orthogonalised
on every rank (redundant but simple) and sliced back to the local shard. Partial placements raise.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support: no DTensor can reach us
    DTensor = ()  # isinstance(x, ()) is always False

from torch.utils.hooks import RemovableHandle

from muonclip.grad_norm import sum_of_squares
from muonclip.main_grads import MainGrads
from muonclip.muon import adamw_apply_, adamw_moments_, apply_muon_update_, muon_momentum_, orthogonalize
from muonclip.newton_schulz import NS_DTYPES, CoefficientSpec, choose_path, ns_schedule
from muonclip.offload import StateOffload
from muonclip.skip_nonfinite import Gate, decide

LOW_PRECISION = (torch.bfloat16, torch.float16)
UpdateHook = Callable[[Tensor, Tensor], None]


def _scalar(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def low_precision(p: Tensor) -> bool:
    return p.dtype in LOW_PRECISION


@torch.no_grad()
def round_into_(master: Tensor, p: Tensor) -> None:
    """Move each element of the float32 ``master`` the least distance that makes it round (to nearest even) to
    the low-precision ``p``: into ``p``'s rounding interval, the half-way points to its neighbours (a half-way
    point rounds to the even neighbour: one float32 step towards ``p`` is strictly inside). After a row scaling
    that ``p`` (rounded from the old master) and its master each took, ``p`` differs from the scaled master by
    the old rounding times the scale plus the new rounding, and the master moves by less than one unit of ``p``
    (measured: about a quarter of the elements of a scaled row move, by at most 0.93 of a unit); elements that
    already round to ``p`` are kept, so a row scaled by exactly 1 is."""
    m = _local(master)
    p_m = _local(p).to(m.device)
    down = torch.nextafter(p_m, torch.full_like(p_m, -math.inf)).float()
    up = torch.nextafter(p_m, torch.full_like(p_m, math.inf)).float()
    target = p_m.float()
    inside = torch.clamp(m, min=(down + target) / 2, max=(target + up) / 2)
    m.copy_(torch.where(inside.to(p_m.dtype) == p_m, inside, torch.nextafter(inside, target)))


class MuonClip(torch.optim.Optimizer):
    """Muon (groups with ``use_muon=True``) + AdamW (``use_muon=False``).

    Args:
        params: param groups, each a dict with a ``use_muon`` bool (see ``build_param_groups``); a group may
            override ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_steps``, ``adamw_betas``,
            ``adamw_eps``. An optional ``names`` list is used in error messages.
        lr: learning rate shared by Muon and AdamW (Muon's update is scaled by 0.2*sqrt(max(A, B)) to match
            AdamW's update RMS).
        momentum, nesterov, ns_steps: Muon momentum (EMA form), Nesterov look-ahead, Newton–Schulz steps.
        weight_decay: decoupled weight decay for both (W <- W * (1 - lr * wd)).
        adamw_betas, adamw_eps: AdamW moments.
        ns_dtype: Newton–Schulz compute dtype: float32 (default; exact enough on CPU), bfloat16 (fast on GPUs,
            what ``torch.optim.Muon`` always uses) or float64 (references).
        ns_eps: floor of the Frobenius norm used to normalise each matrix before Newton–Schulz.
        ns_coefficients: ``"quintic"`` (default, Keller Jordan's), ``"polar_express"`` (per-step, arXiv:2505.16932)
            or explicit (a, b, c) triples (see ``muonclip.newton_schulz``).
        ns_path: ``"standard"`` (default, as ``torch.optim.Muon``), ``"gram"`` (iterate on the small Gram matrix)
            or ``"auto"`` (the one with fewer FLOPs per shape).
        master_weights: keep a float32 master of every bf16/fp16 parameter (default); False updates them in
            place in their own dtype (a baseline that shows what the master buys).
        offload_state: keep the optimizer state (masters included) in host memory between steps.
        reduce_group: average the float32 gradients over this process group in ``reduce_gradients()`` (bf16
            parameters under plain data parallelism; None: none). ``reduce_dtype``: the dtype they travel in.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.1,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        *,
        ns_dtype: torch.dtype = torch.float32,
        ns_eps: float = 1e-7,
        ns_coefficients: CoefficientSpec = "quintic",
        ns_path: str = "standard",
        master_weights: bool = True,
        offload_state: bool = False,
        reduce_group: Any = None,
        reduce_dtype: torch.dtype = torch.float32,
    ) -> None:
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"MuonClip ns_dtype must be one of {NS_DTYPES}, got {ns_dtype}")
        try:
            ns_schedule(ns_coefficients, 1)
            choose_path((1, 1), 1, ns_path, ns_dtype)
        except ValueError as e:
            raise ValueError(f"MuonClip: {e}") from None
        if isinstance(params, Tensor):
            raise ValueError("MuonClip expects param groups (dicts with 'use_muon'), got a single tensor; "
                             "build them with muonclip.build_param_groups(model.named_parameters())")
        self.ns_dtype, self.ns_coefficients, self.ns_path = ns_dtype, ns_coefficients, ns_path
        self.master_weights, self.reduce_group, self.reduce_dtype = master_weights, reduce_group, reduce_dtype
        self._update_hooks: OrderedDict[int, UpdateHook] = OrderedDict()  # weak-referenceable, for RemovableHandle
        # whether the step applies: a 0-dim bool on the device from clip_grad_norm_'s global norm (None: not measured
        # since zero_grad(), the step applies); read it for the step's hooks (QK-Clip, the router bias update)
        self.step_ok: Tensor | None = None
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, ns_eps=ns_eps)
        super().__init__(params, defaults)
        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if any(isinstance(p, DTensor) and low_precision(p) for p in trainable):
            raise ValueError("MuonClip: bf16/fp16 DTensor parameters are not supported; keep FSDP2's sharded "
                             "parameters float32 (MixedPrecisionPolicy(param_dtype=torch.bfloat16) for compute)")
        self.offload = StateOffload(trainable[0].device) if offload_state and trainable else None
        self._main = self._make_main_grads(trainable)
        self._reduced = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        if not isinstance(param_group, dict) or "use_muon" not in param_group:
            keys = sorted(param_group) if isinstance(param_group, dict) else type(param_group).__name__
            raise ValueError(f"MuonClip param group {index} has no 'use_muon' key (got {keys}); build groups with "
                             "muonclip.build_param_groups(model.named_parameters()) or add use_muon=True/False")
        if not isinstance(param_group["use_muon"], bool):
            raise ValueError(f"MuonClip param group {index}: 'use_muon' must be a bool, "
                             f"got {param_group['use_muon']!r}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params, names = group["params"], group.get("names")
        if names is not None and len(names) != len(params):
            raise ValueError(f"MuonClip param group {index}: {len(names)} names for {len(params)} params")
        for key in ("lr", "weight_decay", "momentum", "adamw_eps", "ns_eps"):
            if _scalar(group[key]) < 0:
                raise ValueError(f"MuonClip param group {index}: {key} must be >= 0, got {group[key]}")
        if not all(0.0 <= b < 1.0 for b in group["adamw_betas"]):
            raise ValueError(f"MuonClip param group {index}: adamw_betas must be in [0, 1), got {group['adamw_betas']}")
        if group["use_muon"]:
            for j, p in enumerate(params):
                if p.ndim < 2:
                    name = names[j] if names is not None else f"#{j}"
                    raise ValueError(f"MuonClip: Muon param {name} (group {index}) has shape {tuple(p.shape)}; Muon "
                                     "needs >= 2-D matrices or [E, A, B] stacks: route it to an AdamW group")
                if torch.is_complex(p):
                    raise ValueError(f"MuonClip: Muon does not support complex params (group {index}, #{j})")

    # ------------------------------------------------------------------ precision: masters and float32 gradients
    def _make_main_grads(self, trainable: list[Tensor]) -> MainGrads | None:
        """Float32 gradient buffers for the low-precision parameters (DistributedMuonClip has its own buckets)."""
        low = [p for p in trainable if low_precision(p)]
        return MainGrads(low) if low else None

    def _keeps_master(self, p: Tensor) -> bool:
        return self.master_weights and low_precision(p)

    def grad(self, p: Tensor) -> Tensor | None:
        """The gradient the update uses: the float32 buffer of a bf16 parameter, else ``p.grad``."""
        if self._main is not None and p in self._main:
            return self._main.grad(p)
        return p.grad

    def weight(self, p: Tensor) -> Tensor:
        """What the update changes: ``p``'s float32 master where this rank keeps one, else ``p`` itself."""
        return self.state[p].get("master", p) if p in self.state else p

    def master_params(self) -> dict[str, Tensor]:
        """{parameter name: float32 master} for the masters this rank keeps (needs group "names")."""
        out = {}
        for group in self.param_groups:
            for name, p in zip(group.get("names", ()), group["params"]):
                master = self.state.get(p, {}).get("master")
                if master is not None:
                    out[name] = master
        return out

    @torch.no_grad()
    def sync_params_from_masters(self) -> None:
        """Round every master this rank keeps into its parameter (after masters were loaded or edited)."""
        for group in self.param_groups:
            for p in group["params"]:
                master = self.state.get(p, {}).get("master")
                if master is not None:
                    p.copy_(master)

    def register_update_hook(self, hook: UpdateHook) -> RemovableHandle:
        """``hook(param, weight)`` runs right after each parameter's update, on the rank that updates it, before
        the new value reaches the model (bf16 rounding; under ZeRO-1 the broadcast): ``weight`` is the float32
        master (or the parameter). Edit ``weight`` in place there (QK-Clip does) and every copy follows."""
        handle = RemovableHandle(self._update_hooks)
        self._update_hooks[handle.id] = hook
        return handle

    def updated_elsewhere(self, p: Tensor) -> bool:
        """Whether another rank updates ``p`` and sends it here (ZeRO-1); never for this optimizer."""
        return False

    def row_shards(self) -> dict[str, Any]:
        """{parameter name: ``RowShard``} for the parameters whose state this rank keeps for some rows only (ZeRO-1's
        sliced AdamW tensors); none for this optimizer."""
        return {}

    def master_elsewhere(self, p: Tensor) -> bool:
        """Whether ``p``'s float32 master lives on another rank (ZeRO-1 non-owners of a bf16 parameter)."""
        return self.updated_elsewhere(p) and self._keeps_master(p)

    def _finish_update(self, p: Tensor, weight: Tensor) -> None:
        for hook in self._update_hooks.values():
            hook(p, weight)
        if weight is not p:
            p.copy_(weight)  # round to nearest even

    @torch.no_grad()
    def scale_rows_(self, p: Tensor, scale_R: Tensor) -> None:
        """``p[r, :] *= scale_R[r]`` outside a step (QK-Clip's post-step mode), with no collective: ``p`` is scaled
        in place (in float32, then rounded), which gives the same values on every replica of ``p`` (ZeRO-1's
        replicas hold the same parameter and get the same scales); where this rank keeps ``p``'s float32 master,
        the master is scaled too and kept inside ``p``'s rounding interval (``round_into_``), so ``p`` stays its
        master rounded. A row scaled by exactly 1 (a head that did not clip) keeps every bit; on a clipped row the
        master moves less than one unit of ``p`` from the exact product (the price of identical replicas without a
        broadcast). Not yet done: a master in host memory (``offload_state``) gets the scales and ``p`` copied to
        the host for this, blocking copies per query/key matrix per step in post_step mode (forward mode, Kimi
        K2's, clips in the update and has none); applying the scale when the master is next lent would avoid it."""
        from muonclip.qk_clip import scale_rows_

        weight = self.weight(p)
        scale_rows_(p, scale_R)
        if weight is not p:
            scale_rows_(weight, scale_R)
            round_into_(weight, p)

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def init_state(self) -> None:
        """Create zero state (and the float32 masters) for every trainable param now (checkpoint loading can then
        load in place). Same values the first ``step()`` would create; params with ``requires_grad=False`` get no
        state."""
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad or self.state.get(p):
                    continue
                self._init_param_state(p, group["use_muon"])

    def _init_param_state(self, p: Tensor, use_muon: bool, like: Tensor | None = None) -> dict[str, Any]:
        """``p``'s state, shaped and valued like ``like`` (default ``p``; ZeRO-1's rows of a sliced ``p``)."""
        state = self.state[p]
        like = p if like is None else like
        if self._keeps_master(p):
            state["master"] = like.detach().float()
        wide = torch.promote_types(p.dtype, torch.float32)  # float32 state for a bf16 parameter, master or not
        if use_muon:
            state["momentum_buffer"] = torch.zeros_like(like, dtype=wide, memory_format=torch.preserve_format)
        else:  # on the device: a skipped step leaves it without the host knowing (muonclip/skip_nonfinite.py)
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            state["exp_avg"] = torch.zeros_like(like, dtype=wide, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(like, dtype=wide, memory_format=torch.preserve_format)
        if self.offload is not None:
            self.offload.send_home(state)
        return state

    def state_bytes(self, where: str | None = None) -> int:
        """Bytes of this rank's optimizer state (masters included): ``"host"`` (offloaded), ``"device"`` or all."""
        total = 0
        for st in self.state.values():
            for value in st.values():
                if isinstance(value, Tensor):
                    on_host = self.offload is not None and self.offload.is_home(value)
                    if where is None or (where == "host") == on_host:
                        total += value.numel() * value.element_size()
        return total

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the float32 state (masters, moments) of bf16 parameters stays float32 (torch would
        cast it to the parameter's dtype) and offloaded state goes back to host memory."""
        params = [p for g in self.param_groups for p in g["params"]]
        saved = state_dict.get("state", {})
        wide = {i: st for i, st in saved.items() if isinstance(i, int) and i < len(params) and low_precision(params[i])}
        super().load_state_dict({**state_dict, "state": {i: st for i, st in saved.items() if i not in wide}})
        for i, st in wide.items():
            p = params[i]
            self.state[p] = {k: v.to(p.device) if isinstance(v, Tensor) and k != "step" else v for k, v in st.items()}
        for p, st in self.state.items():  # torch leaves a counter where the state dict had it (CPU)
            if isinstance(st.get("step"), Tensor):
                st["step"] = st["step"].to(device=_local(p).device, dtype=torch.float32)
        if self.offload is not None:
            for st in self.state.values():
                self.offload.send_home(st)

    # ------------------------------------------------------------------ gradients
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._main is not None:
            self._main.zero_()
        self._reduced = False
        self.step_ok = None

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the float32 gradients over ``reduce_group`` (once per step; a no-op without it)."""
        if self.reduce_group is None or self._reduced:
            return
        import torch.distributed as dist

        others = [p for g in self.param_groups for p in g["params"]
                  if p.requires_grad and (self._main is None or p not in self._main)]
        if others:
            raise ValueError("MuonClip(reduce_group=...) averages the float32 buffers of bf16 parameters; wrap "
                             "float32 parameters in DistributedDataParallel instead")
        size = dist.get_world_size(self.reduce_group)
        wire = self._main.flat if self.reduce_dtype == self._main.flat.dtype else self._main.flat.to(self.reduce_dtype)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.reduce_group)
        if wire is not self._main.flat:
            self._main.flat.copy_(wire)
        self._main.flat.div_(size)
        self._main.mark_all()
        self._reduced = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale all gradients (float32 buffers included) so their global L2 norm is at most ``max_norm``; return
        the norm before clipping (``max_norm`` inf: measure only). ``torch.nn.utils.clip_grad_norm_``'s arithmetic
        but for the norm, summed from row norms in float64 (muonclip/grad_norm.py: every layout of
        DistributedMuonClip adds up the same rows). A norm that is not finite makes the next ``step()`` a no-op
        (``step_ok``)."""
        self.reduce_gradients()
        grads = [g for g in (self.grad(p) for group in self.param_groups for p in group["params"]) if g is not None]
        device = grads[0].device if grads else torch.device("cpu")
        total = sum((sum_of_squares(g).to(device) for g in grads), torch.zeros((), dtype=torch.float64,
                                                                                 device=device)).sqrt()
        self.step_ok = decide(total)
        if math.isinf(max_norm):
            return total
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))
        return total

    # ------------------------------------------------------------------ step
    def _params_with_grad(self, group: dict[str, Any]) -> list[Tensor]:
        out = []
        for p in group["params"]:
            g = self.grad(p)
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("MuonClip does not support sparse gradients")
            out.append(p)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        gate = Gate(self.step_ok)  # where the step is skipped, its coefficients make it a no-op (skip_nonfinite.py)
        for group in self.param_groups:
            params = self._params_with_grad(group)
            for p in params:
                if not self.state.get(p):
                    self._init_param_state(p, group["use_muon"])
            update = self._muon_update if group["use_muon"] else self._adamw_update
            if self.offload is None:
                for p in params:
                    update(p, group, gate)
            else:  # one parameter's state on the device at a time, the next one's fetched meanwhile
                for i, _ in enumerate(self.offload.lend_in_turn([[self.state[p]] for p in params])):
                    update(params[i], group, gate)
        return loss

    def _muon_update(self, p: Tensor, group: dict[str, Any], gate: Gate) -> None:
        lr, wd = _scalar(group["lr"]), _scalar(group["weight_decay"])
        grad, state, weight = self.grad(p), self.state[p], self.weight(p)
        gate.zero_(_local(grad))  # a skipped step reads zeros (the gradient is spent after the step anyway)
        update = muon_momentum_(_local(grad), _local(state["momentum_buffer"]), group["momentum"], group["nesterov"],
                                gate)
        if isinstance(grad, DTensor):
            update = self._orthogonalize_dtensor(grad, update, group)
        else:
            update = orthogonalize(update, group["ns_steps"], eps=group["ns_eps"], **self._ns_options())
        apply_muon_update_(_local(weight), update, lr=lr, weight_decay=wd, shape=p.shape, gate=gate)
        self._finish_update(p, weight)

    def _ns_options(self) -> dict[str, Any]:
        return dict(ns_dtype=self.ns_dtype, coefficients=self.ns_coefficients, path=self.ns_path)

    def _orthogonalize_dtensor(self, grad: DTensor, update_local: Tensor, group: dict[str, Any]) -> Tensor:
        placements = grad.placements
        if any(pl.is_partial() for pl in placements):
            raise ValueError(f"MuonClip: gradient with Partial placement {placements}; reduce gradients first")
        ns = dict(eps=group["ns_eps"], **self._ns_options())
        whole_local = all(pl.is_replicate() or (grad.ndim == 3 and pl.is_shard(0)) for pl in placements)
        if whole_local:  # every local matrix is a whole matrix
            return orthogonalize(update_local, group["ns_steps"], **ns)
        full = DTensor.from_local(update_local, grad.device_mesh, placements, shape=grad.shape,
                                  stride=grad.stride()).full_tensor()
        out = orthogonalize(full, group["ns_steps"], **ns)
        return distribute_tensor(out, grad.device_mesh, placements, src_data_rank=None).to_local()

    def _adamw_update(self, p: Tensor, group: dict[str, Any], gate: Gate) -> None:
        lr, wd = _scalar(group["lr"]), _scalar(group["weight_decay"])
        betas = tuple(_scalar(b) for b in group["adamw_betas"])
        state, weight, grad = self.state[p], self.weight(p), _local(self.grad(p))
        exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        gate.zero_(grad)  # a skipped step reads zeros (the gradient is spent after the step anyway)
        state["step"].add_(1 if gate.ok is None else gate.ok)
        adamw_moments_(grad, exp_avg, exp_avg_sq, betas, gate)
        adamw_apply_(_local(weight), exp_avg, exp_avg_sq, state["step"], lr=lr, betas=betas, eps=group["adamw_eps"],
                     weight_decay=wd, gate=gate, scratch=self._spent(grad))
        self._finish_update(p, weight)

    def _spent(self, grad: Tensor) -> Tensor | None:
        """Where AdamW may compute its update once the moments have read ``grad``: nowhere here (``grad`` may be the
        caller's ``.grad``); ZeRO-1's gradient buckets are spent after the update."""
        return None
