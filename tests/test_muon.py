"""Muon / AdamW math and the MuonClip optimizer: parity with references, torch.optim, routing, resume."""
from __future__ import annotations

import copy
import io
import re
import statistics

import pytest
import torch
from torch import nn

import muonclip
from muonclip.reference import ReferenceMuonClip, reference_newton_schulz
from tests.dist_utils import run_distributed

F64 = torch.float64


def _quintic(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = muonclip.NS_COEFFICIENTS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


# ---------------------------------------------------------------- Newton–Schulz


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 48), (3, 48, 16)])
def test_ns_is_scalar_polynomial_of_singular_values(shape):
    """NS(G) = U p(S / ||G||_F) V^T with p the 5-fold quintic: same singular vectors, mapped singular values."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    O = muonclip.newton_schulz(G, dtype=F64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s_norm = S / torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True).squeeze(-1)
    expected = U @ torch.diag_embed(_quintic(s_norm, 5)) @ Vh
    torch.testing.assert_close(O, expected, rtol=0, atol=1e-12)


def test_ns_singular_values_in_quintic_band():
    """After 5 steps the quintic puts singular values in ~[0.68, 1.14], not at 1 (it does not converge)."""
    gen = torch.Generator().manual_seed(1)
    all_s = []
    for shape in [(32, 64), (64, 32), (16, 128), (24, 40)]:
        for _ in range(10):
            G = torch.randn(*shape, generator=gen, dtype=F64)
            s_in = torch.linalg.svdvals(G / G.norm())
            assert s_in.min() > 0.02  # well-conditioned inputs: 5 steps suffice to reach the band
            all_s.append(torch.linalg.svdvals(muonclip.newton_schulz(G, dtype=F64)))
    s = torch.cat(all_s)
    assert s.min() >= 0.68 and s.max() <= 1.14, (s.min().item(), s.max().item())
    assert (s - 1).abs().max() > 0.1  # really the fast quintic, not an exact polar factor


def test_ns_convergent_cubic_gives_polar_factor():
    """With the classic cubic (1.5, -0.5, 0) and many steps the same routine converges to U V^T."""
    G = torch.randn(20, 36, generator=torch.Generator().manual_seed(2), dtype=F64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    O = muonclip.newton_schulz(G, steps=60, dtype=F64, coefficients=(1.5, -0.5, 0.0))
    torch.testing.assert_close(O, polar, rtol=0, atol=1e-10)
    # the 5-step quintic points the same way: singular values in [0.68, 1.14] bound the cosine to the polar
    # factor below by 2*sqrt(0.68*1.14)/(0.68+1.14) = 0.968
    O5 = muonclip.newton_schulz(G, dtype=F64)
    cos = (O5 * polar).sum() / (O5.norm() * polar.norm())
    assert 0.968 < cos < 1 - 1e-6


def _composed(x: torch.Tensor, schedule, steps: int) -> torch.Tensor:
    for k in range(steps):
        a, b, c = schedule[min(k, len(schedule) - 1)]
        x = a * x + b * x**3 + c * x**5
    return x


def test_polar_express_maps_singular_values_closer_to_one_than_the_quintic():
    """Per-step coefficients (arXiv:2505.16932): singular values anywhere in [1e-3, 1] (after the Frobenius
    normalisation) end within 1 +- 0.142 after 5 steps; the quintic leaves [0.47, 1.21] there ([0.68, 1.14] from
    1e-2), and the matrix routine is exactly that scalar composition."""
    x = torch.logspace(-3, 0, 20001, dtype=F64)
    pe = _composed(x, muonclip.NS_SCHEDULES["polar_express"], 5)
    assert (pe - 1).abs().max() < 0.142
    assert (_composed(x, [muonclip.NS_COEFFICIENTS], 5) - 1).abs().max() > 0.5
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(5), dtype=F64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    expected = U @ torch.diag(_composed(S / G.norm(), muonclip.NS_SCHEDULES["polar_express"], 5)) @ Vh
    torch.testing.assert_close(muonclip.newton_schulz(G, dtype=F64, coefficients="polar_express"), expected,
                               rtol=0, atol=1e-12)
    # past the schedule's end its last triple repeats
    seven = muonclip.newton_schulz(G, steps=7, dtype=F64, coefficients="polar_express")
    torch.testing.assert_close(seven, reference_newton_schulz(G, 7, coefficients=muonclip.NS_SCHEDULES["polar_express"]),
                               rtol=0, atol=1e-12)


def test_polar_express_coefficients_are_the_published_ones():
    """The 5-step table of arXiv:2505.16932 (safety factor 2e-2, cushion 2) as modded-nanogpt's train_gpt.py
    prints it, digit for digit: the 0.142 band above would not notice a typo in one digit."""
    published = (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    )
    assert tuple(map(tuple, muonclip.NS_SCHEDULES["polar_express"])) == published


def _ill_conditioned(G: torch.Tensor) -> torch.Tensor:
    """G with its singular values spread over 1e4 (like a low-rank momentum)."""
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ torch.diag_embed(S * torch.logspace(0, -4, S.shape[-1], dtype=G.dtype)) @ Vh


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (8, 96), (3, 16, 48), (3, 48, 16), (32, 32)])
def test_gram_path_equals_the_standard_iteration(shape, coefficients):
    """Iterating on the A x A Gram matrix gives the standard iteration's result: to 1e-12 in float64 (1e-10 with
    singular values spread over 1e4: the gram path amplifies rounding there). In float32 (the only low precision
    it runs in), over 16 Gaussian matrices, its median error is that of the standard path on rectangular ones
    (within 1.5x; measured 0.75-1.13x, single matrices up to 3x: one sample depends on the CPU's GEMM kernels),
    and its median error on ill-conditioned ones is below 5e-3 relative (measured 3e-4 to 2.7e-3, worst on 8 x 96
    with polar_express; standard: below 3e-5)."""
    ratios, ill_errors = [], []
    for seed in range(16):
        G = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        ill = _ill_conditioned(G)
        if seed == 0:
            for X, atol in ((G, 1e-12), (ill, 1e-10)):
                ref = muonclip.newton_schulz(X, dtype=F64, coefficients=coefficients)
                gram = muonclip.newton_schulz(X, dtype=F64, coefficients=coefficients, path="gram")
                torch.testing.assert_close(gram, ref, rtol=0, atol=atol)
        ref = muonclip.newton_schulz(G, dtype=F64, coefficients=coefficients)
        err = {path: _rel(muonclip.newton_schulz(G.float(), coefficients=coefficients, path=path), ref)
               for path in ("standard", "gram")}
        ratios.append(err["gram"] / err["standard"])
        ref = muonclip.newton_schulz(ill, dtype=F64, coefficients=coefficients)
        ill_errors.append(_rel(muonclip.newton_schulz(ill.float(), coefficients=coefficients, path="gram"), ref))
        assert _rel(muonclip.newton_schulz(ill.float(), coefficients=coefficients), ref) < 3e-5
    if shape[-1] != shape[-2]:
        assert statistics.median(ratios) < 1.5, ratios
    assert statistics.median(ill_errors) < 5e-3, ill_errors
    with pytest.raises(ValueError, match="gram Newton-Schulz path diverges in torch.bfloat16"):
        muonclip.newton_schulz(G, dtype=torch.bfloat16, path="gram")
    assert muonclip.newton_schulz(G, dtype=torch.bfloat16, path="auto").dtype == torch.bfloat16  # standard


def test_flop_model_counts_what_each_path_runs_and_auto_takes_the_cheaper():
    from torch.utils.flop_counter import FlopCounterMode

    from muonclip.newton_schulz import choose_path, ns_flops

    for shape in [(64, 64), (16, 256), (256, 16), (4, 32, 128)]:
        G = torch.randn(*shape)
        n_mat = shape[0] if len(shape) == 3 else 1
        for path in ("standard", "gram"):
            with FlopCounterMode(display=False) as counter:
                muonclip.newton_schulz(G, steps=5, path=path)
            assert counter.get_total_flops() == n_mat * ns_flops(shape, 5, path), (shape, path)
    assert choose_path((64, 64), 5) == "standard" and choose_path((16, 256), 5) == "gram"
    assert choose_path((256, 16), 5) == "gram" and choose_path((64, 90), 5) == "standard"  # C < 1.5 A
    assert choose_path((16, 256), 5, "standard") == "standard"
    with pytest.raises(ValueError, match="path must be one of"):
        muonclip.newton_schulz(G, path="fast")
    with pytest.raises(ValueError, match="unknown Newton-Schulz coefficients 'cubic'"):
        muonclip.newton_schulz(G, coefficients="cubic")
    with pytest.raises(ValueError, match="MuonClip: unknown Newton-Schulz coefficients"):
        muonclip.MuonClip([{"params": [nn.Parameter(torch.zeros(2, 2))], "use_muon": True}], lr=0.1,
                          ns_coefficients="cubic")


def test_ns_batched_equals_per_matrix_loop_and_reference():
    gen = torch.Generator().manual_seed(3)
    for shape in [(4, 16, 48), (4, 48, 16), (2, 32, 32)]:
        G = torch.randn(*shape, generator=gen)
        batched = muonclip.newton_schulz(G)
        looped = torch.stack([muonclip.newton_schulz(g) for g in G])
        torch.testing.assert_close(batched, looped, rtol=0, atol=1e-6)
        torch.testing.assert_close(muonclip.newton_schulz(G.double(), dtype=F64), reference_newton_schulz(G),
                                   rtol=0, atol=1e-12)
        assert batched.dtype == torch.float32 and G.dtype == torch.float32


def test_ns_edge_cases():
    Z = torch.zeros(3, 8, 5)
    assert torch.equal(muonclip.newton_schulz(Z), Z)  # eps clamp: no NaN for a zero gradient
    G = torch.randn(6, 4)
    G_before = G.clone()
    muonclip.newton_schulz(G, dtype=None)
    assert torch.equal(G, G_before)  # input never modified
    with pytest.raises(ValueError, match="2-D matrix or a 3-D batch"):
        muonclip.newton_schulz(torch.randn(5))
    with pytest.raises(ValueError, match="compute dtype"):
        muonclip.newton_schulz(G, dtype=torch.float16)


def test_muon_scale_and_pure_update():
    assert muonclip.muon_scale((64, 256)) == pytest.approx(0.2 * 16)
    assert muonclip.muon_scale((8, 64, 256)) == pytest.approx(0.2 * 16)  # per matrix of an expert stack
    g = torch.randn(8, 12, dtype=F64)
    buf = torch.randn(8, 12, dtype=F64)
    buf0 = buf.clone()
    out = muonclip.muon_update(g, buf, momentum=0.9, nesterov=True, ns_dtype=F64)
    torch.testing.assert_close(buf, 0.9 * buf0 + 0.1 * g, rtol=0, atol=1e-15)
    torch.testing.assert_close(out, reference_newton_schulz(0.1 * g + 0.9 * buf), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- optimizer vs torch.optim / reference


def _step_both(ours, ref, ours_p, ref_p, gen, steps: int) -> None:
    """Step our optimizer and the torch reference with the same random gradients."""
    for _ in range(steps):
        for a, b in zip(ours_p, ref_p):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_2d_bit_identical_to_torch_muon(nesterov):
    """In bf16 NS (what torch.optim.Muon always uses) our 2-D step equals torch's bit for bit, with decay."""
    gen = torch.Generator().manual_seed(4)
    ours_p = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(32, 64), (64, 32), (17, 17)]]
    ref_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = muonclip.MuonClip([{"params": ours_p, "use_muon": True}], lr=0.02, weight_decay=0.1,
                             nesterov=nesterov, ns_dtype=torch.bfloat16)
    ref = torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
                           adjust_lr_fn="match_rms_adamw")
    _step_both(ours, ref, ours_p, ref_p, gen, steps=6)
    for a, b in zip(ours_p, ref_p):
        assert torch.equal(a, b)
        assert torch.equal(ours.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])


