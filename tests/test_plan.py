"""The memory and communication planner (parallel/plan.py) against real CPU runs: per-step optimizer bytes equal
CountingComm's counts exactly, and each rank's peak is within 10% of the most tensor bytes it held (tests/audit.py
``LiveBytes``, the CPU's ``torch.cuda.max_memory_allocated``), at several layouts (1 process, dp=2 ZeRO-1, tp=2,
dp=2 x ep=2, pp=2); the states of a bf16 run and an asynchronous save's staging buffer exactly; the activations
against saved-tensor bytes and peaks with every memory technique."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch

from parallel.plan import format_plan, main, plan_layout
from tests.dist_utils import run_distributed
from tests.test_train import debug_cfg

# parameters (routed experts) dominate; 2 steps, 2 micro batches each
BIG = ["--model.dim=256", "--model.n_layers=3", "--model.n_routed_experts=32", "--model.moe_inter_dim=2048",
       "--train.steps=2", "--train.eval_interval=0", "--schedule.warmup_steps=1", "--data.grad_accum=2"]
OPTIMIZER_COMM = ("reduce", "broadcast", "all_reduce", "all_to_all", "reduce_scatter", "all_gather")  # CountingComm's


def _measure(rank: int, world: int, out: str, overrides: list[str]) -> None:
    from launch.trainer import Trainer, init_runtime
    from tests.audit import LiveBytes

    torch.set_num_threads(1)
    cfg = debug_cfg(out, *BIG, *overrides)
    rt = init_runtime(cfg)
    with LiveBytes() as live:
        trainer = Trainer(cfg, rt)
        trainer.train_step()
        sent = dict(getattr(trainer.optimizer, "comm_bytes", {}))
        trainer.train_step()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak": live.peak, "sent": sent}))


@pytest.mark.parametrize("world,layout", [
    (1, ["--data.micro_batch_size=4"]),
    (2, ["--data.micro_batch_size=2"]),
    (2, ["--data.micro_batch_size=4", "--parallel.tp=2"]),
    (2, ["--data.micro_batch_size=2", "--parallel.ep=2"]),
    (2, ["--data.micro_batch_size=4", "--parallel.pp=2"]),
    (2, ["--data.micro_batch_size=4", "--parallel.cp=2"]),
    (2, ["--data.micro_batch_size=4", "--parallel.tp=2", "--parallel.sequence_parallel=true", "--parallel.ep=2"]),
], ids=["1proc", "dp2", "tp2", "dp2-ep2", "pp2", "cp2", "tp2sp-ep2-folded"])
def test_plan_matches_measured_memory_and_bytes(tmp_path, world, layout):
    """The optimizer's bytes on the wire are CountingComm's, exactly, per collective; each rank's planned peak is
    within 10% of the most tensor bytes it held over its build and two steps (tests/audit.py ``LiveBytes``)."""
    run_distributed(_measure, world, str(tmp_path), layout)
    plans = plan_layout(debug_cfg(tmp_path, *BIG, *layout), world)
    for rank, plan in enumerate(plans):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        planned = {k: v for k, v in plan.comm.items() if k in OPTIMIZER_COMM}
        if world > 1:
            assert measured["sent"] == planned, rank  # exact, per collective
        assert plan.peak == pytest.approx(measured["peak"], rel=0.10), (rank, plan.phases, measured["peak"])


def _cp_wire(rank: int, world: int, out: str, overrides: list[str]) -> None:
    from launch.trainer import Trainer, init_runtime
    from tests.audit import Bf16GemmsInFloat32, WireAudit

    torch.set_num_threads(1)
    cfg = debug_cfg(out, *BIG, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    with Bf16GemmsInFloat32():
        trainer.train_step()  # builds what a first step builds
        with WireAudit() as wire:
            trainer.train_step()
    sent = sum(r.numel * r.dtype.itemsize for r in wire.records if r.call == "all_to_all_single")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"all_to_all": sent}))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planned_context_parallel_bytes_are_the_all_to_alls_of_a_step(tmp_path, dtype):
    """cp=2 (MLA, bf16 or float32): the planner's ``cp_all_to_all`` is what leaves each rank in the all-to-alls of
    one step ((cp-1)/cp of every exchanged tensor: the forward's q, k, v and output, the backward's gradients)."""
    layout = ["--data.micro_batch_size=2", "--parallel.cp=2", f"--train.dtype={dtype}", f"--train.param_dtype={dtype}"]
    run_distributed(_cp_wire, 2, str(tmp_path), layout)
    plans = plan_layout(debug_cfg(tmp_path, *BIG, *layout), 2)
    for rank, plan in enumerate(plans):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())["all_to_all"]
        assert plan.comm["cp_all_to_all"] == measured // 2  # the other half stays on the rank


def test_the_cli_prints_every_stage_the_verdict_and_the_bubble(capsys):
    """Kimi K2 on 256 GPUs runs its 1,024 micro batches in one pipeline pass: it fits 80 GiB and every pipeline
    rank idles at most 5% of its schedule slots (1.5% on rank 0; 49% in the 16-micro-batch rounds it used to run)."""
    root = Path(__file__).resolve().parent.parent
    assert main(["--config", str(root / "configs" / "kimi_k2.yaml"), "--world", "256", "--train.device=cuda"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \| \(", line)]
    assert len(rows) == 16 and all("7168" in line for line in rows)  # one row per pipeline stage
    assert "largest peak: rank" in out and "-> fits in 80 GiB" in out
    column = [c.strip() for c in next(x for x in out.splitlines() if x.startswith("| rank")).split("|")].index("idle")
    idle = [float(line.split("|")[column].strip().rstrip("%")) for line in rows]
    assert max(idle) <= 5.0 and idle[0] == 1.5, idle
    assert "1,024 micro batches per step in 1 pass of 1,024" in out and "modelled step ~" in out
    assert main(["--config", str(root / "configs" / "kimi_k2.yaml"), "--world", "100"]) == 2


def test_the_idle_share_is_the_bubble_of_torchs_op_table():
    """Interleaved 1F1B at pp16 x 2 virtual stages, rank 0 (torch 2.13's op table: a forward or a backward per
    slot): 16 micro batches per pass take 126 slots for 64 busy, 64 take 318 for 256, 1,024 take 4,158 for 4,096."""
    from parallel.pipeline_runtime import idle_fraction

    for micro, slots in ((16, 126), (64, 318), (1024, 4158)):
        assert idle_fraction("interleaved_1f1b", 16, 2, micro, 0) == (slots - 4 * micro) / slots
    assert [round(idle_fraction("interleaved_1f1b", 16, 2, m, 0), 3) for m in (16, 1024)] == [0.492, 0.015]


def test_plan_of_the_whole_model_adds_up():
    """One process: parameters are the model's, gradients the trainable ones, AdamW 2 and Muon 1 state each."""
    import muonclip
    from models import Transformer

    cfg = debug_cfg("/tmp/unused", *BIG)
    (plan,) = plan_layout(cfg, 1)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    params = dict(model.named_parameters())
    assert plan.params == 4 * sum(p.numel() for p in params.values())
    assert plan.grads == 4 * sum(p.numel() for p in params.values() if p.requires_grad)
    groups = muonclip.build_param_groups(params.items())
    state = sum(p.numel() * (1 if g["use_muon"] else 2) for g in groups for p in g["params"] if p.requires_grad)
    counters = sum(1 for g in groups if not g["use_muon"] for p in g["params"] if p.requires_grad)  # AdamW steps
    assert plan.optimizer == 4 * state + 4 * counters and plan.optimizer_host == 0
    assert "fits in 80 GiB" in format_plan([plan])


