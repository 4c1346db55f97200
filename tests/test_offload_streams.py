"""Optimizer-state offload's two copy streams (issue 28, item 6; muonclip/offload.py) on the recording fake of the
device seam (tests/fake_streams.py): an update is ordered after its own group's fetch only, so it may overlap the
next group's fetch and the previous group's write-back; the lent copies' memory, the homes' arena ranges (across
steps and when a state dict load gives them back and takes them again) and the host reads keep CUDA's rules; the
steps stay bitwise those without offload."""
from __future__ import annotations

import pytest
import torch

from muonclip.offload import StateOffload
from tests.fake_streams import FakeCudaStreams
from tests.test_device_streams import muonclip_run


def _states(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"exp_avg": torch.full((64, 64), float(i)), "exp_avg_sq": torch.full((32,), float(i)),
             "step": torch.tensor(1.0)} for i in range(n)]


def _homed(offload: StateOffload, n: int) -> list[dict[str, torch.Tensor]]:
    """``_states(n)``, each given its home by ``offload`` (new state, or state a load put in place)."""
    states = _states(n)
    for st in states:
        offload.send_home(st)
    return states


def _lend_and_update(offload: StateOffload, fake: FakeCudaStreams, states: list[dict]) -> list:
    """One pass of ``lend_in_turn`` over one-state groups, each update in place on the compute stream; returns
    the fake's op of each update."""
    updates = []
    for group in offload.lend_in_turn([[st] for st in states]):
        group[0]["exp_avg"].mul_(2)
        updates.append(fake.ops[-1])
        group[0]["exp_avg_sq"].add_(1)
    return updates


def _copies(fake: FakeCudaStreams, home: int, start: int = 0, stop: int | None = None) -> tuple[list, list]:
    """The copies on side streams among the fake's ops[start:stop] that read the home at address ``home``
    (fetches) and that write it (write-backs)."""
    ops = [op for op in fake.ops[start:stop] if op.name == "copy_" and op.stream is not fake.compute]
    return [op for op in ops if home in op.reads], [op for op in ops if home in op.writes]


def test_an_update_waits_for_its_own_fetch_only_and_may_overlap_the_next_fetch_and_the_last_write_back():
    """Four groups lent in turn: update i is ordered after fetch i, write-back i after update i, fetch i+2 after
    write-back i (it reuses group i's device memory); update i is ordered neither after fetch i+1 nor after
    write-back i-1 (nor they after it): they may run at once. Fetches and write-backs each on their own stream;
    the homes hold the updated values; two groups on the device at once."""
    fake = FakeCudaStreams(log=True)
    with fake:
        offload = StateOffload("cpu", streams=fake)
        states = _homed(offload, 4)
        homes = [st["exp_avg"].data_ptr() for st in states]
        updates = _lend_and_update(offload, fake, states)
        values = [(st["exp_avg"].clone(), st["exp_avg_sq"].clone()) for st in states]
    fetches, writes = zip(*(_copies(fake, h) for h in homes))
    assert all(len(f) == 1 and len(w) == 1 for f, w in zip(fetches, writes))
    F, W, U = [f[0] for f in fetches], [w[0] for w in writes], updates
    ordered = fake.ordered
    for i in range(4):
        assert ordered(F[i], U[i]) and ordered(U[i], W[i])
        if i + 2 < 4:
            assert ordered(W[i], F[i + 2])
        if i + 1 < 4:
            assert not ordered(F[i + 1], U[i]) and not ordered(U[i], F[i + 1]), i
        if i > 0:
            assert not ordered(W[i - 1], U[i]) and not ordered(U[i], W[i - 1]), i
    assert len({op.stream for op in F}) == 1 and len({op.stream for op in W}) == 1
    assert len({F[0].stream, W[0].stream, U[0].stream}) == 3
    assert all(torch.equal(a, torch.full((64, 64), 2.0 * i)) and torch.equal(b, torch.full((32,), i + 1.0))
               for i, (a, b) in enumerate(values))
    assert fake.peak_device_bytes == 2 * (64 * 64 + 32) * 4 and fake.live_device_bytes == 0


def test_arena_ranges_given_back_and_taken_again_are_ordered_after_the_copies_that_used_them():
    """Two steps of three groups with a state dict load between them (as ``load_state_dict`` does: the homes die,
    their arena ranges are given back, ``send_home`` takes the same ranges again and writes the loaded values into
    them on the host): no stream violation (the host writes ranges the write stream wrote in step 1, step 2
    fetches them, each step's lent device copies are freed while the write stream may still read them), and step
    2's fetch of each range is ordered after step 1's write-back of it."""
    fake = FakeCudaStreams(log=True)
    with fake:
        offload = StateOffload("cpu", streams=fake)
        states = _homed(offload, 3)
        ranges = sorted(v.data_ptr() for st in states for k, v in st.items() if k != "step")
        _lend_and_update(offload, fake, states)
        states = _states(3)  # loaded: the old homes die (before the new ones are taken)
        for st in states:
            offload.send_home(st)
        assert sorted(v.data_ptr() for st in states for k, v in st.items() if k != "step") == ranges
        start = len(fake.ops)
        _lend_and_update(offload, fake, states)
        values = [st["exp_avg"].clone() for st in states]
    for h in ranges:
        (written,), (fetched,) = _copies(fake, h, 0, start)[1], _copies(fake, h, start)[0]
        assert fake.ordered(written, fetched)
    assert all(torch.equal(v, torch.full((64, 64), 2.0 * i)) for i, v in enumerate(values))


def test_a_step_an_update_stops_leaves_no_copy_reading_the_ranges():
    """An update raises in the first group, after the second group's fetch was issued: the loop puts the first
    group home and waits for both streams before the error leaves it, so a load right after (the ranges given back
    and written on the host) races no copy, and the homes hold the values from before the failed update."""
    fake = FakeCudaStreams()
    with fake:
        offload = StateOffload("cpu", streams=fake)
        states = _homed(offload, 3)
        with pytest.raises(RuntimeError, match="update failed"):
            for _ in offload.lend_in_turn([[st] for st in states]):
                raise RuntimeError("update failed")
        assert all(offload.is_home(v) for st in states for k, v in st.items() if k != "step")
        values = [st["exp_avg"].clone() for st in states]
        states = _states(3)  # loaded: the old homes die (before the new ones are taken)
        for st in states:
            offload.send_home(st)
    assert all(torch.equal(v, torch.full((64, 64), float(i))) for i, v in enumerate(values))


def test_offloaded_muonclip_over_steps_with_a_load_between_is_bitwise_the_plain_one():
    """MuonClip with ``offload_state`` on the fake device: two steps, a state dict round trip (the homes' ranges
    given back and taken again), two more steps: bitwise the same run without offload, no stream violation."""
    plain, offloaded = muonclip_run(False, 4, load_at=2), muonclip_run(True, 4, load_at=2)
    assert len(plain) == len(offloaded) and all(torch.equal(a, b) for a, b in zip(plain, offloaded))
