"""The Ray launcher, locally: a 2-job sweep on a private single-node Ray instance (loopback only; Ray
≥ 2.54 has no `local_mode`), through the shipped hydra/launcher=ray_local config."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import linear_step, write_formula_profile


def test_ray_local_sweep(tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None or importlib.util.find_spec("ray") is None:
        msg = "the Ray launcher is not installed (pip install 'specbatch[ray]')"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    profile = write_formula_profile(tmp_path / "formula", verify=linear_step(0.010, 0.0005, knee=64),
                                    draft=linear_step(0.001, 0.00002))
    d = tmp_path / "mr"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, "-m", "specbatch.sim.cli", "-m", "hydra/launcher=ray_local", "hydra.launcher.ray.init.num_cpus=2",
           f"hydra.sweep.dir={d}", f"profile={profile}", "workload.first_n=30", "policy=none,adaptive",
           "print_summary=false"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Ray Launcher is launching 2 jobs" in r.stdout + r.stderr
    for job, policy in (("0", "none"), ("1", "adaptive")):
        s = json.loads((d / job / "summary.json").read_text())
        assert s["policy"] == policy and s["completed"] == 30
