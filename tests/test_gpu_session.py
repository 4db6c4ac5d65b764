"""benchmarks/gpu_session.sh, the one prepared script a lent GPU runs, dry-run on the CPU with the tiny pair:
it must run end to end and print the figures the GPU session is for."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_dry_run_prints_every_figure(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "TARGET": "tiny-llama",
           "DRAFT": "tiny-llama-draft", "GRID": "tiny", "BUDGET_S": "150", "PROFILE_S": "40", "OLD_S": "40",
           "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for section in ("== 1. engine-style profile", "== 3. figures", "== done"):
        assert section in out, out[-3000:]
    assert "target decode batch 1" in out and "HBM bound" in out  # batch-1 decode against its bandwidth bound
    assert "γ*(b) at context" in out and "roofline bound:" in out
    assert (tmp_path / "out" / "profiles" / "engine" / "steps.csv").is_file()
