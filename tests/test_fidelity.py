"""The reduced validation (specbatch-validate defaults: tiny pair, 2 loads x 3 policies, 40 requests of an
Azure trace slice, CPU clock) end to end: the engine and the simulator both replay every case, the errors of
every metric are finite and reported, and the dashboard is self-contained.

This test does not assert an accuracy bound. On this 2-core CPU with the tiny pair, the simulator's error
against the engine (30-120 % on mean latency, up to 28 % on throughput, see README "Fidelity") is far above
the engine's own run-to-run noise (0-12 % on mean latency for most cases), so a tolerance wide enough to pass
would certify nothing; the gap is reported as open work instead of being hidden behind a loose bound.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from profiler import validate as V  # noqa: E402


@pytest.mark.slow
def test_reduced_validation(tmp_path):
    report = V.validate(out=tmp_path, log=lambda *_: None)
    assert len(report["cases"]) == 6
    assert report["elapsed_s"]["total"] < 240
    for variant in ("profile", "model"):
        err = {m: [c["errors"][variant][m] for c in report["cases"]] for m in V.METRICS}
        assert all(np.isfinite(err[m]).all() for m in V.METRICS), (variant, err)
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
