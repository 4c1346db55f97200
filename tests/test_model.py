"""Model behaviour: causal masking, expert paths, routing rules, max-logit probe, init, config checks."""
import math
import types

import pytest
import torch
import torch.nn.functional as F

from models import GroupedExperts, ModelConfig, MoE, Router, Transformer

TINY = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=64, moe_inter_dim=16,
            n_routed_experts=8, n_activated_experts=2, first_k_dense=1, max_seq_len=64)

VARIANTS = [dict(attn_type="mha", n_kv_heads=4), dict(attn_type="mha", n_kv_heads=2),
            dict(attn_type="mla", q_lora_rank=0), dict(attn_type="mla", q_lora_rank=12, n_expert_groups=4,
                                                        n_limited_groups=2, n_shared_experts=2, route_scale=2.5)]


def make(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **kw})).to(dtype)


def eager_attention_logits(attn, x_BTD):
    """Recompute pre-softmax logits with explicit matmuls, capturing q/k through the SDPA call."""
    captured = {}
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, is_causal, scale):
        captured["s"] = (q @ k.transpose(-1, -2)) * scale
        T = q.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        captured["out"] = torch.softmax(captured["s"].masked_fill(~mask, float("-inf")), -1) @ v
        captured["mask"] = mask
        return orig(q, k, v, is_causal=is_causal, scale=scale)

    F.scaled_dot_product_attention = spy
    try:
        y = attn(x_BTD)
    finally:
        F.scaled_dot_product_attention = orig
    return captured, y


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_and_max_logits(variant):
    model = make(**variant).train()
    tokens = torch.randint(0, 97, (2, 24))
    logits = model(tokens)
    changed = tokens.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 97
    logits2 = model(changed)
    # future tokens never leak into the past: equal up to float64 noise (changing the future changes the routing,
    # so how tokens are batched per expert and summed differs: ~1e-17 here; a leak is ~1e-2)
    torch.testing.assert_close(logits[:, :15], logits2[:, :15], rtol=0, atol=1e-12)
    assert not torch.allclose(logits[:, 15:], logits2[:, 15:])

    attn = model.layers[1].self_attn
    attn.reset_step_stats()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    cap, y = eager_attention_logits(attn, x)
    s = cap["s"].masked_fill(~cap["mask"], float("-inf"))
    expected_H = s.amax(dim=(0, 2, 3)).to(attn.max_logits_H.dtype)
    torch.testing.assert_close(attn.max_logits_H, expected_H, rtol=1e-6, atol=1e-6)
    assert attn.max_logits_H is attn.qk_clip_spec()["max_logits"]
    # SDPA output equals explicit softmax attention; MLA pads v to the q/k head dim (zeros, sliced off again)
    dv = getattr(attn, "dv", cap["out"].shape[-1])
    out = cap["out"][..., :dv]
    assert torch.equal(cap["out"][..., dv:], torch.zeros_like(cap["out"][..., dv:]))
    B, H, T, _ = out.shape
    torch.testing.assert_close(attn.o_proj(out.transpose(1, 2).reshape(B, T, H * dv)), y)
    # running max over calls; eval mode records nothing
    attn.eval()
    before = attn.max_logits_H.clone()
    attn(x * 3)
    assert torch.equal(attn.max_logits_H, before)


