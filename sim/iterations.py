"""The iterations table: one row per replica iteration, recorded as the simulation runs.

:class:`IterationLog` appends rows (single iterations, or whole fast-forwarded plans) into typed columns
without a Python object per row; :func:`iterations_frame` turns its matrix into the table saved as
``iterations.parquet``; :func:`sort_rows` and :func:`merge_sorted_rows` order the rows of several replicas
(or of several worker processes) by start time, then replica.
"""
from __future__ import annotations

import math
from array import array
from typing import NamedTuple

import numpy as np
import pandas as pd

ITERATION_COLUMNS = ("start_s", "replica", "batch", "gamma", "prefill_s", "step_s", "tokens", "accepted", "admitted",
                     "preempted", "queue", "kv_tokens", "context", "context_max")


class IterationRow(NamedTuple):
    """One iteration of one replica: the fields of :data:`ITERATION_COLUMNS`, in that order."""

    start_s: float  # when the iteration started (s)
    replica: int
    batch: int  # sequences in the step (0: no step, only prefill)
    gamma: int  # draft tokens proposed per sequence
    prefill_s: float  # seconds of prefill before the step
    step_s: float  # seconds of the step
    tokens: int  # tokens produced: the step's, after the output caps, + one per admitted request
    accepted: int  # draft tokens accepted
    admitted: int  # requests prefilled
    preempted: int  # requests preempted
    queue: int  # requests waiting after the iteration
    kv_tokens: int  # KV tokens held after the iteration
    context: float  # the batch's mean context (tokens) at the step
    context_max: float  # the longest sequence's context (tokens) under padded attention; NaN under paged


INT_COLUMNS = ("replica", "batch", "gamma", "tokens", "accepted", "admitted", "preempted", "queue", "kv_tokens")


class IterationLog:
    """Append-only record of every iteration, in the order of :data:`ITERATION_COLUMNS`.

    Iterations stepped one at a time arrive as rows (:meth:`add`) and go to compact ``array('d')``
    columns. Fast-forward plans arrive whole (:meth:`add_plan`): their per-iteration floats go to flat lists
    and their token counts are kept as the arrays the plan holds; every :attr:`FLUSH_PLANS` plans they are
    turned into rows together, in a few vectorised operations, so a plan costs a handful of list operations.
    :meth:`frame` assembles the table."""

    FLUSH_PLANS = 1024

    def __init__(self):
        self.cols = [array("d") for _ in ITERATION_COLUMNS]
        self._appenders = [c.append for c in self.cols]
        self.blocks: list[np.ndarray] = []
        self._clear_pending()

    def _clear_pending(self) -> None:
        self._plans: list[tuple] = []  # (replica, n, γ, prefill_s, admitted, queue0, ctx0, kv_last, cut, rows)
        self._times: list[float] = []  # every pending iteration's start time, step seconds, contexts
        self._steps: list[float] = []
        self._contexts: list[float] = []
        self._maxes: list[float] = []
        self._tot: list = []  # per plan: cumulative tokens (an array)
        self._rows = 0  # rows held by the pending plans
        self._bumps: list[int] = []  # pending rows from which the queue is one longer ...
        self._unbumps: list[int] = []  # ... until (exclusive) these rows

    def add(self, row: IterationRow) -> None:
        """Append one row."""
        for f, v in zip(self._appenders, row):
            f(v)

    def add_plan(self, replica: int, n: int, gamma: int, prefill_s: float, admitted: int, queue0: int, ctx0: int,
                 kv_last: int, cut: int, times, steps, contexts, maxes, tot, queued_from: list[int]) -> None:
        """Append the ``rows = len(steps)`` iterations of a fast-forward plan for a batch of ``n`` at ``gamma``:
        start ``times`` (s), ``steps`` (s), mean ``contexts`` and longest sequences' ``maxes`` (tokens; ``None``:
        not tracked, NaN) and ``tot`` (tokens the batch gained by the end of each iteration, before the output
        caps), one entry per iteration (``times``, ``steps``, ``contexts`` and ``maxes`` are copied, best as
        lists of floats; ``tot``, an integer array, is kept: do not modify it). Iteration 0 carries
        ``prefill_s`` and the ``admitted`` requests; the last loses ``cut`` tokens to the output caps and leaves
        ``kv_last`` tokens of KV (the others: ``ctx0`` + ``tot``). The queue holds ``queue0`` requests, plus
        one from each iteration index in ``queued_from``."""
        rows = len(steps)
        for j in queued_from:
            self._bumps.append(self._rows + j)
            self._unbumps.append(self._rows + rows)
        self._plans.append((replica, n, gamma, prefill_s, admitted, queue0, ctx0, kv_last, cut, rows))
        self._times.extend(times)  # flat lists: one conversion per flush instead of one per plan
        self._steps.extend(steps)
        self._contexts.extend(contexts)
        self._maxes.extend(maxes or [math.nan] * rows)
        self._tot.append(tot)
        self._rows += rows
        if len(self._plans) >= self.FLUSH_PLANS:
            self._flush()

    def _flush(self) -> None:
        """Turn the pending plans into one float64 block of rows (same values a row per iteration gives)."""
        if not self._plans:
            return
        meta = np.array(self._plans, dtype=float).T
        replica, n, gamma, prefill_s, admitted, queue0, ctx0, kv_last, cut, rows = meta
        counts = rows.astype(np.int64)
        first = np.zeros(len(counts), np.int64)  # each plan's first row
        np.cumsum(counts[:-1], out=first[1:])
        last = first + counts - 1
        total = self._rows
        blk = np.empty((len(ITERATION_COLUMNS), total))
        blk[0] = self._times
        blk[1], blk[2], blk[3] = np.repeat(replica, counts), np.repeat(n, counts), np.repeat(gamma, counts)
        blk[4], blk[8], blk[9] = 0.0, 0.0, 0.0
        blk[4, first], blk[8, first] = prefill_s, admitted
        blk[5] = self._steps
        tot = np.concatenate(self._tot).astype(float)
        tokens = blk[6]
        tokens[0] = tot[0]
        np.subtract(tot[1:], tot[:-1], out=tokens[1:])
        tokens[first] = tot[first]
        np.subtract(tokens, blk[2], out=blk[7])  # accepted = gained − one token per sequence
        tokens[first] += admitted
        tokens[last] -= cut
        delta = np.bincount(self._bumps, minlength=total + 1) - np.bincount(self._unbumps, minlength=total + 1)
        np.add(np.repeat(queue0, counts), np.cumsum(delta[:-1]), out=blk[10])
        np.add(np.repeat(ctx0, counts), tot, out=blk[11])
        blk[11, last] = kv_last
        blk[12] = self._contexts
        blk[13] = self._maxes
        self.blocks.append(blk)
        self._clear_pending()

    def __len__(self) -> int:
        return len(self.cols[0]) + sum(b.shape[1] for b in self.blocks) + self._rows

    def data(self, sort: bool = False) -> np.ndarray:
        """The rows as one float64 matrix ``(len(ITERATION_COLUMNS), rows)``, in append order (single rows
        first, then plans) or, with ``sort``, by start time then replica (:func:`sort_rows`). Empties the
        log: its memory goes to the matrix."""
        self._flush()
        parts = [[np.frombuffer(col, dtype=float) for col in self.cols]] + self.blocks
        self.__init__()
        data = join_rows(parts)
        return sort_rows(data) if sort else data

    def frame(self, sort: bool = False) -> pd.DataFrame:
        """:meth:`data` as the iterations table (:func:`iterations_frame`)."""
        return iterations_frame(self.data(sort))


