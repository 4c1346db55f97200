"""Sequence parallelism (issue #27 item 1): tp2 + SP equals one process (float64: logits, loss, every gradient, max
logits, the sequence-wise balance loss; training: per-step losses, clip counts and per-head max logits, also with
pp2, cp2, recompute and document masks; a checkpoint into one process and back), and its savings measured: routed
expert FLOPs per rank half of one process's, the norms' saved bytes and the residual stream 1/tp, the regions'
all-gather + reduce-scatter bytes those of TP's all-reduce."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from launch.trainer import Trainer, init_runtime
from models import ModelConfig, RMSNorm, Transformer
from parallel.dims import ParallelDims
from parallel.parallelize import ParallelizeConfig, parallelize
from tests.audit import OpAudit, SavedBytes, WireAudit
from tests.dist_utils import run_distributed
from tests.test_tensor_parallel import TINY, VARIANTS
from tests.test_train import debug_cfg

SP = dict(TINY, seq_aux_loss_alpha=0.3)  # the balance loss too: its counts and means span both ranks' tokens
TOL = dict(rtol=1e-6, atol=1e-8)  # float64 model; RMSNorm and the router upcast inside (tests/test_tensor_parallel.py)


def _gather(t, dim, group, size):
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _forward_backward(model, tokens):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return logits.detach(), loss.detach()


def _model(variant: dict, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**SP, **variant})).double().train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):  # zero-initialised: random, so that a bias added twice would show
                p.normal_()
    return model


def _check_variant(name, variant, groups, pdims, tokens):
    model = _model(variant)
    ref = copy.deepcopy(model)
    ref_logits, ref_loss = _forward_backward(ref, tokens)
    placements = parallelize(model, pdims, groups, ParallelizeConfig())
    logits, loss = _forward_backward(model, tokens)
    torch.testing.assert_close(logits, ref_logits, **TOL, msg=f"{name}: logits")
    torch.testing.assert_close(loss, ref_loss, **TOL, msg=f"{name}: loss")
    tp, r, g = groups.tp_size, groups.tp_rank, groups.tp_group
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        pl, ref_p = placements[pname], ref_params[pname]
        if ref_p.grad is None:  # e_score_correction_bias
            assert p.grad is None, pname
        elif pl.kind == "tp_sharded":
            torch.testing.assert_close(_gather(p.grad, pl.shard_dim, g, tp), ref_p.grad, **TOL, msg=f"{name}: {pname}")
        else:  # whole on every rank: the per-token ones summed over TP, the embedding and head whole already
            torch.testing.assert_close(p.grad, ref_p.grad, **TOL, msg=f"{name}: {pname}")
    h = TINY["n_heads"] // tp
    for spec, ref_spec in zip(model.qk_clip_specs(), ref.qk_clip_specs()):
        torch.testing.assert_close(spec["max_logits"], ref_spec["max_logits"][r * h:(r + 1) * h], rtol=1e-6, atol=0)
    for router, ref_router in zip(model.moe_routers(), ref.moe_routers()):  # the balance loss's logged value
        torch.testing.assert_close(router.seq_aux_loss_stat, ref_router.seq_aux_loss_stat, **TOL)
        loads = router.expert_load_E.clone()
        dist.all_reduce(loads, group=g)
        torch.testing.assert_close(loads, ref_router.expert_load_E, rtol=0, atol=0)  # each token routed once
    assert model.sequence_parallel.comm.bytes_sent["sp_grad_all_reduce"] > 0


def _unit_worker(rank, world, names):
    pdims = ParallelDims(dp=1, tp=world, ep=1, sp=True)
    groups = pdims.build("cpu")
    tokens = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    for name in names:
        _check_variant(name, VARIANTS[name], groups, pdims, tokens)


def test_tp2_sp_matches_one_process_in_float64():
    """Every attention kind (MHA, GQA, MLA with and without q compression and biases), B = 2 (attention's gathers
    reorder), the sequence-wise balance loss on: logits, loss, every gradient, max logits, the balance loss's value
    and the expert loads (each token counted once over the TP pair)."""
    run_distributed(_unit_worker, 2, list(VARIANTS))


def test_context_parallel_positions_of_a_stage_receiving_a_sequence_parallel_part():
    """A pipeline stage under cp2 x tp2 + SP receives [B, T/(cp*tp), D] hidden states; its attention runs on the
    gathered CP chunk, so the RoPE positions it gets are the chunk's (rank c: [c*T/cp, (c+1)*T/cp)), as for the
    first stage's ids [B, T/cp]."""
    from parallel.context_parallel import _positions_hook

    model = torch.nn.Module()
    model.reset_positions = False
    hook = _positions_hook(cp_rank=1, cp_size=2, hidden_parts=2)
    for x in (torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, 4, 5)):  # ids of the chunk, a stage's quarter
        _, kwargs = hook(model, (x,), {})
        assert torch.equal(kwargs["positions"], torch.arange(8, 16).expand(3, 8)), x.shape