@pytest.mark.parametrize("dtype,itemsize", [("bfloat16", 2), ("float32", 4)])
def test_planned_zero1_broadcast_sends_parameters_in_their_dtype(dtype, itemsize):
    """dp=2 ZeRO-1 (planned, no processes): every trainable parameter is broadcast once per step from its owner (the
    embedding and the head all-gathered from every rank's rows), in the parameters' dtype (bf16: 2 bytes an element,
    not float32's 4), and each rank sends (G-1)/G = 1/2 of it, as CountingComm counts a broadcast or an all-gather
    (tests/test_precision_dist.py measures the wire: bf16, every bucket once)."""
    from models import Transformer

    cfg = debug_cfg("/tmp/unused", "--data.micro_batch_size=2", f"--train.param_dtype={dtype}",
                    f"--train.dtype={dtype}")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plans = plan_layout(cfg, 2)
    assert [plan.comm["broadcast"] + plan.comm["all_gather"] for plan in plans] == [itemsize * elements // 2] * 2
    assert all(plan.comm["all_gather"] == itemsize * 2 * cfg.model.vocab_size * cfg.model.dim // 2 for plan in plans)


ARENA_CHUNK = 2**18  # the offloaders' host arenas grow in chunks this small here, so their layouts take several


def _states(rank: int, world: int, out: str, overrides: list[str]) -> None:
    import muonclip.host_arena
    from launch.trainer import Trainer, init_runtime

    torch.set_num_threads(1)
    muonclip.host_arena.CHUNK_BYTES = ARENA_CHUNK
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.train_step()
    opt = trainer.optimizer
    buffers = opt._flat if hasattr(opt, "_flat") else [opt._main.flat]
    params = dict(trainer.model.named_parameters())
    adamw = {n: sum(t.numel() * t.element_size() for k, t in opt.state.get(params[n], {}).items() if k != "step")
             for n in ("embed_tokens.weight", "lm_head.weight") if n in params}
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "params": sum(p.numel() * p.element_size() for p in trainer.model.parameters()),
        "grads": sum(b.numel() * b.element_size() for b in buffers),
        "optimizer": opt.state_bytes("device"), "optimizer_host": opt.state_bytes("host"),
        "optimizer_host_reserved": opt.offload.arena.reserved if opt.offload is not None else 0,
        "embedding_and_head": adamw}))


