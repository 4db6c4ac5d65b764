"""Parallel replica groups (``cluster.workers``): identical to one process under state-free routers."""
from __future__ import annotations

import shutil
from pathlib import Path
import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import ClusterConfig, _group_worker, request_table, simulate, static_routes
from specbatch.sim.cost_model import CostModel, ExtrapolationWarning
from specbatch.sim.policies import make_policy
from specbatch.sim.profile import load_profile
from specbatch.sim.iterations import ITERATION_COLUMNS, iterations_frame, join_rows, merge_sorted_rows, sort_rows
from specbatch.sim.requests import RequestTable
from specbatch.sim.workload import synthetic


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    folder = write_formula_profile(tmp_path_factory.mktemp("p") / "formula", verify=linear_step(0.010, 0.0005, knee=64),
                                   draft=linear_step(0.001, 0.00002), contexts=(128, 512))  # longer contexts extrapolate
    return CostModel(load_profile(folder), max_batch=8)


def _run(cost, cluster, policy=("fixed", {"gamma": 3}), concentration=None, n=400):
    w = synthetic(n, rate=60.0, prompt_lognormal=(300, 0.9), output_lognormal=(60, 0.8), seed=5)
    acc = AcceptanceModel(alpha=0.7, concentration=concentration)
    return simulate(w, cost, make_policy(policy[0], **policy[1]), acc, cluster, seed=11)


@pytest.mark.parametrize("router,policy,concentration,mode", [
    ("round_robin", ("fixed", {"gamma": 3}), None, "continuous"),
    ("random", ("goodput", {}), 4.0, "continuous"),  # a learning policy, heterogeneous acceptance
    ("round_robin", ("adaptive", {}), 4.0, "static"),
])
def test_workers_give_the_same_tables_as_one_process(cost, router, policy, concentration, mode):
    base = dict(replicas=5, max_batch=8, router=router, mode=mode, kv_capacity_tokens=3000)
    one = _run(cost, ClusterConfig(**base), policy, concentration)
    two = _run(cost, ClusterConfig(**base, workers=2), policy, concentration)
    pd.testing.assert_frame_equal(one.requests, two.requests, check_exact=True)
    pd.testing.assert_frame_equal(one.iterations, two.iterations, check_exact=True)
    assert one.busy_s == two.busy_s and one.makespan_s == two.makespan_s
    assert one.requests["rejected"].any() and one.requests["finished_s"].notna().sum() > 300  # some too big for the KV
    assert sorted(one.requests.loc[~one.requests["rejected"], "replica"].unique()) == [0, 1, 2, 3, 4]


def test_a_worker_extrapolation_warning_reaches_the_caller_once(cost):
    fresh = CostModel(cost.profile, max_batch=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(fresh, ClusterConfig(replicas=4, max_batch=8, workers=2), n=200)
    extrapolations = [w for w in caught if issubclass(w.category, ExtrapolationWarning)]
    assert len(extrapolations) == 1 and "extrapolating" in str(extrapolations[0].message)
    assert fresh.warned


def test_static_routes_match_the_routers():
    rejected = np.array([False, True, False, False, True, False, False])
    np.testing.assert_array_equal(static_routes(rejected, "round_robin", 3, np.random.default_rng(0)),
                                  [0, -1, 1, 2, -1, 0, 1])  # rejected requests take no turn
    rnd = static_routes(rejected, "random", 3, np.random.default_rng(0))
    np.testing.assert_array_equal(rnd[rejected], -1)
    np.testing.assert_array_equal(rnd[~rejected], np.random.default_rng(0).integers(0, 3, 7)[~rejected])
    assert static_routes(rejected, "least_kv", 3, np.random.default_rng(0)) is None


@pytest.mark.parametrize("router", ["least_kv", "least_outstanding"])
def test_state_aware_routers_refuse_workers(router):
    with pytest.raises(ValueError, match=f"cluster.workers is 2 but router '{router}' looks at every replica"):
        ClusterConfig(replicas=4, router=router, workers=2).validate()
    ClusterConfig(replicas=1, router=router, workers=2).validate()  # one replica: nothing to split


def test_simultaneous_arrivals_merge_like_one_process(cost):
    """Every request at t = 0: all replicas start iterations at the same instants, so the merge of the
    workers' rows has ties in start time across workers (three of them here)."""
    w = synthetic(120, rate=60.0, prompt_lognormal=(200, 0.5), output_lognormal=(40, 0.5), seed=3)
    w.arrival_s[:] = 0.0
    base = dict(replicas=7, max_batch=8, kv_capacity_tokens=3000)
    one = simulate(w, cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.6), ClusterConfig(**base), seed=2)
    three = simulate(w, cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.6),
                     ClusterConfig(**base, workers=3), seed=2)
    pd.testing.assert_frame_equal(one.requests, three.requests, check_exact=True)
    pd.testing.assert_frame_equal(one.iterations, three.iterations, check_exact=True)
    starts = one.iterations.groupby("start_s")["replica"].nunique()
    assert starts.iloc[0] == 7  # the first iteration of every replica starts at 0


