"""benchmarks/gpu_session.sh, the one prepared script a lent GPU runs, dry-run on the CPU with the tiny pair:
it must run end to end, lay its results out as the repository is, and print the figures the session is for."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_dry_run_prints_every_figure(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "PAIRS": "tiny-llama-draft:tiny-llama", "GRID": "tiny",
           "BUDGET_S": "400", "PROFILE_S": "40", "REPEATS": "2", "VALIDATE_REQUESTS": "16",
           "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = r.stdout
    for section in ("== 1. cpu-tiny-llama-draft__tiny-llama", "== 2. validate", "== 4. figures", "== done"):
        assert section in text, text[-3000:]
    assert "target decode batch 1" in text and "HBM bound" in text  # batch-1 decode against its bandwidth bound
    assert "γ*(b) at context" in text and "roofline bound:" in text
    assert "check γ* non-increasing in batch at α=0.7:" in text
    # the layout a session copies into the repository: the merged profile alone, the passes with the logs
    profile = out / "traces" / "profiles" / "cpu-tiny-llama-draft__tiny-llama"
    assert sorted(p.name for p in profile.iterdir()) == ["meta.json", "steps.csv"]
    assert json.loads((profile / "meta.json").read_text())["timing"]["passes"] == 3
    meas = next((out / "docs" / "measurements").glob("cpu-*"))
    report = json.loads((meas / "validate" / "report.json").read_text())
    assert len(report["calibration"]["speed_by_round"]) == 2  # two rounds
    assert "--- validation tiny-llama-draft / tiny-llama on cpu:" in (meas / "figures.txt").read_text()
