"""How much traffic a cluster takes without speculation: the meaning of ``workload.load``.

``workload.load`` = ρ sets the arrival rate to ρ × :func:`estimate_capacity`, the **saturation rate**: the
rate at which a replica serving the workload without speculation runs every step at its largest batch and
can take no more (ρ ≥ 1 is overload: the queue grows). ρ is *not* the busy fraction. With continuous
batching a replica is busy whenever one request runs, so it is busy most of the time long before its
throughput saturates (on the shipped CPU profile and the Azure conversation trace, ρ = 0.3 keeps a replica
about 80 % busy at a mean batch of a few sequences); a busy-fraction knob would squeeze the whole range of
batch sizes, where the best γ changes, into busy fractions between 0.95 and 1. :func:`predicted_busy`
gives the busy fraction the model expects at a rate; ``summary.json`` reports the measured one
(``busy_fraction_mean``), and ``benchmarks/capacity_check.py`` prints both against ρ.

The model (per replica; a state-free router splits the arrivals evenly):

* **Unservable requests are left out.** A request whose prompt + output exceeds a replica's KV capacity
  is rejected at arrival and costs nothing; rates count all requests, so the total rate is the servable
  rate over the servable fraction.
* **Prefill**: each servable request costs its batch-1 prefill ``T_prefill(prompt)`` (mean P̄ over the
  requests), one forward per request (``cluster.prefill=batched`` is priced the same, an upper bound;
  so is ``chunked``, whose chunks share a forward's fixed part with the verify step: a load then gives the
  same arrival rate in every prefill mode and token budget, so that they are compared on the same traffic).
* **Decode**: a request is in the batch for (output − 1) iterations. With n requests in the batch an
  iteration takes ``T(n) = T_verify(n, γ=0, c(n))``, at the context the replica charges: ``paged``, the
  mean over the batch of each request's mid-life context (prompt + half its output), each request
  weighted by its iterations in the batch; ``padded``, the expected longest of n such contexts drawn
  with the same weights. Requests beyond ``B`` = min(``max_batch``, KV capacity / mean request
  footprint) wait in a queue.
* **Saturation**: every step at batch B, so a request costs P̄ + (Ō − 1) · T(B) / B of replica time
  (Ō − 1 the mean iterations per request): the saturation rate is its inverse.
* **Busy fraction at a rate** (:func:`predicted_busy`): the number in the system n is a birth–death
  chain (continuous batching is processor sharing, whose distribution does not depend on the
  output-length distribution): arrivals at rate λ; departures at rate s · min(n, B) / (T(min(n, B)) ·
  (Ō − 1)), s = 1 − λP̄ / U the fraction of busy time spent decoding rather than prefilling; the replica
  is busy whenever n ≥ 1, so U = 1 − π(0). It assumes Poisson-like arrivals: a bursty trace runs bigger
  batches in its bursts, so it is less busy than predicted.

Static batching (``cluster.mode=static``) is priced as continuous.
"""
from __future__ import annotations

import math

import numpy as np

from .cluster import ClusterConfig, kv_capacity_tokens
from .cost_model import CostModel
from .policies import NoSpeculation
from .workload import Workload