def test_merge_sorted_rows_equals_sorting_the_joined_rows():
    rng = np.random.default_rng(0)
    runs = []
    for lo in (0, 3, 5):  # replicas 0-2, 3-4, 5-7
        n = 500
        data = np.empty((len(ITERATION_COLUMNS), n))
        data[0] = rng.integers(0, 40, n) / 4  # coarse times: many ties within and across runs
        data[1] = rng.integers(lo, lo + 2 + (lo == 5), n)
        data[2:] = rng.integers(0, 100, (len(ITERATION_COLUMNS) - 2, n))
        runs.append(data)
    expected = iterations_frame(sort_rows(join_rows([r.copy() for r in runs])))
    merged = merge_sorted_rows([sort_rows(r.copy()) for r in runs])
    pd.testing.assert_frame_equal(merged, expected, check_exact=True)
    assert (np.diff(merged["start_s"]) >= 0).all()


def test_worker_hands_rows_over_as_a_file_or_itself(cost, tmp_path):
    """A worker saves its sorted rows where there is room and returns the path; with no such folder it
    returns the rows themselves (pickled back as before)."""
    w = synthetic(60, rate=20.0, prompt_lognormal=(100, 0.5), output_lognormal=(20, 0.5), seed=1)
    policy, acc = make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.7)
    policy.setup(cost, acc, 150.0)
    cluster = ClusterConfig(replicas=2, max_batch=8)
    seeds = np.random.SeedSequence(0).spawn(4)

    def run(spools):
        reqs = request_table(w, acc, cost.max_gamma, seeds[0])
        route = static_routes(reqs.rejected, "round_robin", 2, np.random.default_rng(0))
        return _group_worker(reqs, route, [0, 1], seeds[2:], cost, policy, acc, cluster, 3000, spools)

    state, rows, busy, caught = run([str(tmp_path)])
    assert isinstance(rows, str) and rows.startswith(str(tmp_path))
    full, roomy = tmp_path / "full", tmp_path / "roomy"
    full.mkdir(), roomy.mkdir()
    real_usage = shutil.disk_usage
    with pytest.MonkeyPatch.context() as mp:  # the first folder reports no room: the rows go to the second
        mp.setattr(shutil, "disk_usage", lambda d: real_usage(d)._replace(free=0) if str(d) == str(full) else real_usage(d))
        assert run([str(full), str(roomy)])[1].startswith(str(roomy))
        assert not any(full.iterdir())
    state2, inline, busy2, _ = run([])
    assert isinstance(inline, np.ndarray) and inline.shape[1] > 60
    np.testing.assert_array_equal(np.load(rows), inline)
    assert busy == busy2 and set(state) == set(RequestTable.STATE)
    np.testing.assert_array_equal(state["finished"], state2["finished"])
    assert not np.isnan(state["finished"]).any()


# --- workers die with their parent, and the spool folders go (issue #26, item 9) ------------------------------

KILL_SCRIPT = """
import sys, warnings
sys.path.insert(0, {tests!r})
from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import ClusterConfig, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.policies import make_policy
from specbatch.sim.profile import load_profile
from specbatch.sim.workload import synthetic
from pathlib import Path
warnings.simplefilter("ignore")
p = write_formula_profile(Path({tmp!r}) / "p", verify=linear_step(0.010, 0.0005, knee=64),
                          draft=linear_step(0.001, 0.00002), contexts=(128, 512))
cost = CostModel(load_profile(p), max_batch=8)
w = synthetic(400_000, rate=400.0, prompt_lognormal=(300, 0.9), output_lognormal=(60, 0.8), seed=5)
print("start", flush=True)
simulate(w, cost, make_policy("fixed", gamma=3), AcceptanceModel(alpha=0.7), ClusterConfig(replicas=4, workers=2,
         max_batch=8, fast_forward=False), seed=1)
print("finished", flush=True)
"""


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = [ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:")]
    except OSError:
        return False
    return bool(state) and "Z" not in state[0].split()[1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc to find the workers")
@pytest.mark.parametrize("sig", ["TERM", "KILL"])
def test_killing_the_parent_ends_its_workers_and_removes_the_spool_folders(tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    spool_bases = [Path("/dev/shm"), tmp_path / "tmp"]
    (tmp_path / "tmp").mkdir()
    before = {p for b in spool_bases if b.is_dir() for p in b.glob("specbatch-rows-*")}
    kids: set[int] = set()
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    try:
        assert proc.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # two workers and the resource tracker, and the spool folders
            kids |= _children(proc.pid)
            spools = {p for b in spool_bases if b.is_dir() for p in b.glob("specbatch-rows-*")} - before
            if len(kids) >= 3 and spools:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the run did not start its workers (children {kids})")
        time.sleep(2.0)  # the workers import and start simulating
        assert proc.poll() is None, "the run ended before it could be killed: make it longer"
        kids |= _children(proc.pid)
        proc.send_signal(getattr(signal, f"SIG{sig}"))
        proc.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (any(_alive(k) for k in kids) or any(p.exists() for p in spools)):
            time.sleep(0.2)
        assert [k for k in kids if _alive(k)] == [], "worker or resource-tracker processes outlived their parent"
        assert [p for p in spools if p.exists()] == [], "spool folders left behind"
        if sig == "TERM":
            assert proc.returncode == 128 + signal.SIGTERM  # SystemExit(143) after cleaning up, no traceback
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in kids | _children(proc.pid):  # a failing run's orphans
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
