"""HF interop: our model vs transformers' DeepseekV3ForCausalLM on exported weights, round trips, bad input."""
from __future__ import annotations

import json
import re
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from transformers import DeepseekV3ForCausalLM

from models import ModelConfig, Transformer
from models.hf_interop import export_hf, from_hf_config, import_hf, load_hf_tensors, to_hf_config

BASE = dict(vocab_size=97, dim=32, n_layers=3, attn_type="mla", n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=12, rope_theta=1000.0, max_seq_len=24, inter_dim=48, moe_inter_dim=16,
            init_std=0.1)
CONFIGS = {
    # no q compression; 4 groups keep 2; top-3; one shared expert
    "q_proj-g4k2-top3-shared1": dict(q_lora_rank=0, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2,
                                     n_activated_experts=3, n_shared_experts=1, route_scale=2.5, first_k_dense=1),
    # q_lora; 3 groups keep 1 (selection confined to one group); top-2; two shared experts
    "q_lora-g3k1-top2-shared2": dict(q_lora_rank=24, n_routed_experts=6, n_expert_groups=3, n_limited_groups=1,
                                     n_activated_experts=2, n_shared_experts=2, route_scale=1.7, first_k_dense=1),
    # no dense layer, no groups, no shared experts (HF keeps empty shared-expert tensors)
    "q_lora-nogroups-top3-noshared": dict(q_lora_rank=16, n_routed_experts=4, n_expert_groups=1, n_limited_groups=1,
                                          n_activated_experts=3, n_shared_experts=0, route_scale=0.8, first_k_dense=0),
    # every layer dense (no MoE fields used)
    "q_proj-all-dense": dict(q_lora_rank=0, first_k_dense=3, n_routed_experts=0),
    # YaRN as DeepSeek-V3 / Kimi K2 configure it (mscale = mscale_all_dim = 1: softmax scale x mscale^2)
    "yarn-dsv3": dict(q_lora_rank=16, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1,
                      first_k_dense=1, yarn_factor=4.0, yarn_original_max_seq_len=6, yarn_beta_fast=32.0,
                      yarn_beta_slow=1.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0),
    # YaRN with other betas and mscale != mscale_all_dim (cos/sin scaled by their ratio)
    "yarn-betas-mscale": dict(q_lora_rank=0, n_routed_experts=4, n_activated_experts=2, n_shared_experts=0,
                              first_k_dense=0, yarn_factor=8.0, yarn_original_max_seq_len=12, yarn_beta_fast=8.0,
                              yarn_beta_slow=0.5, yarn_mscale=0.8, yarn_mscale_all_dim=0.5),
    # top-k scores not renormalised (norm_topk_prob: false), rms_norm_eps 1e-5 (the latent norms keep 1e-6)
    "q_lora-nonorm-eps1e-5": dict(q_lora_rank=16, n_routed_experts=6, n_expert_groups=2, n_limited_groups=1,
                                  n_activated_experts=2, n_shared_experts=1, route_scale=2.5, first_k_dense=1,
                                  norm_topk_prob=False, norm_eps=1e-5),
}


def make_cfg(name: str) -> ModelConfig:
    return ModelConfig(**BASE, **CONFIGS[name])


@torch.no_grad()
def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights with non-trivial norms and a router whose mixed-sign bias changes the selection."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
    for router in model.moe_routers():
        router.weight.normal_(0, 0.3)  # sigmoid scores spread over (0, 1)
        router.e_score_correction_bias.uniform_(-0.5, 0.5)  # biased scores also go negative
    return model


def hf_logits(hf_model, tokens_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens_BT).logits


