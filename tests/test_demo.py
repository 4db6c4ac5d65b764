"""`specbatch-demo` end to end on a small slice: both sweeps run, the table and the dashboard are written."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from specbatch.dashboards import demo

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_from_the_repository_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # where `make demo` runs it
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--requests", "20", "--loads", "0.8", "--jobs", "2"]) == 0
    table = pd.read_parquet(out / "runs.parquet")
    n_policies = 2 + len(demo.extra_policies())  # none, adaptive and the extra registered policies
    assert len(table) == n_policies + len(demo.FIXED_GAMMAS)
    assert (table["completed"] == 20).all()
    assert (out / "dashboard.html").stat().st_size > 1_000_000
    assert f"dashboard: {out / 'dashboard.html'}" in capsys.readouterr().out
    assert demo.sim_command()[0].endswith("specbatch-sim")
