"""QK-Clip (Kimi K2): after each optimizer step, rescale query/key weights of heads whose max logit exceeded tau.

Per head h with S_max(h) > tau: gamma_h = tau / S_max(h) (else gamma_h = 1, and the head's weights are left
bit-identical). The logit of head h is bilinear in its query and key weights, so scaling them as below
multiplies the head's future logits (on the same inputs) by exactly gamma_h, bringing S_max(h) down to tau:

* MHA (n_kv_heads == n_heads): q rows and k rows of head h * sqrt(gamma_h).
* GQA (n_kv_heads < n_heads): q rows of head h * gamma_h; the shared k heads are untouched.
* MLA: q_nope rows * sqrt(gamma_h), q_rope rows * gamma_h, kv_b k_nope rows * sqrt(gamma_h); v rows and the
  shared rotary key (last rows of kv_a_proj_with_mqa) are never touched.

Each layer is described by a spec dict (``model.qk_clip_specs()`` builds them for the models here): ``kind`` ("mha"
or "mla"); ``q_weight`` (the query projection: ``q_proj`` / MLA's ``q_b_proj``), for MHA ``k_weight`` and for MLA
``kv_b_weight`` (rows of the local heads, in head order); ``n_heads``; for MHA ``n_kv_heads`` and ``head_dim``, for
MLA ``qk_nope_head_dim``, ``qk_rope_head_dim`` and ``v_head_dim``; ``max_logits`` (a [n_heads] tensor the model's
training forward fills with each head's max pre-softmax logit); and, for ``apply_post_step`` only, ``module``
(the attention module) and ``measure`` (callable: that module's forward arguments -> per-head max logits of the
current weights). In ``apply()`` the max logits of all layers are concatenated into one tensor and reduced with a single
MAX all-reduce over ``process_group`` (the ranks that hold the same heads but see different data:
data/FSDP/context parallel, never the tensor-parallel group).
No ``.item()``: gammas stay tensors, so the hook does not synchronise a GPU stream. A step the optimizer skips (its
``step_ok`` is false: a non-finite gradient norm, muonclip/skip_nonfinite.py) clips nothing: every gamma is exactly
1, so the weights keep every bit.

With master weights (bf16 parameters, ``MuonClip``/``DistributedMuonClip``), a clip must act on the float32 master
and the bf16 parameter together, or the two drift apart (and ZeRO-1 replicas, which hold no master, with them).
``register(optimizer)`` on such an optimizer therefore MAX-reduces the max logits in a step pre-hook and clips each
query/key weight in the optimizer's update hook, right after its update and before it is rounded into the
parameter and broadcast; ``apply()`` and ``apply_post_step()`` outside a step go through ``optimizer.scale_rows_``
(give the optimizer to the constructor), which scales the bf16 parameter in place on every rank (the same values
on every replica) and, where the rank keeps it, the master, kept within the parameter's rounding interval: no
collective (ZeRO-1's next parameter broadcast, the plain step's, starts from the same values).

Two modes:

* ``apply()`` (Kimi K2, Algorithm 1; the default): S_max is what the step's own forward pass recorded, and the
  clip acts on the weights just updated by that step. Cheap (no extra compute), but the update itself can raise
  the logits, so right after a step a head can sit above tau by that step's growth until the next clip.
* ``apply_post_step(run_forward)``: re-measures with the UPDATED weights by running the forward again (no grad)
  on the step's batch and clips each layer before the next one sees its output, so on that batch every head's max
  logit is <= tau after every step (up to float rounding), for all layers at once. Costs one no-grad forward
  that stops after the last attention layer, and one small all-reduce per layer. Needs ``module`` and
  ``measure`` in each spec (the models here provide them).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
except ImportError:  # torch built without distributed support: no DTensor can reach us
    DTensor = ()  # isinstance(x, ()) is always False

Spec = dict[str, Any]
_KEYS = {
    "mha": ("q_weight", "k_weight", "n_heads", "n_kv_heads", "head_dim", "max_logits"),
    "mla": ("q_weight", "kv_b_weight", "n_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_logits"),
}


class _ProbeDone(Exception):
    """Raised by the last attention layer's pre-hook in ``apply_post_step``: the rest of the forward is not needed."""