# ------------------------------------------------------------------------------------------------ measurements
def _audited_step(model, tokens):
    """One forward and backward: the routed experts' GEMM FLOPs (OpAudit), the bytes the norms keep for backward
    (SavedBytes inside every RMSNorm call), the elements of each block's input (the residual stream) and every
    collective's elements (WireAudit)."""
    norms, residual = SavedBytes(model), []

    def enter(*_):
        norms.__enter__()

    def leave(*_):
        norms.__exit__(None, None, None)

    hooks = [h for m in model.modules() if isinstance(m, RMSNorm)
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    hooks += [b.register_forward_pre_hook(lambda m, args: residual.append(args[0].numel())) for b in model.layers]
    with OpAudit() as audit, WireAudit() as wire:
        _forward_backward(model, tokens)
    for h in hooks:
        h.remove()
    experts = sum(r.flops for r in audit.records if ".experts" in r.region)
    return {"expert_flops": experts, "norm_saved": norms.device, "residual": residual, "wire": wire.records}


def _measure_worker(rank, world, out):
    tokens = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    variant = dict(VARIANTS["mla_qlora"], seq_aux_loss_alpha=0.0)
    results = {}
    for name, pdims in (("one", None), ("tp", ParallelDims(dp=1, tp=world)),
                        ("sp", ParallelDims(dp=1, tp=world, sp=True))):
        model = _model(variant).float()
        if pdims is not None:
            groups = pdims.build("cpu")
            parallelize(model, pdims, groups, ParallelizeConfig())
        results[name] = _audited_step(model, tokens)
        if name == "sp":
            results["sp_comm"] = dict(model.sequence_parallel.comm.bytes_sent)
    for name in ("one", "tp", "sp"):
        results[name]["wire"] = [(r.call, r.numel * r.dtype.itemsize) for r in results[name]["wire"]]
    (Path(out) / f"measure{rank}.json").write_text(json.dumps(results))


def test_tp2_sp_halves_expert_flops_norm_bytes_and_residual_and_sends_tp_all_reduce_bytes(tmp_path):
    """Same global batch (2 x 16 tokens), float32, MLA with q compression, MoE with shared experts, per rank:
    - the routed experts' GEMM FLOPs (forward and backward, dispatch-mode count) are one process's / 2 at tp2 + SP
      (tp2 without SP: 1.00x, every TP rank routes the same tokens);
    - the bytes the norms keep for backward and the residual stream entering each block are 1/2 (tp2: 1.00x);
    - the regions' all-gathers + reduce-scatters send the bytes tp2's all-reduces send, plus one all-gather of the
      final hidden states for the whole head (forward) and one of the embedding's gradient (backward); the
      counting seam (``SequenceComm``) equals what reached torch.distributed."""
    run_distributed(_measure_worker, 2, str(tmp_path))
    G, B, t, D = 2, 2, 8, TINY["dim"]
    for rank in range(2):
        m = json.loads((tmp_path / f"measure{rank}.json").read_text())
        one, tp, sp = m["one"], m["tp"], m["sp"]
        assert tp["expert_flops"] == one["expert_flops"] > 0
        assert 2 * sp["expert_flops"] == one["expert_flops"]
        assert tp["norm_saved"] == one["norm_saved"] > 0 and 2 * sp["norm_saved"] == one["norm_saved"]
        assert tp["residual"] == one["residual"] and [2 * n for n in sp["residual"]] == one["residual"]
        tp_all_reduce = sum(2 * (G - 1) * n // G for call, n in tp["wire"] if call == "all_reduce")
        wire = {call: sum(n for c, n in sp["wire"] if c == call) for call in ("all_gather_into_tensor",
                                                                              "reduce_scatter_tensor", "all_reduce")}
        # WireAudit records these calls' first argument, their output: the whole tensor and this rank's part
        gathered, scattered = (G - 1) * wire["all_gather_into_tensor"] // G, (G - 1) * wire["reduce_scatter_tensor"]
        assert (m["sp_comm"]["sp_all_gather"], m["sp_comm"]["sp_reduce_scatter"]) == (gathered, scattered)
        assert m["sp_comm"]["sp_grad_all_reduce"] == 2 * (G - 1) * wire["all_reduce"] // G
        head_and_embedding = 2 * (G - 1) * B * t * D * 4
        assert gathered + scattered == tp_all_reduce + head_and_embedding, (gathered, scattered, tp_all_reduce)


# ------------------------------------------------------------------------------------------------ training
# tests/test_monitor.py's set-up: 4 MLA heads, a tau that clips heads at most steps, 8 steps each logged, the global
# batch of 4 sequences as 2 micro batches of 2 (a pipeline needs micro batches >= stages); the balance loss on, a
# validation at the end
TAU = 0.09
RUN = ["--model.n_heads=4", "--train.steps=8", "--train.eval_interval=8", "--schedule.warmup_steps=2",
       f"--optim.qk_clip_tau={TAU}", "--data.micro_batch_size=2", "--data.grad_accum=2",
       "--model.seq_aux_loss_alpha=0.01"]
SP2 = ["--parallel.tp=2", "--parallel.sequence_parallel=true"]
LOGGED = ("loss", "grad_norm", "val_loss", "max_logit/", "qk_clip/", "router/")


def _records(out_dir) -> list[dict]:
    """Per logged step: the loss, grad norm, validation, per-head max logits, clip counts and router statistics."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k.startswith(LOGGED) and k != "loss_avg"}
            for r in map(json.loads, lines) if "loss" in r or "val_loss" in r]


def _train_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    Trainer(cfg, init_runtime(cfg)).fit()


def _one_process(out, *overrides) -> list[dict]:
    cfg = debug_cfg(out, *RUN, *overrides)
    Trainer(cfg, init_runtime(cfg)).fit()
    ref = _records(out)
    assert sum(r.get("qk_clip/clipped_heads", 0) for r in ref) > 0
    # no head within 1e-4 relative of tau, 100x the layouts' float32 differences: exact clip counts
    assert min(abs(v - TAU) for r in ref for k, v in r.items() if "/h" in k) > 1e-4 * TAU
    return ref


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("sp_one"))


def _assert_same_run(ours: list[dict], ref: list[dict]) -> None:
    assert len(ours) == len(ref) == 9  # 8 steps and the validation
    for step, (a, b) in enumerate(zip(ours, ref), 1):
        assert sorted(a) == sorted(b), f"step {step}: logged keys differ"
        assert a.get("qk_clip/clipped_heads") == b.get("qk_clip/clipped_heads"), f"step {step}: clip counts differ"
        assert a == pytest.approx(b, rel=2e-5, abs=1e-7), f"step {step}"  # float32 sums in other orders


@pytest.mark.parametrize("world,layout", [
    (2, SP2), (2, [*SP2, "--parallel.recompute=full"]), (4, [*SP2, "--parallel.pp=2", "--model.loss_chunk_tokens=48"]),
    (4, [*SP2, "--parallel.cp=2", "--parallel.recompute=selective"]), (2, ["--parallel.cp=2"])],
    ids=["tp2sp", "tp2sp_full_recompute", "tp2sp_x_pp2_chunked_loss", "tp2sp_x_cp2_selective", "cp2"])
def test_sp_training_logs_one_process_run(tmp_path, one_process, world, layout):
    """Per-step loss, grad norm, every head's max logit, clip counts, router shares and balance loss, and the
    validation loss equal one process's (float32 sums in other orders); with pp2 the last stage's loss is the
    chunked one (``model.loss_chunk_tokens``) on the gathered hidden states. cp2 alone: the balance loss, refused
    with context parallelism before, is one process's too."""
    run_distributed(_train_worker, world, str(tmp_path), [*RUN, *layout])
    _assert_same_run(_records(tmp_path), one_process)


def test_sp_training_with_document_masks_logs_one_process_run(tmp_path):
    """Document masks (positions restarting per document) under tp2 + SP with selective recomputation and activation
    offload: attention and the max-logit probe see the gathered sequence's documents."""
    masks = ["--data.document_mask=true", "--data.reset_positions=true"]
    ref = _one_process(tmp_path / "one", *masks)
    run_distributed(_train_worker, 2, str(tmp_path / "sp"), [*RUN, *masks, *SP2, "--parallel.recompute=selective",
                                                            "--parallel.activation_offload=true"])
    _assert_same_run(_records(tmp_path / "sp"), ref)


# ------------------------------------------------------------------------------------------------ checkpoints
CKPT = ["--train.steps=6", "--schedule.warmup_steps=2", "--train.eval_interval=0", "--data.micro_batch_size=4",
        "--model.n_layers=3"]


def _checkpoint_worker(rank: int, world: int, root: str) -> None:
    """tp2 + SP: 6 steps with a checkpoint at 3 (sp/); one process's step-3 checkpoint resumed to 6 (back/)."""
    torch.set_num_threads(1)
    root = Path(root)
    for name, extra in (("sp", ["--train.ckpt_interval=3"]),
                        ("back", [f"--train.resume={root / 'one' / 'checkpoints' / 'step_00000003'}"])):
        cfg = debug_cfg(root / name, *CKPT, *SP2, *extra)
        result = Trainer(cfg, init_runtime(cfg)).fit()
        if rank == 0:
            (root / f"{name}.json").write_text(json.dumps(result.losses))


def test_tp2_sp_checkpoint_loads_in_one_process_and_back(tmp_path):
    """A tp2 + SP checkpoint holds the global tensors: one process resumes it (weights equal the checkpoint's) and
    continues as tp2 + SP did; one process's checkpoint resumed at tp2 + SP continues as one process did."""
    from tests.test_checkpoint import checkpoint_tensors

    cfg = debug_cfg(tmp_path / "one", *CKPT, "--train.ckpt_interval=3")
    one = Trainer(cfg, init_runtime(cfg)).fit().losses
    run_distributed(_checkpoint_worker, 2, str(tmp_path))
    sp, back = ({int(k): v for k, v in json.loads((tmp_path / f"{n}.json").read_text()).items()}
                for n in ("sp", "back"))
    assert sorted(sp) == list(range(1, 7)) and sorted(back) == [4, 5, 6]
    path = tmp_path / "sp" / "checkpoints" / "step_00000003"
    saved = checkpoint_tensors(path, tmp_path / "flat.pt")
    cfg = debug_cfg(tmp_path / "into_one", *CKPT, f"--train.resume={path}")
    trainer = Trainer(cfg, init_runtime(cfg))
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, saved[name]), f"{name} differs from the checkpoint's global tensor"
    into_one = trainer.fit().losses
    assert [into_one[s] for s in (4, 5, 6)] == pytest.approx([sp[s] for s in (4, 5, 6)], rel=1e-5, abs=1e-5)
    assert [sp[s] for s in range(1, 7)] == pytest.approx([one[s] for s in range(1, 7)], rel=1e-5, abs=1e-5)
    assert [back[s] for s in (4, 5, 6)] == pytest.approx([one[s] for s in (4, 5, 6)], rel=1e-5, abs=1e-5)


def test_sequence_parallel_without_tp_is_one_line_and_exit_2(tmp_path):
    from tests.test_errors import DEBUG, _train

    proc = _train("--config", str(DEBUG), f"--train.output_dir={tmp_path}", "--parallel.sequence_parallel=true")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: parallel config: sequence_parallel: true splits sequences over the tensor-parallel ranks: it needs "
        f"tp > 1, got tp=1 (config: {DEBUG} + overrides --train.output_dir={tmp_path} "
        "--parallel.sequence_parallel=true)"]


