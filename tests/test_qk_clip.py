"""QK-Clip: per-head weight rescaling on MHA/GQA/MLA models, reference parity, one collective, no host sync."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models
import muonclip
from muonclip.reference import reference_qk_clip
from tests.dist_utils import run_distributed

F64 = torch.float64


def _model(attn_type: str, n_kv_heads: int = 4, q_lora_rank: int = 0, n_layers: int = 2,
           first_k_dense: int = 2) -> models.Transformer:
    cfg = models.ModelConfig(vocab_size=64, dim=32, n_layers=n_layers, attn_type=attn_type, n_heads=4,
                             n_kv_heads=n_kv_heads, head_dim=8, q_lora_rank=q_lora_rank, kv_lora_rank=16,
                             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=48,
                             first_k_dense=first_k_dense, moe_inter_dim=16, n_routed_experts=4, max_seq_len=16)
    torch.manual_seed(0)
    model = models.Transformer(cfg).double().train()
    with torch.no_grad():  # blow up the logits, more for later heads, so some heads exceed tau and some do not
        for layer, spec in zip(model.layers, model.qk_clip_specs()):
            q, H = spec["q_weight"], spec["n_heads"]
            q.mul_(torch.linspace(20.0, 120.0, H, dtype=F64).repeat_interleave(q.shape[0] // H).unsqueeze(1))
            if attn_type == "mha":
                spec["k_weight"].mul_(30.0)
            else:
                spec["kv_b_weight"].mul_(30.0)
                layer.self_attn.kv_a_proj_with_mqa.weight.mul_(30.0)  # shared rotary key (and kv latent)
    return model


def _attention_inputs(model, tokens):
    """Each layer's attention input from one forward pass, plus the recorded max logits [L, H]."""
    inputs = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
             for layer in model.layers]
    model.reset_step_stats()
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return inputs, torch.stack([s["max_logits"].clone() for s in model.qk_clip_specs()])


def _max_logits_on(model, inputs):
    """Max logits of each attention layer on fixed inputs (so layer l does not see layer l-1's change)."""
    model.reset_step_stats()
    with torch.no_grad():
        for layer, x in zip(model.layers, inputs):
            layer.self_attn(x)
    return torch.stack([s["max_logits"].clone() for s in model.qk_clip_specs()])


def _tau_between(S_LH):
    s = S_LH.flatten().sort().values
    mid = s.numel() // 2
    assert s[mid] > 0 and s[mid - 1] < s[mid]
    return float((s[mid - 1] + s[mid]) / 2)


def _param_name(model, t):
    return next(n for n, p in model.named_parameters() if p is t)


def _rows_HRC(w, H):
    return w.detach().reshape(H, -1, w.shape[-1])  # head h -> its block of rows


@pytest.mark.parametrize("case", [("mha", 4, 0), ("mha", 2, 0), ("mla", 4, 0), ("mla", 4, 16)],
                         ids=["mha", "gqa", "mla", "mla_qlora"])
