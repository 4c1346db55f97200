"""Sequence parallelism (issue #27 item 1): tp2 + SP equals one process (float64: logits, loss, every gradient, max
logits, the sequence-wise balance loss; training: per-step losses, clip counts and per-head max logits, also with
pp2, cp2, recompute and document masks; a checkpoint into one process and back), and its savings measured: routed
expert FLOPs per rank half of one process's, the norms' saved bytes and the residual stream 1/tp, the column
regions' saved inputs 1/tp (gathered again in backward, the gradients bitwise those of saving the gathered ones), the
regions' all-gather + reduce-scatter bytes those of TP's all-reduce plus that backward gather."""
from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import json
import sys
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
        elif pl.kind == "expert":  # folded: this rank's experts (all at ep 1), its tokens' gradients summed over edp
            assert not pl.tp_copies, pname
            experts = model.get_submodule(pname.rsplit(".", 1)[0])
            grad = p.grad.clone()
            dist.all_reduce(grad, group=groups.edp_group)
            full = ref_p.grad[getattr(experts, "expert_offset", 0):][:p.shape[0]]
            torch.testing.assert_close(grad, full, **TOL, msg=f"{name}: {pname}")
        else:  # per-token: this rank's tokens' part, summed over the stage by the optimizer (ZeRO-1's buckets)
            assert (pl.kind, pl.tp_copies) == ("replicated", False), pname
            grad = p.grad.clone()
            dist.all_reduce(grad, group=groups.stage)
            torch.testing.assert_close(grad, ref_p.grad, **TOL, msg=f"{name}: {pname}")
    h = TINY["n_heads"] // tp
    for spec, ref_spec in zip(model.qk_clip_specs(), ref.qk_clip_specs()):
        torch.testing.assert_close(spec["max_logits"], ref_spec["max_logits"][r * h:(r + 1) * h], rtol=1e-6, atol=0)
    for router, ref_router in zip(model.moe_routers(), ref.moe_routers()):  # the balance loss's logged value
        torch.testing.assert_close(router.seq_aux_loss_stat, ref_router.seq_aux_loss_stat, **TOL)
        loads = router.expert_load_E.clone()
        dist.all_reduce(loads, group=g)
        torch.testing.assert_close(loads, ref_router.expert_load_E, rtol=0, atol=0)  # each token routed once


def _unit_worker(rank, world, names, ep=1):
    pdims = ParallelDims(dp=1, tp=world, ep=ep, sp=True)
    groups = pdims.build("cpu")
    tokens = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    for name in names:
        _check_variant(name, VARIANTS[name], groups, pdims, tokens)


def test_tp2_sp_matches_one_process_in_float64():
    """Every attention kind (MHA, GQA, MLA with and without q compression and biases), B = 2 (attention's gathers
    reorder), the sequence-wise balance loss on: logits, loss, every gradient, max logits, the balance loss's value
    and the expert loads (each token counted once over the TP pair)."""
    run_distributed(_unit_worker, 2, list(VARIANTS))


def test_tp2_sp_with_ep2_folded_over_the_tp_pair_matches_one_process_in_float64():
    """tp2 + SP x ep2 at world 2: the expert group is the TP pair, each rank routes its own half of the tokens to
    the owners of their experts (half the experts each): logits, loss, every gradient (each expert's on its owner),
    max logits, the balance loss and the loads equal one process's."""
    run_distributed(_unit_worker, 2, ["mla_qlora", "mha"], 2)


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


# ------------------------------------------------------------------------------------------------ column inputs
# MHA (its x, the dense FFN's and the shared experts' rows); MLA with q compression (the packed latents); MLA without
# (q_proj's x too)
REGATHER = ("mha", "mla_qlora", "mla")


class _ColumnInputBytes(SavedBytes):
    """``SavedBytes`` of the column regions' inputs only: the storages their all-gathers read and wrote (held, so no
    other tensor takes their addresses while the forward runs)."""

    def __init__(self, model):
        super().__init__(model)
        self.storages_in: set[int] = set()
        self.held: list[torch.Tensor] = []

    def _count(self, original):
        if isinstance(original, torch.Tensor) and original.untyped_storage().data_ptr() in self.storages_in:
            super()._count(original)


