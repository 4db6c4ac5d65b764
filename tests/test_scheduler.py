"""The scheduler core (:mod:`specbatch.sim.scheduler`) on its own: no SimPy, its rules, and a plain loop over
its public API that reproduces the simulator bit for bit."""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import ClusterConfig, charged_context, request_table, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.iterations import ITERATION_COLUMNS, IterationLog, IterationRow
from specbatch.sim.policies import make_policy
from specbatch.sim.profile import load_profile
from specbatch.sim.scheduler import Scheduler
from specbatch.sim.workload import Workload

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cost(formula_profile):
    return CostModel(load_profile(formula_profile), max_batch=8, max_gamma=4)


def workload(n: int = 60, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload(arrival_s=np.sort(rng.uniform(0, 2.0, n)), prompt_tokens=rng.integers(8, 300, n),
                    output_tokens=rng.integers(1, 60, n), name="t")


def scheduler(w: Workload, cost, policy, capacity: int, max_batch: int = 4, seed: int = 0) -> Scheduler:
    """A scheduler seeded as :func:`simulate` seeds replica 0 of one."""
    seeds = np.random.SeedSequence(seed).spawn(3)
    reqs = request_table(w, AcceptanceModel(alpha=0.7), cost.max_gamma, seeds[0])
    policy.setup(cost, AcceptanceModel(alpha=0.7), charged_context(w, "paged", cost.max_batch))
    reqs.rejected[:] = (reqs.prompt + reqs.output) > capacity
    return Scheduler(0, reqs, policy, np.random.default_rng(seeds[2]), IterationLog(), max_batch=max_batch,
                     kv_capacity_tokens=capacity, max_gamma=cost.max_gamma)


def test_the_core_does_not_import_simpy():
    tree = ast.parse((REPO / "sim" / "scheduler.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] == "simpy"]


def test_iteration_row_fields_are_the_iteration_columns():
    assert tuple(IterationRow.__annotations__) == ITERATION_COLUMNS


def test_admission_is_fcfs_under_the_watermark(cost):
    w = Workload(arrival_s=np.zeros(4), prompt_tokens=np.array([500, 300, 250, 100]), output_tokens=np.full(4, 10),
                 name="t")
    s = scheduler(w, cost, make_policy("fixed", gamma=2), capacity=1000)
    for rid in range(4):
        s.submit(rid)
    assert s.queued_tokens == 1150 and s.outstanding == 4
    admitted = s.admit()  # 501 + 301 fit under 990; 251 more would not, and 101 may not overtake it
    assert admitted == [0, 1] and list(s.waiting) == [2, 3] and s.queued_tokens == 350
    assert not s.join(admitted, 0.0, 0.5)
    assert s.batch.ids.tolist() == [0, 1] and s.batch.contexts.tolist() == [501, 301]
    assert s.reqs.first_token[0] == 0.5 and s.reqs.generated[1] == 1


def test_preemption_takes_the_newest_back_to_the_head_of_the_queue(cost):
    w = Workload(arrival_s=np.zeros(3), prompt_tokens=np.array([300, 300, 300]), output_tokens=np.full(3, 50), name="t")
    s = scheduler(w, cost, make_policy("fixed", gamma=4), capacity=915, max_batch=3)
    for rid in range(3):
        s.submit(rid)
    s.join(s.admit(), 0.0, 0.1)  # 3 × 301 = 903 tokens: 3 × 5 more do not fit, 2 × 5 do
    gamma, view, preempted = s.choose_gamma(0.1)
    assert (gamma, view.batch, preempted) == (4, 2, [2])
    assert list(s.waiting) == [2] and s.reqs.preemptions[2] == 1 and s.reqs.generated[2] == 1


def drive(s: Scheduler, cost) -> None:
    """Continuous batching over ``s`` with a clock of running sums: what the SimPy replica does without
    fast-forward (requests arriving during an iteration queue then; at its end, they join the next)."""
    r = s.reqs
    order = [i for i in range(r.n) if not r.rejected[i]]
    t, nxt = 0.0, 0

    def arrive(upto: float) -> None:
        nonlocal nxt
        while nxt < len(order) and r.arrival[order[nxt]] <= upto:
            s.submit(order[nxt])
            nxt += 1

    while nxt < len(order) or s.outstanding:
        if not len(s.batch) and not s.waiting:
            t = float(r.arrival[order[nxt]])
            arrive(t)
        admitted = s.admit()
        prefill_s = 0.0
        for rid in admitted:
            prefill_s += cost.prefill(int(r.prompt[rid]) + int(r.generated[rid]), "target")
            prefill_s += cost.prefill(int(r.prompt[rid]) + int(r.generated[rid]), "draft")
        if admitted and s.join(admitted, t, t + prefill_s):
            s.finish(t + prefill_s)
        gamma, view, preempted = s.choose_gamma(t + prefill_s)
        step_s = cost.iteration(view.batch, gamma, view.step_context)
        acc = s.speculate(gamma)
        t0, t = t, t + (prefill_s + step_s)
        arrive(t)
        _, tokens, accepted = s.advance(view, gamma, acc)
        s.finish(t)
        s.kv_tokens = s.batch_tokens()
        s.record(t0, batch=view.batch, gamma=gamma, prefill_s=prefill_s, step_s=step_s, tokens=tokens + len(admitted),
                 accepted=accepted, admitted=len(admitted), preempted=len(preempted), context=view.context,
                 context_max=np.nan)


@pytest.mark.parametrize("policy", [("fixed", {"gamma": 3}), ("adaptive", {})])
@pytest.mark.parametrize("capacity", [600, 5000])
def test_a_plain_loop_over_the_core_reproduces_the_simulator(cost, policy, capacity):
    w = workload()
    sim = simulate(w, cost, make_policy(*policy[:1], **policy[1]), AcceptanceModel(alpha=0.7),
                   ClusterConfig(max_batch=4, kv_capacity_tokens=capacity), seed=5)
    s = scheduler(w, cost, make_policy(*policy[:1], **policy[1]), capacity, seed=5)
    drive(s, cost)
    assert s.reqs.frame().equals(sim.requests)
    pd.testing.assert_frame_equal(s.log.frame(), sim.iterations)
    if capacity == 600:
        assert sim.requests["preemptions"].sum() > 0  # the loop's preemptions are exercised


def test_a_copied_scheduler_runs_on_its_own(cost):
    """Deep copies share nothing: the drivers may snapshot one."""
    s = scheduler(workload(10), cost, make_policy("fixed", gamma=2), 5000)
    t = copy.deepcopy(s)
    t.submit(0)
    assert len(s.waiting) == 0 and len(t.waiting) == 1
