"""Tensor parallelism (TP=2, gloo) reproduces the single-process model: logits, loss, every gradient, max logits."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.dims import ParallelDims
from parallel.parallelize import ParallelizeConfig, parallelize
from parallel.tensor_parallel import ColumnParallelLinear, LatentRopeLinear, RowParallelLinear
from models import ModelConfig, Transformer
from tests.dist_utils import run_distributed

TINY = dict(vocab_size=62, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, inter_dim=48, moe_inter_dim=16,
            n_routed_experts=4, n_activated_experts=2, n_shared_experts=2, first_k_dense=1, max_seq_len=16)
VARIANTS = {"mha": dict(attn_type="mha"), "gqa": dict(attn_type="mha", n_kv_heads=2),
            "mla": dict(attn_type="mla", q_lora_rank=0), "mla_qlora": dict(attn_type="mla", q_lora_rank=12),
            "mla_qlora_bias": dict(attn_type="mla", q_lora_rank=12, attention_bias=True)}
TOL = dict(rtol=1e-6, atol=1e-8)  # RMSNorm/router upcast to float32 inside the model (see report)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return logits, F.cross_entropy(logits.flatten(0, 1).double(), tokens[:, 1:].flatten())


def _gather(t, dim, group, size):
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _check_variant(name, variant, groups, pdims):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, **variant})).double().train()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("proj.bias"):  # zero-initialised: random, so that adding them twice would show
                p.normal_()
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_loss = _loss(ref, tokens)
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())

    placements = parallelize(model, pdims, groups, ParallelizeConfig())
    logits, loss = _loss(model, tokens)
    loss.backward()
    torch.testing.assert_close(logits, ref_logits, **TOL, msg=f"{name}: logits")
    torch.testing.assert_close(loss, ref_loss, **TOL, msg=f"{name}: loss")

    tp, r, g = groups.tp_size, groups.tp_rank, groups.tp_group
    assert set(placements) == set(ref_params), name
    n_sharded = 0
    for pname, p in model.named_parameters():
        pl, ref_p = placements[pname], ref_params[pname]
        if ref_p.grad is None:  # e_score_correction_bias
            assert p.grad is None and not p.requires_grad, pname
            continue
        if pl.kind == "tp_sharded":
            n_sharded += 1
            assert pl.tp_group is g and p.shape[pl.shard_dim] * tp == ref_p.shape[pl.shard_dim], pname
            torch.testing.assert_close(_gather(p.detach(), pl.shard_dim, g, tp), ref_p.detach(), rtol=0, atol=0)
            torch.testing.assert_close(_gather(p.grad, pl.shard_dim, g, tp), ref_p.grad, **TOL, msg=f"{name}: {pname}")
        else:
            assert p.shape == ref_p.shape, pname
            torch.testing.assert_close(p.grad, ref_p.grad, **TOL, msg=f"{name}: {pname}")
            # replicated params: the same gradient on every TP rank without any extra reduction
            torch.testing.assert_close(_gather(p.grad[None], 0, g, tp), p.grad[None].expand(tp, *p.shape),
                                       rtol=0, atol=0, msg=f"{name}: {pname} differs across TP ranks")
    # expected split: attention q(/k/v)/kv_b + o_proj per layer, dense FFN 3, shared experts 3, embedding and head
    n_col_attn = {"mha": 3, "gqa": 3, "mla": 2, "mla_qlora": 2, "mla_qlora_bias": 2}[name]
    assert n_sharded == TINY["n_layers"] * (n_col_attn + 1) + 3 + 3 + 2, (name, n_sharded)
    assert placements["layers.1.mlp.experts.gate_proj"].kind == "expert"
    for vocab in ("embed_tokens.weight", "lm_head.weight"):  # rows split over TP (parallel/vocab_parallel.py)
        assert (placements[vocab].kind, placements[vocab].shard_dim) == ("tp_sharded", 0), vocab

    h_local = TINY["n_heads"] // tp
    for layer, spec, ref_spec in zip(model.layers, model.qk_clip_specs(), ref.qk_clip_specs()):
        assert spec["n_heads"] == h_local, name
        assert spec["max_logits"] is layer.self_attn.max_logits_H
        torch.testing.assert_close(spec["max_logits"], ref_spec["max_logits"][r * h_local:(r + 1) * h_local],
                                   rtol=1e-6, atol=1e-6, msg=f"{name}: max logits")
        if variant["attn_type"] == "mha":
            assert spec["n_kv_heads"] == variant.get("n_kv_heads", 4) // tp
        else:
            assert isinstance(layer.self_attn.kv_a_proj_with_mqa, LatentRopeLinear)
            assert isinstance(layer.self_attn.kv_b_proj, ColumnParallelLinear)
            assert isinstance(layer.self_attn.o_proj, RowParallelLinear)


def _tp_worker(rank, world_size, names):
    pdims = ParallelDims(dp=1, tp=world_size, ep=1)
    groups = pdims.build("cpu")
    for name in names:
        _check_variant(name, VARIANTS[name], groups, pdims)


def test_tp2_matches_single_process():
    run_distributed(_tp_worker, 2, list(VARIANTS))


def test_tp_rejects_indivisible_heads():
    pdims = ParallelDims(dp=1, tp=2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        pdims.check_model(ModelConfig(**{**TINY, "attn_type": "mha", "n_heads": 4, "n_kv_heads": 1}))
    with pytest.raises(ValueError, match="n_heads"):
        ParallelDims(dp=1, tp=8).check_model(ModelConfig(**{**TINY, "attn_type": "mla"}))
    with pytest.raises(ValueError, match=r"vocab_size \(61\) must be divisible by tp \(2\)"):  # the vocab split
        pdims.check_model(ModelConfig(**{**TINY, "vocab_size": 61}))
