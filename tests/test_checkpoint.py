"""Checkpoints: bitwise resume in a fresh process, atomic layout, latest/keep-k, clear errors on bad input."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from launch import checkpoint as ckpt
from launch.trainer import Trainer, init_runtime
from tests.dist_utils import run_distributed
from tests.test_train import DATA_DIR, DEBUG, ROOT, debug_cfg

COMMON = ["--train.steps=8", "--schedule.warmup_steps=2", "--train.eval_interval=4", "--train.ckpt_interval=4"]


def train(out_dir, *overrides):
    cfg = debug_cfg(out_dir, *COMMON, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    return trainer, trainer.fit()


def logged_losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def checkpoint_tensors(path: Path, flat_file: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp_to_torch_save(path, flat_file)
    return {k: v for k, v in torch.load(flat_file, weights_only=False).items() if isinstance(v, torch.Tensor)}


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 steps in one go, checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("straight")
    trainer, result = train(out)
    return out, trainer, result


def test_resume_in_a_fresh_process_is_bitwise_identical(straight_run, tmp_path):
    out, trainer, result = straight_run
    resumed = tmp_path / "resumed"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(DEBUG), f"--data.data_dir={DATA_DIR}",
           f"--train.output_dir={resumed}", f"--train.resume={out / 'checkpoints' / 'step_00000004'}", *COMMON]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr

    straight, again = logged_losses(out), logged_losses(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    assert [again[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]  # exact
    a = checkpoint_tensors(out / "checkpoints" / "step_00000008", tmp_path / "a.pt")
    b = checkpoint_tensors(resumed / "checkpoints" / "step_00000008", tmp_path / "b.pt")
    assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # and the checkpoint holds exactly the live model of the straight run
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(a[k], v), k


def test_layout_latest_pointer_and_auto_resume(straight_run, tmp_path):
    out, _, _ = straight_run
    root = out / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4, 8]
    assert (root / "latest").read_text().strip() == "step_00000008"
    assert (root / "step_00000008" / "config.yaml").is_file()
    assert not list(root.glob("*.tmp"))
    assert ckpt.resolve_resume("auto", out) == root / "step_00000008"
    assert ckpt.resolve_resume("none", out) is None
    # an unfinished save (.tmp) and a stale pointer are ignored by "auto"
    fake = tmp_path / "checkpoints"
    for name in ("step_00000002", "step_00000004"):
        (fake / name).mkdir(parents=True)
        (fake / name / ".metadata").write_bytes(b"x")
    (fake / "step_00000006.tmp").mkdir()
    (fake / "latest").write_text("step_00000009\n")
    assert ckpt.latest_checkpoint(fake) == fake / "step_00000004"


def test_garbage_latest_pointer_counts_as_missing(straight_run, tmp_path):
    out, _, _ = straight_run
    root = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", root)
    (root / "latest").write_bytes(b"\xff\xfe\x00garbage\x9c")
    assert ckpt.latest_checkpoint(root) == root / "step_00000008"  # the highest complete step


def _damage(directory: Path, how: str) -> str:
    """Damage a copy of a checkpoint the way disks and people do; returns the file name the error must name."""
    storage = FileSystemReader(directory).read_metadata().storage_data
    where = next(info for index, info in storage.items() if index.fqn == "embed_tokens.weight")
    shard = directory / where.relative_path
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(data[: len(data) // 3])
    elif how == "random bytes inside":  # same size, inside the embedding's bytes: only the checksum can tell
        start = where.offset + where.length // 2
        data[start:start + 65536] = np.random.default_rng(0).bytes(65536)
        shard.write_bytes(bytes(data))
    elif how == "missing":
        shard.unlink()
    elif how == "garbage manifest":
        (directory / "checksums.json").write_bytes(b"\x00\xffnot json")
        return "checksums.json"
    return shard.name


@pytest.mark.parametrize("how,reason", [
    ("truncated", r"\d+ bytes, \d+ expected \(truncated or overwritten\)"),
    ("random bytes inside", r"crc32 mismatch \(contents changed since the save\)"),
    ("missing", "missing"),
    ("garbage manifest", "unreadable"),
])
def test_damaged_checkpoint_is_named_with_its_file_and_nothing_changes(straight_run, tmp_path, how, reason):
    """Every file is verified against checksums.json before anything is loaded: a one-line error naming the
    checkpoint, the file and what is wrong with it, and nothing on disk changes."""
    out, _, _ = straight_run
    bad = tmp_path / "run" / "checkpoints" / "step_00000004"
    shutil.copytree(out / "checkpoints" / "step_00000004", bad)
    name = _damage(bad, how)
    before = tree_digest(bad.parent)
    with pytest.raises(ckpt.DamagedCheckpoint, match=rf"^checkpoint {bad} is damaged \({re.escape(name)}: {reason}"):
        train(tmp_path / "run", f"--train.resume={bad}")
    assert tree_digest(bad.parent) == before


@pytest.mark.parametrize("saver", ["sync", "async"])
def test_files_are_checksummed_as_they_are_written_not_read_back(tmp_path, monkeypatch, saver):
    """Every data file's manifest entry is its size and CRC-32 on disk, taken while DCP wrote it (a 3 MiB tensor
    goes through the helper thread, the small ones inline): the only file the save reads back is the small
    .metadata; the same through the asynchronous saver."""
    import zlib

    from launch.checkpoint import integrity

    read = []
    original = integrity.hash_file
    monkeypatch.setattr(integrity, "hash_file", lambda path, *a: (read.append(Path(path).name), original(path, *a))[1])
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(3 << 18, generator=g), "mid": torch.randn(300, 1000, generator=g),
               "small": torch.arange(10.0)}
    if saver == "sync":
        path = ckpt.save_checkpoint(tmp_path, 1, tensors, {"m": 1}, {"e": 2})
    else:
        saving = ckpt.AsyncSaver()
        saving.save(tmp_path, 1, tensors, {"m": 1}, {"e": 2})
        saving.close()
        path = ckpt.step_dir(tmp_path, 1)
    assert read == [".metadata"]
    manifest = json.loads((path / "checksums.json").read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.suffix == ".distcp" or p.name == ".metadata")
    assert manifest["algorithm"] == "crc32" and sorted(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
    ckpt.verify_checkpoint(path)


OFFLOADED = ["--train.param_dtype=bfloat16", "--train.dtype=bfloat16", "--optim.offload_state=true",
             "--train.ckpt_async=true", "--train.eval_interval=0", "--schedule.warmup_steps=1"]


def test_async_saves_stage_into_one_kept_buffer_and_load_bitwise(tmp_path):
    """``train.ckpt_async`` with ``optim.offload_state``: the first save allocates one staging buffer of the
    state's bytes; the second allocates no host memory (its staged tensors are the same bytes) and each staged
    tensor has a storage of exactly its bytes (DCP's writer writes it without a clone); the checkpoint loads
    bitwise. Before: every save allocated a fresh copy of all state."""
    from tests.audit import LiveBytes

    cfg = debug_cfg(tmp_path, *OFFLOADED)
    trainer = Trainer(cfg, init_runtime(cfg))
    assert trainer.optimizer.offload is not None  # the optimizer state lives in host memory
    peaks, saved = [], []
    for _ in range(2):
        trainer.train_step()
        with LiveBytes() as live:
            trainer.save()
        trainer.saver.wait()
        peaks.append(live.peak)
        saved.append({k: v.to_local().clone() if hasattr(v, "to_local") else v.clone()
                      for k, v in trainer.checkpoint_tensors(saving=True).items()})
    state = sum(t.numel() * t.element_size() for t in saved[1].values())
    print(f"state {state} B; host bytes allocated by the 1st and 2nd save: {peaks}")
    assert peaks[1] < 4096, (peaks, state)  # the 2nd save: the finite check's scalars only
    stager = trainer.saver.stager
    assert stager.allocations == 1 and state <= stager.nbytes < state + 512 * len(saved[1])
    assert stager.nbytes <= peaks[0] < stager.nbytes + 4096  # the 1st: the buffer
    first = {k: (v.data_ptr(), v.untyped_storage().nbytes()) for k, v in stager._views.items()}
    assert all(n == saved[1][k].numel() * saved[1][k].element_size() for k, (_, n) in first.items())
    trainer.train_step()
    trainer.save()
    trainer.saver.wait()
    assert {k: (v.data_ptr(), v.untyped_storage().nbytes()) for k, v in stager._views.items()} == first
    trainer.saver.close()
    for step in (1, 2):
        loaded = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else torch.zeros_like(v)
                  for k, v in saved[step - 1].items()}
        ckpt.load_checkpoint(ckpt.step_dir(trainer.ckpt_root, step), loaded)
        for k, v in saved[step - 1].items():
            assert torch.equal(loaded[k], v), (step, k)


def test_a_checkpoint_with_a_sha256_manifest_still_verifies_and_names_damage(straight_run, tmp_path):
    """Checkpoints written before CRC-32 carry sha256 manifests: they verify, and damage is named with sha256."""
    out, _, _ = straight_run
    old = tmp_path / "step_00000004"
    shutil.copytree(out / "checkpoints" / "step_00000004", old)
    files = json.loads((old / "checksums.json").read_text())["files"]
    entries = {name: {"size": (old / name).stat().st_size,
                      "sha256": hashlib.sha256((old / name).read_bytes()).hexdigest()} for name in files}
    (old / "checksums.json").write_text(json.dumps({"algorithm": "sha256", "files": entries}))
    ckpt.verify_checkpoint(old)
    name = _damage(old, "random bytes inside")
    with pytest.raises(ckpt.DamagedCheckpoint, match=rf"\({re.escape(name)}: sha256 mismatch"):
        ckpt.verify_checkpoint(old)


def test_without_verification_random_bytes_are_caught_as_non_finite_values(straight_run, tmp_path):
    """train.ckpt_verify: false skips the checksums (speed); the finite check still refuses the NaN weights that
    random bytes inside a tensor load as (DCP itself loads them silently)."""
    out, _, _ = straight_run
    bad = tmp_path / "run" / "checkpoints" / "step_00000004"
    shutil.copytree(out / "checkpoints" / "step_00000004", bad)
    _damage(bad, "random bytes inside")
    with pytest.raises(ckpt.DamagedCheckpoint, match=rf"checkpoint {bad} is damaged \([\w./]+: non-finite values\)"):
        train(tmp_path / "run", f"--train.resume={bad}", "--train.ckpt_verify=false")
    shard = max(bad.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ckpt.DamagedCheckpoint, match=rf"checkpoint {bad} is damaged \(loading failed: \w+Error: "):
        train(tmp_path / "run", f"--train.resume={bad}", "--train.ckpt_verify=false")


def test_auto_resume_falls_back_to_the_previous_checkpoint_only_when_asked(straight_run, tmp_path):
    out, _, straight = straight_run
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    _damage(run / "checkpoints" / "step_00000008", "random bytes inside")
    with pytest.raises(ckpt.DamagedCheckpoint, match=r"step_00000008 is damaged .*; set --train.resume_fallback=true "
                                                     r"to resume from the previous checkpoint .*step_00000004 instead"):
        train(run)
    _, result = train(run, "--train.resume_fallback=true")
    assert sorted(result.losses) == [5, 6, 7, 8]  # from step 4, the damaged step 8 written again
    assert [result.losses[s] for s in range(5, 9)] == [straight.losses[s] for s in range(5, 9)]
    alerts = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "alert" in r]
    assert alerts[0]["alert"] == "damaged checkpoint" and "step_00000004" in alerts[0]["text"]


def test_a_failed_resume_leaves_config_yaml_untouched(straight_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight_run[0], run)  # a previous run's output dir, with checkpoints and its config.yaml
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match="different model config"):
        train(run, "--model.dim=32")  # resume: auto picks the checkpoint, whose shapes differ
    assert (run / "config.yaml").read_bytes() == before


def test_auto_resume_continues_and_keeps_last_k(straight_run, tmp_path):
    out, _, _ = straight_run
    first, _ = train(tmp_path, "--train.steps=4", "--train.ckpt_interval=2", "--train.ckpt_keep=1")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [4]
    # same output dir, longer run, resume: auto (default) -> continues at step 4
    trainer, result = train(tmp_path, "--train.steps=8", "--train.ckpt_interval=2", "--train.ckpt_keep=2")
    assert sorted(result.losses) == [5, 6, 7, 8]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [6, 8]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tmp_path, "--train.resume=none")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "step_00000004"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train(tmp_path / "run", f"--train.resume={missing}")


def test_truncated_metadata_is_a_clear_error_and_nothing_is_touched(straight_run, tmp_path):
    out, _, _ = straight_run
    bad = tmp_path / "run" / "checkpoints" / "step_00000004"  # also what resume "auto" picks in run/
    shutil.copytree(out / "checkpoints" / "step_00000004", bad)
    meta = bad / ".metadata"
    meta.write_bytes(meta.read_bytes()[:40])
    before = tree_digest(bad.parent)
    for resume in (str(bad), "auto"):
        with pytest.raises(ckpt.DamagedCheckpoint, match=rf"{bad} is damaged \(\.metadata: unreadable, truncated or corrupt"):
            train(tmp_path / "run", f"--train.resume={resume}")
        assert tree_digest(bad.parent) == before
    incomplete = tmp_path / "step_00000005"
    incomplete.mkdir()
    with pytest.raises(ValueError, match=rf"{incomplete} is incomplete: it has no .metadata"):
        train(tmp_path / "run2", f"--train.resume={incomplete}")


def test_model_shape_mismatch_is_a_clear_error(straight_run, tmp_path):
    out, _, _ = straight_run
    path = out / "checkpoints" / "step_00000004"
    before = tree_digest(out)
    with pytest.raises(ValueError, match=rf"{path} was saved with a different model config \(dim: checkpoint 64 vs config 32"):
        train(tmp_path, f"--train.resume={path}", "--model.dim=32")
    assert tree_digest(out) == before


def test_shape_check_names_the_tensor(straight_run):
    out, trainer, _ = straight_run
    path = out / "checkpoints" / "step_00000004"
    tensors = dict(trainer.checkpoint_tensors())
    tensors["norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"norm.weight: checkpoint \(64,\) vs model \(3,\)"):
        ckpt.load_checkpoint(path, tensors)


def _ep_worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    train(out_dir, "--parallel.ep=2", "--train.eval_interval=0")


def test_expert_parallel_checkpoint_resumes_on_one_process(tmp_path):
    """EP=2 over 2 ranks saves each rank's experts as shards of the global [E, ...] stacks (and their ZeRO-1
    optimizer state); one process without EP resumes from it and continues like the EP run."""
    ep_out = tmp_path / "ep"
    run_distributed(_ep_worker, 2, str(ep_out))
    ep_losses = logged_losses(ep_out)
    assert sorted(ep_losses) == list(range(1, 9))
    _, result = train(tmp_path / "single", f"--train.resume={ep_out / 'checkpoints' / 'step_00000004'}",
                      "--data.micro_batch_size=8", "--train.eval_interval=0")
    assert sorted(result.losses) == [5, 6, 7, 8]
    assert [result.losses[s] for s in range(5, 9)] == pytest.approx([ep_losses[s] for s in range(5, 9)], rel=1e-4)
    a = checkpoint_tensors(ep_out / "checkpoints" / "step_00000008", tmp_path / "a.pt")
    b = checkpoint_tensors(tmp_path / "single" / "checkpoints" / "step_00000008", tmp_path / "b.pt")
    assert a["layers.1.mlp.experts.gate_proj"].shape[0] == 4  # the global stack, not a local shard
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-3, atol=2e-4, msg=f"{k} differs")


def test_on_spike_rolls_back_to_the_last_checkpoint_and_skips_the_batches(tmp_path):
    cfg = debug_cfg(tmp_path, *COMMON, "--monitor.rollback=true")
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.train_step(), trainer.train_step()
    trainer.save()
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(), trainer.train_step()
    event = {"step": 3, "loss": 50.0, "reason": "z_score", "z": 99.0, "median": 8.0, "scale": 0.1}
    assert trainer.on_spike(event) is True
    assert trainer.step == 2 and trainer.loader.global_batches == 2 + 2  # data of steps 2 and 3 skipped
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


class SpikeOnce(Trainer):
    """Blows up the final norm right before step ``at`` (once), as a corrupted update would (with pipeline
    parallelism only the rank holding the last stage has the norm)."""

    at = 25

    def train_step(self):
        if self.step == self.at - 1 and not getattr(self, "_spiked", False):
            self._spiked = True
            if self.model.norm is not None:
                with torch.no_grad():
                    self.model.norm.weight.mul_(30.0)
        return super().train_step()


@pytest.mark.parametrize("ckpt_async,log_interval", [(False, 1), (True, 1), (False, 4)])
def test_injected_spike_is_detected_and_rolled_back_end_to_end(tmp_path, ckpt_async, log_interval):
    """With log_interval 4 the spike (after step 25) is read on the host at step 28: the same rollback (to the
    step-20 checkpoint, skipping the 5 batches of steps 20..24) and the same loader position follow."""
    overrides = ["--train.steps=40", "--train.ckpt_interval=10", "--train.eval_interval=0", "--monitor.rollback=true",
                 f"--train.ckpt_async={str(ckpt_async).lower()}", f"--train.log_interval={log_interval}"]
    cfg = debug_cfg(tmp_path / "spiky", *overrides)
    trainer = SpikeOnce(cfg, init_runtime(cfg))
    result = trainer.fit()
    assert result.final_step == 40 and trainer.rollbacks.metrics()["rollback/count"] == 1
    # spike in 0-based step 24: restored the step-20 checkpoint and skipped the 5 batches of steps 20..24,
    # so the loader is exactly where a spike-free run that never saw those batches would be
    assert trainer.loader.global_batches == 40 + 5
    lines = (tmp_path / "spiky" / "metrics.jsonl").read_text()
    assert '"spike/z"' in lines
    alerts = [r for r in map(json.loads, lines.splitlines()) if "alert" in r]
    assert [(a["alert"], a["level"]) for a in alerts] == [("loss spike: rolled back", "WARN")]
    assert alerts[0]["text"].startswith("loss spike at step 24: loss ")
    assert alerts[0]["text"].endswith("rolled back to step 20 and skipped 5 batches")
    clean_cfg = debug_cfg(tmp_path / "clean", *overrides)
    clean = Trainer(clean_cfg, init_runtime(clean_cfg))
    clean.fit()
    assert clean.rollbacks.metrics()["rollback/count"] == 0  # a clean run raises no alert
    assert "spike/z" not in (tmp_path / "clean" / "metrics.jsonl").read_text()
    assert '"alert"' not in (tmp_path / "clean" / "metrics.jsonl").read_text()


# ------------------------------------------------------------------------------------------------ direct checks
def _fake_checkpoints(root: Path, steps: list[int], complete: list[int]) -> None:
    for step in steps:
        (root / f"step_{step:08d}").mkdir(parents=True)
        if step in complete:
            (root / f"step_{step:08d}" / ".metadata").write_bytes(b"x")


def test_latest_is_trusted_only_when_its_step_is_complete(tmp_path):
    """``latest`` naming a step directory without .metadata (a save that died after the pointer, or a copy cut
    short) is not resumed from: the highest complete step is."""
    _fake_checkpoints(tmp_path, [2, 4, 8], complete=[2, 4])
    (tmp_path / "latest").write_text("step_00000008")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000004"
    (tmp_path / "latest").write_text("step_00000002")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]


def test_resume_fallback_takes_the_previous_checkpoint_not_the_oldest(tmp_path):
    """With three complete checkpoints and the newest damaged, the fallback is the one before it."""
    from types import SimpleNamespace

    _fake_checkpoints(tmp_path, [2, 4, 8], complete=[2, 4, 8])
    alerts = []
    fake = SimpleNamespace(ckpt_root=tmp_path, step=0,
                           cfg=SimpleNamespace(train=SimpleNamespace(resume="auto", resume_fallback=True)),
                           metrics=SimpleNamespace(alert=lambda *a: alerts.append(a)))
    damaged = tmp_path / "step_00000008"
    assert Trainer._fallback(fake, damaged, ckpt.DamagedCheckpoint("damaged")) == tmp_path / "step_00000004"
    assert Trainer._fallback(fake, tmp_path / "step_00000004", ckpt.DamagedCheckpoint("x")) == tmp_path / "step_00000002"
    assert len(alerts) == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_finite_check_catches_nan_and_both_infinities(bad):
    from launch.checkpoint import integrity

    t = torch.ones(3, 4)
    t[1, 2] = bad
    assert integrity.first_non_finite({"ok": torch.ones(2), "w": t, "later": t.clone()}) == "w"
    assert integrity.first_non_finite({"ok": torch.ones(2), "ids": torch.arange(3)}) is None
    assert integrity.first_non_finite({"half": t.to(torch.bfloat16)}) == "half"


STAGE = ["--data.seq_len=256", "--model.max_seq_len=256", "--data.micro_batch_size=1", "--model.yarn_factor=4",
         "--model.yarn_original_max_seq_len=64", "--data.document_mask=true", "--data.reset_positions=true"]


def test_a_sequence_length_stage_resumes_a_shorter_run_with_yarn(straight_run, tmp_path):
    """64 -> 256 tokens with YaRN switched on (factor 4 over the original 64) and document masking, through
    train.py from the 64-token run's step-4 checkpoint: weights and optimizer state carry over, the loader
    continues at the same number of tokens consumed (the same 256 tokens per step: 4 x 64 = 1 x 256), the change is
    alerted with what changed, and data/seq_len steps up in the metrics (W&B)."""
    out, _, _ = straight_run
    step4 = out / "checkpoints" / "step_00000004"
    stage = tmp_path / "stage"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(DEBUG), f"--data.data_dir={DATA_DIR}",
           f"--train.output_dir={stage}", f"--train.resume={step4}", *COMMON, *STAGE]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alert = next(line for line in proc.stderr.splitlines() if "sequence-length stage" in line)
    for change in ("model.max_seq_len 64 -> 256", "model.yarn_factor 1.0 -> 4.0",
                   "model.yarn_original_max_seq_len 4096 -> 64", "data.seq_len 64 -> 256",
                   "consumed 1,024 tokens (16 samples); continuing at sample 4 (1,024 tokens)"):
        assert change in alert, (change, alert)
    before = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    tokens = {r["step"]: r["tokens"] for r in before + after if "tokens" in r}
    steps = sorted(r["step"] for r in after if "loss" in r)
    assert steps == [5, 6, 7, 8] and all(math.isfinite(r["loss"]) for r in after if "loss" in r)
    assert [tokens[s] for s in range(4, 9)] == [1024 + k * 256 for k in range(5)]  # 256 tokens per step
    assert {r["data/seq_len"] for r in before if "loss" in r} == {64}
    assert {r["data/seq_len"] for r in after if "loss" in r} == {256}
    # the optimizer state (and weights) the resumed run starts from are the checkpoint's
    cfg = debug_cfg(tmp_path / "probe", *COMMON, *STAGE, f"--train.resume={step4}")
    trainer = Trainer(cfg, init_runtime(cfg))
    saved = checkpoint_tensors(step4, tmp_path / "s.pt")
    live = trainer.checkpoint_tensors()
    assert any(k.startswith("optim/") for k in live)
    for k, v in live.items():
        assert torch.equal(saved[k], v), k
    trainer.close()


def test_a_stage_may_change_only_the_context(straight_run, tmp_path):
    out, _, _ = straight_run
    cfg = debug_cfg(tmp_path / "x", *COMMON, *STAGE, "--model.rope_theta=500.0",
                    f"--train.resume={out / 'checkpoints' / 'step_00000004'}")
    with pytest.raises(ValueError, match=r"different model config \(rope_theta: checkpoint 10000.0 vs config 500.0\)"):
        Trainer(cfg, init_runtime(cfg))