BF16 = ["--train.param_dtype=bfloat16", "--train.dtype=bfloat16", "--train.steps=2", "--train.eval_interval=0",
        "--schedule.warmup_steps=1", "--data.grad_accum=2"]


@pytest.mark.parametrize("world,layout", [
    (1, []),
    (2, ["--data.micro_batch_size=2"]),
    (2, ["--data.micro_batch_size=2", "--optim.offload_state=true"]),
    (2, ["--data.micro_batch_size=2", "--parallel.ep=2"]),
    (2, ["--parallel.pp=2"]),
    (2, ["--data.micro_batch_size=2", "--parallel.optimizer=replicated"]),
], ids=["1proc", "dp2", "dp2-offload", "dp2-ep2", "pp2", "dp2-replicated"])
def test_planned_states_of_a_bf16_run_are_the_bytes_allocated(tmp_path, monkeypatch, world, layout):
    """bf16 parameters (2 bytes, the router bias 4), float32 gradient buffers (4), and per owned parameter its float32
    master (4) + Muon momentum (4) or AdamW moments (8) and step: the planner's bytes equal the tensors each rank
    allocated, exactly, the optimizer state split into device and host memory; offloaded, the host memory its
    arena allocated for it (muonclip/host_arena.py: the chunks, unpinned here) is the planner's, exactly. Under
    ZeRO-1 over dp2 each rank keeps the master and moments of half the embedding's and the head's rows (they were
    owned whole: all on one rank, none on the other)."""
    import muonclip.host_arena

    monkeypatch.setattr(muonclip.host_arena, "CHUNK_BYTES", ARENA_CHUNK)
    run_distributed(_states, world, str(tmp_path), [*BF16, *layout])
    plans = plan_layout(debug_cfg(tmp_path, *BF16, *layout), world)
    m = debug_cfg(tmp_path, *BF16, *layout).model
    dp = world // (2 if "--parallel.pp=2" in layout else 1) if "--parallel.optimizer=replicated" not in layout else 1
    for rank, plan in enumerate(plans):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        adamw = measured.pop("embedding_and_head")
        assert measured == {"params": plan.params, "grads": plan.grads, "optimizer": plan.optimizer,
                            "optimizer_host": plan.optimizer_host,
                            "optimizer_host_reserved": plan.optimizer_host_reserved}, rank
        assert adamw and set(adamw.values()) == {(4 + 8) * m.vocab_size * m.dim // dp}, (rank, adamw)
        if "--optim.offload_state=true" in layout:
            assert plan.optimizer_host_reserved > 4 * ARENA_CHUNK  # several chunks to lay out


def _staged(rank: int, world: int, out: str, overrides: list[str]) -> None:
    from launch.trainer import Trainer, init_runtime

    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.train_step()
    trainer.save()
    trainer.saver.wait()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"staged": trainer.saver.stager.nbytes}))


