"""The documented command-line entry points start: run as ``python path/to/script.py`` (what torchrun does) from
another directory, each must import the project and print its --help (``_name.py`` files are helpers the scripts
import, not entry points)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["train.py", *sorted(str(p.relative_to(ROOT)) for d in ("benchmarks", "scripts")
                               for p in (ROOT / d).glob("*.py") if not p.name.startswith("_"))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_from_any_directory(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("signal_name,requeued", [("SIGUSR1", True), ("SIGTERM", False)])
def test_slurm_script_forwards_the_signal_saves_and_requeues_only_before_the_time_limit(tmp_path, signal_name,
                                                                                       requeued):
    """launch/slurm.sbatch under stub srun/torchrun/scontrol: the job asks for requeue and an early SIGUSR1,
    passes --cpus-per-task to srun explicitly, forwards SIGTERM to the training processes and waits for them;
    it requeues the job on SIGUSR1 (the time limit is near) and not on SIGTERM (preemption, whose requeue is
    SLURM's own, or a plain scancel, which must stay cancelled)."""
    import os
    import signal
    import time

    script = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@" in script
    log = tmp_path / "calls.log"
    _stub(tmp_path, "scontrol", f'if [[ "$1" == show ]]; then echo node0; else echo "scontrol $*" >> {log}; fi\n')
    _stub(tmp_path, "srun", f'echo "srun $*" >> {log}\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stub(tmp_path, "torchrun", f'trap \'echo "training got SIGTERM" >> {log}; exit 0\' TERM\n'
                                f'echo "torchrun $*" >> {log}\nwhile true; do sleep 0.05; done\n')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_NODELIST": "node0", "SLURM_JOB_ID": "42", "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "16",
           "GPUS_PER_NODE": "2"}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--train.steps=5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while "torchrun" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signal_name))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun --ntasks-per-node=1 --cpus-per-task=16 ")
    assert "--shutdown-timeout=" in calls[1] and calls[1].endswith("--train.steps=5")
    assert calls[2:] == ["training got SIGTERM", *(["scontrol requeue 42"] if requeued else [])]
