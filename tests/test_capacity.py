"""workload.load as a replica's busy fraction without speculation (sim/capacity.py; issue #26, item 7)."""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.capacity import estimate_capacity, rate_for_load
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


@pytest.mark.parametrize("attention", ["paged", "padded"])
@pytest.mark.parametrize("load", [0.3, 0.6, 0.9])
def test_poisson_load_is_the_busy_fraction(cost, work, load, attention):
    """Under Poisson arrivals, a replica without speculation is busy ``load`` of the time (±10 %): the
    batch it runs at that load, not its largest, prices the steps (the old estimate made 0.3 a 70 % busy
    replica on this profile)."""
    cluster = ClusterConfig(max_batch=32, attention=attention)
    w = set_rate(work, rate_for_load(cost, work, cluster, load))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = simulate(w, cost, make_policy("none"), AcceptanceModel(alpha=0.7, max_gamma=4), cluster, seed=0)
    busy = summarize(r, 10.0, 0.5)["busy_fraction_mean"]
    assert busy == pytest.approx(load, rel=0.10)


def test_low_load_prices_each_request_alone(cost, work):
    cluster = ClusterConfig(max_batch=32)
    lam = rate_for_load(cost, work, cluster, 0.001)
    ctx = work.prompt_tokens + work.output_tokens / 2
    steps = work.output_tokens - 1.0
    alone = np.mean([cost.prefill(float(p)) for p in work.prompt_tokens]) + \
        steps.mean() * cost.target_verify(1, 0, float(ctx @ steps / steps.sum()))
    assert lam * alone == pytest.approx(0.001, rel=0.01)


def test_load_one_and_above_scale_the_saturation_rate(cost, work):
    cluster = ClusterConfig(max_batch=32, replicas=3)
    sat = estimate_capacity(cost, work, cluster)
    assert rate_for_load(cost, work, cluster, 1.0) == pytest.approx(sat, rel=1e-12)
    assert rate_for_load(cost, work, cluster, 0.999) == pytest.approx(sat, rel=0.02)  # continuous at 1
    rates = [rate_for_load(cost, work, cluster, x) for x in np.linspace(0.05, 1.2, 12)]
    assert np.all(np.diff(rates) > 0)  # monotone, through the knee at 0.95
    assert rate_for_load(cost, work, cluster, 1.5) == pytest.approx(1.5 * sat, rel=1e-12)
    assert rate_for_load(cost, work, cluster, 0.5) < 0.5 * sat  # small batches at half load: dearer steps


def test_unservable_requests_do_not_count_toward_the_rate(cost, work):
    """Half the requests too big for the KV cache: they are rejected and cost nothing, so the rate that makes
    a given load is twice the servable half's own (the servable requests alone make the load)."""
    cluster = ClusterConfig(max_batch=32, kv_capacity_tokens=20_000)
    n = len(work)
    huge = replace(work, prompt_tokens=np.where(np.arange(n) % 2 == 1, 30_000, work.prompt_tokens))
    servable = work.take(np.arange(0, n, 2))
    assert rate_for_load(cost, huge, cluster, 0.6) == pytest.approx(2 * rate_for_load(cost, servable, cluster, 0.6),
                                                                    rel=1e-9)
    assert estimate_capacity(cost, huge, cluster) == pytest.approx(2 * estimate_capacity(cost, servable, cluster),
                                                                   rel=1e-9)


def test_nothing_servable_is_one_clear_error(cost, work):
    with pytest.raises(ValueError, match=r"no request of workload .* fits in a replica's KV cache \(5 tokens"):
        rate_for_load(cost, work, ClusterConfig(max_batch=32, kv_capacity_tokens=5), 0.5)
