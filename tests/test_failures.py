"""Production failure paths end to end: preemption (SIGTERM/Ctrl-C) saves and resumes bitwise, a stopped or stuck
rank is named by the watchdog within train.dist_timeout_s, a full / read-only / size-limited disk fails a save
with a clear line and loses nothing, asynchronous saves commit only when complete (a kill mid-save never leaves a
`latest` pointing at an incomplete checkpoint), and W&B alerts are raised and rate-limited."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from launch import checkpoint as ckpt
from launch.metrics import MetricsLogger
from launch.trainer import Trainer, init_runtime
from launch.watchdog import Watchdog
from tests.test_checkpoint import checkpoint_tensors
from tests.test_train import DATA_DIR, DEBUG, ROOT, debug_cfg

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train(out_dir, *overrides):
    cfg = debug_cfg(out_dir, *overrides)
    trainer = Trainer(cfg, init_runtime(cfg))
    return trainer, trainer.fit()


def train_cmd(out_dir, *overrides, launcher=None) -> list[str]:
    return [*(launcher or [sys.executable]), str(ROOT / "train.py"), "--config", str(DEBUG),
            f"--data.data_dir={DATA_DIR}", f"--train.output_dir={out_dir}", *overrides]


def start(cmd, log: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), **kwargs)


def records(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out_dir) if "loss" in r}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (torchrun's workers), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """40 uninterrupted steps of configs/debug.yaml."""
    out = tmp_path_factory.mktemp("reference")
    _, result = train(out, "--train.eval_interval=0")
    return result.losses


# ------------------------------------------------------------------------------------------------ preemption
def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_resumes_bitwise(tmp_path, reference):
    out = tmp_path / "run"
    cmd = train_cmd(out, "--train.eval_interval=0")
    proc = start(cmd, tmp_path / "first.log")
    wait_for(lambda: len(losses(out)) >= 5, 120, "5 steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    stopped = max(losses(out))
    assert 5 <= stopped < 40
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest == ckpt.step_dir(out / "checkpoints", stopped)  # the step it stopped at, with ckpt_interval 0
    log = (tmp_path / "first.log").read_text()
    assert f"alert [WARN] preempted: SIGTERM: stopped after step {stopped} of 40 and saved {latest}" in log
    again = start(cmd, tmp_path / "second.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    resumed = losses(out)
    assert [resumed[s] for s in range(stopped + 1, 41)] == [reference[s] for s in range(stopped + 1, 41)]  # exact


_WAIT_FOR_SIGNALS = """
import sys, time
sys.path.insert(0, {root!r})
from launch.preemption import PreemptionHandler
PreemptionHandler.duplicate_window_s = {window}
handler = PreemptionHandler().install()
print("ready", flush=True)
while handler.received is None:
    time.sleep(0.01)
