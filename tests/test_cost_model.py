"""Cost model: grid values, interpolation, documented extrapolation, the adaptive table's known answer."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel, expected_tokens
from specbatch.sim.cost_model import CostModel, ExtrapolationWarning
from specbatch.sim.policies import Adaptive, optimal_gamma_table
from specbatch.sim.profile import ProfileError, load_profile


@pytest.fixture
def cost(formula_profile):
    return CostModel(load_profile(formula_profile), max_batch=64, max_gamma=8)


def test_grid_points_return_measured_medians(cost):
    v = linear_step(0.010, 0.0005, knee=64)
    d = linear_step(0.001, 0.00002)
    for b in (1, 4, 32, 64):
        for c in (128, 512, 2048):
            for g in (0, 3, 8):
                assert cost.target_verify(b, g, c) == pytest.approx(v(b, g + 1, c))
            assert cost.draft_decode(b, c) == pytest.approx(d(b, 1, c))
            assert cost.iteration(b, 3, c) == pytest.approx(3 * d(b, 1, c) + v(b, 4, c))


def test_linear_interpolation_between_grid_points(tmp_path):
    # Times depend on batch and context, so interpolation is visible on both axes.
    p = write_formula_profile(tmp_path / "p", verify=lambda b, t, c: 0.01 * b * t + 1e-5 * c + 0.001 * b * b,
                              draft=lambda b, t, c: 0.001 * b + 1e-6 * c)
    cm = CostModel(load_profile(p), max_batch=64)
    f = lambda b, t, c: 0.01 * b * t + 1e-5 * c + 0.001 * b * b  # noqa: E731
    # batch 6 lies between measured 4 and 8: linear between them (not the formula's b² curvature).
    assert cm.target_verify(6, 1, 128) == pytest.approx((f(4, 2, 128) + f(8, 2, 128)) / 2)
    # context 320 lies between 128 and 512.
    assert cm.target_verify(4, 0, 320) == pytest.approx((f(4, 1, 128) + f(4, 1, 512)) / 2)
    assert cm.draft_decode(3, 128) == pytest.approx(0.5 * (0.001 * 2 + 0.001 * 4) + 1e-6 * 128)


def test_extrapolation_rules_and_a_single_warning(tmp_path):
    p = write_formula_profile(tmp_path / "p", verify=lambda b, t, c: 0.01 * b * t + 1e-5 * c,
                              draft=lambda b, t, c: 0.001 * b, batches=(1, 2, 4, 8), max_tokens=5,
                              contexts=(128, 512))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cm = CostModel(load_profile(p), max_batch=16, max_gamma=8)
        # batch beyond 8: linear from the last two points (exact for a linear formula).
        assert cm.target_verify(16, 0, 128) == pytest.approx(0.01 * 16 + 1e-5 * 128)
        # tokens beyond 5 (γ = 8 -> 9 tokens): linear.
        assert cm.target_verify(2, 8, 128) == pytest.approx(0.01 * 2 * 9 + 1e-5 * 128)
        # context beyond 512: linear; below 128: flat at the 128 value.
        assert cm.target_verify(2, 0, 1024) == pytest.approx(0.02 + 1e-5 * 1024)
        assert cm.target_verify(2, 0, 10) == pytest.approx(0.02 + 1e-5 * 128)
    extrap = [x for x in w if issubclass(x.category, ExtrapolationWarning)]
    assert len(extrap) == 1


def test_extrapolation_never_goes_below_the_grid_edge(tmp_path):
    # A noisy last segment that decreases must not make larger batches cheaper than the largest measured.
    p = write_formula_profile(tmp_path / "p", verify=lambda b, t, c: 0.05 if b == 8 else 0.06 if b == 4 else 0.01 * b,
                              draft=lambda b, t, c: 0.001, batches=(1, 2, 4, 8), max_tokens=2, contexts=(128,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = CostModel(load_profile(p), max_batch=32, max_gamma=1)
        assert cm.target_verify(32, 0, 128) == pytest.approx(0.05)


def test_prefill_curve(cost):
    assert cost.prefill(64) == pytest.approx(0.064)
    assert cost.prefill(160) == pytest.approx(0.160)  # between 64 and 256
    assert cost.prefill(64, "draft") == pytest.approx(0.0064)
    assert cost.prefill(8) == pytest.approx(0.016)  # below the shortest (16): flat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cost.prefill(8192) == pytest.approx(8.192)  # beyond: last segment's slope


def test_prefill_of_several_prompts_in_one_forward(tmp_path):
    """b prompts of n tokens take n·(1 + (b − 1)/2) ms on the target: the grid gives it back exactly (the
    formula is bilinear), at the prompts' mean length under paged attention and their longest under padded."""
    p = write_formula_profile(tmp_path / "p", verify=linear_step(0.01, 0.0), draft=linear_step(0.001, 0.0),
                              prefill_batches=(1, 2, 4, 8), batched_prefill=lambda n, b: 1e-3 * n * (1 + (b - 1) / 2))
    cm = CostModel(load_profile(p), max_batch=8, max_gamma=2)
    assert cm.has_prefill_batches("target") and cm.has_prefill_batches("draft")
    assert cm.prefill_batch([64, 64, 64]) == pytest.approx(0.128)
    assert cm.prefill_batch([16, 112]) == pytest.approx(0.096)  # mean 64, batch 2
    assert cm.prefill_batch([16, 112], attention="padded") == pytest.approx(0.168)  # longest 112
    assert cm.prefill_batch([16, 112], "draft") == pytest.approx(0.0096)
    assert cm.prefill_batch([300]) == cm.prefill(300)
    assert cm.prefill_batch([8, 8]) == pytest.approx(0.024)  # below the shortest length (16): flat
    with pytest.warns(ExtrapolationWarning, match="prefill of 16 prompts of 64 tokens"):
        assert cm.prefill_batch([64] * 16) == pytest.approx(1e-3 * 64 * 8.5)  # beyond batch 8: linear
    single = CostModel(load_profile(write_formula_profile(tmp_path / "q", verify=linear_step(0.01, 0.0),
                                                          draft=linear_step(0.001, 0.0))), max_batch=8, max_gamma=2)
    assert not single.has_prefill_batches()
    with pytest.raises(ProfileError, match=r"q/steps.csv: prefill of several prompts in one forward needs ok prefill "
                                           r"rows for model=target at two or more batch sizes"):
        single.prefill_batch([64, 64])


