"""The quantitative model of speculative decoding under batching: which γ to use at which load, and why.

From a cost profile (:class:`~specbatch.sim.cost_model.CostModel`) and acceptance rates it computes, for batch size
``b`` (sequences), mean context ``c`` (KV tokens per sequence) and speculation length ``γ`` (draft tokens
per sequence per iteration):

* expected tokens per sequence per iteration
  ``E(α, γ) = (1 − α^{γ+1}) / (1 − α)`` (scalar α) or ``1 + Σ_{k=1..γ} Π_{j≤k} α_j`` (per position);
* iteration time (seconds) ``T(b, γ, c) = γ·T_draft(b, c) + T_verify(b, γ, c)`` (γ = 0: one target decode);
* throughput ``b·E / T`` (tokens/second) and time per output token ``T / E`` (seconds/token);
* the optimum ``γ*(b, c, α) = argmax_γ b·E / T`` (ties go to the smaller γ; since b is fixed, it is also
  the γ with the lowest time per output token) and its speedup over γ = 0.

Why γ* falls as the batch grows (the seed finding): while verification is memory-bound (weights and KV
are streamed once per step whatever the number of new tokens), ``T_verify(b, γ, c) ≈ T_verify(b, 0, c)``,
so γ + 1 tokens cost about as much as one and ``E(α, γ)`` is almost free. As ``b·(γ+1)`` grows the step
turns compute-bound, ``T_verify`` grows about linearly in ``γ + 1`` and the rejected tokens are paid for:
γ* falls, often to 0. At long contexts KV traffic grows with ``b·c`` and keeps the step memory-bound at
larger batches, so speculation pays again (MagicDec's regime). :func:`verify_cost_ratio` is the
measurable quantity behind this: ``T_verify(b, γ, c) / T_verify(b, 0, c)`` (≈ 1 memory-bound, ≈ γ + 1
compute-bound).

Entry points: :func:`optimal_gamma` (one point), :func:`gamma_star_grid` (tidy table over batch × α ×
context, for dashboards), :func:`model_table` (every γ at every point), :func:`report` (printed text).
All tables are pandas DataFrames with one row per point.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .acceptance import AcceptanceModel
from .acceptance import expected_tokens as _expected_tokens
from .cost_model import CostModel

Alpha = float | Sequence[float] | np.ndarray | AcceptanceModel

#: Columns of :func:`gamma_star_grid`'s table.
GRID_COLUMNS = ["batch", "context", "alpha", "gamma_star", "tokens_per_iter", "iteration_s", "throughput_tok_s",
                "tpot_s", "speedup", "verify_cost_ratio"]
#: Columns of :func:`model_table`'s table.
MODEL_COLUMNS = ["batch", "context", "alpha", "gamma", "tokens_per_iter", "iteration_s", "throughput_tok_s",
                 "tpot_s", "speedup"]


def expected_tokens(alpha: Alpha, gamma: int) -> float:
    """Expected tokens a sequence gains in one iteration with speculation length ``gamma`` (≥ 1 token).

    ``alpha``: a scalar conditional acceptance rate, a per-position vector (α_1, α_2, ...; the last entry
    repeats beyond its length) or an :class:`AcceptanceModel`.
    """
    if gamma < 0:
        raise ValueError(f"gamma is {gamma}; expected an integer ≥ 0")
    if isinstance(alpha, AcceptanceModel):
        return alpha.expected_tokens(gamma)
    if gamma == 0:
        return 1.0
    return _expected_tokens(alpha, gamma)


def alpha_label(alpha: Alpha) -> float:
    """A scalar summary of ``alpha`` for tables: the value itself, or the mean of the per-position rates."""
    if isinstance(alpha, AcceptanceModel):
        return float(alpha.mean_alpha)
    a = np.asarray(alpha, dtype=float)
    return float(a) if a.ndim == 0 else float(a.mean())


def iteration_time(cost: CostModel, batch: int, gamma: int, context: float) -> float:
    """Seconds of one iteration: γ draft decodes plus one target verify of γ + 1 tokens per sequence."""
    return cost.iteration(int(batch), int(gamma), float(context))


def verify_cost_ratio(cost: CostModel, batch: int, gamma: int, context: float) -> float:
    """``T_verify(b, γ, c) / T_verify(b, 0, c)``: ≈ 1 while verification is memory-bound, → γ + 1 when
    compute-bound. Dimensionless."""
    return cost.target_verify(int(batch), int(gamma), float(context)) / cost.target_verify(int(batch), 0, float(context))


def _gammas(cost: CostModel, max_gamma: int | None) -> range:
    g = cost.max_gamma if max_gamma is None else int(max_gamma)
    if not 0 <= g <= cost.max_gamma:
        raise ValueError(f"max_gamma is {max_gamma}; expected 0..{cost.max_gamma} (the cost model's max_gamma)")
    return range(g + 1)


def point_curve(cost: CostModel, alpha: Alpha, batch: int, context: float,
                max_gamma: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(E per γ [tokens], T per γ [seconds]) at one (batch, context) for γ = 0..max_gamma. A plain α under a
    partial proposer (ngram) is read as its proposals' rates, with the cost model's drafter's match rate."""
    alpha = for_drafter(cost, alpha)
    gs = _gammas(cost, max_gamma)
    e = np.array([expected_tokens(alpha, g) for g in gs])
    t = np.array([iteration_time(cost, batch, g, context) for g in gs])
    return e, t


