"""Estimated no-speculation capacity of a cluster for a workload's length mix (requests/second).

Used to express load as a fraction of capacity, so one trace shape can be replayed on any profile.
The estimate assumes every replica runs its largest feasible batch b, the smaller of ``max_batch`` and
the number of mean-sized requests (prompt + output) that fit in its KV cache; at mean context
c̄ = mean prompt + half the mean output, a request costs its prefill plus (output − 1) decode steps shared
by b sequences:

    capacity = replicas / (mean_i T_prefill(prompt_i) + (mean output − 1) · T_verify(b, 0, c̄) / b)

It ignores queueing and batch ramp-up, so real saturation sits somewhat below it; load 1.0 is "about
saturated", not a guarantee. It prices the decode steps at the mean context and the prefills one at a
time whatever ``cluster.attention`` and ``cluster.prefill`` say, so one load level is one arrival rate
across those settings and runs that differ only in them compare at the same traffic.
"""
from __future__ import annotations

import numpy as np

from .cluster import ClusterConfig, kv_capacity_tokens
from .cost_model import CostModel
from .policies import NoSpeculation
from .workload import Workload


def estimate_capacity(cost: CostModel, w: Workload, cluster: ClusterConfig, sample: int = 2000) -> float:
    """Requests/second the cluster sustains without speculation (see module docstring)."""
    kv = kv_capacity_tokens(cost, NoSpeculation(), cluster)
    mean_p, mean_o = float(w.prompt_tokens.mean()), float(w.output_tokens.mean())
    b = int(max(1, min(cluster.max_batch, kv // max(1.0, mean_p + mean_o))))
    c = mean_p + mean_o / 2
    idx = np.linspace(0, len(w) - 1, min(sample, len(w))).astype(int)
    prefill = float(np.mean([cost.prefill(float(x)) for x in w.prompt_tokens[idx]]))
    per_request = prefill + max(0.0, mean_o - 1) * cost.target_verify(b, 0, c) / b
    return cluster.replicas / per_request
