"""Speculation policies: each iteration, pick the speculation length γ for a replica's running batch.

A policy sees only the present and the past: :meth:`Policy.choose` gets the running batch (size, mean
context, request ids, the clock) and :meth:`Policy.observe` is told, after an iteration, what was
accepted. Nothing about future arrivals or a request's remaining output is passed in.

Adding a policy is one small class plus a ``conf/policy/<name>.yaml`` whose ``name`` is registered with
:func:`register`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .acceptance import AcceptanceModel
from .cost_model import CostModel


@dataclass(slots=True)
class BatchView:
    """What a policy may look at when it picks γ: the running batch right now."""

    now: float  # simulated seconds
    replica: int
    batch: int  # running sequences
    context: float  # mean KV length of the batch (tokens)
    ids: np.ndarray  # request ids in the batch


class Policy:
    """Base class. ``uses_draft`` = False means the draft model is never loaded (no draft KV, no prefill)."""

    name = "policy"
    uses_draft = True

    def setup(self, cost: CostModel, acceptance: AcceptanceModel, context: float) -> None:
        """Offline preparation with the cost model, the acceptance model and a reference context (tokens)."""

    def choose(self, view: BatchView) -> int:
        raise NotImplementedError

    def observe(self, view: BatchView, gamma: int, accepted: np.ndarray) -> None:
        """Feedback after an iteration: accepted draft tokens per request in ``view.ids``."""

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


@register
class Fixed(Policy):
    """γ = ``gamma`` always (``gamma = 0`` still loads the draft; use ``none`` for no draft)."""

    name = "fixed"

    def __init__(self, gamma: int = 4):
        if not isinstance(gamma, (int, np.integer)) or gamma < 0:
            raise ValueError(f"policy.gamma is {gamma!r}; expected an integer ≥ 0")
        self.gamma = int(gamma)

    def choose(self, view: BatchView) -> int:
        return self.gamma

    def describe(self) -> dict:
        return {"name": self.name, "gamma": self.gamma}


def goodput_table(cost: CostModel, acceptance: AcceptanceModel, context: float,
                  max_gamma: int | None = None) -> np.ndarray:
    """Expected tokens per second per sequence, array ``[γ, b-1]`` for γ = 0..max_gamma, b = 1..max_batch:
    E[tokens | α, γ] / (γ·T_draft(b, c) + T_verify(b, γ, c)). Multiply by b for batch throughput."""
    max_gamma = cost.max_gamma if max_gamma is None else max_gamma
    e = np.array([acceptance.expected_tokens(g) for g in range(max_gamma + 1)])
    t = cost.iteration_table(context)[: max_gamma + 1]
    return e[:, None] / t


def optimal_gamma_table(cost: CostModel, acceptance: AcceptanceModel, context: float,
                        max_gamma: int | None = None) -> np.ndarray:
    """γ*(b) for b = 1..max_batch: argmax_γ b·E[tokens | α, γ] / (γ·T_draft(b, c) + T_verify(b, γ, c)).
    Ties go to the smaller γ."""
    return goodput_table(cost, acceptance, context, max_gamma).argmax(axis=0)


@register
class Adaptive(Policy):
    """The batch-size table γ*(b), built offline from the profile at a reference context.

    ``context``: reference KV length in tokens; ``null`` uses the workload's mean context (mean prompt plus
    half the mean output), passed by the simulator at setup.
    """

    name = "adaptive"

    def __init__(self, context: float | None = None, max_gamma: int | None = None):
        self.context = context
        self.max_gamma = max_gamma
        self.table: np.ndarray | None = None

    def setup(self, cost: CostModel, acceptance: AcceptanceModel, context: float) -> None:
        self.context = float(self.context if self.context is not None else context)
        self.table = optimal_gamma_table(cost, acceptance, self.context, self.max_gamma)
        self._table = self.table.tolist()

    def choose(self, view: BatchView) -> int:
        return self._table[view.batch - 1]

    def describe(self) -> dict:
        return {"name": self.name, "context": self.context,
                "table": {int(b + 1): int(g) for b, g in enumerate(self.table)} if self.table is not None else None}