def optimal_gamma(cost: CostModel, alpha: Alpha, batch: int, context: float, max_gamma: int | None = None) -> int:
    """γ*(b, c, α) = argmax_γ b·E(α, γ) / T(b, γ, c) over γ = 0..max_gamma; ties go to the smaller γ."""
    e, t = point_curve(cost, alpha, batch, context, max_gamma)
    return int(np.argmax(e / t))


def budget_curve(cost: CostModel, alpha: Alpha, batch: int, context: float, token_budget: int,
                 prefill_waiting: int = 0, max_gamma: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`point_curve` under chunked prefill with ``token_budget`` tokens per forward
    (``max_num_batched_tokens``) and ``prefill_waiting`` prompt tokens queued: T per γ is
    :func:`specbatch.sim.policies.budget_seconds` (the mixed iteration plus the later cost of the prefill γ
    displaces; infinite where b·(γ+1) > budget). With nothing waiting the budget only caps γ at budget // b − 1."""
    from .policies import budget_seconds

    gs = _gammas(cost, max_gamma)
    e = np.array([expected_tokens(alpha, g) for g in gs])
    return e, budget_seconds(cost, int(batch), float(context), int(token_budget), int(prefill_waiting), max(gs))


def optimal_gamma_budget(cost: CostModel, alpha: Alpha, batch: int, context: float, token_budget: int,
                         prefill_waiting: int = 0, max_gamma: int | None = None) -> int:
    """γ* under a token budget (:func:`budget_curve`); ties go to the smaller γ. γ* now depends on the queue
    (``prefill_waiting``) as well as on the batch: each γ takes b·(γ+1) tokens from the waiting prompts."""
    e, t = budget_curve(cost, alpha, batch, context, token_budget, prefill_waiting, max_gamma)
    return int(np.argmax(e / t))


def optimal_gamma_over_batches(cost: CostModel, alpha: Alpha, context: float, batches: Iterable[int] | None = None,
                               max_gamma: int | None = None) -> np.ndarray:
    """γ*(b) for each batch size in ``batches`` (default 1..cost.max_batch) at one context and α."""
    batches = range(1, cost.max_batch + 1) if batches is None else batches
    return np.array([optimal_gamma(cost, alpha, int(b), context, max_gamma) for b in batches], dtype=np.int64)


def model_table(cost: CostModel, alpha: Alpha, batches: Iterable[int], contexts: Iterable[float],
                max_gamma: int | None = None) -> pd.DataFrame:
    """Every γ at every (batch, context): columns :data:`MODEL_COLUMNS`.

    ``throughput_tok_s`` = b·E/T (tokens/second of the whole batch), ``tpot_s`` = T/E (seconds per token
    of one sequence), ``speedup`` = throughput / throughput at γ = 0.
    """
    rows = []
    for c in contexts:
        for b in batches:
            e, t = point_curve(cost, alpha, int(b), float(c), max_gamma)
            base = e[0] / t[0]
            for g in range(len(e)):
                rows.append((int(b), float(c), alpha_label(alpha), g, e[g], t[g], b * e[g] / t[g], t[g] / e[g],
                             (e[g] / t[g]) / base))
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


def gamma_star_grid(cost: CostModel, alphas: Iterable[Alpha], batches: Iterable[int], contexts: Iterable[float],
                    max_gamma: int | None = None) -> pd.DataFrame:
    """γ* over batch × α × context (one row per point): columns :data:`GRID_COLUMNS`.

    ``speedup`` is throughput at γ* over throughput at γ = 0 (≥ 1 by construction);
    ``verify_cost_ratio`` is T_verify(b, γ*, c) / T_verify(b, 0, c) (1 when γ* = 0). For the dashboards:
    pivot on (batch, alpha) at one context, or on (batch, context) at one alpha.
    """
    rows = []
    batches, contexts = list(batches), list(contexts)
    for a in alphas:
        for c in contexts:
            for b in batches:
                e, t = point_curve(cost, a, int(b), float(c), max_gamma)
                rate = e / t
                g = int(np.argmax(rate))
                rows.append((int(b), float(c), alpha_label(a), g, e[g], t[g], b * rate[g], t[g] / e[g],
                             rate[g] / rate[0], verify_cost_ratio(cost, int(b), g, float(c))))
    return pd.DataFrame(rows, columns=GRID_COLUMNS)


def default_batches(cost: CostModel) -> list[int]:
    """Powers of two up to the cost model's max_batch, plus max_batch itself."""
    out = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b <= cost.max_batch]
    return out + ([cost.max_batch] if out[-1] != cost.max_batch else [])


