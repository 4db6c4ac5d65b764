"""Studies: the configs expand to the intended sweeps, a tiny slice runs in-process, the oracle is right."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.study import compare, compose_run, expand, oracle, run_study, study_names, sweep_params


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return write_formula_profile(tmp_path_factory.mktemp("s") / "p", verify=linear_step(0.010, 0.0005, knee=64),
                                 draft=linear_step(0.001, 0.00002), kv_cache_bytes=10**8)


def test_studies_declared():
    assert {"paper", "policies", "classes"} <= set(study_names())
    paper = sweep_params("paper")
    assert paper["policy"] == [f"fixed_gamma/g{g}" for g in (0, 1, 2, 3, 4, 6, 8)] + ["adaptive"]
    pol = sweep_params("policies")
    assert pol["workload"] == ["azure_conv", "azure_code"]
    assert {"adaptive", "adaptive_context", "goodput", "threshold", "ema_tiers"} <= set(pol["policy"])
    assert len(expand(pol)) == np.prod([len(v) for v in pol.values()])
    with pytest.raises(ValueError, match="not swept"):
        expand(pol, {"nope": [1]})
    with pytest.raises(ValueError, match="study 'nope' not found"):
        sweep_params("nope")


def test_compose_matches_multirun_point():
    cfg = compose_run("policies", {"workload": "azure_code", "policy": "fixed_gamma/g3", "workload.load": "0.7",
                                   "seed": "1"})
    assert cfg["policy"] == {"name": "fixed", "gamma": 3}
    assert cfg["workload"]["path"].endswith("code.csv") and cfg["workload"]["load"] == 0.7
    assert cfg["workload"]["first_n"] == 200 and cfg["seed"] == 1
    cls = compose_run("classes", {"policy": "goodput", "workload.load": "0.3", "seed": "0"})
    assert cls["workload"]["classes"] == {"chat": 0.5, "code": 0.5}
    assert cls["acceptance"]["class_alpha"] == {"chat": 0.45, "code": 0.9}


def test_run_study_slice_and_oracle(profile, tmp_path):
    t = run_study("policies", tmp_path, profile=str(profile), seeds=[0, 1],
                  only={"workload": ["azure_conv"], "policy": ["fixed_gamma/g2", "goodput"],
                        "workload.load": [0.7]},
                  overrides=["workload.first_n=40", "cluster.max_batch=32"])
    assert len(t) == 4 and (tmp_path / "study.csv").is_file()
    for col in ("study", "run", "workload", "policy", "workload.load", "seed", "arm", "policy_name", "gamma",
                "throughput_tok_s", "latency_mean", "tpot_mean", "mean_gamma", "profile", "workload_name", "wall_s"):
        assert col in t.columns, col
    assert sorted(t["arm"].unique()) == ["fixed-2", "goodput"]
    assert (t["completed"] == 40).all() and (t["profile"] == "p").all()
    c = compare(t, "latency_mean")
    assert set(c["arm"]) == set(t["arm"])
    assert (c[c["arm"] == c["oracle_arm"]]["gap_pct"] == 0).all()


def test_oracle_picks_best_fixed_median():
    t = pd.DataFrame({"workload.load": [0.5] * 6 + [1.0] * 6,
                      "arm": ["fixed-1", "fixed-1", "fixed-2", "fixed-2", "adaptive", "adaptive"] * 2,
                      "seed": [0, 1] * 6,
                      "latency_mean": [3, 5, 4, 4.5, 1, 1, 9, 9, 7, 8, 7, 7]})
    o = oracle(t, "latency_mean").set_index("workload.load")
    assert o.loc[0.5, "oracle_arm"] == "fixed-1" and o.loc[0.5, "oracle_latency_mean"] == 4.0
    assert o.loc[1.0, "oracle_arm"] == "fixed-2"
    c = compare(t, "latency_mean").set_index(["workload.load", "arm"])
    assert c.loc[(0.5, "adaptive"), "gap_pct"] == pytest.approx(100 * (1 - 4.0) / 4.0)
    assert c.loc[(0.5, "adaptive"), "rank"] == 1
    with pytest.raises(ValueError, match="metric"):
        oracle(t, "nope")
