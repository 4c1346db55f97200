"""launch/monitor.py: step statistics, spike detection, rollback decisions (pure and on a real tiny model); the
statistics rank 0 logs under tp2, tp2 x pp2 and tp2 x cp2 are one process's (every head, each clip counted once)."""
import copy
import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import muonclip
from launch.monitor import (IntervalStats, RollbackLimitError, RollbackPolicy, SpikeDetector, plan_rollback, robust_z,
                            step_stats)
from launch.trainer import Trainer, init_runtime
from models import ModelConfig, Transformer
from tests.dist_utils import run_distributed
from tests.test_train import debug_cfg

TINY = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, inter_dim=64, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
            first_k_dense=1, max_seq_len=64)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **kw})).train()


# ------------------------------------------------------------------------------------------------ step_stats
def count_host_syncs(monkeypatch):
    """Count tensor -> Python conversions (each one is a device->host sync on a GPU)."""
    calls = {name: 0 for name in ("tolist", "item", "__float__", "__int__", "__bool__")}

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *args):
            calls[name] += 1
            return orig(self, *args)
        return wrapper

    for name in calls:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return calls


@pytest.mark.parametrize("attn_type", ["mla", "mha"])
def test_step_stats_values_and_one_host_sync(attn_type, monkeypatch):
    model = tiny_model(attn_type=attn_type, n_kv_heads=2, head_dim=8)
    model.reset_step_stats()
    model(torch.randint(0, 97, (2, 16)))
    calls = count_host_syncs(monkeypatch)
    stats = step_stats(model)
    assert calls == {"tolist": 1, "item": 0, "__float__": 0, "__int__": 0, "__bool__": 0}
    monkeypatch.undo()

    maxes = [layer.self_attn.max_logits_H for layer in model.layers]
    for i, max_H in enumerate(maxes):
        assert stats[f"max_logit/l{i}"] == pytest.approx(max_H.max().item())
        for h in range(4):
            assert stats[f"max_logit/l{i}/h{h}"] == pytest.approx(max_H[h].item())
    assert stats["max_logit/max"] == pytest.approx(max(m.max().item() for m in maxes))
    assert "router/l0/e0" not in stats  # layer 0 is dense
    for i in (1, 2):
        load = model.layers[i].mlp.gate.expert_load_E
        assert load.sum().item() == 2 * 16 * 2  # tokens * top-k
        shares = [stats[f"router/l{i}/e{e}"] for e in range(8)]
        assert sum(shares) == pytest.approx(1.0)
        assert shares == pytest.approx((load / load.sum()).tolist())
        assert stats[f"router/l{i}/max_over_mean"] == pytest.approx((load.max() / load.mean()).item())


def test_step_stats_uses_qkclip_values_before_clip():
    model = tiny_model()
    opt = muonclip.MuonClip(muonclip.build_param_groups(model.named_parameters()), lr=1e-2)
    clip = muonclip.QKClip(model.qk_clip_specs(), tau=1e-3)  # every head is clipped
    clip.register(opt)
    model.reset_step_stats()
    tokens = torch.randint(0, 97, (2, 16))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    before = torch.stack([layer.self_attn.max_logits_H.clone() for layer in model.layers])
    opt.step()
    stats = step_stats(model, clip)
    assert stats["qk_clip/clipped_heads"] == 3 * 4
    assert stats["max_logit/l1/h2"] == pytest.approx(before[1, 2].item())
    assert stats["max_logit/max"] == pytest.approx(before.max().item())


def test_step_stats_omits_unrecorded_layers_and_checks_loads():
    model = tiny_model()
    model.reset_step_stats()
    assert step_stats(model) == {}
    model(torch.randint(0, 97, (1, 8)))
    loads = [torch.tensor([4.0, 0, 0, 0, 0, 0, 0, 4.0]), torch.zeros(8)]  # e.g. all-reduced loads
    stats = step_stats(model, expert_loads=loads)
    assert stats["router/l1/e0"] == 0.5 and stats["router/l1/max_over_mean"] == 4.0
    assert not any(k.startswith("router/l2/") for k in stats)  # no tokens: omitted
    with pytest.raises(ValueError, match="expert_loads"):
        step_stats(model, expert_loads=loads[:1])