def _column_inputs_step(model, tokens) -> dict:
    """One forward and backward: the bytes autograd keeps of the column regions' inputs (local or gathered), the
    bytes those regions' all-gathers wrote in forward, and the all-gather bytes ``SequenceComm`` counts in backward."""
    seq, meter, written = model.sequence_parallel, _ColumnInputBytes(model), []
    gather = seq.gather

    def recording(x):
        out = gather(x)
        meter.storages_in |= {x.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()}
        meter.held += [x, out]
        written.append(out.numel() * out.element_size())
        return out

    seq.gather = recording
    with meter:
        logits = model(tokens[:, :-1])
    before = seq.comm.bytes_sent["sp_all_gather"]
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    del seq.gather
    return {"saved": meter.device, "gathered": sum(written),
            "backward_all_gather": seq.comm.bytes_sent["sp_all_gather"] - before}


def _column_inputs_worker(rank, world):
    pdims = ParallelDims(dp=1, tp=world, ep=1, sp=True)
    groups = pdims.build("cpu")
    tokens = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    G, L, D, local_rows = world, TINY["n_layers"], TINY["dim"], 2 * 16 // world
    latents = TINY["kv_lora_rank"] + TINY["qk_rope_head_dim"]
    widths = {"mha": L * (D + D), "mla_qlora": L * (latents + VARIANTS["mla_qlora"]["q_lora_rank"] + D),
              "mla": L * (D + latents + D)}  # per layer: the attention's column inputs, then the FFN's (or shared)
    widths = {name: w + D for name, w in widths.items()}  # and the vocab-split head's
    for name, autocast in itertools.product(REGATHER, (False, True)):
        model = _model(VARIANTS[name]).float()
        parallelize(model, pdims, groups, ParallelizeConfig())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the inputs gathered in bf16
            m = _column_inputs_step(model, tokens)
        assert m["gathered"] == G * local_rows * widths[name] * (2 if autocast else 4), (name, autocast, m)
        # saving the gathered inputs kept m["gathered"] bytes; the local parts are 1/tp of that
        assert G * m["saved"] == m["gathered"], (name, autocast, m)
        # backward: each column input gathered again, the row exits' gradients (in the GEMMs' dtype) and the
        # embedding's (float32) gathered
        rows = (G - 1) * local_rows * D * 2 * L * (2 if autocast else 4)
        embedding = (G - 1) * local_rows * D * 4
        assert m["backward_all_gather"] == (G - 1) * m["saved"] + rows + embedding, (name, autocast, m)


def test_column_regions_keep_their_local_input_and_gather_it_again_in_backward():
    """float32 and autocast (bf16 GEMMs over float32 parameters), tp2 + SP, B = 2 x 16 tokens: the bytes autograd
    keeps of the column regions' inputs (MHA's x, the dense FFN's and shared experts' rows, MLA's packed latents,
    q_proj's x without q compression, the vocab-split head's states) are 1/tp of the gathered inputs (which saving the gathered input kept), and
    backward's all-gathers are those inputs once more besides the row regions' and the embedding's gradients
    (``SequenceComm``'s count)."""
    run_distributed(_column_inputs_worker, 2)


