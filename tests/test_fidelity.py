"""The reduced validation (specbatch-validate defaults: tiny pair, 2 loads x 3 policies, 40 requests of an
Azure trace slice, CPU clock, 5 rounds interleaved with the profile's 3 passes, every run probed for the
machine's speed) end to end, with an accuracy bound that reflects the noise the run measures: for every
case, the paired comparison's error (each engine run against the simulator at that run's probed speed)
on mean latency, p99 latency and throughput must be within the issue's goal (5 %, 10 %, 5 %) plus 3 x
the combined noise — the spread of the per-run ratios, the simulator's own spread over the rounds'
calibrations, and how far the simulator moves when each run's speed is off by the spread of the probe's
readings within it (each the case's own, or the median over cases if larger).

On this 2-core VM single rounds ran at 0.58-1.50x the profile's speed. In 12 validations on 2026-11-27 (the
code as it is, on a fast day of the VM) the paired errors on mean latency were -8.5 to +4.8 %, the tolerance
15-33 %, none failed the check (worst error / tolerance 0.33) and each took 44-49 s (69-89 s on slower days
with earlier code); averaged over them the error is -2.3 to +1.6 % on mean latency, -1.9 to +1.2 % on p99
and -0.6 to +0.6 % on throughput. With the probe's scale taken from its median over each
calibration run (before it was read around the re-timed steps) 2 of 36 validations failed (one +36.9 %
against 32.2 %, the simulator slow in every case); without the speed noise one in 7 failed (+43 % at load
0.6, where 5 % of speed moved the engine's latency by 30 %); with the probe timed cold (its speed read low),
an earlier validation failed (+7 to +30 % against 14-20 %). See README "Fidelity".
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from specbatch.fidelity import agreement as A, calibrate as C, validate as V  # noqa: E402
from specbatch.sim.policies import PolicyWarning  # noqa: E402


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """The reduced validation, run once: its report and output folder (with the profile it took)."""
    out = tmp_path_factory.mktemp("reduced")
    return V.validate(out=out, log=lambda *_: None), out


@pytest.mark.slow
def test_reduced_validation(reduced):
    report, tmp_path = reduced
    assert len(report["cases"]) == 6
    # the budget is 2 minutes (44-89 s measured here); the bound leaves room for a slow CI machine
    assert report["elapsed_s"]["total"] < 240
    for variant, _ in V.VARIANTS:
        err = {m: [c["errors"][variant][m] for c in report["cases"]] for m in A.METRICS}
        assert all(np.isfinite(err[m]).all() for m in A.METRICS), (variant, err)
    for c in report["cases"]:  # the step-level comparison ran on every case, on all its engine runs' steps
        assert len(c["real_runs"]) == V.REDUCED["repeats"]
        assert 0 < c["steps"]["iterations"] <= sum(x["iterations"] for x in c["real_runs"])
        assert c["steps"]["profile_over_step"] > 0
        assert 0.5 < c["model_over_engine"]["steps"] < 2 and 0.5 < c["model_over_engine"]["prefill"] < 2
        assert set(c["noise"]) == set(A.METRICS)
    o = report["calibration"]["overheads"]
    assert o["sched_base_s"] > 0 and o["prefill_s"] > 0 and 0.3 < o["speed"] < 3
    cal = report["calibration"]  # the probe's scale, read around the re-timed steps in every round
    assert len(cal["probe_ref_by_round"]) == V.REDUCED["repeats"] and min(cal["probe_ref_by_round"]) > 0
    assert "probe at the profile's speed" in V.format_report(report)
    for c in report["cases"]:  # every engine run was probed; the paired comparison has its own spread
        assert len(c["probe_speeds"]) == V.REDUCED["repeats"] and all(0.2 < v < 5 for v in c["probe_speeds"])
        assert set(c["paired_noise"]) == set(c["model_noise"]) == set(c["speed_noise"]) == set(A.METRICS)
        assert len(c["probe_spreads"]) == V.REDUCED["repeats"] and all(0 <= v < 1 for v in c["probe_spreads"])
    ag = report["agreement"]
    assert ag["variant"] == "paired" and len(ag["cases"]) == 6
    # the accuracy bound: goal + 3 x measured noise, every case (on a noisy machine the verdict may be
    # inconclusive, never disagree)
    assert ag["all_within"] and report["verdict"] in ("agree", "inconclusive"), V.format_report(report)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["cases"][0]["errors"]["paired"].keys() == set(A.METRICS) and saved["agreement"]["all_within"]
    assert saved["verdict"] == report["verdict"] and saved["verdict_summary"].startswith(report["verdict"])
    html = (tmp_path / "dashboard.html").read_text()
    assert "plotly.js" in html and len(html) > 1_000_000 and "latency CDF" in html and "<script src=\"http" not in html
    assert "<td>paired</td>" in html and html.count("<td>tolerance</td>") == 6
    assert f"data-verdict='{report['verdict']}'><b>Verdict: {report['verdict']}" in html
    assert V.fresh_profile(tmp_path / "profile", "tiny-llama", "tiny-llama-draft", "cpu", V.REDUCED["grid"], 1.0)
    # the passes were merged at the machine's typical speed: every point read against the speed reference
    meta = json.loads((tmp_path / "profile" / "meta.json").read_text())
    assert meta["timing"]["reference"]["typical_s"] > 0 and "reference" in meta["timing"]["merge"]
    steps = pd.read_csv(tmp_path / "profile" / "pass0" / "steps.csv")
    assert len(pd.read_csv(tmp_path / "profile" / "pass0" / "reference.csv")) == (steps["status"] == "ok").sum()


@pytest.mark.slow
def test_online_policies_validate_on_the_engines_own_iterations(reduced, tmp_path):
    """``--policies goodput ema_tiers``: policies that learn from every iteration run in the engine on what
    the engine accepted and in the simulator on what it simulated (the same seeded draws); the pipeline
    reports every metric for them (reusing the reduced validation's profile)."""
    _, first = reduced
    with pytest.warns(PolicyWarning, match=r"tiers \[1, 2, 4, 6, 8\] go above the largest γ of this run \(6"):
        report = V.validate(out=tmp_path, profile=str(first / "profile"), policies=("goodput", "ema_tiers"),
                            loads=(0.6,), repeats=2, log=lambda *_: None)
    assert [c["policy"] for c in report["cases"]] == ["goodput", "ema_tiers"]
    for c in report["cases"]:
        assert all(np.isfinite(c["errors"]["paired"][m]) for m in A.METRICS)
        assert 0.5 < c["model_over_engine"]["steps"] < 2
        assert c["real"]["mean_gamma"] > 0  # the engine speculated under the online policy
    with pytest.raises(SystemExit):
        V.main(["--policies", "oracle"])


@pytest.mark.slow
def test_batched_prefill_validation_profiles_prefill_at_several_batch_sizes(tmp_path):
    """``--prefill batched``: the profile gains prefill rows at batch sizes up to ``max_batch``, the engine and
    the simulator prefill an iteration's admissions together, and the fit has per-forward prefill terms.
    A wiring check: one round's batched prefill terms are too unsteady to bound the model against the
    engine (its prefill came out at 1.03-1.30x the engine's in three runs here and 2.33x in one fresh-clone
    CI run; five-round validations: 0.99-1.40x, docs/measurements/fidelity-cpu-2026-11-27.md)."""
    grid = dict(batches=[1, 2, 4], gammas=[0, 2], contexts=[32, 160], prefill_lengths=[8, 96], prefill_batches=[1])
    report = V.validate(out=tmp_path, prefill="batched", grid=grid, max_batch=4, max_gamma=2, requests=16,
                        loads=(0.6,), policies=("adaptive",), repeats=1, log=lambda *_: None)
    assert report["prefill"] == "batched" and "prefill batched" in V.format_report(report)
    steps = pd.read_csv(tmp_path / "profile" / "steps.csv")
    assert sorted(steps.loc[steps["phase"] == "prefill", "batch"].unique()) == [1, 2, 4]
    assert {"prefill_forward_s", "prefill_forward_draft_s"} <= set(report["calibration"]["overheads"])
    (case,) = report["cases"]
    assert all(np.isfinite(case["errors"]["paired"][m]) for m in A.METRICS)
    assert case["prefill"]["admissions"] > 0 and case["model_over_engine"]["prefill"] > 0


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        V.main(["--policies", "magic"])
    assert V.main(["--pair", "tiny-llama", "--out", "/tmp/unused-specbatch-validate"]) == 2
    assert "error" in capsys.readouterr().err
    assert V.main(["--drafter", "eagle", "--match-rate", "0.5", "--out", "/tmp/unused-specbatch-validate"]) == 2
    err = capsys.readouterr().err
    assert "drafter.match_rate is 0.5" in err and len(err.strip().splitlines()) == 1


def test_step_agreement_is_the_ratio_of_predicted_to_measured_step_time(formula_profile):
    import pandas as pd

    from specbatch.sim.cost_model import CostModel
    from specbatch.sim.profile import load_profile

    cost = CostModel(load_profile(formula_profile), max_batch=8, max_gamma=4)
    it = pd.DataFrame({"batch": [0, 1, 4, 4], "gamma": [0, 0, 2, 4], "context": [0.0, 200.0, 300.0, 900.0],
                       "context_max": [0.0, 200.0, 700.0, 1500.0]})
    for attention, column in (("padded", "context_max"), ("paged", "context")):  # the engine pads
        pred = [0.0] + [cost.iteration(b, g, c) for b, g, c in zip(it["batch"][1:], it["gamma"][1:], it[column][1:])]
        it["step_s"] = [0.0, pred[1] / 2, pred[2] / 2, pred[3] / 2]  # the engine ran twice as fast as the profile says
        diag = pd.DataFrame({"prefill_forward_s": 0.0, "step_model_s": [0.0, pred[1] / 4, pred[2] / 4, pred[3] / 4]})
        st = A.step_agreement(it, diag, cost, attention=attention)
        assert st["iterations"] == 3  # the idle iteration (batch 0) is left out
        assert st["profile_over_step"] == 2.0 and st["profile_over_model_work"] == 4.0
        assert st["profile_over_step_by_batch"] == {1: 2.0, 4: 2.0}
    with pytest.raises(KeyError, match="flash"):  # no silent fallback to some context
        C.model_step_times(cost, it[1:], attention="flash")


def test_prefill_agreement_compares_fresh_admissions_only(formula_profile):
    import pandas as pd

    from specbatch.sim.cost_model import CostModel
    from specbatch.sim.profile import load_profile

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
    pf = A.prefill_agreement(reqs, it, diag, cost, uses_draft=True)
    assert pf == {"admissions": 1, "profile_over_forward": 2.0, "profile_over_prefill": 1.0}
    target_only = sum(cost.prefill(n, "target") for n in (100, 300))
    assert A.prefill_agreement(reqs, it, diag, cost, uses_draft=False)["profile_over_prefill"] == \
        round(target_only / pred, 3)
    assert A.prefill_agreement(reqs, it.iloc[1:2], diag.iloc[1:2], cost, uses_draft=True) is None


def test_engine_cost_model_adds_its_terms_to_every_query_form(formula_profile):
    """The engine-side terms reach the simulator's plans (list and array forms) exactly as `iteration` adds them."""
    from specbatch.sim.profile import load_profile

    o = C.Overheads(sched_base_s=0.0004, sched_per_seq_s=0.00003, sched_spec_s=0.0002, sched_per_gamma_s=0.00001,
                    prefill_s=0.002, prefill_draft_s=0.0015, decode_s=0.0005, verify_s=0.001, draft_s=0.0007,
                    sync_s=0.00002, admit_step_s=0.00006, admit_step_draft_s=0.00004, speed=0.8)
    plain = C.make_cost(load_profile(formula_profile), None, (), 8, 4)
    cost = C.make_cost(load_profile(formula_profile), o, C.FIXES, 8, 4)
    ctxs = [150.0, 151.5, 300.0, 700.0]
    for b, g in ((1, 0), (5, 2), (8, 4)):
        one = [cost.iteration(b, g, c) for c in ctxs]
        assert cost.iteration_list(b, g, ctxs) == one
        assert cost.iteration_many(b, g, np.array(ctxs)).tolist() == one
        extra = (o.verify_s + g * o.draft_s if g else o.decode_s) + o.sched_base_s + o.sched_per_seq_s * b
        extra += (o.sched_spec_s + o.sched_per_gamma_s * g) if g else 0.0
        assert one == pytest.approx([plain.iteration(b, g, c) / o.speed + extra for c in ctxs])
    synced, plain_synced = cost.with_draft_sync(), plain.with_draft_sync()  # γ = 0 also runs a draft forward
    assert synced.iteration(3, 0, 200.0) == pytest.approx(plain_synced.iteration(3, 0, 200.0) / o.speed + o.decode_s
                                                          + o.sync_s + o.sched_base_s + 3 * o.sched_per_seq_s)
    assert synced.iteration(3, 2, 200.0) == cost.iteration(3, 2, 200.0)
    # an admission also slows the step of its iteration: charged with its prefill
    assert cost.prefill(64) == pytest.approx(plain.prefill(64) / o.speed + o.prefill_s + o.admit_step_s)
    assert cost.prefill(64, "draft") == pytest.approx(plain.prefill(64, "draft") / o.speed + o.prefill_draft_s
                                                      + o.admit_step_draft_s)


def test_engine_cost_model_holds_a_cost_model(formula_profile):
    """Composition: the base model's single steps and facts pass through unscaled, its extrapolation flag is
    shared, and the wrapper pickles (cluster.workers > 1 sends it to worker processes) with its terms."""
    import pickle

    from specbatch.sim.cost_model import CostModel
    from specbatch.sim.profile import load_profile

    base = CostModel(load_profile(formula_profile), max_batch=8, max_gamma=4)
    cost = C.EngineCostModel(base, C.Overheads(sched_base_s=0.001, verify_s=0.002, speed=0.5), C.FIXES)
    assert cost.base is base and (cost.max_batch, cost.max_gamma, cost.profile) == (8, 4, base.profile)
    assert cost.target_verify(4, 2, 300.0) == base.target_verify(4, 2, 300.0)
    assert cost.draft_decode(4, 300.0) == base.draft_decode(4, 300.0)
    cost.warned = True
    assert base.warned
    again = pickle.loads(pickle.dumps(cost))
    assert again.iteration(5, 3, 400.0) == cost.iteration(5, 3, 400.0) != base.iteration(5, 3, 400.0)
    assert cost.with_draft_sync().base.draft_sync and not base.draft_sync


def test_model_over_engine_is_one_for_the_simulator_against_its_own_cost_model(tmp_path):
    """A simulated run compared with the cost model that timed it: every step and prefill agrees (ratio 1);
    against the same model at half the speed, the model is twice as slow (ratio 2)."""
    from conftest import linear_step, write_formula_profile
    from specbatch.sim.acceptance import AcceptanceModel
    from specbatch.sim.cluster import ClusterConfig, simulate
    from specbatch.sim.policies import make_policy
    from specbatch.sim.profile import load_profile
    from specbatch.sim.workload import synthetic

    prof = load_profile(write_formula_profile(tmp_path / "ctx", verify=linear_step(0.010, 0.0005, 2e-6, knee=64),
                                              draft=linear_step(0.001, 0.00002, 2e-7)))
    cost = C.make_cost(prof, None, (), 8, 4)
    w = synthetic(60, 50.0, "poisson", 1.0, None, (64, 0.5), (24, 0.5), seed=3)
    for policy in ("none", "fixed"):
        pol = make_policy(policy, **V.POLICIES[policy])
        r = simulate(w, cost, pol, AcceptanceModel(alpha=0.7, max_gamma=4),
                     ClusterConfig(max_batch=8, attention="padded"), seed=0)
        assert A.model_over_engine(r, cost, pol.uses_draft) == {"steps": pytest.approx(1.0),
                                                               "prefill": pytest.approx(1.0)}
        slow = C.make_cost(prof, C.Overheads(speed=0.5), ("speed",), 8, 4)
        assert A.model_over_engine(r, slow, pol.uses_draft) == {"steps": pytest.approx(2.0),
                                                               "prefill": pytest.approx(2.0)}
        # priced at the mean context, the padded run's steps come out faster than they ran
        assert A.model_over_engine(r, cost, pol.uses_draft, attention="paged")["steps"] < 0.999


def test_at_speed_rescales_every_time_term():
    o = C.Overheads(sched_base_s=4e-4, sched_per_seq_s=2e-5, sched_spec_s=1e-4, sched_per_gamma_s=1e-5,
                    prefill_s=3e-4, prefill_draft_s=2e-4, decode_s=1e-4, verify_s=2e-4, draft_s=5e-5,
                    admit_step_s=3e-5, admit_step_draft_s=2e-5, speed=0.8)
    half = C.at_speed(o, 0.4)  # the machine at half the speed it had when the terms were measured
    assert half.speed == 0.4
    assert all(getattr(half, f) == pytest.approx(2 * v) for f, v in o.as_dict().items() if f != "speed")


# engine-side terms that made-up calibrations are built from (times at 0.8 of the profile's speed)
TRUTH = C.Overheads(sched_base_s=3e-4, sched_per_seq_s=2e-5, sched_spec_s=1.5e-4, sched_per_gamma_s=1e-5,
                    prefill_s=4e-4, prefill_draft_s=2.5e-4, decode_s=1e-4, verify_s=2.5e-4, draft_s=5e-5,
                    admit_step_s=3e-5, admit_step_draft_s=4e-5, speed=0.8)


def made_up_calibrations(cost, truth, batches=range(1, 9), n: int = 60, draft_sync: bool = False,
                         prefill: str = "sequential") -> list[dict]:
    """Three calibration rounds made up from the terms ``truth`` (the machine's speed moving between them:
    0.75, 0.8, 0.85 of the profile's; ``truth``'s times are at 0.8, and every time scales with the speed),
    iterations at random batch sizes from ``batches``. ``draft_sync``: half the γ = 0 iterations come from a
    run that drafts with the engine's ``draft_sync`` (the draft prefilled, a draft decode in each step).
    ``prefill="batched"``: an iteration's admissions share one prefill forward per model (priced by
    ``cost.prefill_batch`` at the longest prompt, as the engine pads), with the per-forward terms."""
    import pandas as pd

    from specbatch.sim.drafters import charged_matched

    rng = np.random.default_rng(0)
    calibrations = []
    partial = cost.drafter.partial  # ngram: steps priced by the rows that proposed (all of them at a re-timed point)

    def step(b: int, g: int, c: float, m: int | None = None) -> float:
        if not (partial and g):
            return cost.iteration(b, g, c)
        return cost.iteration_matched(b, g, b if m is None else charged_matched(m, b, True), c)

    for speed in (0.75, 0.8, 0.85):
        pts = [dict(batch=b, gamma=g, context=c, profiler_s=step(b, g, float(c)) / speed)
               for b in (1, 2, 4, 8) for g in (0, 2, 4) for c in (100, 400)]
        b, g = rng.choice(list(batches), n), rng.choice([0, 1, 2, 4], n)
        ctx = rng.uniform(100, 600, n)
        longest = np.where(b > 1, ctx + rng.uniform(0, 400, n), ctx)  # the engine's attention span (it pads)
        matched = np.where(g > 0, rng.integers(0, b + 1), 0) if partial else np.where(g > 0, b, 0)
        model = np.array([step(int(x), int(y), z, int(m)) / speed for x, y, z, m in zip(b, g, longest, matched)])
        k = truth.speed / speed
        width = np.where(matched > 0, g, 0) if partial else g  # (padded: a step whose rows proposed nothing decodes)
        model += k * np.where(width > 0, truth.verify_s + width * truth.draft_s, truth.decode_s)
        sched = k * (truth.sched_base_s + truth.sched_per_seq_s * b + (g > 0) * (truth.sched_spec_s
                                                                               + truth.sched_per_gamma_s * g))
        admitted = rng.integers(0, 3 if prefill == "sequential" else 5, n)
        prompts = [list(rng.integers(16, 200, k)) if k else None for k in admitted]
        models = np.where((g > 0) & cost.drafter.prefill, 2, 1)  # the γ = 0 run prefills the target only
        synced = np.zeros(n, bool)
        if draft_sync:
            synced = (g == 0) & (rng.random(n) < 0.5)
            models[synced] = 2
            draft = np.array([cost.draft_decode(int(x), z) for x, z in zip(b, longest)]) / speed
            model += (draft + k * truth.sync_s) * synced  # one more draft forward, with its in-run extra
        # the admissions slow the step: its model work per admission, the work around it per draft prefilled
        model += k * admitted * truth.admit_step_s
        sched += k * admitted * (models == 2) * truth.admit_step_draft_s
        if prefill == "batched":
            phase = [(cost.prefill_batch(ps, "target", "padded") + (m == 2) * cost.prefill_batch(ps, "draft", "padded"))
                     / speed + k * (truth.prefill_forward_s + (m == 2) * truth.prefill_forward_draft_s
                                    + len(ps) * (truth.prefill_s + (m == 2) * truth.prefill_draft_s))
                     if ps else 0.0 for ps, m in zip(prompts, models)]
        else:
            phase = [sum(cost.prefill(float(p), "target") + (cost.prefill(float(p), "draft") if m == 2 else 0.0)
                         for p in ps) / speed + k * len(ps) * (truth.prefill_s + (m == 2) * truth.prefill_draft_s)
                     if ps else 0.0 for ps, m in zip(prompts, models)]
        it = pd.DataFrame({"batch": b, "gamma": g, "context": ctx, "context_max": longest,
                           "step_s": model + sched, "step_model_s": model,
                           "prefill_s": phase, "admitted": admitted, "prompts": prompts, "models": models,
                           "draft_sync": synced, "matched": matched})
        calibrations.append({"iterations": it, "step_points": pts})
    return calibrations


def test_fit_overheads_prices_the_engines_steps_at_its_longest_sequence(tmp_path):
    """The engine pads attention to the batch's longest sequence: with a profile whose steps grow with the
    context, the terms come back exactly when its steps are priced at ``context_max`` (as the simulator
    charges them under padded attention), and off when priced at the mean context."""
    from conftest import linear_step, write_formula_profile
    from specbatch.sim.profile import load_profile

    prof = load_profile(write_formula_profile(tmp_path / "ctx", verify=linear_step(0.010, 0.0005, 2e-6, knee=64),
                                              draft=linear_step(0.001, 0.00002, 2e-7)))
    cost = C.make_cost(prof, None, (), 8, 4)
    calibrations = made_up_calibrations(cost, TRUTH)
    got, _ = C.fit_overheads(cost, calibrations)
    for k, v in TRUTH.as_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-6, abs=1e-12), k
    paged, _ = C.fit_overheads(cost, calibrations, attention="paged")
    assert paged.verify_s > 1.5 * TRUTH.verify_s  # the padding's cost lands in the step terms


