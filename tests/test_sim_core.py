"""Simulator core: exact scenarios, conservation, determinism, acceptance statistics, routers, static mode."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel, expected_tokens
from specbatch.sim.cluster import ClusterConfig, charged_context, mean_context, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.metrics import summarize
from specbatch.sim.policies import Policy, make_policy
from specbatch.sim.profile import ProfileError, load_profile
from specbatch.sim.workload import Workload, synthetic


def workload(arrivals, prompts, outputs, classes=None):
    return Workload(np.asarray(arrivals, float), np.asarray(prompts, np.int64), np.asarray(outputs, np.int64),
                    request_class=None if classes is None else np.asarray(classes))


@pytest.fixture
def constant_cost(tmp_path):
    """Verify 0.1 s, draft decode 0.01 s at every point; target prefill 1 ms/token, draft 0.1 ms/token."""
    p = write_formula_profile(tmp_path / "const", verify=linear_step(0.1, 0.0), draft=linear_step(0.01, 0.0),
                              prefill=lambda n: 1e-3 * n)
    return CostModel(load_profile(p), max_batch=8, max_gamma=8)


def test_two_requests_without_speculation_have_exact_latencies(constant_cost):
    # r0 at 0 s: prefill 100 tok = 0.1 s (first token 0.1), one decode 0.1 s -> 0.2 s with 2 tokens.
    # r1 arrived at 0.05 s, admitted at 0.2 s: prefill 200 tok = 0.2 s (first token 0.4),
    # then a batch-2 decode of 0.1 s ending at 0.5 s finishes both (r0: 3 tokens, r1: 2 tokens).
    w = workload([0.0, 0.05], [100, 200], [3, 2])
    r = simulate(w, constant_cost, make_policy("none"), AcceptanceModel(alpha=0.5), ClusterConfig(max_batch=8))
    q = r.requests
    assert q["first_token_s"].tolist() == pytest.approx([0.1, 0.4])
    assert q["finished_s"].tolist() == pytest.approx([0.5, 0.5])
    assert q["ttft_s"].tolist() == pytest.approx([0.1, 0.35])
    assert q["latency_s"].tolist() == pytest.approx([0.5, 0.45])
    assert q["tpot_s"].tolist() == pytest.approx([0.2, 0.1])
    assert q["iterations"].tolist() == [2, 1]
    assert r.makespan_s == pytest.approx(0.5)
    assert r.iterations["batch"].tolist() == [1, 2]


def test_two_requests_with_full_acceptance_have_exact_latencies(constant_cost):
    # γ = 2, α = 1: every iteration gains 3 tokens (capped by what is left). Prefill includes the draft.
    # r0: prefill 0.1 + 0.01 = 0.11 s; step 2·0.01 + 0.1 = 0.12 s -> 0.23 s with 4 tokens.
    # r1 (arrived 0.05 s) admitted at 0.23 s: prefill 0.2 + 0.02 = 0.22 s -> first token 0.45 s;
    # batch-2 step 0.12 s -> 0.57 s: r0 gains its 5th token, r1 its 2nd; both finish.
    w = workload([0.0, 0.05], [100, 200], [5, 2])
    r = simulate(w, constant_cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=1.0), ClusterConfig(max_batch=8))
    q = r.requests
    assert q["first_token_s"].tolist() == pytest.approx([0.11, 0.45])
    assert q["finished_s"].tolist() == pytest.approx([0.57, 0.57])
    assert q["accepted_tokens"].tolist() == [4, 2]  # r0: 2 + 2 accepted (the 2nd capped by its length)
    assert q["generated_tokens"].tolist() == [5, 2]


@pytest.mark.parametrize("fast_forward", [True, False])
def test_draft_sync_charges_a_draft_step_at_gamma_zero_for_drafting_policies(constant_cost, fast_forward):
    # As the no-speculation scenario above, but with a drafting policy at γ = 0: prefill includes the draft
    # (0.1 + 0.01 s), and each γ = 0 iteration costs 0.1 s of target decode + 0.01 s of draft decode.
    # r0: first token 0.11, one step -> 0.22 s. r1 admitted at 0.22: prefill 0.2 + 0.02 -> first token
    # 0.44 s; batch-2 step 0.11 s -> both finish at 0.55 s.
    w = workload([0.0, 0.05], [100, 200], [3, 2])
    sync = ClusterConfig(max_batch=8, draft_sync=True, fast_forward=fast_forward)
    r = simulate(w, constant_cost, make_policy("fixed", gamma=0), AcceptanceModel(alpha=0.5), sync)
    assert r.requests["first_token_s"].tolist() == pytest.approx([0.11, 0.44])
    assert r.requests["finished_s"].tolist() == pytest.approx([0.55, 0.55])
    assert r.iterations["step_s"].tolist() == pytest.approx([0.11, 0.11])
    # the `none` policy loads no draft model: nothing to keep in step, the same run as without draft_sync
    plain = ClusterConfig(max_batch=8, fast_forward=fast_forward)
    a = simulate(w, constant_cost, make_policy("none"), AcceptanceModel(alpha=0.5), sync)
    b = simulate(w, constant_cost, make_policy("none"), AcceptanceModel(alpha=0.5), plain)
    pd.testing.assert_frame_equal(a.requests, b.requests)
    assert not constant_cost.draft_sync  # simulate works on a copy


@pytest.mark.parametrize("mode", ["continuous", "static"])
@pytest.mark.parametrize("fast_forward", [True, False])
def test_padded_attention_charges_steps_at_the_longest_sequence(tmp_path, mode, fast_forward):
    """``attention="paged"`` charges each step at the batch's mean context, ``"padded"`` at its longest
    sequence's (logged as ``context_max``, NaN under paged); the same tokens otherwise, and padded is slower
    when contexts differ."""
    folder = write_formula_profile(tmp_path / "ctx", verify=linear_step(0.005, 0.0002, 2e-6),
                                   draft=linear_step(0.0005, 0.0, 2e-7))
    cost = CostModel(load_profile(folder), max_batch=4, max_gamma=4)
    w = workload([0.0, 0.0, 0.01, 0.3, 0.3], [20, 900, 60, 1500, 40], [30, 12, 25, 20, 35])
    runs = {}
    for attention in ("paged", "padded"):
        cl = ClusterConfig(max_batch=4, mode=mode, fast_forward=fast_forward, attention=attention)
        r = runs[attention] = simulate(w, cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.6), cl, seed=3)
        it = r.iterations[r.iterations["step_s"] > 0]
        charged = it["context_max" if attention == "padded" else "context"]
        expected = [cost.iteration(int(b), int(g), float(c)) for b, g, c in zip(it["batch"], it["gamma"], charged)]
        assert it["step_s"].tolist() == expected
        if attention == "paged":
            assert r.iterations["context_max"].isna().all()  # not tracked: no step depends on it
            continue
        assert (it["context_max"] >= it["context"]).all() and (it["context_max"] > it["context"] + 100).any()
        one = it["batch"] == 1  # a lone sequence is its own longest
        assert (it.loc[one, "context_max"] == it.loc[one, "context"]).all()
    paged, padded = runs["paged"], runs["padded"]
    assert padded.makespan_s > paged.makespan_s
    assert padded.requests["generated_tokens"].tolist() == paged.requests["generated_tokens"].tolist()


class _Recorder(Policy):
    """Fixed γ = 2 without a steady answer (so every iteration is stepped), keeping every view it is shown."""

    name = "recorder"

    def __init__(self):
        self.views = []

    def __deepcopy__(self, memo):  # the cluster copies a policy per replica: keep one record
        return self

    def choose(self, view):
        self.views.append(view)
        return 2


@pytest.mark.parametrize("mode", ["continuous", "static"])
@pytest.mark.parametrize("attention", ["paged", "padded"])
def test_policies_see_the_context_a_step_is_charged_at(tmp_path, mode, attention):
    """``BatchView.step_context`` is the context the iteration is priced at: the mean under paged attention,
    the longest sequence's under padded; ``BatchView.context`` stays the mean."""
    folder = write_formula_profile(tmp_path / "ctx", verify=linear_step(0.005, 0.0002, 2e-6),
                                   draft=linear_step(0.0005, 0.0, 2e-7))
    cost = CostModel(load_profile(folder), max_batch=4, max_gamma=4)
    w = workload([0.0, 0.0, 0.01, 0.3, 0.3], [20, 900, 60, 1500, 40], [30, 12, 25, 20, 35])
    rec = _Recorder()
    r = simulate(w, cost, rec, AcceptanceModel(alpha=0.6), ClusterConfig(max_batch=4, mode=mode, attention=attention),
                 seed=3)
    views = rec.views
    it = r.iterations[r.iterations["step_s"] > 0]
    assert len(views) == len(it) > 10
    assert [v.context for v in views] == pytest.approx(it["context"].tolist())
    charged = it["context_max" if attention == "padded" else "context"].tolist()
    assert [v.step_context for v in views] == pytest.approx(charged)
    if attention == "padded":
        assert any(v.step_context > v.context + 100 for v in views)