def tokens(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    cfg = make_cfg(name)
    model = random_model(cfg)
    export_hf(model, tmp_path)
    hf, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = tokens(cfg)
    with torch.no_grad():
        ours = model(tok)
    theirs = hf_logits(hf.eval(), tok)
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: float32 max |logit diff| = {diff:.3g} (|logits| max {ours.abs().max().item():.3g})")
    assert diff < 1e-5

    if cfg.first_k_dense == cfg.n_layers:
        return
    # the comparison is sensitive to what it claims to cover: bias-driven and group-limited selection
    moe_gates = [layer.mlp.gate for layer in hf.model.layers[cfg.first_k_dense:]]
    for gate in moe_gates:
        gate.e_score_correction_bias.zero_()
    assert (hf_logits(hf, tok) - ours).abs().max() > 1e-3, "router bias did not affect the selection"
    if cfg.n_limited_groups < cfg.n_expert_groups:
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
        for layer in hf.model.layers[cfg.first_k_dense:]:
            layer.mlp.gate.topk_group = cfg.n_expert_groups
        assert (hf_logits(hf, tok) - ours).abs().max() > 1e-3, "group limiting did not affect the selection"


@pytest.mark.parametrize("name", list(CONFIGS)[:2])
def test_logits_match_transformers_float64(name, tmp_path):
    cfg = make_cfg(name)
    model = random_model(cfg).double()
    export_hf(model, tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, experts_implementation="eager").eval()
    tok = tokens(cfg)
    with torch.no_grad():
        ours = model(tok)  # our forward returns float32 logits, so float32 rounding bounds the agreement
    theirs = hf_logits(hf, tok)
    assert theirs.dtype == torch.float64
    diff = (ours.double() - theirs).abs().max().item()
    print(f"{name}: float64 max |logit diff| = {diff:.3g}")
    assert diff <= 2 * torch.finfo(torch.float32).eps * theirs.abs().max().item()


def test_layout_matches_save_pretrained(tmp_path):
    cfg = make_cfg("q_lora-g3k1-top2-shared2")
    export_hf(random_model(cfg), tmp_path / "ours", dtype=torch.bfloat16)
    ref_model = DeepseekV3ForCausalLM(to_hf_config(cfg)).to(torch.bfloat16)
    ref_model.save_pretrained(tmp_path / "ref", max_shard_size="20KB")  # sharded: exercises the index file
    assert (tmp_path / "ref" / "model.safetensors.index.json").is_file()
    ours, ref = load_file(tmp_path / "ours" / "model.safetensors"), load_hf_tensors(tmp_path / "ref")
    assert sorted(ours) == sorted(ref)
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in ours and "lm_head.weight" in ours
    for k in ref:
        assert ours[k].shape == ref[k].shape, k
        # the router bias stays float32 (as in DeepSeek-V3's released checkpoint; HF keeps it float32 on load)
        assert ours[k].dtype == (torch.float32 if "e_score" in k else torch.bfloat16), k
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    assert hf.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    imported = import_hf(tmp_path / "ref")  # transformers-written (sharded, per-expert) directory
    for e in range(cfg.n_routed_experts):
        hf_up = ref[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].float()
        assert torch.equal(imported.layers[1].mlp.experts.up_proj[e], hf_up)
    ours_cfg, ref_cfg = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "ref"))
    legacy = {"rope_theta": cfg.rope_theta, "rope_scaling": None}  # added for transformers 4.x (test below)
    assert ours_cfg == {**ref_cfg, **legacy}
    assert ours_cfg["dtype"] == "bfloat16" and ours_cfg["model_type"] == "deepseek_v3"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(name, tmp_path):
    cfg = make_cfg(name)
    model = random_model(cfg)
    back = import_hf(export_hf(model, tmp_path))
    assert back.cfg == cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not back.moe_routers() or not back.moe_routers()[0].e_score_correction_bias.requires_grad
    assert from_hf_config(to_hf_config(cfg), bias_update_speed=0.01).bias_update_speed == 0.01