print("stopping", handler.signal_name, flush=True)  # a trainer would now finish its step and save
time.sleep(60)
print("saved", flush=True)
"""


def _waiting(window: float = 5.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WAIT_FOR_SIGNALS.format(root=str(ROOT), window=window)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


@pytest.mark.parametrize("first,second,window", [(signal.SIGINT, signal.SIGINT, 5.0),
                                                 (signal.SIGTERM, signal.SIGINT, 5.0),
                                                 (signal.SIGINT, signal.SIGTERM, 5.0),
                                                 (signal.SIGTERM, signal.SIGTERM, 0.2)])
def test_a_second_signal_aborts_at_once(first, second, window):
    """Ctrl-C twice, a SIGTERM then Ctrl-C, a Ctrl-C then SIGTERM (at once: the duplicate window is for a second
    SIGTERM only), or a second SIGTERM later than the duplicate window: the process ends at once, without saving."""
    proc = _waiting(window)
    try:
        proc.send_signal(first)
        assert proc.stdout.readline() == f"stopping {first.name}\n"
        time.sleep(window if first == second else 0)
        t0 = time.monotonic()
        proc.send_signal(second)
        assert proc.wait(timeout=30) == -second and time.monotonic() - t0 < 5
        assert proc.stdout.read() == ""  # never reached "saved"
    finally:  # a second signal that was ignored must not leave the process behind
        proc.kill()


def test_a_sigterm_delivered_twice_at_once_is_one_request():
    """Slurm signals every process of a job on preemption or scancel and torchrun forwards its own SIGTERM, so a
    worker gets two within milliseconds: the second is the same request, the save goes on."""
    proc = _waiting()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "stopping SIGTERM\n"
    time.sleep(1)
    assert proc.poll() is None  # still saving
    proc.send_signal(signal.SIGINT)  # Ctrl-C: now end it
    assert proc.wait(timeout=30) == -signal.SIGINT


_BUSY_IN_C = """
import sys, torch
sys.path.insert(0, {root!r})
from launch.preemption import PreemptionHandler
torch.set_num_threads(1)
handler = PreemptionHandler().install()
big = torch.randn(6000, 6000)
print("ready", flush=True)
sys.stdin.readline()
print("computing", flush=True)
big @ big @ big  # one long call into C: Python signal handlers wait for it to return
print("saved", flush=True)
"""


def test_a_second_signal_ends_the_process_while_it_is_busy_in_c():
    """After a first SIGTERM, Ctrl-C ends the process at the OS level, not when the main thread next runs Python:
    a rank stuck in a collective (here: one long matmul) can still be stopped at once."""
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_IN_C.format(root=str(ROOT))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "computing\n"
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == -signal.SIGINT and time.monotonic() - t0 < 1.0, time.monotonic() - t0
    assert proc.stdout.read() == ""


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Under torchrun, a signal that reaches only rank 1 still makes both ranks save the same step and exit 0."""
    out = tmp_path / "run"
    proc = start(train_cmd(out, "--train.eval_interval=0", "--train.steps=100000", launcher=TORCHRUN),
                 tmp_path / "log", start_new_session=True)
    try:
        wait_for(lambda: len(losses(out)) >= 3, 180, "3 steps")
        workers = wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == 2 else None, 30, "2 workers")
        os.kill(workers[1], signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:  # a failure must not leave the 100,000-step job running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = max(losses(out))
    assert ckpt.latest_checkpoint(out / "checkpoints") == ckpt.step_dir(out / "checkpoints", stopped)
    assert "a signal on another rank: stopped after step" in (tmp_path / "log").read_text()  # rank 0 logs


# ------------------------------------------------------------------------------------------------ watchdog
def test_a_stopped_rank_is_named_within_the_timeout(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    timeout = 6
    proc = start(train_cmd(out, "--train.eval_interval=0", "--train.steps=100000",
                           f"--train.dist_timeout_s={timeout}",
                           launcher=[*TORCHRUN[:-1], "--nproc_per_node=2", "--shutdown-timeout=2"]), log)
    workers = []
    try:
        wait_for(lambda: len(losses(out)) >= 3, 180, "3 steps")
        _stopped_rank_1_is_named(proc, log, timeout, workers)
        alerts = [r for r in records(out) if "alert" in r]
        assert [(a["alert"], a["level"]) for a in alerts] == [("rank watchdog", "ERROR")]
        assert alerts[0]["text"].startswith("rank(s) 1 silent for")
    finally:
        _kill(proc, workers)


def _stopped_rank_1_is_named(proc: subprocess.Popen, log: Path, timeout: float, workers: list[int]) -> None:
    """SIGSTOP torchrun's rank 1 (its pids go into ``workers``): rank 0 names it silent within the timeout (and a
    heartbeat interval of slack) and the job ends with a failure."""
    workers += wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == 2 else None, 30, "2 workers")
    os.kill(workers[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    line = wait_for(lambda: next((ln for ln in log.read_text().splitlines()
                                  if ln.startswith("error [rank 0]: rank(s) 1 silent")), None),
                    timeout + 20, "the watchdog's line")
    elapsed = time.monotonic() - stopped_at
    assert elapsed < timeout + 3, elapsed
    assert f"ending the job (train.dist_timeout_s={timeout})" in line
    assert proc.wait(timeout=60) != 0


def _kill(proc: subprocess.Popen, workers: list[int]) -> None:
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()


def test_a_pipeline_step_longer_than_the_timeout_runs_and_a_stopped_stage_is_still_named(tmp_path):
    """Under PP the trainer reports progress per pipeline action (a chunk's forward or backward), not per step:
    steps of 128 micro batches, each longer than train.dist_timeout_s, run (before, the watchdog ended the job as
    "all ranks stuck" in the first step); a SIGSTOP'd stage is then named as silent within the timeout."""
    out, log = tmp_path / "run", tmp_path / "log"
    timeout = 2
    proc = start(train_cmd(out, "--parallel.pp=2", "--data.grad_accum=128", "--data.micro_batch_size=8",
                           "--train.eval_interval=0", "--train.steps=100000", f"--train.dist_timeout_s={timeout}",
                           launcher=[*TORCHRUN[:-1], "--nproc_per_node=2", "--shutdown-timeout=2"]), log)
    workers = []
    try:
        wait_for(lambda: len(losses(out)) >= 1 or proc.poll() is not None, 300, "a step")
        started = time.monotonic()
        wait_for(lambda: len(losses(out)) >= 2 or proc.poll() is not None, 300, "another step")
        step_s = time.monotonic() - started
        assert proc.poll() is None and "error" not in log.read_text(), log.read_text()[-2000:]
        assert step_s > timeout, f"a step took {step_s:.1f} s: not longer than the timeout, nothing was tested"
        _stopped_rank_1_is_named(proc, log, timeout, workers)
    finally:
        _kill(proc, workers)


def test_a_torchrun_restart_resumes_from_the_latest_checkpoint(tmp_path):
    """--max-restarts=1: a worker killed mid-run makes torchrun restart both, which resume from `latest` by
    themselves and redo the lost steps with the same losses."""
    out, log = tmp_path / "run", tmp_path / "log"
    proc = start(train_cmd(out, "--train.steps=12", "--train.ckpt_interval=4", "--train.eval_interval=0",
                           launcher=[*TORCHRUN, "--max-restarts=1"]), log)
    try:
        wait_for(lambda: len(losses(out)) >= 6, 180, "6 steps")
        workers = wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == 2 else None, 30, "2 workers")
        os.kill(workers[1], signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    assert "resumed from" in log.read_text()
    logged = [(r["step"], r["loss"]) for r in records(out) if "loss" in r]
    steps = [s for s, _ in logged]
    redone = [s for i, s in enumerate(steps) if s in steps[:i]]
    assert redone and steps[-1] == 12, steps  # some steps ran twice: before the kill and after the restart
    for step in redone:
        assert len({loss for s, loss in logged if s == step}) == 1, step  # bitwise the same both times


class _DictStore:
    def __init__(self):
        self.data, self.lock = {}, threading.Lock()

    def set(self, key, value):
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        with self.lock:
            return self.data[key]


def _watchdogs(timeout: float):
    store, failures = _DictStore(), []
    dogs = [Watchdog(store, r, 3, timeout) for r in range(3)]
    for dog in dogs:
        dog._fail = failures.append  # record instead of ending the process
    return dogs, failures


def test_watchdog_names_the_rank_that_stopped_making_progress():
    """A deadlocked rank keeps its heartbeat thread alive; rank 0 names it as the one behind the others."""
    dogs, failures = _watchdogs(timeout=1.0)
    for dog in dogs:
        dog.start()
        dog.arm()
    for _ in range(3):  # ranks 0 and 2 get ahead, rank 1 hangs before its next micro batch
        dogs[0].progress(7)
        dogs[2].progress(7)
    wait_for(lambda: failures, 10, "a failure")
    for dog in dogs:
        dog.stop()
    assert failures[0].startswith("rank(s) 1 stuck (alive but no progress; rank 1 at step 0) for ")
    assert failures[0].endswith("ending the job (train.dist_timeout_s=1)")


def test_watchdog_stays_quiet_while_busy_or_progressing():
    dogs, failures = _watchdogs(timeout=1.0)
    for dog in dogs:
        dog.start()
    time.sleep(1.6)  # not armed yet: building data and model may take long
    for dog in dogs:
        dog.arm()
    with dogs[0].busy():  # a long checkpoint save
        time.sleep(1.6)
    for _ in range(16):
        for dog in dogs:
            dog.progress()
        time.sleep(0.1)
    for dog in dogs:
        dog.stop()
    assert failures == []


def test_watchdog_stays_quiet_while_another_rank_than_0_is_busy():
    """Rank 1 in a long phase (its checkpoint save) while ranks 0 and 2 wait for it without progress: rank 0, the
    one that judges "stuck", reads rank 1's busy flag from the store and stays quiet (not only for its own save)."""
    dogs, failures = _watchdogs(timeout=1.0)
    with dogs[1].busy():  # published from rank 1's first heartbeat on: no moment where it looks idle
        for dog in dogs:
            dog.start()
            dog.arm()
        time.sleep(4.0)  # timeout + 6 heartbeats: without rank 1's flag rank 0 judges them stuck at ~2-2.5 s
    for dog in dogs:
        dog.stop()
    assert failures == []


# ------------------------------------------------------------------------------------------------ save failures
def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB file system: one debug checkpoint (~13.5 MB) fits, a second does not. Needs mount rights."""
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, 20):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN); the size-limit test covers the path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_names_the_path_and_keeps_the_previous_checkpoint(small_disk):
    out = small_disk / "run"
    with pytest.raises(OSError) as info:
        train(out, "--train.steps=8", "--train.ckpt_interval=4", "--train.eval_interval=0")
    root = out / "checkpoints"
    message = str(info.value)
    assert message.startswith(f"checkpoint save to {root / 'step_00000008'} failed: no space left on device")
    assert message.endswith(f"MiB free there; {root / 'step_00000004'} is intact"), message
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4] and not list(root.glob("*.tmp"))
    assert ckpt.latest_checkpoint(root) == root / "step_00000004"
    _, result = train(out, "--train.steps=6", "--train.eval_interval=0")  # the intact one resumes
    assert sorted(result.losses) == [5, 6]


def test_read_only_checkpoint_dir_is_named(small_disk, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (small_disk / "ckpts").mkdir()
    (out / "checkpoints").symlink_to(small_disk / "ckpts")
    train(out, "--train.steps=4", "--train.ckpt_interval=4", "--train.eval_interval=0", "--schedule.warmup_steps=2")
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode == 0
    with pytest.raises(OSError, match=r"checkpoint save to .*step_00000008 failed: read-only file system .*; "
                                      r".*step_00000004 is intact"):
        train(out, "--train.steps=8", "--train.ckpt_interval=4", "--train.eval_interval=0")


def test_a_file_size_limit_fails_the_save_with_one_line_and_exit_2(tmp_path):
    """Runs anywhere (no mount rights): RLIMIT_FSIZE makes the checkpoint write fail with EFBIG."""
    out = tmp_path / "run"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    proc = subprocess.run(train_cmd(out, "--train.steps=2", "--train.ckpt_interval=2", "--train.eval_interval=0",
                                   "--schedule.warmup_steps=1"),
                          cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(ours) == 1, proc.stderr[-3000:]
    assert ours[0].startswith(f"error: checkpoint save to {out / 'checkpoints' / 'step_00000002'} failed: file too "
                              "large (a file-size limit, ulimit -f?)"), ours[0]
    assert not list((out / "checkpoints").glob("*.tmp")) and ckpt.latest_checkpoint(out / "checkpoints") is None


# ------------------------------------------------------------------------------------------------ async saves
def test_async_checkpoints_equal_synchronous_ones_and_report_blocked_time(tmp_path):
    _, sync = train(tmp_path / "sync", "--train.steps=8", "--train.ckpt_interval=4", "--train.eval_interval=0")
    _, asyn = train(tmp_path / "async", "--train.steps=8", "--train.ckpt_interval=4", "--train.eval_interval=0",
                    "--train.ckpt_async=true")
    assert asyn.losses == sync.losses
    for step in (4, 8):
        a = ckpt.step_dir(tmp_path / "sync" / "checkpoints", step)
        b = ckpt.step_dir(tmp_path / "async" / "checkpoints", step)
        assert (b / "checksums.json").is_file()
        ta, tb = checkpoint_tensors(a, tmp_path / "a.pt"), checkpoint_tensors(b, tmp_path / "b.pt")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    recs = records(tmp_path / "async")
    assert [r["step"] for r in recs if "ckpt/blocked_s" in r] == [4, 8]
    assert len([r for r in recs if "ckpt/save_s" in r]) == 2
    _, resumed = train(tmp_path / "async", "--train.steps=12", "--train.ckpt_interval=4", "--train.eval_interval=0",
                       "--train.ckpt_async=true")
    assert sorted(resumed.losses) == [9, 10, 11, 12]


_SLOW_COMMIT = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
from launch.checkpoint import integrity
original = integrity.write_manifest
def slow(directory, entries, referenced):
    if "step_00000008" in str(directory):
        pathlib.Path({marker!r}).write_text("writing")
        time.sleep(600)
    return original(directory, entries, referenced)
integrity.write_manifest = slow
from tests.test_train import debug_cfg
from launch.trainer import Trainer, init_runtime
cfg = debug_cfg({out!r}, "--train.steps=8", "--train.ckpt_interval=4", "--train.eval_interval=0",
                "--train.ckpt_async=true")
Trainer(cfg, init_runtime(cfg)).fit()
"""


def test_a_kill_during_an_async_save_never_leaves_latest_at_an_incomplete_checkpoint(tmp_path):
    """Killed when step 8's data and .metadata are on disk but before the commit: `latest` still names step 4,
    the .tmp is ignored, and the next run resumes from step 4."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    script = _SLOW_COMMIT.format(root=str(ROOT), marker=str(marker), out=str(out))
    proc = start([sys.executable, "-c", script], tmp_path / "log")
    wait_for(marker.is_file, 180, "the save of step 8 to be under way")
    proc.kill()
    proc.wait(timeout=30)
    root = out / "checkpoints"
    assert (root / "step_00000008.tmp" / ".metadata").is_file()  # DCP had finished writing: only the commit was left
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert ckpt.latest_checkpoint(root) == root / "step_00000004"
    _, result = train(out, "--train.steps=8", "--train.ckpt_interval=4", "--train.eval_interval=0")
    assert sorted(result.losses) == [5, 6, 7, 8]
    assert not (root / "step_00000008.tmp").exists() and (root / "step_00000008" / "checksums.json").is_file()


# ------------------------------------------------------------------------------------------------ alerts
class _FakeRun:
    def __init__(self):
        self.alerts, self.config = [], {}

    def alert(self, title, text, level=None, wait_duration=None):
        self.alerts.append((title, str(level), text))


def test_alerts_are_rate_limited_per_title_and_always_logged(tmp_path):
    cfg = debug_cfg(tmp_path, "--monitor.alert_wait_s=3600")
    logger = MetricsLogger(cfg, {}, enabled=True)
    logger._wandb = run = _FakeRun()
    assert logger.alert("loss spike", "z 9.1 at step 3", step=3)
    assert not logger.alert("loss spike", "z 8.0 at step 5", step=5)  # within alert_wait_s
    assert logger.alert("preempted", "SIGTERM at step 6", "WARN", step=6)
    logger._wandb = None
    logger.close()
    assert [(t, lvl) for t, lvl, _ in run.alerts] == [("loss spike", "AlertLevel.WARN"), ("preempted", "AlertLevel.WARN")]
    logged = [r for r in records(tmp_path) if "alert" in r]
    assert [(r["alert"], r["step"]) for r in logged] == [("loss spike", 3), ("loss spike", 5), ("preempted", 6)]


def test_a_non_finite_loss_raises_an_error_alert(tmp_path):
    cfg = debug_cfg(tmp_path, "--train.steps=3", "--train.eval_interval=0", "--schedule.warmup_steps=1")
    trainer = Trainer(cfg, init_runtime(cfg))
    with torch.no_grad():
        trainer.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        trainer.fit()
    logged = [r for r in records(tmp_path) if "alert" in r]
    assert [(r["alert"], r["level"]) for r in logged] == [("non-finite loss", "ERROR")]


def test_wandb_gets_the_alerts_metric_sections_and_the_muon_coverage(tmp_path, monkeypatch):
    """A real offline W&B run: the alert, the define_metric sections and the coverage table are in its records."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = debug_cfg(tmp_path, "--train.steps=2", "--train.eval_interval=0", "--schedule.warmup_steps=1")
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.metrics.alert("loss spike", "z 9.1 at step 1; rolled back", step=1)
    trainer.fit()
    needles = (b"loss spike", b"z 9.1 at step 1; rolled back", b"max_logit/*", b"qk_clip/*", b"router/*",
               b"spike/*", b"muon_coverage", b"e_score_correction_bias")
    stream = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    missing = lambda: [n for n in needles if n not in stream.read_bytes()]  # noqa: E731
    try:  # W&B's service process may still be flushing the stream when finish() returns
        wait_for(lambda: not missing(), 30, "the W&B records")
    except AssertionError:
        raise AssertionError(f"not in the W&B run records: {missing()}") from None


def _dist_damaged(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    args = ["--train.steps=4", "--schedule.warmup_steps=2", "--train.eval_interval=0", "--train.ckpt_interval=4",
            "--data.micro_batch_size=2"]
    train(out, *args)
    if rank == 1:  # rank 1 damages its own file, which rank 0 verifies (file i goes to rank i % 2)
        directory = Path(out) / "checkpoints" / "step_00000004"
        names = sorted(json.loads((directory / "checksums.json").read_text())["files"])
        assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        victim = directory / names[2]  # written by rank 1, verified by rank 0
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        (Path(out) / "victim").write_text(victim.name)
    torch.distributed.barrier()
    try:
        train(out, *args[1:], "--train.steps=6")
    except ckpt.DamagedCheckpoint as e:
        (Path(out) / f"error{rank}").write_text(str(e))


def test_a_damaged_file_stops_every_rank_with_the_same_error(tmp_path):
    from tests.dist_utils import run_distributed
    run_distributed(_dist_damaged, 2, str(tmp_path))
    victim = (tmp_path / "victim").read_text()
    errors = [(tmp_path / f"error{r}").read_text() for r in range(2)]
    assert errors[0] == errors[1]
    assert errors[0] == (f"checkpoint {tmp_path / 'checkpoints' / 'step_00000004'} is damaged ({victim}: crc32 "
                         "mismatch (contents changed since the save))")


def _dist_async(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    args = ["--train.steps=6", "--schedule.warmup_steps=2", "--train.eval_interval=0", "--train.ckpt_interval=3",
            "--data.micro_batch_size=2"]
    _, sync = train(Path(out) / "sync", *args)
    _, asyn = train(Path(out) / "async", *args, "--train.ckpt_async=true")
    _, resumed = train(Path(out) / "async", *args[1:], "--train.steps=9", "--train.ckpt_async=true")
    torch.save({"sync": sync.losses, "async": asyn.losses, "resumed": resumed.losses}, Path(out) / f"r{rank}.pt")


def test_async_saves_at_dp2_with_zero1_equal_synchronous_ones(tmp_path):
    from tests.dist_utils import run_distributed
    run_distributed(_dist_async, 2, str(tmp_path))
    r = [torch.load(tmp_path / f"r{k}.pt") for k in range(2)]
    assert r[0]["async"] == r[0]["sync"] == r[1]["sync"] and sorted(r[0]["async"]) == list(range(1, 7))
    assert sorted(r[0]["resumed"]) == [7, 8, 9]
    for step in (3, 6):
        ta = checkpoint_tensors(ckpt.step_dir(tmp_path / "sync" / "checkpoints", step), tmp_path / "a.pt")
        tb = checkpoint_tensors(ckpt.step_dir(tmp_path / "async" / "checkpoints", step), tmp_path / "b.pt")
        assert any(k.startswith("optim/") for k in ta)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
