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

**Parallel workers.** Under ``round_robin`` and ``random`` routing every request's replica is fixed before
the run (the router never looks at replica state), and replicas share nothing else: each has its own
random stream and its own copy of the policy. ``workers > 1`` then splits the replicas into that many
groups and simulates each group in its own process; the merged tables are identical to one process's
(same floats, same row order). The state-aware routers need every replica in one environment.
"""
from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import simpy

from .acceptance import AcceptanceModel
from .cost_model import CostModel, ExtrapolationWarning
from .profile import ProfileError
from .policies import Policy
from .simpy_adapter import URGENT, at_time
from .iterations import IterationLog, iterations_frame, merge_sorted_rows
from .replica import ATTENTION, PREFILL, Replica
from .requests import RequestTable
from .workload import Workload

ROUTERS = ("round_robin", "random", "least_outstanding", "least_kv")
STATE_FREE_ROUTERS = ("round_robin", "random")  # route from the request sequence alone


@dataclass
class ClusterConfig:
    """Cluster shape. ``kv_capacity_tokens`` overrides the profile's KV memory (tokens per replica)."""

    replicas: int = 1
    router: str = "round_robin"
    max_batch: int = 32  # the config's default (sim/config.py takes the cluster defaults from here)
    mode: str = "continuous"
    kv_capacity_tokens: int | None = None
    watermark: float = 0.01
    fast_forward: bool = True  # identical results either way; False steps one SimPy event per iteration
    workers: int = 1  # processes simulating disjoint replica groups (state-free routers); identical results
    draft_sync: bool = False  # γ = 0 iterations also run a draft decode when the policy drafts (as vLLM does)
    attention: str = "paged"  # a step's context: the batch's mean ("paged") or its longest sequence's ("padded")
    prefill: str = "sequential"  # an iteration's admitted prompts: one forward each, or "batched" in one forward,
    #                              or "chunked": split into chunks mixed with the verify step under a token budget
    max_num_batched_tokens: int = 2048  # chunked: tokens per forward, verify b·(γ+1) first (vLLM's name and default)
    long_prefill_token_threshold: int | None = None  # chunked: most prompt tokens one request gets per forward

    def validate(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, (int, np.integer)) or self.replicas < 1:
            raise ValueError(f"cluster.replicas is {self.replicas!r}; expected an integer ≥ 1")
        if self.router not in ROUTERS:
            raise ValueError(f"cluster.router is {self.router!r}; expected one of {list(ROUTERS)}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, (int, np.integer)) or self.max_batch < 1:
            raise ValueError(f"cluster.max_batch is {self.max_batch!r}; expected an integer ≥ 1")
        if self.mode not in ("continuous", "static"):
            raise ValueError(f"cluster.mode is {self.mode!r}; expected 'continuous' or 'static'")
        kv = self.kv_capacity_tokens
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, (int, np.integer, float, np.floating))
                               or not np.isfinite(kv) or not kv >= 2 or kv != int(kv)):
            raise ValueError(f"cluster.kv_capacity_tokens is {kv!r}; expected an integer ≥ 2 (tokens) or null")
        wm = self.watermark
        if isinstance(wm, bool) or not isinstance(wm, (int, float, np.integer, np.floating)) or not 0 <= wm < 1:
            raise ValueError(f"cluster.watermark is {wm!r}; expected a fraction in [0, 1)")
        if not isinstance(self.fast_forward, (bool, np.bool_)):
            raise ValueError(f"cluster.fast_forward is {self.fast_forward!r}; expected true or false")
        if not isinstance(self.draft_sync, (bool, np.bool_)):
            raise ValueError(f"cluster.draft_sync is {self.draft_sync!r}; expected true or false")
        if self.attention not in ATTENTION:
            raise ValueError(f"cluster.attention is {self.attention!r}; expected one of {list(ATTENTION)}")
        if self.prefill not in PREFILL:
            raise ValueError(f"cluster.prefill is {self.prefill!r}; expected one of {list(PREFILL)}")
        self._validate_chunked()
        if isinstance(self.workers, bool) or not isinstance(self.workers, (int, np.integer)) or self.workers < 1:
            raise ValueError(f"cluster.workers is {self.workers!r}; expected an integer ≥ 1")
        if self.workers > 1 and self.replicas > 1 and self.router not in STATE_FREE_ROUTERS:
            raise ValueError(f"cluster.workers is {self.workers} but router {self.router!r} looks at every replica's "
                             f"state, so all replicas must share one process: use workers: 1, or a router from "
                             f"{list(STATE_FREE_ROUTERS)}")

    def _validate_chunked(self) -> None:
        """The chunked-prefill keys: a token budget of at least one token per running sequence (as vLLM
        requires max_num_batched_tokens ≥ max_num_seqs), a threshold of at least one token, or null."""
        budget, cap = self.max_num_batched_tokens, self.long_prefill_token_threshold
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
            raise ValueError(f"cluster.max_num_batched_tokens is {budget!r}; expected an integer ≥ 1 (tokens per forward)")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1):
            raise ValueError(f"cluster.long_prefill_token_threshold is {cap!r}; expected an integer ≥ 1 (tokens) or null")
        if self.prefill == "chunked":
            if self.mode != "continuous":
                raise ValueError(f"cluster.prefill is 'chunked' but cluster.mode is {self.mode!r}; chunked prefill "
                                 "needs cluster.mode=continuous")
            if isinstance(self.max_batch, (int, np.integer)) and budget < self.max_batch:
                raise ValueError(f"cluster.max_num_batched_tokens is {budget}, below cluster.max_batch "
                                 f"{self.max_batch}; every running sequence needs at least one token per forward")


