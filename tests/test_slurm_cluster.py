"""launch/slurm.sbatch on a real Slurm: munged, slurmctld and slurmd on this machine (one node, 22.05 from
Debian's slurm-wlm; proctrack/linuxproc, no cgroups), a 2-process CPU training job submitted with sbatch.

- The time limit near (``scancel --signal=USR1 --batch``, what ``--signal=B:USR1@180`` sends): the processes save
  a checkpoint, the script requeues the job, the second start (``SLURM_RESTART_COUNT=1``) resumes from it and the
  run ends with the losses of an uninterrupted one, step for step.
- Preemption (``scancel --signal=TERM`` to every process, then ``scontrol requeue`` as Slurm's PreemptMode=REQUEUE
  does): the same, the requeue being Slurm's.
- A plain ``scancel``: the processes save and the job stays cancelled (not requeued).

Skipped, with the reason, where the packages are missing or the daemons cannot start (not root, no munge key);
.ci/run installs them (apt-get install slurmctld slurmd slurm-client munge)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from launch import checkpoint as ckpt
from tests.test_failures import TORCHRUN, losses, start, train_cmd, wait_for
from tests.test_train import DATA_DIR, DEBUG, ROOT

STEPS = 24
TRAIN = ["--train.eval_interval=0", "--train.ckpt_interval=0", f"--train.steps={STEPS}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str, env: dict | None = None) -> str:
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster for this module; yields the environment its commands need (SLURM_CONF)."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel") if not shutil.which(b)]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                    "slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("starting munged and slurmd here needs root")
    if not Path("/etc/munge/munge.key").is_file():
        pytest.skip("no /etc/munge/munge.key (the munge package's postinst creates it)")
    d = tmp_path_factory.mktemp("slurm")
    procs: list[subprocess.Popen] = []
    if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
    host = socket.gethostname().split(".")[0]
    node = _run("slurmd", "-C").splitlines()[0]
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
KillWait=10
ReturnToService=2
SchedulerParameters=bf_interval=1,sched_interval=1
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf), "WANDB_MODE": "disabled"}
    try:
        for daemon in ("slurmctld", "slurmd"):
            procs.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(d / f"{daemon}.err", "w")))
        try:
            wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                                      text=True).stdout, 30, "the node to be idle")
        except AssertionError:
            logs = "".join((d / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log") if (d / f).exists())
            pytest.skip(f"the Slurm daemons did not start: {logs}")
        yield env
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job without Slurm: torchrun, 2 processes, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    proc = start(train_cmd(out, *TRAIN, launcher=TORCHRUN), out / "log")
    assert proc.wait(timeout=600) == 0, (out / "log").read_text()[-3000:]
    return losses(out)


def _submit(slurm: dict, out: Path) -> str:
    env = {**slurm, "CONFIG": str(DEBUG), "GPUS_PER_NODE": "2", "MASTER_PORT": str(_free_port()),
           "SHUTDOWN_TIMEOUT": "60"}
    text = _run("sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
                "--time=30", f"--output={out}/job.out", f"--chdir={ROOT}", str(ROOT / "launch" / "slurm.sbatch"),
                f"--data.data_dir={DATA_DIR}", f"--train.output_dir={out}", *TRAIN, env=env)
    return text.strip().split(";")[0]


def _job(slurm: dict, job: str) -> dict[str, str]:
    fields = _run("scontrol", "show", "job", job, "-o", env=slurm).split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def _ended(slurm: dict, job: str, out: Path, timeout: float = 600) -> dict[str, str]:
    """Wait until the job is over (not pending, running, requeued or completing)."""
    def over():
        info = _job(slurm, job)
        return info if info["JobState"] in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL") else None
    try:
        return wait_for(over, timeout, f"job {job} to end")
    except AssertionError as e:
        raise AssertionError(f"{e}: {(out / 'job.out').read_text()[-3000:] if (out / 'job.out').exists() else ''}")


def _when_training(slurm: dict, job: str, out: Path) -> None:
    wait_for(lambda: len(losses(out)) >= 4, 300, f"job {job} to train 4 steps")


@pytest.mark.parametrize("how", ["time limit", "preemption"])
def test_a_preempted_job_is_requeued_and_ends_with_the_losses_of_an_uninterrupted_run(slurm, reference, tmp_path,
                                                                                         how):
    out = tmp_path / "run"
    out.mkdir()
    job = _submit(slurm, out)
    try:
        _when_training(slurm, job, out)
        if how == "time limit":  # what --signal=B:USR1@180 sends: the script saves and requeues
            _run("scancel", "--signal=USR1", "--batch", job, env=slurm)
        else:  # preemption: TERM to every process, then Slurm's own requeue (PreemptMode=REQUEUE)
            _run("scancel", "--signal=TERM", job, env=slurm)
            wait_for(lambda: _job(slurm, job)["JobState"] not in ("RUNNING", "COMPLETING"), 300, "the job to stop")
            stopped = max(losses(out))
            _run("scontrol", "requeue", job, env=slurm)
        info = _ended(slurm, job, out)
    finally:
        subprocess.run(["scancel", job], env=slurm, capture_output=True)
    log = (out / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])
    assert f"job {job} (restart 0)" in log and f"job {job} (restart 1)" in log
    if how == "preemption":
        assert ckpt.step_dir(out / "checkpoints", stopped).is_dir()
    assert losses(out) == reference  # every step, exact: the resumed steps are those of the uninterrupted run


def test_a_cancelled_job_saves_and_is_not_requeued(slurm, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    job = _submit(slurm, out)
    try:
        _when_training(slurm, job, out)
        _run("scancel", job, env=slurm)
        _ended(slurm, job, out)
        time.sleep(3)  # a requeue (there must be none) would show by now
        info = _job(slurm, job)
    finally:
        subprocess.run(["scancel", job], env=slurm, capture_output=True)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    stopped = max(losses(out))
    assert stopped < STEPS and ckpt.latest_checkpoint(out / "checkpoints") == ckpt.step_dir(out / "checkpoints",
                                                                                            stopped)