def test_charged_context_is_the_expected_longest_of_b_contexts_under_padded_attention():
    """Mid-life contexts 120 (80 requests) and 1820 (20): under paged every batch size gets the mean, under
    padded the longest of b draws is 1820 unless all b are short, E = 1820 − 1700·0.8^b."""
    w = workload(np.arange(100.0), [100] * 80 + [1800] * 20, [40] * 100)
    assert charged_context(w, "paged", 8) == pytest.approx(460.0) == mean_context(w)
    padded = charged_context(w, "padded", 8)
    assert padded == pytest.approx([1820 - 1700 * 0.8 ** b for b in range(1, 9)])
    assert padded[0] == pytest.approx(mean_context(w))
    with pytest.raises(ValueError, match=r"attention is 'flash'; expected one of \['paged', 'padded'\]"):
        charged_context(w, "flash", 8)


@pytest.mark.parametrize("mode", ["continuous", "static"])
@pytest.mark.parametrize("attention", ["paged", "padded"])
@pytest.mark.parametrize("fast_forward", [True, False])
def test_batched_prefill_charges_one_forward_per_model_for_an_iterations_admissions(tmp_path, mode, attention,
                                                                                     fast_forward):
    """Three requests arrive together. Sequential prefill: 100 + 200 + 300 tokens at 1 ms/token = 0.6 s (target)
    plus a tenth for the draft. Batched: one forward of batch 3 at the mean length (paged: 200) or the
    longest (padded: 300), b prompts of n tokens costing n·(1 + (b − 1)/2) ms: 0.4 s / 0.6 s, plus a tenth;
    every admitted request's first token comes when the forwards end."""
    p = write_formula_profile(tmp_path / "pb", verify=linear_step(0.1, 0.0), draft=linear_step(0.01, 0.0),
                              prefill_batches=(1, 2, 4, 8), batched_prefill=lambda n, b: 1e-3 * n * (1 + (b - 1) / 2))
    cost = CostModel(load_profile(p), max_batch=8, max_gamma=4)
    w = workload([0.0, 0.0, 0.0], [100, 200, 300], [3, 2, 4])
    runs = {}
    for prefill in ("sequential", "batched"):
        cl = ClusterConfig(max_batch=8, mode=mode, attention=attention, prefill=prefill, fast_forward=fast_forward)
        runs[prefill] = simulate(w, cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.5), cl, seed=2)
    expected = {"sequential": 0.6 * 1.1, "batched": (0.4 if attention == "paged" else 0.6) * 1.1}
    for prefill, r in runs.items():
        assert r.requests["first_token_s"].tolist() == pytest.approx([expected[prefill]] * 3)
        assert r.iterations["prefill_s"].iloc[0] == pytest.approx(expected[prefill])
    seq, bat = runs["sequential"], runs["batched"]
    assert bat.requests["generated_tokens"].tolist() == seq.requests["generated_tokens"].tolist()
    shift = expected["sequential"] - expected["batched"]  # the same iterations, earlier by the prefill saved
    assert bat.requests["finished_s"].tolist() == pytest.approx((seq.requests["finished_s"] - shift).tolist())


