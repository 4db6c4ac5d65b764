"""Drafter kinds (sim/drafters.py): each kind's step cost, KV, prefill and acceptance on formula profiles with
known answers, the refusal of a profile without a drafter's rows, the config group, specbatch-tune --drafter
and the quantitative model per drafter."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import add_drafter_rows, linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import ClusterConfig, kv_capacity_tokens, simulate
from specbatch.sim.config import ConfigError, checked
from specbatch.sim.cost_model import CostModel
from specbatch.sim.drafters import make_drafter
from specbatch.sim.policies import make_policy
from specbatch.sim.profile import ProfileError, load_profile
from specbatch.sim.quant import expected_tokens, gamma_star_by_drafter
from specbatch.sim.workload import Workload

# verify = 0.010 + 0.0005·max(0, b·t − 64); draft = 0.001 + 0.00002·b; eagle = 0.0004 + 0.00001·b;
# ngram = 0.0001 + 0.000005·b (seconds; no context term). KV bytes per token: target 1000, draft 100, eagle 10.
VERIFY, DRAFT = linear_step(0.010, 0.0005, knee=64), linear_step(0.001, 0.00002)
EAGLE, NGRAM = linear_step(0.0004, 0.00001), linear_step(0.0001, 0.000005)


@pytest.fixture
def profile(tmp_path):
    folder = write_formula_profile(tmp_path / "drafters", verify=VERIFY, draft=DRAFT)
    return load_profile(add_drafter_rows(folder, eagle=EAGLE, ngram=NGRAM))


def cost(profile, kind, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CostModel(profile, max_batch=32, max_gamma=8, drafter=make_drafter(kind, **kw))


def test_draft_model_is_the_default_cost_model(profile):
    a, b = CostModel(profile, max_batch=32, max_gamma=8), cost(profile, "draft_model")
    assert a.iteration_table(512.0).tolist() == b.iteration_table(512.0).tolist()
    assert a.prefill(256, "draft") == b.prefill(256, "draft") == pytest.approx(0.1 * 0.256)


def test_eagle_step_is_gamma_eagle_rows_plus_verify(profile):
    c = cost(profile, "eagle")
    # b = 4, γ = 3: verify 4 tokens x 4 = 16 < 64 -> 0.010; eagle step 0.0004 + 0.00001·4 = 0.00044; 3 of them
    assert c.iteration(4, 3, 512.0) == pytest.approx(3 * 0.00044 + 0.010)
    # b = 32, γ = 2: 96 tokens -> 0.010 + 0.0005·32 = 0.026; eagle 0.0004 + 0.00032 = 0.00072
    assert c.iteration(32, 2, 512.0) == pytest.approx(2 * 0.00072 + 0.026)
    assert c.prefill(256, "draft") == pytest.approx(0.02 * 0.256)  # the eagle prefill rows, not the draft's


def test_ngram_step_is_one_lookup_plus_the_verify_of_what_was_proposed(profile):
    c = cost(profile, "ngram")  # match_rate 0.5
    lookup = 0.0001 + 0.000005 * 32  # 0.00026 s for 32 sequences, whatever γ
    # γ = 4, 16 of 32 matched: x = 4·16/32 = 2 draft tokens per sequence -> verify 3 tokens: 96 - 64 = 32 -> 0.026
    assert c.iteration_matched(32, 4, 16, 512.0) == pytest.approx(lookup + 0.026)
    # 12 matched: x = 1.5, halfway between 2 tokens (0.010) and 3 tokens (0.026) -> 0.018
    assert c.iteration_matched(32, 4, 12, 512.0) == pytest.approx(lookup + 0.018)
    # none matched: a plain decode plus the lookup
    assert c.iteration_matched(32, 4, 0, 512.0) == pytest.approx(lookup + 0.010)
    # the offline table at γ = 4: the expected x = 4·0.5 = 2 -> 0.026 + lookup; γ = 0: no lookup at all
    assert c.iteration(32, 4, 512.0) == pytest.approx(lookup + 0.026)
    assert c.iteration(32, 0, 512.0) == pytest.approx(0.010)
    assert not c.has_prefill("draft")


def test_kv_per_token_by_drafter(profile):
    # 10^9 bytes of KV / (1000 + drafter bytes per token)
    fixed = make_policy("fixed", gamma=2)
    caps = {k: kv_capacity_tokens(cost(profile, k), fixed, ClusterConfig()) for k in ("draft_model", "eagle", "ngram")}
    assert caps == {"draft_model": 10**9 // 1100, "eagle": 10**9 // 1010, "ngram": 10**9 // 1000}


def test_ngram_acceptance_counts_only_matched_rows():
    acc = AcceptanceModel(positions=np.array([0.6]), match_rate=0.5, max_gamma=8)
    # E = 1 + 0.5·(0.6 + 0.36 + 0.216 + 0.1296 + 0.07776) = 1.69168 at γ = 5
    assert acc.expected_tokens(5) == pytest.approx(1.69168)
    assert expected_tokens(acc, 5) == pytest.approx(1.69168)
    np.testing.assert_allclose(acc.thresholds(np.ones(1), 3)[0], [0.3, 0.18, 0.108])
    draws = acc.sample(np.ones(200_000), 4, np.random.default_rng(0))
    assert draws.mean() == pytest.approx(0.5 * (0.6 + 0.36 + 0.216 + 0.1296), rel=0.02)


def test_ngram_rows_without_a_match_gain_one_token_and_pay_no_proposal(profile):
    """One request of 60 output tokens, γ = 3, match rate 0.5: every iteration is charged either as no match
    (lookup + plain decode, 1 token) or as a match (lookup + verify of 4 tokens, 1..4 tokens)."""
    c = cost(profile, "ngram")
    w = Workload(arrival_s=np.array([0.0]), prompt_tokens=np.array([100]), output_tokens=np.array([60]), name="one")
    acc = AcceptanceModel(positions=np.array([0.6]), match_rate=0.5, max_gamma=8)
    r = simulate(w, c, make_policy("fixed", gamma=3), acc, ClusterConfig(max_batch=1), seed=1)
    it = r.iterations[r.iterations["batch"] > 0]
    unmatched, matched = c.iteration_matched(1, 3, 0, 200.0), c.iteration_matched(1, 3, 1, 200.0)
    assert unmatched == pytest.approx(0.0001 + 0.000005 + 0.010) and matched == pytest.approx(unmatched)
    # (below the knee verify costs the same at 1 and 4 tokens: compare the token counts instead)
    gained = (it["tokens"] - it["admitted"]).to_numpy()
    assert set(gained.tolist()) <= {1, 2, 3, 4} and (gained == 1).mean() > 0.5  # P(gain 1) = 0.5 + 0.5·0.4 = 0.7


def test_ngram_verify_under_padded_attention_is_as_wide_as_the_longest_proposal(profile):
    """cluster.attention=padded (a rectangular batch, as the fidelity engine runs): an ngram step is charged
    the verify of γ + 1 tokens for every row when any row matched, a 1-token verify when none did; paged
    (vLLM's ragged batch): the verify of the tokens proposed, between the two. Fast-forward and stepping agree."""
    c = cost(profile, "ngram")
    rng = np.random.default_rng(5)
    w = Workload(arrival_s=np.zeros(20), prompt_tokens=rng.integers(20, 200, 20),
                 output_tokens=rng.integers(40, 120, 20), name="burst")
    acc = AcceptanceModel(positions=np.array([0.6]), match_rate=0.5, max_gamma=8)
    runs = {(att, ff): simulate(w, c, make_policy("fixed", gamma=4), acc,
                                ClusterConfig(max_batch=16, attention=att, fast_forward=ff), seed=2).iterations
            for att in ("padded", "paged") for ff in (True, False)}
    assert runs["padded", True].equals(runs["padded", False])
    for att in ("padded", "paged"):
        it = runs[att, True]
        it = it[(it["gamma"] > 0) & (it["batch"] >= 14)]
        full = np.array([c.iteration_matched(int(b), 4, int(b), 100.0) for b in it["batch"]])
        none = np.array([c.iteration_matched(int(b), 4, 0, 100.0) for b in it["batch"]])
        step = it["step_s"].to_numpy()
        assert len(step) > 10 and (full > none).all()  # (b ≥ 14: 5 tokens a row are past the knee)
        at_full = np.isclose(step, full, rtol=1e-12)
        if att == "padded":  # P(none of ≥ 14 rows matched) = 0.5^14: nearly every step is a full verify
            assert (at_full | np.isclose(step, none, rtol=1e-12)).all() and at_full.mean() > 0.9
        else:  # about half of the rows proposing: between the two, never a full verify
            assert (step >= none - 1e-15).all() and (step < full).all()


def test_profile_without_drafter_rows_is_refused_in_one_line(tmp_path):
    bare = load_profile(write_formula_profile(tmp_path / "bare", verify=VERIFY, draft=DRAFT))
    for kind in ("eagle", "ngram"):
        with pytest.raises(ProfileError) as e:
            cost(bare, kind)
        msg = str(e.value)
        assert "\n" not in msg and str(bare.path) in msg and f"model={kind}" in msg and f"models.{kind}" in msg


def test_fast_forward_equals_stepping_for_every_drafter(profile):
    rng = np.random.default_rng(3)
    n = 80
    w = Workload(arrival_s=np.sort(rng.uniform(0, 8, n)), prompt_tokens=rng.integers(20, 600, n),
                 output_tokens=rng.integers(1, 200, n), name="mix")
    for kind in ("draft_model", "eagle", "ngram"):
        d = make_drafter(kind)
        acc = AcceptanceModel(positions=np.array(d.positions or (0.7,)), match_rate=d.match_rate, max_gamma=8,
                              concentration=5.0)
        for policy in ("adaptive", "fixed"):
            runs = [simulate(w, cost(profile, kind), make_policy(policy), acc,
                             ClusterConfig(max_batch=16, fast_forward=ff, attention=att), seed=7)
                    for ff in (True, False) for att in ("paged",)]
            assert runs[0].iterations.equals(runs[1].iterations) and runs[0].requests.equals(runs[1].requests)
            assert (runs[0].iterations["gamma"] > 0).any()


def test_config_group_and_checks():
    base = {"workload": {"kind": "synthetic", "rate": 1.0}, "policy": {"name": "fixed"}}
    assert checked(base).drafter.kind == "draft_model"
    for key, value in (("kind", "medusa"), ("match_rate", 0.0), ("positions", [1.5]), ("prompt_lookup_min", 0)):
        with pytest.raises(ConfigError, match=f"drafter.{key}"):
            checked({**base, "drafter": {key: value}})
    with pytest.raises(ConfigError, match="acceptance.source"):
        checked({**base, "drafter": {"kind": "eagle", "positions": [0.8]}, "acceptance": {"source": "profile"}})


def test_documented_defaults():
    assert make_drafter("draft_model").positions is None and make_drafter("draft_model").match_rate == 1.0
    e, n = make_drafter("eagle"), make_drafter("ngram")
    assert e.positions == (0.8,) and expected_tokens(0.8, 5) == pytest.approx(3.68928)  # EAGLE's τ ≈ 3.6-3.9
    assert (n.positions, n.match_rate, n.prompt_lookup_min, n.prompt_lookup_max) == ((0.6,), 0.5, 5, 5)


def test_tune_prints_gamma_star_per_batch_for_eagle(profile, capsys):
    from specbatch.sim.tune import main, tune

    assert main(["--profile", str(profile.path), "--drafter", "eagle", "--print", "report", "--max-batch", "32"]) == 0
    out = capsys.readouterr().out
    assert "drafter eagle" in out and "γ*" in out
    result, c, acc = tune(str(profile.path), None, drafter="ngram", max_batch=32)
    assert result["drafter"]["kind"] == "ngram" and acc.match_rate == 0.5 and c.drafter.kind == "ngram"
    assert main(["--profile", str(profile.path), "--drafter", "eagle", "--acceptance", "profile"]) == 2


def test_gamma_star_by_drafter(profile, tmp_path):
    t = gamma_star_by_drafter(profile, batches=[1, 32], context=512.0)
    assert sorted(set(t["drafter"])) == ["draft_model", "eagle", "ngram"]
    g = t.set_index(["drafter", "batch"])["gamma_star"]
    assert g["eagle", 1] >= g["draft_model", 1]  # cheaper steps and higher α: at least as long
    bare = load_profile(write_formula_profile(tmp_path / "bare", verify=VERIFY, draft=DRAFT))
    assert set(gamma_star_by_drafter(bare, batches=[1])["drafter"]) == {"draft_model"}
