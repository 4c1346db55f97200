"""Memory techniques (issue: fit Kimi K2 in 80 GB): the chunked loss, selective recomputation, FP8 activation
storage and activation offload, each against the plain path: same loss and gradients, fewer saved bytes."""
from __future__ import annotations

import pytest
import torch

from models.loss import chunk_size, head_loss
from tests.audit import LiveBytes, SavedBytes


def saved_bytes(fn, *args) -> tuple[int, object]:
    """Device bytes autograd keeps for backward while ``fn(*args)`` runs (tests/audit.py), and its result."""
    with SavedBytes(fn if isinstance(fn, torch.nn.Module) else None) as saved:
        out = fn(*args)
    return saved.device, out


@pytest.mark.parametrize("dtype,chunk,tol", [(torch.float64, 7, 1e-12), (torch.float32, 64, 2e-6),
                                             (torch.float32, -1, 2e-6), (torch.bfloat16, 50, 2e-2)])
def test_the_chunked_loss_equals_the_whole_logits_and_keeps_no_logits(dtype, chunk, tol):
    """Loss and both gradients equal the unchunked path (float64 to 1e-12; bf16 to bf16 rounding of the weight
    gradient, which sums per-chunk GEMMs); the unchunked path keeps the [tokens, vocab] float32 log-probabilities
    for backward, the chunked one nothing but its input."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 200, 32, 1000
    h = torch.randn(N, D, generator=g, dtype=torch.float32).to(dtype).requires_grad_()
    w = torch.nn.Parameter((torch.randn(V, D, generator=g) * 0.3).to(dtype))
    t = torch.randint(0, V, (N,), generator=g)
    results = {}
    for c in (0, chunk):
        h.grad, w.grad = None, None
        saved, loss = saved_bytes(head_loss, h.view(4, 50, D), w, t.view(4, 50), c)
        loss.backward()
        results[c] = (saved, loss.detach(), h.grad.clone(), w.grad.clone())
    (saved0, *ref), (saved1, *got) = results[0], results[chunk]
    assert got[0].dtype == torch.promote_types(dtype, torch.float32)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert saved0 >= N * V * 4 and saved1 == N * D * h.element_size() + N * 8  # h and the targets only
    assert chunk_size(-1, 163840) == 409  # automatic: <= 256 MiB of float32 logits per chunk


def test_the_chunked_loss_takes_the_log_sum_exp_of_bf16_logits_in_float32():
    """bf16 head (bf16 h and weight): the chunked loss is the mean of float32 log-sum-exps of the bf16 GEMM's logits
    minus the target logits, to float32 rounding of the sums; logits up to ~55 make a bf16 log-sum-exp (spacing
    0.25 there) miss that reference by far more than the tolerance."""
    g = torch.Generator().manual_seed(0)
    N, D, V, chunk = 24, 64, 4096, 8
    h = torch.randn(N, D, generator=g).to(torch.bfloat16)
    w = (torch.randn(V, D, generator=g) * 1.5).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=g)
    loss = head_loss(h.view(2, 12, D), w, t.view(2, 12), chunk)
    logits = torch.cat([h[s:s + chunk] @ w.T for s in range(0, N, chunk)])  # the function's bf16 GEMMs
    target = logits.float().gather(1, t[:, None])[:, 0]
    ref = (torch.logsumexp(logits.float(), -1) - target).mean()
    bf16_lse = (torch.logsumexp(logits, -1).float() - target).mean()
    tol = 1e-5 * ref.abs()  # float32 sums of N terms of ~50
    assert loss.dtype == torch.float32 and (loss - ref).abs() <= tol, (loss, ref)
    assert (bf16_lse - ref).abs() > 10 * tol, (bf16_lse, ref)  # the test sees a bf16 log-sum-exp


@pytest.mark.parametrize("param_dtype,autocast", [(torch.bfloat16, False), (torch.float32, True)],
                         ids=["bf16", "fp32-autocast"])
def test_the_chunked_loss_adds_each_chunk_to_the_float32_weight_gradient_in_place(param_dtype, autocast):
    """bf16 head GEMMs (bf16 weights, or float32 weights under autocast): the most tensor bytes the loss's backward
    holds (tests/audit.py ``LiveBytes``) are the float32 weight-gradient sum, one [V, D] in bf16 (the gradient
    returned for a bf16 weight, or a float32 weight's bf16 copy) and less than a few chunks' rows: no [V, D]
    product per chunk and its float32 copy (6 bytes per weight element more). The chunks' products are summed in
    float32 without rounding each to bf16 first: the float32 weight's gradient equals one chunk's to float32
    summation order, and the float64 reference to bf16 rounding."""
    from models.loss import _add_product_

    g = torch.Generator().manual_seed(0)
    N, D, V, chunk = 64, 512, 2048, 16
    h0, w0 = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / D**0.5  # logits ~ N(0, 1)
    t = torch.randint(0, V, (N,), generator=g)

    def backward(dtype, chunk_tokens, autocast):
        h = h0.to(dtype, copy=True).requires_grad_()
        w = torch.nn.Parameter(w0.to(dtype, copy=True))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head_loss(h, w, t, chunk_tokens)
        with LiveBytes() as live:
            loss.backward()
        return live.peak, w.grad

    peak, grad_w = backward(param_dtype, chunk, autocast)
    assert peak < V * D * (4 + 2) + 24 * chunk * V + 4 * N * D, peak / (V * D)  # before: 10.2 x V*D (bf16)
    _, ref = backward(torch.float64, 0, False)
    bf16 = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(grad_w.double(), ref, rtol=0, atol=2 * bf16 * ref.abs().max().item())
    if param_dtype == torch.float32:
        _, one_chunk = backward(param_dtype, N, autocast)
        atol = N // chunk * torch.finfo(torch.float32).eps * one_chunk.abs().max().item()
        torch.testing.assert_close(grad_w, one_chunk, rtol=0, atol=atol)  # before: 3.5e-3 of the largest entry
    # the CUDA branch: a bf16 GEMM accumulating into the float32 sum (addmm with out_dtype), as torch's meta
    # kernels (its shape and dtype rules) take it
    acc = torch.zeros(V, D, device="meta")
    rows = torch.empty(chunk, V, device="meta", dtype=torch.bfloat16), torch.empty(chunk, D, device="meta",
                                                                                     dtype=torch.bfloat16)
    assert _add_product_(acc, rows[0].T, rows[1]) is acc and acc.dtype == torch.float32


def test_the_moe_combine_keeps_the_expert_outputs_in_bf16_and_sums_in_float32():
    """The combine of the top-k expert outputs (models/moe.py ``_Combine``) sums in float32: the float64 sum of
    the same bf16 rows and float32 weights to float32 rounding, and so are its gradients (the rows' rounded to
    bf16). It keeps the rows for backward in bf16: a bf16 MoE layer keeps exactly the planner's bytes
    (parallel/plan_activations.py ``moe_items``, 2 bytes per element of the [T*K, D] expert outputs, where
    autograd of the plain float32 ops kept a float32 copy and the weighted rows, 8), and its output and gradients
    equal a float64 copy's to bf16 rounding."""
    import copy

    from models import ModelConfig, MoE
    from models.moe import _Combine
    from parallel.plan_activations import moe_items
    from tests.test_model import TINY

    g = torch.Generator().manual_seed(0)
    T, K, D = 48, 2, 64
    token_of = torch.arange(T).repeat_interleave(K)[torch.randperm(T * K, generator=g)]
    y = torch.randn(T * K, D, generator=g).bfloat16().requires_grad_()
    w = torch.rand(T * K, generator=g).requires_grad_()
    grad_out = torch.randn(T, D, generator=g)
    out = _Combine.apply(y, w, token_of, T)
    out.backward(grad_out)
    y64, w64 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.zeros(T, D, dtype=torch.float64).index_add_(0, token_of, y64 * w64[:, None])
    ref.backward(grad_out.double())
    f32, bf16 = torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps
    assert out.dtype == torch.float32 and y.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=K * f32 * ref.abs().max().item())
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=0, atol=D * f32 * w64.grad.abs().max().item())
    torch.testing.assert_close(y.grad.double(), y64.grad, rtol=bf16, atol=0)

    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "dim": 64, "moe_inter_dim": 32, "n_shared_experts": 1})
    moe = MoE(cfg)
    moe.gate.init_weights(1.0)
    moe.experts.init_weights(0.1, 0.1)
    moe64, moe = copy.deepcopy(moe).double(), moe.bfloat16()
    x = torch.randn(2, 32, cfg.dim).bfloat16().requires_grad_()
    saved, y_moe = saved_bytes(moe, x)
    planned = sum(item.nbytes for item in moe_items("l1", cfg, x.shape[0] * x.shape[1], 1, 1, 2, 2))
    # + the layer's input, which the shared experts keep (the planner counts it with the norm)
    assert saved == planned + x.nbytes
    grad = torch.randn(y_moe.shape)
    y_moe.backward(grad.bfloat16())
    x64 = x.detach().double().requires_grad_()
    y64 = moe64(x64)
    y64.backward(grad.double())
    for a, b in [(y_moe, y64), (x.grad, x64.grad), *zip((p.grad for p in moe.experts.parameters()),
                                                         (p.grad for p in moe64.experts.parameters()))]:
        torch.testing.assert_close(a.double(), b, rtol=0, atol=4 * bf16 * b.abs().max().item())


