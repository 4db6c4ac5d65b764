"""specbatch-dash: the collected table (one row per run, swept overrides as columns) and the dashboard,
opened in real headless Chromium: no JavaScript errors, no network requests, every figure holds data,
and the workload selector switches scenarios. Static export through kaleido. The tests on the study's runs
(three simulator runs first) are marked slow; the conclusion block's logic is also tested on a made-up table."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import add_drafter_rows, linear_step, write_formula_profile
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
    add_drafter_rows(prof, eagle=linear_step(0.0004, 0.00001), ngram=linear_step(0.0001, 0.000005))  # γ* per drafter
    _sim("-m", f"hydra.sweep.dir={root / 'mr' / 'a'}", f"profile={prof}", "policy=none,adaptive", "workload.load=0.5,0.9")
    _sim("-m", f"hydra.sweep.dir={root / 'mr' / 'b'}", f"profile={prof}", "policy=fixed", "policy.gamma=2",
         "workload.load=0.5,0.9")
    _sim(f"hydra.run.dir={root / 'single'}", f"profile={prof}", "workload=azure_code", "policy=adaptive")
    return root


@pytest.mark.slow
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


@pytest.mark.slow
def test_dashboard_is_self_contained(dashboard):
    text = dashboard.read_text()
    # (booleans, not `in` asserts: a failing `in` would print megabytes of page)
    assert not re.search(r"<script[^>]+src=", text), "the dashboard loads a script from elsewhere"
    assert text.count("Plotly.newPlot") == 16 and len(text) > 3_000_000  # plotly.js itself is inline
    ids = json.loads(text.split('id="specbatch-figures">')[1].split("</script>")[0])
    assert ids == sorted(f"s{k}-{f}" for k in (0, 1) for f in FIGURES)


@pytest.mark.slow
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
        # the conclusion block opens the shown section: one sentence and one table row per load, the SLOs and
        # the profile's device and units (hidden with the other scenario)
        concl_js = ("Array.from(document.querySelectorAll('section.scenario')).map(function(s){"
                    "var c=s.querySelector('.conclusion'); return c && {h: c.getBoundingClientRect().height, "
                    "items: c.querySelectorAll('li').length, rows: c.querySelectorAll('table.best tr').length, "
                    "first: s.firstElementChild.nextElementSibling.nextElementSibling === c, text: c.innerText};})")
        concl = page.evaluate(concl_js)
        c = concl[big]
        assert c["h"] > 100 and c["first"] and c["items"] == 2 and c["rows"] == 3, c
        assert "At load 0.5" in c["text"] and "than no speculation" in c["text"] and "is best" in c["text"], c["text"]
        assert "derived from the profile" in c["text"] and "Profile formula analytical (not measured)" in c["text"]
        assert concl[small]["h"] == 0        # switch the workload selector: the other scenario shows
        code = sections[small][0]
        page.evaluate(f"var s=document.getElementById('sel-workload'); s.value={json.dumps(code)};"
                      "s.dispatchEvent(new Event('change')); 0")
        shown = page.evaluate("Array.from(document.querySelectorAll('section.scenario')).map(s => s.style.display)")
        assert shown[small] == "" and shown[big] == "none"
        c = page.evaluate(concl_js)[small]
        assert c["h"] > 50 and c["items"] == 1 and "adaptive is best" in c["text"], c        # a figure dropdown (profile context) restyles without errors
        page.evaluate(f"Plotly.restyle('s{big}-profile', {{visible: true}}).then(() => 1)")
        assert page.errors == [], page.errors


@pytest.mark.slow
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


# --- the conclusion block (issue #26) ---------------------------------------------------------------------


def _made_up_table():
    """A made-up study table: none, fixed γ=2/4, adaptive and threshold (identical to adaptive) at two loads."""
    lat = {  # mean latency (s) at load 0.5, 0.9
        ("none", None): (10.0, 40.0), ("fixed", 2): (8.0, 35.0), ("fixed", 4): (9.0, 30.0),
        ("adaptive", None): (7.0, 31.0), ("threshold", None): (7.0, 31.0), ("goodput", None): (7.05, 33.0)}
    rows = []
    for (policy, gamma), by_load in lat.items():
        for load, rate, v in zip((0.5, 0.9), (1.0, 1.8), by_load):
            rows.append({"policy": policy, "policy_label": f"fixed γ={gamma}" if gamma else policy, "load": load,
                         "arrival_rate_req_s": rate, "latency_mean": v, "latency_p99": 3 * v, "ttft_mean": v / 10,
                         "throughput_tok_s": 100 * rate, "mean_gamma": float(gamma or (0 if policy == "none" else 2)),
                         "iterations": 1000, "makespan_s": 500.0, "goodput_req_s": 0.5, "slo_attainment": 0.8,
                         "requests": 300, "overrides": f"policy={policy}"})
    return pd.DataFrame(rows)


def test_conclusions_best_policy_gains_and_identical_arms():
    from specbatch.dashboards import conclusions as C

    df = _made_up_table()
    series = df["policy_label"]
    twins = C.identical_arms(df, series, [])
    assert twins == {"adaptive": ["threshold"]}  # goodput differs by 0.7 %: not identical
    best = C.best_by_load(df, series, [], twins).set_index("x")
    assert best.loc[0.5, "best"] == "adaptive" and best.loc[0.5, "vs_none"] == pytest.approx(7 / 10 - 1)
    assert best.loc[0.5, "fixed"] == "fixed γ=2" and best.loc[0.5, "vs_fixed"] == pytest.approx(7 / 8 - 1)
    assert best.loc[0.5, "close"] == ["goodput"]  # within 1 %, named beside the best; the twin is counted once
    assert best.loc[0.9, "best"] == "fixed γ=4" and best.loc[0.9, "vs_none"] == pytest.approx(30 / 40 - 1)
    words = [C.sentence(r, twins, True) for r in best.reset_index().to_dict("records")]
    assert words[0] == ("At load 0.5 (1 req/s), adaptive (≡ threshold) (within 1 %: goodput) is best: mean latency "
                        "7 s, 30 % lower than no speculation (10 s) and 12 % lower than the best fixed γ "
                        "(fixed γ=2, 8 s).")
    assert words[1] == ("At load 0.9 (1.8 req/s), fixed γ=4 is best: mean latency 30 s, 25 % lower than no "
                        "speculation (40 s) and it is the best fixed γ.")
    # where no speculation wins, the sentence says so
    slow = df.assign(latency_mean=np.where(df["policy"] == "none", 1.0, df["latency_mean"]))
    row = C.best_by_load(slow, series, [], twins).iloc[0].to_dict()
    assert C.sentence(row, twins, True).startswith("At load 0.5 (1 req/s), no speculation is best: mean latency 1 s, "
                                                   "the best fixed γ (fixed γ=2) is 700 % higher")
    block = C.conclusion_html(df, series, [], twins, C.SLO(2.0, 0.1, "made up", False), "p measured somewhere")
    assert block.count("<li>") == 2 and block.count("<tr>") == 3 and "threshold and adaptive gave identical runs" in block
    assert "TTFT ≤ 2 s and TPOT ≤ 0.1 s, made up" in block and "one seed" in block


def test_describe_profile_names_the_device_and_units():
    from specbatch.dashboards.conclusions import describe_profile

    cpu = {"source": "measured", "dtype": "float32",
           "device": {"kind": "cpu", "cpu_count": 2, "name": "AMD EPYC", "threads": 2}}
    assert describe_profile(cpu) == "measured on a 2-core CPU (AMD EPYC, 2 threads): seconds per step (shown in ms), float32"
    gpu = {"source": "measured", "dtype": "float16", "device": {"kind": "cuda", "name": "NVIDIA H200"}}
    assert describe_profile(gpu) == "measured on NVIDIA H200 (cuda): seconds per step (shown in ms), float16"
    made = {"source": "analytical", "device": {"kind": "cpu", "name": "test"}}
    assert describe_profile(made).startswith("analytical (not measured), device 'test': seconds per step")


@pytest.mark.slow
def test_goodput_is_rescored_at_the_scenarios_slo(study):
    """With the runs' own SLO the rescored goodput is the runs' summary (the same rule as sim.metrics); by
    default the SLO comes from the profile; a run that set slo.* keeps its own; the CLI's --slo-* win."""
    from specbatch.dashboards import conclusions as C
    from specbatch.sim.cost_model import CostModel
    from specbatch.sim.profile import load_profile

    df = collect([study / "mr"])
    own = C.SLO(float(df["slo_ttft_s"].iloc[0]), float(df["slo_tpot_s"].iloc[0]), "own", False)
    same = C.rescore(df, own)
    for col in ("goodput_req_s", "goodput_tok_s", "slo_attainment"):
        assert np.allclose(same[col].astype(float), df[col].astype(float), rtol=1e-12), col
    profile = load_profile(df["profile_dir"].iloc[0])
    slo = C.scenario_slo(df, profile)
    req = pd.read_parquet(Path(df["run_dir"].iloc[0]) / "requests.parquet")
    prefill = CostModel(profile).prefill(float(req["prompt_tokens"].median()))
    assert slo.derived and slo.ttft_s == pytest.approx(C.SLO_TTFT_PREFILLS * prefill, rel=1e-2)
    assert "derived from the profile" in slo.source and slo.tpot_s > 0
    tight = C.rescore(df, C.SLO(1e-6, 1e-6, "tight", False))
    assert (tight["slo_attainment"] == 0).all() and (tight["slo_ttft_s"] == 1e-6).all()
    overridden = df.assign(overrides=df["overrides"] + " slo.ttft_s=3")
    assert C.scenario_slo(overridden, profile).source.startswith("the runs' own")
    assert C.scenario_slo(df, profile, (1.0, 0.05)) == C.SLO(1.0, 0.05, C.scenario_slo(df, profile, (1, 0.05)).source,
                                                             False)


@pytest.mark.slow
def test_dashboard_cli_slo_options(study, tmp_path):
    out = tmp_path / "d.html"
    assert dash_main([str(study / "mr"), "-o", str(out), "--slo-ttft", "1", "--slo-tpot", "0.05"]) == 0
    text = out.read_text()
    assert "TTFT ≤ 1 s and TPOT ≤ 0.05 s, given to the dashboard" in text
    with pytest.raises(SystemExit):
        dash_main([str(study / "mr"), "-o", str(out), "--slo-ttft", "1"])


def test_summary_table_has_no_job_column_and_whole_names():
    from specbatch.dashboards.figures import summary_table

    df = _made_up_table().assign(job=range(12), policy_label=lambda d: d["policy_label"] + " with a rather long name")
    t = summary_table(df, []).data[0]
    assert "job" not in t.header.values and t.header.values[0] == "policy"
    longest = max(map(len, t.cells.values[0]))
    # the policy column gets a share of the width in proportion to its longest name (9 characters a unit)
    assert t.columnwidth[0] == pytest.approx(longest / 9) and set(t.columnwidth[1:]) == {1.0}
