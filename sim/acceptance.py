"""Acceptance model: how many draft tokens the target accepts in one speculative iteration.

Semantics. Draft position k (1-based) is accepted with conditional probability ``α_ik`` given that
positions 1..k-1 were; the iteration accepts the prefix before the first rejection, so a request gains
``accepted + 1`` tokens (the target always contributes one: the correction or the bonus token).

* ``α_k`` — per-position rates (``positions``); a scalar α is the constant vector. Positions beyond the
  vector's length reuse its last entry.
* Per-request heterogeneity — each request draws ``q_i ~ Beta`` with mean ``mean_alpha`` (the mean of
  ``α_k`` over positions) and concentration ``concentration`` (a + b; larger = less spread; ``None``
  = none), and uses ``α_ik = min(1, α_k · q_i / mean_alpha)``.
* Request classes — ``class_alpha`` maps class index → mean α for that class (replacing the global mean),
  e.g. code requests accept more than chat.
* Drift — ``drift_per_hour`` shifts every request's α linearly with its arrival time (clipped to [0, 1]).
* Partial proposals — ``match_rate`` p (an n-gram drafter, :mod:`specbatch.sim.drafters`): a sequence proposes
  in an iteration with probability p, else nothing; only a proposal can be accepted, so
  P(accepted ≥ j) = p · Π_{i≤j} α_ij. With one uniform U per request per iteration: matched iff U < p.

Sampling is vectorised: one ``(batch, γ)`` uniform draw per iteration from the replica's own generator.
"""
from __future__ import annotations

import numpy as np


class AcceptanceModel:
    """Per-request, per-position acceptance probabilities, fixed when the workload is known."""

    def __init__(self, alpha: float | None = None, positions: np.ndarray | None = None,
                 concentration: float | None = None, class_alpha: dict[int, float] | None = None,
                 drift_per_hour: float = 0.0, max_gamma: int = 8, match_rate: float = 1.0):
        if positions is None:
            if alpha is None:
                raise ValueError("acceptance needs alpha (a scalar) or positions (per-position rates)")
            positions = np.array([alpha], dtype=float)
        positions = np.asarray(positions, dtype=float)
        if positions.ndim != 1 or len(positions) == 0 or ((positions < 0) | (positions > 1)).any() or np.isnan(positions).any():
            raise ValueError(f"acceptance rates must lie in [0, 1]; got {positions.tolist()}")
        if concentration is not None and not concentration > 0:
            raise ValueError(f"acceptance.concentration is {concentration}; expected a positive number or null")
        for c, a in (class_alpha or {}).items():
            if not 0 <= a <= 1:
                raise ValueError(f"acceptance.class_alpha[{c}] is {a}; expected a probability in [0, 1]")
        k = max(max_gamma, len(positions))
        self.positions = np.concatenate([positions, np.full(k - len(positions), positions[-1])])[:k]
        self.mean_alpha = float(self.positions[:max(1, max_gamma)].mean())
        self.concentration = concentration
        self.class_alpha = dict(class_alpha or {})
        self.drift_per_hour = float(drift_per_hour)
        self.max_gamma = max_gamma
        if not 0 < match_rate <= 1:
            raise ValueError(f"drafter.match_rate is {match_rate}; expected a probability in (0, 1]")
        self.match_rate = float(match_rate)

    def request_scale(self, n: int, rng: np.random.Generator, request_class: np.ndarray | None = None,
                      arrival_s: np.ndarray | None = None) -> np.ndarray:
        """Per-request multiplier ``q_i / mean_alpha`` applied to the per-position rates (length ``n``)."""
        mean = np.full(n, self.mean_alpha)
        if self.class_alpha and request_class is not None:
            for c, a in self.class_alpha.items():
                mean[request_class == c] = a
        if self.drift_per_hour and arrival_s is not None:
            mean = np.clip(mean + self.drift_per_hour * arrival_s / 3600.0, 0.0, 1.0)
        q = mean
        if self.concentration is not None:
            # Beta needs a, b > 0; a mean so close to 0 (or 1) that a (or b) underflows stays at the mean.
            inner = (mean * self.concentration > 0) & ((1 - mean) * self.concentration > 0)
            a = mean[inner] * self.concentration
            b = (1 - mean[inner]) * self.concentration
            q = mean.copy()
            q[inner] = rng.beta(a, b)
        if self.mean_alpha == 0:  # every α_k is 0: nothing is ever accepted
            return np.zeros(n)
        return q / self.mean_alpha

    def rates(self, k: int) -> np.ndarray:
        """The per-position rates α_1..α_k (the last entry repeats beyond the measured positions)."""
        p = self.positions
        return np.concatenate([p, np.full(max(0, k - len(p)), p[-1])])[:k]

    def thresholds(self, scale: np.ndarray, k: int) -> np.ndarray:
        """Matrix ``(len(scale), k)``: P(at least j draft tokens accepted) = Π_{i≤j} α_i for j = 1..k.

        One uniform U per request per iteration then gives accepted = #{j ≤ γ : U < thresholds[j]},
        which has exactly the first-rejection distribution (P(accepted ≥ j) = Π_{i≤j} α_i); with
        ``match_rate`` p < 1 every entry is multiplied by p."""
        thr = np.cumprod(np.minimum(1.0, scale[:, None] * self.rates(k)[None, :]), axis=1)
        return thr if self.match_rate == 1.0 else thr * self.match_rate

    def probabilities(self, scale: np.ndarray, gamma: int) -> np.ndarray:
        """Matrix ``(len(scale), γ)`` of conditional acceptance probabilities."""
        return np.minimum(1.0, scale[:, None] * self.rates(gamma)[None, :])

    def sample(self, scale: np.ndarray, gamma: int, rng: np.random.Generator) -> np.ndarray:
        """Accepted draft tokens per request (0..γ) for one iteration; ``scale`` from :meth:`request_scale`.
        With ``match_rate`` < 1 one more uniform per request decides the match (unmatched: 0)."""
        if gamma == 0:
            return np.zeros(len(scale), dtype=np.int64)
        rejected = rng.random((len(scale), gamma)) >= self.probabilities(scale, gamma)
        first = rejected.argmax(axis=1)
        acc = np.where(rejected.any(axis=1), first, gamma).astype(np.int64)
        if self.match_rate != 1.0:
            acc[rng.random(len(scale)) >= self.match_rate] = 0
        return acc

    def expected_tokens(self, gamma: int, scale: float = 1.0) -> float:
        """E[tokens gained per iteration] = 1 + p·Σ_{k=1..γ} Π_{j≤k} α_j (ignoring the request's end; p the
        ``match_rate``, 1 for model drafters)."""
        p = np.minimum(1.0, scale * self.rates(gamma))
        if self.match_rate != 1.0:
            return float(1.0 + self.match_rate * np.cumprod(p).sum())
        return float(1.0 + np.cumprod(p).sum())


def expected_tokens(alpha: float | np.ndarray, gamma: int) -> float:
    """Closed form: (1 − α^{γ+1}) / (1 − α) for scalar α; 1 + Σ_k Π_{j≤k} α_j for per-position α."""
    a = np.asarray(alpha, dtype=float)
    if a.ndim == 0:
        a = float(a)
        return float(gamma + 1) if a == 1.0 else (1 - a ** (gamma + 1)) / (1 - a)
    a = np.concatenate([a, np.full(max(0, gamma - len(a)), a[-1])])[:gamma]
    return float(1.0 + np.cumprod(a).sum())