def test_a_run_with_the_chunked_loss_follows_the_whole_logits_run(tmp_path):
    """configs/debug.yaml, 6 steps, 1 process and pp=2: model.loss_chunk_tokens=100 gives the losses of the
    unchunked run (float32 rounding of the summed weight gradient only)."""
    from launch.trainer import Trainer, init_runtime
    from tests.test_train import debug_cfg

    losses = {}
    for chunk in (0, 100):
        cfg = debug_cfg(tmp_path / str(chunk), "--train.steps=6", "--train.eval_interval=3",
                        "--schedule.warmup_steps=1", f"--model.loss_chunk_tokens={chunk}")
        result = Trainer(cfg, init_runtime(cfg)).fit()
        losses[chunk] = ([result.losses[s] for s in range(1, 7)], result.val_losses)
    assert losses[100][0] == pytest.approx(losses[0][0], rel=1e-5)
    assert losses[100][1] == pytest.approx(losses[0][1], rel=1e-5)


# ------------------------------------------------------------------------------------------------ recompute, FP8, offload
from launch.trainer import Trainer, init_runtime  # noqa: E402
from tests.test_train import debug_cfg  # noqa: E402

# the chunked loss, so the [tokens, vocab] log-probabilities do not swamp the blocks' activations
MLA_MOE = ["--model.n_layers=3", "--model.q_lora_rank=32", "--train.steps=3", "--train.eval_interval=0",
           "--schedule.warmup_steps=1", "--data.grad_accum=2", "--optim.qk_clip_tau=0.05", "--model.loss_chunk_tokens=64",
           "--model.dim=128", "--data.micro_batch_size=8"]


