"""bf16 parameters across layouts (gloo, 2 processes): dp=2 ZeRO-1, dp=2 plain data parallelism, ep=2, tp=2 and
pp=2 follow one bf16 process over 20 steps with QK-Clip clipping; the bytes on the wire are the bf16 formula
(EP all-to-all, PP send/recv, the ZeRO-1 parameter broadcast) and the gradient reduction follows
parallel.grad_reduce_dtype; every replica's bf16 parameters equal the owner's float32 masters rounded, also right
after a clip; no host synchronisation under EP but the documented one; a checkpoint resumes bitwise; offloaded
optimizer state gives bitwise the same run, and resumes bitwise; ZeRO-1 (reductions started by backward or after it)
and zbv / dualpipev pp=2 accumulate bf16 micro batches' gradients in float32."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch import checkpoint as ckpt
from launch.trainer import Trainer, init_runtime
from tests.audit import NoDeviceSync, WireAudit
from tests.dist_utils import run_distributed
from tests.test_precision import BF16_RUN, relative_distance, step_gradients
from tests.test_train import debug_cfg

BF16 = torch.bfloat16
STEPS = 20
COMMON = [*BF16_RUN, f"--train.steps={STEPS}", "--train.eval_interval=0", "--schedule.warmup_steps=2",
          "--data.grad_accum=2", "--optim.qk_clip_tau=0.05", "--optim.grad_clip=0.5"]
# bf16 rounds activations to 8 bits of mantissa (one unit in the last place: 3.9e-3 relative): a layout that sums
# partial results in another order (TP all-reduces of bf16 partial sums, EP's expert batches, the reduction order)
# rounds differently, and training amplifies it over 20 steps. Measured 2026-12-03: at most 3.6e-4 relative (ep2;
# bf16 vs float32 in one process: 2.0e-4); float32 layouts agree to 2e-5 (test_pipeline_train.py)
BF16_TOL = dict(rel=2e-3, abs=0)


def train(out_dir, *overrides):
    cfg = debug_cfg(out_dir, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    return trainer, trainer.fit()


def replicas_hold_the_rounded_masters(trainer) -> None:
    """Every managed bf16 parameter equals its float32 master rounded: on the owner directly, elsewhere the
    owner's parameter (every rank of a parameter's sharding group holds the same bf16 values)."""
    opt = trainer.optimizer
    rows = opt.row_shards()  # the tensors split by rows: this rank keeps the master of its rows
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:
            assert p.dtype == torch.float32  # the router bias
            continue
        assert p.dtype == BF16
        master = opt.state.get(p, {}).get("master")
        mine = p if name not in rows else p[rows[name].start:rows[name].start + rows[name].rows]
        if master is not None:
            assert master.dtype == torch.float32 and torch.equal(mine, master.to(BF16))
        if getattr(opt, "_slot", None) and id(p) in opt._slot:
            slot = opt._slot[id(p)]
            group = opt._group(slot)
            copies = [torch.empty_like(p) for _ in range(dist.get_world_size(group))]
            dist.all_gather(copies, p.detach().contiguous(), group=group)
            assert all(torch.equal(c, copies[0]) for c in copies)


def _worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    trainer, result = train(out, *overrides)
    replicas_hold_the_rounded_masters(trainer)
    clipped = int((trainer.qkclip_post or trainer.qkclip).last_clipped)
    torch.save({"losses": result.losses, "clipped": clipped}, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One bf16 process, the same global batch (micro batch 4 x accumulation 2)."""
    out = tmp_path_factory.mktemp("ref")
    trainer, result = train(out, *COMMON)
    replicas_hold_the_rounded_masters(trainer)
    return result.losses


@pytest.mark.parametrize("layout", [
    ["--data.micro_batch_size=2"],
    ["--data.micro_batch_size=2", "--parallel.optimizer=replicated"],
    ["--data.micro_batch_size=2", "--parallel.ep=2"],
    ["--parallel.tp=2"],
    ["--parallel.pp=2"],
    ["--data.micro_batch_size=2", "--parallel.grad_reduce_dtype=bfloat16"],
    ["--data.micro_batch_size=2", "--optim.qk_clip_mode=post_step"],
], ids=["dp2-zero1", "dp2-replicated", "dp2-ep2", "tp2", "pp2", "dp2-bf16-reduce", "dp2-post-step-clip"])
def test_bf16_layouts_follow_one_bf16_process(tmp_path, reference, layout):
    run_distributed(_worker, 2, str(tmp_path), [*COMMON, *layout])
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    losses = results[0]["losses"]
    assert all(r["losses"] == losses for r in results)
    assert sum(r["clipped"] for r in results) > 0  # QK-Clip clipped in the last step
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx([reference[s] for s in range(1, STEPS + 1)],
                                                                     **BF16_TOL)