def test_batched_prefill_needs_prefill_rows_at_several_batch_sizes(constant_cost):
    w = workload([0.0, 0.0], [100, 200], [3, 2])
    with pytest.raises(ProfileError, match=r"const/steps.csv: cluster.prefill=batched needs ok prefill rows for "
                                           r"model=target at two or more batch sizes"):
        simulate(w, constant_cost, make_policy("none"), AcceptanceModel(alpha=0.5),
                 ClusterConfig(max_batch=8, prefill="batched"))
    with pytest.raises(ValueError, match=r"cluster.prefill is 'bogus'; expected one of \['sequential', 'batched', 'chunked'\]"):
        ClusterConfig(prefill="bogus").validate()


def test_attention_must_be_paged_or_padded():
    with pytest.raises(ValueError, match=r"cluster.attention is 'flash'; expected one of \['paged', 'padded'\]"):
        ClusterConfig(attention="flash").validate()


def test_request_that_only_needs_its_first_token_finishes_at_prefill(constant_cost):
    w = workload([0.0], [300], [1])
    r = simulate(w, constant_cost, make_policy("none"), AcceptanceModel(alpha=0.5), ClusterConfig(max_batch=8))
    assert r.requests["finished_s"].iloc[0] == pytest.approx(0.3)
    assert r.requests["iterations"].iloc[0] == 0


