"""Per-request state of a simulation, held column-wise in numpy arrays indexed by request id.

Times are simulated seconds (NaN until the event happens). Token counts are tokens.
``generated`` counts output tokens produced so far (the first comes from prefill); a request is finished
when ``generated == output_tokens``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .workload import Workload


class RequestTable:
    """Column store of every request's state and per-request metrics."""

    def __init__(self, w: Workload):
        n = len(w)
        self.n = n
        self.arrival = w.arrival_s.astype(float)
        self.prompt = w.prompt_tokens.astype(np.int64)
        self.output = w.output_tokens.astype(np.int64)
        self.request_class = w.request_class
        self.generated = np.zeros(n, np.int64)
        self.replica = np.full(n, -1, np.int64)
        self.admitted = np.full(n, np.nan)  # first admission into a running batch
        self.first_token = np.full(n, np.nan)
        self.finished = np.full(n, np.nan)
        self.iterations = np.zeros(n, np.int64)  # decode/verify iterations the request took part in
        self.preemptions = np.zeros(n, np.int64)
        self.gamma_sum = np.zeros(n, np.int64)  # Σ γ over its iterations
        self.accepted_sum = np.zeros(n, np.int64)  # Σ accepted draft tokens (before the output cap)
        self.rejected = np.zeros(n, bool)  # never served: needs more KV than a replica has
        self.accept_thr = np.ones((n, 1))  # P(≥ j draft tokens accepted), set by the simulator
        self.shared_thr: np.ndarray | None = None  # the one row of accept_thr when all rows are equal

    INPUTS = ("arrival", "prompt", "output", "rejected", "accept_thr")
    STATE = ("generated", "replica", "admitted", "first_token", "finished", "iterations", "preemptions", "gamma_sum",
             "accepted_sum")

    def subset(self, ids: np.ndarray) -> "RequestTable":
        """A copy holding only the requests ``ids`` (renumbered 0..len(ids)-1 in that order)."""
        sub = object.__new__(RequestTable)
        sub.n = len(ids)
        for name in self.INPUTS + self.STATE:
            setattr(sub, name, getattr(self, name)[ids])
        sub.request_class = None if self.request_class is None else self.request_class[ids]
        sub.shared_thr = self.shared_thr
        return sub

    def state(self) -> dict[str, np.ndarray]:
        """The simulation state columns (:attr:`STATE`) by name."""
        return {name: getattr(self, name) for name in self.STATE}

    def update(self, ids: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Copy the :meth:`state` of a :meth:`subset` for ``ids`` back into these rows."""
        for name in self.STATE:
            getattr(self, name)[ids] = state[name]

    def frame(self) -> pd.DataFrame:
        """One row per request with its timestamps and derived latencies (seconds)."""
        out = self.output
        tpot = np.where(out > 1, (self.finished - self.first_token) / np.maximum(out - 1, 1), np.nan)
        df = pd.DataFrame({
            "request": np.arange(self.n), "replica": self.replica, "arrival_s": self.arrival,
            "admitted_s": self.admitted, "first_token_s": self.first_token, "finished_s": self.finished,
            "prompt_tokens": self.prompt, "output_tokens": out, "generated_tokens": self.generated,
            "iterations": self.iterations, "preemptions": self.preemptions,
            "mean_gamma": np.where(self.iterations > 0, self.gamma_sum / np.maximum(self.iterations, 1), np.nan),
            "accepted_tokens": self.accepted_sum, "rejected": self.rejected,
            "ttft_s": self.first_token - self.arrival, "tpot_s": tpot, "latency_s": self.finished - self.arrival,
        })
        if self.request_class is not None:
            df["request_class"] = self.request_class
        return df