def test_fit_overheads_separates_per_forward_and_per_prompt_prefill_terms_when_batched(tmp_path):
    """With batched prefill an iteration's admissions share one forward per model: the phase's extra time is a
    set-up per forward plus a copy per prompt, per model, and all four terms come back from calibrations
    made up from them (the prompts priced as the simulator charges a batched prefill: at the longest), also
    when a few phases ran slow (the line goes through each group's median)."""
    from conftest import linear_step, write_formula_profile
    from specbatch.sim.profile import load_profile

    prof = load_profile(write_formula_profile(tmp_path / "pb", verify=linear_step(0.010, 0.0005, knee=64),
                                              draft=linear_step(0.001, 0.00002), prefill_batches=(1, 2, 4, 8),
                                              batched_prefill=lambda n, b: 1e-3 * n * (1 + (b - 1) / 2)))
    cost = C.make_cost(prof, None, (), 8, 4)
    truth = dataclasses.replace(TRUTH, prefill_s=1e-4, prefill_draft_s=5e-5, prefill_forward_s=3e-4,
                                prefill_forward_draft_s=2e-4)
    calibrations = made_up_calibrations(cost, truth, prefill="batched")
    for c in calibrations:  # a few slow multi-prompt phases (3 ms more) in every round leave the terms as they are
        it = c["iterations"]
        it.loc[it.index[it["admitted"] >= 3][:2], "prefill_s"] += 3e-3
    got, _ = C.fit_overheads(cost, calibrations, prefill="batched")
    for k, v in truth.as_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-6, abs=1e-12), k
    # the simulator's cost for a batched prefill adds one set-up per forward and the per-prompt terms
    full = C.make_cost(prof, got, C.FIXES, 8, 4)
    k = got.speed
    assert full.prefill_batch([40, 90, 60], "target", "padded") == pytest.approx(
        cost.prefill_batch([40, 90, 60], "target", "padded") / k + got.prefill_forward_s
        + 3 * (got.prefill_s + got.admit_step_s))