def one_step(tmp_path, *overrides):
    """A trainer's first step: the update of every parameter, the max logits and router loads; and the bytes
    autograd keeps on the device (and on the host with offload) for one more forward."""
    cfg = debug_cfg(tmp_path, *MLA_MOE, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    params = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}  # the step's update
    stats = ([a.self_attn.max_logits_H.clone() for a in trainer.model.layers],
             [r.expert_load_E.clone() for r in trainer.model.moe_routers()])
    inputs, targets = trainer.loader.next_batch()
    with SavedBytes(trainer.model) as saved:
        loss = trainer.model(inputs, targets)
    loss.backward()
    return params, stats, saved.device, saved.host


@pytest.fixture(scope="module")
def plain_step(tmp_path_factory):
    return one_step(tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("overrides", [
    ["--parallel.recompute=full"],
    ["--parallel.recompute=selective"],
    *[["--parallel.recompute=selective", f"--parallel.recompute_modules=[{m}]"]
      for m in ("norm", "swiglu", "mla_up_proj", "moe_down_proj")],
], ids=["full", "selective", "norm", "swiglu", "mla_up_proj", "moe_down_proj"])
def test_recompute_gives_bitwise_the_step_of_the_plain_model_and_keeps_less(tmp_path, plain_step, overrides):
    """float32: every recompute module, all of them and full recompute give bitwise the update of a step of the
    plain model, record the same max logits and router loads (once: the probe is not re-run), and keep fewer
    bytes for backward."""
    params, stats, device_bytes, host = one_step(tmp_path, *overrides)
    ref_params, ref_stats, ref_bytes, _ = plain_step
    assert all(torch.equal(params[n], ref_params[n]) for n in ref_params)
    assert all(torch.equal(a, b) for a, b in zip(stats[0] + stats[1], ref_stats[0] + ref_stats[1]))
    assert device_bytes < ref_bytes and host == 0, (device_bytes, ref_bytes)


@pytest.mark.parametrize("overrides", [[], ["--parallel.recompute=selective"], ["--parallel.recompute=full"],
                                       ["--parallel.recompute=selective",
                                        "--parallel.fp8_activations=[moe_up_input, swiglu_input]"]],
                         ids=["plain", "selective", "full", "selective+fp8"])
def test_activation_offload_moves_what_blocks_keep_to_the_host_with_bitwise_the_same_step(tmp_path, overrides):
    """The bytes a run keeps for backward are split between the device and the host, none lost or doubled
    (device + host = the run without offload; FP8 tiles travel too), most of them on the host, and the step is
    bitwise the same."""
    params, stats, device_bytes, _ = one_step(tmp_path / "on_device", *overrides)
    params_off, stats_off, device_off, host = one_step(tmp_path / "offload", *overrides,
                                                       "--parallel.activation_offload=true")
    assert all(torch.equal(params_off[n], params[n]) for n in params)
    assert all(torch.equal(a, b) for a, b in zip(stats_off[0] + stats_off[1], stats[0] + stats[1]))
    assert device_off + host == device_bytes and host > 0.3 * device_bytes, (device_off, host, device_bytes)


@pytest.mark.parametrize("overrides", [
    ["--parallel.recompute=selective"], ["--parallel.recompute=full"],
    ["--parallel.fp8_activations=[moe_up_input, swiglu_input]"],
    ["--parallel.recompute=selective", "--parallel.fp8_activations=[moe_up_input, swiglu_input]",
     "--parallel.activation_offload=true"],
], ids=["selective", "full", "fp8", "selective+fp8+offload"])
def test_a_technique_changes_what_stays_alive_after_forward_by_what_autograd_keeps(tmp_path, overrides):
    """The tensor bytes a forward leaves alive (tests/audit.py ``LiveBytes``) differ from the plain model's by what
    autograd keeps (``SavedBytes``) and nothing else: a technique's bytes are really let go, not just counted (FP8
    storage once kept each original beside its tiles: autograd holds the pack hook, and the hook held them);
    activation offload's host copies live in its arena's chunks (muonclip/host_arena.py)."""
    kept = {}
    for name, extra in (("plain", []), ("technique", overrides)):
        cfg = debug_cfg(tmp_path / name, *MLA_MOE, *extra)
        trainer = Trainer(cfg, init_runtime(cfg))
        inputs, targets = trainer.loader.next_batch()
        with LiveBytes() as live, SavedBytes(trainer.model) as saved:
            loss = trainer.model(inputs, targets)  # held: its graph keeps what autograd saved
        offload = getattr(trainer.model, "activation_offload", None)
        host = saved.host if offload is None else offload.arena.reserved  # host copies are ranges of its chunks
        kept[name] = (live.current, saved.device + saved.host, saved.device + host)
        del loss
    assert kept["technique"][1] < kept["plain"][1]
    assert kept["technique"][0] - kept["technique"][2] == kept["plain"][0] - kept["plain"][2], kept


def test_offloaded_activations_come_back_two_blocks_at_a_time_and_go_once_backward_used_them(tmp_path):
    """Backward of 6 blocks with activation offload: the tensors it brings back (and their host copies) are let
    go as soon as the nodes that saved them have run, so at its high point backward holds what it holds without
    offload plus at most two blocks brought back (the one running and the one prefetched): less than half of
    what was offloaded (holding every block brought back until the micro batch's backward ends, as a queue of
    copies once did, adds all of it)."""
    peaks = {}
    for offload in (False, True):
        cfg = debug_cfg(tmp_path / str(offload), *MLA_MOE, "--model.n_layers=6",
                        f"--parallel.activation_offload={str(offload).lower()}")
        trainer = Trainer(cfg, init_runtime(cfg))
        inputs, targets = trainer.loader.next_batch()
        with SavedBytes(trainer.model) as saved:
            loss = trainer.model(inputs, targets)
        with LiveBytes() as live:  # what backward makes (the gradients, what offload brings back), at its most
            loss.backward()
        peaks[offload] = live.peak
    assert saved.host > 0 and peaks[True] - peaks[False] < 0.5 * saved.host, (peaks, saved.host)


def test_fp8_tiles_round_each_element_within_e4m3s_spacing_of_its_tile_scale():
    """1 x 128 tiles along the last dimension (200 = one full tile + a zero-padded one), float32 scales amax/448:
    every element within 2^-4 of itself (3 mantissa bits) or 2^-10 of its tile scale (E4M3's subnormal spacing),
    an all-zero tile exact, the shape and dtype back, 1 byte per element + 4 per tile stored."""
    from parallel.fp8_storage import TILE, dequantize, quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 200, generator=g) * torch.logspace(-6, 3, 5)[None, :, None]  # magnitudes 1e-6 .. 1e3
    x[0, 0, :128] = 0
    x[1, 2, 7] = 1e4  # one large element: its tile's scale follows it, nothing clipped
    for dtype in (torch.float32, torch.bfloat16):
        t = x.to(dtype)
        q = quantize(t)
        back = dequantize(q)
        assert back.shape == t.shape and back.dtype == dtype
        assert q.data.dtype == torch.float8_e4m3fn and q.nbytes == 15 * 2 * TILE + 15 * 2 * 4
        scale = q.scale.repeat_interleave(TILE, -1)[:, :200].reshape(t.shape)
        ref = t.float()
        err = (back.float() - ref).abs()
        bound = ref.abs() * 2**-4 + scale * 2**-10 + (ref.abs() * 2**-8 if dtype == torch.bfloat16 else 0)
        assert (err <= bound * (1 + 1e-6)).all(), (err - bound).max()
        assert torch.equal(back[0, 0, :128], t[0, 0, :128])
        assert back[1, 2, 7] == t[1, 2, 7]  # the tile maximum maps to 448 exactly