def join_rows(parts: list) -> np.ndarray:
    """Blocks of iteration rows side by side, in order, as one new matrix ``(len(ITERATION_COLUMNS), rows)``.
    A block is a matrix or a list of columns (one 1-D array per column, equal lengths). Each entry of
    ``parts`` is cleared once copied, so only one copy of the rows is held at a time."""
    data = np.empty((len(ITERATION_COLUMNS), sum(len(p[0]) for p in parts)))
    pos = 0
    for k, part in enumerate(parts):
        width = len(part[0])
        for i in range(len(ITERATION_COLUMNS)):
            data[i, pos:pos + width] = part[i]
        pos += width
        parts[k] = part = None
    return data


def sort_rows(data: np.ndarray) -> np.ndarray:
    """Iteration rows (a :meth:`IterationLog.data` matrix) ordered by start time, then replica; stable.
    Sorts ``data`` in place, one column of the table at a time (a copy of one row of the matrix at most), and
    returns it."""
    order = np.lexsort((data[1], data[0]))
    for row in data:
        row[:] = row[order]
    return data


def merge_sorted_rows(runs: list[np.ndarray]) -> pd.DataFrame:
    """The iterations table of several row matrices (as :meth:`IterationLog.data` gives), each already sorted
    by :func:`sort_rows`, where every replica of a run has a lower index than every replica of the next:
    equal to ``iterations_frame(sort_rows(join_rows(runs)))``, bit for bit and row for row.

    Ordering the runs' start times with a stable sort merges them (ties: earlier run first, so lower
    replicas first, then each run's own order); each column is then written straight to its place in its
    final dtype, with no joined copy of the rows."""
    order = np.argsort(np.concatenate([run[0] for run in runs]), kind="stable")  # timsort: merges sorted runs
    place = np.empty_like(order)  # place[k] = final row of the k-th row of the runs laid end to end
    place[order] = np.arange(len(order))
    bounds = np.cumsum([0] + [run.shape[1] for run in runs]).tolist()
    cols = {}
    for i, c in enumerate(ITERATION_COLUMNS):
        col = cols[c] = np.empty(len(order), np.int64 if c in INT_COLUMNS else float)
        for run, lo, hi in zip(runs, bounds, bounds[1:]):
            col[place[lo:hi]] = run[i]
    return pd.DataFrame(cols, copy=False)


def iterations_frame(data: np.ndarray) -> pd.DataFrame:
    """The iterations table from a :meth:`IterationLog.data` matrix (integer columns as int64)."""
    cols = {c: data[i].astype(np.int64) if c in INT_COLUMNS else data[i] for i, c in enumerate(ITERATION_COLUMNS)}
    return pd.DataFrame(cols, copy=False)