def default_contexts(cost: CostModel) -> list[float]:
    """The context lengths (tokens) the profile measured."""
    return [float(c) for c in cost.contexts]


def report(cost: CostModel, alpha: Alpha, context: float, batches: Iterable[int] | None = None,
           alphas: Iterable[float] = (0.5, 0.6, 0.7, 0.8, 0.9), contexts: Iterable[float] | None = None,
           max_gamma: int | None = None) -> str:
    """A printed explanation: per batch size, the verify cost ratio at γ = 1..4, γ*, E, T and the speedup;
    then γ* over batch × α (at ``context``) and over batch × context (at ``alpha``)."""
    batches = default_batches(cost) if batches is None else list(batches)
    contexts = default_contexts(cost) if contexts is None else list(contexts)
    lines = [f"profile {cost.profile.name}: acceptance α = {alpha_label(alpha):.3f} (mean over positions), "
             f"context {context:.0f} tokens" + drafter_note(cost),
             "",
             "Verification cost T_verify(b, γ, c) / T_verify(b, 0, c): ≈ 1 memory-bound, ≈ γ+1 compute-bound",
             f"{'batch':>6} {'γ=1':>6} {'γ=2':>6} {'γ=4':>6}  {'γ*':>3} {'E[tok]':>7} {'T(γ*) ms':>9} "
             f"{'T(0) ms':>8} {'tok/s':>9} {'speedup':>8}"]
    gmax = max(_gammas(cost, max_gamma))
    for b in batches:
        ratios = [verify_cost_ratio(cost, b, g, context) if g <= gmax else float("nan") for g in (1, 2, 4)]
        e, t = point_curve(cost, alpha, b, context, max_gamma)
        rate = e / t
        g = int(np.argmax(rate))
        lines.append(f"{b:>6} {ratios[0]:>6.2f} {ratios[1]:>6.2f} {ratios[2]:>6.2f}  {g:>3} {e[g]:>7.2f} "
                     f"{t[g] * 1e3:>9.2f} {t[0] * 1e3:>8.2f} {b * rate[g]:>9.1f} {rate[g] / rate[0]:>7.2f}x")
    lines += ["", f"γ* over batch (rows) × α (columns) at context {context:.0f}"]
    alphas = list(alphas)
    lines.append(f"{'batch':>6} " + " ".join(f"{a:>5.2f}" for a in alphas))
    for b in batches:
        lines.append(f"{b:>6} " + " ".join(f"{optimal_gamma(cost, a, b, context, max_gamma):>5d}" for a in alphas))
    lines += ["", f"γ* over batch (rows) × context (columns) at α = {alpha_label(alpha):.3f}"]
    lines.append(f"{'batch':>6} " + " ".join(f"{c:>6.0f}" for c in contexts))
    for b in batches:
        lines.append(f"{b:>6} " + " ".join(f"{optimal_gamma(cost, alpha, b, c, max_gamma):>6d}" for c in contexts))
    return "\n".join(lines)