def _conservation(result, w):
    q = result.requests
    served = q[~q["rejected"]]
    assert len(q) == len(w)
    assert served["finished_s"].notna().all()
    assert (served["generated_tokens"] == served["output_tokens"]).all()
    assert (served["first_token_s"] >= served["arrival_s"] - 1e-12).all()
    assert (served["finished_s"] >= served["first_token_s"] - 1e-12).all()
    # Every output token is produced exactly once (a recomputed request's prefill yields its next token).
    assert result.iterations["tokens"].sum() == served["output_tokens"].sum()


@pytest.mark.parametrize("policy", [("none", {}), ("fixed", {"gamma": 3}), ("adaptive", {})])
def test_conservation_with_preemption(formula_profile, policy):
    cost = CostModel(load_profile(formula_profile), max_batch=16)
    w = synthetic(300, rate=50.0, prompt_lognormal=(200, 0.8), output_lognormal=(100, 0.8), seed=3)
    # A small KV cache forces preemptions: 16 sequences of ~300 tokens do not fit in 2500 tokens.
    cl = ClusterConfig(replicas=2, max_batch=16, kv_capacity_tokens=2500, router="least_outstanding")
    r = simulate(w, cost, make_policy(policy[0], **policy[1]), AcceptanceModel(alpha=0.8, concentration=10), cl, seed=1)
    rejected = (w.prompt_tokens + w.output_tokens) > 2500
    assert r.requests["rejected"].tolist() == rejected.tolist()
    _conservation(r, w)
    assert r.requests["preemptions"].sum() > 0
    assert (r.iterations["kv_tokens"] <= 2500).all()


