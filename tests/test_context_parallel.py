"""Context parallelism (parallel/context_parallel.py): cp=2 alone and with dp=2, ep=2 or pp=2 follows one process
over 20 steps (losses, QK-Clip's clip counts) with MLA + MoE, QK-Clip clipping and document masking; the
checkpoints move between cp=2 and cp=1; the all-to-alls are exact inverses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.runtime import init_runtime
from launch.trainer import Trainer
from parallel.context_parallel import heads_to_seq, seq_to_heads
from tests.dist_utils import run_distributed
from tests.test_document_mask import write_short_documents
from tests.test_train import assert_trained_alike, debug_cfg

STEPS = 20
COMMON = [f"--train.steps={STEPS}", "--train.eval_interval=10", "--train.ckpt_interval=10",
          "--schedule.warmup_steps=2", "--data.grad_accum=2", "--data.micro_batch_size=2",
          "--optim.qk_clip_tau=0.05", "--optim.grad_clip=0.5", "--parallel.optimizer=zero1",
          "--data.document_mask=true", "--data.reset_positions=true", "--data.val_fraction=0.1"]
TOL = dict(rel=2e-5, abs=2e-5)


def _data(root: Path) -> list[str]:
    short = root / "short.jsonl"
    if not short.exists():
        write_short_documents(short)
    return [f"--data.sources=[{{path: {short}}}]", f"--data.data_dir={root / 'cache'}"]


def _records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    result = Trainer(cfg, init_runtime(cfg)).fit()
    torch.save({"losses": result.losses, "val": result.val_losses}, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_ref")
    out = root / "one"
    cfg = debug_cfg(out, *COMMON, *_data(root))
    return root, out, Trainer(cfg, init_runtime(cfg)).fit()


def _check(out: Path, world: int, ref_out: Path, ref, steps=range(1, STEPS + 1), clips: bool = True) -> None:
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    losses = ranks[0]["losses"]
    assert all(r["losses"] == losses for r in ranks)
    assert [losses[s] for s in steps] == pytest.approx([ref.losses[s] for s in steps], **TOL)
    assert ranks[0]["val"] == pytest.approx({s: v for s, v in ref.val_losses.items() if s in steps}, **TOL)
    if clips:  # the heads QK-Clip clipped at each step: the same as one process (it clips through the run)
        ours, theirs = _records(out), _records(ref_out)
        counts = [ours[s]["qk_clip/clipped_heads"] for s in steps]
        assert counts == [theirs[s]["qk_clip/clipped_heads"] for s in steps] and sum(counts) > 0


@pytest.mark.parametrize("world,layout", [(2, ["--data.reset_positions=false"]), (2, ["--parallel.ep=2"]),
                                          (4, ["--parallel.dp=2"]), (4, ["--parallel.pp=2"])],
                         ids=["cp2-global-positions", "cp2-ep2", "cp2-dp2", "cp2-pp2"])
def test_cp2_follows_one_process(tmp_path, reference, world, layout):
    """Per-step losses, validation and clip counts of one process (positions restarting per document, or global:
    each rank's tokens then start at its offset in the sequence)."""
    root, ref_out, ref = reference
    if "--data.reset_positions=false" in layout:
        ref_out = ref_out.parent / "global_positions"
        cfg = debug_cfg(ref_out, *COMMON, *_data(root), *layout)
        ref = Trainer(cfg, init_runtime(cfg)).fit()
    overrides = [*COMMON, *_data(root), "--parallel.cp=2", *layout]
    if "--parallel.dp=2" in layout:  # the same global batch: dp=2 halves each rank's micro batch
        overrides.append("--data.micro_batch_size=1")
    run_distributed(_worker, world, str(tmp_path), overrides)
    _check(tmp_path, world, ref_out, ref, clips="--parallel.pp=2" not in layout)  # pp: each stage its heads


def test_checkpoints_move_between_cp2_and_cp1(tmp_path, reference):
    """The step-10 checkpoint of one process resumed at cp=2, and the cp=2 run's resumed by one process: both
    end with one process's steps 11-20."""
    root, ref_out, ref = reference
    ref_ckpt = ref_out / "checkpoints" / "step_00000010"
    run_distributed(_worker, 2, str(tmp_path / "to_cp2"),
                    [*COMMON, *_data(root), "--parallel.cp=2", f"--train.resume={ref_ckpt}"])
    _check(tmp_path / "to_cp2", 2, ref_out, ref, steps=range(11, STEPS + 1))
    cp2_ckpt = tmp_path / "to_cp2" / "checkpoints" / "step_00000020"
    assert cp2_ckpt.exists()
    back = tmp_path / "to_cp1"
    cfg = debug_cfg(back, *COMMON, *_data(root), f"--train.steps={STEPS + 2}", f"--train.resume={ref_ckpt}")
    ours = Trainer(cfg, init_runtime(cfg))
    ours.load(cp2_ckpt)  # the cp=2 weights and optimizer state in one process: equal to the reference's at 20
    reference_end = debug_cfg(tmp_path / "probe", *COMMON, *_data(root),
                              f"--train.resume={ref_out / 'checkpoints' / 'step_00000020'}")
    expected = Trainer(reference_end, init_runtime(reference_end))
    for (name, a), b in zip(ours.checkpoint_tensors().items(), expected.checkpoint_tensors().values()):
        assert_trained_alike(name, a, b)
    ours.close()
    expected.close()


def _exchange_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    torch.manual_seed(0)
    full = torch.randn(2, 4, 8, 3)  # [B, H, T, d], the same on both ranks
    local = full[:, :, rank * 4:(rank + 1) * 4]
    heads = seq_to_heads(local, dist.group.WORLD, 2)
    assert torch.equal(heads, full[:, rank * 2:(rank + 1) * 2])  # all tokens of this rank's heads
    assert torch.equal(heads_to_seq(heads, dist.group.WORLD, 2), local)


def test_the_exchanges_give_each_rank_its_heads_over_the_whole_sequence(tmp_path):
    run_distributed(_exchange_worker, 2, str(tmp_path))


def _heads_and_probe_worker(rank: int, world: int) -> None:
    """cp=2 on one model with 4 heads (2 per rank), document masking with reset positions: see the test."""
    import copy

    import torch.distributed as dist

    import muonclip
    from models.layers import causal_max_logits, document_positions
    from parallel.context_parallel import apply_context_parallel, local_tokens
    from tests.test_model import VARIANTS, make
    from tests.test_qk_clip import _tau_between

    torch.manual_seed(0)
    ref = make(**VARIANTS[2]).train()  # MLA, 4 heads, float64
    ref.reset_positions = True
    H = ref.cfg.n_heads
    assert H // world >= 2  # several heads per rank: rank c's heads start at c * H / cp, not at c
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    # documents crossing the cut between the ranks' tokens (at 8), different in each row
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 10 + [1] * 6])
    cp = copy.deepcopy(ref)
    apply_context_parallel(cp, rank, world, dist.group.WORLD)
    mine = local_tokens(tokens, rank, world)

    # the training forward: each rank records the exact max logits of its own heads, at its heads' slots
    ref.reset_step_stats()
    cp.reset_step_stats()
    inputs = []  # each attention's arguments in one process: (x, segments, positions)
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, args: inputs.append(args)) for layer in ref.layers]
    with torch.no_grad():
        ref(tokens, None, seg)
        cp(mine, None, seg)
    for h in hooks:
        h.remove()
    own = torch.zeros(H, dtype=torch.bool)
    own[rank * H // world:(rank + 1) * H // world] = True
    S_LH = torch.stack([layer.self_attn.max_logits_H.clone() for layer in ref.layers])
    local_LH = torch.stack([layer.self_attn.max_logits_H.clone() for layer in cp.layers])
    reduced_LH = local_LH.clone()
    dist.all_reduce(reduced_LH, op=dist.ReduceOp.MAX)  # what QK-Clip's reduction over cp does
    assert torch.isinf(local_LH[:, ~own]).all() and torch.isfinite(local_LH[:, own]).all(), (rank, local_LH)
    torch.testing.assert_close(local_LH[:, own], S_LH[:, own], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reduced_LH, S_LH, rtol=1e-5, atol=1e-6)

    # the document mask matters here: without it some layer's max logits would be larger
    for layer, (x, documents, positions), masked_H in zip(ref.layers, inputs, S_LH):
        assert torch.equal(documents.segments_BT, seg) and torch.equal(positions, document_positions(seg))
        q, k, _ = layer.self_attn._qkv(x, positions)
        unmasked_H = causal_max_logits(q, k, layer.self_attn.scale)
        assert (unmasked_H > masked_H.float() + 1e-3 * masked_H.abs().float()).any()

    # QK-Clip's post-step probe (each layer re-measured and clipped before the next): one process's clip
    tau = _tau_between(S_LH)
    single = muonclip.QKClip(ref.qk_clip_specs(), tau=tau)
    single.apply_post_step(lambda: ref.eval()(tokens, None, seg))
    clip = muonclip.QKClip(cp.qk_clip_specs(), tau=tau, process_group=dist.group.WORLD)
    clip.apply_post_step(lambda: cp.eval()(mine, None, seg))
    assert int(single.last_clipped) > 0
    torch.testing.assert_close(clip.last_max_logits, single.last_max_logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(clip.last_clipped, single.last_clipped)
    for (name, w), w1 in zip(cp.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(w, w1, rtol=1e-5, atol=0, msg=name)


def test_cp2_records_each_ranks_heads_and_the_post_step_probe_masks_documents():
    """cp=2 with 2 heads per rank and documents crossing the ranks' cut: each rank records its heads' exact max
    logits at heads [c * H/cp, (c + 1) * H/cp) (-inf elsewhere), the MAX over cp is one process's; QK-Clip's
    post-step probe under cp respects the document mask: its re-measured max logits, clip count and clipped
    weights equal one process's (float32 max logits compared at float32 precision)."""
    run_distributed(_heads_and_probe_worker, 2)
