"""Vocabulary-parallel embedding, head and loss (issue #27 item 3, parallel/vocab_parallel.py): the loss over a
vocabulary split in two equals F.cross_entropy in float64 (chunk 0, fixed, automatic; targets in each shard and on
its edges); the model at tp2 and tp2 + SP equals one process with every chunking; a rank holds 1/tp of the
embedding's and the head's bytes; the loss's all-reduce bytes are the planner's."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from launch.trainer import Trainer, init_runtime
from parallel.dims import ParallelDims
from parallel.parallelize import ParallelizeConfig, parallelize
from tests.audit import NoDeviceSync, WireAudit
from tests.dist_utils import run_distributed
from tests.test_sequence_parallel import SP2, _gather, _model
from tests.test_tensor_parallel import VARIANTS
from tests.test_train import debug_cfg

TOL = dict(rtol=1e-10, atol=1e-12)  # float64, sums in other orders


def _ce_worker(rank: int, world: int) -> None:
    import models.loss
    from parallel.sequence_parallel import SequenceComm
    from parallel.tensor_parallel import copy_to_tp
    from parallel.vocab_parallel import VocabParallelHead

    groups = ParallelDims(dp=1, tp=world).build("cpu")
    V, D, N = 16, 6, 11  # rank 0 holds rows 0..7, rank 1 rows 8..15
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(N, D, dtype=torch.float64, generator=g), torch.randn(V, D, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 7, 8, 15, 3, 12, 7, 8, 0, 15, 9])  # each shard's first and last rows, both shards
    models.loss.AUTO_CHUNK_BYTES = 4 * (V // world) * 3  # -1: 3 rows a chunk from V/tp (V would give 1)
    for chunk_tokens, chunks in ((0, 1), (4, 3), (-1, 4)):
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.cross_entropy(hr @ wr.T, t)
        ref.backward()
        full = nn.Linear(D, V, bias=False, dtype=torch.float64)
        full.weight.data.copy_(w)
        comm = SequenceComm(groups.tp_group, world, rank)
        head = VocabParallelHead(full, rank, world, comm, lambda x, fn: fn(copy_to_tp(x, groups.tp_group)),
                                 chunk_tokens)
        hh = h.clone().requires_grad_()
        with WireAudit() as wire, NoDeviceSync():  # nothing reads the device from the host (CUDA)
            loss = head.loss(hh[None], t[None])
            loss.backward()
        torch.testing.assert_close(loss, ref, **TOL, msg=f"chunk {chunk_tokens}: loss")
        torch.testing.assert_close(hh.grad, hr.grad, **TOL, msg=f"chunk {chunk_tokens}: grad h")
        torch.testing.assert_close(_gather(head.weight.grad, 0, groups.tp_group, world), wr.grad, **TOL,
                                   msg=f"chunk {chunk_tokens}: grad w")
        # per chunk one MAX of [c] and one SUM of [c, 2] (float64 here), nothing [tokens, V] on the wire; backward
        # only copy_to_tp's all-reduce of h's partial gradient
        numels = [r.numel for r in wire.records]
        assert [r.call for r in wire.records] == ["all_reduce"] * (2 * chunks + 1), chunk_tokens
        assert sum(numels[:-1]) == 3 * N and numels[-1] == N * D, (chunk_tokens, numels)
        assert comm.bytes_sent["ce_all_reduce"] == 2 * (world - 1) * 3 * N * 8 // world


def test_vocab_parallel_cross_entropy_matches_f_cross_entropy_in_float64():
    """V = 16 split over tp2, 11 tokens whose targets are each shard's first and last rows and rows inside both:
    loss and the gradients of h (summed by ``copy_to_tp``'s backward) and of the weight equal F.cross_entropy's
    for one chunk, chunks of 4 (the last one short) and automatic chunks (sized from V/tp); per chunk two
    all-reduces, none in the loss's backward, and no host synchronisation."""
    run_distributed(_ce_worker, 2)


def _model_worker(rank: int, world: int) -> None:
    tokens = torch.randint(0, 62, (2, 17), generator=torch.Generator().manual_seed(1))
    for sp in (False, True):
        pdims = ParallelDims(dp=1, tp=world, sp=sp)
        groups = pdims.build("cpu")
        for chunk in (0, 5, -1):
            ref = _model(dict(VARIANTS["mla_qlora"], vocab_size=62, loss_chunk_tokens=chunk))
            model = copy.deepcopy(ref)
            ref_loss = ref(tokens[:, :-1], tokens[:, 1:])
            ref_loss.backward()
            placements = parallelize(model, pdims, groups, ParallelizeConfig())
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            what = f"sp={sp} chunk={chunk}"
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-8, msg=what)
            ref_params = dict(ref.named_parameters())
            for name in ("embed_tokens.weight", "lm_head.weight"):  # 1/tp of the bytes, rows in rank order
                p, pl = dict(model.named_parameters())[name], placements[name]
                assert (pl.kind, pl.shard_dim) == ("tp_sharded", 0), name
                assert world * p.numel() * p.element_size() == ref_params[name].numel() * 8, name
                torch.testing.assert_close(_gather(p.grad, 0, groups.tp_group, world), ref_params[name].grad,
                                           rtol=1e-6, atol=1e-8, msg=f"{what}: {name}")
            for name, p in model.named_parameters():
                pl = placements[name]
                if p.grad is not None and not pl.tp_copies:  # SP: this rank's tokens' part, summed by ZeRO-1
                    dist.all_reduce(p.grad, group=groups.edp_group if pl.kind == "expert" else groups.stage)
                if p.grad is not None and placements[name].kind != "tp_sharded":
                    torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-6, atol=1e-8,
                                               msg=f"{what}: {name}")