class _Replica:
    """The per-replica quantities of the model for one workload and cluster."""

    def __init__(self, cost: CostModel, w: Workload, cluster: ClusterConfig):
        kv = kv_capacity_tokens(cost, NoSpeculation(), cluster)
        p = np.asarray(w.prompt_tokens, dtype=float)
        o = np.asarray(w.output_tokens, dtype=float)
        servable = (p + o) <= kv
        if not servable.any():
            raise ValueError(f"no request of workload {w.name!r} fits in a replica's KV cache ({kv} tokens of "
                             f"context; the smallest request needs {int((p + o).min())}): nothing can be served")
        self.servable_fraction = float(servable.mean())
        p, o = p[servable], o[servable]
        lengths, counts = np.unique(p, return_counts=True)
        self.prefill = float(np.dot([cost.prefill(float(x)) for x in lengths], counts) / counts.sum())
        steps = np.maximum(o - 1.0, 0.0)  # iterations each request spends in the batch
        self.steps = float(steps.mean())
        self.batch = int(max(1, min(cluster.max_batch, kv // max(1.0, float((p + o).mean())))))
        n = np.arange(1, self.batch + 1)
        ctx = p + o / 2
        if self.steps > 0:
            weights = steps / steps.sum()
            if cluster.attention == "padded":
                x, idx = np.unique(ctx, return_inverse=True)
                f = np.concatenate([[0.0], np.cumsum(np.bincount(idx, weights=weights))])
                f[-1] = 1.0
                contexts = x @ np.diff(f[:, None] ** n[None, :], axis=0)
            else:
                contexts = np.full(len(n), float(ctx @ weights))
        else:
            contexts = np.full(len(n), float(ctx.mean()))
        self.step = np.array([cost.target_verify(int(b), 0, float(c)) for b, c in zip(n, contexts)])
        self.per_step = n / self.step  # sequences advanced per second of decoding, by batch size

    def saturation_rate(self) -> float:
        """Servable requests/second at which the replica is always busy (every step at the largest batch)."""
        return 1.0 / (self.prefill + self.steps / self.per_step[-1])

    def busy(self, lam: float) -> float:
        """Busy fraction U at servable arrival rate ``lam`` (the fixed point of U = 1 − π(0; s(U)))."""
        if self.steps == 0:
            return min(1.0, lam * self.prefill)
        lo, hi = min(1.0, lam * self.prefill), 1.0
        if lam >= self.saturation_rate():
            return 1.0
        for _ in range(80):  # U − (1 − π0(U)) changes sign once on (λP̄, 1)
            u = (lo + hi) / 2
            if 1.0 - self._idle(lam, 1.0 - lam * self.prefill / u) > u:
                lo = u
            else:
                hi = u
        return (lo + hi) / 2

    def _idle(self, lam: float, share: float) -> float:
        """π(0) of the birth–death chain when a fraction ``share`` of busy time goes to decoding."""
        if share <= 0:
            return 0.0
        mu = share * self.per_step / self.steps  # departure rate with n = 1..B in the batch
        log_ratio = np.log(lam / mu)
        log_a = np.cumsum(log_ratio)  # log π(n)/π(0), n = 1..B
        r = lam / mu[-1]
        if r >= 1:
            return 0.0
        terms = np.concatenate([[0.0], log_a, [log_a[-1] + math.log(r / (1 - r))]])  # the geometric tail past B
        top = terms.max()
        return float(math.exp(-top) / np.exp(terms - top).sum())


def estimate_capacity(cost: CostModel, w: Workload, cluster: ClusterConfig) -> float:
    """Requests/second (all of ``w``'s requests, unservable ones included) at which the cluster's replicas
    are always busy without speculation: the saturation rate of the module docstring's model."""
    rep = _Replica(cost, w, cluster)
    return cluster.replicas * rep.saturation_rate() / rep.servable_fraction


def rate_for_load(cost: CostModel, w: Workload, cluster: ClusterConfig, load: float,
                  capacity: float | None = None) -> float:
    """The arrival rate (requests/second, unservable ones included) for ``workload.load`` = ``load``:
    ``load`` × :func:`estimate_capacity` (or × ``capacity``, that estimate when the caller has it already)."""
    if not load > 0:
        raise ValueError(f"load is {load}; expected a positive fraction")
    return load * (estimate_capacity(cost, w, cluster) if capacity is None else capacity)


def predicted_busy(cost: CostModel, w: Workload, cluster: ClusterConfig, rate: float) -> float:
    """The busy fraction the model (module docstring) expects of a replica serving ``w`` without speculation
    when the cluster receives ``rate`` requests/second (unservable ones included)."""
    rep = _Replica(cost, w, cluster)
    return rep.busy(rate * rep.servable_fraction / cluster.replicas)