@pytest.mark.parametrize("world,layout", [
    (1, []),
    (2, ["--data.micro_batch_size=2"]),
], ids=["1proc", "dp2"])
def test_planned_checkpoint_staging_is_the_buffer_an_async_save_keeps(tmp_path, world, layout):
    """``train.ckpt_async`` with the optimizer state offloaded: the host buffer an asynchronous save staged this
    rank's checkpoint in (launch/checkpoint/staging.py: its masters, bf16 parameters whose master another rank
    keeps left out, its optimizer state) is the planner's, exactly; without async saves the planner counts none."""
    setting = [*BF16, *layout, "--optim.offload_state=true", "--train.ckpt_async=true"]
    run_distributed(_staged, world, str(tmp_path), setting)
    plans = plan_layout(debug_cfg(tmp_path, *setting), world)
    for rank, plan in enumerate(plans):
        staged = json.loads((tmp_path / f"rank{rank}.json").read_text())["staged"]
        assert plan.ckpt_staging == staged > 0, rank
        assert plan.host == plan.optimizer_host_reserved + plan.activations_host_reserved + staged
    assert [p.ckpt_staging for p in plan_layout(debug_cfg(tmp_path, *BF16, *layout), world)] == [0] * world


# ------------------------------------------------------------------------------------------------ activations
# activations dominate: 4 layers (1 dense), bf16 parameters, the chunked loss, 8 x 64 tokens per micro batch
ACT = ["--train.param_dtype=bfloat16", "--train.dtype=bfloat16", "--model.n_layers=4", "--model.dim=128",
       "--model.q_lora_rank=32", "--model.n_routed_experts=8", "--model.moe_inter_dim=128",
       "--model.loss_chunk_tokens=128", "--data.micro_batch_size=8", "--train.steps=2", "--train.eval_interval=0",
       "--schedule.warmup_steps=1"]
FP8 = "--parallel.fp8_activations=[moe_up_input, swiglu_input]"
SETTINGS = {"none": [], "none+fp8": [FP8], "full": ["--parallel.recompute=full"],
            "selective": ["--parallel.recompute=selective"], "selective+fp8": ["--parallel.recompute=selective", FP8],
            "selective+fp8+offload": ["--parallel.recompute=selective", FP8, "--parallel.activation_offload=true"]}


def _activation_worker(rank: int, world: int, out: str, layout: list[str]) -> None:
    import muonclip.host_arena
    from launch.trainer import Trainer, init_runtime
    from tests.audit import Bf16GemmsInFloat32, LiveBytes, SavedBytes

    torch.set_num_threads(1)
    muonclip.host_arena.CHUNK_BYTES = ARENA_CHUNK
    results = {}
    for name, setting in SETTINGS.items():
        cfg = debug_cfg(Path(out) / name, *ACT, *layout, *setting)
        rt = init_runtime(cfg)
        with Bf16GemmsInFloat32(), LiveBytes() as live:
            trainer = Trainer(cfg, rt)
            with SavedBytes(trainer.model) as saved:
                trainer.train_step()
        offload = getattr(trainer.model, "activation_offload", None)
        results[name] = {"peak": live.peak, "device": saved.device, "host": saved.host,
                         "arena": offload.arena.reserved if offload is not None else 0}
        trainer.close()
        del trainer, saved
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_bf16_gemms_in_float32_keep_every_byte_and_the_bf16_result():
    """The byte audits' bf16 GEMMs through float32 (tests/audit.py): a bf16 linear layer's forward and backward and
    a grouped GEMM allocate the same tensor bytes (LiveBytes) and save the same bytes (SavedBytes) as with torch's
    bf16 kernels, in bf16, equal to a bf16 rounding of the float32 products."""
    import torch.nn.functional as F

    from tests.audit import Bf16GemmsInFloat32, LiveBytes, SavedBytes

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    w, offs = torch.randn(4, 64, 48, dtype=torch.bfloat16), torch.tensor([8, 16, 24, 32], dtype=torch.int32)
    runs = []
    for shim in (False, True):
        x.grad = lin.weight.grad = lin.bias.grad = None
        with contextlib.ExitStack() as stack:
            if shim:
                stack.enter_context(Bf16GemmsInFloat32())
            live = stack.enter_context(LiveBytes())
            saved = stack.enter_context(SavedBytes(lin))
            y = lin(x)
            y.float().square().sum().backward()
            grouped = F.grouped_mm(x.detach(), w, offs=offs)
        runs.append((live.peak, saved.device, y.detach(), x.grad.clone(), grouped))
    (peak, kept, *native), (peak_shim, kept_shim, *shimmed) = runs
    assert peak_shim == peak and kept_shim == kept > 0
    for a, b in zip(native, shimmed):  # two bf16 roundings of float32 sums in other orders: one bf16 step apart
        assert b.dtype == a.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), rtol=2 ** -7, atol=2 ** -7 * a.float().abs().max().item())


