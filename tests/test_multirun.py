"""Multirun plumbing: a sweep writes every run under one folder (joblib launcher), and an interrupted
sweep resumes: runs whose outputs are complete (summary.json + same resolved config) are not redone."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import linear_step, write_formula_profile
from specbatch.sim.cli import completed_summary


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return write_formula_profile(tmp_path_factory.mktemp("p") / "formula", verify=linear_step(0.010, 0.0005, knee=64),
                                 draft=linear_step(0.001, 0.00002))


def sweep(sweep_dir: Path, *overrides: str, launcher: str = "basic", env: dict | None = None) -> str:
    cmd = [sys.executable, "-m", "specbatch.sim.cli", "-m", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}",
           "print_summary=true", "workload.first_n=40", *overrides]
    if launcher == "local":
        cmd.append("hydra.launcher.n_jobs=2")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_joblib_sweep_then_resume(tmp_path, profile):
    d = tmp_path / "mr"
    sweep(d, f"profile={profile}", "policy=none,adaptive", launcher="local")
    runs = sorted(p.name for p in d.iterdir() if p.is_dir())
    assert runs == ["0", "1"]
    assert (d / "multirun.yaml").is_file()
    for r in runs:
        for f in ("requests.parquet", "iterations.parquet", "policy.json", "workload.json", "config.yaml", "summary.json"):
            assert (d / r / f).is_file(), f"{r}/{f}"
    kept = (d / "0" / "summary.json").stat().st_mtime_ns
    (d / "1" / "summary.json").unlink()  # job 1 was interrupted before its summary landed
    out = sweep(d, f"profile={profile}", "policy=none,adaptive")
    assert out.count("skipped") == 1
    assert (d / "0" / "summary.json").stat().st_mtime_ns == kept  # complete run: not redone
    assert (d / "1" / "summary.json").is_file()  # incomplete run: redone


def test_completed_summary_rules(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"seed": 0, "policy": {"name": "none"}})
    assert completed_summary(cfg, str(tmp_path)) is None  # nothing there
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert completed_summary(cfg, str(tmp_path)) is None  # no summary.json: incomplete
    (tmp_path / "summary.json").write_text('{"throughput_tok_s": 1.5}')
    assert completed_summary(cfg, str(tmp_path)) == {"throughput_tok_s": 1.5}
    # a different resolved config in the same folder is redone, not mistaken for the finished run
    assert completed_summary(OmegaConf.create({"seed": 1, "policy": {"name": "none"}}), str(tmp_path)) is None
    monkeypatch.setenv("SPECBATCH_RERUN", "1")
    assert completed_summary(cfg, str(tmp_path)) is None