def test_same_seed_same_result_and_seed_matters(formula_profile):
    cost = CostModel(load_profile(formula_profile), max_batch=32)
    w = synthetic(400, rate=20.0, process="gamma", cv=3.0, seed=5)
    acc = AcceptanceModel(alpha=0.7, concentration=5.0)
    cl = ClusterConfig(replicas=3, router="random", max_batch=32)
    a = simulate(w, cost, make_policy("fixed", gamma=4), acc, cl, seed=11)
    b = simulate(w, cost, make_policy("fixed", gamma=4), acc, cl, seed=11)
    c = simulate(w, cost, make_policy("fixed", gamma=4), acc, cl, seed=12)
    pd.testing.assert_frame_equal(a.requests, b.requests)
    pd.testing.assert_frame_equal(a.iterations, b.iterations)
    assert not a.requests["finished_s"].equals(c.requests["finished_s"])


@pytest.mark.parametrize("alpha,gamma", [(0.5, 2), (0.7, 4), (0.9, 6), (0.0, 3), (1.0, 3)])
def test_tokens_per_iteration_matches_closed_form(formula_profile, alpha, gamma):
    cost = CostModel(load_profile(formula_profile), max_batch=8)
    n, out = 8, 8000
    w = workload(np.zeros(n), np.full(n, 64), np.full(n, out))
    r = simulate(w, cost, make_policy("fixed", gamma=gamma), AcceptanceModel(alpha=alpha),
                 ClusterConfig(max_batch=8, kv_capacity_tokens=10**7), seed=2)
    q = r.requests
    gained = (q["generated_tokens"] - 1).sum()  # the first token comes from prefill
    iters = q["iterations"].sum()
    mean = gained / iters
    expect = expected_tokens(alpha, gamma)
    # Standard error of the per-iteration gain; the capped last iteration biases by < 1 token per request.
    p = np.array([alpha ** k for k in range(gamma + 1)])  # P(gain ≥ k+1)
    var = ((2 * np.arange(gamma + 1) + 1) * p).sum() - expect**2
    se = math.sqrt(max(var, 1e-12) / iters)
    assert abs(mean - expect) <= 4 * se + n / iters, (mean, expect, se)
    assert expect == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha) if alpha < 1 else gamma + 1)


def test_per_position_acceptance_sampling_matches_formula():
    pos = np.array([0.9, 0.8, 0.6, 0.5])
    m = AcceptanceModel(positions=pos, max_gamma=4)
    rng = np.random.default_rng(0)
    thr = m.thresholds(np.ones(200_000), 4)
    acc = (rng.random(200_000)[:, None] < thr).sum(axis=1)
    assert acc.mean() + 1 == pytest.approx(expected_tokens(pos, 4), abs=0.01)
    assert acc.mean() + 1 == pytest.approx(1 + np.cumprod(pos).sum(), abs=0.01)
    direct = m.sample(np.ones(200_000), 4, np.random.default_rng(1))
    assert direct.mean() == pytest.approx(acc.mean(), abs=0.01)


def test_heterogeneous_acceptance_keeps_the_mean():
    m = AcceptanceModel(alpha=0.6, concentration=4.0)
    scale = m.request_scale(100_000, np.random.default_rng(0))
    assert (scale * 0.6).mean() == pytest.approx(0.6, abs=0.005)
    assert (scale * 0.6).std() > 0.1
    classes = np.array([0, 1] * 1000)
    m2 = AcceptanceModel(alpha=0.6, class_alpha={0: 0.9, 1: 0.3})
    s2 = m2.request_scale(2000, np.random.default_rng(0), classes) * 0.6
    assert s2[classes == 0] == pytest.approx(0.9) and s2[classes == 1] == pytest.approx(0.3)


def test_round_robin_and_least_outstanding_routers(formula_profile):
    cost = CostModel(load_profile(formula_profile), max_batch=8)
    w = workload(np.arange(12) * 0.001, np.full(12, 64), np.full(12, 50))
    rr = simulate(w, cost, make_policy("none"), AcceptanceModel(alpha=0.5), ClusterConfig(replicas=3, max_batch=8))
    assert rr.requests["replica"].tolist() == [0, 1, 2] * 4
    lo = simulate(w, cost, make_policy("none"), AcceptanceModel(alpha=0.5),
                  ClusterConfig(replicas=3, max_batch=8, router="least_outstanding"))
    assert sorted(np.bincount(lo.requests["replica"])) == [4, 4, 4]
    kv = simulate(w, cost, make_policy("none"), AcceptanceModel(alpha=0.5),
                  ClusterConfig(replicas=3, max_batch=8, router="least_kv"))
    assert sorted(np.bincount(kv.requests["replica"])) == [4, 4, 4]