def test_grouped_experts_match_loop():
    """The grouped-GEMM path (float32, aligned rows; experts with no tokens included) equals the loop reference,
    outputs and gradients; float64 and unaligned shapes take the loop path."""
    torch.manual_seed(0)
    ex = GroupedExperts(6, 16, 24)
    ex.init_weights(0.1, 0.1)
    cpu = torch.device("cpu")
    assert ex.path(cpu, torch.float32) == ex.path(cpu, torch.bfloat16) == "grouped"
    assert ex.path(cpu, torch.float64) == GroupedExperts(2, 16, 6).path(cpu, torch.float32) == "loop"
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    ex.use_grouped = True
    y_g = ex(x, counts)
    g_grouped = torch.autograd.grad(y_g.square().sum(), [x, *ex.parameters()])
    ex.use_grouped = False
    y_l = ex(x, counts)
    g_loop = torch.autograd.grad(y_l.square().sum(), [x, *ex.parameters()])
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_grouped, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,capability,dtype,path", [
    ("cuda", (9, 0), torch.bfloat16, "grouped"),  # H100/H200: torch's one grouped-GEMM kernel, no host read
    ("cuda", (10, 0), torch.bfloat16, "grouped"),  # B200
    ("cuda", (9, 0), torch.float32, "loop"),  # torch's fallback: the offsets to the host in every grouped GEMM
    ("cuda", (9, 0), torch.float16, "loop"),
    ("cuda", (8, 0), torch.bfloat16, "loop"),  # A100
    ("cuda", (12, 0), torch.bfloat16, "loop"),  # sm120 has no grouped-GEMM kernel in torch
    ("cpu", None, torch.float32, "grouped"), ("cpu", None, torch.bfloat16, "grouped"),
    ("meta", None, torch.bfloat16, "grouped"), ("cpu", None, torch.float64, "loop"),
])
def test_the_expert_path_follows_the_device_capability_and_the_dtype(monkeypatch, device, capability, dtype, path):
    """Grouped GEMMs where they run without a host synchronisation (bf16 on sm90/sm100; CPU and meta in every
    dtype the kernel takes), else the loop, which reads the counts on the host once per forward instead of once
    per grouped GEMM; rows that are not 16-byte multiples take the loop everywhere. The module asks a CUDA
    device for its capability and nothing else."""
    from models.moe import expert_path

    assert expert_path(device, capability, dtype, (16, 24)) == path
    assert expert_path(device, capability, dtype, (16, 6)) == "loop"  # 6 x 2 or 4 bytes
    asked = []
    props = None if capability is None else types.SimpleNamespace(major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: asked.append(d) or props)
    assert GroupedExperts(6, 16, 24).path(torch.device(device), dtype) == path
    assert asked == ([torch.device(device)] if device == "cuda" else [])
    assert GroupedExperts(6, 16, 24, use_grouped=False).path(torch.device(device), dtype) == "loop"