def test_interval_stats_max_and_sum_over_steps_without_sync(monkeypatch):
    model = tiny_model()
    acc, per_step, loads = IntervalStats(), [], []
    for seed in range(3):
        model.reset_step_stats()
        model(torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(seed)) * (seed + 1) % 97)
        per_step.append(step_stats(model))
        loads.append(model.layers[2].mlp.gate.expert_load_E.clone())
        calls = count_host_syncs(monkeypatch)
        acc.update(model)
        assert sum(calls.values()) == 0
        monkeypatch.undo()
    stats = acc.flush()
    for key in ("max_logit/max", "max_logit/l0/h1", "max_logit/l2"):
        assert stats[key] == max(s[key] for s in per_step)
    total = torch.stack(loads).sum(0)
    assert stats["router/l2/e3"] == pytest.approx((total[3] / total.sum()).item())
    assert stats["router/l2/max_over_mean"] == pytest.approx((total.max() / total.mean()).item())
    assert acc.flush() == {}  # flushed: starts over
    acc.update(model)
    acc.reset()
    assert acc.flush() == {}


# ------------------------------------------------------------------------------------------------ detector
def noisy_decreasing_losses(n, seed=0, rel_noise=0.02):
    """A realistic pretraining curve: fast then slow decrease with per-batch Gaussian noise."""
    rng = random.Random(seed)
    return [(2.0 + 7.0 * math.exp(-t / 150) + 0.5 * math.exp(-t / 2000)) * (1 + rel_noise * rng.gauss(0, 1))
            for t in range(n)]


def run_detector(det, losses, start=0):
    return [e for t, loss in enumerate(losses, start) if (e := det.update(t, loss)) is not None]


def test_injected_10x_spike_detected_and_kept_out_of_window():
    losses = noisy_decreasing_losses(400)
    losses[300] *= 10
    det = SpikeDetector(window=100, z_threshold=6.0, min_history=20)
    events = run_detector(det, losses)
    assert [e["step"] for e in events] == [300]
    assert events[0]["reason"] == "z_score" and events[0]["z"] > 6
    assert losses[300] not in det.history and det.n_spikes == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_noisy_decreasing_run_raises_no_alert(seed):
    assert run_detector(SpikeDetector(), noisy_decreasing_losses(3000, seed)) == []


def test_moderate_bump_and_drop_are_not_spikes_but_jump_is():
    det = SpikeDetector(window=50, z_threshold=6.0, min_history=20)
    base = noisy_decreasing_losses(1200, seed=3)[1000:]  # past the steep start (its trend widens the MAD)
    assert run_detector(det, base[:100]) == []
    assert det.update(100, base[100] * 0.5) is None  # sudden drop: one-sided
    assert det.update(101, base[101] * 1.03) is None  # within noise (~1.5 sigma)
    assert det.update(102, base[102] * 1.5)["reason"] == "z_score"


def test_non_finite_always_flagged_even_without_history():
    det = SpikeDetector(min_history=20)
    assert det.update(0, float("nan"))["reason"] == "non_finite"
    assert det.update(1, float("inf"))["reason"] == "non_finite"
    assert det.update(2, 100.0) is None  # not enough history to judge finite losses
    assert len(det.history) == 1


def test_robust_z_matches_definition():
    hist = [1.0, 2.0, 3.0, 4.0, 100.0]
    z, median, scale = robust_z(10.0, hist)
    assert median == 3.0 and scale == pytest.approx(1.4826 * 1.0)
    assert z == pytest.approx(7.0 / 1.4826)
    assert robust_z(3.3, [3.0] * 10, min_scale_frac=0.01)[0] == pytest.approx(10.0)  # plateau: floor applies


def test_detector_state_round_trip():
    losses = noisy_decreasing_losses(300, seed=5)
    losses[250] = float("nan")
    losses[270] *= 4
    a = SpikeDetector(window=40, z_threshold=5.0, min_history=10)
    run_detector(a, losses[:200])
    b = SpikeDetector()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.state_dict() == a.state_dict()
    ea, eb = run_detector(a, losses[200:], 200), run_detector(b, losses[200:], 200)
    assert [e["step"] for e in ea] == [e["step"] for e in eb] == [250, 270]
    assert list(a.history) == list(b.history)
    with pytest.raises(ValueError, match="misses"):
        b.load_state_dict({"window": 3})
    with pytest.raises(ValueError, match="min_history"):
        SpikeDetector(window=10, min_history=11)


