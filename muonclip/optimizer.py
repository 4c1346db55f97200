"""MuonClip: Muon for hidden matrices, AdamW for the rest, in one ``torch.optim.Optimizer``.

QK-Clip is a separate hook (``muonclip.QKClip``) registered on this optimizer, because it needs the model's
attention statistics; the optimizer itself never looks inside the model.

Usage with any model::

    groups = muonclip.build_param_groups(model.named_parameters(), weight_decay=0.1)
    opt = muonclip.MuonClip(groups, lr=2e-3)

Per-parameter state: Muon ``momentum_buffer``; AdamW ``exp_avg``, ``exp_avg_sq``, ``step`` (float32 scalar
tensor, as in ``torch.optim.AdamW``), so ``state_dict``/``load_state_dict`` behave like torch optimizers.

Distributed parameters (``DTensor``, e.g. after FSDP2 ``fully_shard``): momentum and AdamW run on the local
shard. Newton–Schulz needs whole matrices: replicated tensors and expert stacks sharded on the expert dim
(Shard(0) of a 3-D tensor) are orthogonalised locally; matrix-sharded tensors are all-gathered, orthogonalised
on every rank (redundant but simple) and sliced back to the local shard. Partial placements raise.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support: no DTensor can reach us
    DTensor = ()  # isinstance(x, ()) is always False

from muonclip.muon import adamw_step_, apply_muon_update_, muon_momentum_, orthogonalize
from muonclip.newton_schulz import NS_DTYPES, CoefficientSpec, choose_path, ns_schedule


def _scalar(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _params_with_grad(group: dict[str, Any]) -> Iterable[Tensor]:
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("MuonClip does not support sparse gradients")
        yield p


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
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, ns_eps=ns_eps)
        super().__init__(params, defaults)

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

    @torch.no_grad()
    def init_state(self) -> None:
        """Create zero state for every trainable param now (checkpoint loading can then load in place).

        Same values the first ``step()`` would create; params with ``requires_grad=False`` get no state.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad or self.state.get(p):
                    continue
                state = self.state[p]
                if group["use_muon"]:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    self._init_adamw_state(p, state)

    @staticmethod
    def _init_adamw_state(p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        lr, wd = _scalar(group["lr"]), _scalar(group["weight_decay"])
        for p in _params_with_grad(group):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            update = muon_momentum_(_local(p.grad), _local(state["momentum_buffer"]), group["momentum"],
                                    group["nesterov"])
            if isinstance(p.grad, DTensor):
                update = self._orthogonalize_dtensor(p.grad, update, group)
            else:
                update = orthogonalize(update, group["ns_steps"], eps=group["ns_eps"], **self._ns_options())
            apply_muon_update_(_local(p), update, lr=lr, weight_decay=wd, shape=p.shape)

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

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lr, wd = _scalar(group["lr"]), _scalar(group["weight_decay"])
        betas = tuple(_scalar(b) for b in group["adamw_betas"])
        for p in _params_with_grad(group):
            state = self.state[p]
            if "step" not in state:
                self._init_adamw_state(p, state)
            state["step"] += 1
            adamw_step_(_local(p), _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                        state["step"].item(), lr=lr, betas=betas, eps=group["adamw_eps"], weight_decay=wd)