def test_fit_overheads_recovers_known_terms(formula_profile):
    """Calibration measurements made up from known terms (a machine 25 % slower than the profile; step,
    scheduler and prefill overheads) give those terms back."""
    from specbatch.sim.profile import load_profile

    cost = C.make_cost(load_profile(formula_profile), None, (), 8, 4)
    truth = TRUTH
    calibrations = made_up_calibrations(cost, truth)
    got, details = C.fit_overheads(cost, calibrations)
    assert details["speed_by_round"] == [0.75, 0.8, 0.85]
    for k, v in truth.as_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-6, abs=1e-12), k
    # with a probe, the round's speed is read by the probe inside the calibration run, the probe's scale set
    # by the profile's time over each re-timed step x the probe's time around that step: steps re-timed in a
    # slow second (round 2 reads 0.5, and so does the probe around them) leave the scale as it is; the
    # probe's own time (here 2 ms at the profile's speed) does not matter
    for c, speed in zip(calibrations, (0.75, 0.8, 0.85)):
        c["probe_s"] = 2e-3 / speed
        c["step_points"] = [{**q, "probe_s": 2e-3 / speed} for q in c["step_points"]]
    calibrations[1]["step_points"] = [{**q, "profiler_s": q["profiler_s"] * 0.8 / 0.5, "probe_s": 2e-3 / 0.5}
                                      for q in calibrations[1]["step_points"]]
    got, details = C.fit_overheads(cost, calibrations)
    assert details["steps_speed_by_round"] == [0.75, 0.5, 0.85]
    assert details["probe_ref_by_round"] == pytest.approx([2e-3] * 3)
    assert details["probe_ref_s"] == pytest.approx(2e-3) and details["speed_by_round"] == [0.75, 0.8, 0.85]
    assert details["probe_run_over_steps"] == [1.0, 0.625, 1.0]  # round 2's run read 0.8, its steps 0.5
    for k, v in truth.as_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-6, abs=1e-12), k