# ------------------------------------------------------------------------------------------------ rollback
def test_plan_rollback_restore_and_skip_range():
    plan = plan_rollback(spike_step=57, checkpoint_step=50)
    assert (plan.restore_step, plan.skip_batches) == (50, 8)  # data of steps 50..57
    assert plan_rollback(57, 50, batches_per_step=4).skip_batches == 32
    assert plan_rollback(50, 50).skip_batches == 1  # the spiking batch itself
    with pytest.raises(RollbackLimitError, match="no checkpoint"):
        plan_rollback(10, None)
    with pytest.raises(ValueError, match="at or before the spike"):
        plan_rollback(10, 20)


def test_policy_limits_consecutive_rollbacks_and_resets_after_progress():
    pol = RollbackPolicy(max_rollbacks=2, reset_after=30)
    assert pol.plan({"step": 57, "reason": "z_score"}, 50).skip_batches == 8
    assert pol.plan({"step": 60, "reason": "z_score"}, 50).skip_batches == 11  # again soon after: consecutive
    with pytest.raises(RollbackLimitError, match="2 consecutive rollbacks"):
        pol.plan({"step": 61, "reason": "non_finite"}, 50)
    assert pol.plan({"step": 200, "reason": "z_score"}, 190).restore_step == 190  # clean past 60+30: reset
    assert pol.metrics() == {"rollback/count": 3.0, "rollback/consecutive": 1.0, "rollback/skipped_batches": 30.0}
    clone = RollbackPolicy(max_rollbacks=2, reset_after=30)
    clone.load_state_dict(copy.deepcopy(pol.state_dict()))
    assert clone.state_dict() == pol.state_dict()
    clone.plan({"step": 205}, 190)
    with pytest.raises(RollbackLimitError):
        clone.plan({"step": 206}, 190)


# ------------------------------------------------------------------------------------------------ real tiny run
@pytest.fixture(scope="module")
def corpus_tokens():
    """~60k real tokens: the first documents of the embedded Austen corpus, bpe8k-tokenized, EOS-separated."""
    import numpy as np
    from data.corpus import iter_documents
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer("bpe8k")
    texts, n_chars = [], 0
    for doc in iter_documents():
        texts.append(doc["text"])
        n_chars += len(doc["text"])
        if n_chars > 250_000:
            break
    ids = [t for enc in tok.encode_batch(texts) for t in enc + [tok.eos_id]]
    return np.asarray(ids, dtype=np.int32), tok.vocab_size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP threads stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def real_setup(corpus_tokens):
    from data import BatchLoader, packed_samples

    tokens, vocab = corpus_tokens
    model = tiny_model(seed=0, vocab_size=vocab, dim=64, n_layers=2, n_heads=2, kv_lora_rank=16,
                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, inter_dim=128, moe_inter_dim=32)
    opt = muonclip.MuonClip(muonclip.build_param_groups(model.named_parameters(), weight_decay=0.0), lr=1e-2)
    clip = muonclip.QKClip(model.qk_clip_specs(), tau=100.0)
    clip.register(opt)
    return model, opt, BatchLoader(packed_samples(tokens, seq_len=32, seed=0), micro_batch_size=8)


def train(model, opt, loader, det, steps, corrupt_at=None):
    """Plain loop; ``corrupt_at``: multiply the final norm gain by 30 just before that step (a blown-up
    layer, as in a divergence). Returns ({step: loss}, [spike events])."""
    losses, events = {}, []
    for step in steps:
        if step == corrupt_at:
            with torch.no_grad():
                model.norm.weight.mul_(30.0)
        model.reset_step_stats()
        inputs, targets = loader.next_batch()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.item()
        if (event := det.update(step, losses[step])) is not None:
            events.append(event)
            break
    return losses, events


