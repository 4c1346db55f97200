"""Document masking (data.document_mask, data.reset_positions): a packed sample of several documents trains as
if each document were its own sequence, QK-Clip's max logits cover exactly the pairs softmax sees, the sample
index gives the exact boundaries, and training with it reproduces one process on other layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.loader import BatchLoader, packed_samples
from models.layers import causal_max_logits, document_positions
from tests.conftest import inductor_cpp
from tests.test_model import VARIANTS, make

LENGTHS = (11, 17, 8)  # three documents packed into one sample of 36 tokens


def _segments(lengths=LENGTHS) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def dense_document_mask(segments_BT: torch.Tensor) -> torch.Tensor:
    """The brute-force reference: [B, 1, T, T] bool, True where query t may attend key s (s <= t, one document)."""
    T = segments_BT.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments_BT.device).tril()
    return (segments_BT[:, None, :, None] == segments_BT[:, None, None, :]) & causal


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_train_as_the_documents_alone(variant):
    """With reset positions, each token's loss, every gradient and each layer's max logits of a packed sample equal
    those of its documents run one by one (float64; no balance loss, which is per sequence by definition)."""
    model = make(**variant).train()
    model.reset_positions = True
    T = sum(LENGTHS)
    tokens, targets = torch.randint(0, 97, (1, T)), torch.randint(0, 97, (1, T))
    seg = _segments()
    model.reset_step_stats()
    packed = F.cross_entropy(model(tokens, None, seg)[0], targets[0], reduction="none")
    packed.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    packed_max = [layer.self_attn.max_logits_H.clone() for layer in model.layers]
    model.zero_grad()
    model.reset_step_stats()
    alone, start = [], 0
    for n in LENGTHS:
        loss = F.cross_entropy(model(tokens[:, start:start + n])[0], targets[0, start:start + n], reduction="none")
        loss.sum().backward()
        alone.append(loss.detach())
        start += n
    torch.testing.assert_close(packed.detach(), torch.cat(alone), rtol=0, atol=1e-12)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[n], p.grad, rtol=0, atol=1e-12, msg=n)
    # the max logits are float32 products (the probe multiplies q and k in float32, also for a float64 model), from
    # matmuls of another length (36 keys packed, 11/17/8 alone): equal to float32's tolerance, not bitwise (the
    # kernels' summation order depends on the shape and the instruction set: 3.7e-9 apart on AVX2)
    for layer, expected in zip(model.layers, packed_max):  # separate runs keep the running max over the three
        torch.testing.assert_close(layer.self_attn.max_logits_H, expected, rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS[1:3])  # GQA and MLA
@pytest.mark.parametrize("reset", [False, True])
def test_max_logits_are_those_of_the_masked_logits(variant, reset):
    """Each head's recorded max logit, and QK-Clip's post-step probe, equal a brute-force max of scale * q.k over
    the (query, key) pairs the document mask lets through; without the mask they would be larger."""
    model = make(**variant).train()
    model.reset_positions = reset
    attn = model.layers[1].self_attn
    seen = {}
    attn.register_forward_hook(lambda m, args, out: seen.update(args=args), with_kwargs=False)
    seg = _segments()
    tokens = torch.randint(0, 97, (1, seg.shape[1]))
    model.reset_step_stats()
    model(tokens, None, seg)
    x, *documents = seen["args"]
    assert len(documents) == (2 if reset else 1) and torch.equal(documents[0].segments_BT, seg)
    q, k, _ = attn._qkv(x, documents[1] if reset else None)
    s = (q @ k.transpose(-1, -2)) * attn.scale
    masked = s.masked_fill(~dense_document_mask(seg), float("-inf")).amax(dim=(0, 2, 3))
    causal = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(attn.max_logits_H, masked.to(attn.max_logits_H.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(attn.probe_max_logits(x, *documents).double(), masked, rtol=1e-6, atol=1e-6)
    assert (causal > masked + 1e-9).any()  # the pairs across documents would have raised some heads' maxima


@pytest.mark.parametrize("T,chunk", [(40, 8), (1100, 512)], ids=["T40-chunk8", "T1100-default-chunk"])
def test_chunked_max_logit_probe_masks_every_query_chunk_with_its_own_documents(T, chunk):
    """``causal_max_logits`` forms q.k^T in query chunks: each chunk's queries are masked with their OWN documents
    (rows of different documents in each batch row, boundaries inside and across chunks), equal to a brute-force
    max over the pairs the document mask lets through (float32 at float32 precision; the chunks only split rows)."""
    g = torch.Generator().manual_seed(5)
    B, H, d, scale = 2, 3, 8, 0.3
    q, k = torch.randn(B, H, T, d, generator=g), torch.randn(B, H, T, d, generator=g)
    segments = torch.stack([torch.randint(0, T // 6, (T,), generator=g).sort().values for _ in range(B)])
    kwargs = {} if chunk == 512 else dict(chunk=chunk)
    got = causal_max_logits(q, k, scale, segments_BT=segments, **kwargs)
    s = (q @ k.transpose(-1, -2)) * scale
    masked = s.masked_fill(~dense_document_mask(segments), float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    causal = causal_max_logits(q, k, scale, **kwargs)
    assert (causal > masked + 1e-3).any()  # the mask does hide the largest pairs
    # the documents of the first chunk alone would hide or admit other pairs (what the test tells apart)
    first = segments[:, :chunk].repeat(1, T // chunk + 1)[:, :T]
    wrong = s.masked_fill(~(torch.ones(T, T, dtype=torch.bool).tril() & (first[:, None, :, None]
                                                                        == segments[:, None, None, :])),
                          float("-inf")).amax(dim=(0, 2, 3))
    assert not torch.allclose(wrong, masked, rtol=1e-3, atol=0)


def test_one_document_or_masking_off_changes_nothing():
    model = make(**VARIANTS[3]).train()
    tokens = torch.randint(0, 97, (2, 30))
    plain = model(tokens)
    one_document = torch.zeros(2, 30, dtype=torch.int32)
    torch.testing.assert_close(model(tokens, None, one_document), plain, rtol=0, atol=1e-12)
    model.reset_positions = True
    torch.testing.assert_close(model(tokens, None, one_document), plain, rtol=0, atol=1e-12)
    assert torch.equal(document_positions(_segments()), torch.cat([torch.arange(n) for n in LENGTHS])[None])


def test_the_loader_gives_each_tokens_document_from_the_index():
    """Token value = its document's id, so a document boundary is where the value changes: the segments the
    loader returns count exactly those boundaries within each window (documents in shuffled order)."""
    lengths = np.random.default_rng(0).integers(1, 20, 60)
    tokens = np.repeat(np.arange(60), lengths)
    samples = packed_samples(tokens, seq_len=16, seed=3, doc_lengths=lengths)
    loader = BatchLoader(samples, 4, document_mask=True)
    for _ in range(5):
        inputs, targets, seg = loader.next_batch()
        assert seg.dtype == torch.int32 and seg.shape == inputs.shape
        changes = torch.cat([torch.zeros(4, 1, dtype=torch.long), (inputs[:, 1:] != inputs[:, :-1]).long()], 1)
        assert torch.equal(seg.long(), changes.cumsum(1))
    plain = BatchLoader(samples, 4)
    assert len(plain.next_batch()) == 2


def write_short_documents(path):
    """Documents of one sentence of the embedded corpus: most 64-token windows hold several."""
    import json

    from data.corpus import iter_documents

    with open(path, "w", encoding="utf-8") as f:
        for _, doc in zip(range(30), iter_documents()):
            for sentence in doc["text"].split(". ")[:40]:
                f.write(json.dumps({"text": sentence}) + "\n")
    return path


LAYOUTS = {"dp2-ep2": ["--parallel.ep=2", "--data.micro_batch_size=2"],
           "pp2-interleaved": ["--parallel.pp=2", "--parallel.pp_schedule=interleaved_1f1b",
                               "--parallel.pp_virtual_stages=2", "--model.n_layers=4"]}


@pytest.mark.parametrize("layout,mode", [("dp2-ep2", "forward"), ("dp2-ep2", "post_step"),
                                         ("pp2-interleaved", "forward")])
def test_training_with_document_masking_reproduces_one_process(tmp_path, layout, mode):
    """dp=2 x ep=2 with ZeRO-1 (QK-Clip in both modes: the post-step probe gets the segments too) and interleaved
    pp=2 (every stage gets the segments), MLA + MoE, QK-Clip clipping, document masking with reset positions: the
    losses and clip counts of one process; and not those of the same run without masking (the windows do cross
    documents)."""
    from launch.runtime import init_runtime
    from launch.trainer import Trainer
    from tests.dist_utils import run_distributed
    from tests.test_train import DP_COMMON, _dp_worker, debug_cfg

    short = write_short_documents(tmp_path / "short.jsonl")
    common = [*DP_COMMON, "--parallel.optimizer=zero1", f"--optim.qk_clip_mode={mode}", "--train.steps=4",
              "--train.eval_interval=4", "--schedule.warmup_steps=1", f"--data.sources=[{{path: {short}}}]",
              f"--data.data_dir={tmp_path / 'cache'}", "--data.val_fraction=0.1"]
    masked = ["--data.document_mask=true", "--data.reset_positions=true"]
    run_distributed(_dp_worker, 2, str(tmp_path / "dp"), [*common, *masked, *LAYOUTS[layout]])
    ranks = [torch.load(tmp_path / "dp" / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["clipped"] > 0
    runs = {}
    for name, extra in (("masked", masked), ("plain", [])):
        model = [x for x in LAYOUTS[layout] if x.startswith("--model.")]
        cfg = debug_cfg(tmp_path / name, *common, *extra, *model, "--data.micro_batch_size=4")
        trainer = Trainer(cfg, init_runtime(cfg))
        runs[name] = trainer.fit()
        if name == "masked":
            clip = trainer.qkclip_post or trainer.qkclip
            # each pipeline rank clips its own layers' heads; each data-parallel rank all of them
            assert int(clip.last_clipped) == (sum(r["clipped"] for r in ranks) if "pp" in layout
                                              else ranks[0]["clipped"])
    ref = runs["masked"]
    assert [ranks[0]["losses"][s] for s in range(1, 5)] == pytest.approx([ref.losses[s] for s in range(1, 5)],
                                                                         rel=1e-4, abs=1e-4)
    assert ranks[0]["val"] == pytest.approx(ref.val_losses, rel=1e-4, abs=1e-4)
    assert abs(runs["plain"].losses[4] - ref.losses[4]) > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention's max scores need CUDA "
                    "(benchmarks/gpu_check.sh runs this test when a GPU is lent)")
@pytest.mark.parametrize("variant", VARIANTS[1:3])  # GQA and MLA
def test_flex_attention_with_the_document_block_mask_matches_sdpa_on_cuda(variant):
    """attention_impl flex with a document block mask: the logits, max logits and gradients of SDPA with the
    boolean mask + the float32 probe (float32)."""
    ref = make(dtype=torch.float32, **variant).cuda().train()
    flex = make(dtype=torch.float32, attention_impl="flex", **variant).cuda().train()
    flex.load_state_dict(ref.state_dict())
    tokens, seg = torch.randint(0, 97, (2, 48), device="cuda"), _segments((20, 5, 23)).repeat(2, 1).cuda()
    for model in (ref, flex):
        model.reset_positions = True
        model.reset_step_stats()
        model(tokens, None, seg).float().pow(2).mean().backward()
    torch.testing.assert_close(flex(tokens, None, seg), ref(tokens, None, seg), rtol=1e-4, atol=1e-4)
    for a_ref, a_flex in zip(ref.layers, flex.layers):
        torch.testing.assert_close(a_flex.self_attn.max_logits_H, a_ref.self_attn.max_logits_H, rtol=1e-4, atol=1e-5)
    for (name, p_ref), p_flex in zip(ref.named_parameters(), flex.parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p_flex.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_a_document_masked_step_synchronises_once_per_forward_for_the_document_lengths(tmp_path):
    """Document masking with reset positions and the post-step QK-Clip probe (bf16 MoE step): the positions
    (searchsorted) and the masked max logits add nothing a CUDA stream would wait on; the one read is each
    forward's document lengths (per-document attention launches kernels per document), once per forward (the two
    micro batches and the post-step probe's), not per layer, and from the loader's segments in host memory (the
    trainer leaves them there: models/document_mask.py; on CUDA benchmarks/gpu_check.sh runs the step under
    ``torch.cuda.set_sync_debug_mode("error")``)."""
    from tests.audit import NoDeviceSync
    from tests.test_precision import BF16_RUN, trainer_for

    trainer = trainer_for(tmp_path, *BF16_RUN, "--train.steps=3", "--data.document_mask=true",
                          "--data.reset_positions=true", "--optim.qk_clip_mode=post_step")
    assert trainer.cfg.data.grad_accum == 2 and len(trainer.model.layers) > 1
    trainer.train_step()
    counters = {st["step"].data_ptr() for st in trainer.optimizer.state.values() if "step" in st}
    allow = (lambda func, args: func is torch.ops.aten._local_scalar_dense.default
             and args[0].data_ptr() in counters)
    with NoDeviceSync(allow, tolist_from=("document_lengths",)) as audit:
        trainer.train_step()
    assert dict(audit.tolist_calls) == {"document_lengths": 3}


# ------------------------------------------------------------------------------------------------ memory O(T)
def _attention_layer_peak(T: int, attn_type: str) -> int:
    """The most tensor bytes a one-head document-masked attention layer holds over its forward (train mode: the
    max-logit probe runs) and backward at T tokens, documents of 100 to 836 tokens (float32, one thread)."""
    from models.attention import build_attention
    from models.config import ModelConfig
    from models.document_mask import Documents
    from tests.audit import LiveBytes
    from tests.test_model import TINY

    torch.manual_seed(0)
    attn = build_attention(ModelConfig(**{**TINY, "attn_type": attn_type, "n_heads": 1, "n_kv_heads": 1,
                                          "max_seq_len": T})).train()
    documents = Documents.build(_segments((100, 412, 700, 836) * (T // 2048)), "sdpa")
    x = torch.randn(1, T, attn.o_proj.out_features, requires_grad=True)
    with LiveBytes() as live:
        attn(x, documents).sum().backward()
    return live.peak


@pytest.mark.parametrize("attn_type", ["mha", "mla"])
def test_a_document_masked_attention_layer_holds_memory_linear_in_T(attn_type):
    """No [T, T] tensor: the tensor-bytes peak (tests/audit.py ``LiveBytes``) of a document-masked attention layer's
    forward + backward grows at most 2.2x per doubling of T (measured 2.00x and 2.00x for both; the [B, 1, T, T]
    boolean mask through SDPA gave 3.97x and 3.98x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peaks = [_attention_layer_peak(T, attn_type) for T in (2048, 4096, 8192)]
    finally:
        torch.set_num_threads(threads)
    ratios = [b / a for a, b in zip(peaks, peaks[1:])]
    assert max(ratios) <= 2.2, (peaks, ratios)


def test_recomputed_mla_up_projections_drop_q_k_v_with_documents_as_without():
    """Per-document attention saves views of q, k and v (each document's span): ``mla_up_proj`` recompute still
    hands them back from the latents (bitwise the same gradients) and keeps as many bytes fewer as without
    documents: q, k and v (36 tokens x 4 heads x 12 values each, float64) less the q projection's output the region
    keeps instead (no q compression), in every layer; and documents change nothing of the bytes kept."""
    from parallel.recompute import apply_recompute
    from tests.audit import SavedBytes

    tokens, seg = torch.randint(0, 97, (1, sum(LENGTHS))), _segments()
    saved, grads = {}, {}
    for recompute in (False, True):
        for documents in ((), (seg,)):
            model = make(**VARIANTS[2]).train()
            if recompute:
                apply_recompute(model, "selective", ["mla_up_proj"])
            with SavedBytes(model) as meter:
                loss = model(tokens, None, *documents).pow(2).mean()
            loss.backward()
            saved[recompute, bool(documents)] = meter.device
            grads[recompute, bool(documents)] = [p.grad for p in model.parameters() if p.grad is not None]
    dropped = (3 - 1) * 36 * 4 * 12 * 8 * len(make(**VARIANTS[2]).layers)
    assert saved[False, True] - saved[True, True] == saved[False, False] - saved[True, False] == dropped, saved
    assert saved[False, True] == saved[False, False], saved
    for documents in (False, True):
        assert all(torch.equal(a, b) for a, b in zip(grads[True, documents], grads[False, documents]))


# ------------------------------------------------------------------------------------------------ flex
@inductor_cpp
def test_the_flex_block_mask_is_compiled_once_and_shared_by_every_layer(monkeypatch):
    """attention_impl flex: each forward builds one block mask (compiled ``create_block_mask``) that every layer
    gets; three micro batches of different documents compile nothing after the first (dynamo's counters); compiled
    flex attention with it (its forward runs on CPU; backward and max scores are CUDA-only, so the max-logit
    request is left out here) gives SDPA's per-document logits; the planner counts its bytes."""
    import models.attention as attention
    from models.document_mask import block_mask_bytes
    from torch._dynamo.utils import counters

    masks = []

    def flex_forward(q, k, v, scale, documents):  # _flex_with_max without the CUDA-only max scores
        masks.append(documents.block_mask)
        out = attention._compiled_flex()(q, k, v, block_mask=documents.block_mask, scale=scale)
        return out, torch.full((q.shape[1],), float("-inf"))

    monkeypatch.setattr(attention, "_flex_with_max", flex_forward)
    flex = make(dtype=torch.float32, attention_impl="flex", **VARIANTS[1]).eval()
    sdpa = make(dtype=torch.float32, **VARIANTS[1]).eval()
    tokens = torch.randint(0, 97, (2, 48))
    graphs = [counters["stats"]["unique_graphs"]]  # before
    for lengths in ((20, 5, 23), (48,), (1, 30, 9, 8)):
        seg = torch.cat([_segments(lengths), _segments((10, 38))])
        masks.clear()
        with torch.no_grad():
            out, ref = flex(tokens, None, seg), sdpa(tokens, None, seg)
        graphs.append(counters["stats"]["unique_graphs"])
        assert len(masks) == len(flex.layers) and all(m is masks[0] for m in masks)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert graphs[1] > graphs[0] and graphs[3] == graphs[2] == graphs[1], graphs
    held = sum(t.numel() * t.element_size() for t in masks[0].as_tuple() if isinstance(t, torch.Tensor))
    assert block_mask_bytes(2, 48) == held


@inductor_cpp
def test_compiled_blocks_run_per_document_attention_eagerly_and_compile_once():
    """train.compile with document masking (SDPA): per-document attention is a graph break (its kernel calls follow
    the documents), and so is the max-logit probe with documents (its blocks follow their lengths): three micro
    batches of different documents (counts and lengths) compile and recompile nothing after the first (dynamo's
    graphs and the frames it compiles, recompilations included: a frame that reads the lengths would guard on
    each), and the outputs and recorded max logits are eager's (float32, a few ulps; forward only: backward
    compiles no guard)."""
    from parallel.parallelize import apply_compile
    from torch._dynamo.utils import counters

    compiled, eager = (make(dtype=torch.float32, **VARIANTS[2]).train() for _ in range(2))
    apply_compile(compiled, fullgraph_dense=False)  # launch/build.py: not one graph with per-document attention
    tokens = torch.randint(0, 97, (2, 48))
    graphs = [(counters["stats"]["unique_graphs"], counters["frames"]["total"])]  # before
    for lengths in ((20, 5, 23), (48,), (1, 30, 9, 8)):
        seg = torch.cat([_segments(lengths), _segments((10, 38))])
        with torch.no_grad():
            out, ref = compiled(tokens, None, seg), eager(tokens, None, seg)
        graphs.append((counters["stats"]["unique_graphs"], counters["frames"]["total"]))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled.layers, eager.layers):
        torch.testing.assert_close(a.self_attn.max_logits_H, b.self_attn.max_logits_H, rtol=1e-5, atol=1e-6)
    assert graphs[1][0] > graphs[0][0] and graphs[3] == graphs[2] == graphs[1], graphs
