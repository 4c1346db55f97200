"""Measurements that stand in for a GPU on a CPU: which dtype each GEMM runs in (and its FLOPs, and which part of the
model it belongs to), which ops would synchronise a CUDA stream with the host, and how many bytes of which dtype
every collective moves.

- ``OpAudit``: a TorchFunctionMode tags every autograd node a forward op creates with the region it ran in (the
  innermost module, or ``max_logit_probe`` inside ``causal_max_logits``), and a TorchDispatchMode records every
  matmul-class op with its input dtypes, FLOPs and region: forward ops by the module running them, backward ops by
  the autograd node executing them (``torch._C._current_autograd_node``), so a backward GEMM is charged to the
  forward region that created it. Optimizer ops are recorded as region ``optimizer`` (global step hooks).
- ``NoDeviceSync``: fails on every op that reads a device value on the host on CUDA (bincount, nonzero, unique,
  masked_select, boolean indexing, repeat_interleave without output_size, .item()/_local_scalar_dense, tolist),
  except where ``allow`` says so.
- ``WireAudit``: wraps the torch.distributed calls and records (call, dtype, elements) per call.
- ``SavedBytes``: the bytes autograd keeps for backward (device and host), through saved-tensor hooks.
- ``LiveBytes``: the most tensor bytes alive (the CPU's ``torch.cuda.max_memory_allocated``); ``vm_bytes``:
  the process's RSS and peak RSS.
- ``Bf16GemmsInFloat32``: bf16 matmuls through float32 GEMMs, for byte audits on CPUs without a fast bf16 GEMM.
"""
from __future__ import annotations

import contextlib
import re
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.module_tracker import ModuleTracker

aten = torch.ops.aten


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


def matmul_flops(name: str, args: tuple, out: Any) -> int | None:
    """FLOPs of a matmul-class aten op (None: not one)."""
    if name in ("mm", "bmm"):
        a, b = args[0], args[1]
        return 2 * a.numel() * b.shape[-1]
    if name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
        return 2 * a.numel() * b.shape[-1]
    if name == "_grouped_mm":  # [M, K] x [E, K, N] (rows split by offs), [K, M] x [M, N] (weight grad), 3D x 3D
        a, b = args[0], args[1]
        batch = a.shape[0] if a.ndim == 3 and b.ndim == 3 else 1
        return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
    if name.startswith("_scaled_dot_product") and name.endswith("_backward"):
        grad_out, q, k, v = args[:4]
        return sdpa_backward_flop_count(_shape(grad_out), _shape(q), _shape(k), _shape(v))
    if name.startswith("_scaled_dot_product"):
        q, k, v = args[:3]
        return sdpa_flop_count(_shape(q), _shape(k), _shape(v))
    return None


def operands(name: str, args: tuple) -> tuple:
    """The matrix operands of a matmul-class op: SDPA's q, k, v (and the output gradient in backward), not the
    float32 softmax statistics (logsumexp) its backward also takes."""
    if name.startswith("_scaled_dot_product"):
        return args[:4] if name.endswith("_backward") else args[:3]
    return args


@dataclass
class OpRecord:
    op: str
    dtypes: tuple[torch.dtype, ...]  # of the floating-point matrix operands (``operands``)
    flops: int
    region: str  # innermost module name, "max_logit_probe" or "optimizer"
    backward: bool


class _Tagger(TorchFunctionMode):
    """Tags the autograd nodes each forward op creates with the region it runs in."""

    def __init__(self, audit: "OpAudit"):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        region = None
        for t in outs:
            node = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
            stack = [node] if node is not None else []
            while stack:
                n = stack.pop()
                if n is None or n in self.audit.node_region:
                    continue
                region = region or self.audit.region()
                self.audit.node_region[n] = region
                stack.extend(next_fn for next_fn, _ in n.next_functions)
        return out


class _Recorder(TorchDispatchMode):
    def __init__(self, audit: "OpAudit"):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        flops = matmul_flops(name, args, out)
        if flops is not None:
            node = torch._C._current_autograd_node()
            region = self.audit.node_region.get(node, "?") if node is not None else self.audit.region()
            dtypes = tuple(a.dtype for a in operands(name, args) if isinstance(a, torch.Tensor)
                           and a.is_floating_point())
            self.audit.records.append(OpRecord(name, dtypes, flops, region, node is not None))
        return out


