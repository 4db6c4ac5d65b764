"""Simulator speed: simulated requests per wall-second, and a 1M-request, 64-replica run.

    python benchmarks/sim_speed.py                 # both parts, shipped default profile
    python benchmarks/sim_speed.py --skip-large    # only the 10k-request part
    python benchmarks/sim_speed.py --large-requests 200000

Part 1 replays the first 10,000 requests of the Azure conversation trace on one replica with γ = 4
(policy fixed) and with the adaptive table, at three loads: the trace's own arrival rate (on a small
profiled device this saturates the replica, so batches stay full) and 0.9 and 0.5 of the estimated
no-speculation capacity (smaller batches, so more iterations per request). Each is timed `--repeats`
times, interleaved with the baseline — the same run stepping one SimPy event per iteration
(``fast_forward=False``), whose results must be identical; medians are reported, with the ratio to the
goal (10,000 simulated requests per wall-second) and the speed-up over the baseline.

Part 1b (chunked prefill, issue #24) times the same runs with ``cluster.prefill=chunked`` (budget 2048, vLLM's
default) against ``cluster.prefill=sequential``, interleaved, and reports the medians and their ratio (goal:
chunked ≤ 2× sequential; fast-forward applies only while no prompt is being chunked or admissible).

Part 2 runs, in a fresh subprocess so its peak memory is its own, 1M requests with the conversation
trace's (prompt, output) pairs resampled, Poisson arrivals at 0.8 of the capacity of 64 replicas,
round-robin routing, γ = 4, and reports wall time and peak RSS. Goal: ≤ 120 s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np

from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.capacity import estimate_capacity
from specbatch.sim.cluster import ClusterConfig, simulate
from specbatch.sim.cost_model import CostModel
from specbatch.sim.policies import make_policy
from specbatch.sim.profile import load_profile
from specbatch.sim.run import resolve_profile
from specbatch.sim.workload import first_n, load_trace, set_rate, synthetic
from specbatch import traces_dir

AZURE = {"arrival": "TIMESTAMP", "prompt": "ContextTokens", "output": "GeneratedTokens"}


def conv_trace():
    return load_trace(traces_dir() / "azure/AzureLLMInferenceTrace_conv.csv", AZURE, "datetime")


def cluster_workload(n: int, cost, cluster, lengths):
    """``n`` requests with ``lengths``' (prompt, output) pairs resampled, Poisson at 0.8 of ``cluster``'s capacity."""
    w = synthetic(n, rate=1.0, lengths_from=lengths, seed=0, name="conv-resampled")
    return set_rate(w, 0.8 * estimate_capacity(cost, w, cluster))


def timed(w, cost, policy, cluster, seed=0):
    t = time.perf_counter()
    r = simulate(w, cost, make_policy(policy[0], **policy[1]), AcceptanceModel(alpha=0.7), cluster, seed=seed)
    return time.perf_counter() - t, r


def load_levels(w, cap: float) -> tuple:
    """(label, workload) at the trace's own rate and at 0.9 and 0.5 of the capacity ``cap`` (requests/s)."""
    return (("trace rate", w), ("0.9 capacity", set_rate(w, 0.9 * cap)), ("0.5 capacity", set_rate(w, 0.5 * cap)))


def part1(cost, repeats: int) -> None:
    w10k = first_n(conv_trace(), 10_000)
    fast, step = ClusterConfig(replicas=1, max_batch=32), ClusterConfig(replicas=1, max_batch=32, fast_forward=False)
    cap = estimate_capacity(cost, w10k, fast)
    print(f"10,000 Azure conv requests, 1 replica, max_batch 32, capacity ≈ {cap:.3g} req/s; median of {repeats}")
    print("baseline: the same run stepping one SimPy event per iteration (cluster.fast_forward=false)")
    print(f"{'load':>14} {'policy':>10} {'wall s':>8} {'sim req/s':>10} {'iters':>8} {'mean batch':>10} "
          f"{'vs goal':>8} {'baseline s':>10} {'speed-up':>8}")
    for label, w in load_levels(w10k, cap):
        for policy in (("fixed", {"gamma": 4}), ("adaptive", {})):
            walls, base = [], []
            for _ in range(repeats):  # interleaved, so drifts in machine speed hit both alike
                t, r = timed(w, cost, policy, fast)
                walls.append(t)
                tb, rb = timed(w, cost, policy, step)
                base.append(tb)
            if not r.requests.equals(rb.requests):
                raise SystemExit(f"{label}: fast-forward and one-event-per-iteration runs differ (a defect)")
            wall, b = statistics.median(walls), statistics.median(base)
            name = policy[0] + (f" {policy[1]['gamma']}" if policy[1] else "")
            print(f"{label:>14} {name:>10} {wall:8.2f} {len(w) / wall:10.0f} {len(r.iterations):8d} "
                  f"{float(r.iterations['batch'].mean()):10.1f} {len(w) / wall / 10_000:8.2f} {b:10.2f} {b / wall:8.2f}")