def test_qk_clip_on_model(case):
    """Clipped heads' max logit drops to tau on the same inputs; every other weight/head is bit-identical."""
    attn_type, n_kv, q_lora = case
    model = _model(attn_type, n_kv, q_lora)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs, S_LH = _attention_inputs(model, tokens)
    tau = _tau_between(S_LH)
    clipped_LH = S_LH > tau
    assert clipped_LH.any() and (~clipped_LH).any()
    before = copy.deepcopy(model.state_dict())
    expected = reference_qk_clip(model.qk_clip_specs(), tau)

    clip = muonclip.QKClip(model.qk_clip_specs(), tau=tau)
    clip()
    assert torch.equal(clip.last_max_logits, S_LH.float()) and clip.last_clipped.item() == clipped_LH.sum().item()

    after = model.state_dict()
    touched = set()
    close = dict(rtol=1e-6, atol=0)
    for i, (spec, ref) in enumerate(zip(model.qk_clip_specs(), expected)):
        for key, ref_w in ref.items():
            touched.add(_param_name(model, spec[key]))
            torch.testing.assert_close(spec[key].detach(), ref_w, **close)
        H = spec["n_heads"]
        g_H11 = torch.where(clipped_LH[i], tau / S_LH[i], torch.ones_like(S_LH[i]))[:, None, None]
        q, q_old = _rows_HRC(spec["q_weight"], H), _rows_HRC(before[_param_name(model, spec["q_weight"])], H)
        keep = ~clipped_LH[i]
        assert torch.equal(q[keep], q_old[keep])  # heads under tau: bit-identical rows
        if attn_type == "mha":
            k_name = f"layers.{i}.self_attn.k_proj.weight"
            if n_kv < H:  # GQA: q rows * gamma, shared keys untouched
                torch.testing.assert_close(q, q_old * g_H11, **close)
                assert torch.equal(after[k_name], before[k_name])
            else:  # MHA: q and k rows * sqrt(gamma)
                torch.testing.assert_close(q, q_old * g_H11.sqrt(), **close)
                k, k_old = _rows_HRC(after[k_name], H), _rows_HRC(before[k_name], H)
                torch.testing.assert_close(k, k_old * g_H11.sqrt(), **close)
        else:  # MLA: q_nope * sqrt(gamma), q_rope * gamma, k_nope * sqrt(gamma), v untouched
            dn = spec["qk_nope_head_dim"]
            torch.testing.assert_close(q[:, :dn], q_old[:, :dn] * g_H11.sqrt(), **close)
            torch.testing.assert_close(q[:, dn:], q_old[:, dn:] * g_H11, **close)
            kv_name = f"layers.{i}.self_attn.kv_b_proj.weight"
            kv, kv_old = _rows_HRC(after[kv_name], H), _rows_HRC(before[kv_name], H)
            torch.testing.assert_close(kv[:, :dn], kv_old[:, :dn] * g_H11.sqrt(), **close)
            assert torch.equal(kv[:, dn:], kv_old[:, dn:])
    for name, t in after.items():  # everything else (incl. MLA's shared rotary key kv_a_proj_with_mqa) untouched
        if name not in touched:
            assert torch.equal(t, before[name]), name

    S_after = _max_logits_on(model, inputs)
    torch.testing.assert_close(S_after[clipped_LH], torch.full_like(S_after[clipped_LH], tau), rtol=1e-5, atol=0)
    assert torch.equal(S_after[~clipped_LH], S_LH[~clipped_LH])


def _spec_mha(H, Hkv, hd, D, logits, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"kind": "mha", "q_weight": nn.Parameter(torch.randn(H * hd, D, generator=g).to(dtype)),
            "k_weight": nn.Parameter(torch.randn(Hkv * hd, D, generator=g).to(dtype)), "n_heads": H,
            "n_kv_heads": Hkv, "head_dim": hd, "max_logits": torch.tensor(logits, dtype=torch.float32)}


def _spec_mla(H, dn, dr, dv, logits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"kind": "mla", "q_weight": nn.Parameter(torch.randn(H * (dn + dr), 6, generator=g, dtype=F64)),
            "kv_b_weight": nn.Parameter(torch.randn(H * (dn + dv), 5, generator=g, dtype=F64)), "n_heads": H,
            "qk_nope_head_dim": dn, "qk_rope_head_dim": dr, "v_head_dim": dv,
            "max_logits": torch.tensor(logits, dtype=torch.float32)}


def _weights(specs):
    return [{k: s[k].detach().clone() for k in ("q_weight", "k_weight", "kv_b_weight") if k in s} for s in specs]


