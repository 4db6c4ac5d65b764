"""Speculation policies: configs load, bad values name their key, each adapts as designed, none looks ahead."""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import ClusterConfig, charged_context, mean_context, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.policies import (AdaptiveContext, BatchView, EmaTiers, Goodput, PolicyWarning, Threshold, make_policy,
                          optimal_gamma_table, policy_names, table_to_ranges)
from specbatch.sim.profile import load_profile
from specbatch.sim.workload import Workload

CONF = Path(__file__).resolve().parents[1] / "conf" / "policy"


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    folder = write_formula_profile(tmp_path_factory.mktemp("p") / "p", verify=linear_step(0.010, 0.0005, knee=64),
                                   draft=linear_step(0.001, 0.00002))
    return CostModel(load_profile(folder), max_batch=64, max_gamma=8)


def workload(n=120, seed=0, rate=20.0, out=60):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    return Workload(t - t[0], rng.integers(16, 100, n), rng.integers(5, out, n), name="w")


def view(batch, context=512.0, ids=None, now=0.0, step_context=None):
    ids = np.arange(batch) if ids is None else ids
    return BatchView(now, 0, batch, context, ids, context if step_context is None else step_context)


def policy_from_conf(name: str):
    params = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    return make_policy(params.pop("name"), **params)


@pytest.mark.parametrize("name", ["adaptive", "adaptive_context", "goodput", "threshold", "ema_tiers", "fixed", "none"])
def test_conf_policy_runs(cost, name):
    p = policy_from_conf(name)
    res = simulate(workload(60), cost, p, AcceptanceModel(alpha=0.7), ClusterConfig(max_batch=32), seed=1)
    assert res.requests["finished_s"].notna().all()
    assert p.describe()["name"] == name


