"""Speculation policies: each iteration, pick the speculation length γ for a replica's running batch.

A policy sees only the present and the past: :meth:`Policy.choose` gets the running batch (size, mean
context, request ids, the clock) and :meth:`Policy.observe` is told, after an iteration, what was
accepted. Nothing about future arrivals or a request's remaining output is passed in.

Adding a policy is one small class plus a ``conf/policy/<name>.yaml`` whose ``name`` is registered with
:func:`register`.
"""
from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass

import numpy as np

from .acceptance import AcceptanceModel
from .cost_model import CostModel


class PolicyWarning(UserWarning):
    """A policy setting was adjusted to what the run allows (the message says what and why)."""


@dataclass(slots=True)
class BatchView:
    """What a policy may look at when it picks γ: the running batch right now."""

    now: float  # simulated seconds
    replica: int
    batch: int  # running sequences
    context: float  # mean KV length of the batch (tokens)
    ids: np.ndarray  # request ids in the batch
    step_context: float  # KV length the step is charged at (tokens): ``context`` under paged attention,
    #                      the longest sequence's under padded (``cluster.attention``); what a
    #                      context-dependent choice should read (see Policy.steady_gamma)
    prefill_waiting_tokens: int = 0  # prompt tokens still to prefill on this replica (tokens): the queue's
    #                                  prompts, plus under cluster.prefill=chunked what the requests being
    #                                  prefilled have left. A policy whose γ reads it (or token_budget) must
    #                                  return None from steady_gamma
    token_budget: int | None = None  # tokens one forward may hold (cluster.max_num_batched_tokens) under
    #                                  cluster.prefill=chunked, else None: γ takes b·(γ+1) of it, the prompts
    #                                  waiting get what is left, and γ is capped at token_budget // b − 1


class Policy:
    """Base class. ``uses_draft`` = False means the draft model is never loaded (no draft KV, no prefill)."""

    name = "policy"
    uses_draft = True

    def setup(self, cost: CostModel, acceptance: AcceptanceModel, context) -> None:
        """Offline preparation with the cost model, the acceptance model and a reference context (tokens):
        one number, or one per batch size 1..max_batch (:func:`specbatch.sim.cluster.charged_context`: under padded
        attention a batch's step is charged at its longest sequence's context, which grows with the batch)."""

    def choose(self, view: BatchView) -> int:
        raise NotImplementedError

    def observe(self, view: BatchView, gamma: int, accepted: np.ndarray) -> None:
        """Feedback after an iteration: accepted draft tokens per request in ``view.ids``."""

    def steady_gamma(self, batch: int, context: float) -> tuple[int, float] | None:
        """``(γ, context_limit)`` when the choice depends only on the batch size and the context the step is
        charged at (``context``, tokens: :attr:`BatchView.step_context`, which is all of the context that
        :meth:`choose` may read) and the policy learns nothing from :meth:`observe`: γ holds for every
        iteration of this batch size whose charged context stays below ``context_limit``. ``None`` (the
        default) means the policy must see every iteration; the replica then never fast-forwards under it."""
        return None

    def describe(self) -> dict:
        """Plain-data description saved with the run (e.g. the γ table)."""
        return {"name": self.name}


_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    _REGISTRY[cls.name] = cls
    return cls