def drafter_profile(tmp_path):
    """A formula profile with eagle and ngram rows (tests/test_drafters.py's formulas)."""
    from conftest import add_drafter_rows, linear_step, write_formula_profile
    from specbatch.sim.profile import load_profile

    folder = write_formula_profile(tmp_path / "drafters", verify=linear_step(0.010, 0.0005, knee=64),
                                   draft=linear_step(0.001, 0.00002))
    return load_profile(add_drafter_rows(folder, eagle=linear_step(0.0004, 0.00001),
                                         ngram=linear_step(0.0001, 0.000005)))


def test_make_cost_prices_the_simulators_drafter(tmp_path):
    """make_cost(drafter=...) is the simulator's own cost model for that drafter (specbatch-sim drafter=...):
    eagle steps and prefills from the eagle rows, an ngram step as one lookup + the verify of what was
    proposed; the engine-side terms add to a partial proposer's steps as to any other."""
    from specbatch.sim.cost_model import CostModel
    from specbatch.sim.drafters import make_drafter

    prof = drafter_profile(tmp_path)
    o = C.Overheads(sched_base_s=0.0004, sched_per_seq_s=0.00003, sched_spec_s=0.0002, sched_per_gamma_s=0.00001,
                    prefill_s=0.002, prefill_draft_s=0.0015, decode_s=0.0005, verify_s=0.001, draft_s=0.0007, speed=0.8)
    for kind in ("eagle", "ngram"):
        d = V.validation_drafter(kind)
        sim = CostModel(prof, max_batch=8, max_gamma=4, drafter=make_drafter(kind, positions=None))
        plain, full = C.make_cost(prof, None, (), 8, 4, drafter=d), C.make_cost(prof, o, C.FIXES, 8, 4, drafter=d)
        assert plain.drafter == d and full.drafter == d
        assert plain.iteration_table(300.0).tolist() == sim.iteration_table(300.0).tolist()
    eagle = C.make_cost(prof, None, (), 8, 4, drafter=V.validation_drafter("eagle"))
    # b = 4, γ = 3: verify 16 tokens < 64 -> 0.010; eagle step 0.0004 + 0.00001·4, three of them
    assert eagle.iteration(4, 3, 300.0) == pytest.approx(0.010 + 3 * 0.00044)
    assert eagle.prefill(256, "draft") == pytest.approx(0.02 * 0.256)  # the eagle prefill rows
    ngram = C.make_cost(prof, None, (), 8, 4, drafter=V.validation_drafter("ngram"))
    full = C.make_cost(prof, o, C.FIXES, 8, 4, drafter=V.validation_drafter("ngram"))
    # b = 8, γ = 4, 4 of 8 proposed: x = 2 -> verify of 3 tokens: 24 < 64 -> 0.010; lookup 0.0001 + 0.00004
    assert ngram.iteration_matched(8, 4, 4, 300.0) == pytest.approx(0.010 + 0.00014)
    sched = o.sched_base_s + 8 * o.sched_per_seq_s + o.sched_spec_s + 4 * o.sched_per_gamma_s  # (γ = 4 chosen)
    # the step term at the 2 draft tokens per sequence verified; none proposed: a decode's
    assert full.iteration_matched(8, 4, 4, 300.0) == pytest.approx(0.01014 / 0.8 + o.verify_s + 2 * o.draft_s + sched)
    assert full.iteration_matched(8, 4, 0, 300.0) == pytest.approx(ngram.iteration_matched(8, 4, 0, 300.0) / 0.8
                                                                   + o.decode_s + sched)
    assert V.validation_drafter("ngram").match_rate == 0.5 and V.validation_drafter("ngram", 0.8).match_rate == 0.8
    assert V.validation_drafter("eagle").positions is None  # the validation's alpha decides acceptance
    with pytest.raises(ValueError, match="match_rate"):
        V.validation_drafter("eagle", 0.5)