class OpAudit:
    """``with OpAudit() as audit: <forward, backward, optimizer.step()>`` then read ``audit.records``."""

    def __init__(self) -> None:
        self.records: list[OpRecord] = []
        self.node_region: dict[Any, str] = {}
        self._tracker = ModuleTracker()
        self._probe = 0
        self._optimizer = False

    def region(self) -> str:
        if self._optimizer:
            return "optimizer"
        if self._probe:
            return "max_logit_probe"
        return max(self._tracker.parents, key=len)

    @contextlib.contextmanager
    def _probe_region(self):
        import models.attention as attention

        originals = {name: getattr(attention, name) for name in ("causal_max_logits", "document_max_logits")}

        def tagged(original):
            def probe(*args, **kwargs):
                self._probe += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self._probe -= 1
            return probe

        for name, original in originals.items():
            setattr(attention, name, tagged(original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(attention, name, original)

    @contextlib.contextmanager
    def _optimizer_region(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(*_):
            self._optimizer = True

        def post(*_):
            self._optimizer = False

        handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def __enter__(self) -> "OpAudit":
        self._stack = contextlib.ExitStack()
        for ctx in (self._tracker, self._probe_region(), self._optimizer_region(), _Tagger(self), _Recorder(self)):
            self._stack.enter_context(ctx)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def flops_by(self, key: Callable[[OpRecord], Any], records: list[OpRecord] | None = None) -> dict[Any, int]:
        out: dict[Any, int] = defaultdict(int)
        for r in self.records if records is None else records:
            out[key(r)] += r.flops
        return dict(out)


# ------------------------------------------------------------------------------------------------ host syncs
SYNCING = {aten.bincount.default, aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default,
           aten.is_nonzero.default, aten.unique_consecutive.default, aten._unique.default, aten._unique2.default,
           aten.unique_dim.default, aten.equal.default}


class NoDeviceSync(TorchDispatchMode):
    """Raises on ops that synchronise a CUDA stream with the host. ``allow(func, args)`` -> True excuses one
    (e.g. AdamW's step counter, a CPU scalar also on CUDA). ``Tensor.tolist`` calls are allowed only from the
    functions named (qualified name, e.g. ``ExpertParallelExperts._exchange_counts``) in ``tolist_from`` and counted in
    ``tolist_calls``."""

    def __init__(self, allow: Callable[[Any, tuple], bool] = lambda func, args: False,
                 tolist_from: tuple[str, ...] = ()):
        super().__init__()
        self.allow, self.tolist_from = allow, tolist_from
        self.tolist_calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bad = func in SYNCING
        if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
            bad = kwargs.get("output_size") is None
        if func is aten.index.Tensor:
            bad = any(i is not None and i.dtype == torch.bool for i in args[1])
        if bad and not self.allow(func, args):
            raise AssertionError(f"host synchronisation on CUDA: {func}")
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        audit, original = self, self._tolist

        def tolist(t):
            caller = sys._getframe(1).f_code.co_qualname
            if caller not in audit.tolist_from:
                raise AssertionError(f"host synchronisation on CUDA: .tolist() in {caller}")
            audit.tolist_calls[caller] += 1
            return original(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


# ------------------------------------------------------------------------------------------------ collectives
@dataclass
class WireRecord:
    call: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class WireAudit:
    """Records every tensor handed to a torch.distributed collective or point-to-point call (``records``)."""

    CALLS = ("all_to_all_single", "send", "recv", "broadcast", "reduce", "all_reduce", "all_gather_into_tensor",
             "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single")
    SENDS_SECOND = ("all_to_all_single", "all_gather_single", "reduce_scatter_single")  # (output, input, ...)

    def __init__(self) -> None:
        self.records: list[WireRecord] = []

    def __enter__(self) -> "WireAudit":
        self._saved = {name: getattr(dist, name) for name in self.CALLS + ("P2POp",)}
        for name in self.CALLS:
            setattr(dist, name, self._wrap(name, self._saved[name]))
        p2p_op = self._saved["P2POp"]

        def p2p(op, tensor, *args, **kwargs):  # the pipeline schedules' isend/irecv, batched or not
            self.records.append(WireRecord(f"p2p_{op.__name__}", tensor.dtype, tensor.numel()))
            return p2p_op(op, tensor, *args, **kwargs)

        dist.P2POp = p2p
        return self

    def _wrap(self, name: str, fn):
        def call(tensor, *args, **kwargs):
            t = args[0] if name in self.SENDS_SECOND else tensor  # (output, input, ...): the input is sent
            self.records.append(WireRecord(name, t.dtype, t.numel()))
            return fn(tensor, *args, **kwargs)
        return call

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def by_call(self) -> dict[tuple[str, torch.dtype], int]:
        """Elements per (call, dtype)."""
        out: dict[tuple[str, torch.dtype], int] = defaultdict(int)
        for r in self.records:
            out[(r.call, r.dtype)] += r.numel
        return dict(out)


# ------------------------------------------------------------------------------------------------ saved tensors
class SavedBytes:
    """Bytes autograd keeps for backward while the block runs, by where they live: ``device`` (tensors, FP8 tiles'
    data and scales) and ``host`` (moved by activation offload). Weights (parameters, views and casts of them) do not count;
    a tensor counts its whole storage (what a saved view keeps alive), each storage once however many ops save it
    while it lives (a storage freed in backward and its address reused later counts again: the counts add up over
    micro batches).

    Saved-tensor hooks nest and only the innermost applies, so an outermost counting hook alone would miss what
    the techniques' own hooks keep: activation offload's pack (parallel/activation_offload.py) is wrapped to count
    what it returns. FP8 storage hands its tiles on to the hooks around it (parallel/regions.py, ``pass_on``), and
    recomputation's hooks keep nothing (its regions' inputs are saved through the hooks around them): both are
    counted there."""

    def __init__(self, model: torch.nn.Module | None = None):
        from parallel.regions import param_storages

        self.storages = param_storages(model) if model is not None else set()
        self.device = self.host = 0
        self._storages: dict[int, Any] = {}  # storages counted (device, FP8 tiles): address -> weak ref
        self._host_copies: dict[int, Any] = {}  # activation offload's host copies counted (held: ids stay unique)

    def _count(self, original: Any) -> None:
        from parallel.activation_offload import _Offloaded
        from parallel.regions import is_weight

        if isinstance(original, _Offloaded):
            if id(original.copy) not in self._host_copies:  # host copies are ranges of one arena: counted by copy
                self._host_copies[id(original.copy)] = original.copy
                self.host += original.nbytes
        elif isinstance(original, torch.Tensor) and not isinstance(original, torch.nn.Parameter) \
                and not is_weight(original, self.storages) and self._new(original):
            self.device += original.untyped_storage().nbytes()

    def _new(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage is not counted yet (or was freed since and its address reused)."""
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = t.untyped_storage()
        known = self._storages.get(storage.data_ptr())
        if known is not None and not known.expired():
            return False
        self._storages[storage.data_ptr()] = StorageWeakRef(storage)
        return True

    def __enter__(self) -> "SavedBytes":
        import parallel.activation_offload as offload

        self._saved = offload.ActivationOffload.pack
        meter = self

        def offload_pack(self_, t):
            out = meter._saved(self_, t)
            meter._count(out)
            return out

        offload.ActivationOffload.pack = offload_pack
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._outer, lambda t: t)
        self._hooks.__enter__()
        return self

    def _outer(self, t):
        self._count(t)
        return t

    def __exit__(self, *exc) -> None:
        import parallel.activation_offload as offload

        self._hooks.__exit__(*exc)
        offload.ActivationOffload.pack = self._saved


# ------------------------------------------------------------------------------------------------ live tensor bytes
class LiveBytes(TorchDispatchMode):
    """The CPU analogue of ``torch.cuda.max_memory_allocated``: the bytes of tensor storages alive, counted as ops
    create them inside the block (outputs that alias no input) and uncounted when the last reference to a storage
    dies (a finaliser on its Python object, which torch keeps as long as the storage lives), and their high point.
    Storages made before the block (or outside the dispatcher) are not counted; one made by an op on another thread
    is not seen (CPU autograd runs backward on the calling thread). Peak RSS also holds what is not a tensor (the
    interpreter, libraries, the heap's free lists); this is what a device allocator would hand out."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}  # id(storage) -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: its storage is its input's (maybe from before the block)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._live or storage.nbytes() == 0:
                    continue
                self._live[key] = storage.nbytes()
                weakref.finalize(storage, self._free, key)
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
        return out

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key)


class Bf16GemmsInFloat32(TorchDispatchMode):
    """For byte audits only (what a step allocates, saves and sends, not its values): CPU bf16 matmuls computed by a
    float32 GEMM and rounded once to bf16, the result of a bf16 GEMM with float32 accumulation up to summation order,
    with the same output storage, shape and dtype. On CPUs without AVX-512 BF16 torch has no fast bf16 GEMM (its
    fallback took 861 ms for [512, 128] @ [128, 8192] where float32 took 18 ms with one thread under
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2, 2026-12-07), which made the bf16
    byte audits most of the suite's time there. Enter it before ``LiveBytes`` so that the audit, above it, sees only
    the bf16 result (the float32 temporaries are the kernel's business, as a GPU GEMM's workspace is)."""

    OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten._grouped_mm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        if func in self.OPS and floats and all(t.dtype == torch.bfloat16 and t.device.type == "cpu"
                                                 for t in floats) and kwargs.get("out_dtype") is None:
            wide = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def vm_bytes(key: str) -> int:
    """A /proc/self/status memory figure (VmRSS, VmHWM: peak since clear_refs 5) in bytes."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
