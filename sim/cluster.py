"""A serving cluster: N replicas in one SimPy environment behind a router, fed by an arrival process.

The arrival process wakes once per distinct arrival time — before any replica starts an iteration at
that time — and hands every request arriving then to the router, which picks a replica from the
replicas' state at that instant:

* ``round_robin`` — replica i mod N for the i-th request;
* ``random`` — uniformly at random (seeded);
* ``least_outstanding`` — fewest requests queued or running (ties: lowest index);
* ``least_kv`` — fewest KV tokens in use plus prompt tokens queued (ties: lowest index).

A request whose prompt + output exceeds a replica's KV capacity can never be served: it is rejected at
arrival, counted, and never enters a queue.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import simpy

from .acceptance import AcceptanceModel
from .cost_model import CostModel
from .policies import Policy
from .events import URGENT, at_time
from .replica import IterationLog, Replica
from .requests import RequestTable
from .workload import Workload

ROUTERS = ("round_robin", "random", "least_outstanding", "least_kv")


@dataclass
class ClusterConfig:
    """Cluster shape. ``kv_capacity_tokens`` overrides the profile's KV memory (tokens per replica)."""

    replicas: int = 1
    router: str = "round_robin"
    max_batch: int = 64
    mode: str = "continuous"
    kv_capacity_tokens: int | None = None
    watermark: float = 0.01
    fast_forward: bool = True  # identical results either way; False steps one SimPy event per iteration

    def validate(self) -> None:
        if not isinstance(self.replicas, (int, np.integer)) or self.replicas < 1:
            raise ValueError(f"cluster.replicas is {self.replicas!r}; expected an integer ≥ 1")
        if self.router not in ROUTERS:
            raise ValueError(f"cluster.router is {self.router!r}; expected one of {list(ROUTERS)}")
        if not isinstance(self.max_batch, (int, np.integer)) or self.max_batch < 1:
            raise ValueError(f"cluster.max_batch is {self.max_batch!r}; expected an integer ≥ 1")
        if self.mode not in ("continuous", "static"):
            raise ValueError(f"cluster.mode is {self.mode!r}; expected 'continuous' or 'static'")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < 2:
            raise ValueError(f"cluster.kv_capacity_tokens is {self.kv_capacity_tokens}; expected ≥ 2 tokens or null")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"cluster.watermark is {self.watermark}; expected a fraction in [0, 1)")
        if not isinstance(self.fast_forward, (bool, np.bool_)):
            raise ValueError(f"cluster.fast_forward is {self.fast_forward!r}; expected true or false")