def make_policy(name: str, **params) -> Policy:
    """Build a registered policy by name with its config parameters."""
    if name not in _REGISTRY:
        raise ValueError(f"policy.name is {name!r}; expected one of {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"policy {name!r}: bad parameters {sorted(params)} ({e})") from None


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


@register
class NoSpeculation(Policy):
    """γ = 0 always: plain target decoding, no draft model."""

    name = "none"
    uses_draft = False

    def choose(self, view: BatchView) -> int:
        return 0

    def steady_gamma(self, batch: int, context: float) -> tuple[int, float]:
        return 0, np.inf


@register
class Fixed(Policy):
    """γ = ``gamma`` always (``gamma = 0`` still loads the draft; use ``none`` for no draft)."""

    name = "fixed"

    def __init__(self, gamma: int = 4):
        self.gamma = _check_int(gamma, "policy.gamma")

    def choose(self, view: BatchView) -> int:
        return self.gamma

    def steady_gamma(self, batch: int, context: float) -> tuple[int, float]:
        return self.gamma, np.inf

    def describe(self) -> dict:
        return {"name": self.name, "gamma": self.gamma}


def goodput_table(cost: CostModel, acceptance: AcceptanceModel, context,
                  max_gamma: int | None = None) -> np.ndarray:
    """Expected tokens per second per sequence, array ``[γ, b-1]`` for γ = 0..max_gamma, b = 1..max_batch:
    E[tokens | α, γ] / (γ·T_draft(b, c) + T_verify(b, γ, c)). Multiply by b for batch throughput.
    ``context`` (tokens): one number, or one per batch size."""
    max_gamma = cost.max_gamma if max_gamma is None else max_gamma
    e = np.array([acceptance.expected_tokens(g) for g in range(max_gamma + 1)])
    t = cost.iteration_table(context)[: max_gamma + 1]
    return e[:, None] / t


def optimal_gamma_table(cost: CostModel, acceptance: AcceptanceModel, context,
                        max_gamma: int | None = None) -> np.ndarray:
    """γ*(b) for b = 1..max_batch: argmax_γ b·E[tokens | α, γ] / (γ·T_draft(b, c) + T_verify(b, γ, c)).
    Ties go to the smaller γ."""
    return goodput_table(cost, acceptance, context, max_gamma).argmax(axis=0)


@register
class Adaptive(Policy):
    """The batch-size table γ*(b), built offline from the profile at a reference context.

    ``context``: reference KV length in tokens; ``null`` uses the one the simulator passes at setup: the
    workload's mean context (mean prompt plus half the mean output), or under padded attention, per batch
    size, the expected longest context of that many requests (:func:`specbatch.sim.cluster.charged_context`).
    """

    name = "adaptive"

    def __init__(self, context: float | None = None, max_gamma: int | None = None):
        self.context = None if context is None else _check_positive(context, "policy.context")
        self.max_gamma = max_gamma
        self.table: np.ndarray | None = None
        self.contexts: list[float] | None = None  # the table's context per batch size (tokens)

    def setup(self, cost: CostModel, acceptance: AcceptanceModel, context) -> None:
        ref = np.broadcast_to(np.asarray(self.context if self.context is not None else context, float),
                              (cost.max_batch,))
        self.contexts = ref.tolist()
        self.table = optimal_gamma_table(cost, acceptance, ref, self.max_gamma)
        self._table = self.table.tolist()

    def choose(self, view: BatchView) -> int:
        return self._table[view.batch - 1]

    def steady_gamma(self, batch: int, context: float) -> tuple[int, float]:
        return self._table[batch - 1], np.inf

    def describe(self) -> dict:
        c = self.contexts
        return {"name": self.name, "context": c[0] if c else self.context,
                "contexts_by_batch": None if c is None or len(set(c)) == 1 else {b + 1: x for b, x in enumerate(c)},
                "table": {int(b + 1): int(g) for b, g in enumerate(self.table)} if self.table is not None else None}


# --- policies added for the quantitative study (issue 4) ------------------------------------------------------


def _check_int(value, key: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{key} is {value!r}; expected an integer ≥ {lo}")
    return int(value)


def _check_positive(value, key: str, what: str = "a number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value > 0:
        raise ValueError(f"{key} is {value!r}; expected {what} > 0")
    return float(value)


def _check_bool(value, key: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{key} is {value!r}; expected true or false")
    return bool(value)


def _check_prob(value, key: str, lo_open: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} is {value!r}; expected a number in (0, 1]") from None
    if not (0 < v <= 1 if lo_open else 0 <= v <= 1):
        raise ValueError(f"{key} is {value!r}; expected a number in {'(0, 1]' if lo_open else '[0, 1]'}")
    return v


@register
class AdaptiveContext(Policy):
    """A table γ*(b, c) over batch size and context, built offline from the profile.

    At long contexts the KV cache traffic keeps verification memory-bound at larger batches, so the
    batch-only table (``adaptive``, built at one reference context) under-speculates there (MagicDec's
    regime). ``contexts``: the context grid in tokens (``null``: powers of two from 128 below the longest
    context the profile measured, then that longest one; no extrapolation). At run time the context the step
    is charged at (``BatchView.step_context``: the batch's mean context, its longest sequence's under padded
    attention) picks the nearest grid point on a log scale.
    """

    name = "adaptive_context"

    def __init__(self, contexts: list[float] | None = None, max_gamma: int | None = None):
        if contexts is not None:
            if isinstance(contexts, (str, bytes)) or not hasattr(contexts, "__len__") or not len(contexts):
                raise ValueError(f"policy.contexts is {contexts!r}; expected a list of positive token counts or null")
            contexts = [_check_positive(c, f"policy.contexts[{i}]") for i, c in enumerate(contexts)]
        self.contexts = sorted(contexts) if contexts is not None else None
        self.max_gamma = None if max_gamma is None else _check_int(max_gamma, "policy.max_gamma")
        self.table: np.ndarray | None = None

    def setup(self, cost: CostModel, acceptance: AcceptanceModel, context) -> None:
        if self.contexts is None:
            top = float(np.max(cost.contexts))
            grid = [float(c) for c in 2.0 ** np.arange(7, 40) if c < top]
            self.contexts = grid + [top]
        self.table = np.stack([optimal_gamma_table(cost, acceptance, c, self.max_gamma) for c in self.contexts])
        self._table = self.table.tolist()
        mids = np.sqrt(np.asarray(self.contexts[:-1]) * np.asarray(self.contexts[1:]))  # log-scale midpoints
        self._bounds = mids.tolist()

    def choose(self, view: BatchView) -> int:
        return self._table[bisect.bisect_right(self._bounds, view.step_context)][view.batch - 1]

    def steady_gamma(self, batch: int, context: float) -> tuple[int, float]:
        i = bisect.bisect_right(self._bounds, context)
        return self._table[i][batch - 1], (self._bounds[i] if i < len(self._bounds) else np.inf)

    def describe(self) -> dict:
        return {"name": self.name, "contexts": self.contexts,
                "table": None if self.table is None else
                {str(int(c)): {int(b + 1): int(g) for b, g in enumerate(row)} for c, row in zip(self.contexts, self.table)}}


def budget_seconds(cost: CostModel, batch: int, context: float, token_budget: int, prefill_waiting: int,
                   max_gamma: int, draft: bool = True) -> np.ndarray:
    """Seconds charged to the decode of each γ = 0..max_gamma for a batch of ``batch`` sequences under chunked
    prefill with ``token_budget`` tokens per forward and ``prefill_waiting`` prompt tokens waiting (tokens):

        T(γ) = T_iter(b, γ, c) + [X(γ) − X(0)],  X(γ) = extra(p(γ)) + L(D(γ))

    where p(γ) = min(W, B − b·(γ+1)) is the chunk the budget leaves, extra(p) what it adds to this forward
    (:meth:`CostModel.mixed_iteration`), D(γ) = min(W, B − b) − p(γ) the prompt tokens γ displaces, and
    L(D) what prefilling them costs in a later forward (:meth:`CostModel.chunk_seconds`: their growth terms,
    no fixed part; target, and draft when it prefills). X(0) is the prompt work every γ pays (now or later), so
    the bracket is the prefill cost γ adds by displacing prompt tokens. Under the mixed rule a prompt's chunks
    telescope, so the bracket is only the fixed parts shared differently (e.g. at γ = 0 the draft runs for the
    chunk alone): the budget's main effect on throughput is the cap; displacing prompts costs their TTFT,
    which this throughput price does not see. γ with b·(γ+1) > B cannot run: infinite. The waiting prompts are
    priced as one chunk at prefix 0 (a policy does not see how far each is prefilled)."""
    draft = draft and getattr(getattr(cost, "drafter", None), "prefill", True)
    free0 = min(prefill_waiting, max(0, token_budget - batch))
    out = np.full(max_gamma + 1, np.inf)
    base = None
    for g in range(max_gamma + 1):
        if batch * (g + 1) > token_budget:
            break
        p = min(prefill_waiting, token_budget - batch * (g + 1))
        extra, step = cost.mixed_iteration(batch, g, context, [(0, p)] if p > 0 else [], draft)
        owed = free0 - p
        if owed > 0:
            extra += cost.chunk_seconds([(0, owed)], "target") + (cost.chunk_seconds([(0, owed)], "draft") if draft else 0.0)
        if base is None:
            base = extra
        out[g] = step + (extra - base)
    return out


BUDGET_PRICING = ("displaced", "work", "cap")  # goodput's policy.budget_pricing under chunked prefill


@register
class Goodput(Policy):
    """SmartSpec-style goodput control: each iteration pick the γ maximising predicted goodput

        G(γ) = Σ_{i in batch} E(α̂_i, γ) / T(b, γ, c)   (tokens/second; may pick γ = 0),

    with T priced at the context the step is charged at (``BatchView.step_context``: the mean under paged
    attention, the longest sequence's under padded) and acceptance estimated online from what was accepted
    so far. Each speculative iteration gives, per request, ``accepted`` successes out of ``accepted + 1``
    trials (``γ`` trials when all γ were accepted);
    a global and a per-request exponentially weighted count (``ema`` = weight of the newest observation)
    give α̂_g = S_g / N_g and α̂_i = (S_i + k·α̂_g) / (N_i + k) (``prior_weight`` = k pseudo-trials of the
    global rate). The global estimate starts at ``prior_alpha`` (``null``: the acceptance model's mean α, i.e.
    what the offline tables assume). ``per_request=false`` uses α̂_g for everyone.

    When γ = 0 is chosen nothing is learnt, so every ``explore_every`` consecutive γ = 0 iterations one runs
    at γ = 1 (0 = never) — this lets it notice acceptance drifting up.

    Under ``cluster.prefill=chunked`` (``BatchView.token_budget`` set) γ above budget // b − 1 is never chosen,
    and ``budget_pricing`` says how the prompt tokens a γ displaces (``prefill_waiting_tokens`` it takes budget
    from) are priced: ``displaced`` (default) T = :func:`budget_seconds`, the verify step plus the prefill cost
    γ adds now and later over γ = 0's; ``cap`` plain T (only the cap); ``work`` G = (Σ E + p(γ)) / T_mixed,
    prompt tokens counted like output tokens. The other policies ignore the budget (the scheduler caps their
    γ at budget // b − 1); ``adaptive``'s table is built without it.
    """

    name = "goodput"

    def __init__(self, ema: float = 0.05, per_request: bool = True, prior_alpha: float | None = None,
                 prior_weight: float = 4.0, explore_every: int = 50, max_gamma: int | None = None,
                 budget_pricing: str = "displaced"):
        if budget_pricing not in BUDGET_PRICING:
            raise ValueError(f"policy.budget_pricing is {budget_pricing!r}; expected one of {list(BUDGET_PRICING)}")
        self.budget_pricing = budget_pricing
        self.ema = _check_prob(ema, "policy.ema")
        self.per_request = _check_bool(per_request, "policy.per_request")
        self.prior_alpha = None if prior_alpha is None else _check_prob(prior_alpha, "policy.prior_alpha", lo_open=False)
        self.prior_weight = _check_positive(prior_weight, "policy.prior_weight", "a number of pseudo-trials")
        self.explore_every = _check_int(explore_every, "policy.explore_every")
        self.max_gamma = None if max_gamma is None else _check_int(max_gamma, "policy.max_gamma")

    def setup(self, cost: CostModel, acceptance: AcceptanceModel, context) -> None:
        self.cost = cost
        self.gmax = min(cost.max_gamma, cost.max_gamma if self.max_gamma is None else self.max_gamma)
        a0 = float(acceptance.mean_alpha if self.prior_alpha is None else self.prior_alpha)
        self.alpha0 = min(a0, 0.999)
        # Global counts start as 1/ema pseudo-trials at the prior (one EMA window).
        self.n_g = 1.0 / self.ema
        self.s_g = self.alpha0 * self.n_g
        self._s = np.zeros(1024)
        self._n = np.zeros(1024)
        self._zero_run = 0
        self._powers = np.arange(self.gmax + 2)

    def _grow(self, top: int) -> None:
        if top >= len(self._s):
            n = max(top + 1, 2 * len(self._s))
            self._s = np.concatenate([self._s, np.zeros(n - len(self._s))])
            self._n = np.concatenate([self._n, np.zeros(n - len(self._n))])

    def alpha_global(self) -> float:
        """The current global acceptance estimate α̂_g."""
        return self.s_g / self.n_g

    def alphas(self, ids: np.ndarray) -> np.ndarray:
        """Per-request acceptance estimates α̂_i for ``ids`` (shrunk towards α̂_g)."""
        ag = self.alpha_global()
        if not self.per_request or len(ids) == 0:
            return np.full(len(ids), ag)
        self._grow(int(ids.max()))
        k = self.prior_weight
        return (self._s[ids] + k * ag) / (self._n[ids] + k)

    def predicted_goodput(self, view: BatchView) -> np.ndarray:
        """Predicted tokens/second of the batch for γ = 0..max_gamma."""
        a = np.clip(self.alphas(view.ids), 0.0, 0.999)
        # E_i(γ) = Σ_{k=0..γ} a_i^k, summed over requests: cumulative sum of Σ_i a_i^k.
        pw = (a[:, None] ** self._powers[None, : self.gmax + 1]).sum(axis=0)
        e = np.cumsum(pw)
        t = np.array([self.cost.iteration(view.batch, g, view.step_context) for g in range(self.gmax + 1)])
        if view.token_budget is not None:  # chunked prefill: price the prefill each γ displaces
            return self._budget_goodput(view, e, t)
        return e / t

    def _budget_goodput(self, view: BatchView, e: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Predicted goodput per γ under a token budget (``budget_pricing``, class docstring)."""
        b, budget, waiting = view.batch, view.token_budget, view.prefill_waiting_tokens
        how = getattr(self, "budget_pricing", "displaced")
        if how == "displaced":
            return e / budget_seconds(self.cost, b, view.step_context, budget, waiting, self.gmax)
        out = np.zeros(len(e))
        for g in range(len(e)):
            if b * (g + 1) > budget:
                break
            if how == "cap":
                out[g] = e[g] / t[g]
                continue
            p = min(waiting, budget - b * (g + 1))  # "work": prompt tokens count like output tokens
            extra, step = self.cost.mixed_iteration(b, g, view.step_context, [(0, p)] if p > 0 else [], True)
            out[g] = (e[g] + p) / (extra + step)
        return out

    def choose(self, view: BatchView) -> int:
        g = int(np.argmax(self.predicted_goodput(view)))
        if g == 0 and self.explore_every and self.gmax >= 1:
            self._zero_run += 1
            if self._zero_run >= self.explore_every:
                self._zero_run = 0
                return 1
        elif g:
            self._zero_run = 0
        return g

    def observe(self, view: BatchView, gamma: int, accepted: np.ndarray) -> None:
        if gamma == 0 or len(accepted) == 0:
            return
        acc = accepted.astype(float)
        trials = acc + (accepted < gamma)
        d = 1.0 - self.ema
        self.s_g = d * self.s_g + self.ema * float(acc.mean())
        self.n_g = d * self.n_g + self.ema * float(trials.mean())
        if self.per_request:
            ids = view.ids
            self._grow(int(ids.max()))
            self._s[ids] = d * self._s[ids] + acc
            self._n[ids] = d * self._n[ids] + trials

    def describe(self) -> dict:
        return {"name": self.name, "ema": self.ema, "per_request": self.per_request, "prior_alpha": self.prior_alpha,
                "prior_weight": self.prior_weight, "explore_every": self.explore_every,
                **({} if self.budget_pricing == "displaced" else {"budget_pricing": self.budget_pricing})}


def _parse_ranges(ranges, key: str = "policy.ranges") -> list[tuple[int, int]]:
    """``[[min_batch, γ], ...]`` → sorted list of (min_batch, γ); the first must start at batch 1."""
    if not isinstance(ranges, (list, tuple)) or not ranges:
        raise ValueError(f"{key} is {ranges!r}; expected a list of [min_batch, gamma] pairs starting at batch 1")
    out = []
    for i, r in enumerate(ranges):
        if not isinstance(r, (list, tuple)) or len(r) != 2:
            raise ValueError(f"{key}[{i}] is {r!r}; expected a [min_batch, gamma] pair")
        out.append((_check_int(r[0], f"{key}[{i}][0] (min_batch)", 1), _check_int(r[1], f"{key}[{i}][1] (gamma)")))
    out.sort()
    if out[0][0] != 1:
        raise ValueError(f"{key}: the first range starts at batch {out[0][0]}; it must start at batch 1")
    if len({b for b, _ in out}) != len(out):
        raise ValueError(f"{key}: two ranges start at the same batch size")
    return out


def table_to_ranges(table: np.ndarray | list[int]) -> list[tuple[int, int, int]]:
    """Compress a γ*(b) table (b = 1..len) into (first batch, last batch, γ) runs."""
    out: list[tuple[int, int, int]] = []
    for b, g in enumerate(table, start=1):
        if out and out[-1][2] == int(g):
            out[-1] = (out[-1][0], b, int(g))
        else:
            out.append((b, b, int(g)))
    return out


@register
class Threshold(Policy):
    """vLLM-style batch-size ranges → γ. ``ranges``: ``[[min_batch, γ], ...]`` (each applies from its
    min_batch up to the next one's); ``off_above``: γ = 0 for batches above this size (vLLM's
    ``speculative_disable_by_batch_size``). ``ranges: null`` derives the ranges from the profile's γ*(b)
    table at the reference context (what ``specbatch-tune`` exports), so only ``off_above`` is hand-set.
    """

    name = "threshold"

    def __init__(self, ranges: list | None = None, off_above: int | None = None):
        self.ranges = None if ranges is None else _parse_ranges(ranges)
        self.off_above = None if off_above is None else _check_int(off_above, "policy.off_above", 1)
        self._table: list[int] = []

    def setup(self, cost: CostModel, acceptance: AcceptanceModel, context) -> None:
        if self.ranges is None:
            self.ranges = [(lo, g) for lo, _, g in table_to_ranges(optimal_gamma_table(cost, acceptance, context))]
        table = []
        for b in range(1, cost.max_batch + 1):
            g = [g for lo, g in self.ranges if lo <= b][-1]
            if self.off_above is not None and b > self.off_above:
                g = 0
            table.append(min(g, cost.max_gamma))
        self._table = table

    def choose(self, view: BatchView) -> int:
        return self._table[view.batch - 1]

    def steady_gamma(self, batch: int, context: float) -> tuple[int, float]:
        return self._table[batch - 1], np.inf

    def describe(self) -> dict:
        return {"name": self.name, "ranges": [list(r) for r in self.ranges] if self.ranges else None,
                "off_above": self.off_above}


@register
class EmaTiers(Policy):
    """SGLang-style: γ from the EMA of the accepted length within tiers, with hysteresis.

    ``r`` = EMA (weight ``ema`` for the newest iteration) of the accepted length relative to the current
    tier, accepted draft tokens per sequence / γ, over speculative iterations; it starts at the acceptance
    model's expectation at the start tier. ``tiers`` is the ascending list of allowed γ. The policy moves up
    one tier when ``r ≥ up_ratio`` (drafts are mostly accepted in full: speculate further) and down one when
    ``r < down_ratio``; after a switch it holds for ``hold`` speculative iterations so the EMA can settle
    (together with the gap between the two ratios, this is the hysteresis). It looks only at acceptance,
    not at batch size or cost.
    """

    name = "ema_tiers"

    def __init__(self, tiers: list[int] = (1, 2, 4, 6, 8), start: int | None = None, ema: float = 0.1,
                 up_ratio: float = 0.7, down_ratio: float = 0.4, hold: int = 20):
        tiers = [_check_int(t, f"policy.tiers[{i}]", 1) for i, t in enumerate(tiers)]
        if not tiers or sorted(set(tiers)) != tiers:
            raise ValueError(f"policy.tiers is {tiers!r}; expected a non-empty ascending list of distinct γ ≥ 1")
        self.tiers = tiers
        if start is not None and start not in tiers:
            raise ValueError(f"policy.start is {start!r}; expected one of policy.tiers {tiers}")
        self.start = start
        self.ema = _check_prob(ema, "policy.ema")
        self.up_ratio = _check_prob(up_ratio, "policy.up_ratio")
        self.down_ratio = _check_prob(down_ratio, "policy.down_ratio", lo_open=False)
        if not self.down_ratio < self.up_ratio:
            raise ValueError(f"policy.down_ratio ({down_ratio}) must be below policy.up_ratio ({up_ratio})")
        self.hold = _check_int(hold, "policy.hold")

    def setup(self, cost: CostModel, acceptance: AcceptanceModel, context) -> None:
        given = self.given_tiers = getattr(self, "given_tiers", self.tiers)
        self.tiers = [t for t in given if t <= cost.max_gamma] or [min(1, cost.max_gamma)]
        if self.tiers != given:
            warnings.warn(f"policy.tiers {given} go above the largest γ of this run ({cost.max_gamma}, "
                          f"the cost model's max_gamma); using tiers {self.tiers}"
                          + (f" and starting at {self.tiers[(len(self.tiers) - 1) // 2]} instead of policy.start="
                             f"{self.start}" if self.start is not None and self.start not in self.tiers else ""),
                          PolicyWarning, stacklevel=2)
        start = self.start if self.start in self.tiers else self.tiers[(len(self.tiers) - 1) // 2]
        self.level = self.tiers.index(start)
        self.ratio = (acceptance.expected_tokens(start) - 1.0) / max(1, start)
        self.since_switch = 0
        self.switches = 0

    def choose(self, view: BatchView) -> int:
        return self.tiers[self.level]

    def observe(self, view: BatchView, gamma: int, accepted: np.ndarray) -> None:
        if gamma == 0 or len(accepted) == 0:
            return
        self.ratio = (1 - self.ema) * self.ratio + self.ema * float(accepted.mean()) / gamma
        self.since_switch += 1
        if self.since_switch < self.hold:
            return
        lvl = self.level
        if self.ratio >= self.up_ratio and lvl + 1 < len(self.tiers):
            self.level += 1
        elif self.ratio < self.down_ratio and lvl > 0:
            self.level -= 1
        if self.level != lvl:
            self.switches += 1
            self.since_switch = 0

    def describe(self) -> dict:
        return {"name": self.name, "tiers": self.tiers, "ema": self.ema, "up_ratio": self.up_ratio,
                "down_ratio": self.down_ratio, "hold": self.hold, "switches": getattr(self, "switches", None)}