def test_adamw_groups_bit_identical_to_torch_adamw():
    gen = torch.Generator().manual_seed(5)
    shapes = [(10, 7), (13,), (4, 3, 2)]
    ours_p = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = muonclip.MuonClip([{"params": ours_p[:2], "use_muon": False, "lr": 3e-2},
                              {"params": ours_p[2:], "use_muon": False, "weight_decay": 0.0}],
                             lr=1e-2, weight_decay=0.1, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    ref = torch.optim.AdamW([{"params": ref_p[:2], "lr": 3e-2}, {"params": ref_p[2:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    _step_both(ours, ref, ours_p, ref_p, gen, steps=6)
    for a, b in zip(ours_p, ref_p):
        assert torch.equal(a, b)
        assert torch.equal(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])
        assert ours.state[a]["step"].item() == 6


def test_adamw_holds_one_temporary_when_given_the_spent_gradient():
    """``adamw_apply_``'s high point above its inputs (tests/audit.py ``LiveBytes``) is one tensor of the moments'
    size when the update goes into ``scratch`` (ZeRO-1's spent gradient; the denominator divided and shifted in
    place), two without (what the planner counts for one process), and the result is bitwise the same: Kimi K2's
    head was two full-size float32 temporaries of 4.7 GB each, now one of its rows on each rank."""
    from muonclip.muon import adamw_apply_, adamw_moments_
    from tests.audit import LiveBytes

    gen = torch.Generator().manual_seed(7)
    n, hp = 1 << 16, dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    weights, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    results, peaks = [], []
    for scratch in (False, True):
        weight, exp_avg, exp_avg_sq, g = weights.clone(), torch.zeros(n), torch.zeros(n), grad.clone()
        step = torch.ones(())
        adamw_moments_(g, exp_avg, exp_avg_sq, hp["betas"])
        with LiveBytes() as live:
            adamw_apply_(weight, exp_avg, exp_avg_sq, step, **hp, scratch=g if scratch else None)
        results.append(weight)
        peaks.append(live.peak)
    assert torch.equal(*results)
    assert [p // (4 * n) for p in peaks] == [2, 1] and max(p % (4 * n) for p in peaks) <= 64, peaks


def _mixed_params(gen, dtype):
    shapes = {"w_wide": (12, 20), "w_tall": (20, 12), "experts": (3, 8, 16), "emb": (30, 8), "gain": (8,)}
    return {k: nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for k, s in shapes.items()}


def test_optimizer_float64_matches_slow_reference():
    """Fast path (float64 NS, batched experts) == per-matrix float64 reference over 5 steps, Muon and AdamW."""
    gen = torch.Generator().manual_seed(6)
    ps = _mixed_params(gen, F64)
    ref_ps = {k: nn.Parameter(p.detach().clone()) for k, p in ps.items()}

    def groups(d):
        return [{"params": [d["w_wide"], d["w_tall"], d["experts"]], "use_muon": True},
                {"params": [d["emb"]], "use_muon": False, "lr": 3e-3},
                {"params": [d["gain"]], "use_muon": False, "weight_decay": 0.0}]

    kw = dict(lr=1e-2, momentum=0.9, weight_decay=0.05, adamw_betas=(0.8, 0.99), adamw_eps=1e-6)
    fast = muonclip.MuonClip(groups(ps), ns_dtype=F64, **kw)
    slow = ReferenceMuonClip(groups(ref_ps), **kw)
    for _ in range(5):
        for k in ps:
            ps[k].grad = torch.randn(ps[k].shape, generator=gen, dtype=F64)
            ref_ps[k].grad = ps[k].grad.clone()
        fast.step()
        slow.step()
    for k in ps:
        torch.testing.assert_close(ps[k], ref_ps[k], rtol=0, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_expert_stack_equals_per_expert_matrices():
    """A 3-D [E, A, B] Muon param updates like E independent [A, B] params (scale 0.2*sqrt(max(A, B)))."""
    gen = torch.Generator().manual_seed(7)
    stack = nn.Parameter(torch.randn(4, 24, 40, generator=gen))
    singles = [nn.Parameter(stack.detach()[e].clone()) for e in range(4)]
    opt_stack = muonclip.MuonClip([{"params": [stack], "use_muon": True}], lr=0.02)
    opt_single = muonclip.MuonClip([{"params": singles, "use_muon": True}], lr=0.02)
    for _ in range(5):
        stack.grad = torch.randn(stack.shape, generator=gen)
        for e, p in enumerate(singles):
            p.grad = stack.grad[e].clone()
        opt_stack.step()
        opt_single.step()
    torch.testing.assert_close(stack.detach(), torch.stack([p.detach() for p in singles]), rtol=0, atol=1e-6)


def test_float32_ns_close_to_float64():
    gen = torch.Generator().manual_seed(8)
    p32 = nn.Parameter(torch.randn(16, 48, generator=gen))
    p64 = nn.Parameter(p32.detach().double())
    o32 = muonclip.MuonClip([{"params": [p32], "use_muon": True}], lr=0.02)
    o64 = muonclip.MuonClip([{"params": [p64], "use_muon": True}], lr=0.02, ns_dtype=F64)
    for _ in range(5):
        g = torch.randn(16, 48, generator=gen)
        p32.grad, p64.grad = g, g.double()
        o32.step()
        o64.step()
    torch.testing.assert_close(p32.detach().double(), p64.detach(), rtol=0, atol=2e-6)


# ---------------------------------------------------------------- param routing


def _tiny_model():
    import models

    cfg = models.ModelConfig(vocab_size=64, dim=32, n_layers=2, attn_type="mla", n_heads=4, q_lora_rank=16,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=64,
                             moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, first_k_dense=1,
                             max_seq_len=16)
    torch.manual_seed(0)
    return models.Transformer(cfg)


def test_default_routing_on_model():
    model = _tiny_model()
    groups = muonclip.build_param_groups(model.named_parameters(), weight_decay=0.1)
    named = dict(model.named_parameters())
    seen = [n for g in groups for n in g["names"]]
    assert sorted(seen) == sorted(named) and len(seen) == len(set(seen))  # every param exactly once
    by_name = {n: g for g in groups for n in g["names"]}
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(named[n]) for n in g["names"]]
    for n, p in named.items():
        g = by_name[n]
        if n in ("embed_tokens.weight", "lm_head.weight"):
            assert not g["use_muon"] and g["weight_decay"] == 0.1, n
        elif n.endswith("norm.weight") or n.endswith("e_score_correction_bias"):
            assert not g["use_muon"] and g["weight_decay"] == 0.0, n
        else:
            assert g["use_muon"] and p.ndim in (2, 3) and g["weight_decay"] == 0.1, n
    assert by_name["layers.1.mlp.gate.e_score_correction_bias"]["group"] == "adamw_no_decay"
    assert not named["layers.1.mlp.gate.e_score_correction_bias"].requires_grad
    assert by_name["layers.1.mlp.experts.down_proj"]["use_muon"]
    assert by_name["layers.1.mlp.gate.weight"]["use_muon"]


def test_default_routing_generic_names_and_overrides():
    named = [("wte.weight", torch.zeros(50, 8)), ("h.0.ln_1.weight", torch.zeros(8)),
             ("h.0.ln_1.bias", torch.zeros(8)), ("h.0.attn.c_attn.weight", torch.zeros(8, 24)),
             ("h.0.attn.c_attn.bias", torch.zeros(24)), ("h.0.scalar_gain", torch.zeros(1)),
             ("conv.weight", torch.zeros(4, 3, 3, 3))]
    groups = muonclip.build_param_groups(named, group_options={"adamw": {"lr": 3e-4}, "muon": {"lr": 2e-2}})
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["wte.weight"]["group"] == "adamw" and by_name["wte.weight"]["lr"] == 3e-4
    assert by_name["h.0.ln_1.weight"]["group"] == "adamw_no_decay"
    assert by_name["h.0.ln_1.bias"]["group"] == "adamw_no_decay"
    assert by_name["h.0.attn.c_attn.bias"]["group"] == "adamw_no_decay"
    assert by_name["h.0.attn.c_attn.weight"]["group"] == "muon" and by_name["h.0.attn.c_attn.weight"]["lr"] == 2e-2
    assert by_name["h.0.scalar_gain"]["group"] == "adamw"  # 1-D falls through the Muon rule to the catch-all
    assert by_name["conv.weight"]["group"] == "muon"
    assert "weight_decay" not in by_name["wte.weight"]  # inherits the optimizer default when not given


def test_custom_rules_and_routing_errors():
    named = [("a.weight", torch.zeros(4, 4)), ("a.bias", torch.zeros(4)), ("experts.w", torch.zeros(2, 4, 4))]
    groups = muonclip.build_param_groups(named, rules=[(r"experts", "experts"), (r"weight$", "muon"), (r".", "adamw")],
                                         group_options={"experts": {"use_muon": True, "lr": 1e-3}})
    assert [(g["group"], g["names"]) for g in groups] == [("experts", ["experts.w"]), ("muon", ["a.weight"]),
                                                         ("adamw", ["a.bias"])]
    with pytest.raises(ValueError, match=r"no param-group rule matched: a\.bias \(4,\)"):
        muonclip.build_param_groups(named, rules=[(r"weight$", "muon"), (r"experts", "muon")])
    with pytest.raises(ValueError, match=r"duplicated: b\.weight \(same tensor as a\.weight\)"):
        muonclip.build_param_groups(named + [("b.weight", named[0][1])])
    with pytest.raises(ValueError, match="group 'mystery' used by a rule has no options"):
        muonclip.build_param_groups(named, rules=[(".", "mystery")])
    with pytest.raises(ValueError, match="bad param-group rule"):
        muonclip.build_param_groups(named, rules=[("(", "muon")])


def test_a_hidden_matrix_reaching_adamw_only_through_the_catch_all_is_an_error():
    """The silent Muon bug: a custom rule set whose Muon rule misses a layer; AdamW then trains that matrix."""
    named = [("attn.wq.weight", torch.zeros(8, 8)), ("mlp.new_proj.weight", torch.zeros(16, 8)),
             ("attn.norm.weight", torch.zeros(8)), ("embed_tokens.weight", torch.zeros(32, 8))]
    rules = [(r"wq\.weight$", "muon"), (r"embed_tokens\.weight$", "adamw"), (r".", "adamw")]
    with pytest.raises(ValueError, match=r"1 hidden matrices would go to AdamW only through a catch-all rule: "
                                         r"mlp\.new_proj\.weight \(16, 8\) \(rule '\.' -> 'adamw'\)"):
        muonclip.build_param_groups(named, rules=rules)
    # a rule that names it says AdamW is intended; 1-D gains through the catch-all stay fine
    groups = muonclip.build_param_groups(named, rules=[(r"new_proj", "adamw"), *rules])
    assert {n: g["group"] for g in groups for n in g["names"]}["mlp.new_proj.weight"] == "adamw"


def test_coverage_counts_tensors_and_elements_per_rule():
    from models import ModelConfig, Transformer
    with torch.device("meta"):
        model = Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=2, first_k_dense=1, n_heads=2,
                                        inter_dim=32, moe_inter_dim=8, n_routed_experts=4, n_activated_experts=2))
    rows = muonclip.coverage(model.named_parameters())
    named = dict(model.named_parameters())
    assert sum(r["tensors"] for r in rows) == len(named)
    assert sum(r["elements"] for r in rows) == sum(p.numel() for p in named.values())
    muon = [r for r in rows if r["optimizer"] == "muon"]
    assert len(muon) == 1 and muon[0]["elements"] == sum(p.numel() for p in named.values() if p.ndim >= 2) - 2 * 64 * 16
    table = muonclip.format_coverage(rows)
    assert re.search(rf"^muon +\(total\) +{muon[0]['tensors']} +{muon[0]['elements']:,} ", table, re.M), table


def test_optimizer_input_errors():
    w = nn.Parameter(torch.zeros(4, 4))
    b = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="no 'use_muon' key"):
        muonclip.MuonClip([w, b], lr=1e-3)
    with pytest.raises(ValueError, match="no 'use_muon' key"):
        muonclip.MuonClip([{"params": [w]}], lr=1e-3)
    with pytest.raises(ValueError, match=r"Muon param blk\.bias \(group 0\) has shape \(4,\)"):
        muonclip.MuonClip([{"params": [w, b], "names": ["blk.weight", "blk.bias"], "use_muon": True}], lr=1e-3)
    with pytest.raises(ValueError, match="ns_dtype"):
        muonclip.MuonClip([{"params": [w], "use_muon": True}], lr=1e-3, ns_dtype=torch.float16)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        muonclip.MuonClip([{"params": [w], "use_muon": True, "lr": -1.0}], lr=1e-3)


# ---------------------------------------------------------------- model training, resume


def _train(model, opt, steps, tokens):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()


def test_state_dict_resume_is_bit_identical():
    torch.manual_seed(1)
    model = _tiny_model()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(9))
    straight = copy.deepcopy(model)
    make = lambda m: muonclip.MuonClip(muonclip.build_param_groups(m.named_parameters()), lr=1e-2)  # noqa: E731
    opt_straight = make(straight)
    _train(straight, opt_straight, 6, tokens)

    opt = make(model)
    _train(model, opt, 3, tokens)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _tiny_model()
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = make(resumed)
    opt_resumed.init_state()  # as the checkpoint loader does before loading in place
    opt_resumed.load_state_dict(ckpt["optim"])
    _train(resumed, opt_resumed, 3, tokens)

    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    named = dict(resumed.named_parameters())
    st = opt_resumed.state
    assert set(st[named["layers.1.mlp.experts.up_proj"]]) == {"momentum_buffer"}
    assert set(st[named["embed_tokens.weight"]]) == {"exp_avg", "exp_avg_sq", "step"}
    assert st[named["embed_tokens.weight"]]["step"].item() == 6
    bias = named["layers.1.mlp.gate.e_score_correction_bias"]
    assert bias not in st and torch.equal(bias, torch.zeros_like(bias))  # frozen: never touched


def test_a_row_scaling_outside_a_step_keeps_each_bf16_parameter_its_master_rounded():
    """``MuonClip.scale_rows_`` (QK-Clip's post-step clip) on a bf16 parameter whose float32 master holds low bits:
    the parameter is scaled in place (what every ZeRO-1 replica can do alone), the master is the exactly scaled
    master moved into the parameter's rounding interval (less than one bf16 unit, a half-way point one float32
    step inside), rows scaled by 1 keep every bit."""
    g = torch.Generator().manual_seed(0)
    exact = 0.2 * torch.randn(64, 256, generator=g) + 1e-3 * torch.randn(64, 256, generator=g)
    p = nn.Parameter(exact.to(torch.bfloat16))
    opt = muonclip.MuonClip([{"params": [p], "use_muon": True}], lr=0.02)
    opt.init_state()
    opt.state[p]["master"].copy_(exact)
    scale_R = torch.cat([torch.rand(48, generator=g) * 0.9 + 0.05, torch.ones(16)])
    replica = (p.detach().float() * scale_R[:, None]).to(torch.bfloat16)  # what a rank without the master makes
    opt.scale_rows_(p, scale_R)
    master = opt.state[p]["master"]
    exact.mul_(scale_R[:, None])
    assert torch.equal(p, replica) and torch.equal(p, master.to(torch.bfloat16))
    unit = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8)
    assert ((master - exact).abs() < unit).all() and 0.1 < (master != exact)[:48].float().mean() < 0.5
    assert torch.equal(master[48:], exact[48:]) and torch.equal(p[48:], exact[48:].to(torch.bfloat16))
    odd = torch.tensor([1.0 + 2.0 ** -7], dtype=torch.bfloat16)  # half-way below it rounds to 1.0 (even)
    half_way = torch.tensor([1.0 + 2.0 ** -8])
    muonclip.optimizer.round_into_(half_way, odd)
    assert half_way.to(torch.bfloat16) == odd and half_way.item() == torch.nextafter(
        torch.tensor(1.0 + 2.0 ** -8), torch.tensor(2.0)).item()