def test_matches_reference_with_uneven_layers_and_unrecorded_heads():
    inf = float("inf")
    specs = [_spec_mha(3, 3, 4, 5, [150.0, 99.0, -inf], seed=1),
             _spec_mha(4, 2, 2, 5, [101.0, 0.0, 500.0, 100.0], seed=2),
             _spec_mla(2, 3, 2, 4, [250.0, float("nan")], seed=3)]
    expected = reference_qk_clip(specs, 100.0)
    before = _weights(specs)
    clip = muonclip.QKClip(specs, tau=100.0)
    clip()
    for spec, ref, old in zip(specs, expected, before):
        for key, ref_w in ref.items():
            torch.testing.assert_close(spec[key].detach(), ref_w, rtol=1e-6, atol=0)
    assert torch.equal(specs[0]["q_weight"][4:], before[0]["q_weight"][4:])  # heads 1 (99 < tau) and 2 (-inf)
    assert torch.equal(specs[2]["q_weight"][5:], before[2]["q_weight"][5:])  # NaN max logit: left alone
    assert clip.last_clipped.item() == 4
    assert clip.last_max_logits.shape == (3, 4) and clip.last_max_logits[0, 3] == -inf  # padded row


def test_infinite_tau_only_measures():
    specs = [_spec_mha(2, 2, 3, 4, [1e6, 5.0])]
    old = _weights(specs)
    clip = muonclip.QKClip(specs, tau=float("inf"))
    clip()
    for key in ("q_weight", "k_weight"):
        assert torch.equal(specs[0][key], old[0][key])
    assert torch.equal(clip.last_max_logits, torch.tensor([[1e6, 5.0]])) and clip.last_clipped.item() == 0


def test_bf16_weights_unclipped_heads_bit_identical():
    spec = _spec_mha(4, 4, 8, 16, [10.0, 300.0, 100.0, 99.9], dtype=torch.bfloat16)
    old = _weights([spec])[0]
    muonclip.QKClip([spec], tau=100.0)()
    for key in ("q_weight", "k_weight"):
        w, w0 = spec[key].detach().view(4, 8, 16), old[key].view(4, 8, 16)
        assert torch.equal(w[[0, 2, 3]], w0[[0, 2, 3]])
        torch.testing.assert_close(w[1].float(), w0[1].float() * (1 / 3) ** 0.5, rtol=8e-3, atol=0)


@pytest.mark.parametrize("kind", ["mha", "gqa", "mla"])
def test_bf16_weights_without_masters_are_scaled_in_float32_and_rounded_once(kind):
    """bf16 weights without float32 masters: each clipped row is w * scale computed in float32 and rounded to bf16
    once (bitwise: one float32 product and one rounding per element); rounding the scale to bf16 first would give
    other weights (a bf16 scale is off by up to 0.4%)."""
    H, logits, tau = 4, [10.0, 300.0, 170.0, 99.9], 100.0
    if kind == "mla":
        spec = _spec_mla(H, 4, 2, 4, logits)
        spec = {**spec, **{k: nn.Parameter(spec[k].detach().to(torch.bfloat16)) for k in ("q_weight", "kv_b_weight")}}
    else:
        spec = _spec_mha(H, 4 if kind == "mha" else 2, 8, 16, logits, dtype=torch.bfloat16)
    old = _weights([spec])[0]
    # the float32 row scales, computed independently: gamma = tau / S_max in float32 (1 under tau); MHA's q and k
    # and MLA's nope rows take sqrt(gamma), GQA's q and MLA's rope rows gamma; v rows 1
    gamma_H = torch.where(torch.tensor(logits) > tau, tau / torch.tensor(logits), torch.ones(H))
    sqrt_H, g_H, one_H = gamma_H.sqrt(), gamma_H, torch.ones(H)
    if kind == "mha":
        parts = {"q_weight": [(sqrt_H, 8)], "k_weight": [(sqrt_H, 8)]}
    elif kind == "gqa":
        parts = {"q_weight": [(g_H, 8)]}
    else:
        parts = {"q_weight": [(sqrt_H, 4), (g_H, 2)], "kv_b_weight": [(sqrt_H, 4), (one_H, 4)]}
    muonclip.QKClip([spec], tau=tau)()
    for key, blocks in parts.items():
        scale_R = torch.cat([s_H[:, None].expand(H, n) for s_H, n in blocks], dim=1).reshape(-1, 1)
        assert scale_R.dtype == torch.float32 and not torch.equal(scale_R.bfloat16().float(), scale_R)
        expected = (old[key].float() * scale_R).bfloat16()
        rounded_scale_first = (old[key].float() * scale_R.bfloat16().float()).bfloat16()
        got = spec[key].detach()
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected), key
        assert not torch.equal(got, rounded_scale_first), key
    if kind == "gqa":
        assert torch.equal(spec["k_weight"], old["k_weight"])  # shared keys untouched