@pytest.mark.parametrize("kind", ["eagle", "ngram"])
def test_fit_overheads_recovers_known_terms_on_the_drafters_steps(tmp_path, kind):
    """Calibrations made up from known terms on an EAGLE head's or an n-gram proposer's steps (ngram: each
    step priced by the rows that proposed, padded: all of them when any did; no draft prefill) give the terms
    back (ngram: a step whose rows proposed nothing carries a decode's term, not a verify's); without the
    engine's ``matched`` column an ngram calibration is refused in one line."""
    prof = drafter_profile(tmp_path)
    cost = C.make_cost(prof, None, (), 8, 4, drafter=V.validation_drafter(kind))
    truth = TRUTH if kind == "eagle" else dataclasses.replace(TRUTH, prefill_draft_s=0.0, admit_step_draft_s=0.0)
    calibrations = made_up_calibrations(cost, truth)
    got, _ = C.fit_overheads(cost, calibrations)
    for k, v in truth.as_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-6, abs=1e-12), k
    if kind == "ngram":
        for c in calibrations:
            del c["iterations"]["matched"]
        with pytest.raises(ValueError, match="matched"):
            C.fit_overheads(cost, calibrations)


def test_fit_overheads_compares_draft_sync_steps_with_their_draft_decode(formula_profile):
    """With the engine's draft_sync, a drafting run's γ = 0 steps also run a draft decode: the fit compares
    them with the profile's decode plus that draft decode (as the simulator charges them), its extra in
    ``sync_s``, so the terms come back; compared with the decode alone, the draft's time would leak into
    the terms."""
    from specbatch.sim.profile import load_profile

    cost = C.make_cost(load_profile(formula_profile), None, (), 8, 4)
    truth = dataclasses.replace(TRUTH, sync_s=2e-5)
    calibrations = made_up_calibrations(cost, truth, n=120, draft_sync=True)
    assert all(c["iterations"]["draft_sync"].sum() >= 8 for c in calibrations)
    got, _ = C.fit_overheads(cost, calibrations)
    for k, v in truth.as_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-6, abs=1e-12), k
    for c in calibrations:
        c["iterations"] = c["iterations"].drop(columns="draft_sync")
    unaware, _ = C.fit_overheads(cost, calibrations)
    assert unaware.decode_s > 1.5 * TRUTH.decode_s