def _grads(model, tokens) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits, _ = _forward_backward(model, tokens)
    return logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _split_backward_gathers(model, x_BtD, split: bool) -> tuple[dict, int]:
    """The blocks on a local hidden part, backward whole or split as the zero-bubble schedules do (torch's
    ``stage_backward_input``, then ``stage_backward_weight``); the gradients and the backward all-gather bytes."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    for p in model.parameters():
        p.grad = None
    x = x_BtD.clone().requires_grad_()
    out = x
    for block in model.layers:
        out = block(out)
    loss, comm = out.square().sum(), model.sequence_parallel.comm.bytes_sent
    before = comm["sp_all_gather"]
    if split:
        weights = [p for p in model.layers.parameters() if p.requires_grad]
        _, param_groups = stage_backward_input([loss], None, [x], iter(weights))
        stage_backward_weight(iter(weights), param_groups)
    else:
        loss.backward()
    grads = {n: p.grad for n, p in model.layers.named_parameters() if p.grad is not None}
    return {"input": x.grad, **grads}, comm["sp_all_gather"] - before


def _bitwise_worker(rank, world):
    from unittest import mock

    from parallel.sequence_parallel import _Regather

    pdims = ParallelDims(dp=1, tp=world, ep=1, sp=True)
    groups = pdims.build("cpu")
    tokens = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    techniques = {"plain": ParallelizeConfig(), "autocast": ParallelizeConfig(),
                  "full": ParallelizeConfig(recompute="full"), "selective": ParallelizeConfig(recompute="selective"),
                  "fp8": ParallelizeConfig(fp8_activations=["moe_up_input", "swiglu_input"]),
                  "offload": ParallelizeConfig(recompute="selective", activation_offload=True)}
    for name in REGATHER:
        for technique, cfg in techniques.items():
            if technique == "autocast" and name != "mla_qlora":  # bf16 GEMMs are slow on CPUs without AVX-512 BF16;
                continue  # MLA's latents are where autocast changes what the GEMMs read
            runs = []
            for regather in (False, True):
                model = _model(VARIANTS[name]).float()
                parallelize(model, pdims, groups, cfg)
                if cfg.activation_offload:
                    model.activation_offload.min_bytes = 0  # every saved tensor, the local inputs too
                declined = mock.patch.object(_Regather, "pack", lambda self, t: None)  # the gathered input saved
                with contextlib.nullcontext() if regather else declined, \
                        torch.autocast("cpu", dtype=torch.bfloat16, enabled=technique == "autocast"):
                    runs.append(_grads(model, tokens))
                if cfg.activation_offload:
                    assert model.activation_offload.peak_host_bytes > 0
            (ref_logits, ref), (logits, grads) = runs
            assert torch.equal(logits, ref_logits), (name, technique)
            assert sorted(grads) == sorted(ref), (name, technique)
            for pname, g in grads.items():
                assert torch.equal(g, ref[pname]), (name, technique, pname)
        # the zero-bubble schedules' split backward: the input pass gathers each column input again, and the weight
        # pass (later, on every TP rank in the same order) once more; gradients bitwise the whole backward's
        model = _model(VARIANTS[name]).float()
        parallelize(model, pdims, groups, ParallelizeConfig())
        x = torch.randn(2, 8, TINY["dim"], generator=torch.Generator().manual_seed(rank))
        whole, whole_bytes = _split_backward_gathers(model, x, split=False)
        split, split_bytes = _split_backward_gathers(model, x, split=True)
        assert sorted(split) == sorted(whole), name
        for key, g in split.items():
            assert torch.equal(g, whole[key]), (name, key)
        # the blocks' column inputs' local bytes of one B x t part (the head's is no block's)
        local = _column_inputs_step(model, tokens)["saved"] - x.numel() * x.element_size()
        assert split_bytes == whole_bytes + (world - 1) * local, (name, split_bytes, whole_bytes, local)


def test_column_regions_regathered_gradients_are_bitwise_the_saved_gathers():
    """float32, tp2 + SP, every region kind (MHA's x with the dense FFN and shared experts, MLA's latents with and
    without q compression): logits and every gradient bitwise those of saving the gathered inputs (the same values
    gathered again), alone, under autocast (MLA), with full and selective recomputation, FP8 storage, and activation
    offload of every saved tensor (the local inputs go to the host, packed by offload's hooks around the region);
    under the zero-bubble schedules' split backward too (input pass, then weight pass: one more gather per region)."""
    run_distributed(_bitwise_worker, 2)


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


def _ep_exchange(model, tokens):
    """One forward and backward: the bytes the token all-to-alls send to other ranks (their routed rows), and the
    planner's ``ep_all_to_all_bytes`` at the counts this rank routed (the rows bound for other ranks' experts) and
    received (the other ranks' rows for its experts), from the routers' loads."""
    from parallel.plan import ep_all_to_all_bytes

    sent, a2a = [], dist.all_to_all_single

    def recording(out, inp, out_splits=None, in_splits=None, group=None, **kwargs):
        if inp.is_floating_point():  # the rows (the counts' exchange is int64)
            me = dist.get_rank(group)
            sent.append((sum(in_splits) - in_splits[me]) * inp[0].numel() * inp.element_size())
        return a2a(out, inp, out_splits, in_splits, group=group, **kwargs)

    dist.all_to_all_single = recording
    try:
        _forward_backward(model, tokens)
    finally:
        dist.all_to_all_single = a2a
    planned = 0
    for block in list(model.layers)[TINY["first_k_dense"]:]:
        experts, load = block.mlp.experts, block.mlp.gate.expert_load_E.to(torch.int64)
        mine = torch.zeros_like(load, dtype=torch.bool)
        mine[experts.expert_offset:experts.expert_offset + experts.n_local] = True
        total = load.clone()
        dist.all_reduce(total, group=experts.ep_group)
        rows_out, rows_in = int(load[~mine].sum()), int((total - load)[mine].sum())
        planned += ep_all_to_all_bytes(rows_out, rows_in, TINY["dim"], 4)
    return sum(sent), planned


def _measure_worker(rank, world, out):
    tokens = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    variant = dict(VARIANTS["mla_qlora"], seq_aux_loss_alpha=0.0)
    results = {}
    for name, pdims in (("one", None), ("tp", ParallelDims(dp=1, tp=world)),
                        ("sp", ParallelDims(dp=1, tp=world, sp=True)),
                        ("sp_ep2", ParallelDims(dp=1, tp=world, ep=2, sp=True))):
        model = _model(variant).float()
        if pdims is not None:
            groups = pdims.build("cpu")
            parallelize(model, pdims, groups, ParallelizeConfig())
        if name == "sp_ep2":
            results["ep_wire"], results["ep_planned"] = _ep_exchange(model, tokens)
            model = _model(variant).float()
            parallelize(model, pdims, groups, ParallelizeConfig())
        results[name] = _audited_step(model, tokens)
        if name == "sp":
            results["sp_comm"] = dict(model.sequence_parallel.comm.bytes_sent)
            results["vocab_comm"] = dict(model.vocab_parallel.bytes_sent)
    for name in ("one", "tp", "sp", "sp_ep2"):
        results[name]["wire"] = [(r.call, r.numel * r.dtype.itemsize) for r in results[name]["wire"]]
    (Path(out) / f"measure{rank}.json").write_text(json.dumps(results))


def test_tp2_sp_halves_expert_flops_norm_bytes_and_residual_and_sends_tp_all_reduce_bytes(tmp_path):
    """Same global batch (2 x 16 tokens), float32, MLA with q compression, MoE with shared experts, per rank:
    - the routed experts' GEMM FLOPs (forward and backward, dispatch-mode count) are one process's / 2 at tp2 + SP
      (tp2 without SP: 1.00x, every TP rank routes the same tokens); with ep2 folded over the TP pair the two
      ranks' sum is one process's (each rank runs its experts on the rows both route to them), and the token
      all-to-alls send what the planner's ``ep_all_to_all_bytes`` gives for the rows each rank routed and received;
    - the bytes the norms keep for backward and the residual stream entering each block are 1/2 (tp2: 1.00x);
    - the regions' all-gathers + reduce-scatters (the vocab-split embedding's and head's included) send the bytes
      tp2's all-reduces send, plus one all-gather of each column region's input (the head's too) in backward (it
      keeps its local part only); the counting seams (``SequenceComm``: sequence parallelism's, and the
      vocab-parallel head's gather of the logits along the vocabulary) equal what reached torch.distributed."""
    run_distributed(_measure_worker, 2, str(tmp_path))
    G, B, t, D = 2, 2, 8, TINY["dim"]
    folded = [json.loads((tmp_path / f"measure{rank}.json").read_text())["sp_ep2"]["expert_flops"] for rank in (0, 1)]
    one = json.loads((tmp_path / "measure0.json").read_text())["one"]["expert_flops"]
    assert sum(folded) == one and min(folded) > 0, folded  # ep2 folded over the TP pair: each token's GEMMs once
    for rank in range(2):  # the token exchange over the folded EP group: the planner's bytes at the routed counts
        m = json.loads((tmp_path / f"measure{rank}.json").read_text())
        assert m["ep_wire"] == m["ep_planned"] > 0, (rank, m["ep_wire"], m["ep_planned"])
    for rank in range(2):
        m = json.loads((tmp_path / f"measure{rank}.json").read_text())
        one, tp, sp = m["one"], m["tp"], m["sp"]
        assert tp["expert_flops"] == one["expert_flops"] > 0
        assert 2 * sp["expert_flops"] == one["expert_flops"]
        assert tp["norm_saved"] == one["norm_saved"] > 0 and 2 * sp["norm_saved"] == one["norm_saved"]
        assert tp["residual"] == one["residual"] and [2 * n for n in sp["residual"]] == one["residual"]
        tp_all_reduce = sum(2 * (G - 1) * n // G for call, n in tp["wire"] if call == "all_reduce")
        wire = {call: sum(n for c, n in sp["wire"] if c == call) for call in ("all_gather_single",
                                                                              "reduce_scatter_single", "all_reduce")}
        # WireAudit records what these calls send from: the all-gather's local part, the reduce-scatter's whole tensor
        gathered, scattered = (G - 1) * wire["all_gather_single"], (G - 1) * wire["reduce_scatter_single"] // G
        logits = m["vocab_comm"]["vocab_all_gather"]
        assert logits == (G - 1) * B * (G * t) * (TINY["vocab_size"] // G) * 4  # the float32 logits' other half
        assert (m["sp_comm"]["sp_all_gather"] + logits, m["sp_comm"]["sp_reduce_scatter"]) == (gathered, scattered)
        # no all-reduce of the per-token parameters' gradients in backward: ZeRO-1 sums them over the stage
        assert wire["all_reduce"] == 0 and "sp_grad_all_reduce" not in m["sp_comm"], (wire, m["sp_comm"])
        gathered -= logits
        # the column regions' inputs gathered again in backward (MLA's latents, the FFN's and shared experts' rows,
        # the head's states)
        latents = TINY["kv_lora_rank"] + TINY["qk_rope_head_dim"] + VARIANTS["mla_qlora"]["q_lora_rank"]
        regathered = (G - 1) * B * t * (TINY["n_layers"] * (latents + D) + D) * 4
        assert gathered + scattered == tp_all_reduce + regathered, (gathered, scattered, tp_all_reduce)


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
    (4, [*SP2, "--parallel.cp=2", "--parallel.recompute=selective"]), (2, ["--parallel.cp=2"]),
    (2, ["--parallel.tp=2", "--model.loss_chunk_tokens=40"]),
    (2, [*SP2, "--parallel.ep=2", "--model.loss_chunk_tokens=40"])],
    ids=["tp2sp", "tp2sp_full_recompute", "tp2sp_x_pp2_chunked_loss", "tp2sp_x_cp2_selective", "cp2",
         "tp2_chunked_loss", "tp2sp_x_ep2_folded_chunked_loss"])
def test_sp_training_logs_one_process_run(tmp_path, one_process, world, layout):
    """Per-step loss, grad norm, every head's max logit, clip counts, router shares and balance loss, and the
    validation loss equal one process's (float32 sums in other orders); with pp2 the last stage's loss is the
    chunked one (``model.loss_chunk_tokens``); tp2, and tp2 + SP x ep2, with the chunked vocab-parallel loss
    (chunks of 40 of a micro batch's 128 tokens). cp2 alone: the balance loss, refused with context parallelism
    before, is one process's too. ep2 at world 2: the expert group folded onto the TP pair (each rank owns,
    orthogonalises and counts in the grad norm half the experts)."""
    run_distributed(_train_worker, world, str(tmp_path), [*RUN, *layout])
    _assert_same_run(_records(tmp_path), one_process)


def test_sp_training_tp2_dp2_ep4_folded_over_the_stage_logs_one_process_run(tmp_path, one_process):
    """tp2 + SP x dp2 with ep4 at world 4: one expert group over the whole stage (an expert a rank, edp 1), a micro
    batch a data rank (the same 4 sequences a step as one process's 2 x 2). The logged balance loss is left out:
    under dp > 1 the monitor logs data rank 0's (not averaged over dp; so at ep 1 too), the loss is exact."""
    run_distributed(_train_worker, 4, str(tmp_path), [*RUN, *SP2, "--parallel.ep=4", "--data.grad_accum=1"])
    drop = "router/seq_aux_loss"
    _assert_same_run([{k: v for k, v in r.items() if k != drop} for r in _records(tmp_path)],
                     [{k: v for k, v in r.items() if k != drop} for r in one_process])


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


def _checkpoint_worker(rank: int, world: int, root: str, layout: list[str]) -> None:
    """tp2 + SP (+ ``layout``): 6 steps with a checkpoint at 3 (sp/); one process's step-3 checkpoint resumed to 6
    (back/)."""
    torch.set_num_threads(1)
    root = Path(root)
    for name, extra in (("sp", ["--train.ckpt_interval=3"]),
                        ("back", [f"--train.resume={root / 'one' / 'checkpoints' / 'step_00000003'}"])):
        cfg = debug_cfg(root / name, *CKPT, *SP2, *layout, *extra)
        trainer = Trainer(cfg, init_runtime(cfg))
        rows = {trainer.model.embed_tokens.weight.shape[0], trainer.model.lm_head.weight.shape[0]}
        assert rows == {cfg.model.vocab_size // 2}, rows  # half the vocabulary: Shard(0) of the global [V, D]
        result = trainer.fit()
        if rank == 0:
            (root / f"{name}.json").write_text(json.dumps(result.losses))


@pytest.mark.parametrize("layout", [[], ["--parallel.ep=2"]], ids=["ep1", "ep2_folded"])
def test_tp2_sp_checkpoint_loads_in_one_process_and_back(tmp_path, layout):
    """A tp2 + SP checkpoint holds the global tensors (the embedding and the head from each rank's half of the
    vocabulary rows): one process resumes it (weights equal the checkpoint's) and continues as tp2 + SP did; one
    process's checkpoint resumed at tp2 + SP continues as one process did. With ep2 the expert stacks (and their
    owners' optimizer state) are Shard(0) over the folded expert group, the TP pair."""
    from tests.test_checkpoint import checkpoint_tensors

    cfg = debug_cfg(tmp_path / "one", *CKPT, "--train.ckpt_interval=3")
    one = Trainer(cfg, init_runtime(cfg)).fit().losses
    run_distributed(_checkpoint_worker, 2, str(tmp_path), layout)
    sp, back = ({int(k): v for k, v in json.loads((tmp_path / f"{n}.json").read_text()).items()}
                for n in ("sp", "back"))
    assert sorted(sp) == list(range(1, 7)) and sorted(back) == [4, 5, 6]
    path = tmp_path / "sp" / "checkpoints" / "step_00000003"
    saved = checkpoint_tensors(path, tmp_path / "flat.pt")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from export_hf import main as export_hf_main
    from models.hf_interop import load_hf_tensors

    hf = load_hf_tensors(export_hf_main([str(path), "--out", str(tmp_path / "hf")]))  # streamed from the DCP shards
    for ours, theirs in (("embed_tokens.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight")):
        assert torch.equal(hf[theirs], saved[ours]) and hf[theirs].shape[0] == 8192, ours
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


def test_ep_not_dividing_the_stage_under_sequence_parallelism_is_one_line_and_exit_2(tmp_path):
    from tests.test_errors import DEBUG, _train

    args = ["--parallel.tp=2", "--parallel.dp=1", "--parallel.sequence_parallel=true", "--parallel.ep=4"]
    proc = _train("--config", str(DEBUG), f"--train.output_dir={tmp_path}", *args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: parallel config: ep (4) must divide dp * cp * tp (1 * 1 * 2 = 2): with sequence_parallel the expert "
        f"groups are folded over a stage's ranks (config: {DEBUG} + overrides --train.output_dir={tmp_path} "
        + " ".join(args) + ")"]


# ------------------------------------------------------------------------------------------------ planner
def _sp_bytes_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.train_step()
    trainer.model.sequence_parallel.comm.bytes_sent.clear()
    trainer.train_step()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(trainer.model.sequence_parallel.comm.bytes_sent))


@pytest.mark.parametrize("world,layout", [
    (2, []), (2, ["--parallel.recompute=full"]), (2, ["--parallel.recompute=selective"]),
    (2, ["--train.dtype=bfloat16", "--train.param_dtype=bfloat16", "--data.grad_accum=2"]),
    (2, ["--train.dtype=bfloat16"]), (2, ["--parallel.ep=2"]),
    (4, ["--parallel.pp=2", "--parallel.pp_schedule=dualpipev", "--parallel.pp_virtual_stages=2",
         "--data.grad_accum=4", "--model.n_layers=4"])],
    ids=["plain", "full_recompute", "selective", "bf16_accum2", "autocast", "ep2_folded", "x_pp2_dualpipev"])
def test_planned_sequence_parallel_bytes_are_a_step_s(tmp_path, world, layout):
    """The planner's ``sp_all_gather`` and ``sp_reduce_scatter`` are the bytes
    ``SequenceComm`` counts in one training step at tp2 + SP (debug model: MLA, a dense layer and a MoE layer with
    shared experts), with recomputation's repeated collectives, bf16 and two micro batches, under autocast (bf16
    compute, float32 parameters: the norms' float32 outputs are gathered in bf16), and x pp2 under DualPipeV (the
    column inputs gathered again in backward, twice where the schedule splits a backward into its input and weight
    passes, once where it runs it whole and on the first stage)."""
    from parallel.plan import plan_layout

    overrides = [*SP2, "--data.micro_batch_size=2", *layout]
    run_distributed(_sp_bytes_worker, world, str(tmp_path), overrides)
    plans = plan_layout(debug_cfg(tmp_path, *overrides), world)
    for rank, plan in enumerate(plans):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {k: v for k, v in plan.comm.items() if k.startswith("sp_")} == measured, rank
        assert "tp_all_reduce" not in plan.comm


# tests/test_memory.py's MLA + MoE set-up (3 layers, the first dense, q compression, shared experts), 4 heads so that
# each TP rank has 2 (with one, o_proj's input is a view of attention's output)
SAVED = ["--model.n_layers=3", "--model.q_lora_rank=32", "--model.n_heads=4", "--model.dim=128",
         "--model.loss_chunk_tokens=64", "--data.micro_batch_size=8", "--train.steps=2", "--train.eval_interval=0",
         "--schedule.warmup_steps=1", *SP2]
BF16 = ["--train.dtype=bfloat16", "--train.param_dtype=bfloat16"]
SAVED_SETTINGS = {"none": [], "full": ["--parallel.recompute=full"], "selective": ["--parallel.recompute=selective"],
                  "autocast": ["--train.dtype=bfloat16"],
                  "bf16_selective_fp8_offload": [*BF16, "--parallel.recompute=selective",
                                                 "--parallel.activation_offload=true",
                                                 "--parallel.fp8_activations=[moe_up_input, swiglu_input]"]}


def _saved_worker(rank: int, world: int, out: str) -> None:
    from tests.audit import Bf16GemmsInFloat32, LiveBytes

    torch.set_num_threads(1)
    results = {}
    for name, setting in SAVED_SETTINGS.items():
        cfg = debug_cfg(Path(out) / name, *SAVED, *setting)
        trainer = Trainer(cfg, init_runtime(cfg))
        trainer.train_step()
        inputs, targets = trainer.loader.next_batch()
        with Bf16GemmsInFloat32(), trainer.autocast, LiveBytes() as live, SavedBytes(trainer.model) as saved:
            loss = trainer.model(inputs, targets)
            gc.collect()  # what is kept, not what waits for the cycle collector (the suite's heap decides when)
        results[name] = {"saved": saved.device + saved.host, "host": saved.host,
                         "kept_beside": live.current - saved.device - saved.host}
        loss.backward()
        trainer.close()
    (Path(out) / f"saved{rank}.json").write_text(json.dumps(results))


def test_planned_sequence_parallel_activations_are_the_saved_bytes(tmp_path):
    """What one micro batch keeps for backward at tp2 + SP is the planner's ``saved_per_micro``, exactly (tests/audit.py
    ``SavedBytes``, as tests/test_memory.py checks context parallelism): the block inputs, norms, router and routed
    rows 1/tp, the column regions' gathered inputs whole, with no recomputation, full (which keeps nothing of SP's
    collectives beside autograd: they run again), selective, under autocast, and bf16 with FP8 storage and activation
    offload (the host part too)."""
    from parallel.plan import plan_layout

    run_distributed(_saved_worker, 2, str(tmp_path))
    for rank in range(2):
        runs = json.loads((tmp_path / f"saved{rank}.json").read_text())
        for name, setting in SAVED_SETTINGS.items():
            plan = plan_layout(debug_cfg(tmp_path, *SAVED, *setting), 2)[rank]
            run = runs[name]
            assert (plan.saved_per_micro, plan.activations_host_per_micro) == (run["saved"], run["host"]), (name, rank)
            replayed = plan.activations_per_micro + plan.activations_host_per_micro - plan.saved_per_micro
            assert replayed == 0, (name, rank)
        # full recompute keeps no collective's result beside autograd's storages (the float32 runs)
        assert runs["full"]["kept_beside"] == runs["none"]["kept_beside"], rank
        assert runs["bf16_selective_fp8_offload"]["host"] > 0


def test_planned_pipeline_stage_tensors_are_the_sequence_parallel_part(tmp_path):
    """tp2 + SP x cp2 x pp2 (planned): a stage keeps its output for backward and receives its input as
    [B, T/(cp*tp), D] (launch/build.py ``build_pipeline``'s declared hidden states), not [B, T/cp, D]."""
    from parallel.plan import plan_layout

    cfg = debug_cfg(tmp_path, *SP2, "--parallel.cp=2", "--parallel.pp=2", "--data.micro_batch_size=2",
                    "--data.grad_accum=2", "--model.n_heads=4")
    first = plan_layout(cfg, 8)[0]
    d, m = cfg.data, cfg.model
    stage_tensor = d.micro_batch_size * d.seq_len // (2 * 2) * m.dim * 4
    assert first.coords[0] == 0 and first.activations_per_micro - first.saved_per_micro == stage_tensor


def _router_bytes_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    """The bytes this rank sends in the second step's balance-loss all-reduces (each router's ``total``) and in the
    router-load all-reduce after the optimizer step (``RouterBiasUpdate``), as reached torch.distributed."""
    import launch.hooks

    torch.set_num_threads(1)
    sent = {"seq_aux_all_reduce": 0, "router_load_all_reduce": 0}

    def counted(fn, key):
        def run(*args, **kwargs):
            with WireAudit() as wire:
                result = fn(*args, **kwargs)
            G = world  # every group here has 2 ranks: an all-reduce sends 2(G-1)/G of its tensor
            sent[key] += sum(2 * (G - 1) * r.numel * r.dtype.itemsize // G for r in wire.records)
            return result
        return run

    launch.hooks.RouterBiasUpdate.__call__ = counted(launch.hooks.RouterBiasUpdate.__call__, "router_load_all_reduce")
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    for router in trainer.model.moe_routers():
        n, total, scale = router.sequence_shards
        router.sequence_shards = (n, counted(total, "seq_aux_all_reduce"), scale)
    trainer.train_step()
    sent.update(dict.fromkeys(sent, 0))
    trainer.train_step()
    (Path(out) / f"router{rank}.json").write_text(json.dumps(sent))


@pytest.mark.parametrize("layout", [SP2, [*SP2, "--parallel.recompute=full"], ["--parallel.cp=2"]],
                         ids=["tp2sp", "tp2sp_full_recompute", "cp2"])
def test_planned_router_all_reduces_are_a_step_s(tmp_path, layout):
    """The planner's ``seq_aux_all_reduce`` (the sequence-wise balance loss's [B, 2E] counts and means per MoE layer
    and micro batch, over the ranks splitting each sequence; full recompute hands them back) and
    ``router_load_all_reduce`` (the [L, E] loads over the stage, once per step) are the bytes one step sends."""
    from parallel.plan import plan_layout

    overrides = [*layout, "--data.micro_batch_size=2", "--data.grad_accum=2", "--model.seq_aux_loss_alpha=0.01"]
    run_distributed(_router_bytes_worker, 2, str(tmp_path), overrides)
    for rank, plan in enumerate(plan_layout(debug_cfg(tmp_path, *overrides), 2)):
        measured = json.loads((tmp_path / f"router{rank}.json").read_text())
        assert measured["seq_aux_all_reduce"] > 0 and measured["router_load_all_reduce"] > 0
        assert {k: plan.comm.get(k, 0) for k in measured} == measured, rank
