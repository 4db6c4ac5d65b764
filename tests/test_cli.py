"""The `specbatch-sim` hydra app: outputs, errors, defaults, and a plain (non-editable) install."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def sim(args, cwd, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "specbatch.sim.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_run_writes_every_output(tmp_path, formula_profile):
    out = tmp_path / "run"
    p = sim([f"profile={formula_profile}", "workload.first_n=80", "policy=fixed", "policy.gamma=3",
             "cluster.replicas=2", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "throughput" in p.stdout and str(out) in p.stdout
    for f in ("requests.parquet", "iterations.parquet", "policy.json", "workload.json", "config.yaml", "summary.json"):
        assert (out / f).is_file(), f
    req = pd.read_parquet(out / "requests.parquet")
    assert len(req) == 80 and req["finished_s"].notna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 80 and summary["mean_gamma"] == pytest.approx(3.0)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["policy"] == {"name": "fixed", "gamma": 3} and cfg["cluster"]["replicas"] == 2
    assert json.loads((out / "policy.json").read_text()) == {"name": "fixed", "gamma": 3}


def test_adaptive_table_is_saved_with_the_run(tmp_path, formula_profile):
    out = tmp_path / "run"
    p = sim([f"profile={formula_profile}", "workload.first_n=30", "policy=adaptive", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    table = json.loads((out / "policy.json").read_text())["table"]
    assert len(table) == 32 and all(0 <= g <= 8 for g in table.values())


@pytest.mark.parametrize("override,expected", [
    ("policy.name=bogus", "policy.name is 'bogus'"),
    ("profile=/nonexistent/profile", "profile: '/nonexistent/profile' not found"),
    ("acceptance.alpha=1.5", "acceptance.alpha is 1.5"),
    ("cluster.router=nearest", "cluster.router is 'nearest'"),
    ("workload.path=/nope.csv", "workload.path: '/nope.csv' not found"),
])
def test_bad_config_gives_a_clear_error(tmp_path, formula_profile, override, expected):
    p = sim([f"profile={formula_profile}", "workload.first_n=10", override, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert p.returncode == 2
    assert expected in p.stderr and "Traceback" not in p.stderr


def test_default_run_uses_the_shipped_profile(tmp_path):
    """`specbatch-sim` with no arguments: the shipped profile and trace, a summary table, well under a minute."""
    p = sim([f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "policy=adaptive" in p.stdout and "AzureLLMInferenceTrace_conv" in p.stdout
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["completed"] == 1000


def test_plain_install_works_from_any_directory(tmp_path, formula_profile):
    """Build a wheel, install it (no editable finder) and run the app from an unrelated directory."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheel_dir, REPO],
                   check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob("specbatch-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    top_level = {p.name for p in target.iterdir()} - {"bin"}
    assert top_level == {"specbatch", "specbatch-0.1.0.dist-info"}, top_level  # nothing else in site-packages
    code = ("import specbatch, specbatch.sim, specbatch.profiler, specbatch.fidelity, specbatch.dashboards as d;"
            "print(specbatch.sim.__file__); print(d.__file__); print(specbatch.conf_dir())")
    where = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                           check=True)
    assert all(str(target) in line for line in where.stdout.splitlines())
    for name in ("sim", "profiler", "dashboards", "fidelity"):  # no bare top-level names leak
        leaked = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=elsewhere, env=env, capture_output=True)
        assert leaked.returncode != 0, name
    script = target / "bin" / "specbatch-sim"
    assert script.is_file()
    p = subprocess.run([sys.executable, script, f"profile={formula_profile}", "workload.first_n=20",
                        f"hydra.run.dir={elsewhere / 'out'}"], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert (elsewhere / "out" / "summary.json").is_file()
