"""Edge cases: α = 0 and 1, γ beyond what a request has left, requests too big for the KV cache, a single
request, bursts of thousands of simultaneous arrivals, idle replicas, and a moderately large trace loaded in
bounded memory and time (the 2M-row measurement is benchmarks/large_trace.py)."""
from __future__ import annotations

import math
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import ClusterConfig, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.metrics import summarize
from specbatch.sim.policies import make_policy
from specbatch.sim.profile import load_profile
from specbatch.sim.workload import Workload, load_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from large_trace import write_trace  # noqa: E402


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    """Verify 0.1 s + 1 ms per token of work, draft 0.01 s, prefill 1 ms/token (target), 0.1 ms/token (draft)."""
    p = write_formula_profile(tmp_path_factory.mktemp("edge") / "p", verify=linear_step(0.1, 0.001),
                              draft=linear_step(0.01, 0.0), batches=(1, 2, 4, 8, 16, 32, 64), max_tokens=9,
                              contexts=(128, 512, 2048), prompts=(16, 64, 256, 1024, 4096))
    return CostModel(load_profile(p), max_batch=64, max_gamma=8)


def wl(arrivals, prompts, outputs):
    return Workload(np.asarray(arrivals, float), np.asarray(prompts, np.int64), np.asarray(outputs, np.int64))


def check_complete(r, w):
    q = r.requests
    served = q[~q["rejected"]]
    assert len(q) == len(w)
    assert served["finished_s"].notna().all()
    assert (served["generated_tokens"] == served["output_tokens"]).all()
    assert r.iterations["tokens"].sum() == served["output_tokens"].sum()
    return q


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_alpha_zero_gains_one_token_per_iteration(cost, mode):
    w = wl([0, 0, 0.5], [100, 200, 50], [7, 12, 3])
    r = simulate(w, cost, make_policy("fixed", gamma=4), AcceptanceModel(alpha=0.0), ClusterConfig(mode=mode))
    q = check_complete(r, w)
    assert (q["accepted_tokens"] == 0).all()
    dec = r.iterations[r.iterations["batch"] > 0]
    assert (dec["accepted"] == 0).all() and (dec["gamma"] == 4).all()
    if mode == "continuous":  # one token from prefill, then exactly one per iteration
        assert q["iterations"].tolist() == [6, 11, 2]


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_alpha_one_accepts_everything_and_gamma_beyond_the_end_is_capped(cost, mode):
    # γ = 8 but the requests have only 2..10 tokens left after prefill: each iteration gains
    # min(γ + 1, left) tokens, so exactly the output length is produced, never more.
    w = wl([0, 0, 0], [64, 64, 64], [3, 10, 11])
    r = simulate(w, cost, make_policy("fixed", gamma=8), AcceptanceModel(alpha=1.0), ClusterConfig(mode=mode))
    q = check_complete(r, w)
    assert q["generated_tokens"].tolist() == [3, 10, 11]
    if mode == "continuous":
        assert q["iterations"].tolist() == [1, 1, 2]  # ceil((output - 1) / 9)
    dec = r.iterations[r.iterations["batch"] > 0]
    assert (dec["accepted"] > 0).all()


def test_alpha_one_with_gamma_zero_policy_none(cost):
    w = wl([0], [64], [5])
    r = simulate(w, cost, make_policy("none"), AcceptanceModel(alpha=1.0))
    q = check_complete(r, w)
    assert q["iterations"].iloc[0] == 4 and q["accepted_tokens"].iloc[0] == 0


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_request_larger_than_kv_capacity_is_rejected_and_counted(cost, mode):
    # capacity 1000 tokens: request 1 (prompt 2000) and request 3 (prompt 600 + output 500) can never fit.
    w = wl([0, 0.1, 0.2, 0.3, 0.4], [100, 2000, 300, 600, 50], [20, 5, 30, 500, 10])
    cl = ClusterConfig(kv_capacity_tokens=1000, max_batch=8, mode=mode)
    r = simulate(w, cost, make_policy("fixed", gamma=3), AcceptanceModel(alpha=0.6), cl)
    q = check_complete(r, w)
    assert q["rejected"].tolist() == [False, True, False, True, False]
    assert q.loc[q["rejected"], "finished_s"].isna().all() and (q.loc[q["rejected"], "replica"] == -1).all()
    s = summarize(r)
    assert s["rejected"] == 2 and s["completed"] == 3


