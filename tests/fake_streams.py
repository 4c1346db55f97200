"""A recording stand-in for CUDA streams on CPU (the seam of muonclip/device_streams.py): every op runs at once, as
on a CPU, while the fake keeps the order CUDA would give it and fails where CUDA would read or reuse memory too
early.

Each stream has a vector clock (how far it has run, and how far it has waited for every other stream); the
host has one too (``synchronize``). A TorchDispatchMode sees every op: one that touches only host memory (what
``empty(host=True)`` made) runs on the host, at once; any other runs on the current stream (the compute stream
unless ``use(stream)`` says otherwise), and a copy between host and device memory that is not issued through
``copy_`` is a blocking one (the host waits for it). What each op reads and writes comes from its schema, as the
byte range of each tensor argument in its storage (the offloaders' host memory is ranges of one arena chunk: two
ranges of it are two pieces of memory). Device memory is tracked from its allocation on a side stream (or through
the seam), or from the first time another stream touches it (then it belongs to the compute stream, written by its
latest op), until its storage dies.

The rules, each a ``Violation`` listed in ``violations`` and raised when the ``with`` block ends:
- an op reads bytes another stream wrote, or writes bytes another stream read or wrote, without being ordered
  after it (an event or stream wait, or the host having synchronised with it);
- the caching allocator's: device memory allocated on stream S may be reused by S as soon as its last reference
  dies; at that point every use of it on another stream must be ordered before S's next op (S waited for it, or
  the host synchronised with it), or covered by ``record_stream`` of that stream (which the allocator ignores for
  S itself). Pinned host memory is exempt: a non-blocking copy records an event on it, which the host allocator
  honours.

``peak_device_bytes``: the most device memory the seam's ``empty`` had alive at once (what the offloaders brought
back), next to the live bytes at each point (``live_device_bytes``).

``FakeCudaStreams(log=True)`` keeps every op issued on a stream in ``ops`` (``Op``: its stream, position, what it had
waited for, the addresses it read and wrote); ``ordered(a, b)`` says whether ``a`` is done before ``b`` starts, so a
test can show two ops may overlap (neither ordered after the other).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

_METADATA = {"set_", "detach", "alias", "empty", "empty_strided", "lift_fresh", "_has_compatible_shallow_copy_type",
             "record_stream", "is_pinned"}


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The plain tensors in ``tree`` whose storage holds memory. A wrapper subclass (DTensor) has none, and the ops
    it runs on its local tensors run inside this mode's handler, where the mode is off: the fake checks plain
    tensors only."""
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and not is_traceable_wrapper_subclass(t)
            and t.untyped_storage().nbytes()]


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in _tensors(tree)]


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage ``t`` touches, [lo, hi) (a strided tensor: from its first to its last element)."""
    if t.numel() == 0:
        return 0, 0
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.storage_offset() * t.element_size(), (t.storage_offset() + last + 1) * t.element_size()


class Violation(AssertionError):
    pass


class Stream:
    def __init__(self, name: str):
        self.name = name
        self.clock: dict[Stream, int] = {self: 0}  # this stream's position, and what it has waited for

    @property
    def pos(self) -> int:
        return self.clock[self]

    def tick(self) -> int:
        self.clock[self] += 1
        return self.clock[self]

    def merge(self, clock: dict["Stream", int]) -> None:
        for s, p in clock.items():
            if s is not self and self.clock.get(s, 0) < p:
                self.clock[s] = p

    def __repr__(self) -> str:
        return self.name


class Event:
    def __init__(self, clock: dict[Stream, int]):
        self.clock = dict(clock)


class Op:
    """An op issued on a stream: its position there, what it had waited for when it started (``clock``, the host's
    synchronisations included) and the addresses (``data_ptr``) of the tensors it read and wrote."""

    def __init__(self, name: str, stream: Stream, clock: dict[Stream, int], reads: list[int], writes: list[int]):
        self.name, self.stream, self.clock, self.reads, self.writes = name, stream, clock, reads, writes

    @property
    def pos(self) -> int:
        return self.clock[self.stream]

    def __repr__(self) -> str:
        return f"{self.name}@{self.stream}#{self.pos}"


class _Block:
    """One storage: its stream (owner), the writes and reads of its bytes (``(lo, hi, stream, position)``, those a
    later access covers and orders dropped), the last use on every stream and the streams ``record_stream``
    named."""

    def __init__(self, owner: Stream, host: bool, nbytes: int, label: str):
        self.owner, self.host, self.nbytes, self.label = owner, host, nbytes, label
        self.writes: list[tuple[int, int, Stream, int]] = []
        self.reads: list[tuple[int, int, Stream, int]] = []
        self.uses: dict[Stream, int] = {}
        self.recorded: set[Stream] = set()
        self.counted = False  # in live_device_bytes (the seam's empty() made it on the device)


class FakeCudaStreams(TorchDispatchMode):
    def __init__(self, log: bool = False):
        super().__init__()
        self.host = Stream("host")
        self.compute = Stream("compute")
        self._streams = [self.compute]
        self._current = [self.compute]
        self._blocks: dict[int, _Block] = {}  # storage data_ptr -> its block, while the storage lives
        self._async = False
        self.violations: list[str] = []
        self.live_device_bytes = 0
        self.peak_device_bytes = 0
        self.ops: list[Op] | None = [] if log else None

    # ---------------------------------------------------------------- the seam (muonclip/device_streams.py)
    def new_stream(self) -> Stream:
        stream = Stream(f"side{len(self._streams)}")
        self._streams.append(stream)
        return stream

    def current(self) -> Stream:
        return self._current[-1]

    @contextmanager
    def use(self, stream: Stream) -> Iterator[None]:
        self._current.append(stream)
        try:
            yield
        finally:
            self._current.pop()

    def empty(self, shape, dtype: torch.dtype, device: torch.device, host: bool = False) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        stream = self.host if host else self.current()
        block = self._track(t.untyped_storage(), stream, host, f"{'host' if host else 'device'} memory {tuple(t.shape)}"
                            f" {dtype} from empty() on {stream}")
        if not host:
            block.counted = True
            self.live_device_bytes += block.nbytes
            self.peak_device_bytes = max(self.peak_device_bytes, self.live_device_bytes)
        return t

    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        self._async = True
        try:
            return dst.copy_(src)
        finally:
            self._async = False

    def record_event(self, stream: Stream) -> Event:
        return Event(stream.clock)

    def wait_event(self, stream: Stream, event: Event) -> None:
        stream.merge(event.clock)

    def wait_stream(self, stream: Stream, other: Stream) -> None:
        stream.merge(other.clock)

    def record_stream(self, t: torch.Tensor, stream: Stream) -> None:
        block = self._block(t.untyped_storage(), create=True)
        if stream is not block.owner:  # the allocator ignores the stream that allocated the block
            block.recorded.add(stream)

    def synchronize(self, stream: Stream) -> None:
        self.host.merge(stream.clock)

    # ---------------------------------------------------------------- the model
    @staticmethod
    def ordered(a: Op, b: Op) -> bool:
        """Whether ``a`` is done before ``b`` starts (same stream, or ``b`` waited for ``a``'s position)."""
        return b.clock.get(a.stream, 0) >= a.pos

    def __enter__(self):
        super().__enter__()
        return self

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if exc[0] is None and self.violations:
            raise Violation(f"{len(self.violations)} stream-order violations, the first: {self.violations[0]}")
        return out

    def _track(self, storage: torch.UntypedStorage, owner: Stream, host: bool, label: str) -> _Block:
        key = storage.data_ptr()
        block = _Block(owner, host, storage.nbytes(), label)
        self._blocks[key] = block
        weakref.finalize(storage, self._free, key, block)
        return block

    def _block(self, storage: torch.UntypedStorage, create: bool) -> _Block | None:
        """The storage's block; one met for the first time belongs to the compute stream, whose latest op wrote it."""
        if storage.nbytes() == 0:
            return None
        block = self._blocks.get(storage.data_ptr())
        if block is None and create:
            block = self._track(storage, self.compute, False, f"device memory ({storage.nbytes()} B) of the compute "
                                                              "stream")
            block.writes = [(0, block.nbytes, self.compute, self.compute.pos)]
            block.uses = {self.compute: self.compute.pos}
        return block

    def _ordered(self, use: tuple[Stream, int], by: Stream) -> bool:
        """Whether the use (stream, position) is done before ``by``'s next op runs."""
        stream, pos = use
        return stream is by or stream is self.host or by.clock.get(stream, 0) >= pos or \
            self.host.clock.get(stream, 0) >= pos

    def _free(self, key: int, block: _Block) -> None:
        if self._blocks.get(key) is block:
            del self._blocks[key]
        if block.host:
            return
        if block.counted:
            self.live_device_bytes -= block.nbytes
        for stream, pos in block.uses.items():
            if stream is not block.owner and stream not in block.recorded and not self._ordered((stream, pos),
                                                                                                 block.owner):
                self.violations.append(
                    f"{block.label} freed (so {block.owner} may reuse it) while {stream}'s use #{pos} may still be "
                    f"queued: no record_stream({stream}), and {block.owner} has not waited for it")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.is_view or name in _METADATA:
            return func(*args, **kwargs)
        reads, writes = [], []  # tensors, from the schema: an argument marked (a!) is written
        schema = func._schema.arguments
        for arg, value in zip(schema, list(args) + [kwargs.get(a.name) for a in schema[len(args):]]):
            (writes if arg.alias_info is not None and arg.alias_info.is_write else reads).extend(_tensors(value))
        hosts = [b is not None and b.host for b in (self._block(t.untyped_storage(), create=False)
                                                    for t in reads + writes)]
        on_host = bool(hosts) and all(hosts)
        stream = self.host if on_host else self.current()
        # a copy between host and device memory not issued through copy_ is a blocking one, and so is .item()
        blocking = not on_host and (any(hosts) and not self._async or name == "_local_scalar_dense")
        track = stream is not self.compute  # the compute stream's own memory needs no record until another uses it
        pos = stream.tick() if stream is not self.host else 0
        if self.ops is not None and stream is not self.host:
            clock = dict(stream.clock)
            for s, p in self.host.clock.items():  # what the host waited for before issuing it
                clock[s] = max(clock.get(s, 0), p)
            self.ops.append(Op(name, stream, clock, [t.data_ptr() for t in reads], [t.data_ptr() for t in writes]))
        for t, write in [(t, False) for t in reads] + [(t, True) for t in writes]:
            block = self._block(t.untyped_storage(), create=track)
            if block is not None:
                self._use(block, _span(t), stream, pos, write, name)
        out = func(*args, **kwargs)
        if track and not on_host:  # what an op on a side stream allocates belongs to that stream
            for storage in _storages(out):
                if storage.data_ptr() not in self._blocks:
                    block = self._track(storage, stream, False, f"device memory ({storage.nbytes()} B) from {name} "
                                                                f"on {stream}")
                    block.writes, block.uses = [(0, block.nbytes, stream, pos)], {stream: pos}
        if blocking:
            self.host.merge(stream.clock)
        return out

    def _use(self, block: _Block, span: tuple[int, int], stream: Stream, pos: int, write: bool, op: str) -> None:
        lo, hi = span
        if lo == hi:
            return
        earlier = [(u, True) for u in block.writes] + ([(u, False) for u in block.reads] if write else [])
        for (ulo, uhi, ustream, upos), was_write in earlier:
            if ulo < hi and lo < uhi and ustream is not stream and not self._ordered((ustream, upos), stream):
                self.violations.append(f"{op} on {stream} {'writes' if write else 'reads'} {block.label} (bytes "
                                       f"{lo}:{hi}) before {ustream}'s {'write' if was_write else 'read'} #{upos} "
                                       "is done (no event or stream wait orders them)")
        if stream is not self.host:
            block.uses[stream] = pos
        # what this access covers and is ordered after is implied by it from now on (the clocks are transitive)
        if write:
            block.writes = [u for u in block.writes if not lo <= u[0] <= u[1] <= hi]
            block.reads = [u for u in block.reads if not lo <= u[0] <= u[1] <= hi]
            block.writes.append((lo, hi, stream, pos))
        else:
            block.reads = [u for u in block.reads if not (u[2] is stream and lo <= u[0] <= u[1] <= hi)]
            block.reads.append((lo, hi, stream, pos))


__all__ = ["Event", "FakeCudaStreams", "Op", "Stream", "Violation"]
