"""cluster.prefill=chunked (issue #24): the mixed-iteration rule on formula profiles with known answers,
exact scenarios, the token budget's cap on γ, goodput's pricing of displaced prefill, and bad input."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import ClusterConfig, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.policies import BatchView, budget_seconds, make_policy
from specbatch.sim.profile import ProfileError, load_profile, write_mixed
from specbatch.sim.quant import optimal_gamma_budget
from specbatch.sim.workload import Workload

# prefill P(n) = 0.002 + 1e-3·n seconds on the target (the draft's is a tenth): F = 0.002 s, 1 ms per token
PREFILL = lambda n: 0.002 + 1e-3 * n  # noqa: E731


@pytest.fixture
def cost(tmp_path):
    folder = write_formula_profile(tmp_path / "p", verify=linear_step(0.05, 0.0), draft=linear_step(0.005, 0.0),
                                   prefill=PREFILL, batches=(1, 2, 4, 8), contexts=(128, 2048))
    return CostModel(load_profile(folder), max_batch=8, max_gamma=8)


def test_rule_parameters_come_from_the_two_shortest_prefill_rows(cost):
    rule = cost.mixed_rule("target")
    assert rule["fixed_s"] == pytest.approx(0.002)  # the line through (16, 0.018) and (64, 0.066) meets 0 at 0.002
    assert cost.mixed_rule("draft")["fixed_s"] == pytest.approx(0.0002)
    assert cost.prefill_curve_at(0) == pytest.approx(0.002) and cost.prefill_curve_at(300) == pytest.approx(0.302)


def test_mixed_iteration_known_answers(cost):
    chunks = [(0, 100), (50, 30)]  # 130 prompt tokens: ΔP = 0.130 s on the target, 0.013 s on the draft
    extra, step = cost.mixed_iteration(2, 1, 128, chunks, draft=False)
    assert step == cost.iteration(2, 1, 128) == pytest.approx(0.055)  # T_verify 0.05 + 1·T_draft 0.005
    # F + ΔP − min(F, T_verify) = 0.002 + 0.130 − 0.002: the fixed part is paid once, by the verify step
    assert extra == pytest.approx(0.130)
    extra, _ = cost.mixed_iteration(2, 1, 128, chunks, draft=True)
    assert extra == pytest.approx(0.130 + 0.013)  # the draft's fixed part shared with its decode step
    extra, _ = cost.mixed_iteration(2, 0, 128, chunks, draft=True)
    assert extra == pytest.approx(0.130 + 0.0002 + 0.013)  # γ = 0: the draft runs only for the chunks
    extra, step = cost.mixed_iteration(0, 0, 0.0, chunks, draft=False)
    assert step == 0.0 and extra == pytest.approx(0.002 + 0.130)  # prefill-only forward: F + ΔP
    # a whole prompt in chunks telescopes to P(N) − F
    assert cost.chunk_seconds([(0, 256), (256, 256), (512, 256), (768, 232)]) == pytest.approx(1.0)
    assert cost.mixed_iteration(3, 2, 500, [], draft=True) == (0.0, cost.iteration(3, 2, 500))


def _run(cost, w, policy=("none", {}), **cluster):
    cfg = dict(max_batch=4, prefill="chunked", max_num_batched_tokens=256) | cluster
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return simulate(w, cost, make_policy(policy[0], **policy[1]), AcceptanceModel(alpha=0.7),
                        ClusterConfig(**cfg), seed=0)


def test_one_long_prompt_in_four_chunks(cost):
    # prompt 1000 under a budget of 256: chunks 256, 256, 256, 232 in prefill-only forwards of
    # F + ΔP = 0.258, 0.258, 0.258, 0.234 s → first token at 1.008 s; then one decode of 0.05 s → 1.058 s
    w = Workload(np.zeros(1), np.array([1000]), np.array([2]))
    r = _run(cost, w)
    q = r.requests.iloc[0]
    assert q["admitted_s"] == 0.0
    assert q["first_token_s"] == pytest.approx(1.008) and q["finished_s"] == pytest.approx(1.058)
    it = r.iterations
    assert it["prefill_s"].tolist() == pytest.approx([0.258, 0.258, 0.258, 0.234, 0.0])
    assert it["batch"].tolist() == [0, 0, 0, 0, 1] and it["tokens"].tolist() == [0, 0, 0, 1, 1]
    assert r.busy_s[0] == pytest.approx(1.058)


def test_a_prompt_arriving_mid_decode_is_chunked_into_the_verify_forwards(cost):
    # A (prompt 100, output 60) at 0: prefill-only 0.102 s, then decodes of 0.05 s starting at 0.102 + 0.05·k.
    # B (prompt 1000) arrives at 0.5 and joins the forward starting at 0.502 (k = 8): A's 1 verify token, then
    # chunks of 255, 255, 255 (each 0.05 + 0.255 s: the fixed part shared) and 235 (0.05 + 0.235 s).
    w = Workload(np.array([0.0, 0.5]), np.array([100, 1000]), np.array([60, 2]))
    r = _run(cost, w)
    a, b = r.requests.iloc[0], r.requests.iloc[1]
    assert a["first_token_s"] == pytest.approx(0.102)
    assert b["admitted_s"] == pytest.approx(0.502)
    assert b["first_token_s"] == pytest.approx(0.502 + 3 * 0.305 + 0.285)
    mixed = r.iterations[r.iterations["prefill_s"] > 0].iloc[1:]
    assert mixed["batch"].tolist() == [1, 1, 1, 1] and mixed["prefill_s"].tolist() == pytest.approx([0.255] * 3 + [0.235])


def test_the_budget_caps_gamma_and_the_threshold_caps_chunks(cost):
    w = Workload(np.zeros(4), np.array([10, 10, 10, 10]), np.array([30, 30, 30, 30]))
    # γ = 2 leaves 8 − b·3 tokens of an 8-token budget to the prompts until b = 3 (γ ≤ 8 // 3 − 1 = 1)
    r = _run(cost, w, ("fixed", {"gamma": 2}), max_num_batched_tokens=8)
    it = r.iterations[r.iterations["batch"] > 0]
    assert (it["gamma"] == np.minimum(2, 8 // it["batch"] - 1)).all()  # b·(γ+1) ≤ 8
    assert set(it["batch"]) >= {4}
    w = Workload(np.zeros(1), np.array([1000]), np.array([2]))
    r = _run(cost, w, long_prefill_token_threshold=100)
    assert (r.iterations["batch"] == 0).sum() == 10  # 1000 tokens, at most 100 per forward


def test_fast_forward_applies_and_matches_stepping(cost):
    w = Workload(np.array([0.0, 0.0, 3.0]), np.array([300, 50, 700]), np.array([200, 150, 40]))
    fast = _run(cost, w, ("fixed", {"gamma": 3}), fast_forward=True)
    slow = _run(cost, w, ("fixed", {"gamma": 3}), fast_forward=False)
    assert fast.requests.equals(slow.requests) and fast.iterations.equals(slow.iterations)


def test_goodput_prices_the_prefill_a_gamma_displaces(cost):
    # Nothing waiting: the budget only caps γ (b = 4, budget 12: γ ≤ 2)
    t = budget_seconds(cost, 4, 128, 12, 0, 8)
    assert t[:3].tolist() == pytest.approx([cost.iteration(4, g, 128) for g in range(3)]) and np.isinf(t[3:]).all()
    # A long queue: with a linear prefill curve every γ pays for the same min(W, B − b) = 252 prompt tokens, now
    # or later (X = 1.1 ms × 252 with the fixed parts shared) — except at γ = 0, where the draft runs for the
    # chunk alone and pays its F = 0.2 ms: T(γ) = T_iter(γ) + X(γ) − X(0) = T_iter(γ) − 0.2 ms for γ ≥ 1
    t = budget_seconds(cost, 4, 128, 256, 10_000, 8)
    assert t.tolist() == pytest.approx([cost.iteration(4, g, 128) - (0.0002 if g else 0.0) for g in range(9)])
    for how in ("cap", "work"):
        q = make_policy("goodput", budget_pricing=how)
        q.setup(cost, AcceptanceModel(alpha=0.7), 128.0)
        assert np.argmax(q.predicted_goodput(BatchView(0.0, 0, 4, 128.0, np.arange(4), 128.0, 100, 8))) <= 1
    with pytest.raises(ValueError, match="policy.budget_pricing"):
        make_policy("goodput", budget_pricing="x")
    p = make_policy("goodput")
    p.setup(cost, AcceptanceModel(alpha=0.7), 128.0)
    view = BatchView(0.0, 0, 4, 128.0, np.arange(4), 128.0, 0, 8)
    assert np.argmax(p.predicted_goodput(view)) <= 1  # γ ≤ 8 // 4 − 1
    assert optimal_gamma_budget(cost, 0.7, 4, 128, 8) <= 1


def test_a_profile_without_prefill_lengths_is_refused_for_chunked(tmp_path):
    folder = write_formula_profile(tmp_path / "one", verify=linear_step(0.05, 0.0), draft=linear_step(0.005, 0.0),
                                   prompts=(128,))
    cost = CostModel(load_profile(folder), max_batch=8, max_gamma=4)
    w = Workload(np.zeros(1), np.array([100]), np.array([5]))
    with pytest.raises(ProfileError, match=r"steps\.csv.*model=target, phase=prefill, batch=1 at two or more"):
        _run(cost, w)
    _run(cost, w, prefill="sequential")  # the other modes need no such rows


@pytest.mark.parametrize("cluster, key", [
    (dict(max_num_batched_tokens=2, max_batch=4), "cluster.max_num_batched_tokens"),
    (dict(max_num_batched_tokens=0), "cluster.max_num_batched_tokens"),
    (dict(long_prefill_token_threshold=0), "cluster.long_prefill_token_threshold"),
    (dict(mode="static"), "cluster.prefill"),
])
def test_bad_chunked_keys_name_the_key(cluster, key):
    with pytest.raises(ValueError, match=key) as e:
        ClusterConfig(**(dict(prefill="chunked") | cluster)).validate()
    assert "\n" not in str(e.value)


def test_a_profile_without_mixed_rows_is_refused_for_chunked(tmp_path):
    folder = write_formula_profile(tmp_path / "nomix", verify=linear_step(0.05, 0.0), draft=linear_step(0.005, 0.0),
                                   prefill=PREFILL, batches=(1, 2, 4, 8), contexts=(128, 2048), mixed=False)
    cost = CostModel(load_profile(folder), max_batch=8, max_gamma=4)
    assert cost.profile.mixed is None  # (a profile without mixed.csv loads as before)
    w = Workload(np.zeros(1), np.array([100]), np.array([5]))
    with pytest.raises(ProfileError) as e:
        _run(cost, w)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and "has no mixed.csv" in msg
    assert f"specbatch-profile mode=mixed out_dir={folder.parent} name={folder.name}" in msg
    _run(cost, w, prefill="sequential")


def test_mixed_rows_of_one_model_only_are_refused_when_the_policy_drafts(tmp_path):
    folder = write_formula_profile(tmp_path / "p", verify=linear_step(0.05, 0.0), draft=linear_step(0.005, 0.0),
                                   prefill=PREFILL, batches=(1, 2, 4, 8), contexts=(128, 2048))
    mixed = pd.read_csv(folder / "mixed.csv")
    write_mixed(folder, mixed[mixed["model"] == "target"])
    cost = CostModel(load_profile(folder), max_batch=8, max_gamma=4)
    w = Workload(np.zeros(1), np.array([100]), np.array([5]))
    _run(cost, w)  # policy none: the draft is never run, its rows are not needed
    with pytest.raises(ProfileError, match=r"has no ok model=draft rows in mixed\.csv"):
        _run(cost, w, policy=("fixed", {"gamma": 2}))


@pytest.mark.parametrize("column, value, expected", [
    ("chunk_tokens", 0, "a positive integer"), ("chunk_prefix", -3, "a non-negative integer"),
    ("model", "eagle", "expected one of ['target', 'draft']"), ("median_s", "x", "a positive, finite time"),
])
def test_bad_mixed_csv_names_the_file_row_and_column(tmp_path, column, value, expected):
    folder = write_formula_profile(tmp_path / "p", verify=linear_step(0.05, 0.0), draft=linear_step(0.005, 0.0))
    mixed = pd.read_csv(folder / "mixed.csv")
    mixed[column] = mixed[column].astype(object)
    mixed.loc[1, column] = value
    mixed.to_csv(folder / "mixed.csv", index=False)
    with pytest.raises(ProfileError) as e:
        load_profile(folder)
    assert str(e.value).startswith(f"{folder / 'mixed.csv'}: row 2 (line 3), column '{column}'")
    assert expected in str(e.value)


def test_a_missing_mixed_column_and_a_duplicate_point_are_named(tmp_path):
    folder = write_formula_profile(tmp_path / "p", verify=linear_step(0.05, 0.0), draft=linear_step(0.005, 0.0))
    mixed = pd.read_csv(folder / "mixed.csv")
    mixed.drop(columns="chunk_prefix").to_csv(folder / "mixed.csv", index=False)
    with pytest.raises(ProfileError, match=r"mixed\.csv: missing column\(s\) \['chunk_prefix'\]"):
        load_profile(folder)
    pd.concat([mixed, mixed.iloc[[0]]]).to_csv(folder / "mixed.csv", index=False)
    with pytest.raises(ProfileError, match=r"mixed\.csv: row 1 \(line 2\) and row \d+ \(line \d+\): duplicate point"):
        load_profile(folder)


def test_rule_check_reports_each_point_and_zero_error_where_the_rows_follow_the_rule(tmp_path):
    """The formula profile's mixed rows are step + P(p + k) − P(p) with F below every step: the rule's own
    answer, so every point's error is 0; a row measured 25 % slower shows as −20 % (the rule underprices)."""
    from specbatch.fidelity.mixed import rule_check, store, table

    folder = write_formula_profile(tmp_path / "p", verify=linear_step(0.05, 0.0), draft=linear_step(0.005, 0.0),
                                   prefill=PREFILL, batches=(1, 2, 4, 8), contexts=(128, 2048))
    check = rule_check(load_profile(folder))["profile_steps"]
    assert len(check["points"]) == 12 and check["target"]["rows"] == 8 and check["draft"]["rows"] == 4
    assert max(abs(p["rel_error"]) for p in check["points"]) < 1e-9
    mixed = pd.read_csv(folder / "mixed.csv")
    mixed.loc[0, ["median_s", "p90_s"]] = mixed.loc[0, "median_s"] * 1.25
    mixed.to_csv(folder / "mixed.csv", index=False)
    prof = load_profile(folder)
    check = rule_check(prof)
    errs = [p["rel_error"] for p in check["profile_steps"]["points"]]
    assert min(errs) == pytest.approx(-0.2) and sorted(errs)[1] == pytest.approx(0.0, abs=1e-9)
    assert any("|error| median" in line for line in table(check))
    store(prof, check)
    assert load_profile(folder).meta["mixed_check"]["profile_steps"]["points"][0]["rel_error"] == pytest.approx(errs[0])