def test_single_collective_and_no_host_sync(monkeypatch):
    """All layers' max logits go through ONE all_reduce(MAX); no .item()/bool()/float() on tensors."""
    specs = [_spec_mha(2, 2, 3, 4, [50.0, 50.0], seed=i) for i in range(3)]
    other_rank_LH = torch.tensor([[50.0, 200.0], [10.0, 10.0], [400.0, 10.0]])
    calls = []

    def fake_all_reduce(t, op=None, group=None):
        calls.append((t.shape, op, group))
        torch.maximum(t, other_rank_LH.flatten(), out=t)

    monkeypatch.setattr(muonclip.qk_clip.dist, "all_reduce", fake_all_reduce)
    expected = reference_qk_clip([{**s, "max_logits": torch.maximum(s["max_logits"], o)}
                                  for s, o in zip(specs, other_rank_LH)], 100.0)
    group = object()
    clip = muonclip.QKClip(specs, tau=100.0, process_group=group)

    def no_sync(*_a, **_k):
        raise AssertionError("host sync in QKClip")

    for meth in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, meth, no_sync)
    clip()
    monkeypatch.undo()
    assert calls == [(torch.Size([6]), torch.distributed.ReduceOp.MAX, group)]
    for spec, ref in zip(specs, expected):
        for key, ref_w in ref.items():
            torch.testing.assert_close(spec[key].detach(), ref_w, rtol=1e-6, atol=0)
    assert clip.last_clipped.item() == 2


def test_registered_hook_runs_after_step():
    model_a, model_b = _model("mla"), _model("mla")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    opts = []
    for m in (model_a, model_b):
        opts.append(muonclip.MuonClip(muonclip.build_param_groups(m.named_parameters()), lr=1e-3, ns_dtype=F64))
    clip_a = muonclip.QKClip(model_a.qk_clip_specs, tau=5.0)  # callable specs, re-read each call
    clip_a.register(opts[0])
    clip_b = muonclip.QKClip(model_b.qk_clip_specs(), tau=5.0)
    opts[1].register_step_post_hook(lambda opt, args, kwargs: clip_b())  # the form a torch optimizer hook takes
    for m, opt in zip((model_a, model_b), opts):
        m.reset_step_stats()
        m(tokens).sum().backward()
        opt.step()
    assert clip_a.last_clipped.item() > 0
    assert torch.equal(clip_a.last_max_logits, clip_b.last_max_logits)
    for (n, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), n


def test_bad_specs_and_tau():
    spec = _spec_mha(4, 4, 8, 16, [1.0] * 4)
    with pytest.raises(ValueError, match="tau must be > 0"):
        muonclip.QKClip([spec], tau=0.0)
    with pytest.raises(ValueError, match=r"q_weight has 32 rows, expected 24"):
        muonclip.QKClip([{**spec, "head_dim": 6}])
    with pytest.raises(ValueError, match="max_logits has 4 entries, n_heads=2"):
        muonclip.QKClip([{**spec, "n_heads": 2, "n_kv_heads": 2}])
    with pytest.raises(ValueError, match="misses keys"):
        muonclip.QKClip([{k: v for k, v in spec.items() if k != "k_weight"}])
    with pytest.raises(ValueError, match="kind must be"):
        muonclip.QKClip([{**spec, "kind": "gqa"}])