def test_adaptive_table_matches_brute_force_on_known_profile(cost):
    """γ*(b) from the formulas directly (no cost-model code) agrees with the Adaptive policy's table."""
    v = linear_step(0.010, 0.0005, knee=64)
    d = linear_step(0.001, 0.00002)
    alpha, c = 0.8, 512
    pol = Adaptive(context=c)
    pol.setup(cost, AcceptanceModel(alpha=alpha), context=0)
    for b in (1, 2, 4, 8, 16, 32, 64):
        rate = [b * expected_tokens(alpha, g) / (g * d(b, 1, c) + v(b, g + 1, c)) for g in range(9)]
        assert pol.table[b - 1] == int(np.argmax(rate)), b
    # The seed phenomenon on this profile: long speculation at batch 1, none once compute-bound.
    assert pol.table[0] >= 4
    assert pol.table[63] == 0
    assert all(np.diff(pol.table[[0, 1, 3, 7, 15, 31, 63]]) <= 0)
    assert pol.describe()["table"][1] == pol.table[0]


def test_optimal_gamma_is_zero_when_nothing_is_accepted(cost):
    assert (optimal_gamma_table(cost, AcceptanceModel(alpha=0.0), 512) == 0).all()


def test_draft_sync_adds_one_draft_step_to_gamma_zero_only(cost):
    synced = cost.with_draft_sync()
    assert synced.draft_sync and not cost.draft_sync and synced.with_draft_sync() is synced
    for b in (1, 3, 17, 64):
        for c in (100.0, 128.0, 700.0, 2048.0):
            assert synced.iteration(b, 0, c) == pytest.approx(cost.target_verify(b, 0, c) + cost.draft_decode(b, c))
            assert cost.iteration(b, 0, c) == pytest.approx(cost.target_verify(b, 0, c))  # the original is untouched
            for g in (1, 4, 8):
                assert synced.iteration(b, g, c) == cost.iteration(b, g, c)
        many = synced.iteration_many(b, 0, np.array([200.0, 300.0, 900.0, 1500.0]))
        assert many.tolist() == [synced.iteration(b, 0, c) for c in (200.0, 300.0, 900.0, 1500.0)]  # bit for bit