def kv_capacity_tokens(cost: CostModel, policy: Policy, cfg: ClusterConfig) -> int:
    """Tokens of context one replica can hold: KV memory / (target + drafter KV bytes per token; the drafter's
    is the draft model's, one EAGLE layer's, or 0 for ngram: :meth:`Drafter.kv_bytes_per_token`)."""
    if cfg.kv_capacity_tokens is not None:
        return int(cfg.kv_capacity_tokens)
    p = cost.profile
    per_token = p.kv_bytes_per_token("target") + (cost.drafter.kv_bytes_per_token(p) if policy.uses_draft else 0)
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
    """The requests' mean mid-life context (tokens): mean prompt plus half the mean output."""
    return float(workload.prompt_tokens.mean() + workload.output_tokens.mean() / 2)


def charged_context(workload: Workload, attention: str = "paged", max_batch: int = 1) -> float | np.ndarray:
    """The context (tokens) a step is charged at, on average, for the policies' offline tables.

    ``paged``: :func:`mean_context`, one number for every batch size. ``padded``: one per batch size
    b = 1..``max_batch``, the expected longest of b mid-life contexts (prompt plus half the output) drawn
    at random from the workload's requests, E[max] = Σ_k x_k·(F_k^b − F_(k−1)^b) over the distinct contexts
    x_k in ascending order with cumulative fractions F_k; at b = 1 that is the mean context."""
    if attention == "paged":
        return mean_context(workload)
    if attention not in ATTENTION:
        raise ValueError(f"attention is {attention!r}; expected one of {list(ATTENTION)}")
    x, counts = np.unique(workload.prompt_tokens + workload.output_tokens / 2, return_counts=True)
    f = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    b = np.arange(1, max_batch + 1)
    return x @ np.diff(f[:, None] ** b[None, :], axis=0)


def charged_cost(cost: CostModel, policy: Policy, cluster: ClusterConfig) -> CostModel:
    """The cost model :func:`simulate` charges ``policy``'s iterations with: with ``cluster.draft_sync``, a
    drafting policy's γ = 0 iterations also cost one draft decode (:meth:`CostModel.with_draft_sync`) — for
    drafters that keep KV (draft_model, eagle); an ngram proposer has none to keep in step."""
    sync = cluster.draft_sync and policy.uses_draft and cost.drafter.per_token
    return cost.with_draft_sync() if sync else cost


