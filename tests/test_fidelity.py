"""The reduced validation (specbatch-validate defaults: tiny pair, 2 loads x 3 policies, 40 requests of an
Azure trace slice, CPU clock) end to end, within a tolerance that reflects the measured noise.

Tolerance. On the shared 2-core development machine (load average 5–8 from other jobs) two runs of the
same engine replay differ by up to ~30 % in mean latency at these loads (and much more near saturation),
because the machine's speed drifts while it runs; the simulator cannot be judged more precisely than
that. The bounds below are those noise levels; on a quiet machine ``benchmarks/fidelity.py`` shows the
errors the model actually has (see profiler/FIDELITY_section.md).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from profiler import validate as V  # noqa: E402

# Measured run-to-run noise of the engine (two identical replays, loadavg 5-8): mean latency up to 30 % at
# load <= 0.4 and up to 107 % near saturation; throughput up to 22 %. Observed simulator errors with the
# engine-side terms: mean latency 3-56 % (adaptive worst), throughput <= 12 %.
TOL = {"latency_mean": 0.8, "latency_p99": 0.9, "throughput_tok_s": 0.25}
TOL_MEAN = {"latency_mean": 0.4, "throughput_tok_s": 0.12}  # mean |error| over the six cases


@pytest.mark.slow
def test_reduced_validation(tmp_path):
    report = V.validate(out=tmp_path, log=lambda *_: None)
    assert len(report["cases"]) == 6
    assert report["elapsed_s"]["total"] < 240
    err = {m: [c["errors"]["model"][m] for c in report["cases"]] for m in V.METRICS}
    base = {m: [c["errors"]["profile"][m] for c in report["cases"]] for m in V.METRICS}
    for m, tol in TOL.items():
        assert max(abs(e) for e in err[m]) <= tol, (m, err[m])
    for m, tol in TOL_MEAN.items():
        assert np.mean(np.abs(err[m])) <= tol, (m, err[m])
    assert all(np.isfinite(base[m]).all() for m in V.METRICS)
    o = report["calibration"]["overheads"]
    assert o["sched_base_s"] > 0 and o["prefill_s"] > 0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["cases"][0]["errors"]["model"].keys() == set(V.METRICS)
    html = (tmp_path / "dashboard.html").read_text()
    assert "plotly.js" in html and len(html) > 1_000_000 and "latency CDF" in html and "<script src=\"http" not in html
    assert V.fresh_profile(tmp_path / "profile", "tiny-llama", "tiny-llama-draft", "cpu", V.REDUCED["grid"], 1.0)


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        V.main(["--policies", "magic"])
    assert V.main(["--pair", "tiny-llama", "--out", "/tmp/unused-specbatch-validate"]) == 2
    assert "error" in capsys.readouterr().err