def test_fit_overheads_gives_a_term_the_data_cannot_separate_zero(formula_profile):
    """Every calibration iteration at the full batch: the per-sequence term cannot be told apart from the
    constant, so it is 0 and the constant carries both (the fitted times stay right)."""
    from specbatch.sim.profile import load_profile

    cost = C.make_cost(load_profile(formula_profile), None, (), 8, 4)
    truth = TRUTH
    got, _ = C.fit_overheads(cost, made_up_calibrations(cost, truth, batches=[8]))
    assert got.sched_per_seq_s == 0.0
    assert got.sched_base_s == pytest.approx(truth.sched_base_s + 8 * truth.sched_per_seq_s, rel=1e-6)
    for k in ("sched_spec_s", "sched_per_gamma_s", "decode_s", "verify_s", "draft_s", "prefill_s", "prefill_draft_s",
              "admit_step_s", "admit_step_draft_s", "speed"):
        assert getattr(got, k) == pytest.approx(getattr(truth, k), rel=1e-6, abs=1e-12), k


def test_fit_overheads_fits_the_rounds_together(formula_profile):
    """Rounds that each ran too few values of γ to tell the verify term from the per-draft term (one ran
    γ ∈ {0, 1}, one γ ∈ {0, 4}, one γ ∈ {0, 2}) are fitted together, which separates them; a median
    taken term by term over the rounds' own fits would not."""
    from specbatch.sim.profile import load_profile

    cost = C.make_cost(load_profile(formula_profile), None, (), 8, 4)
    truth = TRUTH
    calibrations = made_up_calibrations(cost, truth)
    for c, g in zip(calibrations, (1, 4, 2)):
        it = c["iterations"]
        keep = (it["gamma"] == 0) | (it["gamma"] == g)
        c["iterations"] = it[keep].reset_index(drop=True)
    got, details = C.fit_overheads(cost, calibrations)
    for k, v in truth.as_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-6, abs=1e-12), k
    by_round = details["by_round"]
    assert by_round[0]["draft_s"] == 0.0  # γ = 1 alone: the verify term carries both
    assert by_round[0]["verify_s"] == pytest.approx((truth.verify_s + truth.draft_s) * 0.8 / 0.75)
    assert by_round[1]["verify_s"] == pytest.approx(truth.verify_s + 4 * truth.draft_s)


def test_agreement_tolerance_is_the_goal_plus_noise_widths():
    cases = [{"load": 0.3, "policy": p, "noise": {m: n for m in A.METRICS},
              "errors": {"model": {m: e for m in A.METRICS}}}
             for p, n, e in (("none", 0.01, 0.04), ("fixed", 0.02, -0.12), ("adaptive", 0.05, 0.21))]
    ag = A.agreement(cases, "model")
    assert ag["pooled_noise"]["noise"]["latency_mean"] == 0.02
    none, fixed, adaptive = ag["cases"]
    assert none["tolerance"]["latency_mean"] == pytest.approx(0.05 + 3 * 0.02)  # its own 1 % < the median 2 %
    assert adaptive["tolerance"]["latency_p99"] == pytest.approx(0.10 + 3 * 0.05)
    assert none["within"]["latency_mean"] and not fixed["within"]["latency_mean"] and fixed["within"]["latency_p99"]
    assert not adaptive["within"]["latency_mean"] and adaptive["within"]["latency_p99"]
    assert ag["all_within"] is False and ag["verdict"] == "disagree"
    # the simulator's own spread over the calibration rounds widens the tolerance: hypot(engine, model)
    for c, n in zip(cases, (0.03, 0.04, 0.05)):
        c["model_noise"] = {m: n for m in A.METRICS}
    ag = A.agreement(cases, "model")
    none, fixed, adaptive = ag["cases"]
    assert none["tolerance"]["latency_mean"] == pytest.approx(0.05 + 3 * np.hypot(0.02, 0.04))
    assert fixed["tolerance"]["latency_mean"] == pytest.approx(0.05 + 3 * np.hypot(0.02, 0.04))
    assert adaptive["tolerance"]["latency_mean"] == pytest.approx(0.05 + 3 * np.hypot(0.05, 0.05))
    assert fixed["within"]["latency_mean"] and ag["all_within"]
    # every error within its tolerance, but 5 % + 3 x 4.5 % > 2 x 5 %: too noisy to say "agree"
    assert ag["verdict"] == "inconclusive" and fixed["verdicts"]["latency_mean"] == "inconclusive"
    # any set of noises: here a third, the simulator's move with the speed's uncertainty
    for c, n in zip(cases, (0.0, 0.12, 0.01)):
        c["speed_noise"] = {m: n for m in A.METRICS}
    ag = A.agreement(cases, "model", ("noise", "model_noise", "speed_noise"))
    none, fixed, adaptive = ag["cases"]
    assert ag["pooled_noise"]["speed_noise"]["latency_mean"] == 0.01
    assert none["tolerance"]["latency_mean"] == pytest.approx(0.05 + 3 * np.sqrt(0.02 ** 2 + 0.04 ** 2 + 0.01 ** 2))
    assert fixed["tolerance"]["latency_mean"] == pytest.approx(0.05 + 3 * np.sqrt(0.02 ** 2 + 0.04 ** 2 + 0.12 ** 2))


