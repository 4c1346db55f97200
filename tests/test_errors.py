"""Failure paths of train.py: one line per failing process, exit codes, the traceback in the rank's log file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.errors import exit_code, one_line, run_reporting_errors

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "configs" / "debug.yaml"


def _train(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})


def test_config_errors_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    proc = _train("--config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: unknown key 'lrr' in section 'optim' ({bad}). Did you mean 'lr'? "
                                        "Valid keys in 'optim': lr, momentum, nesterov, ns_steps, ns_dtype, ns_coefficients, ns_path, weight_decay, "
                                        "adamw_betas, adamw_eps, adamw_lr_scale, qk_clip, qk_clip_tau, qk_clip_mode, "
                                        "grad_clip, master_weights, offload_state"]
    bad.write_bytes(b"optim:\n  lr: \xff\n")
    proc = _train("--config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: config file {bad} is not UTF-8 text (byte 13: invalid start byte)"]


def test_data_errors_log_the_traceback_and_debug_prints_it(tmp_path):
    out = tmp_path / "out"
    args = ["--config", str(DEBUG), f"--train.output_dir={out}", f"--data.data_dir={tmp_path / 'cache'}",
            f"--data.sources=[{{path: {tmp_path}/missing}}]"]
    proc = _train(*args)
    assert proc.returncode == 2
    log = out / "logs" / "rank0.log"
    assert proc.stderr.splitlines() == [f"error: data source {tmp_path}/missing: no such file or directory, and no file "
                                        f"matches it as a glob (traceback: {log})"]
    assert "Traceback" in log.read_text() and "FileNotFoundError" in log.read_text()
    debug = _train(*args, env={"MUONCLIP_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith(f"error: data source {tmp_path}/missing")
    assert log.read_text().count("Traceback (most recent call last)") == 2  # appended, not overwritten


def test_every_rank_prints_one_line_under_torchrun(tmp_path):
    out = tmp_path / "out"
    proc = _train("--config", str(DEBUG), f"--train.output_dir={out}", f"--data.data_dir={tmp_path / 'cache'}",
                  f"--data.sources=[{{path: {tmp_path}/missing}}]", "--train.device=cpu",
                  launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert proc.returncode != 0
    ours = sorted(line for line in proc.stderr.splitlines() if line.startswith("error"))
    assert [line.split("]:")[0] for line in ours] == ["error [rank 0", "error [rank 1"]
    assert all(f"data source {tmp_path}/missing: no such file or directory" in line for line in ours)
    assert sorted(os.listdir(out / "logs")) == ["rank0.log", "rank1.log"]


class _FakeCheckpointException(BaseException):
    """torch 2.13's CheckpointException derives from BaseException, not Exception."""


@pytest.mark.parametrize("error,code,line", [
    (ValueError("bad value\nmore detail"), 2, "bad value"),
    (FileNotFoundError("no such file x"), 2, "no such file x"),
    (FloatingPointError("loss is nan at step 3"), 1, "FloatingPointError: loss is nan at step 3"),
    (RuntimeError(""), 1, "RuntimeError"),
    (_FakeCheckpointException("shard 3 unreadable"), 1, "_FakeCheckpointException: shard 3 unreadable"),
])
def test_exit_codes_and_lines(tmp_path, capsys, error, code, line):
    def fail() -> int:
        raise error

    assert run_reporting_errors(fail, lambda: str(tmp_path)) == code
    assert capsys.readouterr().err.splitlines() == [f"error: {line} (traceback: {tmp_path}/logs/rank0.log)"]
    assert exit_code(error) == code and one_line(error) == line
    assert run_reporting_errors(lambda: 0, lambda: None) == 0
