"""The wheel: built from the project's files the way `make demo` installs it (pip, with build isolation), it
holds every data file of conf/ and traces/ and every module, and the build prints no setuptools warning
(issue #26: 22 "Package 'specbatch.conf.acceptance' is absent from the `packages` configuration" warnings
in `make demo`)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"conf": "specbatch/conf", "traces": "specbatch/traces", "sim": "specbatch/sim",
            "profiler": "specbatch/profiler", "fidelity": "specbatch/fidelity", "dashboards": "specbatch/dashboards",
            "specbatch": "specbatch"}
SHIPPED = (".py", ".yaml", ".csv", ".json")


def _project_files() -> list[str]:
    """The files git tracks or would track (not ignored), relative to the root."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.mark.slow  # builds the wheel in an isolated environment: 20-30 s
def test_wheel_builds_without_warnings_and_ships_every_data_file(tmp_path):
    src = tmp_path / "src"
    files = _project_files()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "-w", str(tmp_path / "w"), "--no-deps", "-v"],
                         cwd=src, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "absent from the `packages` configuration" not in log
    warnings = [ln for ln in log.splitlines() if "Warning" in ln and "pip" not in ln.split("Warning")[0].lower()]
    assert not warnings, "\n".join(warnings)
    (wheel,) = (tmp_path / "w").glob("specbatch-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for f in files:
        top, _, rest = f.partition("/")
        if top in PACKAGES and rest and f.endswith(SHIPPED):
            expected.add(f"{PACKAGES[top]}/{rest}")
    assert any(e.endswith(".yaml") for e in expected) and any(e.endswith(".csv") for e in expected)
    assert "specbatch/conf/acceptance/default.yaml" in expected  # a data-only subfolder
    assert sorted(expected - inside) == []