def _dist_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    logits = {0: [[120.0, 10.0, 90.0], [10.0, 10.0, 10.0]], 1: [[50.0, 10.0, 300.0], [10.0, 10.0, 200.0]]}
    specs = [_spec_mha(3, 3, 3, 4, logits[rank][0], seed=5), _spec_mla(3, 2, 2, 3, logits[rank][1], seed=6)]
    global_max = torch.maximum(torch.tensor(logits[0]), torch.tensor(logits[1]))
    expected = reference_qk_clip([{**s, "max_logits": m} for s, m in zip(specs, global_max)], 100.0)
    # FSDP-style: q of layer 0 and kv_b of layer 1 are row-sharded DTensors (9 rows and 21 rows over 2 ranks)
    specs[0]["q_weight"] = nn.Parameter(distribute_tensor(specs[0]["q_weight"].detach(), mesh, [Shard(0)],
                                                          src_data_rank=None))
    specs[1]["kv_b_weight"] = nn.Parameter(distribute_tensor(specs[1]["kv_b_weight"].detach(), mesh, [Shard(0)],
                                                             src_data_rank=None))
    clip = muonclip.QKClip(specs, tau=100.0, process_group=torch.distributed.group.WORLD)
    clip()
    assert torch.equal(clip.last_max_logits, global_max)
    for spec, ref in zip(specs, expected):
        for key, ref_w in ref.items():
            w = spec[key].full_tensor() if hasattr(spec[key], "full_tensor") else spec[key]
            torch.testing.assert_close(w.detach(), ref_w, rtol=1e-6, atol=0)


def test_distributed_max_reduction_and_sharded_weights():
    run_distributed(_dist_worker, 2)


# ------------------------------------------------------------------------------------------------ post-step mode
CASES = [("mha", 4, 0), ("mha", 2, 0), ("mla", 4, 0), ("mla", 4, 16)]
CASE_IDS = ["mha", "gqa", "mla", "mla_qlora"]


def _post_step_model(attn_type, n_kv=4, q_lora=0):
    return _model(attn_type, n_kv, q_lora, n_layers=3, first_k_dense=1)  # dense, MoE, MoE


def _recorded_max_logits(model, tokens):
    """Independent check: a train-mode forward records every layer's max logits [L, H] on ``tokens``."""
    model.train().reset_step_stats()
    with torch.no_grad():
        model(tokens)
    return torch.stack([s["max_logits"].clone() for s in model.qk_clip_specs()])


def _reference_post_step_clip(model, tokens, tau):
    """Slow reference of the post-step mode: for each layer in order, run the whole (partly clipped) model to get
    that layer's input, measure its max logits there and clip that layer only with ``reference_qk_clip``."""
    measured = []
    for i, layer in enumerate(model.layers):
        S_LH = _recorded_max_logits(model, tokens)
        measured.append(S_LH[i])
        spec = {**model.qk_clip_specs()[i], "max_logits": S_LH[i]}
        with torch.no_grad():
            for key, w in reference_qk_clip([spec], tau)[0].items():
                spec[key].copy_(w)
    return torch.stack(measured)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_post_step_clip_leaves_every_head_at_most_tau_and_matches_reference(case):
    """Re-measured with the clipped weights on the same batch, no head of any layer is above tau (the forward
    mode does not give that: clipping layer 0 changes what layer 1 sees). Weights equal the layer-by-layer
    reference; the forward stops after the last attention layer and leaves no statistics behind."""
    model = _post_step_model(*case)
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    S_LH = _recorded_max_logits(model, tokens)
    tau = _tau_between(S_LH)
    ref = copy.deepcopy(model)
    ref_S_LH = _reference_post_step_clip(ref, tokens, tau)

    model.reset_step_stats()
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    clip = muonclip.QKClip(model.qk_clip_specs(), tau=tau)
    model.eval()
    clip.apply_post_step(lambda: model(tokens))
    assert not head_calls  # stopped after the last attention layer
    assert all(torch.isinf(s["max_logits"]).all() for s in model.qk_clip_specs())  # eval: nothing recorded
    assert all(r.expert_load_E.sum() > 0 for r in model.moe_routers()[:-1])  # MoE layers in between did run
    torch.testing.assert_close(clip.last_max_logits.double(), ref_S_LH, rtol=1e-6, atol=0)
    assert clip.last_clipped.item() == (ref_S_LH > tau).sum().item() > 0
    for (name, w), w_ref in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0, msg=name)

    after_LH = _recorded_max_logits(model, tokens)
    assert after_LH.max() <= tau * (1 + 1e-5), (after_LH.max(), tau)
    clipped_LH = clip.last_max_logits > tau
    torch.testing.assert_close(after_LH[clipped_LH].float(), torch.full_like(after_LH[clipped_LH].float(), tau),
                               rtol=1e-5, atol=0)


