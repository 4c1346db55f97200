"""Expert tensor parallelism (``parallel.etp``, gloo): the ETP dispatch equals one process's ``GroupedExperts``
(outputs and every gradient), training at etp2 equals one process, the optimizer orthogonalises each gathered
expert matrix whole, checkpoints move between layouts, and the planner counts ETP's bytes."""
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch.trainer import Trainer, init_runtime
from models import GroupedExperts
from parallel.dims import ParallelDims
from parallel.expert_parallel import ETP_SHARD_DIMS, ExpertParallelExperts
from tests.audit import NoDeviceSync
from tests.dist_utils import run_distributed
from tests.test_sequence_parallel import RUN, SP2, _assert_same_run, _one_process, _records, _train_worker
from tests.test_train import debug_cfg

E, D, I = 4, 8, 8  # I / etp * 4 bytes a multiple of 16: the grouped GEMMs take float32 slices


def test_etp_groups_fold_etp_innermost():
    """Rank within a stage s: etp index s % etp, ep index (s // etp) % ep, edp index s // (etp * ep) (parallel/dims.py;
    design27 section 2's examples). At etp 1 the groups are the folded EP ones of before (no etp group is built)."""
    groups = ParallelDims(dp=4, tp=2, ep=2, etp=2, sp=True).group_ranks()
    assert groups["etp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    tp1 = ParallelDims(dp=2, etp=2).group_ranks()  # at tp 1 the etp pair are data ranks
    assert (tp1["etp"], tp1["ep"], tp1["edp"]) == ([[0, 1]], [[0], [1]], [[0], [1]])
    assert ParallelDims(dp=2, pp=2, etp=2).group_ranks()["etp"] == [[0, 1], [2, 3]]  # within each pipeline stage
    plain = ParallelDims(dp=4, tp=2, ep=4, sp=True).group_ranks()
    assert "etp" not in plain and plain["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match=r"etp \(2\) > 1 with tp \(2\) > 1 needs sp"):
        ParallelDims(dp=2, tp=2, etp=2)
    with pytest.raises(ValueError, match=r"etp \* ep \(2 \* 2\) must divide dp \* cp \* tp \(2\)"):
        ParallelDims(dp=2, ep=2, etp=2)


def _tokens(rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s rows, sorted by expert, and its counts per expert (uneven; some experts get none)."""
    g = torch.Generator().manual_seed(100 + rank)
    counts = torch.randint(0, 4, (E,), generator=g)
    counts[rank % E] = 0
    return torch.randn(int(counts.sum()), D, generator=g, dtype=dtype), counts


def _dispatch_worker(rank, world_size, ep, dtype, grouped):
    pdims = ParallelDims(dp=world_size, ep=ep, etp=world_size // ep)
    groups = pdims.build()
    torch.manual_seed(0)
    full = GroupedExperts(E, D, I, use_grouped=grouped).to(dtype)
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.3)
    experts = ExpertParallelExperts(full, groups.ep_rank, ep, groups.ep_group, groups.etp_rank, groups.etp_size,
                                    groups.etp_group)
    assert experts.gate_proj.shape == (E // ep, I // groups.etp_size, D)
    assert experts.down_proj.shape == (E // ep, D, I // groups.etp_size)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    ref_grads = {name: torch.zeros_like(p) for name, p in full.named_parameters()}
    for r in range(world_size):  # one process: every rank's rows through the whole stacks
        x, counts = _tokens(r, dtype)
        x.requires_grad_(True)
        w = torch.randn(x.shape[0], D, generator=torch.Generator().manual_seed(7 + r), dtype=dtype)
        y_ref = full(x, counts)
        full.zero_grad()
        (y_ref * w).sum().backward()
        for name, p in full.named_parameters():
            ref_grads[name] += p.grad
        if r == rank:
            mine = (x.detach().clone().requires_grad_(True), counts, w, y_ref.detach(), x.grad.clone())
    x, counts, w, y_ref, gx_ref = mine
    # one host synchronisation per MoE forward, as at etp 1: the etp peers' counts are gathered before it (the loop
    # path reads the counts once more itself)
    with NoDeviceSync(tolist_from=("ExpertParallelExperts._exchange_counts",)) if grouped else nullcontext() as audit:
        y = experts(x, counts)
        (y * w).sum().backward()
    assert not grouped or dict(audit.tolist_calls) == {"ExpertParallelExperts._exchange_counts": 1}
    torch.testing.assert_close(y, y_ref, **tol, msg="outputs")
    torch.testing.assert_close(x.grad, gx_ref, **tol, msg="input gradient")
    cols = I // groups.etp_size
    for name, p in experts.named_parameters():
        ref = ref_grads[name][experts.expert_offset:experts.expert_offset + experts.n_local]
        ref = ref.narrow(ETP_SHARD_DIMS[name], groups.etp_rank * cols, cols)
        torch.testing.assert_close(p.grad, ref, **tol, msg=name)  # edp = 1: every token's gradient is here
    # ETP's row exchanges: each rank sends its rows to the other etp peers and their rows of the partial outputs
    # back (forward and backward), none more
    assert set(experts.bytes_sent) == {"etp_all_gather", "etp_reduce_scatter"}, dict(experts.bytes_sent)


def test_etp_dispatch_matches_one_process():
    """float64 (the loop path) at etp2 (tp1 dp2), and float32's grouped GEMMs at ep2 x etp2 (world 4), where forward
    and backward make no host synchronisation but the one ``.tolist()`` of the counts (``NoDeviceSync``)."""
    run_distributed(_dispatch_worker, 2, 1, torch.float64, False)
    run_distributed(_dispatch_worker, 4, 2, torch.float32, True)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("etp_one"))


def _without_balance_loss(records: list[dict]) -> list[dict]:
    """Under dp > 1 the monitor logs data rank 0's balance loss (not averaged over dp); the loss itself is exact."""
    return [{k: v for k, v in r.items() if k != "router/seq_aux_loss"} for r in records]


@pytest.mark.parametrize("layout", [
    ["--parallel.etp=2", "--data.grad_accum=1"],
    [*SP2, "--parallel.etp=2", "--model.loss_chunk_tokens=40"]], ids=["tp1_dp2_etp2", "tp2sp_etp2"])
def test_etp2_training_logs_one_process_run(tmp_path, one_process, layout):
    """etp2 at world 2: each rank holds half of every expert's columns (gate/up) and rows (down), gathers the other
    rank's rows into its GEMMs and reduce-scatters the partial outputs; ZeRO-1 owns each stack on both etp ranks (a
    slice each), Newton-Schulz runs on the gathered whole experts. tp1 dp2: the etp pair are data ranks (a micro
    batch each: one process's 2 x 2 sequences a step); tp2 + SP: the TP pair, each routing its half of the tokens.
    Per-step loss, grad norm, every head's max logit, clip counts, router shares and validation equal one
    process's."""
    run_distributed(_train_worker, 2, str(tmp_path), [*RUN, *layout])
    _assert_same_run(_without_balance_loss(_records(tmp_path)), _without_balance_loss(one_process))


# ------------------------------------------------------------------------------------------------ checkpoints
def _full_stack(name: str) -> torch.Tensor:
    shape = (E, D, I) if name == "down_proj" else (E, I, D)
    return torch.randn(shape, generator=torch.Generator().manual_seed(len(name)))


def _dcp_worker(rank, world_size, path, ep):
    """Each rank's [E/ep, ...] stacks of ETP slices (and a state tensor shaped like them) saved through
    ``shard_views``, then loaded back into zeros."""
    import torch.distributed.checkpoint as dcp
    from launch.checkpoint import shard_views
    from muonclip.placement import Placement

    groups = ParallelDims(dp=world_size, ep=ep, etp=world_size // ep).build()
    cols = I // groups.etp_size
    local, placements = {}, {}
    for name, dim in ETP_SHARD_DIMS.items():
        full = _full_stack(name)[groups.ep_rank * (E // ep):(groups.ep_rank + 1) * (E // ep)]
        local[name] = full.narrow(dim, groups.etp_rank * cols, cols).clone()
        local[f"optim/{name}/momentum_buffer"] = 2 * local[name]
        placements[name] = Placement("expert", dim, groups.etp_group, False)
    dcp.save(shard_views(local, placements, groups), checkpoint_id=path)
    back = {k: torch.zeros_like(v) for k, v in local.items()}
    dcp.load(shard_views(back, placements, groups), checkpoint_id=path)
    for k in local:
        assert torch.equal(back[k], local[k]), k


@pytest.mark.parametrize("world,ep", [(2, 1), (4, 2)], ids=["etp2", "ep2_x_etp2"])
def test_etp_stacks_are_global_tensors_in_a_checkpoint(tmp_path, world, ep):
    """DCP stores an ETP stack as the global [E, ...] tensor (a 2-D [Shard(0), Shard(d)] DTensor on the ep x etp
    mesh at ep2 x etp2; [Shard(d)] at ep 1), read whole in one process and loaded back into the slices."""
    from tests.test_checkpoint import checkpoint_tensors

    run_distributed(_dcp_worker, world, str(tmp_path / "ckpt"), ep)
    saved = checkpoint_tensors(tmp_path / "ckpt", tmp_path / "flat.pt")
    for name in ETP_SHARD_DIMS:
        assert torch.equal(saved[name], _full_stack(name)), name
        assert torch.equal(saved[f"optim/{name}/momentum_buffer"], 2 * _full_stack(name)), name


CKPT = ["--train.steps=6", "--schedule.warmup_steps=2", "--train.eval_interval=0", "--data.micro_batch_size=2",
        "--model.n_layers=3"]
ETP2 = ["--parallel.etp=2", "--data.grad_accum=1"]  # tp1 dp2: a micro batch of 2 a data rank


def _checkpoint_worker(rank: int, world: int, root: str) -> None:
    """tp1 dp2 etp2: 6 steps with a checkpoint at 3 (etp/); one process's step-3 checkpoint resumed to 6 (back/)."""
    torch.set_num_threads(1)
    root = Path(root)
    for name, extra in (("etp", ["--train.ckpt_interval=3"]),
                        ("back", [f"--train.resume={root / 'one' / 'checkpoints' / 'step_00000003'}"])):
        cfg = debug_cfg(root / name, *CKPT, *ETP2, *extra)
        trainer = Trainer(cfg, init_runtime(cfg))
        stack = trainer.model.layers[2].mlp.experts.gate_proj
        assert stack.shape[1] == cfg.model.moe_inter_dim // 2, stack.shape  # half of every expert's columns
        result = trainer.fit()
        if rank == 0:
            (root / f"{name}.json").write_text(json.dumps(result.losses))


def test_etp2_checkpoint_loads_in_one_process_and_back(tmp_path):
    """A tp1 dp2 etp2 checkpoint holds the global expert stacks and their owners' momentum: one process resumes it
    (weights equal the checkpoint's) and continues as etp2 did; one process's checkpoint resumed at etp2 continues
    as one process did."""
    from tests.test_checkpoint import checkpoint_tensors

    cfg = debug_cfg(tmp_path / "one", *CKPT, "--data.grad_accum=2",
                    "--train.ckpt_interval=3")
    one = Trainer(cfg, init_runtime(cfg)).fit().losses
    run_distributed(_checkpoint_worker, 2, str(tmp_path))
    etp, back = ({int(k): v for k, v in json.loads((tmp_path / f"{n}.json").read_text()).items()}
                 for n in ("etp", "back"))
    assert sorted(etp) == list(range(1, 7)) and sorted(back) == [4, 5, 6]
    path = tmp_path / "etp" / "checkpoints" / "step_00000003"
    saved = checkpoint_tensors(path, tmp_path / "flat.pt")
    cfg = debug_cfg(tmp_path / "into_one", *CKPT, "--data.grad_accum=2",
                    f"--train.resume={path}")
    trainer = Trainer(cfg, init_runtime(cfg))
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, saved[name]), f"{name} differs from the checkpoint's global tensor"
    momentum = saved["optim/layers.2.mlp.experts.down_proj/momentum_buffer"]
    assert momentum.shape == trainer.model.layers[2].mlp.experts.down_proj.shape and momentum.abs().sum() > 0
    into_one = trainer.fit().losses
    assert [into_one[s] for s in (4, 5, 6)] == pytest.approx([etp[s] for s in (4, 5, 6)], rel=1e-5, abs=1e-5)
    assert [etp[s] for s in range(1, 7)] == pytest.approx([one[s] for s in range(1, 7)], rel=1e-5, abs=1e-5)
    assert [back[s] for s in (4, 5, 6)] == pytest.approx([one[s] for s in (4, 5, 6)], rel=1e-5, abs=1e-5)


# ------------------------------------------------------------------------------------------------ measurements
def _bytes_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    """The second training step's ETP row-exchange bytes (every MoE layer's ``bytes_sent``), what ``etp_exchange_
    bytes`` gives at the rows each forward received, the optimizer's all-to-all bytes (Newton-Schulz over etp), and
    this rank's parameter and routed-expert bytes."""
    from parallel.plan import etp_exchange_bytes

    torch.set_num_threads(1)
    cfg = debug_cfg(out, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    experts = [m for m in trainer.model.modules() if isinstance(m, ExpertParallelExperts)]
    rows: list[list[int]] = []
    exchange = ExpertParallelExperts._exchange_counts

    def recording(self, counts_E):
        result = exchange(self, counts_E)
        rows.append(result[3])
        return result

    ExpertParallelExperts._exchange_counts = recording
    trainer.train_step()
    for m in experts:
        m.bytes_sent.clear()
    rows.clear()
    trainer.optimizer.comm.bytes_sent.clear()
    trainer.train_step()
    measured = {k: sum(m.bytes_sent[k] for m in experts) for k in ("etp_all_gather", "etp_reduce_scatter")}
    formula = {k: 0 for k in measured}
    for r in rows:
        for k, n in etp_exchange_bytes(r, dist.get_rank() % 2, cfg.model.dim, 4).items():
            formula[k] += n
    params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    routed = sum(p.numel() * p.element_size() for m in experts for p in m.parameters())
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(dict(
        measured=measured, formula=formula, forwards=len(rows), ns=trainer.optimizer.comm_bytes.get("all_to_all", 0),
        params=params, routed=routed)))


@pytest.mark.parametrize("layout", [ETP2, [*ETP2, "--parallel.recompute=full"], [*SP2, "--parallel.etp=2"]],
                         ids=["tp1_dp2_etp2", "full_recompute", "tp2sp_etp2"])
def test_etp_bytes_and_expert_parameters_are_the_planner_s(tmp_path, layout):
    """Per rank: the routed experts' parameter bytes are 1/(ep * etp) of one process's (and the planner's parameter
    bytes the rank's); the row exchanges' bytes are ``etp_exchange_bytes`` at the rows each MoE forward received
    (full recomputation replays them: no more bytes), the planner's figure that formula at the expected (uniform)
    rows; the Newton-Schulz all-to-all over etp (gathering each owned stack's slices, sending the results' back)
    is the planner's."""
    from parallel.plan import etp_exchange_bytes, plan_layout

    overrides = ["--train.eval_interval=0", *layout]
    run_distributed(_bytes_worker, 2, str(tmp_path), overrides)
    cfg = debug_cfg(tmp_path, *overrides)
    m = cfg.model
    moe_layers = m.n_layers - m.first_k_dense
    one_process_routed = moe_layers * 3 * m.n_routed_experts * m.moe_inter_dim * m.dim * 4
    plans = plan_layout(cfg, 2)
    for rank, plan in enumerate(plans):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["routed"] * 2 == one_process_routed, rank  # ep 1 x etp 2
        assert got["params"] == plan.params, rank
        assert got["forwards"] == moe_layers * cfg.data.grad_accum
        assert got["measured"] == got["formula"] and got["measured"]["etp_all_gather"] > 0, rank
        rows = cfg.data.micro_batch_size * cfg.data.seq_len // cfg.parallel.tp * m.n_activated_experts
        uniform = etp_exchange_bytes([rows] * 2, rank % 2, m.dim, 4)
        assert {k: plan.comm[k] for k in uniform} == {k: moe_layers * cfg.data.grad_accum * n
                                                        for k, n in uniform.items()}, rank
        assert got["ns"] == plan.comm.get("all_to_all", 0) and got["ns"] > 0, rank


# ------------------------------------------------------------------------------------------------ optimizer
def _muon_worker(rank: int, world: int) -> None:
    """DistributedMuonClip over ETP slices (tp1 dp2 etp2: edp 1, each rank one slice of every expert) against
    MuonClip on every expert as its own whole matrix, float64, 4 steps with clipping."""
    from torch import nn

    import tests.test_distributed_muon as tdm
    from muonclip import DistributedMuonClip, MuonClip, build_param_groups
    from muonclip.distributed import OptimizerGroups
    from muonclip.placement import Placement

    groups = ParallelDims(dp=world, etp=world).build()
    k, shapes = groups.etp_rank, {"experts.gate_proj": (E, I, D), "experts.down_proj": (E, D, I)}
    dims = {n: ETP_SHARD_DIMS[n.split(".")[1]] for n in shapes}
    cols = I // world
    params, ref = {}, {}
    for n, shape in shapes.items():
        stack = 0.2 * tdm._seeded("init/" + n, shape)
        params[n] = nn.Parameter(stack.narrow(dims[n], k * cols, cols).clone())
        for e in range(E):
            ref[f"{n}.{e}"] = nn.Parameter(stack[e].clone())
    placements = {n: Placement("expert", dims[n], groups.etp_group, False) for n in shapes}
    opt = DistributedMuonClip(build_param_groups(list(params.items())), placements,
                              OptimizerGroups(dp_group=groups.dp_group, edp_group=groups.edp_group),
                              expert_grad_divisor=1, **tdm.HP)
    ref_opt = MuonClip(build_param_groups(list(ref.items())), **tdm.HP)
    assert opt.owned_names() == list(shapes)  # edp 1: both slices of each stack owned here, by the etp pair
    ns_count = tdm._count_ns()
    for step in range(1, 5):
        for n, shape in shapes.items():
            grad = tdm._grad(n, 0, step, shape)
            params[n].grad = grad.narrow(dims[n], k * cols, cols).clone()
            for e in range(E):
                ref[f"{n}.{e}"].grad = grad[e].clone()
        tdm._step_both(opt, ref, ref_opt)  # the grad norms agree: each slice counted once
    for n in shapes:
        for e in range(E):
            tdm._assert_close(params[n][e], ref[f"{n}.{e}"].narrow(dims[n] - 1, k * cols, cols), f"{n}[{e}]")
    # each stack orthogonalised once in the world, as E whole matrices, on its ns_rank
    assert tdm._world_sum(ns_count[0]) == 2 * E * 4


def test_etp_stacks_are_orthogonalised_whole_as_one_process():
    """Exact Muon on ETP stacks: each expert's slices are gathered to one etp rank, Newton-Schulz runs on the whole
    matrix, the result's slices go back; weights after 4 steps and every step's grad norm equal one process's."""
    run_distributed(_muon_worker, 2)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("args,message", [
    (["--parallel.tp=2", "--parallel.etp=2"],
     "parallel config: etp (2) > 1 with tp (2) > 1 needs sequence_parallel: true (expert tensor parallelism splits "
     "the experts over ranks that route different tokens)"),
    (["--parallel.dp=1", "--parallel.etp=2"],
     "parallel config: etp * ep (2 * 1) must divide dp * cp * tp (1 * 1 * 1 = 1): the expert groups are folded over "
     "a stage's ranks"),
    (["--parallel.dp=3", "--parallel.etp=3"],
     "parallel config: etp (3) must divide model.moe_inter_dim (64): expert tensor parallelism splits each routed "
     "expert's columns")], ids=["tp2_without_sp", "not_dividing_the_stage", "moe_inter_dim"])
def test_etp_config_errors_are_one_line_and_exit_2(tmp_path, args, message):
    from tests.test_errors import DEBUG, _train

    proc = _train("--config", str(DEBUG), f"--train.output_dir={tmp_path}", *args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {message} (config: {DEBUG} + overrides --train.output_dir={tmp_path} {' '.join(args)})"]


# ------------------------------------------------------------------------------------------------ HF import
@pytest.mark.parametrize("fused", [False, True], ids=["per_expert_keys", "fused_gate_up"])
def test_hf_reader_gives_each_expert_s_etp_slice(tmp_path, fused):
    """``HFTensors.local`` with an ETP slice reads each expert's columns of gate/up and rows of down, from per-expert
    keys (what save_pretrained writes) and from the fused [E, 2I, H] gate_up_proj (transformers' in-memory form)."""
    from safetensors.torch import save_file

    from models.hf_interop import HFTensors

    stacks = {name: _full_stack(name) for name in ETP_SHARD_DIMS}
    base = "model.layers.1.mlp.experts"
    if fused:
        tensors = {f"{base}.gate_up_proj": torch.cat([stacks["gate_proj"], stacks["up_proj"]], 1),
                   f"{base}.down_proj": stacks["down_proj"]}
    else:
        tensors = {f"{base}.{e}.{name}.weight": stacks[name][e].clone() for name in stacks for e in range(E)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = HFTensors(tmp_path)
    cols = I // 2
    for name, dim in ETP_SHARD_DIMS.items():
        for ep_rank, etp_rank in ((0, 1), (1, 0)):
            local_shape = list(stacks[name].shape)
            local_shape[0], local_shape[dim] = E // 2, cols
            got = source.local(f"layers.1.mlp.experts.{name}", tuple(local_shape), expert_offset=ep_rank * E // 2,
                               shard=(dim, etp_rank * cols))
            expected = stacks[name][ep_rank * E // 2:(ep_rank + 1) * E // 2].narrow(dim, etp_rank * cols, cols)
            assert torch.equal(got, expected), (name, ep_rank, etp_rank)