def test_draft_sync_only_moves_the_table_away_from_gamma_zero(tmp_path):
    """γ = 0 gets dearer and nothing else changes, so γ*(b) > 0 stays put and γ*(b) = 0 may turn positive."""
    p = write_formula_profile(tmp_path / "p", verify=linear_step(0.010, 0.0005, knee=16),
                              draft=linear_step(0.004, 0.0001))
    cost = CostModel(load_profile(p), max_batch=64, max_gamma=8)
    acc = AcceptanceModel(alpha=0.6)
    plain, synced = optimal_gamma_table(cost, acc, 512), optimal_gamma_table(cost.with_draft_sync(), acc, 512)
    assert ((plain == synced) | ((plain == 0) & (synced > 0))).all()
    assert (plain == 0).any() and ((plain == 0) & (synced > 0)).any()  # the case at issue occurs here


def test_iteration_list_and_many_equal_iteration_bit_for_bit(cost):
    """The simulator's plans use the list and array forms; one event per iteration uses `iteration`: all three
    must give the same floats, inside one grid segment, across segments, below and beyond the grid."""
    rng = np.random.default_rng(3)
    cases = [[200.0, 200.5, 201.0, 240.0], [100.0, 128.0, 129.0], [511.0, 512.0, 513.0, 2000.0, 2048.0],
             [1900.0, 3000.0, 5000.0], [300.0]]
    cases += [np.sort(rng.uniform(1, 3000, int(rng.integers(1, 13)))).tolist() for _ in range(50)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        for ctxs in cases:
            for b, g in ((1, 0), (7, 3), (64, 8)):
                one = [cost.iteration(b, g, c) for c in ctxs]
                assert cost.iteration_list(b, g, ctxs) == one
                assert cost.iteration_many(b, g, np.array(ctxs)).tolist() == one


# --- holes in the grid (issue #26, item 4) ------------------------------------------------------------------


def _without(folder, **where):
    import pandas as pd

    df = pd.read_csv(folder / "steps.csv")
    m = np.ones(len(df), bool)
    for k, v in where.items():
        m &= (df[k] == v).to_numpy()
    assert m.sum() == 1, where
    df[~m].to_csv(folder / "steps.csv", index=False)
    return folder


def test_a_hole_at_the_grid_edge_is_an_error_naming_the_point(formula_profile):
    """Target decode at the smallest batch and context has measured points on one side only (γ = 1 verify,
    batch 2, context 512): copying one of them would be a guess, so loading names the point."""
    _without(formula_profile, model="target", phase="decode", batch=1, context=128)
    with pytest.raises(ProfileError) as e:
        CostModel(load_profile(formula_profile), max_batch=64, max_gamma=8)
    msg = str(e.value)
    assert msg.startswith(f"{formula_profile}/steps.csv: target verify grid point model=target, phase=decode, "
                          "batch=1, tokens=1 (γ=0), context=128 is missing and has no measured neighbour on both "
                          "sides"), msg
    assert "\n" not in msg


def test_a_draft_hole_at_the_edge_is_an_error_too(formula_profile):
    _without(formula_profile, model="draft", phase="decode", batch=64, context=2048)
    with pytest.raises(ProfileError, match=r"draft decode grid point model=draft, phase=decode, batch=64, "
                                           r"context=2048 is missing"):
        CostModel(load_profile(formula_profile), max_batch=64, max_gamma=8)


def test_an_error_row_at_the_edge_is_named_as_such(formula_profile):
    import pandas as pd

    df = pd.read_csv(formula_profile / "steps.csv")
    m = (df["model"] == "target") & (df["batch"] == 64) & (df["tokens"] == 9) & (df["context"] == 2048)
    df.loc[m, "status"] = "error"
    df.to_csv(formula_profile / "steps.csv", index=False)
    with pytest.raises(ProfileError, match=r"batch=64, tokens=9 \(γ=8\), context=2048 is recorded as status=error"):
        CostModel(load_profile(formula_profile), max_batch=64, max_gamma=8)


def test_an_interior_hole_is_interpolated_along_the_axis_that_brackets_it(tmp_path):
    """Target decode at batch 1, context 512 lies between contexts 128 and 2048 (but at the edge of batch and
    tokens): it is interpolated in context, not copied from the γ = 1 verify or from batch 2."""
    f = lambda b, t, c: 0.01 * b + 0.02 * (t - 1) + 1e-5 * c  # noqa: E731
    p = write_formula_profile(tmp_path / "p", verify=f, draft=lambda b, t, c: 0.001 * b)
    _without(p, model="target", phase="decode", batch=1, context=512)
    cm = CostModel(load_profile(p), max_batch=64, max_gamma=8)
    want = f(1, 1, 128) + (f(1, 1, 2048) - f(1, 1, 128)) * (512 - 128) / (2048 - 128)
    assert cm.target_verify(1, 0, 512) == pytest.approx(want, rel=1e-12)
