"""SimPy helper: an event at an exact simulated time.

``env.timeout(at - env.now)`` fires at ``env.now + (at - env.now)``, which floating point can put one ulp
away from ``at`` — and some times are unreachable that way. The simulator computes iteration boundaries as
running sums of step times; :func:`at_time` fires exactly there, so a run's clock does not depend on how
many iterations one event covered.
"""
from __future__ import annotations

from heapq import heappush

import simpy
from simpy.events import NORMAL, URGENT  # noqa: F401  (re-exported for callers choosing a priority)


def at_time(env: simpy.Environment, when: float, priority: int = NORMAL) -> simpy.Event:
    """A triggered event processed at simulated time ``when`` (seconds, ≥ ``env.now``).

    At equal times SimPy processes ``URGENT`` events before ``NORMAL`` ones, then in scheduling order.
    This is ``Environment.schedule`` with an absolute time instead of a delay (SimPy 4's event queue)."""
    if when < env.now:
        raise ValueError(f"at_time({when!r}) is before the current simulated time {env.now!r}")
    ev = simpy.Event(env)
    ev._ok, ev._value = True, None  # what Timeout does: a succeeded event waiting in the queue
    heappush(env._queue, (when, priority, next(env._eid), ev))
    return ev
