"""Timing of one grid point: warm-up, then repeats until a relative precision or a time budget is reached.

GPU: CUDA events around the step, synchronised after each repeat. CPU: ``time.perf_counter``, or the process's
CPU time (``timing.clock``, :func:`resolve_clock`).
All results are seconds per step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Stats:
    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    rel_se: float  # standard error of the median / median (robust, from the MAD)


def summarize(samples: list[float]) -> Stats:
    x = np.asarray(samples, dtype=float)
    med = float(np.median(x))
    return Stats(med, float(np.percentile(x, 10)), float(np.percentile(x, 90)), len(x), rel_se(x))


def rel_se(x: np.ndarray) -> float:
    """Robust relative standard error of the median: 1.2533 * 1.4826 * MAD / sqrt(n) / median."""
    if len(x) < 2:
        return float("inf")
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    return 1.2533 * 1.4826 * mad / np.sqrt(len(x)) / med if med > 0 else float("inf")


CLOCKS = ("auto", "wall", "cpu")  # timing.clock


def resolve_clock(clock: str, device: str, threads: int) -> str:
    """``timing.clock`` made concrete. ``auto``: the process's CPU time on a CPU with one torch thread (steps
    then cost what they compute, whatever else the machine runs: a descheduled step is not charged for the
    wait), else the wall clock (CUDA events on a GPU). ``cpu`` counts every thread's CPU time, so it needs
    ``threads=1``; it cannot see GPU work."""
    if clock not in CLOCKS:
        raise ValueError(f"timing.clock={clock!r}; expected one of {list(CLOCKS)}")
    cuda = str(device).startswith("cuda")
    if clock == "auto":
        return "cpu" if not cuda and threads == 1 else "wall"
    if clock == "cpu" and (cuda or threads != 1):
        raise ValueError(f"timing.clock=cpu with device={device!r}, threads={threads}: the CPU-time clock needs the "
                         "CPU with threads=1 (it sums every thread's time and does not see GPU work)")
    return clock


def make_timer(device: str, clock: str = "wall") -> Callable[[Callable[[], None]], float]:
    """A function ``timer(step) -> seconds`` that runs ``step`` once and times it on ``device``: CUDA events on a
    GPU, else ``time.perf_counter`` (``clock="wall"``) or ``time.process_time`` (``clock="cpu"``)."""
    if clock == "cpu":
        def cpu_time_timer(step):
            t0 = time.process_time()
            step()
            return time.process_time() - t0

        return cpu_time_timer
    if str(device).startswith("cuda"):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def cuda_timer(step):
            torch.cuda.synchronize()
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_timer

    def cpu_timer(step):
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    return cpu_timer


def measure(step: Callable[[], None], timer: Callable, *, reset: Callable[[], None] | None = None, warmup: int = 2,
            min_samples: int = 5, max_samples: int = 50, rel_precision: float = 0.02, budget_s: float = 2.0,
            floor_samples: int = 3) -> Stats:
    """Time ``step`` (``reset`` runs untimed after each call, e.g. a cache rollback).

    Stops when ``min_samples`` are in and the relative standard error of the median is below
    ``rel_precision``; or when ``budget_s`` of timed work is spent and ``floor_samples`` are in; or at
    ``max_samples``. Warm-up calls are not counted (at most ``warmup``, fewer if one exceeds the budget).
    """
    t_begin = time.perf_counter()
    for _ in range(warmup):
        step()
        if reset:
            reset()
        if time.perf_counter() - t_begin > budget_s:
            break
    samples: list[float] = []
    t_begin = time.perf_counter()
    while len(samples) < max_samples:
        samples.append(timer(step))
        if reset:
            reset()
        n = len(samples)
        if n >= min_samples and rel_se(np.asarray(samples)) <= rel_precision:
            break
        if n >= floor_samples and time.perf_counter() - t_begin >= budget_s:
            break
    return summarize(samples)


def measure_point(step: Callable[[], None], timer: Callable, tm, *, reset: Callable[[], None] | None = None,
                  budget_s: float | None = None) -> Stats:
    """:func:`measure` with the profile config's ``timing`` settings ``tm`` (warmup, min/max/floor samples,
    rel_precision; ``point_budget_s`` unless ``budget_s`` is given), as every profiled point is timed."""
    return measure(step, timer, reset=reset, warmup=int(tm.warmup), min_samples=int(tm.min_samples),
                   max_samples=int(tm.max_samples), rel_precision=float(tm.rel_precision),
                   budget_s=float(tm.point_budget_s) if budget_s is None else budget_s,
                   floor_samples=int(tm.floor_samples))