def test_selective_mla_up_proj_recompute_gives_bitwise_the_gradients_under_bf16_autocast():
    """bf16 autocast over float32 parameters (backward runs outside autocast): ``mla_up_proj`` rebuilds q, k and v
    in backward under the forward's autocast, so every gradient is bitwise that of the plain model; and it keeps
    fewer bytes for backward (the recomputation really ran)."""
    import copy

    from models import ModelConfig, Transformer
    from parallel.recompute import apply_recompute
    from tests.test_model import TINY

    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**{**TINY, "attn_type": "mla", "q_lora_rank": 12}))
    recomputed = copy.deepcopy(plain)
    apply_recompute(recomputed, "selective", ["mla_up_proj"])
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    grads, kept = [], []
    for model in (plain, recomputed):
        with torch.autocast("cpu", dtype=torch.bfloat16), SavedBytes(model) as saved:
            loss = model(x, y)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        kept.append(saved.device)
    assert grads[1].keys() == grads[0].keys() and any("q_b_proj" in n for n in grads[0])
    assert all(torch.equal(grads[1][n], grads[0][n]) for n in grads[0])
    assert kept[1] < kept[0], kept


def test_a_weight_cast_to_bf16_and_transposed_by_autocast_is_a_weight_not_an_activation():
    """Under bf16 autocast F.linear saves its float32 weight cast to bf16 and then transposed (two autograd nodes
    between the saved tensor and the parameter): the region helper sees a weight there, so FP8 storage leaves it
    alone (the input's gradient, which reads only the weight, is bitwise that without FP8) and activation offload
    moves only the input's bf16 cast to the host, not the weight."""
    from parallel.activation_offload import ActivationOffload
    from parallel.fp8_storage import fp8_saved
    from parallel.regions import is_weight, param_storages

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(8, 256, requires_grad=True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(x)
    (weight,), (x_cast,) = [t for t in saved if t.shape == (256, 256)], [t for t in saved if t.shape == (8, 256)]
    cast = weight.grad_fn.next_functions[0][0]
    assert type(weight.grad_fn).__name__ == "TBackward0" and type(cast).__name__ == "ToCopyBackward0"
    assert cast.next_functions[0][0].variable is lin.weight and weight.dtype == torch.bfloat16
    assert is_weight(weight, param_storages(lin)) and not is_weight(x_cast, param_storages(lin))

    def grad_x(forward):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x)
        y.float().square().sum().backward()
        return x.grad.clone()

    plain = grad_x(lin.forward)
    assert torch.equal(grad_x(fp8_saved(lin, lin.forward)), plain)
    offload = ActivationOffload(min_bytes=0)
    offload.attach(lin)
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert offload.host_bytes == x.numel() * 2, offload.host_bytes  # the bf16 input only
    y.float().square().sum().backward()
    assert torch.equal(x.grad, plain)