def test_every_request_too_big_ends_cleanly(cost):
    w = wl([0, 1], [5000, 6000], [10, 10])
    r = simulate(w, cost, make_policy("none"), AcceptanceModel(alpha=0.5), ClusterConfig(kv_capacity_tokens=100))
    assert r.requests["rejected"].all() and r.makespan_s == 0.0 and len(r.iterations) == 0
    s = summarize(r)
    assert s["completed"] == 0 and s["rejected"] == 2


def test_request_that_exactly_fills_the_kv_cache_is_served(cost):
    # prompt + output == capacity: fits at γ = 0 at its last step; the replica lowers γ rather than hang.
    w = wl([0], [90], [10])
    r = simulate(w, cost, make_policy("fixed", gamma=8), AcceptanceModel(alpha=1.0),
                 ClusterConfig(kv_capacity_tokens=100, watermark=0.0))
    check_complete(r, w)


def test_single_request(cost):
    w = wl([0], [256], [4])
    r = simulate(w, cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.0))
    q = check_complete(r, w)
    # prefill 0.256 + 0.0256 (draft) s, then 3 iterations of 2·0.01 + (0.1 + 0.001·3) s
    assert q["finished_s"].iloc[0] == pytest.approx(0.2816 + 3 * 0.123)
    s = summarize(r)
    assert s["busy_fraction"] == [pytest.approx(1.0)] and s["completed"] == 1


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_burst_of_thousands_of_simultaneous_arrivals(cost, mode):
    n = 3000
    rng = np.random.default_rng(0)
    w = wl(np.zeros(n), rng.integers(10, 300, n), rng.integers(1, 30, n))
    t = time.perf_counter()
    r = simulate(w, cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.7),
                 ClusterConfig(replicas=3, max_batch=64, router="least_outstanding", mode=mode), seed=1)
    assert time.perf_counter() - t < 60
    q = check_complete(r, w)
    assert q["replica"].value_counts().sort_index().tolist() == [1000, 1000, 1000]
    assert (q["ttft_s"] > 0).all()


def test_burst_in_a_trace_file_then_silence(cost, tmp_path):
    path = tmp_path / "burst.csv"
    rows = [f"10.0,{50 + i % 90},{1 + i % 17}" for i in range(2000)] + ["3610.0,100,5"]
    path.write_text("arrival,prompt,output\n" + "\n".join(rows) + "\n")
    w = load_trace(path)
    assert (w.arrival_s[:2000] == 0).all() and w.arrival_s[-1] == 3600.0
    r = simulate(w, cost, make_policy("adaptive"), AcceptanceModel(alpha=0.8), ClusterConfig(replicas=2))
    q = check_complete(r, w)
    assert q["finished_s"].iloc[-1] > 3600.0


@pytest.mark.parametrize("router", ["round_robin", "random", "least_outstanding", "least_kv"])
def test_more_replicas_than_requests_leaves_idle_replicas_at_zero(cost, router):
    w = wl([0, 0.5, 1.0], [100, 100, 100], [10, 10, 10])
    r = simulate(w, cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.7),
                 ClusterConfig(replicas=6, router=router), seed=3)
    check_complete(r, w)
    s = summarize(r)
    used = set(r.requests["replica"])
    assert len(s["busy_fraction"]) == 6
    for i, f in enumerate(s["busy_fraction"]):
        assert (f == 0.0) == (i not in used)
        assert 0.0 <= f <= 1.0 + 1e-9
    assert not (r.iterations["replica"].isin(set(range(6)) - used)).any()