# --- drafters (sim/drafters.py) --------------------------------------------------------------------------------


def for_drafter(cost: CostModel, alpha: Alpha) -> Alpha:
    """``alpha`` as the acceptance of ``cost``'s drafter: unchanged for the model drafters (and for an
    :class:`AcceptanceModel`, which carries its own match rate); a plain α or per-position vector under a
    partial proposer becomes an :class:`AcceptanceModel` with the drafter's ``match_rate``."""
    p = cost.drafter.match_rate
    if p == 1.0 or isinstance(alpha, AcceptanceModel):
        return alpha
    a = np.asarray(alpha, dtype=float)
    if a.ndim == 0:
        return AcceptanceModel(alpha=float(a), match_rate=p, max_gamma=cost.max_gamma)
    return AcceptanceModel(positions=a, match_rate=p, max_gamma=cost.max_gamma)


def drafter_note(cost: CostModel) -> str:
    """``", drafter <kind>"`` (with the match rate of a partial proposer) for a report's first line; empty for
    the default draft model."""
    d = cost.drafter
    if d.kind == "draft_model":
        return ""
    return f", drafter {d.kind}" + (f" (match rate {d.match_rate:g})" if d.partial else "")


#: Columns of :func:`gamma_star_by_drafter`'s table.
DRAFTER_COLUMNS = ["drafter", "batch", "context", "alpha", "gamma_star", "tokens_per_iter", "iteration_s",
                   "throughput_tok_s", "speedup"]


def gamma_star_by_drafter(profile, kinds: Iterable[str] = ("draft_model", "eagle", "ngram"), context: float = 1024.0,
                          batches: Iterable[int] | None = None, max_batch: int = 32, max_gamma: int = 8,
                          alpha: float | None = None) -> pd.DataFrame:
    """γ*(b) per drafter kind the profile has rows for (:meth:`Drafter.check_profile`; others are left out), each
    with its documented defaults (``conf/drafter/<kind>.yaml``): its costs, its per-position α (``alpha``, or
    0.7 for ``draft_model`` when it has none) and its match rate. Columns :data:`DRAFTER_COLUMNS`; ``speedup``
    is over no speculation (γ = 0)."""
    import warnings

    from .cost_model import ExtrapolationWarning
    from .drafters import make_drafter
    from .profile import ProfileError

    rows = []
    for kind in kinds:
        d = make_drafter(kind)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExtrapolationWarning)
                cost = CostModel(profile, max_batch=max_batch, max_gamma=max_gamma, drafter=d)
        except ProfileError:
            continue
        pos = [alpha] if alpha is not None else (list(d.positions) if d.positions is not None else [0.7])
        acc = AcceptanceModel(positions=np.asarray(pos, float), match_rate=d.match_rate, max_gamma=max_gamma)
        for b in (default_batches(cost) if batches is None else batches):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExtrapolationWarning)
                e, t = point_curve(cost, acc, int(b), float(context), max_gamma)
            rate = e / t
            g = int(np.argmax(rate))
            rows.append((kind, int(b), float(context), alpha_label(acc), g, e[g], t[g], b * rate[g], rate[g] / rate[0]))
    return pd.DataFrame(rows, columns=DRAFTER_COLUMNS)


def gamma_star_falls(table: np.ndarray) -> bool:
    """True when a γ*(b) table (b = 1, 2, ...) never rises with b and ends lower than it starts or at 0."""
    t = np.asarray(table)
    return bool(np.all(np.diff(t) <= 0) and (t[-1] < t[0] or t[0] == 0))