def test_tp2_model_loss_with_every_chunking_matches_one_process_and_holds_half_the_vocab_rows():
    """float64 MLA MoE at tp2 and tp2 + SP, ``loss_chunk_tokens`` 0, 5 and -1: the loss and the gradients of the
    embedding, the head and the replicated parameters equal one process's; the rank's embedding and head are
    Shard(0) placements of 1/tp of one process's bytes."""
    run_distributed(_model_worker, 2)


# ------------------------------------------------------------------------------------------------ planner
def _ce_bytes_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.train_step()
    trainer.model.vocab_parallel.bytes_sent.clear()
    trainer.train_step()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(trainer.model.vocab_parallel.bytes_sent))


@pytest.mark.parametrize("layout", [["--parallel.tp=2", "--model.loss_chunk_tokens=40"],
                                    [*SP2, "--data.grad_accum=2", "--train.dtype=bfloat16"]],
                         ids=["tp2_chunked", "tp2sp_bf16_accum2"])
def test_planned_ce_all_reduce_bytes_are_a_step_s(tmp_path, layout):
    """The planner's ``ce_all_reduce`` is what the vocab-parallel loss sends in a training step: chunks of 40 of
    the 2 x 64 tokens (the last one short) at tp2; one chunk per micro batch of two under autocast at tp2 + SP."""
    from parallel.plan import plan_layout

    overrides = [*layout, "--data.micro_batch_size=2"]
    run_distributed(_ce_bytes_worker, 2, str(tmp_path), overrides)
    plans = plan_layout(debug_cfg(tmp_path, *overrides), 2)
    for rank, plan in enumerate(plans):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured["ce_all_reduce"] > 0 and plan.comm["ce_all_reduce"] == measured["ce_all_reduce"], rank


def test_vocab_not_divisible_by_tp_is_one_line_and_exit_2(tmp_path):
    from tests.test_errors import DEBUG, _train

    proc = _train("--config", str(DEBUG), f"--train.output_dir={tmp_path}", "--parallel.tp=2",
                  "--model.vocab_size=8191")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: parallel config: tp (2) must divide model.vocab_size (8191): the embedding and the head split their "
        f"rows over the tensor-parallel ranks (pad the vocabulary) (config: {DEBUG} + overrides "
        f"--train.output_dir={tmp_path} --parallel.tp=2 --model.vocab_size=8191)"]
