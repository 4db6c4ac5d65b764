"""workload.load as a fraction of the saturation rate, and the busy fraction the model predicts (sim/capacity.py)."""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.capacity import estimate_capacity, predicted_busy, rate_for_load
from specbatch.sim.cluster import ClusterConfig, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.metrics import summarize
from specbatch.sim.policies import make_policy
from specbatch.sim.profile import load_profile
from specbatch.sim.workload import set_rate, synthetic


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    # memory-bound up to 32 tokens of work: batching is nearly free, so the batch size at load matters
    p = write_formula_profile(tmp_path_factory.mktemp("cap") / "p", verify=linear_step(0.05, 0.002, 1e-7, knee=32),
                              draft=linear_step(0.005, 0.0), prefill=lambda n: 2e-4 * n, batches=(1, 2, 4, 8, 16, 32),
                              contexts=(64, 512, 2048), prompts=(16, 256, 1024, 4096), kv_cache_bytes=10**8)
    return CostModel(load_profile(p), max_batch=32, max_gamma=4)


@pytest.fixture(scope="module")
def work():
    return synthetic(3000, rate=1.0, prompt_lognormal=(300, 0.8), output_lognormal=(60, 0.8), seed=3)


def run_none(cost, w, cluster):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = simulate(w, cost, make_policy("none"), AcceptanceModel(alpha=0.7, max_gamma=4), cluster, seed=0)
    return r, summarize(r, 10.0, 0.5)


@pytest.mark.parametrize("attention", ["paged", "padded"])
@pytest.mark.parametrize("load", [0.05, 0.3, 0.6])
def test_predicted_busy_fraction_is_the_measured_one(cost, work, load, attention):
    """Under Poisson arrivals the model's busy fraction is the simulated replica's (±10 %): the batch the
    replica runs at that rate, not its largest, prices the steps."""
    cluster = ClusterConfig(max_batch=32, attention=attention)
    rate = rate_for_load(cost, work, cluster, load)
    _, s = run_none(cost, set_rate(work, rate), cluster)
    assert s["busy_fraction_mean"] == pytest.approx(predicted_busy(cost, work, cluster, rate), rel=0.10)


def test_overload_throughput_is_the_capacity(cost, work):
    """At twice the saturation rate the queue grows and the replica serves at its capacity (±10 %: the
    estimate prices every step at the largest batch)."""
    cluster = ClusterConfig(max_batch=32)
    cap = estimate_capacity(cost, work, cluster)
    r, _ = run_none(cost, set_rate(work, rate_for_load(cost, work, cluster, 2.0)), cluster)
    req = r.requests
    served = len(req) / (req["finished_s"].max() - req["arrival_s"].min())
    assert served == pytest.approx(cap, rel=0.10)


def test_low_rate_prices_each_request_alone(cost, work):
    cluster = ClusterConfig(max_batch=32)
    ctx = work.prompt_tokens + work.output_tokens / 2
    steps = work.output_tokens - 1.0
    alone = np.mean([cost.prefill(float(p)) for p in work.prompt_tokens]) + \
        steps.mean() * cost.target_verify(1, 0, float(ctx @ steps / steps.sum()))
    assert predicted_busy(cost, work, cluster, 1e-4) == pytest.approx(1e-4 * alone, rel=0.01)


def test_load_scales_the_saturation_rate(cost, work):
    cluster = ClusterConfig(max_batch=32, replicas=3)
    sat = estimate_capacity(cost, work, cluster)
    for load in (0.1, 0.5, 1.0, 1.5):
        assert rate_for_load(cost, work, cluster, load) == pytest.approx(load * sat, rel=1e-12)
    # a replica is busy far more than the load says: batching makes the saturation rate far higher than
    # the rate a replica serving one request at a time takes
    assert predicted_busy(cost, work, cluster, 0.3 * sat) > 0.5


def test_unservable_requests_do_not_count_toward_the_rate(cost, work):
    """Half the requests too big for the KV cache: they are rejected and cost nothing, so twice the rate
    keeps a replica as busy, and the capacity is twice the servable half's own."""
    cluster = ClusterConfig(max_batch=32, kv_capacity_tokens=20_000)
    n = len(work)
    huge = replace(work, prompt_tokens=np.where(np.arange(n) % 2 == 1, 30_000, work.prompt_tokens))
    servable = work.take(np.arange(0, n, 2))
    assert predicted_busy(cost, huge, cluster, 0.2) == pytest.approx(predicted_busy(cost, servable, cluster, 0.1),
                                                                      rel=1e-9)
    assert estimate_capacity(cost, huge, cluster) == pytest.approx(2 * estimate_capacity(cost, servable, cluster),
                                                                   rel=1e-9)


def test_nothing_servable_is_one_clear_error(cost, work):
    with pytest.raises(ValueError, match=r"no request of workload .* fits in a replica's KV cache \(5 tokens"):
        rate_for_load(cost, work, ClusterConfig(max_batch=32, kv_capacity_tokens=5), 0.5)
