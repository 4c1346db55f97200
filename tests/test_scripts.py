"""The documented command-line entry points start: run as ``python path/to/script.py`` (what torchrun does) from
another directory, each must import the project and print its --help."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["train.py", *sorted(str(p.relative_to(ROOT)) for d in ("benchmarks", "scripts")
                               for p in (ROOT / d).glob("*.py"))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_from_any_directory(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