def test_moe_forward_and_backward_read_nothing_on_the_host():
    """Routing, dispatch, grouped experts and combine run without a host synchronisation (no .item(), .tolist(),
    int(tensor), data-dependent output sizes): what lets the MoE layer run ahead on a GPU and compile."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    class NoHostReads(TorchDispatchMode):  # .item()/int()/bool() and data-dependent shapes; .tolist() below
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in syncing:
                raise AssertionError(f"host synchronisation in the MoE layer ({func})")
            return func(*args, **(kwargs or {}))

        def __enter__(self):
            self._tolist = torch.Tensor.tolist
            torch.Tensor.tolist = lambda t: (_ for _ in ()).throw(AssertionError("host synchronisation (.tolist())"))
            return super().__enter__()

        def __exit__(self, *exc):
            torch.Tensor.tolist = self._tolist
            return super().__exit__(*exc)

    torch.manual_seed(0)
    moe = MoE(ModelConfig(**{**TINY, "dim": 32, "moe_inter_dim": 16, "n_routed_experts": 8}))
    moe.gate.init_weights(1.0)
    moe.experts.init_weights(0.1, 0.1)
    x = torch.randn(2, 24, 32, requires_grad=True)
    assert moe.experts.path(x.device, x.dtype) == "grouped"
    with NoHostReads():
        y = moe(x)
        y.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in moe.experts.parameters())
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostReads():  # the mode does see them
        moe.experts.use_grouped = False
        moe(x)


def test_moe_matches_dense_reference():
    """Routed output equals sum_k w_k * expert_k(x) computed token by token, plus shared experts."""
    model = make(attn_type="mla", n_expert_groups=4, n_limited_groups=2, n_shared_experts=1, route_scale=1.7)
    moe = model.layers[2].mlp
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    out = moe(x)
    x_TD = x.reshape(-1, 32)
    idx, w, _, _ = moe.gate(x_TD)
    ref = moe.shared_experts(x_TD).clone()
    ex = moe.experts
    for t in range(x_TD.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            h = F.silu(ex.gate_proj[e] @ x_TD[t]) * (ex.up_proj[e] @ x_TD[t])
            ref[t] += w[t, k].double() * (ex.down_proj[e] @ h)
    torch.testing.assert_close(out.reshape(-1, 32), ref, rtol=1e-6, atol=1e-6)


def test_router_group_limit_bias_and_weights():
    cfg = ModelConfig(**{**TINY, "n_expert_groups": 4, "n_limited_groups": 2, "n_activated_experts": 3,
                         "route_scale": 2.0})
    torch.manual_seed(1)
    r = Router(cfg)
    r.init_weights(1.0)
    x = torch.randn(64, 32)
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.randn(8))
    idx, w, counts, _ = r(x)
    scores = torch.sigmoid(x @ r.weight.T)
    choice = scores + r.e_score_correction_bias
    groups = choice.view(64, 4, 2).topk(2, -1).values.sum(-1).topk(2, -1).indices
    assert all(set((idx[t] // 2).tolist()) <= set(groups[t].tolist()) for t in range(64))
    # weights come from unbiased scores, normalised then scaled
    torch.testing.assert_close(w, scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True) * 2.0)
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=8)) and counts.dtype == torch.int64
    assert torch.equal(r.expert_load_E, counts.float())


def test_bias_update_rule():
    cfg = ModelConfig(**{**TINY, "bias_update_speed": 0.01})
    r = Router(cfg)
    load = torch.tensor([10.0, 0, 5, 5, 5, 5, 5, 5])
    r.update_bias(load)
    expected = 0.01 * torch.sign(load.mean() - load)
    assert torch.equal(r.e_score_correction_bias.data, expected)
    assert not r.e_score_correction_bias.requires_grad


def test_bias_balances_a_skewed_router():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "bias_update_speed": 0.05})
    r = Router(cfg)
    r.init_weights(0.5)
    with torch.no_grad():
        r.weight[0] += 2.0  # expert 0 wins almost everywhere
    x = torch.randn(512, 32).abs()
    def imbalance():
        r.reset_step_stats()
        r(x)
        return (r.expert_load_E.max() / r.expert_load_E.mean()).item()
    start = imbalance()
    for _ in range(100):
        imbalance()
        r.update_bias(r.expert_load_E)
    assert imbalance() < 0.5 * start


def test_meta_init_matches_eager_init():
    cfg = ModelConfig(**TINY)
    eager = Transformer(cfg)
    torch.manual_seed(3)
    eager.init_weights()  # init_weights() alone defines the initial state, whatever ran before it
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    for (n, a), (_, b) in zip(eager.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), n
    assert all(torch.isinf(s["max_logits"]).all() for s in meta.qk_clip_specs())


def test_param_names_and_shapes():
    model = make(attn_type="mla", q_lora_rank=12, dtype=torch.float32)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    H, dn, dr, dv = 4, 8, 4, 8
    assert shapes["layers.0.self_attn.q_b_proj.weight"] == (H * (dn + dr), 12)
    assert shapes["layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (16 + dr, 32)
    assert shapes["layers.0.self_attn.kv_b_proj.weight"] == (H * (dn + dv), 16)
    assert shapes["layers.0.mlp.gate_proj.weight"] == (64, 32)
    assert shapes["layers.1.mlp.experts.gate_proj"] == (8, 16, 32)
    assert shapes["layers.1.mlp.experts.down_proj"] == (8, 32, 16)
    assert shapes["layers.1.mlp.gate.e_score_correction_bias"] == (8,)
    assert len(model.moe_routers()) == 2 and len(model.qk_clip_specs()) == 3


@pytest.mark.parametrize("bad, msg", [
    (dict(attn_type="gqa"), "attn_type"), (dict(attn_type="mha", n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(n_routed_experts=8, n_expert_groups=3), "divisible"), (dict(n_activated_experts=9), "n_activated_experts"),
    (dict(first_k_dense=5), "first_k_dense"), (dict(qk_rope_head_dim=5), "even"),
    (dict(n_expert_groups=4, n_limited_groups=1, n_activated_experts=3), "n_limited_groups"),
    (dict(attention_impl="flash"), "attention_impl must be 'sdpa' or 'flex'"),
])
def test_config_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**{**TINY, **bad})


def test_flex_attention_is_refused_off_cuda():
    model = make(dtype=torch.float32, attention_impl="flex")
    with pytest.raises(ValueError, match="attention_impl: flex needs CUDA"):
        model(torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention's max scores need CUDA "
                    "(benchmarks/gpu_check.sh runs this test when a GPU is lent)")
@pytest.mark.parametrize("variant", VARIANTS[1:3])  # GQA and MLA (v narrower than q/k)
def test_flex_attention_matches_sdpa_and_the_probe_on_cuda(variant):
    """attention_impl flex: the same logits, max logits and gradients as SDPA + the float32 probe (float32)."""
    ref = make(dtype=torch.float32, **variant).cuda().train()
    flex = make(dtype=torch.float32, attention_impl="flex", **variant).cuda().train()
    flex.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 97, (2, 48), device="cuda")
    for model in (ref, flex):
        model.reset_step_stats()
        model(tokens).float().pow(2).mean().backward()
    torch.testing.assert_close(flex(tokens), ref(tokens), rtol=1e-4, atol=1e-4)
    for a_ref, a_flex in zip(ref.layers, flex.layers):
        torch.testing.assert_close(a_flex.self_attn.max_logits_H, a_ref.self_attn.max_logits_H, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(a_flex.self_attn.max_logits_H).all()
    for (name, p_ref), p_flex in zip(ref.named_parameters(), flex.parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p_flex.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_sequence_too_long():
    model = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    assert math.isfinite(model(torch.zeros(1, 64, dtype=torch.long)).sum().item())


def test_router_and_max_logit_probe_stay_float32_under_bf16_autocast():
    """models/moe.py and models/layers.py promise float32 routing and max logits; bf16 autocast must not change them."""
    from models.layers import causal_max_logits

    torch.manual_seed(0)
    router = Router(ModelConfig(**{**TINY, "dim": 64, "n_routed_experts": 8}))
    router.init_weights(1.0)
    x = torch.randn(256, 64)
    q, k = torch.randn(2, 4, 64, 32), torch.randn(2, 4, 64, 32)
    idx, w, _, _ = router(x)
    probe = causal_max_logits(q, k, 0.17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_ac, w_ac, _, _ = router(x)
        probe_ac = causal_max_logits(q, k, 0.17)
    assert w_ac.dtype == torch.float32 and torch.equal(w_ac, w) and torch.equal(idx_ac, idx)
    assert probe_ac.dtype == torch.float32 and torch.equal(probe_ac, probe)


@pytest.mark.parametrize("theta,mscale,mscale_all_dim", [(50000.0, 1.0, 1.0), (10000.0, 1.0, 0.0), (10000.0, 0.707, 1.0)],
                         ids=["kimi-k2", "no-all-dim", "deepseek-v3-ish"])
def test_yarn_frequencies_equal_transformers_at_the_released_context(theta, mscale, mscale_all_dim):
    """At the released models' original length (4096) and factor (40), where the ramp's ends are not whole
    dimensions (8.91 and 19.16 of 32 for theta 5e4), the frequencies and cos/sin scale are transformers'
    (the test configs' original lengths of 6-16 clamp both roundings to 0 and cannot tell)."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from models.layers import Yarn

    scaling = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
               "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    hf = DeepseekV3Config(qk_rope_head_dim=64, rope_theta=theta, max_position_embeddings=163840,
                          rope_scaling=scaling)
    inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    yarn = Yarn(40.0, 4096, 32.0, 1.0, mscale, mscale_all_dim)
    torch.testing.assert_close(yarn.inv_freq(64, theta, "cpu"), inv, rtol=0, atol=0)
    assert yarn.cos_sin_scale == pytest.approx(attention_factor, rel=1e-12)


