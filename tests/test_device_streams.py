"""The offloaders' stream discipline on a CPU (issue 26, item 1): activation offload (parallel/activation_offload.py)
and optimizer-state offload (muonclip/offload.py) run on the recording fake of the device seam
(muonclip/device_streams.py, tests/fake_streams.py), which fails where CUDA's caching allocator would hand memory
to a stream while another still reads it, or a stream would read memory before its copy is done; and activation
offload under a real interleaved 1F1B schedule (2 gloo processes) holds at most two blocks on the device."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from muonclip.offload import StateOffload
from parallel.activation_offload import ActivationOffload
from tests.dist_utils import run_distributed
from tests.fake_streams import FakeCudaStreams, Violation


def test_the_fake_fails_where_cuda_would_reuse_or_read_memory_too_early():
    """The fake's rules on hand-written sequences: a side stream's tensor read on the compute stream and dropped
    (reuse while read) fails unless recorded on the compute stream or waited for by the side stream; a read of a
    copy before an event orders it after the copy fails; a host read of a device-to-host copy fails until the host
    synchronised with its stream."""
    src = torch.ones(64)  # made before: no stream wrote it

    def side_tensor_read_on_compute(order: str) -> None:
        fake = FakeCudaStreams()
        with fake:
            side = fake.new_stream()
            with fake.use(side):
                t = fake.copy_(fake.empty((64,), torch.float32, "cpu"), src)
                done = fake.record_event(side)
            fake.wait_event(fake.current(), done)
            (t * 2).sum()  # a kernel on the compute stream reads it
            if order == "record_stream":
                fake.record_stream(t, fake.current())
            if order == "side waits":
                fake.wait_stream(side, fake.current())
            del t

    with pytest.raises(Violation, match="freed .* while compute's use #.* may still be queued"):
        side_tensor_read_on_compute("nothing")
    side_tensor_read_on_compute("record_stream")
    side_tensor_read_on_compute("side waits")

    fake = FakeCudaStreams()
    with pytest.raises(Violation, match="reads device memory .* before side1's write"):
        with fake:
            side = fake.new_stream()
            with fake.use(side):
                t = fake.copy_(fake.empty((64,), torch.float32, "cpu"), src)
            fake.record_stream(t, fake.current())
            t.sum()  # no wait_event: the copy may not have run yet

    def host_read_of_a_copy(sync: bool) -> None:
        fake = FakeCudaStreams()
        with fake:
            side = fake.new_stream()
            host = fake.empty((64,), torch.float32, "cpu", host=True)
            with fake.use(side):
                fake.copy_(host, src)
            if sync:
                fake.synchronize(side)
            host.clone()  # on the host

    with pytest.raises(Violation, match="clone on host reads host memory .* before side1's write"):
        host_read_of_a_copy(False)
    host_read_of_a_copy(True)


def test_the_fake_orders_the_bytes_each_op_touches_not_the_whole_storage():
    """The offloaders' host memory is ranges of one arena chunk (one storage): a copy on one stream writing one
    range and a copy on another reading a different range need no order; reading the written range does."""

    def read_after_write(overlap: bool) -> None:
        fake = FakeCudaStreams()
        with fake:
            chunk = fake.empty((1024,), torch.uint8, "cpu", host=True)
            writer, reader = fake.new_stream(), fake.new_stream()
            with fake.use(writer):
                fake.copy_(chunk[:512], torch.ones(512, dtype=torch.uint8))
            with fake.use(reader):
                fake.copy_(fake.empty((256,), torch.uint8, "cpu"), chunk[256:512] if overlap else chunk[512:768])

    read_after_write(False)
    with pytest.raises(Violation, match=r"copy_ on side2 reads host memory .* \(bytes 256:512\) before side1's write"):
        read_after_write(True)


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def test_activation_offload_keeps_the_allocators_stream_rule_and_two_blocks_on_the_device():
    """Four blocks, forward and backward on the fake device: no use of memory another stream may reuse or has not
    finished writing (what comes back is recorded on the compute stream before backward reads it, what goes out
    on the side stream before the activation can die), gradients bitwise those without offload, and what comes
    back peaks at two blocks (the one running and the one prefetched)."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*(_Block(32) for _ in range(4)))
    x = torch.randn(128, 32)
    blocks(x.requires_grad_()).square().sum().backward()
    reference = [x.grad.clone()] + [p.grad.clone() for p in blocks.parameters()]
    x.grad = None
    blocks.zero_grad()

    fake = FakeCudaStreams()
    offload = ActivationOffload(min_bytes=1024, streams=fake)
    for block in blocks:
        offload.attach(block)
    with fake:
        blocks(x).square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip([x.grad] + [p.grad for p in blocks.parameters()], reference))
    per_block = 128 * 32 * 4 + 128 * 128 * 4  # each block's input and its ReLU's output (what the GEMMs keep)
    assert offload.peak_host_bytes == 4 * per_block and offload.host_bytes == 0
    assert fake.peak_device_bytes == 2 * per_block and fake.live_device_bytes == 0