def simulate(workload: Workload, cost: CostModel, policy: Policy, acceptance: AcceptanceModel,
             cluster: ClusterConfig | None = None, seed: int = 0, reference_context=None) -> SimResult:
    """Replay ``workload`` through the cluster and return the results. Same inputs and seed → same result.
    ``reference_context``: the policies' offline tables' context (tokens; a number or one per batch size),
    default :func:`charged_context` under ``cluster.attention``."""
    cluster = cluster or ClusterConfig()
    cluster.validate()
    if cluster.max_batch > cost.max_batch:
        raise ValueError(f"cluster.max_batch {cluster.max_batch} exceeds the cost model's max_batch {cost.max_batch}")
    if len(workload) == 0:
        raise ValueError("the workload has no requests")
    cost = charged_cost(cost, policy, cluster)
    if cost.drafter.partial and cluster.prefill == "chunked":
        raise ValueError("drafter.kind=ngram with cluster.prefill=chunked is not modelled (a mixed forward is priced "
                         "at full proposals); use cluster.prefill=sequential or batched")
    if cluster.prefill == "batched":
        for model in ("target", "draft") if policy.uses_draft and cost.drafter.prefill else ("target",):
            if not cost.has_prefill_batches(model):
                raise ProfileError(f"{cost.profile.path}/steps.csv: cluster.prefill=batched needs ok prefill rows for "
                                   f"model={model} at two or more batch sizes and prompt lengths (profile with "
                                   "grid.prefill_batches), or cluster.prefill=sequential")
    if cluster.prefill == "chunked":
        check_chunked_cost(cost, policy)
    seeds = np.random.SeedSequence(seed).spawn(cluster.replicas + 2)
    reqs = request_table(workload, acceptance, cost.max_gamma, seeds[0])
    if reference_context is None:
        reference_context = charged_context(workload, cluster.attention, cost.max_batch)
    policy.setup(cost, acceptance, reference_context)
    capacity = kv_capacity_tokens(cost, policy, cluster)

    too_big = (reqs.prompt + reqs.output) > capacity
    reqs.rejected[:] = too_big
    route = static_routes(reqs.rejected, cluster.router, cluster.replicas, np.random.default_rng(seeds[1]))
    groups = np.array_split(np.arange(cluster.replicas), min(cluster.workers, cluster.replicas))
    setup = (cost, policy, acceptance, cluster, capacity)
    if len(groups) == 1:
        data, busy = _simulate_group(reqs, route, list(range(cluster.replicas)), seeds[2:], *setup)
        iterations = iterations_frame(data)
    else:
        iterations, busy = _simulate_groups(reqs, route, groups, seeds[2:], *setup)

    unfinished = np.flatnonzero(np.isnan(reqs.finished) & ~reqs.rejected)
    if len(unfinished):  # a defect, never an expected outcome: every admitted request must finish
        raise RuntimeError(f"simulation ended with {len(unfinished)} unfinished requests (first id {unfinished[0]})")
    fin = reqs.finished[~reqs.rejected]
    makespan = float(np.nanmax(fin)) if len(fin) else 0.0
    return SimResult(requests=reqs.frame(), iterations=iterations, busy_s=busy,
                     makespan_s=makespan, kv_capacity_tokens=capacity, policy=policy.describe())


def check_chunked_cost(cost: CostModel, policy: Policy) -> None:
    """``cluster.prefill=chunked`` prices mixed iterations with :meth:`CostModel.mixed_iteration`: the cost
    model must have it, and the profile prefill rows at two or more lengths and measured mixed forwards
    (:func:`check_mixed_rows`) for the target (and the draft when ``policy`` drafts); else a
    :class:`ProfileError` naming the file and the rows."""
    if not hasattr(cost, "mixed_iteration"):
        raise ProfileError(f"{cost.profile.path}: cluster.prefill=chunked needs a cost model with mixed_iteration "
                           f"({type(cost).__name__} has none); use cluster.prefill=sequential")
    drafter = getattr(cost, "drafter", None)
    if policy.uses_draft and drafter is not None and getattr(drafter, "partial", False):
        raise ProfileError(f"{cost.profile.path}: cluster.prefill=chunked does not price a partial proposer's "
                           "steps yet (the drafter proposes for only some sequences); use cluster.prefill=sequential "
                           "or batched with this drafter")
    prefills = policy.uses_draft and getattr(drafter, "prefill", True)
    for model in ("target", "draft") if prefills else ("target",):
        cost.mixed_rule(model)
        check_mixed_rows(cost.profile, model)


def check_mixed_rows(profile, model: str = "target") -> None:
    """A :class:`ProfileError` unless ``profile`` has measured mixed forwards (``mixed.csv``, ok rows for
    ``model``): the rows that show how far the mixed-iteration rule is off for this device and pair."""
    mixed = profile.mixed
    if mixed is not None and ((mixed["model"] == model) & (mixed["status"] == "ok")).any():
        return
    have = "has no mixed.csv" if mixed is None else f"has no ok model={model} rows in mixed.csv"
    raise ProfileError(f"{profile.path}: cluster.prefill=chunked needs measured mixed forwards (verify and a prompt "
                       f"chunk in one forward), and this profile {have}; add them with `specbatch-profile mode=mixed "
                       f"out_dir={profile.path.parent} name={profile.path.name}` (the profile's pair, dtype and "
                       "threads), or use cluster.prefill=sequential")