def test_yarn_changes_the_frequencies_and_the_logit_scale_qk_clip_sees():
    """DeepSeek-V3-style YaRN: low frequencies interpolated by the factor, high ones kept, and the softmax scale
    (hence the max logits QK-Clip clips) multiplied by mscale(factor, mscale_all_dim)^2."""
    from models.layers import Yarn, rope_cos_sin

    base = dict(vocab_size=32, dim=32, n_layers=1, first_k_dense=1, n_heads=2, q_lora_rank=0, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8, max_seq_len=64, inter_dim=32)
    plain = Transformer(ModelConfig(**base)).layers[0].self_attn
    yarn_cfg = ModelConfig(**base, yarn_factor=4.0, yarn_original_max_seq_len=16, yarn_mscale=1.0,
                           yarn_mscale_all_dim=1.0)
    scaled = Transformer(yarn_cfg).layers[0].self_attn
    assert scaled.scale == pytest.approx(plain.scale * (0.1 * math.log(4.0) + 1) ** 2)
    yarn = Yarn.from_config(yarn_cfg)
    inv = yarn.inv_freq(16, 10000.0, "cpu")
    plain_inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2) / 16)
    assert torch.allclose(inv[0], plain_inv[0]) and torch.allclose(inv[-1], plain_inv[-1] / 4.0)  # kept / divided
    cos, _ = rope_cos_sin(8, 16, 10000.0, "cpu", yarn=yarn)
    assert torch.allclose(cos[0], torch.ones(8))  # mscale == mscale_all_dim: cos/sin unscaled
    assert Yarn.from_config(ModelConfig(**base)) is None