def test_real_tiny_run_clean_then_injected_spike_rolls_back_without_losing_data(corpus_tokens):
    """26 clean steps (no alert), a blown-up layer at step 26 (alert), rollback to the step-20 checkpoint
    skipping the data of steps 20..26, then 10 clean steps on the data a spike-free run would have seen."""
    model, opt, loader = real_setup(corpus_tokens)
    det = SpikeDetector(window=50, z_threshold=6.0, min_history=10)
    losses, events = train(model, opt, loader, det, range(0, 20))
    assert events == []  # clean start
    ckpt = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "loader": loader.state_dict(), "step": 20}

    more, events = train(model, opt, loader, det, range(20, 40), corrupt_at=26)
    losses.update(more)
    assert [e["step"] for e in events] == [26] and events[0]["reason"] == "z_score"
    assert losses[26] > 2 * max(losses[s] for s in range(10, 26))
    assert max(losses[s] for s in range(10, 26)) < losses[1]  # it was learning before the spike

    plan = RollbackPolicy(max_rollbacks=2).plan(events[0], ckpt["step"])
    assert (plan.restore_step, plan.skip_batches) == (20, 7)  # data of steps 20..26
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    loader.load_state_dict(ckpt["loader"])
    loader.skip(plan.skip_batches)
    reference = type(loader)(loader.samples, micro_batch_size=8)
    reference.skip(27)  # where a run without the spike would be after step 26
    assert loader.state_dict() == reference.state_dict()
    position = loader.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), reference.next_batch()))
    loader.load_state_dict(position)

    after, events = train(model, opt, loader, det, range(plan.restore_step, plan.restore_step + 10))
    assert events == []  # recovered: no alert on the steps after the rollback
    assert max(after.values()) < 1.2 * statistics.median(losses[s] for s in range(15, 26))
    _assert_stats_match_an_independent_recomputation(model, loader.next_batch()[0])


def _assert_stats_match_an_independent_recomputation(model, inputs):
    """step_stats after a train-mode forward = max of the masked, scaled q.k^T captured at each attention call
    (not the model's own probe), and router balance = max/mean of the chosen experts counted from the routers'
    outputs (not their load buffers)."""
    from models import Router

    attn_max, chosen = [], []
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, *args, is_causal=False, scale=None, **kwargs):
        s = (q.double() @ k.double().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        T = q.shape[2]
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        attn_max.append(s.amax(dim=(0, 2, 3)))
        return orig(q, k, v, *args, is_causal=is_causal, scale=scale, **kwargs)

    hooks = [m.register_forward_hook(lambda _m, _i, out: chosen.append((_m.n_experts, out[0])))
             for m in model.modules() if isinstance(m, Router)]
    F.scaled_dot_product_attention = spy
    try:
        model.train().reset_step_stats()
        with torch.no_grad():
            model(inputs)
    finally:
        F.scaled_dot_product_attention = orig
        for h in hooks:
            h.remove()
    stats = step_stats(model)
    assert len(attn_max) == len(model.layers)
    for i, m_H in enumerate(attn_max):
        assert stats[f"max_logit/l{i}"] == pytest.approx(float(m_H.max()), rel=1e-5)
        for h, value in enumerate(m_H.tolist()):
            assert stats[f"max_logit/l{i}/h{h}"] == pytest.approx(value, rel=1e-5)
    assert stats["max_logit/max"] == pytest.approx(max(float(m.max()) for m in attn_max), rel=1e-5)
    moe_layers = [i for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "gate")]
    for i, (n_experts, idx_TK) in zip(moe_layers, chosen):
        load_E = torch.bincount(idx_TK.flatten(), minlength=n_experts).double()
        assert stats[f"router/l{i}/max_over_mean"] == pytest.approx(float(load_E.max() / load_E.mean()), rel=1e-6)
        assert stats[f"router/l{i}/max_over_mean"] > 1.0  # a trained router is not perfectly balanced on this batch


# ------------------------------------------------------------------------------------------------ every layout
# 4 MLA heads, a tau that clips heads at most steps (the debug model's max logits are ~0.1), 8 steps, each logged;
# the global batch of 4 sequences as 2 micro batches of 2 (a pipeline needs micro batches >= stages)
TAU = 0.09
HEADS = ["--model.n_heads=4", "--train.steps=8", "--train.eval_interval=0", "--schedule.warmup_steps=2",
         f"--optim.qk_clip_tau={TAU}", "--data.micro_batch_size=2", "--data.grad_accum=2"]


