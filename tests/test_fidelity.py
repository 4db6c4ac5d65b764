"""The reduced validation (specbatch-validate defaults: tiny pair, 2 loads x 3 policies, 40 requests of an
Azure trace slice, CPU clock) end to end: the engine and the simulator both replay every case, the errors of
every metric are finite and reported, and the dashboard is self-contained.

This test does not assert an accuracy bound. On this 2-core CPU the tiny pair's steps last about a
millisecond and its engine runs half a second: in a run on 2026-11-27 the simulator's error against the
engine was -41 to +12 % on mean latency and -4 to +17 % on throughput, while two engine replays of the same
case differed by 13-43 % on mean latency (earlier runs: errors of 30-120 %, see README "Fidelity"). A
tolerance wide enough to pass reliably would certify little; the accuracy figures come from
`benchmarks/fidelity.py` with a bigger pair, and the gap is reported as open work.
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
    report = V.validate(out=tmp_path, repeats=2, log=lambda *_: None)
    assert len(report["cases"]) == 6
    assert report["elapsed_s"]["total"] < 240
    for variant in ("profile", "model"):
        err = {m: [c["errors"][variant][m] for c in report["cases"]] for m in V.METRICS}
        assert all(np.isfinite(err[m]).all() for m in V.METRICS), (variant, err)
    for c in report["cases"]:  # the step-level comparison ran on every case, on all its engine runs' steps
        assert len(c["real_runs"]) == 2
        assert 0 < c["steps"]["iterations"] <= sum(x["iterations"] for x in c["real_runs"])
        assert c["steps"]["profile_over_step"] > 0
        assert set(c["noise"]) == set(V.METRICS)
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


def test_step_agreement_is_the_ratio_of_predicted_to_measured_step_time(formula_profile):
    import pandas as pd

    from sim.cost_model import CostModel
    from sim.profile import load_profile

    cost = CostModel(load_profile(formula_profile), max_batch=8, max_gamma=4)
    it = pd.DataFrame({"batch": [0, 1, 4, 4], "gamma": [0, 0, 2, 4], "context": [0.0, 200.0, 300.0, 900.0]})
    pred = [0.0] + [cost.iteration(b, g, c) for b, g, c in zip(it["batch"][1:], it["gamma"][1:], it["context"][1:])]
    it["step_s"] = [0.0, pred[1] / 2, pred[2] / 2, pred[3] / 2]  # the engine ran twice as fast as the profile says
    diag = pd.DataFrame({"prefill_forward_s": 0.0, "step_model_s": [0.0, pred[1] / 4, pred[2] / 4, pred[3] / 4]})
    st = V.step_agreement(it, diag, cost)
    assert st["iterations"] == 3  # the idle iteration (batch 0) is left out
    assert st["profile_over_step"] == 2.0 and st["profile_over_model_work"] == 4.0
    assert st["profile_over_step_by_batch"] == {1: 2.0, 4: 2.0}


def test_prefill_agreement_compares_fresh_admissions_only(formula_profile):
    import pandas as pd

    from sim.cost_model import CostModel
    from sim.profile import load_profile

    cost = CostModel(load_profile(formula_profile), max_batch=8, max_gamma=4)
    # iteration 0 admits requests 0 and 1; iteration 1 admits nothing; iteration 2 re-admits a preempted
    # request (its admitted_s is its first admission), so it has no fresh prompts to compare with
    it = pd.DataFrame({"start_s": [0.0, 0.5, 1.0], "admitted": [2, 0, 1], "prefill_s": [0.0, 0.0, 0.3]})
    reqs = pd.DataFrame({"admitted_s": [0.0, 0.0, 0.0], "prompt_tokens": [100, 300, 50],
                         "rejected": [False, False, False]})
    reqs.loc[2, "admitted_s"] = 0.5 + 1e-9  # admitted in no logged iteration: ignored
    pred = sum(cost.prefill(n, "target") + cost.prefill(n, "draft") for n in (100, 300))
    it.loc[0, "prefill_s"] = pred  # the whole prefill phase took what the profile predicts ...
    diag = pd.DataFrame({"prefill_forward_s": [pred / 2, 0.0, 0.2], "step_model_s": 0.0})  # ... its forwards half
    pf = V.prefill_agreement(reqs, it, diag, cost, uses_draft=True)
    assert pf == {"admissions": 1, "profile_over_forward": 2.0, "profile_over_prefill": 1.0}
    target_only = sum(cost.prefill(n, "target") for n in (100, 300))
    assert V.prefill_agreement(reqs, it, diag, cost, uses_draft=False)["profile_over_prefill"] == \
        round(target_only / pred, 3)
    assert V.prefill_agreement(reqs, it.iloc[1:2], diag.iloc[1:2], cost, uses_draft=True) is None


def test_engine_cost_model_adds_its_terms_to_every_query_form(formula_profile):
    """The engine-side terms reach the simulator's plans (list and array forms) exactly as `iteration` adds them."""
    from sim.profile import load_profile

    o = V.Overheads(sched_base_s=0.0004, sched_per_seq_s=0.00003, prefill_s=0.002, verify_s=0.001, draft_s=0.0007)
    plain = V.make_cost(load_profile(formula_profile), None, (), 8, 4)
    cost = V.make_cost(load_profile(formula_profile), o, V.FIXES, 8, 4)
    ctxs = [150.0, 151.5, 300.0, 700.0]
    for b, g in ((1, 0), (5, 2), (8, 4)):
        one = [cost.iteration(b, g, c) for c in ctxs]
        assert cost.iteration_list(b, g, ctxs) == one
        assert cost.iteration_many(b, g, np.array(ctxs)).tolist() == one
        extra = o.verify_s + g * o.draft_s + o.sched_base_s + o.sched_per_seq_s * b
        assert one == pytest.approx([plain.iteration(b, g, c) + extra for c in ctxs])
