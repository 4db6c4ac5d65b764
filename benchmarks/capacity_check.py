"""Does ``workload.load`` mean utilisation? Load asked vs the busy fraction measured.

    python benchmarks/capacity_check.py                       # both Azure traces, paged and padded, 0.3-0.9
    python benchmarks/capacity_check.py --loads 0.5 0.8 --traces azure_conv --first-n 1000

Each cell is one ``specbatch-sim`` run composed exactly as the CLI composes it (shipped profile, one
replica, ``cluster.max_batch`` 32, the trace's first ``--first-n`` requests, ``workload.load`` = the
load asked), under ``policy=none`` (no speculation: what the capacity estimate models) and
``policy=adaptive``. "busy" is the replica's busy fraction as ``summary.json`` reports it (time in
iterations / makespan); "busy@arr" is the busy time inside the arrival window (first to last arrival)
over that window, which leaves out the drain after the last arrival. The goal for ``policy=none`` is
busy within ±10 % (relative) of the load asked at loads 0.3-0.9; a speculating policy is expected to be
less busy at the same traffic (it serves the same requests in fewer, dearer steps).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np


AZURE = {"arrival": "TIMESTAMP", "prompt": "ContextTokens", "output": "GeneratedTokens"}
TRACES = {"azure_conv": "azure/AzureLLMInferenceTrace_conv.csv", "azure_code": "azure/AzureLLMInferenceTrace_code.csv"}


def one_run(cost, trace, attention: str, policy: str, load: float, max_batch: int):
    """What ``specbatch-sim workload=<trace> policy=<policy> cluster.attention=<attention> workload.load=<load>``
    does with the shipped profile (acceptance α = 0.7): the rate from :func:`rate_for_load`, then simulate."""
    from specbatch.sim.acceptance import AcceptanceModel
    from specbatch.sim.capacity import rate_for_load
    from specbatch.sim.cluster import ClusterConfig, simulate
    from specbatch.sim.metrics import summarize
    from specbatch.sim.policies import make_policy
    from specbatch.sim.workload import set_rate

    cluster = ClusterConfig(replicas=1, max_batch=max_batch, attention=attention)
    w = set_rate(trace, rate_for_load(cost, trace, cluster, load))
    r = simulate(w, cost, make_policy(policy), AcceptanceModel(alpha=0.7, max_gamma=cost.max_gamma), cluster, seed=0)
    return w, r, summarize(r, 10.0, 0.5)


def busy_in_arrival_window(w, r) -> float:
    it = r.iterations
    t0, t1 = float(w.arrival_s[0]), float(w.arrival_s[-1])
    start = it["start_s"].to_numpy()
    end = start + it["prefill_s"].to_numpy() + it["step_s"].to_numpy()
    inside = np.clip(np.minimum(end, t1) - np.maximum(start, t0), 0, None).sum()
    return float(inside / (len(r.busy_s) * (t1 - t0)))


def main(argv=None) -> int:
    from specbatch import traces_dir
    from specbatch.sim.cost_model import CostModel
    from specbatch.sim.profile import load_profile
    from specbatch.sim.run import resolve_profile
    from specbatch.sim.workload import first_n, load_trace

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", nargs="+", default=["azure_conv", "azure_code"])
    p.add_argument("--attention", nargs="+", default=["paged", "padded"])
    p.add_argument("--policies", nargs="+", default=["none", "adaptive"])
    p.add_argument("--loads", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--first-n", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--profile", default="default")
    a = p.parse_args(argv)
    cost = CostModel(load_profile(resolve_profile(a.profile)), max_batch=a.max_batch, max_gamma=8)
    print(f"{'trace':>11} {'attention':>9} {'load':>5} " + " ".join(
        f"{pol + ' busy':>14} {'busy@arr':>8} {'dev':>6}" for pol in a.policies) + f" {'unservable':>10}")
    worst = 0.0
    t = time.perf_counter()
    for trace in a.traces:
        w0 = load_trace(traces_dir() / TRACES[trace], AZURE, "datetime")
        w0 = first_n(w0, a.first_n) if a.first_n else w0
        for attention in a.attention:
            for load in a.loads:
                cells = []
                rejected = 0
                for pol in a.policies:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        w, r, summary = one_run(cost, w0, attention, pol, load, a.max_batch)
                    busy = summary["busy_fraction_mean"]
                    arr = busy_in_arrival_window(w, r)
                    dev = busy / load - 1
                    if pol == "none":
                        worst = max(worst, abs(dev))
                    rejected = int(r.requests["rejected"].sum())
                    cells.append(f"{100 * busy:13.1f}% {100 * arr:7.1f}% {100 * dev:+5.0f}%")
                print(f"{trace:>11} {attention:>9} {load:5.2f} " + " ".join(cells) + f" {rejected:10d}", flush=True)
    print(f"worst |busy/load - 1| under policy=none: {100 * worst:.1f} % ({time.perf_counter() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
