"""The Makefile's installs (issue #26): `make demo` reinstalls specbatch only when one of its files changed and
its dependencies only when pyproject.toml did; `make test` shows progress; `make test-fast` deselects the
slow tests. Checked with `make -n` (what make would run) on a copy of the project with a stand-in venv."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy(tmp_path: Path) -> Path:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    old = time.time() - 3600
    for f in out.splitlines():
        if (ROOT / f).is_file():
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, tmp_path / f)
            os.utime(tmp_path / f, (old, old))
    return tmp_path


def _make_n(root: Path, target: str) -> str:
    r = subprocess.run(["make", "-n", target], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def project(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    return _copy(tmp_path)


def test_demo_installs_only_what_changed(project):
    # a fresh checkout: the venv is created and everything installed
    first = _make_n(project, "demo")
    assert "venv" in first and "pip install" in first and "specbatch-demo" in first
    assert first.index("make demo: the default policy study") < first.index("specbatch-demo")  # how long, first
    # a demo venv installed after the last change: no pip at all, only the demo
    venv = project / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".deps").touch()
    (venv / ".installed").touch()
    assert subprocess.run(["make", "-q", ".venv/.installed"], cwd=project).returncode == 0
    # (the stamp's recipe is a shell `if` that make -n prints whole; make -q says whether it would run)
    # one source file changed: the stamp is out of date, and the recipe takes the --no-deps branch
    os.utime(project / "sim" / "metrics.py")
    assert subprocess.run(["make", "-q", ".venv/.installed"], cwd=project).returncode == 1
    r = subprocess.run(["make", ".venv/.installed", "PYTHON=false", "PIP=-c pass"], cwd=project, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "reinstalling it" in r.stdout and "dependencies" not in r.stdout, r.stdout + r.stderr
    assert subprocess.run(["make", "-q", ".venv/.installed"], cwd=project).returncode == 0
    # pyproject.toml changed: the dependencies too
    os.utime(project / "pyproject.toml")
    r = subprocess.run(["make", ".venv/.installed", "PYTHON=true", "PIP=-c pass"], cwd=project, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "installing specbatch and its dependencies" in r.stdout, r.stdout + r.stderr


def test_test_targets_show_progress_and_fast_deselects_slow(project):
    full = _make_n(project, "test").splitlines()
    run = [ln for ln in full if "-m pytest" in ln]
    assert len(run) == 1 and " -q" not in run[0] and "--durations=10" in run[0]
    assert any("make test: the whole suite" in ln for ln in full[:2])
    fast = [ln for ln in _make_n(project, "test-fast").splitlines() if "-m pytest" in ln]
    assert len(fast) == 1 and '-m "not slow"' in fast[0]
