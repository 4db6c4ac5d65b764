"""The simulator's two uses of SimPy that its public API does not offer (simpy>=4,<5; checked on 4.1.2).

This is the only module that reads or writes SimPy's underscored names; a SimPy upgrade is checked here.

* :func:`at_time` — an event at an exact simulated time. ``env.timeout(at - env.now)`` (and the public
  ``Environment.schedule``, which takes a delay) fire at ``env.now + (at - env.now)``, which floating point
  can put one ulp away from ``at``, and some times are unreachable that way. The simulator computes
  iteration boundaries as running sums of step times; :func:`at_time` fires exactly there, so a run's clock
  does not depend on how many iterations one event covered.
* :func:`hand_over` — move a waiting process from one pending event to another. The public way,
  ``Process.interrupt``, costs an extra event and an exception raised into the process's generator; a
  fast-forward plan that is cut short hands its wake-up over once per cut.
"""
from __future__ import annotations

from heapq import heappush

import simpy
from simpy.events import NORMAL, URGENT

__all__ = ["NORMAL", "URGENT", "at_time", "hand_over"]


def at_time(env: simpy.Environment, when: float, priority: int = NORMAL) -> simpy.Event:
    """A triggered event processed at simulated time ``when`` (seconds, ≥ ``env.now``).

    At equal times SimPy processes ``URGENT`` events before ``NORMAL`` ones, then in scheduling order.
    This is ``Environment.schedule`` with an absolute time instead of a delay: SimPy 4 keeps its event
    queue in ``env._queue`` as a heap of ``(time, priority, event id, event)``, and a succeeded event has
    ``_ok = True`` and its ``_value`` set (what ``Timeout`` sets up)."""
    if when < env.now:
        raise ValueError(f"at_time({when!r}) is before the current simulated time {env.now!r}")
    ev = simpy.Event(env)
    ev._ok, ev._value = True, None
    heappush(env._queue, (when, priority, next(env._eid), ev))
    return ev


def hand_over(process: simpy.Process, old: simpy.Event, new: simpy.Event) -> None:
    """Make ``process``, waiting on the pending ``old``, wait on ``new`` instead.

    In SimPy 4 a process waits on an event as one of its callbacks (``Process._resume``) and keeps the
    event in ``Process._target``. Both move to ``new``; ``old``, still queued, then fires with nobody
    waiting, as ``Process.interrupt`` leaves it."""
    new.callbacks, old.callbacks = old.callbacks, []
    process._target = new