def _head_records(out_dir) -> list[dict]:
    """The per-step max-logit and QK-Clip metrics rank 0 logged."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k.startswith(("max_logit/", "qk_clip/"))}
            for r in map(json.loads, lines) if "loss" in r]


def _layout_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    """Train; without a pipeline (whose object gather reads the host) also audit each log step's ``flush``: its one
    host read is ``_format_stats``'s, and the elements it hands to ``all_gather_single`` are recorded."""
    import torch.distributed as dist

    from tests.audit import NoDeviceSync

    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    stats, gathered, reads = trainer.interval_stats, [], {}
    flush, gather = stats.flush, dist.all_gather_single

    def counted_gather(output, input, *args, **kwargs):
        gathered.append(input.numel())
        return gather(output, input, *args, **kwargs)

    def audited_flush(*args, **kwargs):
        dist.all_gather_single = counted_gather
        try:
            with NoDeviceSync(tolist_from=("_format_stats",)) as audit:
                return flush(*args, **kwargs)
        finally:
            dist.all_gather_single = gather
            for name, n in audit.tolist_calls.items():
                reads[name] = reads.get(name, 0) + n

    if cfg.parallel.pp == 1:
        stats.flush = audited_flush
    trainer.fit()
    (Path(out) / f"flush{rank}.json").write_text(json.dumps({"gathered": gathered, "reads": reads}))


@pytest.fixture(scope="module")
def one_process_heads(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads_one")
    cfg = debug_cfg(out, *HEADS)
    Trainer(cfg, init_runtime(cfg)).fit()
    ref = _head_records(out)
    assert len(ref) == 8 and sum(r["qk_clip/clipped_heads"] for r in ref) > 0
    # no head within 1e-4 relative of tau, 100x the layouts' float32 differences (measured <= 9e-7): exact counts
    assert min(abs(v - TAU) for r in ref for k, v in r.items() if "/h" in k) > 1e-4 * TAU
    return ref


@pytest.mark.parametrize("world,layout", [(2, ["--parallel.tp=2"]), (4, ["--parallel.tp=2", "--parallel.pp=2"]),
                                          (4, ["--parallel.tp=2", "--parallel.cp=2"])],
                         ids=["tp2", "tp2xpp2", "tp2xcp2"])
def test_every_layout_logs_one_process_heads_and_clip_counts(tmp_path, one_process_heads, world, layout):
    """Rank 0's metrics (what W&B, the console line and metrics.jsonl show) hold every head of every layer with one
    process's values: the TP ranks' heads in global order, the PP stages' layers, the CP ranks' heads reduced;
    each clipped head counted once."""
    run_distributed(_layout_worker, world, str(tmp_path), [*HEADS, *layout])
    ours = _head_records(tmp_path)
    assert len(ours) == len(one_process_heads)
    for step, (a, b) in enumerate(zip(ours, one_process_heads), 1):
        assert sorted(a) == sorted(b), f"step {step}: logged keys differ"
        assert a["qk_clip/clipped_heads"] == b["qk_clip/clipped_heads"], f"step {step}: clip counts differ"
        assert a == pytest.approx(b, rel=2e-5), f"step {step}"  # float32 sums in other orders, over 8 steps
    if "--parallel.pp=2" not in layout:  # per log step: one gather of 2 layers x 2 local heads + the clip count
        for rank in range(world):
            audit = json.loads((tmp_path / f"flush{rank}.json").read_text())
            assert audit == {"gathered": [2 * 2 + 1] * 8, "reads": {"_format_stats": 8}}, f"rank {rank}: {audit}"


def _post_step_worker(rank: int, world: int, out: str) -> None:
    """Two TP ranks of 2 layers x 2 heads: rank r's head j of layer i holds 10 * i + 2 * r + j (its global head
    index), its post-step clip counted r + 1 heads and re-measured 5 + r."""
    import torch.distributed as dist
    from types import SimpleNamespace

    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("max_logits_H", torch.zeros(2))

    model = nn.Module()
    model.layers = nn.ModuleList([Attention(), Attention()])
    forward = SimpleNamespace(last_max_logits=torch.tensor([[0.0, 1], [10, 11]]) + 2 * rank)
    post = SimpleNamespace(last_max_logits=torch.full((2, 2), 5.0 + rank), last_clipped=torch.tensor(rank + 1))
    stats = IntervalStats()
    stats.update(model, forward, post_clip=post)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(stats.flush(head_group=dist.group.WORLD)))


def test_post_step_flush_gathers_heads_sums_clips_and_takes_the_max_over_tp(tmp_path):
    run_distributed(_post_step_worker, 2, str(tmp_path))
    for rank in range(2):
        stats = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {k: v for k, v in stats.items() if "/h" in k} == {f"max_logit/l{i}/h{h}": 10.0 * i + h
                                                                 for i in range(2) for h in range(4)}
        assert (stats["max_logit/max"], stats["qk_clip/clipped_heads"], stats["qk_clip/post_step_max_logit"]) == (
            13.0, 3.0, 6.0)