def _made_up_cases(errors, noise):
    """Paired comparisons with made-up measurements: one case per ``(policy, error)``, the same error and the same
    paired noise on every metric (the simulator's and the speed's noise absent)."""
    return [{"load": 0.6, "policy": p, "paired_noise": {m: noise for m in A.METRICS},
             "errors": {"paired": {m: e for m in A.METRICS}}} for p, e in errors]


def test_agreement_verdicts_agree_disagree_inconclusive():
    """Issue #26: a tolerance that the noise widened beyond twice the goal cannot say "agree"."""
    noises = ("paired_noise",)
    # a quiet machine (noise 1 %: tolerance 8 % on mean latency, 13 % on p99, 8 % on throughput) and small errors
    quiet = A.agreement(_made_up_cases((("none", 0.02), ("fixed", -0.03), ("adaptive", 0.01)), 0.01), "paired", noises)
    assert quiet["verdict"] == "agree" and all(x["verdict"] == "agree" for x in quiet["cases"])
    assert quiet["cases"][0]["tolerance"]["latency_mean"] == pytest.approx(0.08)
    # the same machine, one case 9 % off: outside its 8 % tolerance on mean latency and throughput
    one_off = A.agreement(_made_up_cases((("none", 0.02), ("fixed", 0.09)), 0.01), "paired", noises)
    assert one_off["verdict"] == "disagree" and [x["verdict"] for x in one_off["cases"]] == ["agree", "disagree"]
    assert one_off["cases"][1]["verdicts"] == {"latency_mean": "disagree", "latency_p99": "agree",
                                               "throughput_tok_s": "disagree"}
    # the 2-core machine under load: noise ~20 %, tolerance ±65 %, errors -28 ... +12 %: no verdict
    loaded = A.agreement(_made_up_cases((("none", -0.28), ("fixed", 0.12), ("adaptive", 0.05)), 0.20), "paired",
                         noises)
    assert loaded["all_within"] and loaded["verdict"] == "inconclusive"
    assert all(v == "inconclusive" for x in loaded["cases"] for v in x["verdicts"].values())
    assert A.describe_verdict(loaded["cases"][0], "latency_mean") == "inconclusive (noise 20.0 %)"
    assert A.summary(loaded).startswith("inconclusive:") and "exit status 3" in A.summary(loaded)
    # ... unless an error is outside even that tolerance: a disagreement is a disagreement
    worse = A.agreement(_made_up_cases((("none", -0.28), ("fixed", 0.70)), 0.20), "paired", noises)
    assert worse["verdict"] == "disagree" and worse["cases"][0]["verdict"] == "inconclusive"
    # the boundary: a tolerance of exactly twice the goal still concludes; a nan error never agrees
    assert A.metric_verdict(0.099, 0.05, 0.10) == "agree" and A.metric_verdict(0.099, 0.05, 0.1001) == "inconclusive"
    assert A.metric_verdict(float("nan"), 0.05, 0.06) == "inconclusive"
    assert A.combine([]) == "inconclusive" and A.combine(["agree", "inconclusive"]) == "inconclusive"


def _made_up_report(errors, noise, repeats=5):
    """A report as :func:`validate.validate` returns it, around made-up paired comparisons."""
    cases = _made_up_cases(errors, noise)
    report = {"pair": {"target": "t", "draft": "d"}, "device": "cpu", "clock": "cpu", "loadavg_start": 1.0,
              "loadavg_end": 1.0, "calibration": {"overheads": {"speed": 1.0}, "speed_by_round": [1.0] * repeats},
              "variants": {"paired": []}, "cases": cases,
              "max_abs_error": {"paired": {m: max(abs(e) for _, e in errors) for m in A.METRICS}}}
    if repeats > 1:
        report["agreement"] = A.agreement(cases, "paired", ("paired_noise",))
    return V.add_verdict(report)


@pytest.mark.parametrize("errors, noise, repeats, verdict, code", [
    ((("none", 0.02), ("fixed", -0.03)), 0.01, 5, "agree", 0),
    ((("none", 0.02), ("fixed", 0.09)), 0.01, 5, "disagree", 1),
    ((("none", -0.28), ("fixed", 0.12)), 0.20, 5, "inconclusive", 3),
    ((("none", 0.02), ("fixed", -0.03)), 0.01, 1, "inconclusive", 3),  # one round: no noise estimate
])
def test_validate_cli_exit_status_and_summary_say_the_verdict(monkeypatch, capsys, tmp_path,
                                                               errors, noise, repeats, verdict, code):
    report = _made_up_report(errors, noise, repeats)
    monkeypatch.setattr(V, "validate", lambda **_: report)
    assert V.main(["--out", str(tmp_path)]) == code
    out = capsys.readouterr().out
    assert report["verdict"] == verdict and f"verdict: {verdict}" in out and f"exit status {code}" in out
    if verdict == "inconclusive" and repeats > 1:
        assert "vs ±65.0% inconclusive (noise 20.0 %)" in out and "% agree" not in out
    if verdict == "agree":
        assert "vs ±8.0% agree" in out and "inconclusive (" not in out
    if repeats == 1:
        assert "one round gives no noise estimate" in out


def test_validation_dashboard_says_the_verdict(tmp_path):
    """The dashboard's verdict line and tolerance rows, on made-up runs (the inconclusive case of the issue)."""
    from types import SimpleNamespace

    report = _made_up_report((("none", -0.28), ("fixed", 0.12)), 0.20)
    report.update(threads=1, device="cpu")
    run = SimpleNamespace(requests=pd.DataFrame({"latency_s": [1.0, 2.0, 3.0]}),
                          iterations=pd.DataFrame({"start_s": [0.0, 1.0], "prefill_s": [0.1, 0.0],
                                                   "step_s": [0.2, 0.2], "batch": [1, 2]}))
    cases = [{**c, "_real": run, "_sim": {"paired": run}} for c in report["cases"]]
    html = V.write_dashboard(cases, report, tmp_path / "d.html", "paired").read_text()
    assert "data-verdict='inconclusive'><b>Verdict: inconclusive:" in html and "All cases agree" not in html
    assert html.count("inconclusive (noise 20.0 %)") == 6 and html.count("<td>tolerance</td>") == 2
    assert "drafter draft_model," in html  # (a report written before drafter kinds: the draft model)
    report["drafter"] = V.validation_drafter("ngram", 0.7).describe()
    html = V.write_dashboard(cases, report, tmp_path / "d.html", "paired").read_text()
    assert "drafter ngram (match rate 0.7, window 5-5)," in html