def muonclip_run(offload: bool, steps: int, load_at: int | None = None) -> list[torch.Tensor]:
    """``steps`` MuonClip steps of a small model on the fake device (``offload``: state offloaded), a state dict
    round trip before step ``load_at`` (offloaded: the homes' arena ranges given back and taken again, asserted),
    then the parameters and the state read on the host (as a checkpoint does)."""
    import muonclip

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    opt = muonclip.MuonClip(muonclip.build_param_groups(model.named_parameters()), lr=0.02, offload_state=offload)
    fake = FakeCudaStreams()
    if offload:
        opt.offload = StateOffload(opt.offload.device, streams=fake)
    with fake:
        for step in range(steps):
            if step == load_at:
                saved = opt.state_dict()
                saved["state"] = {i: {k: v.clone() for k, v in st.items()} for i, st in saved["state"].items()}
                before = sorted(v.data_ptr() for st in opt.state.values() for k, v in st.items() if k != "step")
                opt.load_state_dict(saved)
                del saved
                if offload:  # the new homes are the old ones' ranges
                    assert sorted(v.data_ptr() for st in opt.state.values() for k, v in st.items()
                                  if k != "step") == before
            model(torch.randn(4, 16)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        state = [v.clone() for st in opt.state.values() for k, v in sorted(st.items()) if k != "step"]
    return [p.detach().clone() for p in model.parameters()] + state


def test_offloaded_optimizer_state_keeps_the_stream_rules_and_the_steps():
    """MuonClip with ``offload_state`` on the fake device for three steps: bitwise the steps without offload, and
    no violation, reading the state on the host afterwards (as a checkpoint does) included."""
    plain, offloaded = muonclip_run(False, 3), muonclip_run(True, 3)
    assert len(plain) == len(offloaded) and all(torch.equal(a, b) for a, b in zip(plain, offloaded))


def test_lent_state_the_update_replaces_goes_home_without_a_stream_hazard():
    """``lend_in_turn``'s contract lets an update replace a lent tensor (a new tensor of the compute stream): its
    copy home runs on the side stream, so it must be recorded there before the state dict lets it go. MuonClip
    updates in place (the lent tensor belongs to the side stream, where recording it changes nothing): this is the
    case the ``record_stream`` in ``_store`` is for."""
    fake = FakeCudaStreams()
    with fake:
        offload = StateOffload("cpu", streams=fake)
        states = [{"exp_avg": torch.full((64, 64), float(i))} for i in range(3)]
        for st in states:
            offload.send_home(st)
        for group in offload.lend_in_turn([[st] for st in states]):
            group[0]["exp_avg"] = group[0]["exp_avg"] * 0.5 + 1
        homes = [st["exp_avg"].clone() for st in states]
    assert all(offload.is_home(st["exp_avg"]) for st in states)
    assert all(torch.equal(h, torch.full((64, 64), i * 0.5 + 1)) for i, h in enumerate(homes))
    assert fake.peak_device_bytes == 2 * 64 * 64 * 4  # two groups on the device at once, as the planner counts


# ------------------------------------------------------------------------------------------------ interleaved 1F1B
def _interleaved_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    from launch.trainer import Trainer, init_runtime
    from tests.test_train import debug_cfg

    torch.set_num_threads(1)
    trainer = Trainer(*(lambda cfg: (cfg, init_runtime(cfg)))(debug_cfg(out, *overrides)))
    offload, fake = trainer.model.activation_offload, FakeCudaStreams()
    offload.streams, offload.min_bytes = fake, 1024  # the debug model's saved tensors are under 64 KiB
    per_block: dict[int, int] = {}
    copy_out = offload._copy_out

    def counted(storage, device):
        copy = copy_out(storage, device)
        per_block[copy.block_call] = per_block.get(copy.block_call, 0) + copy.nbytes
        return copy

    offload._copy_out = counted
    with fake:
        trainer.train_step()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak": fake.peak_device_bytes, "blocks": per_block}))


def test_interleaved_1f1b_brings_back_at_most_two_blocks_at_a_time(tmp_path):
    """pp=2, interleaved 1F1B, 2 stages of 2 layers per rank, 2 micro batches: each rank runs another stage's or
    micro batch's forward between the forwards of a chain (rank 0: F0 F0 F2 F2 B2 B2 B0 B0), so the block that
    ran just before a chain's first one is not the one its backward needs next. On the fake device, no stream
    violation in the whole step, and at most the two largest blocks' bytes are back on the device at once (the
    planner's assumption; fetching the block before in forward order, whatever chain it was in, held 1,282,048
    bytes against 966,656 on rank 0)."""
    overrides = ["--parallel.pp=2", "--parallel.pp_schedule=interleaved_1f1b", "--parallel.pp_virtual_stages=2",
                 "--model.n_layers=8", "--parallel.activation_offload=true", "--data.micro_batch_size=1",
                 "--data.grad_accum=2", "--train.steps=1", "--schedule.warmup_steps=1", "--train.eval_interval=0"]
    run_distributed(_interleaved_worker, 2, str(tmp_path), overrides)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        blocks = sorted(result["blocks"].values(), reverse=True)
        assert len(blocks) == 8  # 2 stages x 2 layers x 2 micro batches
        assert 0 < result["peak"] <= sum(blocks[:2]), (rank, result["peak"], blocks)
