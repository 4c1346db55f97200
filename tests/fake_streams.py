"""A recording stand-in for CUDA streams on CPU (the seam of muonclip/device_streams.py): every op runs at once, as
on a CPU, while the fake keeps the order CUDA would give it and fails where CUDA would read or reuse memory too
early.

Each stream has a vector clock (how far it has run, and how far it has waited for every other stream); the
host has one too (``synchronize``). A TorchDispatchMode sees every op: one that touches only host memory (what
``empty(host=True)`` made) runs on the host, at once; any other runs on the current stream (the compute stream
unless ``use(stream)`` says otherwise), and a copy between host and device memory that is not issued through
``copy_`` is a blocking one (the host waits for it). What each op reads and writes comes from its schema. Device
memory is tracked from its allocation on a side stream (or through the seam), or from the first time another stream
touches it (then it belongs to the compute stream, written by its latest op), until its storage dies.

The rules, each a ``Violation`` listed in ``violations`` and raised when the ``with`` block ends:
- an op reads memory another stream wrote, or writes memory another stream read or wrote, without being ordered
  after it (an event or stream wait, or the host having synchronised with it);
- the caching allocator's: device memory allocated on stream S may be reused by S as soon as its last reference
  dies; at that point every use of it on another stream must be ordered before S's next op (S waited for it, or
  the host synchronised with it), or covered by ``record_stream`` of that stream (which the allocator ignores for
  S itself). Pinned host memory is exempt: a non-blocking copy records an event on it, which the host allocator
  honours.

``peak_device_bytes``: the most device memory the seam's ``empty`` had alive at once (what the offloaders brought
back), next to the live bytes at each point (``live_device_bytes``).
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


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    """The storages of the plain tensors in ``tree`` that hold memory. A wrapper subclass (DTensor) has none, and
    the ops it runs on its local tensors run inside this mode's handler, where the mode is off: the fake checks
    plain tensors only."""
    out = []
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor) and not is_traceable_wrapper_subclass(t):
            storage = t.untyped_storage()
            if storage.nbytes():
                out.append(storage)
    return out


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


class _Block:
    """One storage: its stream (owner), its last write and the last reads since, the last use on every stream and
    the streams ``record_stream`` named."""

    def __init__(self, owner: Stream, host: bool, nbytes: int, label: str):
        self.owner, self.host, self.nbytes, self.label = owner, host, nbytes, label
        self.write: tuple[Stream, int] | None = None
        self.reads: dict[Stream, int] = {}
        self.uses: dict[Stream, int] = {}
        self.recorded: set[Stream] = set()
        self.counted = False  # in live_device_bytes (the seam's empty() made it on the device)


class FakeCudaStreams(TorchDispatchMode):
    def __init__(self):
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
            block.write, block.uses = (self.compute, self.compute.pos), {self.compute: self.compute.pos}
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
        reads, writes = [], []  # storages, from the schema: an argument marked (a!) is written
        schema = func._schema.arguments
        for arg, value in zip(schema, list(args) + [kwargs.get(a.name) for a in schema[len(args):]]):
            (writes if arg.alias_info is not None and arg.alias_info.is_write else reads).extend(_storages(value))
        hosts = [b is not None and b.host for b in (self._block(st, create=False) for st in reads + writes)]
        on_host = bool(hosts) and all(hosts)
        stream = self.host if on_host else self.current()
        # a copy between host and device memory not issued through copy_ is a blocking one, and so is .item()
        blocking = not on_host and (any(hosts) and not self._async or name == "_local_scalar_dense")
        track = stream is not self.compute  # the compute stream's own memory needs no record until another uses it
        pos = stream.tick() if stream is not self.host else 0
        for storage, write in [(st, False) for st in reads] + [(st, True) for st in writes]:
            block = self._block(storage, create=track)
            if block is not None:
                self._use(block, stream, pos, write, name)
        out = func(*args, **kwargs)
        if track and not on_host:  # what an op on a side stream allocates belongs to that stream
            for storage in _storages(out):
                if storage.data_ptr() not in self._blocks:
                    block = self._track(storage, stream, False, f"device memory ({storage.nbytes()} B) from {name} "
                                                                f"on {stream}")
                    block.write, block.uses = (stream, pos), {stream: pos}
        if blocking:
            self.host.merge(stream.clock)
        return out

    def _use(self, block: _Block, stream: Stream, pos: int, write: bool, op: str) -> None:
        at = (stream, pos)
        earlier = [block.write] if block.write is not None else []
        if write:
            earlier += list(block.reads.items())
        for use in earlier:
            if use[0] is not stream and not self._ordered(use, stream):
                self.violations.append(f"{op} on {stream} {'writes' if write else 'reads'} {block.label} before "
                                       f"{use[0]}'s {'write' if use is block.write else 'read'} #{use[1]} is done "
                                       "(no event or stream wait orders them)")
        if stream is not self.host:
            block.uses[stream] = pos
        if write:
            block.write, block.reads = at, {}
        else:
            block.reads[stream] = pos


__all__ = ["Event", "FakeCudaStreams", "Stream", "Violation"]
