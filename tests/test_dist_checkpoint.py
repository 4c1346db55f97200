"""Distributed checkpoints (2 gloo processes, ZeRO-1): bitwise resume at the same DP size, and re-sharding to a
different DP size (dp=2 -> dp=1 and dp=1 -> dp=2) with the same global batch; the DTensor views DCP loads into are
the state tensors themselves, also where host and device tensors share a group."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from launch import checkpoint as ckpt
from launch.trainer import Trainer, init_runtime
from muonclip.placement import Placement
from tests.dist_utils import run_distributed
from tests.test_checkpoint import checkpoint_tensors
from tests.test_train import debug_cfg

N, HALF = 6, 3
COMMON = [f"--train.steps={N}", "--schedule.warmup_steps=2", "--train.eval_interval=0", "--train.ckpt_interval=0",
          "--parallel.optimizer=zero1", "--data.grad_accum=1"]
DP2 = [*COMMON, "--data.micro_batch_size=2"]  # global batch 2 x 2 = 4
DP1 = [*COMMON, "--data.micro_batch_size=4"]  # global batch 4
LOSS_TOL = dict(rel=1e-5, abs=1e-5)  # dp=1 vs dp=2: different reduction order only
SLICED = ("embed_tokens.weight", "lm_head.weight")  # AdamW, 2 MiB: each dp rank keeps the state of half the rows


def _sliced(key: str) -> bool:
    return key.startswith("optim/") and key.split("/")[1] in SLICED


def _whole(per_rank: list[dict]) -> dict:
    """Every rank's optimizer state as one process holds it: a sliced tensor's rows concatenated in rank order (its
    step counter is on every rank), the rest from its owner."""
    out = {}
    for key in {k for state in per_rank for k in state}:
        parts = [state[key] for state in per_rank if key in state]
        if _sliced(key) and not key.endswith("/step"):
            out[key] = torch.cat(parts)
        else:
            assert len(parts) == 1 or _sliced(key) and all(torch.equal(p, parts[0]) for p in parts), key
            out[key] = parts[0]
    return out


def _snapshot(trainer: Trainer) -> dict:
    """Live model params, this rank's optimizer state (optim/{fqn}/{key}), the next micro-batch (not consumed)."""
    nxt = copy.copy(trainer.loader).next_batch()
    return {"step": trainer.step, "global_batches": trainer.loader.global_batches,
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "optim": {k: v.detach().clone() for k, v in ckpt.optimizer_state(trainer.optimizer).items()},
            "next": nxt}