def static_routes(rejected: np.ndarray, router: str, replicas: int, rng: np.random.Generator) -> np.ndarray | None:
    """Each request's replica (-1: rejected) for a router that ignores replica state, else ``None``.
    ``round_robin`` counts only served requests; ``random`` draws one integer per request from ``rng``."""
    if router == "round_robin":
        route = np.full(len(rejected), -1, np.int64)
        served = ~rejected
        route[served] = np.arange(int(served.sum())) % replicas
        return route
    if router == "random":
        route = rng.integers(0, replicas, len(rejected))
        route[rejected] = -1
        return route
    return None


def _simulate_group(reqs: RequestTable, route: np.ndarray | None, indices: list[int],
                    seeds: list[np.random.SeedSequence], cost: CostModel, policy: Policy, acceptance: AcceptanceModel,
                    cluster: ClusterConfig, capacity: int) -> tuple[np.ndarray, list[float]]:
    """Run replicas ``indices`` (seeded from ``seeds[index]``) over ``reqs`` in one SimPy environment; every
    request in ``reqs`` is either rejected or routed to one of them. Returns the iteration rows, sorted
    (:func:`sort_rows`), and each replica's busy seconds."""
    env = simpy.Environment()
    log = IterationLog()
    # Each replica gets its own copy of the (set-up) policy, so online state is per replica.
    replicas = {i: Replica(env, i, reqs, cost, copy.deepcopy(policy), acceptance, np.random.default_rng(seeds[i]), log,
                           max_batch=cluster.max_batch, kv_capacity_tokens=capacity, watermark=cluster.watermark,
                           mode=cluster.mode, fast_forward=cluster.fast_forward, attention=cluster.attention,
                           prefill=cluster.prefill, token_budget=cluster.max_num_batched_tokens,
                           chunk_cap=cluster.long_prefill_token_threshold)
                for i in indices}
    env.process(_arrivals(env, reqs, replicas, cluster.router, route))
    env.run()
    return log.data(sort=True), [replicas[i].busy_s for i in indices]


def _group_worker(reqs, route, indices, seeds, cost, policy, acceptance, cluster, capacity, spools):
    """:func:`_simulate_group` in a worker process. Returns the requests' state (:meth:`RequestTable.state`),
    the iteration rows sorted (:func:`sort_rows`) — saved as a ``.npy`` file in the first of the folders
    ``spools`` with room for them, its path returned (the parent reads it mapped, instead of receiving a
    pickled copy through a pipe), or the matrix itself when none has room —, the busy seconds and the
    warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data, busy = _simulate_group(reqs, route, indices, seeds, cost, policy, acceptance, cluster, capacity)
    rows = data
    for folder in spools:
        if shutil.disk_usage(folder).free < data.nbytes + (64 << 20):
            continue
        path = os.path.join(folder, f"rows-{indices[0]}.npy")
        try:
            np.save(path, data)
        except OSError:  # filled up meanwhile: try the next folder
            if os.path.exists(path):
                os.remove(path)
            continue
        rows = path
        break
    return reqs.state(), rows, busy, [(w.category, str(w.message)) for w in caught]


def _remove_spools(spools: list[str]) -> None:
    for folder in spools:
        shutil.rmtree(folder, ignore_errors=True)


def _worker_init(parent: int, spools: list[str]) -> None:
    """Initializer of a group worker: it must not outlive the process that started it (``parent``).

    On Linux the kernel sends the worker SIGTERM when the parent dies, however it dies (``kill -9``
    included: PR_SET_PDEATHSIG); elsewhere, and for a parent that died before that was set, a daemon thread
    polls the parent's pid once a second. Either way the worker removes the spool folders (the parent
    could not, if it was killed) and exits at once. Every SIGTERM removes them: the kernel sends the signal
    when the parent's *thread* that spawned the worker dies, and during a ``kill -9`` that thread can die
    before the rest of the parent, so the worker may still see its parent alive (reparented to a sibling
    thread); a SIGTERM from a living parent comes only when it is ending its workers on failure, and it
    removes the folders too."""
    import signal
    import sys
    import threading
    import time

    def orphaned() -> bool:
        return os.getppid() != parent

    def leave(*_):
        _remove_spools(spools)
        os._exit(1)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch():
        while not orphaned():
            time.sleep(1.0)
        _remove_spools(spools)
        os._exit(1)

    if orphaned():
        leave()
    threading.Thread(target=watch, name="specbatch-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _terminate_raises_system_exit():
    """While the body runs, SIGTERM raises :class:`SystemExit` in the main thread (so ``finally`` blocks and
    context managers run: the workers are ended and the spool folders removed) — unless the program has set
    its own SIGTERM handler or this is not the main thread, where nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _spool_folders(stack: contextlib.ExitStack) -> list[str]:
    """Fresh temporary folders, removed when ``stack`` closes, for workers' iteration rows: one in
    ``/dev/shm`` (memory) where there is one, then one in the default temporary folder."""
    out = []
    for base in ("/dev/shm", None):
        if base is not None and not (os.path.isdir(base) and os.access(base, os.W_OK)):
            continue
        try:
            out.append(stack.enter_context(tempfile.TemporaryDirectory(prefix="specbatch-rows-", dir=base,
                                                                       ignore_cleanup_errors=True)))
        except OSError:
            continue
    return out