# ------------------------------------------------------------------------------------------------ planner
def _sp_bytes_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.train_step()
    trainer.model.sequence_parallel.comm.bytes_sent.clear()
    trainer.train_step()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(trainer.model.sequence_parallel.comm.bytes_sent))


@pytest.mark.parametrize("layout", [[], ["--parallel.recompute=full"], ["--parallel.recompute=selective"],
                                    ["--train.dtype=bfloat16", "--train.param_dtype=bfloat16", "--data.grad_accum=2"],
                                    ["--train.dtype=bfloat16"]],
                         ids=["plain", "full_recompute", "selective", "bf16_accum2", "autocast"])
def test_planned_sequence_parallel_bytes_are_a_step_s(tmp_path, layout):
    """The planner's ``sp_all_gather``, ``sp_reduce_scatter`` and ``sp_grad_all_reduce`` are the bytes
    ``SequenceComm`` counts in one training step at tp2 + SP (debug model: MLA, a dense layer and a MoE layer with
    shared experts), with recomputation's repeated collectives, bf16 and two micro batches, and under autocast (bf16
    compute, float32 parameters: the norms' float32 outputs are gathered in bf16)."""
    from parallel.plan import plan_layout

    overrides = [*SP2, "--data.micro_batch_size=2", *layout]
    run_distributed(_sp_bytes_worker, 2, str(tmp_path), overrides)
    plans = plan_layout(debug_cfg(tmp_path, *overrides), 2)
    for rank, plan in enumerate(plans):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {k: v for k, v in plan.comm.items() if k.startswith("sp_")} == measured, rank
        assert "tp_all_reduce" not in plan.comm