def test_init_state_equals_lazy_state():
    torch.manual_seed(2)
    eager_model = _tiny_model()
    lazy_model = copy.deepcopy(eager_model)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(10))
    eager = muonclip.MuonClip(muonclip.build_param_groups(eager_model.named_parameters()), lr=1e-2)
    lazy = muonclip.MuonClip(muonclip.build_param_groups(lazy_model.named_parameters()), lr=1e-2)
    eager.init_state()
    for g in eager.param_groups:
        for p in g["params"]:
            if not p.requires_grad:
                assert p not in eager.state
            elif g["use_muon"]:
                assert set(eager.state[p]) == {"momentum_buffer"} and not eager.state[p]["momentum_buffer"].any()
            else:
                assert eager.state[p]["step"].item() == 0 and not eager.state[p]["exp_avg"].any()
    _train(eager_model, eager, 2, tokens)
    _train(lazy_model, lazy, 2, tokens)
    for a, b in zip(eager_model.parameters(), lazy_model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- DTensor parameters (2 gloo processes)


def _dtensor_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(11)  # same on every rank
    cases = {"rows": ((7, 12), Shard(0)), "cols": ((12, 9), Shard(1)), "rep": ((6, 10), Replicate()),
             "experts": ((4, 6, 10), Shard(0)), "experts_split": ((2, 8, 6), Shard(1)), "gain": ((5,), Shard(0))}
    full = {k: nn.Parameter(torch.randn(shape, generator=gen)) for k, (shape, _) in cases.items()}
    dist_p = {k: nn.Parameter(distribute_tensor(full[k].detach().clone(), mesh, [pl], src_data_rank=None))
              for k, (_, pl) in cases.items()}

    def groups(d):
        return [{"params": [d[k] for k in ("rows", "cols", "rep", "experts", "experts_split")], "use_muon": True},
                {"params": [d["gain"]], "use_muon": False}]

    opt_full = muonclip.MuonClip(groups(full), lr=0.02)
    opt_dist = muonclip.MuonClip(groups(dist_p), lr=0.02)
    for _ in range(3):
        for k, (_, pl) in cases.items():
            full[k].grad = torch.randn(full[k].shape, generator=gen)
            dist_p[k].grad = distribute_tensor(full[k].grad.clone(), mesh, [pl], src_data_rank=None)
        opt_full.step()
        opt_dist.step()
    for k in cases:
        torch.testing.assert_close(dist_p[k].full_tensor(), full[k].detach(), rtol=0, atol=1e-6,
                                   msg=lambda m: f"{k}: {m}")


def test_dtensor_params_match_single_process():
    run_distributed(_dtensor_worker, 2)