@pytest.mark.parametrize("name,params,key", [
    ("goodput", {"ema": 0}, "policy.ema"),
    ("goodput", {"explore_every": -1}, "policy.explore_every"),
    ("goodput", {"prior_alpha": 2}, "policy.prior_alpha"),
    ("threshold", {"ranges": [[2, 4]]}, "policy.ranges"),
    ("threshold", {"ranges": [[1, -1]]}, "policy.ranges[0][1]"),
    ("threshold", {"off_above": 0}, "policy.off_above"),
    ("ema_tiers", {"tiers": [4, 2]}, "policy.tiers"),
    ("ema_tiers", {"up_ratio": 0.3, "down_ratio": 0.5}, "policy.down_ratio"),
    ("adaptive_context", {"contexts": [0]}, "policy.contexts"),
])
def test_bad_values_name_the_key(name, params, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        make_policy(name, **params)


def test_adaptive_context_speculates_more_at_long_context(tmp_path):
    folder = write_formula_profile(tmp_path / "ctx", verify=linear_step(0.002, 0.0005, per_ctx=2e-6, knee=64),
                                   draft=linear_step(0.0005, 0.00001))
    cost = CostModel(load_profile(folder), max_batch=64, max_gamma=8)
    p = AdaptiveContext(contexts=[128, 512, 2048])
    p.setup(cost, AcceptanceModel(alpha=0.8), 512)
    assert p.choose(view(32, 100)) == optimal_gamma_table(cost, AcceptanceModel(alpha=0.8), 128)[31]
    assert p.choose(view(32, 3000)) > p.choose(view(32, 100))
    assert p.choose(view(32, 1100)) == p.choose(view(32, 2048))  # nearest on a log scale (√(512·2048) = 1024)


def test_threshold_ranges_and_off_above(cost):
    p = Threshold(ranges=[[1, 4], [9, 2], [33, 1]], off_above=48)
    p.setup(cost, AcceptanceModel(alpha=0.7), 512)
    assert [p.choose(view(b)) for b in (1, 8, 9, 32, 33, 48, 49, 64)] == [4, 4, 2, 2, 1, 1, 0, 0]
    derived = Threshold()
    derived.setup(cost, AcceptanceModel(alpha=0.7), 512)
    table = optimal_gamma_table(cost, AcceptanceModel(alpha=0.7), 512)
    assert [derived.choose(view(b)) for b in range(1, 65)] == table.tolist()
    assert table_to_ranges([3, 3, 1, 0, 0]) == [(1, 2, 3), (3, 3, 1), (4, 5, 0)]


def test_goodput_learns_acceptance_and_turns_off_when_compute_bound(cost):
    p = Goodput(prior_alpha=0.3, ema=0.05)
    p.setup(cost, AcceptanceModel(alpha=0.3), 512)
    v = view(2)
    assert p.choose(v) <= 2
    rng = np.random.default_rng(0)
    for _ in range(300):  # true α = 0.9 at γ = 8
        u = rng.random((2, 8)) >= 0.9
        acc = np.where(u.any(1), u.argmax(1), 8)
        p.observe(v, 8, acc)
    assert p.alpha_global() == pytest.approx(0.9, abs=0.05)
    assert p.alphas(np.array([0, 1])) == pytest.approx([0.9, 0.9], abs=0.05)
    assert p.choose(view(2)) >= 6
    assert p.choose(view(64)) == 0  # compute-bound: E/T is best without speculation


def test_goodput_prices_the_step_at_the_context_it_is_charged_at(tmp_path):
    """Under padded attention a step costs what the longest sequence's context costs: goodput predicts
    with ``BatchView.step_context``, not the mean context."""
    folder = write_formula_profile(tmp_path / "ctx", verify=linear_step(0.005, 0.0002, 2e-6),
                                   draft=linear_step(0.0005, 0.0, 2e-7))
    ctx_cost = CostModel(load_profile(folder), max_batch=8, max_gamma=4)
    p = Goodput(prior_alpha=0.7, per_request=False)
    p.setup(ctx_cost, AcceptanceModel(alpha=0.7), 512)
    expected = np.cumsum(4 * 0.7 ** np.arange(5))
    for step_context in (200.0, 1800.0):
        t = [ctx_cost.iteration(4, g, step_context) for g in range(5)]
        got = p.predicted_goodput(view(4, context=200.0, step_context=step_context))
        assert got == pytest.approx(expected / np.array(t))
    assert not np.allclose(p.predicted_goodput(view(4, context=200.0, step_context=1800.0)),
                           p.predicted_goodput(view(4, context=200.0)))


def test_adaptive_table_is_built_at_the_context_steps_are_charged_at(tmp_path):
    """Under padded attention a batch's step costs its longest sequence's context, which grows with the batch:
    ``adaptive`` builds γ*(b) at :func:`charged_context` per batch size (recorded in ``contexts_by_batch``),
    under paged at the mean context for every b."""
    folder = write_formula_profile(tmp_path / "ctx", verify=linear_step(0.005, 0.0004, 2e-6, knee=8),
                                   draft=linear_step(0.0005, 0.0, 2e-7))
    ctx_cost = CostModel(load_profile(folder), max_batch=16, max_gamma=6)
    acc = AcceptanceModel(alpha=0.7)
    w = Workload(np.arange(100.0), np.array([100] * 80 + [1800] * 20), np.full(100, 40))
    tables = {}
    for attention in ("paged", "padded"):
        r = simulate(w, ctx_cost, make_policy("adaptive"), acc, ClusterConfig(max_batch=16, attention=attention))
        ref = charged_context(w, attention, 16)
        assert list(r.policy["table"].values()) == optimal_gamma_table(ctx_cost, acc, ref).tolist()
        assert r.policy["context"] == pytest.approx(mean_context(w))
        tables[attention] = list(r.policy["table"].values())
        if attention == "paged":
            assert r.policy["contexts_by_batch"] is None
        else:
            assert list(r.policy["contexts_by_batch"].values()) == pytest.approx(ref.tolist())
    assert tables["padded"] != tables["paged"]  # longer charged contexts at large batches: more speculation
    assert all(p >= q for p, q in zip(tables["padded"], tables["paged"]))


def test_adaptive_context_looks_up_the_context_steps_are_charged_at(tmp_path):
    """Under padded attention ``adaptive_context`` picks its table row by the longest sequence's context (what
    the step costs), in fast-forwarded plans as in stepped iterations: both give the same run."""
    folder = write_formula_profile(tmp_path / "ctx", verify=linear_step(0.005, 0.0004, 2e-6, knee=8),
                                   draft=linear_step(0.0005, 0.0, 2e-7))
    ctx_cost = CostModel(load_profile(folder), max_batch=8, max_gamma=6)
    acc = AcceptanceModel(alpha=0.7)
    w = Workload(np.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.6]), np.array([40, 60, 900, 30, 1500, 20]),
                 np.array([80, 60, 70, 90, 50, 60]))
    runs = [simulate(w, ctx_cost, make_policy("adaptive_context"), acc,
                     ClusterConfig(max_batch=8, attention="padded", fast_forward=ff), seed=1) for ff in (True, False)]
    pd.testing.assert_frame_equal(runs[0].iterations, runs[1].iterations)
    pd.testing.assert_frame_equal(runs[0].requests, runs[1].requests)
    p = make_policy("adaptive_context")
    p.setup(ctx_cost, acc, 100.0)
    it = runs[0].iterations[runs[0].iterations["step_s"] > 0]
    at_max = [p.choose(view(int(b), c, step_context=m))
              for b, c, m in zip(it["batch"], it["context"], it["context_max"])]
    at_mean = [p.choose(view(int(b), c)) for b, c in zip(it["batch"], it["context"])]
    assert it["gamma"].tolist() == at_max
    assert at_mean != at_max  # the mean would have picked other rows


def test_goodput_per_request_estimates_differ(cost):
    p = Goodput(prior_alpha=0.6, per_request=True)
    p.setup(cost, AcceptanceModel(alpha=0.6), 512)
    v = view(2, ids=np.array([5, 7]))
    for _ in range(50):
        p.observe(v, 4, np.array([4, 0]))  # request 5 always accepts everything, request 7 nothing
    a5, a7 = p.alphas(np.array([5, 7]))
    assert a5 > 0.85 and a7 < 0.2