def test_a_profile_without_the_drafters_rows_is_not_reused(tmp_path):
    """A fresh profile of the pair is reused only when it has the rows of the validation's drafter."""
    import datetime as dt

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(), "pair": {"target": "t", "draft": "d"},
            "timing": {"complete": True, "clock": "cpu", "grid": {"g": 1}, "drafters": ["draft", "ngram"]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    fresh = [V.fresh_profile(tmp_path, "t", "d", "cpu", {"g": 1}, 1.0, drafters) for drafters in
             (("draft",), ("draft", "ngram"), ("draft", "eagle"))]
    assert fresh == [True, True, False]
    del meta["timing"]["drafters"]  # a profile written before drafter kinds: the draft model's rows only
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert V.fresh_profile(tmp_path, "t", "d", "cpu", {"g": 1}, 1.0)
    assert not V.fresh_profile(tmp_path, "t", "d", "cpu", {"g": 1}, 1.0, ("draft", "ngram"))


def test_report_states_the_drafter():
    """format_report's first line names the drafter the engine and the simulator both ran."""
    report = _made_up_report((("none", 0.02), ("fixed", -0.03)), 0.01)
    report["drafter"] = V.validation_drafter("eagle").describe()
    assert ", drafter eagle, clock" in V.format_report(report).splitlines()[0]


def test_benchmark_summarizes_validations_it_did_not_run(tmp_path, capsys):
    """benchmarks/fidelity.py --reports: the paired errors' mean ± standard error over whole validations
    (the model's bias), and a clear error for a file that is not a report or validations of other cases."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fidelity as F

    paths = []
    for k, e in enumerate((0.10, -0.02, 0.04)):
        cases = [{"load": 0.3, "policy": "none", "real": {m: 1.0 for m in A.METRICS},
                  "errors": {v: {m: e for m in A.METRICS} for v in ("model", "paired")},
                  "sim": {"model": {m: 1.0 + e for m in A.METRICS}}}]
        paths.append(tmp_path / f"r{k}.json")
        paths[-1].write_text(json.dumps({"cases": cases}))
    assert F.main(["--reports", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    se = np.std([10, -2, 4], ddof=1) / np.sqrt(3)  # percent
    assert f"+4.0 ± {se:.1f}% (sd {np.std([10, -2, 4], ddof=1):.1f})" in out
    assert "+4.0% [+10, -2, +4]" in out  # the median of the paired errors, and each validation's
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="bad.json: no cases with paired errors"):
        F.main(["--reports", str(paths[0]), str(tmp_path / "bad.json")])
    other = json.loads(paths[0].read_text())
    other["cases"][0]["load"] = 0.6
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="cases differ"):
        F.main(["--reports", str(paths[0]), str(tmp_path / "other.json")])


def test_fit_overheads_under_chunked_prefill_recovers_the_chunk_terms(formula_profile):
    """Chunked prefill: half the calibration iterations carry one or two prompt chunks, their time the step's
    plus the mixed-iteration rule's extra at the round's speed plus chunk_s per chunk, chunk_draft_s per chunk
    whose draft is prefilled too, and chunk_forward_draft_s when the draft runs its chunks in a forward of
    their own (γ = 0 with the draft prefilled); the fit leaves them out of the step and scheduler terms and
    gives the three chunk terms back (the per-admission prefill terms 0)."""
    from specbatch.sim.profile import load_profile

    cost = C.make_cost(load_profile(formula_profile), None, (), 8, 4)
    truth = C.Overheads(**{**TRUTH.as_dict(), "prefill_s": 0.0, "prefill_draft_s": 0.0, "admit_step_s": 0.0,
                           "admit_step_draft_s": 0.0, "chunk_s": 4e-4, "chunk_draft_s": 1.5e-4,
                           "chunk_forward_draft_s": 9e-4})
    rng = np.random.default_rng(1)
    calibrations = made_up_calibrations(cost, truth)
    for c, speed in zip(calibrations, (0.75, 0.8, 0.85)):
        it = c["iterations"]
        it["models"] = np.where(rng.random(len(it)) < 0.5, 2, it["models"])  # γ = 0 runs that prefill the draft too
        chunks = [[(int(rng.integers(0, 64)), int(rng.integers(4, 40))) for _ in range(rng.integers(1, 3))]
                  if rng.random() < 0.5 else [] for _ in range(len(it))]
        k = truth.speed / speed
        for i, ch in enumerate(chunks):
            if ch:
                b, g, m = int(it.at[i, "batch"]), int(it.at[i, "gamma"]), int(it.at[i, "models"])
                rule = cost.mixed_iteration(b, g, float(it.at[i, "context_max"]), ch, m == 2)[0] / speed
                alone = m == 2 and g == 0
                it.loc[i, ["step_s", "step_model_s"]] += rule + k * (len(ch) * (truth.chunk_s + (m == 2) * truth.chunk_draft_s)
                                                                     + alone * truth.chunk_forward_draft_s)
        it["chunks"] = chunks
        it["prompts"], it["prefill_s"] = None, 0.0
    got, _ = C.fit_overheads(cost, calibrations, prefill="chunked")
    for key, v in truth.as_dict().items():
        assert getattr(got, key) == pytest.approx(v, rel=1e-6, abs=1e-12), key
    full = C.EngineCostModel(cost, got)
    extra, step = full.mixed_iteration(2, 0, 300.0, [(0, 20), (5, 10)], draft=True)
    assert extra == pytest.approx(cost.mixed_iteration(2, 0, 300.0, [(0, 20), (5, 10)])[0] / got.speed
                                  + 2 * (got.chunk_s + got.chunk_draft_s) + got.chunk_forward_draft_s)
    assert step == full.iteration(2, 0, 300.0)
    assert full.mixed_iteration(2, 1, 300.0, [(0, 20)], draft=True)[0] == pytest.approx(  # the draft's chunks ride along
        cost.mixed_iteration(2, 1, 300.0, [(0, 20)])[0] / got.speed + got.chunk_s + got.chunk_draft_s)
    assert full.mixed_iteration(2, 0, 300.0, [(0, 20)], draft=False)[0] == pytest.approx(
        cost.mixed_iteration(2, 0, 300.0, [(0, 20)], draft=False)[0] / got.speed + got.chunk_s)