def part1_chunked(cost, repeats: int) -> None:
    w10k = first_n(conv_trace(), 10_000)
    seq = ClusterConfig(replicas=1, max_batch=32)
    chunked = ClusterConfig(replicas=1, max_batch=32, prefill="chunked", max_num_batched_tokens=2048)
    cap = estimate_capacity(cost, w10k, seq)
    print(f"\nchunked prefill (budget 2048) vs sequential prefill, same 10,000 requests; median of {repeats}")
    print("wall and CPU seconds (CPU: this process's, less sensitive to other load on the machine)")
    print(f"{'load':>14} {'policy':>10} {'seq wall':>9} {'chunked':>8} {'ratio':>6} {'seq CPU':>8} {'chunked':>8} "
          f"{'ratio':>6} {'iters seq':>10} {'chunked':>8} {'stepped':>8}")
    for label, w in load_levels(w10k, cap):
        for policy in (("fixed", {"gamma": 4}), ("adaptive", {})):
            runs = {"seq": ([], []), "chunked": ([], [])}
            for _ in range(repeats):  # interleaved
                for key, cl in (("seq", seq), ("chunked", chunked)):
                    c = time.process_time()
                    t, r = timed(w, cost, policy, cl)
                    runs[key][0].append(t)
                    runs[key][1].append(time.process_time() - c)
                    runs[key] += (r,) if len(runs[key]) == 2 else ()
            (sw, sc), (cw, cc) = [(statistics.median(runs[k][0]), statistics.median(runs[k][1])) for k in runs]
            rs, rc = runs["seq"][2], runs["chunked"][2]
            stepped = int((rc.iterations["prefill_s"] > 0).sum())  # iterations with a chunk: never fast-forwarded
            name = policy[0] + (f" {policy[1]['gamma']}" if policy[1] else "")
            print(f"{label:>14} {name:>10} {sw:9.2f} {cw:8.2f} {cw / sw:6.2f} {sc:8.2f} {cc:8.2f} {cc / sc:6.2f} "
                  f"{len(rs.iterations):10d} {len(rc.iterations):8d} {stepped:8d}")


def part2_child(n: int, profile: str, workers: int) -> None:
    cost = CostModel(load_profile(resolve_profile(profile)), max_batch=32)
    cluster = ClusterConfig(replicas=64, max_batch=32, workers=workers)
    w = cluster_workload(n, cost, cluster, conv_trace())
    t = time.perf_counter()
    r = simulate(w, cost, make_policy("fixed", gamma=4), AcceptanceModel(alpha=0.7), cluster, seed=0)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker's
    done = int(r.requests["finished_s"].notna().sum())
    print(json.dumps({"requests": n, "workers": workers, "completed": done, "wall_s": wall, "peak_rss_mib": peak,
                      "worker_peak_rss_mib": worker_peak,
                      "iterations": len(r.iterations), "mean_batch": float(r.iterations["batch"].mean())}))


def child(n: int, profile: str, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(n), "--profile", profile, "--workers", str(workers)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def part2(n: int, profile: str, workers: int, ratio_requests: int) -> None:
    print(f"\n64 replicas, γ = 4, conv lengths resampled, Poisson at 0.8 capacity, round robin; {workers} worker(s)")
    if workers > 1 and ratio_requests:
        one, many = child(ratio_requests, profile, 1), child(ratio_requests, profile, workers)
        print(f"  {ratio_requests:,} requests: 1 process {one['wall_s']:.1f} s, {workers} workers {many['wall_s']:.1f} s "
              f"({one['wall_s'] / many['wall_s']:.2f}× faster)")
    res = child(n, profile, workers)
    print(f"  {res['requests']:,} requests: wall {res['wall_s']:.1f} s ({res['requests'] / res['wall_s']:,.0f} sim req/s; "
          f"goal ≤ 120 s: {120 / res['wall_s']:.2f}× margin), peak RSS {res['peak_rss_mib']:.0f} MiB "
          f"(largest worker {res['worker_peak_rss_mib']:.0f} MiB), {res['iterations']:,} iterations, "
          f"mean batch {res['mean_batch']:.1f}, completed {res['completed']:,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--only-chunked", action="store_true", help="only part 1b (chunked vs sequential prefill)")
    ap.add_argument("--large-requests", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes for part 2 (cluster.workers; default: this machine's CPUs)")
    ap.add_argument("--ratio-requests", type=int, default=100_000,
                    help="part 2 also times this many requests with 1 process and with --workers (0: skip)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    if a.child:
        part2_child(a.child, a.profile, a.workers)
        return
    profile = load_profile(resolve_profile(a.profile))
    print(f"profile: {profile.name} ({profile.meta['device'].get('name')}); numpy {np.__version__}")
    if a.only_chunked:
        part1_chunked(CostModel(profile, max_batch=32), a.repeats)
        return
    part1(CostModel(profile, max_batch=32), a.repeats)
    part1_chunked(CostModel(profile, max_batch=32), a.repeats)
    if not a.skip_large:
        part2(a.large_requests, a.profile, a.workers, a.ratio_requests)


if __name__ == "__main__":
    main()