@pytest.mark.parametrize("world,layout", [
    (1, ["--data.grad_accum=2"]),
    (2, ["--data.grad_accum=2"]),
    (2, ["--data.grad_accum=2", "--parallel.ep=2"]),
    (2, ["--parallel.pp=2", "--data.grad_accum=8"]),
    (2, ["--parallel.pp=2", "--parallel.pp_virtual_stages=2", "--data.grad_accum=8"]),
], ids=["1proc", "dp2", "dp2-ep2", "pp2-1f1b", "pp2-interleaved"])
def test_planned_activations_are_the_saved_bytes_and_the_peaks_of_real_runs(tmp_path, monkeypatch, world, layout):
    """Every recompute mode with FP8 storage on and off, and activation offload: the bytes the planner says one
    step keeps for backward (per micro batch, times the micro batches; on the device and, offloaded, on the host)
    are the bytes autograd kept (tests/audit.py ``SavedBytes``: to 0.5%; under expert parallelism to 10%, since
    the planner assumes each rank's experts get their share of the routed rows); and each rank's planned peak
    (device + host: on a CPU they are one memory) is within 10% of the most tensor bytes it held while it was built
    and ran one step (tests/audit.py ``LiveBytes``, what ``torch.cuda.max_memory_allocated`` reports on a GPU), at
    pp=2 with 8 micro batches in flight as torch's 1F1B and interleaved schedules order them. Offloaded, the host
    memory the offloader's arena allocated (muonclip/host_arena.py: its chunks, unpinned here) is the planner's,
    exactly (without expert parallelism), and it is what the host side of the peak holds."""
    import muonclip.host_arena

    monkeypatch.setattr(muonclip.host_arena, "CHUNK_BYTES", ARENA_CHUNK)
    run_distributed(_activation_worker, world, str(tmp_path), layout)
    for name, setting in SETTINGS.items():
        cfg = debug_cfg(tmp_path, *ACT, *layout, *setting)
        for rank, plan in enumerate(plan_layout(cfg, world)):
            measured = json.loads((tmp_path / f"rank{rank}.json").read_text())[name]
            micro = cfg.data.grad_accum
            tol = 0.10 if "--parallel.ep=2" in layout else 0.005
            assert plan.saved_per_micro * micro == pytest.approx(measured["device"] + measured["host"], rel=tol), \
                (name, rank)
            assert plan.activations_host_per_micro * micro == pytest.approx(measured["host"], rel=tol), (name, rank)
            if "--parallel.ep=2" not in layout:
                assert plan.activations_host_reserved == measured["arena"], (name, rank)
            assert plan.peak + plan.activations_host_reserved == pytest.approx(measured["peak"], rel=0.10), \
                (name, rank, plan.phases, plan.activations_host_reserved, measured)


@pytest.mark.parametrize("dtype,document_mask", [("float32", False), ("bfloat16", True)])
def test_the_planned_attention_working_set_is_what_the_max_logit_probe_holds(tmp_path, dtype, document_mask):
    """On SDPA the attention core's working set (``attention_transient``: float32 copies of q's chunk and of k,
    float32 scores of two chunks and the one before, the chunks' masks, with documents [B, 1, C, T]) is the most
    tensor bytes the max-logit probe holds on top of q and k (tests/audit.py ``LiveBytes``), but for its position
    vectors and per-head maxima (int64 [T] and [C], float32 [H])."""
    from models.layers import MAX_LOGIT_CHUNK, causal_max_logits
    from parallel.plan_activations import attention_transient
    from parallel.precision import PrecisionPolicy
    from tests.audit import LiveBytes

    T = 2 * MAX_LOGIT_CHUNK
    cfg = debug_cfg(tmp_path, f"--train.dtype={dtype}", f"--train.param_dtype={dtype}", f"--data.seq_len={T}",
                    f"--model.max_seq_len={T}", f"--data.document_mask={str(document_mask).lower()}")
    m, B = cfg.model, cfg.data.micro_batch_size
    q, k = (torch.randn(B, m.n_heads, T, m.qk_nope_head_dim + m.qk_rope_head_dim, dtype=getattr(torch, dtype))
            for _ in range(2))
    segments = torch.randint(0, 2, (B, T)).cumsum(1) // 300 if document_mask else None
    with LiveBytes() as live:
        causal_max_logits(q, k, 0.1, segments_BT=segments)
    planned = attention_transient(cfg, 1, PrecisionPolicy.from_config(cfg))
    assert planned <= live.peak <= planned + 8 * (T + MAX_LOGIT_CHUNK) + 3 * 4 * m.n_heads, (planned, live.peak)