def test_static_batching_runs_batches_to_completion(constant_cost):
    # Batch of 2 formed at t=0: prefill 0.1 + 0.1 s, then decode steps of 0.1 s until the longest (4 tokens)
    # is done: 3 steps -> 0.5 s. The short request (2 tokens) finishes at 0.3 s but its slot stays.
    # r2 arrives at 0.01 s and must wait for the whole batch: prefill 0.1 s from 0.5 s -> 0.6 s first token.
    w = workload([0.0, 0.0, 0.01], [100, 100, 100], [4, 2, 2])
    r = simulate(w, constant_cost, make_policy("none"), AcceptanceModel(alpha=0.5),
                 ClusterConfig(max_batch=2, mode="static"))
    q = r.requests
    assert q["first_token_s"].tolist() == pytest.approx([0.2, 0.2, 0.6])
    assert q["finished_s"].tolist() == pytest.approx([0.5, 0.3, 0.7])
    assert (r.iterations.loc[r.iterations["step_s"] > 0, "batch"] == [2, 2, 2, 1]).all()


def test_summary_metrics_are_consistent(formula_profile):
    cost = CostModel(load_profile(formula_profile), max_batch=32)
    w = synthetic(200, rate=5.0, seed=1)
    r = simulate(w, cost, make_policy("fixed", gamma=3), AcceptanceModel(alpha=0.8), ClusterConfig(max_batch=32))
    s = summarize(r, slo_ttft_s=1e9, slo_tpot_s=1e9)
    assert s["completed"] == 200 and s["slo_attainment"] == 1.0
    assert s["goodput_req_s"] == pytest.approx(s["throughput_req_s"])
    assert s["throughput_tok_s"] == pytest.approx(w.output_tokens.sum() / r.makespan_s)
    assert s["mean_gamma"] == pytest.approx(3.0)
    assert 0 < s["busy_fraction_mean"] <= 1.0
    assert s["latency_p50"] <= s["latency_p90"] <= s["latency_p99"]
    assert s["mean_accepted"] == pytest.approx(expected_tokens(0.8, 3) - 1, abs=0.15)
    tight = summarize(r, slo_ttft_s=1e-9, slo_tpot_s=1e9)
    assert tight["goodput_req_s"] == 0.0


def test_plans_flushed_in_small_groups_give_the_same_iteration_table(formula_profile, monkeypatch):
    """Fast-forward plans become rows a group at a time; group boundaries (here every 2 plans, with queue
    growth inside plans) change nothing against one row per iteration."""
    from specbatch.sim.iterations import IterationLog

    cost = CostModel(load_profile(formula_profile), max_batch=4)
    w = synthetic(300, rate=40.0, prompt_lognormal=(200, 0.8), output_lognormal=(40, 0.8), seed=2)

    def run(fast_forward):
        return simulate(w, cost, make_policy("fixed", gamma=3), AcceptanceModel(alpha=0.7),
                        ClusterConfig(replicas=2, max_batch=4, fast_forward=fast_forward), seed=4)

    monkeypatch.setattr(IterationLog, "FLUSH_PLANS", 2)
    fast, slow = run(True), run(False)
    pd.testing.assert_frame_equal(fast.iterations, slow.iterations, check_exact=True)
    pd.testing.assert_frame_equal(fast.requests, slow.requests, check_exact=True)
    assert fast.iterations["queue"].max() > 5 and len(fast.iterations) > 1000