def _phase1(rank: int, world: int, root: str, overrides: list[str] = DP2) -> None:
    """Uninterrupted N steps (a/), and a run interrupted after N/2 steps with a checkpoint (b/)."""
    torch.set_num_threads(1)
    root = Path(root)
    cfg = debug_cfg(root / "a", *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    result = trainer.fit()
    torch.save({"losses": result.losses, "params": _snapshot(trainer)["params"], "zero1": trainer.zero1},
               root / f"a_rank{rank}.pt")

    cfg = debug_cfg(root / "b", *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    losses = {}
    for _ in range(HALF):
        loss = trainer.train_step().loss
        losses[trainer.step] = loss
    trainer.save()
    torch.save({"losses": losses, **_snapshot(trainer)}, root / f"b1_rank{rank}.pt")


def _phase2(rank: int, world: int, root: str, single_ckpt: str | None, overrides: list[str] = DP2) -> None:
    """New processes: resume b/ (auto) to step N; with ``single_ckpt``, resume that dp=1 checkpoint at dp=2
    (rev/) to step N."""
    torch.set_num_threads(1)
    root = Path(root)
    cfg = debug_cfg(root / "b", *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    assert trainer.step == HALF
    result = trainer.fit()
    torch.save({"losses": result.losses, "params": _snapshot(trainer)["params"]}, root / f"b2_rank{rank}.pt")
    if single_ckpt is None:
        return

    cfg = debug_cfg(root / "rev", *DP2, f"--train.resume={single_ckpt}")
    trainer = Trainer(cfg, init_runtime(cfg))
    loaded = _snapshot(trainer)
    result = trainer.fit()
    torch.save({"loaded": loaded, "losses": result.losses}, root / f"rev_rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distckpt")
    # dp=1 straight run with a checkpoint at N/2 (for dp=1 -> dp=2)
    cfg = debug_cfg(root / "single", *DP1, f"--train.ckpt_interval={HALF}")
    single = Trainer(cfg, init_runtime(cfg))
    assert not single.zero1
    single_losses = single.fit().losses
    peek = copy.copy(single.loader)
    peek.samples_consumed = HALF * peek.global_batch_size
    single_next = peek.next_batch()  # what the dp=1 run consumed in step HALF + 1
    single_ckpt = root / "single" / "checkpoints" / f"step_{HALF:08d}"
    run_distributed(_phase1, 2, str(root))
    run_distributed(_phase2, 2, str(root), str(single_ckpt))
    load = lambda name: [torch.load(root / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)]  # noqa: E731
    return {"root": root, "single_losses": single_losses, "single_ckpt": single_ckpt, "single_next": single_next,
            "a": load("a"), "b1": load("b1"), "b2": load("b2"), "rev": load("rev")}


def assert_bitwise_resume(runs) -> None:
    """Interrupted at N/2 and resumed in new processes = uninterrupted: every loss and parameter, on each rank."""
    for rank in range(2):
        a, b1, b2 = runs["a"][rank], runs["b1"][rank], runs["b2"][rank]
        assert sorted(a["losses"]) == list(range(1, N + 1))
        assert sorted(b1["losses"]) == list(range(1, HALF + 1)) and sorted(b2["losses"]) == list(range(HALF + 1, N + 1))
        assert {**b1["losses"], **b2["losses"]} == a["losses"]  # exact, every step
        assert a["params"].keys() == b2["params"].keys()
        for k, v in a["params"].items():
            assert torch.equal(v, b2["params"][k]), f"rank {rank}: {k} differs after resume"


def test_zero1_dp2_resume_in_new_processes_is_bitwise(runs):
    assert all(a["zero1"] for a in runs["a"])
    assert_bitwise_resume(runs)
    # ZeRO-1 really sharded the optimizer state: each rank owns a disjoint, non-empty part, and half the rows of the
    # embedding's and the head's AdamW state
    o0, o1 = runs["b1"][0]["optim"], runs["b1"][1]["optim"]
    assert o0 and o1 and {k for k in o0.keys() & o1.keys()} == {k for k in o0 if _sliced(k)}
    assert {k.split("/")[1] for k in o0 if _sliced(k)} == set(SLICED)
    vocab = runs["b1"][0]["params"]["embed_tokens.weight"].shape[0]
    assert all(o[k].shape[0] == vocab // 2 for o in (o0, o1) for k in o if _sliced(k) and not k.endswith("/step"))


def test_zero1_dp2_checkpoint_loads_in_one_process(runs, tmp_path):
    b1 = runs["b1"]
    path = runs["root"] / "b" / "checkpoints" / f"step_{HALF:08d}"
    cfg = debug_cfg(tmp_path, *DP1, f"--train.resume={path}")
    trainer = Trainer(cfg, init_runtime(cfg))
    assert trainer.step == HALF and not trainer.zero1
    loaded = _snapshot(trainer)
    for k, v in b1[0]["params"].items():
        assert torch.equal(loaded["params"][k], v), f"param {k} differs"
    full_optim = _whole([b1[0]["optim"], b1[1]["optim"]])
    assert loaded["optim"].keys() == full_optim.keys()
    assert {k.rsplit("/", 1)[1] for k in full_optim} == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}
    for k, v in full_optim.items():
        assert torch.equal(loaded["optim"][k], v), f"optimizer state {k} differs"
    # the data continues at the same global sample: dp=1's next batch = rank 0's + rank 1's next micro-batches
    assert loaded["global_batches"] == b1[0]["global_batches"] == HALF
    for i in range(2):
        assert torch.equal(loaded["next"][i], torch.cat([b1[0]["next"][i], b1[1]["next"][i]]))
    result = trainer.fit()
    ref = runs["b2"][0]["losses"]
    assert sorted(result.losses) == sorted(ref) == list(range(HALF + 1, N + 1))
    assert [result.losses[s] for s in sorted(ref)] == pytest.approx([ref[s] for s in sorted(ref)], **LOSS_TOL)


def test_dp1_checkpoint_loads_at_dp2_with_zero1(runs):
    rev = runs["rev"]
    saved = checkpoint_tensors(runs["single_ckpt"], runs["root"] / "single_flat.pt")
    owned = set()
    for rank in range(2):
        loaded = rev[rank]["loaded"]
        assert loaded["step"] == HALF and loaded["global_batches"] == HALF
        for k, v in loaded["params"].items():
            assert torch.equal(v, saved[k]), f"rank {rank}: param {k} differs"
        for k, v in loaded["optim"].items():
            want = saved[k]
            if _sliced(k) and not k.endswith("/step"):  # this rank's rows
                want = want.chunk(2)[rank]
            assert torch.equal(v, want), f"rank {rank}: optimizer state {k} differs"
        assert not {k for k in owned & loaded["optim"].keys() if not _sliced(k)}
        owned |= loaded["optim"].keys()
    assert owned == {k for k in saved if k.startswith("optim/")}  # every state tensor landed on its owner(s)
    # ranks 0 and 1 read the two halves of the dp=1 run's next global batch; continuation matches dp=1
    for i in range(2):
        assert torch.equal(torch.cat([rev[0]["loaded"]["next"][i], rev[1]["loaded"]["next"][i]]), runs["single_next"][i])
    losses = runs["single_losses"]
    for rank in range(2):
        got = rev[rank]["losses"]
        assert sorted(got) == list(range(HALF + 1, N + 1))
        assert [got[s] for s in sorted(got)] == pytest.approx([losses[s] for s in sorted(got)], **LOSS_TOL)


# ------------------------------------------------------------------------------------------------ DTensor views
def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` is a view of all of ``b``: the same storage (compared by its StorageImpl, since every meta tensor's
    data pointer is 0), offset, shape and strides, on the same device."""
    return (a.device == b.device and a.untyped_storage()._cdata == b.untyped_storage()._cdata
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def _views_worker(rank: int, world: int, out: str) -> None:
    """shard_views over one group holding tensors of two device types, in both orders: ``meta`` stands in for CUDA
    (``DTensor.from_local`` moves a tensor onto its mesh's device type as it would onto CUDA, and leaves a meta
    tensor where it is), CPU for the offloaded host state."""
    group = dist.group.WORLD  # the expert-parallel group and the tensor-parallel group here
    placements = {"moe.w1": Placement("expert"), "moe.w2": Placement("expert"),
                  "attn.wo": Placement("tp_sharded", shard_dim=1, tp_group=group)}
    state = {"moe.w1": torch.empty(2, 4, 3, dtype=torch.bfloat16, device="meta"),  # a replica: master elsewhere
             "moe.w2": torch.zeros(2, 4, 3),  # an owned master, in host memory
             "optim/moe.w2/momentum_buffer": torch.zeros(2, 4, 3),
             "attn.wo": torch.empty(4, 3, device="meta"),  # a float32 parameter (no master) on the device
             "optim/attn.wo/momentum_buffer": torch.zeros(4, 3)}
    found = {}
    for order in ("device first", "host first"):
        keys = list(state) if order == "device first" else list(reversed(state))
        views = ckpt.shard_views({k: state[k] for k in keys}, placements, SimpleNamespace(ep_group=group))
        for k in keys:
            local = views[k].to_local()
            found[order, k] = {"state": state[k].device.type, "local": local.device.type,
                               "mesh": views[k].device_mesh.device_type, "same": _same_tensor(local, state[k]),
                               "shape": tuple(views[k].shape)}
    torch.save(found, Path(out) / f"views_rank{rank}.pt")


def test_each_view_wraps_the_state_tensor_itself_when_host_and_device_tensors_share_a_group(tmp_path):
    """Offloaded optimizer state (host) beside device parameters in one expert- or tensor-parallel group: each
    DTensor's local tensor is the state tensor itself (DCP loads into it), on a mesh of its own device type. One
    mesh per group moved the tensors of the other type onto the first one's device: the load filled copies and
    the owned masters and momentum kept their initial values."""
    run_distributed(_views_worker, 2, str(tmp_path))
    global_shapes = {"moe.w1": (4, 4, 3), "moe.w2": (4, 4, 3), "optim/moe.w2/momentum_buffer": (4, 4, 3),
                     "attn.wo": (4, 6), "optim/attn.wo/momentum_buffer": (4, 6)}
    for rank in range(2):
        found = torch.load(tmp_path / f"views_rank{rank}.pt")
        assert len(found) == 2 * len(global_shapes)
        for (order, key), f in found.items():
            where = f"rank {rank}, {order}: {key} (state on {f['state']})"
            assert f["local"] == f["mesh"] == f["state"], f"{where}: local on {f['local']}, mesh {f['mesh']}"
            assert f["same"], f"{where}: the view is a copy, not the state"
            assert f["shape"] == global_shapes[key], where
