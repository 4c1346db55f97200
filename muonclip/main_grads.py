"""Float32 gradient accumulation for low-precision parameters (Megatron's ``main_grad``).

Autograd gives a bf16 parameter a bf16 ``.grad``; accumulated there over micro batches it would be rounded to bf16
at every addition. Instead each such parameter gets a float32 view into one flat buffer, and a post-accumulate-grad
hook adds every fresh ``.grad`` into it and drops it (``accumulate_``), so gradients accumulate in float32 until
``zero_()`` and no bf16 gradient outlives its backward. ``MuonClip`` keeps a ``MainGrads`` for its bf16
parameters; ``DistributedMuonClip`` accumulates into its float32 gradient buckets with the same ``accumulate_``.

Torch's zero-bubble pipeline schedules (zbv, dualpipev) accumulate weight gradients by hand (``weight.grad += dw``,
no hook): the pipeline runs those actions inside ``DistributedMuonClip.grads_added_by_hand``, which adds each into
the float32 buckets; ``MainGrads.grad`` adds a bf16 ``.grad`` made without the hook when it is read.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor


def accumulate_(main_grad: Tensor, p: Tensor) -> None:
    """Add ``p.grad`` into the float32 ``main_grad`` and drop it (so the next backward starts a fresh bf16 grad)."""
    main_grad.add_(p.grad)
    p.grad = None


class MainGrads:
    """One flat float32 buffer holding a gradient view per parameter of ``params`` (all on one device)."""

    def __init__(self, params: list[Tensor], dtype: torch.dtype = torch.float32):
        self.params = list(params)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=dtype, device=device)
        self._views: dict[int, Tensor] = {}
        offset = 0
        for p in self.params:
            self._views[id(p)] = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._touched: set[int] = set()  # params that received a gradient since zero_(): the others have none
        me = weakref.ref(self)  # hooks must not keep a dropped optimizer's buffer alive

        def hook(p: Tensor) -> None:
            owner = me()
            if owner is not None:
                owner._accumulate(p)

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self.params]

    def __contains__(self, p: Tensor) -> bool:
        return id(p) in self._views

    def _accumulate(self, p: Tensor) -> None:
        accumulate_(self._views[id(p)], p)
        self._touched.add(id(p))

    def grad(self, p: Tensor) -> Tensor | None:
        """The float32 gradient of ``p`` accumulated since ``zero_()`` (None if it got none), with any bf16
        ``.grad`` accumulated by hand (no hook) added in first."""
        if p.grad is not None:
            self._accumulate(p)
        return self._views[id(p)] if id(p) in self._touched else None

    def mark_all(self) -> None:
        """Every parameter has a gradient now (e.g. after a data-parallel reduction of the buffer)."""
        self._touched = {id(p) for p in self.params}

    def zero_(self) -> None:
        self.flat.zero_()
        self._touched.clear()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