def test_offload_has_fetched_the_block_before_when_a_blocks_backward_starts():
    """Activation offload over 4 blocks, every fetch from the host and every tensor handed back to backward
    recorded in order: when backward takes block i's first saved tensor, every storage block i-1 offloaded has
    been requested (prefetched while block i runs) and nothing of block i-2 yet (two blocks back at a time); each
    storage is fetched once."""
    from models import ModelConfig, Transformer
    from parallel.activation_offload import ActivationOffload
    from tests.test_model import TINY

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "n_layers": 4}))
    offload = ActivationOffload(min_bytes=0)
    for block in model.layers:
        offload.attach(block)
    events = []
    fetch, unpack = offload._fetch, offload.unpack

    def recorded_fetch(copy):
        events.append(("fetch", copy.block_call, copy.index))
        fetch(copy)

    def recorded_unpack(packed):
        out = unpack(packed)
        events.append(("use", packed.copy.block_call, packed.copy.index))
        return out

    offload._fetch, offload.unpack = recorded_fetch, recorded_unpack
    loss = model(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16)))
    by_block = {b: {c.index for c in offload._copies if c.block_call == b} for b in range(1, 5)}
    assert all(by_block.values())
    loss.backward()
    fetched = [(b, i) for kind, b, i in events if kind == "fetch"]
    assert len(fetched) == len(set(fetched)) == sum(map(len, by_block.values()))
    starts = {}
    for n, (kind, b, _) in enumerate(events):
        if kind == "use":
            starts.setdefault(b, n)
    assert sorted(starts, reverse=True) == list(starts) == [4, 3, 2, 1]
    for b, n in starts.items():
        requested = {(bb, i) for kind, bb, i in events[:n] if kind == "fetch"}
        if b > 1:
            assert {(b - 1, i) for i in by_block[b - 1]} <= requested, f"block {b} started, block {b - 1} not requested"
        assert not any(bb <= b - 2 for bb, _ in requested), f"block {b} started, block {b - 2} already back"