def _simulate_groups(reqs: RequestTable, route: np.ndarray, groups: list[np.ndarray], seeds, cost: CostModel,
                     policy: Policy, acceptance: AcceptanceModel, cluster: ClusterConfig,
                     capacity: int) -> tuple[pd.DataFrame, list[float]]:
    """:func:`_simulate_group` for each replica group (ascending, contiguous indices) in its own process (fresh
    interpreters: ``spawn``); request state is written back into ``reqs``. Returns the iterations table, rows
    in start-time, replica order (the groups' sorted rows merged, :func:`merge_sorted_rows`), and each
    replica's busy seconds."""
    jobs = []
    for g in groups:
        ids = np.flatnonzero(np.isin(route, g))
        sub_route = route[ids]
        jobs.append((ids, (reqs.subset(ids), sub_route, g.tolist(), seeds, cost, policy, acceptance, cluster, capacity)))
    busy: list[float] = []
    runs = []
    seen: set[str] = set()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_terminate_raises_system_exit())
        spools = _spool_folders(stack)
        before = set(multiprocessing.active_children())
        pool = ProcessPoolExecutor(max_workers=len(groups), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(), spools))

        def end_pool(exc_type, exc, tb):
            if exc_type is None:
                pool.shutdown(wait=True)
                return
            # Failing or interrupted (SIGTERM, Ctrl-C, a worker's error): end the workers now rather than
            # waiting for their groups to finish; the spool folders go when the stack closes.
            workers = [p for p in multiprocessing.active_children() if p not in before]
            for w in workers:
                w.terminate()
            for w in workers:
                w.join(5)
                if w.is_alive():
                    w.kill()
            pool.shutdown(wait=False, cancel_futures=True)

        stack.push(end_pool)
        futures = [pool.submit(_group_worker, *args, spools) for _, args in jobs]
        for (ids, _), fut in zip(jobs, futures):
            state, rows, group_busy, caught = fut.result()
            reqs.update(ids, state)
            if isinstance(rows, str):  # mapped, then unlinked at once: the memory goes when the map does
                path, rows = rows, np.load(rows, mmap_mode="r")
                os.remove(path)
            runs.append(rows)
            busy += group_busy
            for category, message in caught:  # re-issued here, once each (the cost model warns once)
                if message not in seen and not (issubclass(category, ExtrapolationWarning) and cost.warned):
                    seen.add(message)
                    if issubclass(category, ExtrapolationWarning):
                        cost.warned = True
                    warnings.warn(message, category, stacklevel=3)
        frame = merge_sorted_rows(runs)
    return frame, busy


def _arrivals(env: simpy.Environment, reqs: RequestTable, replicas: dict[int, Replica], router: str,
              route: np.ndarray | None):
    """Dispatch requests at their arrival times (one wake-up per distinct arrival time): to ``route[rid]``
    when the routes are fixed in advance, else by the state-aware ``router`` over ``replicas``."""
    t = reqs.arrival
    n = len(t)
    # Group simultaneous arrivals: boundaries where the time changes.
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]]).tolist()
    starts.append(n)
    times = t.tolist()
    rejected = reqs.rejected
    fixed = None if route is None else route.tolist()
    pool = list(replicas.values())
    for g in range(len(starts) - 1):
        lo, hi = starts[g], starts[g + 1]
        if times[lo] > env.now:
            yield at_time(env, times[lo], URGENT)  # before any iteration starting then
        for rid in range(lo, hi):
            if rejected[rid]:
                continue
            if fixed is not None:
                target = replicas[fixed[rid]]
            elif router == "least_outstanding":
                target = min(pool, key=lambda r: r.outstanding)
            else:
                target = min(pool, key=lambda r: r.kv_in_use() + r.queued_tokens)
            target.submit(rid)
