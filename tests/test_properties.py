"""Property-based tests (hypothesis) over random workloads, cost profiles, policies, clusters and acceptance:

* every request is either rejected (prompt + output exceed a replica's KV capacity) or completes exactly once
  with exactly its output tokens;
* time never goes backwards (per request and per replica), and the KV cache never overflows;
* per-replica busy time ≤ wall time (makespan), and equals the sum of its iterations;
* reruns with the same seed are identical.

Deterministic in CI: ``derandomize=True`` and a fixed number of examples.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import add_drafter_rows, linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import ROUTERS, ClusterConfig, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.drafters import make_drafter
from specbatch.sim.metrics import summarize
from specbatch.sim.policies import make_policy, policy_names
from specbatch.sim.profile import load_profile
from specbatch.sim.workload import Workload

MAX_BATCH, MAX_GAMMA = 8, 4
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _noisy(f, seed: int, amp: float = 0.1):
    """``f`` times a deterministic ±amp multiplicative jitter (measured-profile noise; dips stay < 25 %)."""
    def g(b, t, c):
        h = (b * 7919 + t * 104729 + c * 1299709 + seed) % 1000 / 1000.0
        return f(b, t, c) * (1.0 + amp * (2 * h - 1))
    return g


# Profile shapes: (name, verify, draft, prefill, grid keyword arguments).
SHAPES = {
    "constant": (linear_step(0.05, 0.0), linear_step(0.005, 0.0), lambda n: 1e-3 * n, {}),
    "knee": (linear_step(0.01, 0.0005, knee=16), linear_step(0.001, 0.00002), lambda n: 5e-4 * n + 0.002, {}),
    "context-heavy": (linear_step(0.005, 0.0002, 2e-6), linear_step(0.0005, 0.0, 2e-7), lambda n: 2e-4 * n, {}),
    "noisy": (_noisy(linear_step(0.01, 0.0005, 1e-7, knee=8), 1), _noisy(linear_step(0.001, 0.00005), 2),
              lambda n: 1e-3 * n, {}),
    "coarse": (linear_step(0.02, 0.001), linear_step(0.002, 0.0001), lambda n: 1e-3 * n,
               dict(batches=(1, 4), max_tokens=3, contexts=(256,), prompts=(64, 512))),
}
_COSTS: dict[str, CostModel] = {}
_TMP = tempfile.TemporaryDirectory(prefix="specbatch-props-")


# Drafter kinds (sim/drafters.py): each shape's profile also has eagle rows (half the draft's step) and ngram rows.
DRAFTERS = ("draft_model", "eagle", "ngram")


def cost_model(shape: str, drafter: str = "draft_model") -> CostModel:
    if (shape, drafter) not in _COSTS:
        verify, draft, prefill, grid = SHAPES[shape]
        kw = dict(batches=(1, 2, 4, 8), max_tokens=5, contexts=(64, 512), prompts=(16, 128, 1024),
                  prefill_batches=(1, 2, 8), batched_prefill=lambda n, b: prefill(n) * (1 + (b - 1) / 3)) | grid
        folder = Path(_TMP.name) / shape
        if not (folder / "meta.json").exists():
            write_formula_profile(folder, verify, draft, prefill, **kw)
            add_drafter_rows(folder, eagle=lambda b, t, c: 0.5 * draft(b, t, c), ngram=linear_step(2e-4, 1e-5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _COSTS[shape, drafter] = CostModel(load_profile(folder), max_batch=MAX_BATCH, max_gamma=MAX_GAMMA,
                                               drafter=make_drafter(drafter))
    return _COSTS[shape, drafter]


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 30))
    gaps = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.05), st.floats(0.0, 3.0)), min_size=n - 1,
                         max_size=n - 1))
    t = np.concatenate([[0.0], np.cumsum(gaps)]) if n > 1 else np.zeros(1)
    prompts = draw(st.lists(st.integers(1, 400), min_size=n, max_size=n))
    outputs = draw(st.lists(st.one_of(st.integers(1, 3), st.integers(1, 40), st.integers(1, 150)), min_size=n, max_size=n))
    return Workload(t, np.array(prompts, np.int64), np.array(outputs, np.int64))


def _default_constructible() -> list[str]:
    """Registered policies that run with their default parameters (every one, today)."""
    names = []
    for name in policy_names():
        try:
            make_policy(name)
        except (TypeError, ValueError):
            continue
        names.append(name)
    return names


POLICIES = _default_constructible()


@st.composite
def scenarios(draw):
    name = draw(st.sampled_from(POLICIES))
    params = {"gamma": draw(st.integers(0, MAX_GAMMA))} if name == "fixed" else {}
    w = draw(workloads())
    longest = int((w.prompt_tokens + w.output_tokens).max())
    # KV capacity: the profile's (ample), any small value (rejections), or tight: 1-3 of the longest request
    # (every request fits, batches preempt)
    kv = draw(st.one_of(st.none(), st.integers(30, 2500), st.floats(1.0, 3.0).map(lambda f: max(2, int(f * longest)))))
    cluster = dict(replicas=draw(st.integers(1, 3)), router=draw(st.sampled_from(ROUTERS)),
                   max_batch=draw(st.integers(1, MAX_BATCH)), mode=draw(st.sampled_from(["continuous", "static"])),
                   kv_capacity_tokens=kv, watermark=draw(st.sampled_from([0.0, 0.01, 0.1])),
                   attention=draw(st.sampled_from(["paged", "padded"])),
                   prefill=draw(st.sampled_from(["sequential", "batched", "chunked"])),
                   max_num_batched_tokens=draw(st.sampled_from([MAX_BATCH, 64, 2048])),
                   long_prefill_token_threshold=draw(st.sampled_from([None, 50])))
    if cluster["prefill"] == "chunked":  # continuous batching only
        cluster["mode"] = "continuous"
    if draw(st.integers(0, 2)) == 0:  # memory pressure: near-simultaneous arrivals, full batches, tight KV -> preemption
        w = Workload(w.arrival_s * 0.01, w.prompt_tokens, w.output_tokens)
        cluster.update(mode="continuous", max_batch=draw(st.integers(4, MAX_BATCH)), replicas=draw(st.integers(1, 2)),
                       kv_capacity_tokens=max(2, int(draw(st.floats(1.0, 2.0)) * longest)))
    alpha = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
    concentration = draw(st.one_of(st.none(), st.floats(0.5, 50.0)))
    return dict(workload=w, shape=draw(st.sampled_from(sorted(SHAPES))), policy=(name, params),
                cluster=cluster, alpha=alpha, concentration=concentration, seed=draw(st.integers(0, 2**16)),
                drafter=draw(st.sampled_from(DRAFTERS)))


def run_scenario(sc: dict):
    name, params = sc["policy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # extrapolation warnings (coarse grid, tiny KV) are expected here
        drafter = sc.get("drafter", "draft_model")
        cluster = dict(sc["cluster"])
        if drafter == "ngram" and cluster.get("prefill") == "chunked":
            cluster["prefill"] = "sequential"  # (ngram under chunked prefill is refused)
        match = make_drafter(drafter).match_rate
        return simulate(sc["workload"], cost_model(sc["shape"], drafter), make_policy(name, **params),
                        AcceptanceModel(alpha=sc["alpha"], concentration=sc["concentration"], max_gamma=MAX_GAMMA,
                                        match_rate=match),
                        ClusterConfig(**cluster), seed=sc["seed"])


@SETTINGS
@given(scenarios())
def test_every_request_completes_exactly_once_with_its_output_tokens(sc):
    w, r = sc["workload"], run_scenario(sc)
    q = r.requests
    assert q["request"].tolist() == list(range(len(w)))
    too_big = (w.prompt_tokens + w.output_tokens) > r.kv_capacity_tokens
    assert np.array_equal(q["rejected"].to_numpy(), too_big)
    served = q[~q["rejected"]]
    assert served["finished_s"].notna().all() and served["first_token_s"].notna().all()
    assert (served["generated_tokens"] == served["output_tokens"]).all()
    assert served["replica"].between(0, sc["cluster"]["replicas"] - 1).all()
    rejected = q[q["rejected"]]
    assert rejected["finished_s"].isna().all() and (rejected["generated_tokens"] == 0).all()
    # Every output token is produced exactly once across all iterations (prefills included).
    assert r.iterations["tokens"].sum() == served["output_tokens"].sum()
    s = summarize(r)
    assert s["completed"] + s["rejected"] == len(w)


@SETTINGS
@given(scenarios())
def test_time_never_goes_backwards_and_kv_never_overflows(sc):
    r = run_scenario(sc)
    q = r.requests[~r.requests["rejected"]]
    eps = 1e-9 * max(1.0, r.makespan_s)
    assert (q["admitted_s"] >= q["arrival_s"] - eps).all()
    assert (q["first_token_s"] >= q["admitted_s"] - eps).all()
    assert (q["finished_s"] >= q["first_token_s"] - eps).all()
    if len(q):
        assert q["finished_s"].max() == r.makespan_s
    it = r.iterations
    assert (it["prefill_s"] >= 0).all() and (it["step_s"] >= 0).all() and (it["start_s"] >= 0).all()
    assert (it["kv_tokens"] <= r.kv_capacity_tokens).all()
    assert (it["batch"] <= sc["cluster"]["max_batch"]).all() and (it["gamma"] <= MAX_GAMMA).all()
    for _, g in it.groupby("replica"):
        start = g["start_s"].to_numpy()
        end = start + g["prefill_s"].to_numpy() + g["step_s"].to_numpy()
        assert (np.diff(start) >= -eps).all()
        assert (end[:-1] <= start[1:] + eps).all()  # one iteration at a time per replica
        assert end[-1] <= r.makespan_s + eps


@SETTINGS
@given(scenarios())
def test_busy_time_is_at_most_wall_time(sc):
    r = run_scenario(sc)
    eps = 1e-9 * max(1.0, r.makespan_s)
    assert len(r.busy_s) == sc["cluster"]["replicas"]
    it = r.iterations
    for i, busy in enumerate(r.busy_s):
        g = it[it["replica"] == i]
        assert 0.0 <= busy <= r.makespan_s + eps
        assert busy == np.float64(busy) and abs(busy - float((g["prefill_s"] + g["step_s"]).sum())) <= eps
        if (r.requests["replica"] == i).sum() == 0:
            assert busy == 0.0
    if r.makespan_s > 0:
        s = summarize(r)
        assert all(0.0 <= f <= 1.0 + 1e-9 for f in s["busy_fraction"])


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_same_seed_same_result(sc):
    a, b = run_scenario(sc), run_scenario(sc)
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    pd.testing.assert_frame_equal(a.iterations, b.iterations, check_exact=True)
    assert a.busy_s == b.busy_s and a.makespan_s == b.makespan_s and a.policy == b.policy


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_fast_forward_is_exactly_one_event_per_iteration(sc):
    """Planning quiet stretches of iterations in one step changes nothing: same floats, same draws, same
    log — across policies, routers, preemption, rejections, static mode and heterogeneous acceptance."""
    slow = run_scenario({**sc, "cluster": {**sc["cluster"], "fast_forward": False}})
    fast = run_scenario({**sc, "cluster": {**sc["cluster"], "fast_forward": True}})
    pd.testing.assert_frame_equal(slow.requests, fast.requests, check_exact=True)
    pd.testing.assert_frame_equal(slow.iterations, fast.iterations, check_exact=True)
    assert slow.busy_s == fast.busy_s and slow.makespan_s == fast.makespan_s


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from([1.0, 0.9, 0.7, 0.5, 0.2, 0.0, -20.0, -100.0, -266.0]), min_size=1, max_size=8),
       st.integers(0, 2**32 - 1), st.integers(1, 8))
def test_shared_threshold_counts_equal_the_per_position_comparison(levels, seed, gamma):
    """With thresholds shared by every request, the stream's precomputed gain (1 + accepted) capped at γ + 1
    is 1 + #{j < γ : U < t_j} exactly — including draws equal to a threshold (negative levels pick a drawn U)."""
    from specbatch.sim.scheduler import UniformStream
    draws = np.random.default_rng(seed).random(300)
    thr = np.sort([draws[int(-v)] if v < 0 else v for v in levels])[::-1]  # non-increasing, some equal to a U
    stream = UniformStream(np.random.default_rng(seed), block=128, thresholds=thr)
    stream.skip(17)  # reads straddle block refills
    u = stream.peek(250).copy()
    acc = stream.peek_capped(250, gamma + 1) - 1
    np.testing.assert_array_equal(u, draws[17:267])
    np.testing.assert_array_equal(acc, (u[:, None] < thr[None, :gamma]).sum(axis=1))
    stream.skip(200)  # past the block the capped cache was built on: a refill must rebuild it
    later = stream.peek(150)
    np.testing.assert_array_equal(stream.peek_capped(150, gamma + 1),
                                  1 + (later[:, None] < thr[None, :gamma]).sum(axis=1))
