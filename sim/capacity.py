"""How much traffic a cluster takes without speculation: ``workload.load`` as a replica's busy fraction.

``workload.load`` = ρ asks for the arrival rate at which a replica serving the workload **without
speculation** is busy (running iterations) a fraction ρ of the time: :func:`rate_for_load`. A
speculating policy serves the same traffic in fewer, dearer iterations, so it is usually less busy at
the same load. :func:`estimate_capacity` is the saturation rate (ρ → 1), reported as ``capacity_req_s``.

The model (per replica; a state-free router splits the arrivals evenly):

* **Unservable requests are left out.** A request whose prompt + output exceeds a replica's KV capacity
  is rejected at arrival and costs nothing; the rate is set so that the *servable* requests make the
  load, i.e. the total rate is the servable rate over the servable fraction.
* **Prefill**: each servable request costs its batch-1 prefill ``T_prefill(prompt)`` (mean P̄ over the
  requests), one forward per request (``cluster.prefill=batched`` is priced the same, an upper bound).
* **Decode**: a request is in the batch for (output − 1) iterations. With n requests in the batch an
  iteration takes ``T(n) = T_verify(n, γ=0, c(n))``, at the context the replica charges: ``paged``, the
  mean over the batch of each request's mid-life context (prompt + half its output), each request
  weighted by its iterations in the batch; ``padded``, the expected longest of n such contexts drawn
  with the same weights. Requests beyond ``B`` = min(``max_batch``, KV capacity / mean request
  footprint) wait in a queue.
* **Batch size at load**: the number in the system n is a birth–death chain (continuous batching is
  processor sharing, whose distribution does not depend on the output-length distribution): arrivals
  at rate λ; departures at rate s · min(n, B) / (T(min(n, B)) · (Ō − 1)), Ō − 1 the mean iterations per
  request and s the fraction of busy time spent decoding rather than prefilling, s = 1 − λP̄ / U.
  The replica is busy whenever n ≥ 1, so U = 1 − π(0); λ is found by bisection so that U = ρ.

At low load this is U ≈ λ · (P̄ + (Ō − 1) · T(1)): every request runs alone. As ρ → 1 it tends to the
saturation rate 1 / (P̄ + (Ō − 1) · T(B) / B), every step at the largest batch — but when steps cost
nearly the same at any batch size, a replica is busy almost all the time long before its batches fill,
so busy fractions near 1 no longer tell rates apart: above ρ = 0.95 (:data:`BUSY_KNEE`) the rate rises
linearly to the saturation rate at ρ = 1, and for ρ ≥ 1 it is ρ times the saturation rate (overload:
the queue grows). It assumes Poisson-like arrivals: a bursty trace runs bigger batches in its bursts (so less
busy) and, replayed over a finite window, can end with a backlog that stretches the makespan; static
batching (``cluster.mode=static``) is priced as continuous. ``benchmarks/capacity_check.py`` prints
load asked against busy fraction measured on the shipped Azure traces.
"""
from __future__ import annotations

import math

import numpy as np

from .cluster import ClusterConfig, kv_capacity_tokens
from .cost_model import CostModel
from .policies import NoSpeculation
from .workload import Workload


# Above this busy fraction load no longer separates arrival rates well (a replica whose steps cost nearly the
# same at any batch size is busy almost all the time long before its batches fill): from here the rate rises
# linearly to the saturation rate at load 1.
BUSY_KNEE = 0.95


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

    def rate_at_busy(self, u: float) -> float:
        """The servable arrival rate at which the busy fraction is ``u`` (< 1), by bisection."""
        lo, hi = 0.0, self.saturation_rate()
        for _ in range(80):
            mid = (lo + hi) / 2
            if self.busy(mid) < u:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

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


def rate_for_load(cost: CostModel, w: Workload, cluster: ClusterConfig, load: float) -> float:
    """The arrival rate (requests/second, unservable ones included) at which a replica serving ``w``
    without speculation is busy a fraction ``load`` of the time (module docstring); ``load`` ≥ 1 gives
    ``load`` times :func:`estimate_capacity`."""
    if not load > 0:
        raise ValueError(f"load is {load}; expected a positive fraction")
    rep = _Replica(cost, w, cluster)
    sat = rep.saturation_rate()
    if load >= 1:
        lam = load * sat
    else:
        knee = rep.rate_at_busy(BUSY_KNEE)
        if load <= BUSY_KNEE:
            lam = rep.rate_at_busy(load)
        else:  # busy all but a sliver of the time: rise linearly to the saturation rate at load 1
            lam = knee + (sat - knee) * (load - BUSY_KNEE) / (1 - BUSY_KNEE)
    return cluster.replicas * lam / rep.servable_fraction
