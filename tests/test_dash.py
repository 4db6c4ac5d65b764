"""specbatch-dash: the collected table (one row per run, swept overrides as columns) and the dashboard,
opened in real headless Chromium: no JavaScript errors, no network requests, every figure holds data,
and the workload selector switches scenarios. Static export through kaleido."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.dashboards.build import FIGURES, find_chromium
from specbatch.dashboards.cli import main as dash_main
from specbatch.dashboards.collect import collect, swept_keys


def _need_browser():
    """Chromium and websocket-client, or a clear failure in CI (a skip elsewhere)."""
    missing = []
    if find_chromium() is None:
        missing.append("Chromium (apt-get install chromium, or set BROWSER_PATH)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        missing.append("websocket-client (pip install -e '.[test]')")
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def _sim(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "specbatch.sim.cli", *args, "print_summary=false", "workload.first_n=60"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two sweeps (policies × loads, fixed γ × loads) and one single run of another workload: 7 runs."""
    root = tmp_path_factory.mktemp("study")
    prof = write_formula_profile(root / "formula", verify=linear_step(0.010, 0.0005, knee=64),
                                 draft=linear_step(0.001, 0.00002))
    _sim("-m", f"hydra.sweep.dir={root / 'mr' / 'a'}", f"profile={prof}", "policy=none,adaptive", "workload.load=0.5,0.9")
    _sim("-m", f"hydra.sweep.dir={root / 'mr' / 'b'}", f"profile={prof}", "policy=fixed", "policy.gamma=2",
         "workload.load=0.5,0.9")
    _sim(f"hydra.run.dir={root / 'single'}", f"profile={prof}", "workload=azure_code", "policy=adaptive")
    return root


def test_collected_table(study, tmp_path):
    df = collect([study / "mr", study / "single"])
    assert len(df) == 7 and df["run_dir"].is_unique
    for col in ("study", "job", "run_dir", "scenario", "workload", "pair", "profile", "policy_label", "load",
                "sweep.policy", "sweep.workload.load", "sweep.policy.gamma", "sweep.profile", "throughput_tok_s",
                "latency_p99", "goodput_req_s", "cfg.cluster.replicas", "cfg.policy.name"):
        assert col in df.columns, col
    mr = df[df["job"] >= 0]
    assert len(mr) == 6 and set(mr["sweep.workload.load"]) == {0.5, 0.9}
    assert sorted(mr["policy_label"].unique()) == ["adaptive", "fixed γ=2", "none"]
    assert set(mr["study"].map(lambda s: Path(s).name)) == {"a", "b"}
    single = df[df["job"] < 0].iloc[0]
    assert single["study"] == single["run_dir"] and single["sweep.workload"] == "azure_code"
    assert df["scenario"].nunique() == 2 and df["pair"].eq("d → t").all()
    assert "sweep.policy" in swept_keys(df) and "sweep.profile" not in swept_keys(df)
    # an incomplete run (no summary.json) is left out
    (Path(mr.iloc[0]["run_dir"]) / "summary.json").rename(tmp_path / "moved.json")
    try:
        assert len(collect([study / "mr", study / "single"])) == 6
    finally:
        (tmp_path / "moved.json").rename(Path(mr.iloc[0]["run_dir"]) / "summary.json")
    # the CLI writes the same table as Parquet
    assert dash_main([str(study / "mr"), str(study / "single"), "-o", str(tmp_path / "d.html"), "--no-html"]) == 0
    t = pd.read_parquet(tmp_path / "d.parquet")
    assert len(t) == 7 and list(t.columns) == list(df.columns)


@pytest.fixture(scope="module")
def dashboard(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "study.html"
    assert dash_main([str(study / "mr"), str(study / "single"), "-o", str(out)]) == 0
    return out


def test_dashboard_is_self_contained(dashboard):
    text = dashboard.read_text()
    # (booleans, not `in` asserts: a failing `in` would print megabytes of page)
    assert not re.search(r"<script[^>]+src=", text), "the dashboard loads a script from elsewhere"
    assert text.count("Plotly.newPlot") == 14 and len(text) > 3_000_000  # plotly.js itself is inline
    ids = json.loads(text.split('id="specbatch-figures">')[1].split("</script>")[0])
    assert ids == sorted(f"s{k}-{f}" for k in (0, 1) for f in FIGURES)


def test_dashboard_in_chromium(dashboard):
    _need_browser()
    from specbatch.dashboards.browser import FIGURE_STATS_JS, Page

    with Page.open(dashboard) as page:
        stats = {s["id"]: s for s in page.evaluate(FIGURE_STATS_JS)}
        assert page.errors == [], page.errors
        assert page.requests == [], f"the dashboard fetched {page.requests}"
        sections = page.evaluate("Array.from(document.querySelectorAll('section.scenario'))"
                                 ".map(s => [s.dataset.workload, s.style.display])")
        # the study scenario (6 runs) and the single run of the code workload
        big = next(k for k, (w, _) in enumerate(sections) if "conv" in w)
        small = 1 - big
        for f in FIGURES:
            s = stats[f"s{big}-{f}"]
            assert s["traces"] > 0 and s["points"] > 0 and s["svg"] > 0, s
        for f in set(FIGURES) - {"speedup"}:  # one adaptive run: no baseline to compare with
            assert stats[f"s{small}-{f}"]["points"] > 0, f
        assert stats[f"s{big}-lt"]["traces"] == 3  # none, adaptive, fixed γ=2
        assert stats[f"s{big}-table"]["points"] == 6
        assert [d for _, d in sections][big] == "" and [d for _, d in sections][small] == "none"
        # switch the workload selector: the other scenario shows
        code = sections[small][0]
        page.evaluate(f"var s=document.getElementById('sel-workload'); s.value={json.dumps(code)};"
                      "s.dispatchEvent(new Event('change')); 0")
        shown = page.evaluate("Array.from(document.querySelectorAll('section.scenario')).map(s => s.style.display)")
        assert shown[small] == "" and shown[big] == "none"
        # a figure dropdown (profile context) restyles without errors
        page.evaluate(f"Plotly.restyle('s{big}-profile', {{visible: true}}).then(() => 1)")
        assert page.errors == [], page.errors


def test_static_export(study, tmp_path):
    _need_browser()
    pytest.importorskip("kaleido") if os.environ.get("CI") != "true" else __import__("kaleido")
    from specbatch.dashboards.build import export_static
    from specbatch.dashboards.figures import summary_table

    df = collect([study / "mr"])
    paths = export_static({"table": summary_table(df, [])}, tmp_path, ("png", "svg"), width=800)
    png, svg = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "<svg" in svg.read_text()[:500]