# ------------------------------------------------------------------------------------------------ bytes on the wire
def _wire_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = debug_cfg(out, *COMMON, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.train_step()
    comm = getattr(trainer.optimizer, "comm", None)
    if comm is not None:
        comm.bytes_sent.clear()
    with WireAudit() as wire:
        trainer.train_step()
    buckets = [(b.numel, b.buffer_numel, b.sliced) for b in getattr(trainer.optimizer, "buckets", [])
               if b.group_size > 1]
    torch.save({"records": [(r.call, r.dtype, r.numel) for r in wire.records], "buckets": buckets,
                "comm": dict(comm.bytes_sent) if comm is not None else {},
                "clipped": int(trainer.qkclip_post.last_clipped) if trainer.qkclip_post is not None else None},
               Path(out) / f"rank{rank}.pt")


def _elements(records, call: str, floating: bool = True) -> dict[torch.dtype, int]:
    out: dict[torch.dtype, int] = {}
    for name, dtype, numel in records:
        if name == call and dtype.is_floating_point == floating:
            out[dtype] = out.get(dtype, 0) + numel
    return out


@pytest.mark.parametrize("reduce_dtype", ["float32", "bfloat16"])
def test_zero1_broadcasts_bf16_parameters_and_reduces_in_grad_reduce_dtype(tmp_path, reduce_dtype):
    run_distributed(_wire_worker, 2, str(tmp_path), ["--data.micro_batch_size=2",
                                                     f"--parallel.grad_reduce_dtype={reduce_dtype}"])
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        records = saved["records"]
        for sliced, (reduce, send) in {False: ("reduce", "broadcast"),
                                       True: ("reduce_scatter_single", "all_gather_single")}.items():
            n, wire = (sum(b[k] for b in saved["buckets"] if b[2] == sliced) for k in (0, 1))
            assert 0 < n < wire
            # every bucket's parameters once, 2 bytes each (a sliced bucket's: each rank its rows, its segment)
            assert _elements(records, send) == {BF16: n}, sliced
            # the gradients once, and a presence flag per parameter (a sliced bucket's: every rank's segment)
            assert _elements(records, reduce) == {getattr(torch, reduce_dtype): wire}, sliced


def test_a_post_step_clip_that_clips_nothing_sends_what_a_step_without_qk_clip_sends(tmp_path):
    """dp2 ZeRO-1, bf16 parameters: a step of ``qk_clip_mode: post_step`` with tau above every max logit makes the
    collectives of a step with QK-Clip off, in the same order, plus one thing: the post-step probe's MAX
    all-reduce of each layer's per-head max logits (float32, n_heads elements per layer). Both steps also make the
    forward's max-logit reduction (one float32 all-reduce of n_layers x n_heads, kept for logging), the bucket
    reduces and parameter broadcasts, the grad-norm and loss all-reduces; the optimizer's own counts
    (CountingComm) are equal. The clip used to broadcast every query/key weight from its owner."""
    sent = {}
    for name, flags in {"off": ["--optim.qk_clip=false"],
                        "post_step": ["--optim.qk_clip_mode=post_step", "--optim.qk_clip_tau=1e9"]}.items():
        run_distributed(_wire_worker, 2, str(tmp_path / name), ["--data.micro_batch_size=2", *flags])
        sent[name] = [torch.load(tmp_path / name / f"rank{r}.pt") for r in range(2)]
    m = debug_cfg(tmp_path, *COMMON).model
    probe = ("all_reduce", torch.float32, m.n_heads)
    for off, post in zip(sent["off"], sent["post_step"]):
        assert post["clipped"] == 0
        assert post["comm"] == off["comm"] and off["comm"]["broadcast"] > 0
        assert [r for r in post["records"] if r != probe] == off["records"]
        assert len(post["records"]) - len(off["records"]) == m.n_layers and probe not in off["records"]


def test_expert_parallel_all_to_all_moves_bf16_rows(tmp_path):
    """Per MoE layer and micro batch every routed row (tokens x top-k, dim wide) travels out and back, forward and
    backward: over the EP group 4 * rows * dim elements per rank's tokens, all bf16 (a rank sends its own rows
    and the rows it received back, so ranks differ by the routing; the int64 counts exchange aside)."""
    run_distributed(_wire_worker, 2, str(tmp_path), ["--data.micro_batch_size=2", "--parallel.ep=2"])
    cfg = debug_cfg(tmp_path, *COMMON)
    m, d = cfg.model, cfg.data
    rows = 2 * d.seq_len * m.n_activated_experts  # micro batch 2
    expected = (m.n_layers - m.first_k_dense) * d.grad_accum * 4 * rows * m.dim
    sent = [_elements(torch.load(tmp_path / f"rank{r}.pt")["records"], "all_to_all_single") for r in range(2)]
    assert all(s.keys() == {BF16} for s in sent) and sum(s[BF16] for s in sent) == 2 * expected


def test_pipeline_stages_send_bf16_hidden_states(tmp_path):
    """pp=2: per micro batch the first stage sends its [B, T, dim] output, the second the gradient back: bf16."""
    run_distributed(_wire_worker, 2, str(tmp_path), ["--parallel.pp=2"])
    cfg = debug_cfg(tmp_path, *COMMON)
    per_rank = cfg.data.grad_accum * cfg.data.micro_batch_size * cfg.data.seq_len * cfg.model.dim
    for rank in range(2):
        records = torch.load(tmp_path / f"rank{rank}.pt")["records"]
        assert _elements(records, "p2p_isend") == {BF16: per_rank}
        assert _elements(records, "p2p_irecv") == {BF16: per_rank}


# ------------------------------------------------------------------------------------------------ host syncs
def _sync_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = debug_cfg(out, *COMMON, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.train_step()
    counters = {st["step"].data_ptr() for st in trainer.optimizer.state.values() if "step" in st}
    mode = NoDeviceSync(lambda func, args: func is torch.ops.aten._local_scalar_dense.default
                        and args[0].data_ptr() in counters, tolist_from=("ExpertParallelExperts._exchange_counts",))
    with mode:
        trainer.train_step()
    n_moe = cfg.model.n_layers - cfg.model.first_k_dense
    assert dict(mode.tolist_calls) == {"ExpertParallelExperts._exchange_counts": n_moe * cfg.data.grad_accum}


def test_an_expert_parallel_step_synchronises_only_for_the_split_sizes(tmp_path):
    """dp2 x ep2, ZeRO-1, bf16: the whole step (dispatch, grouped experts, combine, backward, bucket reductions,
    optimizer, QK-Clip, router bias) makes no host read but the one per MoE layer and micro batch that gives
    all_to_all_single its split sizes."""
    run_distributed(_sync_worker, 2, str(tmp_path), ["--data.micro_batch_size=2", "--parallel.ep=2"])


# ------------------------------------------------------------------------------------------------ checkpoints, offload
def _resume_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    trainer, result = train(out, *COMMON, *overrides)
    torch.save({"losses": result.losses, "params": trainer.model.state_dict(),
                "masters": trainer.optimizer.master_params(), "optim": ckpt.optimizer_state(trainer.optimizer)},
               Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("world,layout", [
    (2, ["--data.micro_batch_size=2"]),
    (4, ["--data.micro_batch_size=1", "--parallel.ep=2"]),
    (2, ["--data.micro_batch_size=2", "--optim.offload_state=true"]),
], ids=["dp2", "dp4-ep2", "dp2-offload"])
def test_a_zero1_bf16_run_resumes_bitwise(tmp_path, world, layout):
    """Each float32 master is saved by its owner only (the other replicas leave the key out) and a resume in new
    processes gives the uninterrupted run bit for bit (every loss; every rank's final parameters, masters and
    optimizer state); at dp4 x ep2 the replicas that do not own an expert stack load their bf16 shard of it
    straight from the float32 checkpoint; with optim.offload_state the masters and moments saved and loaded are
    their homes in host memory (on CPU the parameters are host tensors too: no group mixes device types here, see
    test_dist_checkpoint.py for that)."""
    full = tmp_path / "full"
    run_distributed(_resume_worker, world, str(full), [*layout, "--train.ckpt_interval=10"])
    again = tmp_path / "again"
    run_distributed(_resume_worker, world, str(again),
                    [*layout, f"--train.resume={full / 'checkpoints' / 'step_00000010'}"])
    for rank in range(world):
        ref, resumed = (torch.load(run / f"rank{rank}.pt") for run in (full, again))
        steps = range(11, STEPS + 1)
        assert sorted(resumed["losses"]) == list(steps)
        assert [resumed["losses"][s] for s in steps] == [ref["losses"][s] for s in steps]
        for part in ("params", "masters", "optim"):
            assert resumed[part].keys() == ref[part].keys() and ref[part]
            for k, v in ref[part].items():
                assert torch.equal(resumed[part][k], v), f"rank {rank}: {part} {k} differs after resume"


def _offload_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    trainer, result = train(out, *COMMON, *overrides)
    opt = trainer.optimizer
    masters = {n: m.clone() for n, m in opt.master_params().items()}
    homes = opt.state_bytes("host")
    torch.save({"losses": result.losses, "masters": masters, "host": homes, "all": opt.state_bytes(),
                "counters": sum(st["step"].numel() * 4 for st in opt.state.values() if "step" in st)},
               Path(out) / f"rank{rank}.pt")


def test_offloaded_optimizer_state_gives_bitwise_the_same_zero1_run(tmp_path):
    for offload in (False, True):
        run_distributed(_offload_worker, 2, str(tmp_path / str(offload)),
                        ["--data.micro_batch_size=2", f"--optim.offload_state={offload}"])
    for rank in range(2):
        plain, off = (torch.load(tmp_path / str(o) / f"rank{rank}.pt") for o in (False, True))
        assert off["losses"] == plain["losses"]
        assert off["masters"].keys() == plain["masters"].keys() and off["masters"]
        assert all(torch.equal(off["masters"][k], plain["masters"][k]) for k in plain["masters"])
        assert plain["host"] == 0 and off["host"] == off["all"] - off["counters"] == plain["all"] - plain["counters"]


# ------------------------------------------------------------------------------------ float32 gradient accumulation
ACCUM_MODEL = ["--model.n_layers=4"]  # zbv: 2 stages per rank
PP2 = [*ACCUM_MODEL, *BF16_RUN, "--data.micro_batch_size=1", "--data.grad_accum=4", "--parallel.pp=2",
       "--parallel.pp_virtual_stages=2"]
ACCUM_LAYOUTS = {  # the same 4 samples per step
    "fp32": [*ACCUM_MODEL, "--data.micro_batch_size=2", "--data.grad_accum=1"],
    "bf16": [*ACCUM_MODEL, *BF16_RUN, "--data.micro_batch_size=2", "--data.grad_accum=1"],
    "zero1": [*ACCUM_MODEL, *BF16_RUN, "--data.micro_batch_size=1", "--data.grad_accum=2"],
    "zero1_no_overlap": [*ACCUM_MODEL, *BF16_RUN, "--data.micro_batch_size=1", "--data.grad_accum=2",
                         "--parallel.zero1_overlap=false"],
    "zbv_pp2": [*PP2, "--parallel.pp_schedule=zbv"],
    "dualpipev_pp2": [*PP2, "--parallel.pp_schedule=dualpipev"],
    "interleaved_pp2": [*PP2, "--parallel.pp_schedule=interleaved_1f1b"],  # backward accumulates through hooks
}


def _accum_worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    for name, overrides in ACCUM_LAYOUTS.items():
        torch.save(step_gradients(Path(out) / name, *overrides), Path(out) / f"{name}.{rank}.pt")


def test_zero1_and_zbv_accumulate_bf16_micro_batches_in_float32(tmp_path):
    """One step, 2 processes, each layout in turn: the float32 gradient a ZeRO-1 owner updates with (reduced over
    dp=2 from 2 micro batches of 1 per rank; or over 4 micro batches of 1 in a zbv pp=2 pipeline, whose zero-bubble
    backward accumulates weight gradients by hand, without the hook) equals the dp=2 gradient of one micro batch of 2
    per rank up to bf16's rounding, closer to it than the float32 run's (measured 0.25x and 0.37x; an accumulation
    that kept only the last micro batch: 89x). With ``parallel.zero1_overlap: false`` the buckets are the same bit
    for bit: each bf16 gradient is still moved into its float32 bucket after its backward (accumulated in bf16 until
    the reduction instead, it differs by far less than bf16's noise: only the bitwise comparison sees that). The
    zero-bubble schedules (zbv, dualpipev) give interleaved 1F1B's gradient (same stages, same micro batches, hooks)
    to float32 rounding (measured: bitwise; summed in bf16 before, 1.5e-3 and 5.7e-4 off)."""
    run_distributed(_accum_worker, 2, str(tmp_path))
    grads = {}
    for name in ACCUM_LAYOUTS:
        owned = [torch.load(tmp_path / f"{name}.{rank}.pt") for rank in range(2)]
        both = owned[0].keys() & owned[1].keys()  # the tensors split by rows: each rank reads its half
        assert owned[0] and owned[1] and both <= {"embed_tokens.weight", "lm_head.weight"}, name  # each owns a part
        grads[name] = {**owned[0], **owned[1], **{k: torch.cat([owned[0][k], owned[1][k]]) for k in both}}
    bf16_noise = relative_distance(grads["bf16"], grads["fp32"])  # also: every gradient is in every layout
    for name in ("zero1", "zbv_pp2"):
        distance = relative_distance(grads[name], grads["bf16"])
        assert 0 < distance < bf16_noise, f"{name}: {distance:.3g} off one micro batch; bf16: {bf16_noise:.3g}"
    differ = [k for k, g in grads["zero1"].items() if not torch.equal(grads["zero1_no_overlap"][k], g)]
    assert not differ, f"zero1_overlap=false changes the float32 gradients of {len(differ)} params: {differ[:3]}"
    for name in ("zbv_pp2", "dualpipev_pp2"):
        distance = relative_distance(grads[name], grads["interleaved_pp2"])
        assert distance < 8 * torch.finfo(torch.float32).eps, f"{name}: {distance:.3g} off interleaved 1F1B's gradient"