def _seq_aux_reference(x_TD, weight_ED, idx_TK, n_seqs, alpha):
    """DeepSeek-V3 eq. 17-20 written out per sequence and expert: alpha * sum_i f_i * P_i, mean over sequences."""
    E, K = weight_ED.shape[0], idx_TK.shape[1]
    T = x_TD.shape[0] // n_seqs
    total = 0.0
    for s in range(n_seqs):
        rows = slice(s * T, (s + 1) * T)
        scores = torch.sigmoid(x_TD[rows] @ weight_ED.T)
        normalised = scores / scores.sum(-1, keepdim=True)
        seq = 0.0
        for i in range(E):
            f_i = E / (K * T) * sum(int(i in idx_TK[t].tolist()) for t in range(s * T, (s + 1) * T))
            seq = seq + f_i * normalised[:, i].mean()
        total = total + seq
    return alpha * total / n_seqs


def test_sequence_wise_balance_loss_matches_deepseek_v3_and_reaches_the_gradients():
    """With seq_aux_loss_alpha the training gradient is that of CE + sum over MoE layers of the balance loss
    (computed independently from each router's input and selection); eval adds nothing; off by default."""
    kw = dict(attn_type="mla", n_expert_groups=4, n_limited_groups=2, n_activated_experts=3, n_layers=3)
    model = make(seq_aux_loss_alpha=0.3, **kw).train()
    ref = make(**kw).train()
    ref.load_state_dict(model.state_dict())
    assert ref.cfg.seq_aux_loss_alpha == 0.0
    tokens = torch.randint(0, TINY["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(4))
    seen = []
    for router in ref.moe_routers():
        router.register_forward_hook(lambda mod, args, out: seen.append((args[0], mod.weight, out[0])))
    model(tokens).sum().backward()
    ref_aux = []
    out = ref(tokens)
    for x_TD, weight, idx_TK in seen:
        assert x_TD.shape[0] == 30
        ref_aux.append(_seq_aux_reference(x_TD, weight, idx_TK, 3, 0.3))
    (out.sum() + sum(ref_aux)).backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)
    router_grad = model.moe_routers()[0].weight.grad
    ref.zero_grad()
    ref(tokens).sum().backward()
    assert (router_grad - ref.moe_routers()[0].weight.grad).abs().max() > 1e-4  # the loss did change the gradient
    for router, aux in zip(model.moe_routers(), ref_aux):
        torch.testing.assert_close(router.seq_aux_loss_stat.float(), torch.stack([aux.detach().float(), torch.tensor(1.0)]))
    model.reset_step_stats()
    model.eval()
    with torch.no_grad():
        model(tokens)
    assert all(r.seq_aux_loss_stat.abs().sum() == 0 for r in model.moe_routers())
    with pytest.raises(ValueError, match="seq_aux_loss_alpha must be >= 0"):
        ModelConfig(seq_aux_loss_alpha=-1e-4)


def test_balance_loss_gradient_follows_the_aux_loss_scale():
    model = make(seq_aux_loss_alpha=0.3, attn_type="mla").train()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(5))
    grads = []
    for scale in (1.0, 0.25):
        model.zero_grad()
        model.set_aux_loss_scale(scale)
        (model(tokens).sum() * 0).backward()  # only the balance losses reach the router
        grads.append(model.moe_routers()[0].weight.grad.clone())
    torch.testing.assert_close(grads[1], 0.25 * grads[0])
    assert grads[0].abs().max() > 0