def test_clipping_all_layers_at_once_is_not_enough():
    """Why post-step clips layer by layer: with S_max measured exactly on the batch, one clip of all layers at
    once still leaves heads above tau, because clipping a layer changes the input of every layer after it."""
    model = _post_step_model("mla")
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    tau = _tau_between(_recorded_max_logits(model, tokens))
    layered = copy.deepcopy(model)
    muonclip.QKClip(model.qk_clip_specs(), tau=tau).apply()  # the buffers hold the exact max logits
    assert _recorded_max_logits(model, tokens).max() > tau * (1 + 1e-3)  # 0.46% above tau here: not float noise
    muonclip.QKClip(layered.qk_clip_specs(), tau=tau).apply_post_step(lambda: layered.eval()(tokens))
    assert _recorded_max_logits(layered, tokens).max() <= tau * (1 + 1e-5)


def test_post_step_clip_needs_module_and_measure_and_a_forward_that_reaches_them():
    model = _post_step_model("mha")
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    bare = [{k: v for k, v in s.items() if k not in ("module", "measure")} for s in model.qk_clip_specs()]
    with pytest.raises(ValueError, match="needs 'module'"):
        muonclip.QKClip(bare, tau=1.0).apply_post_step(lambda: model(tokens))
    before = copy.deepcopy(model.state_dict())
    clip = muonclip.QKClip(model.qk_clip_specs(), tau=1.0)
    with pytest.raises(RuntimeError, match=r"never reached .* specs \[1, 2\]"):
        clip.apply_post_step(lambda: model.layers[0](model.embed_tokens(tokens)))
    assert not torch.equal(before["layers.0.self_attn.q_proj.weight"], model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(before["layers.1.self_attn.q_proj.weight"], model.layers[1].self_attn.q_proj.weight)
    assert not any(h for s in model.qk_clip_specs() for h in s["module"]._forward_pre_hooks.values())


def _post_step_dist_worker(rank, world_size):
    model = _post_step_model("mla", 4, 16)
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    tau = _tau_between(_recorded_max_logits(model, tokens))
    single = copy.deepcopy(model)
    muonclip.QKClip(single.qk_clip_specs(), tau=tau).apply_post_step(lambda: single.eval()(tokens))

    mine = tokens[rank * 2:(rank + 1) * 2]  # each rank holds half of the batch
    clip = muonclip.QKClip(model.qk_clip_specs(), tau=tau, process_group=torch.distributed.group.WORLD)
    clip.apply_post_step(lambda: model.eval()(mine))
    for (name, w), w1 in zip(model.state_dict().items(), single.state_dict().values()):
        torch.testing.assert_close(w, w1, rtol=1e-6, atol=0, msg=name)  # = one process on the whole batch
        gathered = [torch.empty_like(w) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, w)
        assert torch.equal(gathered[0], gathered[1]), name  # ranks stay identical
    assert _recorded_max_logits(model, tokens).max() <= tau * (1 + 1e-5)


def test_post_step_clip_distributed_equals_single_process_on_the_whole_batch():
    run_distributed(_post_step_dist_worker, 2)
