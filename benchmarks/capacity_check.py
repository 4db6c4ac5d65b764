"""What does ``workload.load`` give? Load asked, predicted and measured busy fraction, and the capacity.

    python benchmarks/capacity_check.py                       # both Azure traces, paged and padded
    python benchmarks/capacity_check.py --loads 0.5 0.8 --traces azure_conv --first-n 1000

Each cell is one ``specbatch-sim`` run composed exactly as the CLI composes it (shipped profile, one
replica, ``cluster.max_batch`` 32, the trace's first ``--first-n`` requests, ``workload.load`` = the
load asked: that fraction of the estimated saturation rate), under ``policy=none`` (no speculation: what
the capacity model describes) and ``policy=adaptive``. "pred" is :func:`specbatch.sim.capacity.predicted_busy`
at that rate; "busy" is the replica's busy fraction as ``summary.json`` reports it (time in iterations /
makespan); "batch" the time-weighted mean batch; "served/cap" the requests served per second (first arrival
to last finish) over the estimated capacity, which tends to 1 in overload (load ≥ 1). A speculating policy
is expected to be less busy at the same traffic (it serves the same requests in fewer, dearer steps).
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
    from specbatch.sim.capacity import estimate_capacity, predicted_busy
    from specbatch.sim.cluster import ClusterConfig
    from specbatch.sim.cost_model import CostModel
    from specbatch.sim.profile import load_profile
    from specbatch.sim.run import resolve_profile
    from specbatch.sim.workload import first_n, load_trace

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", nargs="+", default=["azure_conv", "azure_code"])
    p.add_argument("--attention", nargs="+", default=["paged", "padded"])
    p.add_argument("--policies", nargs="+", default=["none", "adaptive"])
    p.add_argument("--loads", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9, 1.5, 3.0])
    p.add_argument("--first-n", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--profile", default="default")
    a = p.parse_args(argv)
    cost = CostModel(load_profile(resolve_profile(a.profile)), max_batch=a.max_batch, max_gamma=8)
    print(f"{'trace':>11} {'attention':>9} {'load':>5} {'pred':>6} " + " ".join(
        f"{pol + ' busy':>14} {'batch':>6} {'served/cap':>10}" for pol in a.policies) + f" {'unservable':>10}")
    worst = 0.0
    t = time.perf_counter()
    for trace in a.traces:
        w0 = load_trace(traces_dir() / TRACES[trace], AZURE, "datetime")
        w0 = first_n(w0, a.first_n) if a.first_n else w0
        for attention in a.attention:
            cluster = ClusterConfig(replicas=1, max_batch=a.max_batch, attention=attention)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cap = estimate_capacity(cost, w0, cluster)
            for load in a.loads:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pred = predicted_busy(cost, w0, cluster, load * cap)
                cells = []
                rejected = 0
                for pol in a.policies:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        w, r, summary = one_run(cost, w0, attention, pol, load, a.max_batch)
                    busy = summary["busy_fraction_mean"]
                    it, req = r.iterations, r.requests
                    batch = float((it["batch"] * it["step_s"]).sum() / it["step_s"].sum())
                    served = len(req) / (req["finished_s"].max() - req["arrival_s"].min()) / cap
                    if pol == "none" and load < 1:
                        worst = max(worst, abs(busy / pred - 1))
                    rejected = int(req["rejected"].sum()) if "rejected" in req else 0
                    cells.append(f"{100 * busy:13.1f}% {batch:6.1f} {served:10.2f}")
                print(f"{trace:>11} {attention:>9} {load:5.2f} {100 * pred:5.1f}% " + " ".join(cells) +
                      f" {rejected:10d}", flush=True)
    print(f"worst |measured / predicted busy - 1| under policy=none, load < 1: {100 * worst:.1f} % "
          f"({time.perf_counter() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
