"""The offloaders' host arena (muonclip/host_arena.py), unpinned on CPU: power-of-two chunks (CUDA's host allocator
rounds every pinned allocation up to one), ranges aligned to 512 bytes, first fit, freed ranges merged, a range free
again once its tensor is gone; and both offloaders take their host memory from it."""
from __future__ import annotations

import pytest
import torch

from muonclip.host_arena import ALIGN, ArenaLayout, HostArena


def test_ranges_are_aligned_first_fit_and_merge_when_given_back():
    arena = ArenaLayout(chunk_bytes=8192)
    a, b, c = arena.take(1000), arena.take(512), arena.take(1)
    assert (a, b, c) == ((0, 0), (0, 1024), (0, 1536)) and arena.in_use == 2048  # 1000 -> 1024, 1 -> 512
    arena.give_back(*a, 1000)
    assert arena.take(600) == (0, 0)  # the first free range that fits, not the end
    arena.give_back(0, 0, 600)
    arena.give_back(*b, 512)
    assert arena.take(1536) == (0, 0)  # the two freed neighbours are one range again
    assert arena.chunks == [8192] and arena.reserved == 8192


def test_chunks_are_powers_of_two_holding_four_of_the_request_that_opened_them():
    """A request over a quarter of the chunk size opens a chunk of the power of two at or above four times it: what
    the pinned allocator is asked for is never rounded up, and a chunk takes several such requests (a K2 expert
    master of 1.31 GiB opens an 8 GiB chunk that takes six; one pinned allocation each would take 2 GiB each)."""
    arena = ArenaLayout(chunk_bytes=4096)
    arena.take(3000)  # 3072 > 4096 / 4: a chunk of 16384
    assert arena.chunks == [16384]
    assert [arena.take(3000)[0] for _ in range(4)] == [0, 0, 0, 0]  # five of them in the first chunk
    assert arena.take(3000)[0] == 1 and arena.chunks == [16384, 16384]
    master = round(1.31 * 2**30)
    k2 = ArenaLayout()
    places = [k2.take(master)[0] for _ in range(12)]
    assert k2.chunks == [8 * 2**30] * 2 and places == [0] * 6 + [1] * 6
    assert all(size & (size - 1) == 0 for size in k2.chunks + arena.chunks)
    with pytest.raises(ValueError, match="power of two"):
        ArenaLayout(chunk_bytes=3 * 2**20)


def test_a_range_is_free_again_once_its_tensor_is_gone():
    arena = HostArena(chunk_bytes=4096)
    master = torch.randn(7, 9)
    home = arena.take_like(master)
    home.copy_(master)
    raw = arena.take(100)
    assert home.shape == master.shape and home.dtype == master.dtype and torch.equal(home, master)
    base = arena._chunks[0].data_ptr()  # page-aligned from cudaHostAlloc; the CPU allocator aligns to 64
    assert (home.data_ptr() - base) % ALIGN == 0 and (raw.data_ptr() - base) % ALIGN == 0 and raw.numel() == 100
    assert arena.layout.in_use == 512 + 512 and arena.reserved == 4096  # 252 bytes -> 512
    del home
    assert arena.layout.in_use == 512
    del raw
    assert arena.layout.in_use == 0 and arena.reserved == 4096  # the chunk stays for the next ones


def test_both_offloaders_take_their_host_memory_from_their_arena():
    """Optimizer-state offload: every home is a range of the offloader's arena, and state loaded into the optimizer
    again (new homes) reuses the ranges of the homes it replaced; activation offload: every host copy is a range
    of its arena, given back when backward has the tensor back."""
    from muonclip.offload import StateOffload
    from parallel.activation_offload import ActivationOffload

    offload = StateOffload(torch.device("cpu"))
    states = [{"momentum_buffer": torch.randn(64, 32), "step": torch.tensor(1.0)} for _ in range(3)]
    for st in states:
        offload.send_home(st)
    chunk = offload.arena._chunks[0]
    for st in states:
        assert offload.is_home(st["momentum_buffer"])
        assert st["momentum_buffer"].untyped_storage().data_ptr() == chunk.untyped_storage().data_ptr()
    reserved, in_use = offload.arena.reserved, offload.arena.layout.in_use
    assert in_use == 3 * 64 * 32 * 4
    states = [{k: v.clone() for k, v in st.items()} for st in states]  # as a state dict load replaces them
    for st in states:
        offload.send_home(st)
    assert (offload.arena.reserved, offload.arena.layout.in_use) == (reserved, in_use)

    acts = ActivationOffload(min_bytes=1024)
    block = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))
    acts.attach(block)
    x = torch.randn(32, 64, requires_grad=True)
    block(x).square().sum().backward()
    assert acts.arena.reserved > 0 and acts.arena.layout.in_use == 0  # every copy came back and gave its range
    first = acts.arena.reserved
    block(x).square().sum().backward()
    assert acts.arena.reserved == first  # the next micro batch reuses the same ranges


def test_a_range_given_back_while_the_arena_is_busy_comes_back_later_without_waiting():
    """A tensor dies while its arena holds its lock (a garbage collection inside the arena's own code, or autograd's
    device thread freeing a copy while the main thread takes one): its finalizer queues the range instead of waiting
    on the lock (which would hang its own thread), and the next take gives it back first and reuses it."""
    import threading

    arena = HostArena(chunk_bytes=4096)
    t = arena.take(1024)
    arena._lock.acquire()  # the arena is busy
    try:
        done = threading.Event()

        def drop():
            nonlocal t
            del t  # the finalizer runs here
            done.set()

        thread = threading.Thread(target=drop)
        thread.start()
        assert done.wait(timeout=5), "the finalizer waited on the arena's lock"
        thread.join()
        assert arena.layout.in_use == 1024  # queued, not yet given back
    finally:
        arena._lock.release()
    again = arena.take(1024)
    assert arena.layout.in_use == 1024 and arena.reserved == 4096 and again.data_ptr() == arena._chunks[0].data_ptr()