def test_goodput_explores_after_zero_run(cost):
    p = Goodput(explore_every=3)
    p.setup(cost, AcceptanceModel(alpha=0.5), 512)
    picks = [p.choose(view(64)) for _ in range(6)]
    assert picks == [0, 0, 1, 0, 0, 1]


def test_ema_tiers_moves_with_acceptance_and_holds(cost):
    p = EmaTiers(tiers=[1, 2, 4, 8], start=2, hold=5, ema=0.2)
    p.setup(cost, AcceptanceModel(alpha=0.7), 512)
    assert p.choose(view(4)) == 2
    for _ in range(4):  # within the hold: no switch even on perfect acceptance
        p.observe(view(4), 2, np.full(4, 2))
    assert p.choose(view(4)) == 2
    for _ in range(40):
        p.observe(view(4), p.choose(view(4)), np.full(4, p.choose(view(4))))
    assert p.choose(view(4)) == 8
    for _ in range(80):
        p.observe(view(4), p.choose(view(4)), np.zeros(4, np.int64))
    assert p.choose(view(4)) == 1
    assert p.describe()["switches"] >= 4


def test_ema_tiers_above_max_gamma_are_dropped_with_a_warning(cost):
    small = CostModel(cost.profile, max_batch=64, max_gamma=4)
    p = EmaTiers(tiers=[1, 2, 4, 8], start=8)
    with pytest.warns(PolicyWarning, match=r"policy.tiers \[1, 2, 4, 8\] go above .*\(4,.*using tiers \[1, 2, 4\] "
                                           r"and starting at 2 instead of policy.start=8"):
        p.setup(small, AcceptanceModel(alpha=0.7), 512)
    assert p.tiers == [1, 2, 4] and p.choose(view(4)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.setup(cost, AcceptanceModel(alpha=0.7), 512)  # set up again for a larger max_gamma: all tiers back
    assert p.tiers == [1, 2, 4, 8] and p.choose(view(4)) == 8


# --- no look-ahead ------------------------------------------------------------------------------------------------


def _future_changed(w: Workload, cut: float, seed: int) -> Workload:
    """Same requests before ``cut`` seconds; different (more, longer, other-timed) requests after it."""
    keep = w.arrival_s < cut
    rng = np.random.default_rng(seed)
    n_new = int((~keep).sum()) + 30
    t_new = np.sort(cut + rng.uniform(0.001, w.duration_s, n_new))
    return replace(w, arrival_s=np.concatenate([w.arrival_s[keep], t_new]),
                   prompt_tokens=np.concatenate([w.prompt_tokens[keep], rng.integers(500, 900, n_new)]),
                   output_tokens=np.concatenate([w.output_tokens[keep], rng.integers(100, 200, n_new)]))


@pytest.mark.parametrize("name", sorted(set(policy_names())))
def test_no_policy_looks_ahead(cost, name):
    """Every registered policy picks the same γ sequence until the first iteration that could see a changed
    request: changing requests that arrive after ``cut`` changes nothing about iterations that start before."""
    w = workload(150, seed=4, rate=6.0, out=80)
    cut = float(w.arrival_s[70])
    w2 = _future_changed(w, cut, seed=9)
    acc = AcceptanceModel(alpha=0.75)
    cl = ClusterConfig(max_batch=32)
    runs = []
    for ww in (w, w2):
        p = policy_from_conf(name) if (CONF / f"{name}.yaml").exists() else make_policy(name)
        runs.append(simulate(ww, cost, p, acc, cl, seed=5, reference_context=600.0).iterations)
    a, b = (r[r["start_s"] < cut].reset_index(drop=True) for r in runs)
    assert len(a) > 20
    cols = ["start_s", "batch", "gamma", "accepted", "tokens"]
    assert a[cols].equals(b[cols])
    # The two runs do differ afterwards, so the comparison above is not vacuous.
    assert not runs[0][cols].equals(runs[1][cols])


@pytest.mark.parametrize("name, params, message", [
    ("goodput", {"per_request": "maybe"}, "policy.per_request is 'maybe'; expected true or false"),
    ("goodput", {"prior_weight": "abc"}, "policy.prior_weight is 'abc'; expected a number of pseudo-trials > 0"),
    ("goodput", {"prior_weight": 0}, "policy.prior_weight is 0; expected a number of pseudo-trials > 0"),
    ("adaptive", {"context": "abc"}, "policy.context is 'abc'; expected a number > 0"),
    ("adaptive", {"context": -5}, "policy.context is -5; expected a number > 0"),
    ("adaptive_context", {"contexts": [100, "x"]}, r"policy.contexts\[1\] is 'x'; expected a number > 0"),
    ("adaptive_context", {"contexts": "512"}, "policy.contexts is '512'; expected a list of positive token counts"),
    ("fixed", {"gamma": True}, "policy.gamma is True; expected an integer ≥ 0"),
])
def test_bad_policy_parameters_name_the_key(name, params, message):
    """A parameter of the wrong kind is refused with the key and what was expected, never coerced
    (``bool('maybe')`` is true, ``True`` is the integer 1)."""
    with pytest.raises(ValueError, match=message):
        make_policy(name, **params)