def test_fp8_tile_scales_map_each_tiles_largest_element_to_448():
    """float8_e4m3fn (largest finite 448): each 1 x 128 tile's scale is its amax / 448, so its largest-magnitude
    element is stored as exactly +-448 (its sign), whatever the tile's magnitude; an all-zero tile stays zero."""
    import torch.nn.functional as F

    from parallel.fp8_storage import TILE, quantize

    assert torch.finfo(torch.float8_e4m3fn).max == 448
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 300, generator=g) * torch.logspace(-5, 4, 6)[None, :, None]  # 2 full tiles + 44
    x[0, 1, :128] = 0
    for dtype in (torch.float32, torch.bfloat16):
        q = quantize(x.to(dtype))
        tiles = F.pad(x.to(dtype).float().reshape(-1, 300), (0, 84)).view(-1, 3, TILE)
        peak = tiles.abs().argmax(-1, keepdim=True)
        nonzero = tiles.abs().amax(-1) > 0
        assert nonzero.sum() == 12 * 3 - 1
        stored = q.data.float().gather(-1, peak)[..., 0]
        assert torch.equal(stored[nonzero], 448 * tiles.gather(-1, peak)[..., 0].sign()[nonzero])
        assert torch.equal(q.data.float().abs().amax(-1)[nonzero], torch.full((35,), 448.0))
        assert torch.equal(q.scale[nonzero], tiles.abs().amax(-1)[nonzero] / 448)
        assert not q.data.float()[~nonzero].any()