def check_spec(spec: Spec, layer: int) -> None:
    """Raise ValueError if a QK-Clip spec is malformed or its weights do not have the rows it describes."""
    kind = spec.get("kind")
    if kind not in _KEYS:
        raise ValueError(f"qk-clip spec {layer}: kind must be 'mha' or 'mla', got {kind!r}")
    missing = [k for k in _KEYS[kind] if k not in spec]
    if missing:
        raise ValueError(f"qk-clip spec {layer} ({kind}) misses keys {missing}")
    H = spec["n_heads"]
    if spec["max_logits"].numel() != H:
        raise ValueError(f"qk-clip spec {layer}: max_logits has {spec['max_logits'].numel()} entries, n_heads={H}")
    if kind == "mha":
        hd, Hkv = spec["head_dim"], spec["n_kv_heads"]
        if Hkv <= 0 or H % Hkv:
            raise ValueError(f"qk-clip spec {layer}: n_heads={H} is not a multiple of n_kv_heads={Hkv}")
        rows = {"q_weight": H * hd, "k_weight": Hkv * hd}
    else:
        dn, dr, dv = spec["qk_nope_head_dim"], spec["qk_rope_head_dim"], spec["v_head_dim"]
        rows = {"q_weight": H * (dn + dr), "kv_b_weight": H * (dn + dv)}
    for key, n in rows.items():
        if spec[key].shape[0] != n:
            raise ValueError(f"qk-clip spec {layer} ({kind}): {key} has {spec[key].shape[0]} rows, expected {n} "
                             "(rows must be the local heads' rows)")


def head_gammas(max_logits: Tensor, tau: float) -> Tensor:
    """gamma = tau / S_max where S_max > tau, else exactly 1 (also for -inf/NaN: heads never recorded)."""
    return torch.where(max_logits > tau, tau / max_logits, torch.ones_like(max_logits))


def row_scales(spec: Spec, gamma_H: Tensor) -> dict[str, Tensor]:
    """Per-row multipliers {weight key: scale_R} for one layer, from its per-head gammas."""
    H = spec["n_heads"]
    sqrt_H1 = gamma_H.sqrt().unsqueeze(1)
    if spec["kind"] == "mha":
        hd = spec["head_dim"]
        if spec["n_kv_heads"] == H:
            scale_R = sqrt_H1.expand(H, hd).reshape(-1)
            return {"q_weight": scale_R, "k_weight": scale_R}
        return {"q_weight": gamma_H.unsqueeze(1).expand(H, hd).reshape(-1)}
    dn, dr, dv = spec["qk_nope_head_dim"], spec["qk_rope_head_dim"], spec["v_head_dim"]
    q_R = torch.cat([sqrt_H1.expand(H, dn), gamma_H.unsqueeze(1).expand(H, dr)], dim=1).reshape(-1)
    kv_R = torch.cat([sqrt_H1.expand(H, dn), torch.ones_like(sqrt_H1).expand(H, dv)], dim=1).reshape(-1)
    return {"q_weight": q_R, "kv_b_weight": kv_R}


def scale_rows_(weight: Tensor, scale_R: Tensor) -> None:
    """weight[r, :] *= scale_R[r] in place (a DTensor weight scales its local shard)."""
    scale_R1 = scale_R.to(weight.device).unsqueeze(1)
    if isinstance(weight, DTensor):
        placements = [pl if pl.is_shard(0) else Replicate() for pl in weight.placements]
        scale_R1 = distribute_tensor(scale_R1, weight.device_mesh, placements, src_data_rank=None).to_local()
        weight = weight.to_local()
    weight.mul_(scale_R1)  # float32 scale; bf16 weights are multiplied in float32, then rounded