def kv_capacity_tokens(cost: CostModel, policy: Policy, cfg: ClusterConfig) -> int:
    """Tokens of context one replica can hold: KV memory / (target + draft KV bytes per token)."""
    if cfg.kv_capacity_tokens is not None:
        return int(cfg.kv_capacity_tokens)
    p = cost.profile
    per_token = p.kv_bytes_per_token("target") + (p.kv_bytes_per_token("draft") if policy.uses_draft else 0)
    return int(p.kv_cache_bytes // per_token)


@dataclass
class SimResult:
    """Everything one simulation produced: per-request and per-iteration tables plus run facts."""

    requests: pd.DataFrame
    iterations: pd.DataFrame
    busy_s: list[float]
    makespan_s: float
    kv_capacity_tokens: int
    policy: dict = field(default_factory=dict)


def request_table(workload: Workload, acceptance: AcceptanceModel, max_gamma: int,
                  seed: np.random.SeedSequence) -> RequestTable:
    """Fresh request state, with each request's acceptance thresholds (up to ``max_gamma``) drawn from ``seed``."""
    reqs = RequestTable(workload)
    scale = acceptance.request_scale(len(workload), np.random.default_rng(seed), workload.request_class,
                                     workload.arrival_s)
    reqs.accept_thr = acceptance.thresholds(scale, max_gamma)
    thr = reqs.accept_thr
    reqs.shared_thr = thr[0].copy() if len(thr) and (thr == thr[0]).all() else None
    return reqs


def mean_context(workload: Workload) -> float:
    """Reference context for offline tables (tokens): mean prompt plus half the mean output."""
    return float(workload.prompt_tokens.mean() + workload.output_tokens.mean() / 2)


def simulate(workload: Workload, cost: CostModel, policy: Policy, acceptance: AcceptanceModel,
             cluster: ClusterConfig | None = None, seed: int = 0, reference_context: float | None = None) -> SimResult:
    """Replay ``workload`` through the cluster and return the results. Same inputs and seed → same result."""
    cluster = cluster or ClusterConfig()
    cluster.validate()
    if cluster.max_batch > cost.max_batch:
        raise ValueError(f"cluster.max_batch {cluster.max_batch} exceeds the cost model's max_batch {cost.max_batch}")
    if len(workload) == 0:
        raise ValueError("the workload has no requests")
    seeds = np.random.SeedSequence(seed).spawn(cluster.replicas + 2)
    reqs = request_table(workload, acceptance, cost.max_gamma, seeds[0])
    if reference_context is None:
        reference_context = mean_context(workload)
    policy.setup(cost, acceptance, reference_context)
    capacity = kv_capacity_tokens(cost, policy, cluster)

    env = simpy.Environment()
    log = IterationLog()
    # Each replica gets its own copy of the (set-up) policy, so online state is per replica.
    replicas = [Replica(env, i, reqs, cost, copy.deepcopy(policy), acceptance, np.random.default_rng(seeds[i + 2]), log,
                        max_batch=cluster.max_batch, kv_capacity_tokens=capacity, watermark=cluster.watermark,
                        mode=cluster.mode, fast_forward=cluster.fast_forward) for i in range(cluster.replicas)]
    too_big = (reqs.prompt + reqs.output) > capacity
    reqs.rejected[:] = too_big
    env.process(_arrivals(env, reqs, replicas, cluster.router, np.random.default_rng(seeds[1])))
    env.run()

    unfinished = np.flatnonzero(np.isnan(reqs.finished) & ~reqs.rejected)
    if len(unfinished):  # a defect, never an expected outcome: every admitted request must finish
        raise RuntimeError(f"simulation ended with {len(unfinished)} unfinished requests (first id {unfinished[0]})")
    iters = log.frame(sort=True)
    fin = reqs.finished[~reqs.rejected]
    makespan = float(np.nanmax(fin)) if len(fin) else 0.0
    return SimResult(requests=reqs.frame(), iterations=iters, busy_s=[r.busy_s for r in replicas],
                     makespan_s=makespan, kv_capacity_tokens=capacity, policy=policy.describe())


def _arrivals(env: simpy.Environment, reqs: RequestTable, replicas: list[Replica], router: str,
              rng: np.random.Generator):
    """Dispatch requests at their arrival times (one wake-up per distinct arrival time)."""
    t = reqs.arrival
    n, k = len(t), len(replicas)
    # Group simultaneous arrivals: boundaries where the time changes.
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]]).tolist()
    starts.append(n)
    times = t.tolist()
    rejected = reqs.rejected
    rr = 0
    rand = rng.integers(0, k, n) if router == "random" else None
    for g in range(len(starts) - 1):
        lo, hi = starts[g], starts[g + 1]
        if times[lo] > env.now:
            yield at_time(env, times[lo], URGENT)  # before any iteration starting then
        for rid in range(lo, hi):
            if rejected[rid]:
                continue
            if router == "round_robin":
                target = replicas[rr % k]
                rr += 1
            elif router == "random":
                target = replicas[rand[rid]]
            elif router == "least_outstanding":
                target = min(replicas, key=lambda r: r.outstanding)
            else:
                target = min(replicas, key=lambda r: r.kv_in_use() + r.queued_tokens)
            target.submit(rid)