def _gradients(tmp_path, *overrides):
    cfg = debug_cfg(tmp_path, *MLA_MOE, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    inputs, targets = trainer.loader.next_batch()
    loss = trainer.model(inputs, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_fp8_storage_changes_only_the_gradients_slightly_and_keeps_fewer_bytes(tmp_path, plain_step):
    """FP8 storage of the routed experts' input rows and of the SwiGLU inputs: the forward is unchanged (the same
    loss, max logits and router loads), the gradients of the layers that read FP8 activations differ from the
    plain ones by a few percent of their norm at most (3 mantissa bits), and fewer bytes are kept; with selective
    recomputation the SwiGLU's recomputation inputs are stored in FP8 too."""
    points = "--parallel.fp8_activations=[moe_up_input, swiglu_input]"
    loss, grads = _gradients(tmp_path / "plain_grads")
    loss8, grads8 = _gradients(tmp_path / "fp8_grads", points)
    assert torch.equal(loss8, loss) and grads8.keys() == grads.keys()
    errors = {n: float((grads8[n] - grads[n]).norm() / grads[n].norm()) for n in grads}
    assert max(errors.values()) < 0.05 and errors["layers.2.mlp.experts.gate_proj"] > 0, errors
    _, ref_stats, ref_bytes, _ = plain_step
    _, stats, device_bytes, _ = one_step(tmp_path / "fp8", points)
    assert all(torch.equal(a, b) for a, b in zip(stats[0] + stats[1], ref_stats[0] + ref_stats[1]))
    assert device_bytes < 0.85 * ref_bytes, (device_bytes, ref_bytes)
    _, _, selective, _ = one_step(tmp_path / "sel", "--parallel.recompute=selective")
    _, _, selective_fp8, _ = one_step(tmp_path / "sel_fp8", "--parallel.recompute=selective", points)
    assert selective_fp8 < 0.85 * selective, (selective_fp8, selective)


# ------------------------------------------------------------------------------------------------ with parallelism
def _wire_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    from pathlib import Path

    from tests.audit import WireAudit

    torch.set_num_threads(1)
    cfg = debug_cfg(out, *MLA_MOE, "--train.steps=4", *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    losses = [trainer.train_step().loss_t]
    with WireAudit() as wire:
        losses.append(trainer.train_step().loss_t)
    torch.save({"calls": [(r.call, r.dtype, r.numel) for r in wire.records], "losses": torch.stack(losses),
                "params": {n: p.detach() for n, p in trainer.model.named_parameters()}}, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("layout", [["--data.micro_batch_size=4", "--parallel.ep=2"], ["--parallel.tp=2"]],
                         ids=["dp2-ep2", "tp2"])
def test_recompute_repeats_no_collective_and_gives_bitwise_the_same_run_under_ep_and_tp(tmp_path, layout):
    """Full recompute runs every block's forward again in backward, but its expert-parallel all-to-alls (rows and
    counts) and tensor-parallel all-reduces are not sent again: the recomputation gets their forward's results
    back. Every collective of a step, call by call, is the one of the run without recompute, and the losses and
    parameters are bitwise equal; selective recompute likewise."""
    from tests.dist_utils import run_distributed

    runs = {}
    for mode in ("none", "full", "selective"):
        run_distributed(_wire_worker, 2, str(tmp_path / mode), [*layout, f"--parallel.recompute={mode}"])
        runs[mode] = [torch.load(tmp_path / mode / f"rank{r}.pt") for r in range(2)]
    for mode in ("full", "selective"):
        for plain, other in zip(runs["none"], runs[mode]):
            assert other["calls"] == plain["calls"], mode
            assert torch.equal(other["losses"], plain["losses"])
            assert all(torch.equal(other["params"][n], p) for n, p in plain["params"].items())
    kinds = {call for call, _, _ in runs["none"][0]["calls"]}
    assert ("all_to_all_single" if "--parallel.ep=2" in layout else "all_reduce") in kinds


CP_RECOMPUTE = {"none": [], "full": ["--parallel.recompute=full"],
                "mla_up_proj": ["--parallel.recompute=selective", "--parallel.recompute_modules=[mla_up_proj]"]}


def _cp_recompute_worker(rank: int, world: int, out: str) -> None:
    from pathlib import Path

    from tests.audit import WireAudit

    torch.set_num_threads(1)
    results = {}
    for name, setting in CP_RECOMPUTE.items():
        cfg = debug_cfg(Path(out) / name, *MLA_MOE, "--parallel.cp=2", *setting)
        trainer = Trainer(cfg, init_runtime(cfg))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        with WireAudit() as wire:
            trainer.train_step()
        inputs, targets = trainer.loader.next_batch()
        with LiveBytes() as live, SavedBytes(trainer.model) as saved:
            loss = trainer.model(inputs, targets)
        results[name] = {
            "update": {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()},
            "max_logits": [a.self_attn.max_logits_H.clone() for a in trainer.model.layers],
            "saved": saved.device + saved.host, "kept_beside": live.current - saved.device - saved.host,
            "all_to_all": sum(r.numel * r.dtype.itemsize for r in wire.records if r.call == "all_to_all_single")}
        loss.backward()
        trainer.close()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_mla_up_proj_under_context_parallelism_keeps_less_than_no_recompute_as_planned(tmp_path):
    """cp=2: ``mla_up_proj`` drops the q, k, v attention keeps after the exchange over heads (rebuilt in backward,
    exchange included) and keeps fewer bytes than no recomputation (it once kept them and the latents too). What
    each recompute mode keeps for backward is the planner's, exactly, and so are the bytes full recompute keeps
    beside autograd's (the exchanges' results it hands back) and the all-to-all bytes of a step (the rebuilt q, k,
    v are sent again); the updates and max logits are bitwise those without recomputation (float32)."""
    from parallel.plan import plan_layout
    from tests.dist_utils import run_distributed

    run_distributed(_cp_recompute_worker, 2, str(tmp_path))
    for rank in range(2):
        runs = torch.load(tmp_path / f"rank{rank}.pt")
        plans = {name: plan_layout(debug_cfg(tmp_path, *MLA_MOE, "--parallel.cp=2", *setting), 2)[rank]
                 for name, setting in CP_RECOMPUTE.items()}
        ref = runs["none"]
        assert runs["mla_up_proj"]["saved"] < ref["saved"], (runs["mla_up_proj"]["saved"], ref["saved"])
        for name, run in runs.items():
            plan = plans[name]
            assert all(torch.equal(run["update"][n], u) for n, u in ref["update"].items()), name
            assert all(torch.equal(a, b) for a, b in zip(run["max_logits"], ref["max_logits"])), name
            assert plan.saved_per_micro == run["saved"], (name, rank)
            replayed = plan.activations_per_micro + plan.activations_host_per_micro - plan.saved_per_micro
            assert run["kept_beside"] - ref["kept_beside"] == replayed, (name, rank)
            assert run["all_to_all"] == 2 * plan.comm["cp_all_to_all"], (name, rank)  # (cp-1)/cp leave the rank