class QKClip:
    """Clip query/key weights after each optimizer step (see module docstring).

    Args:
        specs: the list from ``model.qk_clip_specs()``, or a callable returning it (re-read on every call).
        tau: logit threshold (Kimi K2 uses 100); ``math.inf`` only measures and reduces, never touching weights.
        process_group: group over which to MAX-reduce max logits (None: no communication).
        optimizer: the optimizer keeping master weights (anything with ``scale_rows_``, e.g. ``MuonClip``): clips
            outside a step scale through it. ``register`` sets it.

    After a call, ``last_max_logits`` is the reduced [L, H] float32 tensor (rows padded with -inf if layers have
    different head counts) and ``last_clipped`` a 0-dim int64 tensor counting clipped heads.
    """

    def __init__(self, specs: Sequence[Spec] | Callable[[], Sequence[Spec]], tau: float = 100.0,
                 process_group: dist.ProcessGroup | None = None, optimizer: Any = None) -> None:
        if not tau > 0:
            raise ValueError(f"QKClip tau must be > 0, got {tau}")
        self._specs = specs
        self.tau = float(tau)
        self.process_group = process_group
        self.optimizer = optimizer
        self.last_max_logits: Tensor | None = None
        self.last_clipped: Tensor | None = None
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) -> (weight, row scales) in this step
        for i, spec in enumerate(self.specs()):
            check_spec(spec, i)

    def specs(self) -> list[Spec]:
        return list(self._specs() if callable(self._specs) else self._specs)

    def register(self, optimizer: torch.optim.Optimizer) -> Any:
        """Clip at every ``optimizer.step()``; returns a handle (``.remove()`` to undo). On an optimizer with
        ``register_update_hook`` (the MuonClip family) each weight is clipped right after its own update, on its
        master (see the module docstring); on any other optimizer ``apply()`` runs after the step."""
        if not hasattr(optimizer, "register_update_hook"):
            return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())
        self.optimizer = optimizer
        return _Handles([optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._reduce_for_step()),
                         optimizer.register_update_hook(self._clip_updated),
                         optimizer.register_step_post_hook(lambda opt, args, kwargs: self._clip_rest())])

    @torch.no_grad()
    def _reduce_for_step(self) -> None:
        """Before the step: reduce the max logits (one MAX all-reduce) and note each weight's row scales."""
        specs, flat, counts = self._reduced_max_logits()
        self._pending = {}
        if self.tau != math.inf:
            for spec, max_H in zip(specs, flat.split(counts)):
                for key, scale_R in row_scales(spec, self._gammas(max_H)).items():
                    self._pending[id(spec[key])] = (spec[key], scale_R)

    def _clip_updated(self, param: Tensor, weight: Tensor) -> None:
        """The optimizer's update hook: ``param`` was just updated; clip its master (or itself) ``weight``."""
        entry = self._pending.pop(id(param), None)
        if entry is not None:
            scale_rows_(weight, entry[1])

    @torch.no_grad()
    def _clip_rest(self) -> None:
        """After the step: weights the step did not update here (no gradient, frozen) and that no other rank
        updated for this one (ZeRO-1 owners broadcast theirs) are clipped in place."""
        for weight, scale_R in self._pending.values():
            if not self.optimizer.updated_elsewhere(weight):
                self._scale(weight, scale_R)
        self._pending = {}

    def _scale(self, weight: Tensor, scale_R: Tensor) -> None:
        if self.optimizer is not None and hasattr(self.optimizer, "scale_rows_"):
            self.optimizer.scale_rows_(weight, scale_R)
        else:
            scale_rows_(weight, scale_R)

    def __call__(self, *_args: Any, **_kwargs: Any) -> None:
        self.apply()

    def qk_clip(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Clip with the max logits the step's forward recorded in ``spec["max_logits"]`` (one MAX all-reduce)."""
        specs, flat, counts = self._reduced_max_logits()
        for spec, max_H in zip(specs, flat.split(counts)):
            self._clip_layer(spec, max_H)

    def _reduced_max_logits(self) -> tuple[list[Spec], Tensor, list[int]]:
        """The specs, every layer's recorded max logits MAX-reduced over ``process_group`` (one collective),
        concatenated, and the head count of each layer; stored as ``last_max_logits`` / ``last_clipped``."""
        specs = self.specs()
        for i, spec in enumerate(specs):
            check_spec(spec, i)
        counts = [spec["n_heads"] for spec in specs]
        if not specs:
            return specs, torch.zeros(0), counts
        flat = torch.cat([spec["max_logits"].detach().reshape(-1).float() for spec in specs])
        if self.process_group is not None:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.process_group)
        self._store(flat, counts)
        return specs, flat, counts

    @torch.no_grad()
    def apply_post_step(self, run_forward: Callable[[], Any]) -> None:
        """Re-measure with the updated weights and clip layer by layer (see the module docstring).

        ``run_forward()`` runs the model forward on the step's batch (each rank its own part; put the model in eval
        mode so it records no statistics). A forward pre-hook on each spec's ``module`` computes
        ``spec["measure"](*the layer's forward arguments)`` -> per-head max logits [H] of the current weights,
        MAX-reduces them over ``process_group`` and clips that layer before its forward runs, so later layers are
        measured on the inputs the clipped layers produce. Once the last attention layer has been clipped the forward is stopped (the MoE
        and head after it are not run). ``last_max_logits`` holds the re-measured values before the clip.
        """
        specs = self.specs()
        if not specs:
            return
        for i, spec in enumerate(specs):
            check_spec(spec, i)
            if not isinstance(spec.get("module"), torch.nn.Module) or not callable(spec.get("measure")):
                raise ValueError(f"qk-clip spec {i}: apply_post_step needs 'module' (the attention nn.Module) and "
                                 "'measure' (callable: the module's forward arguments -> per-head max logits [H]) "
                                 "in the spec")
        rows: list[Tensor | None] = [None] * len(specs)

        def pre_hook(i: int, spec: Spec):
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                max_H = spec["measure"](*args, **kwargs).detach().float().reshape(-1).clone()
                if max_H.numel() != spec["n_heads"]:
                    raise ValueError(f"qk-clip spec {i}: measure returned {max_H.numel()} values, "
                                     f"n_heads={spec['n_heads']}")
                if self.process_group is not None:
                    dist.all_reduce(max_H, op=dist.ReduceOp.MAX, group=self.process_group)
                self._clip_layer(spec, max_H)
                rows[i] = max_H
                if all(r is not None for r in rows):
                    raise _ProbeDone
            return hook

        handles = [spec["module"].register_forward_pre_hook(pre_hook(i, spec), with_kwargs=True)
                   for i, spec in enumerate(specs)]
        try:
            run_forward()
        except _ProbeDone:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            raise RuntimeError(f"QK-Clip apply_post_step: the forward never reached the attention modules of specs "
                               f"{missing}; run_forward must run the model whose qk_clip_specs() were given")
        self._store(torch.cat(rows), [r.numel() for r in rows])

    def _clip_layer(self, spec: Spec, max_H: Tensor) -> None:
        if self.tau != math.inf:  # tau = inf: only measure and reduce (monitoring without clipping)
            for key, scale_R in row_scales(spec, self._gammas(max_H)).items():
                self._scale(spec[key], scale_R)

    def _step_ok(self) -> Tensor | None:
        """The optimizer's decision on the step these max logits belong to (None: it applies)."""
        return getattr(self.optimizer, "step_ok", None)

    def _gammas(self, max_H: Tensor) -> Tensor:
        """``head_gammas``, all exactly 1 when the optimizer skips the step."""
        gamma_H, ok = head_gammas(max_H, self.tau), self._step_ok()
        return gamma_H if ok is None else torch.where(ok, gamma_H, torch.ones_like(gamma_H))

    def _store(self, flat: Tensor, counts: list[int]) -> None:
        """``last_clipped`` and ``last_max_logits`` [L, max H] from all layers' max logits concatenated."""
        ok = self._step_ok()
        self.last_clipped = (flat > self.tau).sum() if ok is None else ((flat > self.tau) & ok).sum()
        if len(set(counts)) == 1:
            self.last_max_logits = flat.view(len(counts), counts[0])
        else:
            padded = flat.new_full((len(counts), max(counts)), float("-inf"))
            for i, row in enumerate(flat.split(counts)):
                padded[i, : row.numel()] = row
            self.last_max_logits = padded


class _Handles:
    """Several hook handles removed together."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