def test_import_fused_layout_from_transformers(tmp_path):
    """An HF-born model saved with the fused in-memory expert keys (and an MTP layer to skip) imports exactly."""
    cfg = make_cfg("q_proj-g4k2-top3-shared1")
    torch.manual_seed(3)
    hf = DeepseekV3ForCausalLM(to_hf_config(cfg, num_mtp_layers=1)).eval()
    with torch.no_grad():
        for layer in hf.model.layers[cfg.first_k_dense:]:
            layer.mlp.gate.weight.normal_(0, 0.3)
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.5, 0.5)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    state[f"model.layers.{cfg.n_layers}.eh_proj.weight"] = torch.zeros(cfg.dim, 2 * cfg.dim)  # MTP layer: ignored
    hf.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = import_hf(tmp_path)
    assert ours.cfg == cfg
    tok = tokens(cfg)
    with torch.no_grad():
        diff = (ours(tok) - hf_logits(hf, tok)).abs().max().item()
    print(f"fused import: float32 max |logit diff| = {diff:.3g}")
    assert diff < 1e-5


def test_bad_checkpoints_give_clear_errors(tmp_path):
    cfg = make_cfg("q_proj-g4k2-top3-shared1")
    export_hf(random_model(cfg), tmp_path)
    path = tmp_path / "model.safetensors"
    good = load_file(path)

    def write_and_import(state):
        save_file(state, str(path), metadata={"format": "pt"})
        return import_hf(tmp_path)

    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    with pytest.raises(ValueError, match=rf"missing key '{key}'.*\[16, 32\]"):
        write_and_import({k: v for k, v in good.items() if k != key})
    bad_shape = dict(good, **{"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(80, 15)})
    with pytest.raises(ValueError, match=r"kv_b_proj.weight' has shape \[80, 15\].*\[80, 16\]"):
        write_and_import(bad_shape)
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.0.self_attn.extra.weight'\]"):
        write_and_import(dict(good, **{"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    path.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        import_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path / "nowhere")


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match="only\\s+implements MLA"):
        to_hf_config(ModelConfig(attn_type="mha"))
    with pytest.raises(ValueError, match="latent_norm_eps=1e-05 cannot be exported"):
        to_hf_config(ModelConfig(**{**BASE, **CONFIGS["q_proj-g4k2-top3-shared1"], "latent_norm_eps": 1e-5}))
    hf_cfg = to_hf_config(make_cfg("q_proj-g4k2-top3-shared1"))
    assert from_hf_config(hf_cfg) == make_cfg("q_proj-g4k2-top3-shared1")
    bad = {
        "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
        "rope_interleave": False, "tie_word_embeddings": True, "hidden_act": "gelu",
    }
    for field, value in bad.items():
        d = hf_cfg.to_dict()
        d[field] = value
        with pytest.raises(ValueError, match=field.split("_")[0]):
            from_hf_config(d)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        from_hf_config(hf_cfg, bias_speed=1.0)


def test_export_script_trainer_checkpoint_pt_and_import(tmp_path):
    from configs import DataConfig, JobConfig, dump_config
    from launch.checkpoint import save_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from export_hf import main

    cfg = make_cfg("q_lora-g3k1-top2-shared2")
    model = random_model(cfg)
    run = tmp_path / "run"
    run.mkdir()
    config_text = dump_config(JobConfig(model=cfg, data=DataConfig(seq_len=cfg.max_seq_len)))
    (run / "config.yaml").write_text(config_text)
    tensors = {**model.state_dict(), "optim/lm_head.weight/exp_avg": torch.ones(cfg.vocab_size, cfg.dim)}
    step = save_checkpoint(run / "checkpoints", 10, tensors, meta={}, extra={}, config_text=config_text)
    main([str(step), "--out", str(tmp_path / "hf")])  # uses the config.yaml inside the step directory
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = tokens(cfg)
    with torch.no_grad():
        assert (model(tok) - hf_logits(hf, tok)).abs().max() < 1e-5
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pt")
    main([str(tmp_path / "plain.pt"), "--config", str(run / "config.yaml"), "--out", str(tmp_path / "hf2")])
    main(["--import", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")])
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    main([str(tmp_path / "back.pt"), "--config", str(tmp_path / "back.yaml"), "--out", str(tmp_path / "hf3")])
    first = load_file(tmp_path / "hf" / "model.safetensors")
    for other_dir in ("hf2", "hf3"):  # .pt input and the --import output (with its model.yaml) give the same files
        again = load_file(tmp_path / other_dir / "model.safetensors")
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    other = ModelConfig(**{**BASE, **CONFIGS["q_proj-g4k2-top3-shared1"]})
    (tmp_path / "wrong.yaml").write_text(dump_config(JobConfig(model=other, data=DataConfig(seq_len=24))))
    with pytest.raises(ValueError, match="model weights not found"):
        main([str(tmp_path / "plain.pt"), "--config", str(tmp_path / "wrong.yaml"), "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------- transformers 4.x compatibility
TRANSFORMERS_4 = "transformers==4.57.1"  # the last 4.x release; a throwaway venv on top of this environment
_LOGITS_4X = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokens = torch.load(sys.argv[2])
torch.save({"version": __import__("transformers").__version__, "rope_theta": model.config.rope_theta,
            "logits": model(tokens).logits.detach()}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def transformers_4(tmp_path_factory):
    """A venv that sees this environment's packages (torch) but has transformers 4.57 of its own."""
    import subprocess
    venv = tmp_path_factory.mktemp("tf4") / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], capture_output=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", TRANSFORMERS_4], capture_output=True, text=True,
                         timeout=600) if made.returncode == 0 else made
    if pip.returncode != 0:
        pytest.skip(f"cannot install {TRANSFORMERS_4} in a venv here: {str(pip.stderr)[-300:]}")
    return venv / "bin" / "python"


def _logits_4x(python: Path, directory: Path, tokens: torch.Tensor, tmp_path: Path) -> dict:
    import subprocess
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run([str(python), "-c", _LOGITS_4X, str(directory), str(tmp_path / "tokens.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(tmp_path / "out.pt")


def test_an_export_gives_the_same_logits_in_transformers_4_and_5(tmp_path, transformers_4):
    """rope_theta 1000 (not the default 10000): transformers 4.x reads only the top-level field, which the export
    now writes next to transformers 5's rope_parameters; without it 4.x silently uses 10000."""
    cfg = make_cfg("q_lora-g3k1-top2-shared2")
    model = random_model(cfg)
    out = export_hf(model, tmp_path / "hf")
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens)
        v5 = DeepseekV3ForCausalLM.from_pretrained(out).eval()(tokens).logits
    v4 = _logits_4x(transformers_4, out, tokens, tmp_path)
    assert v4["version"] == TRANSFORMERS_4.split("==")[1] and v4["rope_theta"] == 1000.0
    torch.testing.assert_close(v4["logits"], ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v5, ours, rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    del config["rope_theta"]  # what transformers 5's save_pretrained alone writes
    (out / "config.json").write_text(json.dumps(config))
    stale = _logits_4x(transformers_4, out, tokens, tmp_path)
    assert stale["rope_theta"] == 10000.0 and (stale["logits"] - ours).abs().max() > 1e-3  # the silent bug


def test_export_warns_when_transformers_5_expert_kernel_cannot_run(tmp_path):
    cfg = ModelConfig(**{**BASE, "moe_inter_dim": 6}, **{k: v for k, v in CONFIGS["q_proj-g4k2-top3-shared1"].items()})
    with pytest.warns(UserWarning, match=r"moe_intermediate_size=6: .*experts_implementation='eager'"):
        export_hf(random_model(cfg), tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 16 * 4 bytes: no warning
        export_hf(random_model(make_cfg("q_proj-g4k2-top3-shared1")), tmp_path / "ok")


def _kimi_style(directory: Path) -> None:
    """Rewrite a transformers-written config.json the way Kimi K2's release writes it: model_type kimi_k2, custom
    code in auto_map, the router keys of the original DeepSeek-V3 code, RoPE scaling in the legacy field."""
    config = json.loads((directory / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
                  scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0,
                  rope_theta=rope.pop("rope_theta"), rope_scaling={"type": rope.pop("rope_type"), **rope})
    (directory / "config.json").write_text(json.dumps(config))


def test_a_kimi_k2_style_directory_imports_with_the_same_logits(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from export_hf import main

    cfg = ModelConfig(**{**BASE, **CONFIGS["yarn-dsv3"], "yarn_beta_fast": 1.0, "yarn_beta_slow": 1.0})  # as K2
    torch.manual_seed(0)
    ref = DeepseekV3ForCausalLM(to_hf_config(cfg)).eval()
    ref.save_pretrained(tmp_path / "k2")
    _kimi_style(tmp_path / "k2")
    model = import_hf(tmp_path / "k2")
    assert model.cfg == cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, rtol=1e-5, atol=1e-5)
    main(["--import", str(tmp_path / "k2"), "--print-config"])
    printed = capsys.readouterr().out
    assert "model:" in printed and "yarn_factor: 4.0" in printed and "optim:" not in printed
    config = json.loads((tmp_path / "k2" / "config.json").read_text())
    (tmp_path / "k2" / "config.json").write_text(json.dumps({**config, "scoring_func": "softmax"}))
    with pytest.raises(ValueError, match=r"config.json: scoring_func 'softmax' is not supported"):
        import_hf(tmp_path / "k2")


_CONVERT = """
import re, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from export_hf import main
def rss(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
main([sys.argv[2], "--out", sys.argv[3], "--max-shard-size", "8MB"])  # warm up: imports, first-use allocations
base = rss("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
main([sys.argv[2], "--out", sys.argv[4], "--max-shard-size", sys.argv[5]])
print(rss("VmHWM") - base)
"""


def test_a_checkpoint_converts_to_shards_one_tensor_at_a_time(tmp_path):
    """A ~98 MB model in 16 MB shards: the shards and index load in transformers with our logits, and the
    conversion's peak RSS growth stays under two shards' worth (loading the model whole would take 3x that)."""
    import os
    import subprocess
    from configs import JobConfig, dump_config
    from launch.checkpoint import save_checkpoint

    cfg = ModelConfig(**{**BASE, **CONFIGS["q_proj-g4k2-top3-shared1"], "dim": 256, "moe_inter_dim": 512,
                         "n_routed_experts": 16, "n_expert_groups": 4, "n_layers": 4, "vocab_size": 8192})
    model = random_model(cfg)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    text = dump_config(JobConfig(model=cfg, data=__import__("configs").DataConfig(seq_len=cfg.max_seq_len)))
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints", 1, model.state_dict(), meta={}, extra={},
                           config_text=text)
    shard = 16 * 10**6  # 6x smaller than the model, 2x the largest tensor (as 5 GB shards are for real models)
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(Path(__file__).resolve().parent.parent / "scripts"),
                           str(ckpt), str(tmp_path / "warm"), str(tmp_path / "hf"), str(shard)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.strip().splitlines()[-1])
    files = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    assert len(files) >= model_bytes // shard and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    largest = max(p.numel() * 4 for p in model.parameters() if p.ndim == 2)  # the embedding: a shard of its own
    assert all(f.stat().st_size <= max(shard, largest) + 10**5 for f in files)
    assert peak < 2 * shard, (peak, model_bytes)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- HF-born models: a feature matrix
# Six two-level features over the 8 rows of an L8 orthogonal array: each feature is on in 4 configs and off in 4,
# and every pair of features meets in all four combinations. The sizes are drawn per row from a seeded generator.
FEATURES = ("yarn", "norm_topk_prob", "q_lora", "groups", "mtp", "attention_bias")
L8 = ("111111", "111222", "122112", "122221", "212121", "212212", "221122", "221211")


def matrix_config(row: int) -> tuple[ModelConfig, dict[str, bool]]:
    on = {f: L8[row][j] == "2" for j, f in enumerate(FEATURES)}
    rng = random.Random(1000 + row)
    n_groups = 4 if on["groups"] else 1
    factor = rng.choice([2.0, 4.0])  # max_seq_len 24 = factor x the original context, as in DeepSeek-V3
    yarn = (dict(yarn_factor=factor, yarn_original_max_seq_len=int(24 / factor), yarn_beta_fast=rng.choice([8.0, 32.0]),
                 yarn_beta_slow=1.0, **rng.choice([dict(yarn_mscale=1.0, yarn_mscale_all_dim=1.0),
                                                    dict(yarn_mscale=0.8, yarn_mscale_all_dim=0.5)]))
            if on["yarn"] else {})
    n_heads = rng.choice([2, 4])
    cfg = ModelConfig(
        vocab_size=97, dim=rng.choice([32, 48]), n_layers=rng.choice([2, 3]), attn_type="mla",
        n_heads=n_heads, n_kv_heads=n_heads, q_lora_rank=rng.choice([12, 24]) if on["q_lora"] else 0,
        kv_lora_rank=rng.choice([8, 16]), qk_nope_head_dim=rng.choice([4, 8]), qk_rope_head_dim=rng.choice([2, 4]),
        v_head_dim=rng.choice([4, 8, 12]), attention_bias=on["attention_bias"],
        rope_theta=rng.choice([1000.0, 10000.0]), max_seq_len=24, norm_eps=rng.choice([1e-6, 1e-5]),
        inter_dim=rng.choice([32, 48]), first_k_dense=rng.choice([0, 1]), moe_inter_dim=rng.choice([8, 16, 20]),
        n_routed_experts=8, n_shared_experts=rng.choice([0, 1, 2]), n_activated_experts=rng.choice([2, 3]),
        n_expert_groups=n_groups, n_limited_groups=2 if on["groups"] else 1, route_scale=round(rng.uniform(0.5, 2.5), 3),
        norm_topk_prob=on["norm_topk_prob"], init_std=0.1, **yarn)
    return cfg, on


def test_the_feature_matrix_covers_each_feature_both_ways():
    for j, feature in enumerate(FEATURES):
        assert sorted(row[j] for row in L8) == list("11112222"), feature
        for k in range(j):
            assert {(row[j], row[k]) for row in L8} == {("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")}


def hf_born(cfg: ModelConfig, seed: int):
    """A transformers DeepseekV3ForCausalLM with random weights (also routers, norms and attention biases)."""
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(to_hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("proj.bias") or name.endswith("mqa.bias"):
                p.normal_(0, 0.2)
        for layer in hf.model.layers[cfg.first_k_dense:]:
            layer.mlp.gate.weight.normal_(0, 0.3)
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.5, 0.5)
    return hf


def add_mtp_layer(directory: Path, cfg: ModelConfig) -> int:
    """A DeepSeek-V3-style multi-token-prediction layer (model.layers.{n_layers}.*) in a shard of its own."""
    n, D = cfg.n_layers, cfg.dim
    mtp = {f"model.layers.{n}.{k}": v for k, v in {
        "eh_proj.weight": torch.randn(D, 2 * D), "enorm.weight": torch.ones(D), "hnorm.weight": torch.ones(D),
        "shared_head.norm.weight": torch.ones(D), "shared_head.head.weight": torch.randn(cfg.vocab_size, D),
        "input_layernorm.weight": torch.ones(D), "self_attn.kv_a_proj_with_mqa.weight": torch.randn(4, D),
        "mlp.gate.weight": torch.randn(cfg.n_routed_experts, D), "mlp.experts.0.up_proj.weight": torch.randn(4, D),
    }.items()}
    save_file(mtp, str(directory / "model-mtp.safetensors"), metadata={"format": "pt"})
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    index_path.write_text(json.dumps(index))
    config = json.loads((directory / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    return len(mtp)


def greedy(model, prompt_BT: torch.Tensor, n: int) -> torch.Tensor:
    """Our greedy decoding: the whole sequence again for each new token (no cache)."""
    seq = prompt_BT
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("row", range(len(L8)), ids=lambda r: "+".join(f for f, v in matrix_config(r)[1].items() if v)
                         or "none")
def test_a_transformers_model_imports_from_shards_with_its_logits_and_generations(row, tmp_path):
    """transformers DeepseekV3ForCausalLM -> sharded save_pretrained (float32 or bf16 on disk) -> import_hf:
    logits within 1e-5 and the same greedy generations (transformers' with its KV cache, ours without)."""
    cfg, on = matrix_config(row)
    hf = hf_born(cfg, seed=row)
    dtype = torch.bfloat16 if row % 2 else torch.float32
    hf.to(dtype).save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    # the reference computes in float32 with the weights as stored (bf16-rounded for bf16 rows; not hf.float(),
    # which would keep RoPE's inv_freq buffer rounded to bf16)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    if on["mtp"]:
        n_mtp = add_mtp_layer(tmp_path, cfg)
        with pytest.warns(UserWarning, match=f"skipped {n_mtp} tensors of 1 multi-token-prediction layer"):
            ours = import_hf(tmp_path)
    else:
        ours = import_hf(tmp_path)
    assert ours.cfg == cfg
    ours.eval()
    tok = tokens(cfg, seed=row)
    with torch.no_grad():
        diff = (ours(tok) - hf_logits(hf, tok)).abs().max().item()
    print(f"row {row} {on} {dtype}: max |logit diff| = {diff:.3g}")
    assert diff < 1e-5
    prompt, n_new = tok[:, :6], cfg.max_seq_len - 6
    theirs = hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))
    assert torch.equal(greedy(ours, prompt, n_new), theirs)


# ---------------------------------------------------------------- train.py -> sharded export -> from_pretrained
def _train_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    from launch.trainer import Trainer, init_runtime
    from tests.test_train import debug_cfg

    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.fit()
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, Path(out) / f"stage{rank}.pt")


def test_a_pipeline_trained_checkpoint_exports_to_shards_that_transformers_loads(tmp_path):
    """Trained at pp=2 (attention biases and the balance loss on), saved as DCP, streamed to 300 KB shards:
    from_pretrained gives the logits and greedy generations of the trained weights (the two stages' parameters
    joined in one model here)."""
    from launch.checkpoint import latest_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from export_hf import main
    from tests.dist_utils import run_distributed

    overrides = ["--train.steps=4", "--train.eval_interval=0", "--train.ckpt_interval=4", "--data.grad_accum=2",
                 "--data.micro_batch_size=2", "--model.n_layers=4", "--schedule.warmup_steps=1",
                 "--model.attention_bias=true", "--model.q_lora_rank=16", "--model.seq_aux_loss_alpha=1e-4",
                 "--parallel.pp=2"]
    run_distributed(_train_worker, 2, str(tmp_path / "run"), overrides)
    trained = {**torch.load(tmp_path / "run" / "stage0.pt"), **torch.load(tmp_path / "run" / "stage1.pt")}
    step = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert step is not None and step.name.endswith("4")
    main([str(step), "--out", str(tmp_path / "hf"), "--max-shard-size", "300KB"])
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 2
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from configs import load_config
    cfg = load_config(str(step / "config.yaml")).model
    ours = Transformer(cfg)
    ours.load_state_dict(trained)
    ours.eval()
    assert any(k.endswith("o_proj.bias") and v.abs().max() > 0 for k, v in trained.items())  # biases trained
    tok = tokens(cfg, seed=3)[:, :32]
    with torch.no_grad():
        diff = (ours(tok) - hf_logits(hf, tok)).abs().max().item()
    assert diff < 1e-5
    prompt = tok[:, :8]
    theirs = hf.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))
    assert torch.equal(greedy(ours, prompt, 16), theirs)


def test_only_the_declared_mtp_layers_are_skipped_on_import():
    """A checkpoint deeper than its config (a layer past num_hidden_layers + num_nextn_predict_layers) is an error
    naming the layer, not a silently truncated import; the declared MTP layer is skipped with a warning."""
    from models.hf_interop import from_hf_state_dict, to_hf_state_dict

    cfg = make_cfg(next(iter(CONFIGS)))
    tensors = to_hf_state_dict(random_model(cfg).state_dict(), cfg)
    layer0 = {k: v for k, v in tensors.items() if k.startswith("model.layers.1.")}
    mtp = {k.replace("model.layers.1.", f"model.layers.{cfg.n_layers}."): v for k, v in layer0.items()}
    deeper = {k.replace("model.layers.1.", f"model.layers.{cfg.n_layers + 1}."): v for k, v in layer0.items()}
    with pytest.warns(UserWarning, match="multi-token-prediction"):
        state = from_hf_state_dict({**tensors, **mtp}, cfg, n_mtp_layers=1)
    assert set(state) == set(random_model(cfg).state_dict())
    with pytest.raises(ValueError, match=rf"unexpected keys \['model\.layers\.{cfg.n_layers + 1}\."):
        from_hf_state_dict({**tensors, **mtp, **deeper}, cfg, n_mtp_layers=1)
    with pytest.raises(ValueError, match=rf"unexpected keys \['model\.layers\.{cfg.n_layers}\."):
        from_hf_state_dict({**tensors, **mtp}, cfg, n_mtp_layers=0)


def test_sliced_reads_of_a_fused_expert_layout_give_each_ranks_experts(tmp_path):
    """train.init_from's sliced read (``HFTensors.local``) of the fused ``gate_up_proj`` (gate rows first) and
    stacked ``down_proj``: each expert-parallel rank's experts, gate and up not swapped, equal the full import."""
    from models.hf_interop import HFTensors, _EXPERT_RE

    cfg = make_cfg("q_proj-g4k2-top3-shared1")
    hf = DeepseekV3ForCausalLM(to_hf_config(cfg)).eval()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf.config.save_pretrained(tmp_path)
    full = import_hf(tmp_path).state_dict()
    reader, E, checked = HFTensors(tmp_path), cfg.n_routed_experts, 0
    for key, t in full.items():
        if _EXPERT_RE.fullmatch(key):
            for offset in (0, E // 2):
                got = reader.local(key, (E // 2, *t.shape[1:]), expert_offset=offset)
                assert torch.equal(got, t[offset:offset + E // 2]), (key, offset)
                checked += 1
    gate, up = (full[f"layers.1.mlp.experts.{p}_proj"] for p in ("gate", "up"))
    assert checked and not torch.equal(gate, up)  # the halves differ, so a swap would show


def test_a_malformed_config_json_is_one_line_naming_the_file_and_exit_2(tmp_path):
    """transformers' own checks of config.json (rope_scaling of type llama3 without its keys) end as one line
    naming the file and the keys, exit 2, from scripts/export_hf.py --import and from train.init_from."""
    import subprocess

    from tests.test_train import DATA_DIR, DEBUG

    directory = tmp_path / "hf"
    export_hf(random_model(make_cfg(next(iter(CONFIGS)))), directory)
    raw = json.loads((directory / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (directory / "config.json").write_text(json.dumps(raw))
    expected = re.compile(rf"error: {re.escape(str(directory / 'config.json'))}: Missing required keys in "
                          r"`rope_parameters` for 'rope_type'='llama3': \{'\w+_freq_factor', '\w+_freq_factor'\}")
    root = Path(__file__).resolve().parent.parent
    for cmd in ([sys.executable, str(root / "scripts" / "export_hf.py"), str(directory), "--import", "--out",
                 str(tmp_path / "model.pt")],
                [sys.executable, str(root / "train.py"), "--config", str(DEBUG), f"--data.data_dir={DATA_DIR}",
                 f"--train.output_dir={tmp_path / 'run'}", f"--train.init_from={directory}"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "WANDB_MODE": "disabled"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error") or "Traceback" in line]
        assert len(errors) == 1 and expected.match(errors[0]), proc.stderr[-2000:]
