"""The quantitative model: γ* on a synthetic profile with a known answer, and E(α, γ) against simulation."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import ClusterConfig, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.policies import Fixed, optimal_gamma_table
from specbatch.sim.profile import load_profile
from specbatch.sim.quant import (GRID_COLUMNS, MODEL_COLUMNS, expected_tokens, gamma_star_grid, iteration_time, model_table,
                       optimal_gamma, optimal_gamma_over_batches, report, verify_cost_ratio)
from specbatch.sim.workload import Workload

VERIFY = dict(base=0.010, per_token=0.0005, knee=64)
DRAFT = dict(base=0.001, per_token=0.00002)


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    folder = write_formula_profile(tmp_path_factory.mktemp("q") / "p", verify=linear_step(**VERIFY),
                                   draft=linear_step(**DRAFT))
    return CostModel(load_profile(folder), max_batch=64, max_gamma=8)


def brute_force_gamma(b: int, alpha: float, gmax: int = 8) -> int:
    """The answer from the formulas themselves (no cost model): argmax b·E/T."""
    best, arg = -1.0, 0
    for g in range(gmax + 1):
        e = sum(alpha ** k for k in range(g + 1))
        t = VERIFY["base"] + VERIFY["per_token"] * max(0, b * (g + 1) - VERIFY["knee"])
        t += g * (DRAFT["base"] + DRAFT["per_token"] * b)
        if b * e / t > best + 1e-12:
            best, arg = b * e / t, g
    return arg


def test_known_answer_hand_computed(cost):
    # b = 1: verify stays memory-bound (b·(γ+1) ≤ 64): T = 0.010 + 0.00102·γ; E/T peaks at γ = 6 for α = 0.8.
    assert optimal_gamma(cost, 0.8, 1, 512) == 6
    # b = 64: any draft token pushes verify over the knee: T(1) = 0.04428 s for E = 1.8 vs T(0) = 0.010, E = 1.
    assert optimal_gamma(cost, 0.8, 64, 512) == 0
    assert iteration_time(cost, 64, 1, 512) == pytest.approx(0.010 + 0.032 + 0.00228)


@pytest.mark.parametrize("alpha", [0.5, 0.7, 0.9])
def test_gamma_star_matches_formula_at_grid_points(cost, alpha):
    for b in (1, 2, 4, 8, 16, 32, 64):
        assert optimal_gamma(cost, alpha, b, 512) == brute_force_gamma(b, alpha), b


def test_gamma_star_falls_with_batch(cost):
    table = optimal_gamma_over_batches(cost, 0.8, 512)
    assert len(table) == 64
    assert np.all(np.diff(table) <= 0)
    assert table[0] > 0 and table[-1] == 0
    # The policies' table is the same thing.
    assert np.array_equal(table, optimal_gamma_table(cost, AcceptanceModel(alpha=0.8), 512))


def test_verify_cost_ratio_memory_then_compute_bound(cost):
    assert verify_cost_ratio(cost, 1, 4, 512) == pytest.approx(1.0)
    assert verify_cost_ratio(cost, 64, 4, 512) == pytest.approx((0.010 + 0.0005 * 256) / 0.010)


def test_long_context_keeps_speculation_worthwhile(tmp_path):
    # KV traffic (per_ctx·b·c) is paid once per step whatever γ: long contexts make extra tokens relatively cheap.
    folder = write_formula_profile(tmp_path / "ctx", verify=linear_step(0.002, 0.0005, per_ctx=2e-6, knee=64),
                                   draft=linear_step(0.0005, 0.00001))
    cost = CostModel(load_profile(folder), max_batch=64, max_gamma=8)
    short, long_ = optimal_gamma(cost, 0.8, 32, 128), optimal_gamma(cost, 0.8, 32, 2048)
    assert long_ > short
    grid = gamma_star_grid(cost, [0.8], [32], [128, 2048])
    assert grid["gamma_star"].tolist() == [short, long_]


def test_expected_tokens_forms():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([0.5], 3) == pytest.approx(expected_tokens(0.5, 3))
    assert expected_tokens([0.9, 0.5], 3) == pytest.approx(1 + 0.9 + 0.45 + 0.225)
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(AcceptanceModel(positions=np.array([0.9, 0.5])), 3) == pytest.approx(2.575)


def test_per_position_formula_against_simulation(cost):
    positions = np.array([0.9, 0.7, 0.5, 0.3])
    acc = AcceptanceModel(positions=positions, max_gamma=8)
    n = 200
    w = Workload(np.linspace(0, 1, n), np.full(n, 64), np.full(n, 400), name="long")
    res = simulate(w, cost, Fixed(gamma=4), acc, ClusterConfig(max_batch=32), seed=3)
    it = res.iterations[res.iterations["batch"] > 0]
    sim_e = 1 + it["accepted"].sum() / it["batch"].sum()
    want = expected_tokens(positions, 4)  # 1 + .9 + .63 + .315 + .0945
    n_obs = it["batch"].sum()
    assert sim_e == pytest.approx(want, abs=4 * 1.2 / np.sqrt(n_obs))


def test_tables_and_report(cost):
    g = gamma_star_grid(cost, [0.6, 0.8], [1, 64], [128, 512])
    assert list(g.columns) == GRID_COLUMNS and len(g) == 8
    assert (g["speedup"] >= 1 - 1e-12).all()
    m = model_table(cost, 0.8, [1, 8], [512])
    assert list(m.columns) == MODEL_COLUMNS and len(m) == 2 * 9
    row = m[(m.batch == 8) & (m.gamma == 2)].iloc[0]
    assert row.throughput_tok_s == pytest.approx(8 * row.tokens_per_iter / row.iteration_s)
    assert row.tpot_s == pytest.approx(row.iteration_s / row.tokens_per_iter)
    text = report(cost, 0.8, 512)
    assert "γ*" in text and "batch" in text
    with pytest.raises(ValueError, match="max_gamma"):
        optimal_gamma(cost, 0.8, 1, 512, max_gamma=20)