def test_output_of_one_token_finishes_at_prefill_without_decoding(cost):
    w = wl([0, 0, 0], [30, 40, 50], [1, 1, 1])
    for mode in ("continuous", "static"):
        r = simulate(w, cost, make_policy("fixed", gamma=4), AcceptanceModel(alpha=0.5), ClusterConfig(mode=mode))
        q = check_complete(r, w)
        assert (q["iterations"] == 0).all() and q["tpot_s"].isna().all()
    # one-token requests joining a running batch leave at their prefill; the others run on
    w = wl([0, 0, 0.01, 0.02, 0.02], [30, 40, 50, 60, 20], [20, 1, 1, 15, 1])
    for mode in ("continuous", "static"):
        for ff in (True, False):
            r = simulate(w, cost, make_policy("fixed", gamma=4), AcceptanceModel(alpha=0.5),
                         ClusterConfig(mode=mode, fast_forward=ff))
            q = check_complete(r, w)
            ones = q["output_tokens"] == 1
            assert (q.loc[ones, "finished_s"] == q.loc[ones, "first_token_s"]).all()
            assert (q.loc[ones, "iterations"] == 0).all() and (q.loc[~ones, "iterations"] > 0).all()


def test_moderate_trace_loads_in_bounded_time_and_memory(tmp_path):
    """200k rows: a few seconds and memory near the size of the result (the 2M-row figures come from
    `python benchmarks/large_trace.py`)."""
    n = 200_000
    path = tmp_path / "big.csv"
    write_trace(path, n)
    t = time.perf_counter()
    tracemalloc.start()
    try:
        w = load_trace(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t
    assert len(w) == n and (np.diff(w.arrival_s) >= 0).all()
    result = w.arrival_s.nbytes + w.prompt_tokens.nbytes + w.output_tokens.nbytes  # 24 bytes per request
    assert peak < 8 * result + 64 * 2**20, f"peak {peak / 2**20:.0f} MiB for a {result / 2**20:.1f} MiB result"
    assert elapsed < 30, f"{elapsed:.1f} s"
    assert math.isfinite(w.rate)


@pytest.mark.parametrize("alpha", [5e-324, 1e-310, 1.0 - 1e-17])
def test_acceptance_spread_with_extreme_alpha_does_not_crash(alpha):
    # Beta(a, b) needs a, b > 0: a mean so close to 0 or 1 that a or b underflows keeps the mean (found by
    # the property tests: numpy raised "a <= 0").
    m = AcceptanceModel(alpha=alpha, concentration=0.5, max_gamma=4)
    q = m.request_scale(100, np.random.default_rng(0))
    assert np.isfinite(q).all() and (q >= 0).all()


# --- meta.json numbers that json reads but are not numbers (issue #26, item 10) -----------------------------


@pytest.mark.parametrize("key,value,shown", [
    ("kv_cache_bytes", "NaN", "NaN"), ("kv_cache_bytes", "Infinity", "Infinity"), ("kv_cache_bytes", "true", "true"),
    ("kv_bytes_per_token", "NaN", "NaN"), ("kv_bytes_per_token", "-Infinity", "-Infinity")])
def test_meta_nan_or_infinite_kv_numbers_are_one_line_errors(tmp_path, key, value, shown):
    import json
    import re

    from specbatch.sim.profile import ProfileError

    p = write_formula_profile(tmp_path / "p", verify=linear_step(0.1, 0.001), draft=linear_step(0.01, 0.0))
    meta = json.loads((p / "meta.json").read_text())
    if key == "kv_cache_bytes":
        meta["device"][key] = "@@"
        dotted = "device.kv_cache_bytes"
    else:
        meta["models"]["draft"][key] = "@@"
        dotted = "models.draft.kv_bytes_per_token"
    (p / "meta.json").write_text(json.dumps(meta).replace('"@@"', value))
    with pytest.raises(ProfileError) as e:
        load_profile(p)
    msg = str(e.value)
    assert re.fullmatch(re.escape(f"{p / 'meta.json'}: key '{dotted}' is {shown}; expected a positive, finite ")
                        + r"number( of bytes)?", msg), msg
