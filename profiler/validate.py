"""specbatch-validate: does the simulator agree with real execution on this machine?

For a draft/target pair it (1) profiles the pair here (or reuses a fresh profile), (2) replays the same
trace slice through the real engine (:mod:`profiler.engine`) and through the simulator
(:func:`sim.cluster.simulate`) with the same policy, acceptance model, seed and cluster shape, and
(3) reports the relative error ``(sim − real) / real`` of mean, p50 and p99 end-to-end latency, TTFT, TPOT
and throughput, plus a self-contained dashboard overlaying the two latency CDFs and iteration timelines.

    specbatch-validate                                # reduced: tiny pair, 2 loads x 3 policies
    specbatch-validate --pair llama-68m:tiny-llama-draft --requests 120 --out fidelity-out
    specbatch-validate --clock wall                   # wall clock (a quiet machine of your own)

Modelling of what the profile misses (the report's simulator variants): the profile times each step alone,
on a batch whose sequences all have the same context, back to back. The engine also spends time between
and around those steps, and its steps run inside a serving loop. :class:`EngineCostModel` adds the
engine-side terms, measured by :func:`calibrate` on the engine itself (a calibration run of its own
workload, never a validation run) and fitted by :func:`fit_overheads`:

* ``speed`` — the machine's speed during the engine runs relative to the profile: the profile's times are
  divided by it. Measured by a **probe** (:func:`make_probe`: a fixed profiler step timed before every
  2nd iteration (:data:`PROBE_EVERY`) inside the engine's runs, its time taken out of the engine's clock)
  in each run, its scale tied to the profile by re-timing the profiler's steps at two dozen points after
  each calibration run, each point between two readings of the probe.
  An instrument correction for a profile taken while the machine ran at another speed, not a model of
  the engine;
* ``sched`` — per-iteration scheduler/bookkeeping time outside the model calls (admission, policy,
  acceptance draws, slot bookkeeping, building positions and masks): a constant, a per-sequence term, and
  for iterations that speculate (γ > 0) a constant and a per-draft-position term;
* ``prefill`` — per admission, and per admission whose draft is prefilled too: the engine's whole
  prefill phase (fresh cache, forward, first-token sampling, copy into the batch's slot) beyond the
  profile's prefill forwards;
* ``step`` — the step's model work inside the run beyond the profile's step: per γ = 0 step (a decode),
  per γ > 0 step (a verify, with the draft's sampling, the acceptance draws and the residual distribution),
  per draft forward, and with ``draft_sync`` per γ = 0 step's draft forward: per-sequence lengths
  (position ids, one scatter per layer, a boolean mask, attention padded to the longest sequence) and
  caches cooled by the scheduler's work between steps; and
  per admission, and per admission whose draft is prefilled too, the extra time of the step that follows
  the prefill in the same iteration (tens of µs on the tiny pair; likely the prefill's forwards cooling
  the caches the step runs from). The simulator charges those two per admission with the prefill (it
  has no per-iteration admission cost), so its first token comes that much later than the engine's.

**Rounds.** On a shared machine the speed drifts by several percent over tens of seconds (and a group of
neighbouring profile points can land in a slow second), and queueing turns a step-time error into two to
three times that in latency. So the engine runs come in ``repeats`` rounds, interleaved with the
profile's :data:`PROFILE_PASSES` passes: after each pass, one calibration and one replay of every case (in
a rotated order), the rounds beyond the passes after the profile. The sweep reads a speed reference
around every point and the passes are merged at the machine's typical speed (``timing.reference``), each
point keeping its median over the passes; the engine's figure for a case is the median over its runs,
and the run-to-run spread (semi-interquartile range over the median) is reported as the case's noise.
With a reused profile (``profile=``, or a fresh one in ``out``) the rounds run on their own.

The report compares the engine with the simulator variants, cumulatively: ``profile`` (the plain profile,
the baseline), ``+speed``, ``+sched``, ``+prefill`` and ``model`` (every term) — each against the median
over the engine's runs — and, the headline, ``paired``: every engine run against the full model at the
speed the probe measured during that run, the error being the median over runs of sim / engine − 1. On a
machine whose speed moves by tens of percent within seconds, pairing each run with its own speed removes
most of the run-to-run noise that the medians leave. The policies' γ tables
(``adaptive``) are built once, from the profile as it stands after the first pass, and shared by the
engine and every variant, so all of them replay the same decisions.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.policies import Policy

METRICS = ("latency_mean", "latency_p50", "latency_p99", "ttft_mean", "ttft_p50", "ttft_p99",
           "tpot_mean", "tpot_p50", "tpot_p99", "throughput_tok_s")
HEADLINE = ("latency_mean", "latency_p99", "throughput_tok_s")
# the accuracy goals (|relative error|) and how many noise widths a measured error may exceed them by
GOALS = {"latency_mean": 0.05, "latency_p99": 0.10, "throughput_tok_s": 0.05}
NOISE_WIDTHS = 3.0
PROFILE_PASSES = 3  # sweeps of the profile's grid in a validation (each merged at the machine's typical speed)
# how the validation's sweep samples each point (profiler.timing.measure), beside point_budget_s
PROFILE_TIMING = dict(warmup=2, min_samples=9, max_samples=60, floor_samples=5, rel_precision=0.02)
POLICIES = {"none": {}, "fixed": {"gamma": 4}, "adaptive": {}}
FIXES = ("speed", "sched", "prefill", "step")
# cumulative: what each term buys on top of the previous ones
VARIANTS = tuple((name, FIXES[:k]) for k, name in enumerate(("profile", "+speed", "+sched", "+prefill", "model")))

# the reduced validation: tiny pair, small grid, short trace slice
REDUCED = dict(pair="tiny-llama:tiny-llama-draft", requests=40, repeats=5, loads=(0.3, 0.6), max_batch=8,
               max_prompt=96, max_output=48, max_gamma=6,
               grid=dict(batches=[1, 2, 4, 8], gammas=[0, 1, 2, 4, 6], contexts=[32, 160],
                         prefill_lengths=[8, 32, 96], prefill_batches=[1]))


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- profiling with the engine's clock ----------------------------------------------------------------------


@contextlib.contextmanager
def profiler_clock(clock: str):
    """Make :func:`profiler.sweep.run_profile` time CPU steps with ``clock`` (``cpu``: process CPU time)."""
    from profiler import timing

    if clock == "wall":
        yield
        return
    orig = timing.make_timer

    def make_timer(device):
        if str(device).startswith("cuda"):
            return orig(device)

        def cpu_timer(step):
            t0 = time.process_time()
            step()
            return time.process_time() - t0

        return cpu_timer

    timing.make_timer = make_timer
    try:
        yield
    finally:
        timing.make_timer = orig


def profile_pair(out: Path, target: str, draft: str, grid: dict, *, clock: str = "cpu", threads: int = 1,
                 device: str = "cpu", point_budget_s: float = 0.1, seed: int = 0, passes: int = 3,
                 max_passes: int = 4, repairs: int = 3, reference: bool = True, after_pass=None) -> Path:
    """Profile ``draft``/``target`` on this machine into ``out`` with the profiler's sweep.

    On a shared machine the speed drifts between points (other jobs come and go; a group of neighbouring
    points can land in a slow second), so the grid is swept ``passes`` times (3 by default, so that the median
    outvotes one slow pass) and each point keeps the median of its pass medians; while the result fails the
    profile's monotonicity check the disputed points are remeasured (up to ``repairs`` rounds), then whole
    passes are added (up to ``max_passes``); ``after_pass(k)`` runs after pass k; see
    :func:`profiler.sweep.run_passes`. ``reference``: each point read against the sweep's speed reference
    (``timing.reference``), so that the passes are merged at the machine's typical speed."""
    from omegaconf import OmegaConf

    from profiler.sweep import Grid, run_passes
    from sim.profile import write_profile_meta

    cfg = OmegaConf.create(dict(
        pair=dict(target=target, draft=draft, name=f"{draft}__{target}"), device=device, dtype="auto",
        threads=threads, cache="prealloc", seed=seed, resume=False, memory_limit_bytes=None,
        note=f"specbatch-validate, clock={clock}, loadavg at start {loadavg()}",
        timing=dict(**PROFILE_TIMING, point_budget_s=point_budget_s, deadline_s=None, temperature=1.0,
                    reference=reference)))
    with profiler_clock(clock):
        run_passes(cfg, out_dir=out, grid=Grid.from_cfg(grid), passes=passes, max_passes=max(passes, max_passes),
                   repairs=repairs, progress=False, after_pass=after_pass)
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("schema_version", None)
    meta["timing"]["clock"] = clock
    write_profile_meta(out, meta)
    return out


def fresh_profile(path: Path, target: str, draft: str, clock: str, grid: dict, max_age_h: float) -> bool:
    """True when ``path`` holds a complete profile of this pair, clock and grid younger than ``max_age_h``."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        age = _dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(meta["date"])
        return (meta["pair"]["target"] == target and meta["pair"]["draft"] == draft and meta["timing"].get("complete")
                and meta["timing"].get("clock") == clock and meta["timing"]["grid"] == grid
                and age.total_seconds() < max_age_h * 3600)
    except (OSError, KeyError, ValueError, TypeError):
        return False


# --- the engine-side terms ----------------------------------------------------------------------------------


@dataclass
class Overheads:
    """Engine-side time the profile does not contain (seconds) and the machine's speed, fitted by
    :func:`fit_overheads` to :func:`calibrate`'s measurements."""

    sched_base_s: float = 0.0  # per iteration
    sched_per_seq_s: float = 0.0  # per running sequence per iteration
    sched_spec_s: float = 0.0  # per iteration that speculates (γ > 0: acceptance draws, draft bookkeeping)
    sched_per_gamma_s: float = 0.0  # per draft position per iteration
    prefill_s: float = 0.0  # per admitted request (its target prefill, the slot's set-up)
    prefill_draft_s: float = 0.0  # per admitted request whose draft is prefilled too
    decode_s: float = 0.0  # per γ = 0 step (one target decode) inside the run, beyond the profiled step
    verify_s: float = 0.0  # per γ > 0 step's target verify inside the run, beyond the profiled step
    draft_s: float = 0.0  # per batched draft forward inside the run, beyond the profiled step
    sync_s: float = 0.0  # per γ = 0 step's draft forward with draft_sync (no sampling), beyond the profiled one
    admit_step_s: float = 0.0  # per admission: the step of the iteration that admitted it, beyond the other terms
    admit_step_draft_s: float = 0.0  # per admission whose draft is prefilled too: the same step's further extra
    speed: float = 1.0  # the profile's step time over the same step timed during the engine runs (dimensionless)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _cost_class():
    from sim.cost_model import CostModel

    class EngineCostModel(CostModel):
        """The profile's cost model plus the engine-side terms of :class:`Overheads` (see module docstring)."""

        def __init__(self, profile, overheads: Overheads, fixes=FIXES, **kw):
            self.overheads, self.fixes = overheads, tuple(fixes)
            super().__init__(profile, **kw)

        def _terms(self, batch: int, gamma: int) -> list[float]:
            """Seconds added to one iteration, in the order they are added."""
            o, terms = self.overheads, []
            if "step" in self.fixes:
                # a draft_sync γ = 0 step also runs one draft forward
                terms.append(o.verify_s + gamma * o.draft_s if gamma else o.decode_s + self.draft_sync * o.sync_s)
            if "sched" in self.fixes:
                terms.append(o.sched_base_s + o.sched_per_seq_s * batch
                             + (o.sched_spec_s + o.sched_per_gamma_s * gamma if gamma else 0.0))
            return terms

        def _scale(self) -> float:
            """Factor on the profile's times: 1 / speed with the ``speed`` term."""
            return 1.0 / self.overheads.speed if "speed" in self.fixes else 1.0

        def iteration(self, batch: int, gamma: int, context: float) -> float:
            t = super().iteration(batch, gamma, context) * self._scale()
            for term in self._terms(batch, gamma):
                t = t + term
            return t

        def iteration_list(self, batch: int, gamma: int, contexts):
            k = self._scale()
            t = [x * k for x in super().iteration_list(batch, gamma, contexts)]
            for term in self._terms(batch, gamma):
                t = [x + term for x in t]
            return t

        def iteration_many(self, batch: int, gamma: int, contexts):
            t = super().iteration_many(batch, gamma, contexts) * self._scale()
            for term in self._terms(batch, gamma):
                t = t + term
            return t

        def prefill(self, prompt_tokens: float, model: str = "target") -> float:
            t = super().prefill(prompt_tokens, model) * self._scale()
            o = self.overheads
            if "step" in self.fixes:
                t = t + (o.admit_step_draft_s if model == "draft" else o.admit_step_s)
            if "prefill" not in self.fixes:
                return t
            return t + (o.prefill_draft_s if model == "draft" else o.prefill_s)

    return EngineCostModel


class ConstantGamma(Policy):
    """Calibration policy: always ``gamma``; ``drafts``: the draft model is used (prefilled at admission).
    Not a serving policy: it is not registered."""

    name = "calibration"

    def __init__(self, gamma: int, drafts: bool = True):
        self.gamma, self.uses_draft = int(gamma), bool(drafts)

    def choose(self, view) -> int:
        return self.gamma


def make_cost(profile, overheads: Overheads | None, fixes, max_batch: int, max_gamma: int):
    from sim.cost_model import CostModel

    if overheads is None or not fixes:
        return CostModel(profile, max_batch=max_batch, max_gamma=max_gamma)
    return _cost_class()(profile, overheads, fixes, max_batch=max_batch, max_gamma=max_gamma)


def profiler_steps(engine, batch: int, gamma: int, context: int, caches: dict | None = None) -> list:
    """``(step, reset)`` pairs of the profiler's own steps for one iteration at (batch, γ, context) on the
    engine's models (:func:`profiler.sweep.make_step`, the work one ``steps.csv`` row times): the target's
    decode (γ = 0) or verify of γ + 1 tokens, then, when γ > 0, one draft decode. ``caches``:
    ``{"target": ..., "draft": ...}`` holding ``context`` positions with room for γ + 1 more (fresh ones
    when None)."""
    from profiler import models as M
    from profiler.sweep import make_step

    dev, temp, gen = engine.device, engine.cfg.temperature, engine.gen
    if caches is None:
        caches = {role: M.make_cache("prealloc", m.config, batch, context, gamma + 1, engine.dtype, dev)
                  for role, m in (("target", engine.target), ("draft", engine.draft))}
    steps = [make_step(("target", "verify" if gamma else "decode", batch, gamma + 1, context), engine.target,
                       caches["target"], engine.vocab, temp, gen, dev)]
    if gamma:
        steps.append(make_step(("draft", "decode", batch, 1, context), engine.draft, caches["draft"], engine.vocab,
                               temp, gen, dev))
    return steps


def retime(engine, batch: int, gamma: int, context: int, caches: dict, clock, repeats: int = 5) -> list[float]:
    """The profiler's steps at (batch, γ, context) (:func:`profiler_steps` on ``caches``) each called
    ``repeats`` + 1 times on ``clock``, the first call warming the shape up and not kept: the median seconds
    of the target's step, then (γ > 0) of one draft decode."""
    med = []
    for step, reset in profiler_steps(engine, batch, gamma, context, caches):
        ts = []
        for _ in range(repeats + 1):
            t0 = clock()
            step()
            ts.append(clock() - t0)
            reset()
        med.append(float(np.median(ts[1:])))
    return med


def calibrate(engine, cost, acceptance, *, seed: int = 99, requests: int = 24, max_prompt: int = 96,
              max_output: int = 48, repeats: int = 5, probe=None) -> dict:
    """One calibration measurement on the engine itself (never a validation run): short runs of its own
    workload at high load, one per γ over the policies' range, each at that constant γ
    (:class:`ConstantGamma`; γ = 0 twice: without the draft, as ``none`` runs, and with it), and the
    profiler's own steps (:func:`profiler.sweep.make_step`: γ draft decodes + one verify, timed back to
    back as the sweep times them) at a few (batch, γ, context) points — the machine's speed now.

    One run per γ, rather than one run whose γ changes every iteration: on the 2-core VM a γ = 0 step right
    after a drafting one took 1.7× a γ = 0 step in a run that never drafts (tiny pair, batch 6), and
    still 1.1–1.2× eight steps later; the serving policies keep γ for long stretches.

    Returns the raw measurements: ``iterations`` (the runs' iteration tables, one after another, with the
    engine's ``step_model_s`` and ``prefill_forward_s``, ``prompts``: the prompt lengths each iteration
    admitted, or None, ``models``: the models prefilled per admission, 1 or 2, and ``draft_sync``: whether
    its γ = 0 steps also ran a draft decode, the engine's ``draft_sync`` in a run that drafts), ``step_points``
    (``batch, gamma, context, profiler_s``) and, with a ``probe`` (:func:`make_probe`) run inside the
    calibration runs as in the validation runs, ``probe_s`` (its
    median over the runs); each step point then also has ``probe_s``, the mean of the probe's readings
    just before and just after the point was timed. :func:`fit_overheads` turns one or more of them into
    the engine-side terms, against the profile they are compared with.
    ``cost`` sets the run's rate (1.5 × its estimated capacity), ``max_gamma`` and the contexts timed."""
    import pandas as pd

    from profiler import models as M
    from profiler.engine import make_clock
    from sim import workload as wl
    from sim.cluster import ClusterConfig
    from sim.capacity import estimate_capacity

    clock = make_clock(engine.cfg.clock, engine.device)
    w = wl.synthetic(requests, 1.0, "poisson", 1.0, None, (max_prompt / 2, 0.5), (max_output / 2, 0.5), seed=seed)
    w = wl.cap_lengths(w, max_prompt, max_output)
    cap = estimate_capacity(cost, w, ClusterConfig(max_batch=engine.cfg.max_batch,
                                                    kv_capacity_tokens=engine.capacity))
    w = wl.set_rate(w, 1.5 * cap)
    tables, probes = [], []
    speculating = sorted({1, 2, max(1, cost.max_gamma // 2), cost.max_gamma})
    for g, drafts in [(0, False), (0, True)] + [(g, True) for g in speculating]:
        r = engine.run(w, cost, ConstantGamma(g, drafts), acceptance, seed=seed, probe=probe,
                       probe_every=PROBE_EVERY)
        t = pd.concat([r.iterations.reset_index(drop=True), engine.diagnostics], axis=1)
        t["prompts"] = admitted_prompts(r.requests, r.iterations)
        t["models"] = 2 if drafts else 1  # models prefilled per admission
        t["draft_sync"] = bool(engine.cfg.draft_sync and drafts)  # as sim.cluster charges a drafting policy
        tables.append(t)
        probes += engine.probes
    it = pd.concat(tables, ignore_index=True)
    probe_s = float(np.median(probes)) if probe is not None else None

    gammas = sorted({0, min(2, cost.max_gamma), min(4, cost.max_gamma)})
    c_hi = int(min(cost.contexts[-1], engine.max_len - max(gammas) - 2))
    c_lo = int(max(8, min(cost.contexts[0], c_hi // 2)))
    points = []
    for b in sorted({1, 2, min(4, engine.cfg.max_batch), engine.cfg.max_batch}):
        for c in (c_lo, (c_lo + c_hi) // 2):
            caches = {role: M.make_cache("prealloc", m.config, b, c, max(gammas) + 1, engine.dtype, engine.device)
                      for role, m in (("target", engine.target), ("draft", engine.draft))}
            for g in gammas:
                before = probe() if probe is not None else None
                med = retime(engine, b, g, c, caches, clock, repeats)
                point = dict(batch=b, gamma=g, context=c, profiler_s=med[0] + g * (med[1] if g else 0.0))
                if probe is not None:  # the probe read just before and just after the point: the same seconds
                    point["probe_s"] = (before + probe()) / 2
                points.append(point)
            del caches
    return {"iterations": it, "step_points": points, "probe_s": probe_s}


PROBE_POINT = dict(batch=4, gamma=2, context=32)  # the profile point the engine's runs are probed with
# the probe runs before every PROBE_EVERY-th iteration: a run's speed is the median of its readings, and a
# reduced validation's runs last 50-250 iterations (every 8th: 12 readings per run, the median's own
# uncertainty 1.8 % against 2.5 % for the whole gap between the probed speed and the run's steps)
PROBE_EVERY = 2


def make_probe(engine, point: dict = PROBE_POINT):
    """The machine's speed during an engine run, for :meth:`profiler.engine.Engine.run`'s ``probe``: the
    profiler's own steps at ``point`` (one verify of γ + 1 tokens and one draft decode, on caches of their
    own), run once to warm them and timed the second time, as the sweep times a point; the probe returns
    those seconds. The calibration runs carry the same probe, and :func:`fit_overheads` ties its time to
    the profile's speed (``probe_ref_s``): a run whose probe took ``probe_s`` ran at ``probe_ref_s / probe_s``
    of the profile's speed. (Timed cold, without the warming call, it read the machine slower than the
    profile's warm steps, the ``step`` terms fitted against it came out at 0, and the simulator was 7–30 %
    slow.) ``probe.point`` is the point."""
    from profiler.engine import make_clock

    b, g, c = min(point["batch"], engine.cfg.max_batch), point["gamma"], point["context"]
    clock, steps = make_clock(engine.cfg.clock, engine.device), profiler_steps(engine, b, g, c)

    def probe() -> float:
        for step, reset in steps:
            step()
            reset()
        t0 = clock()
        for step, reset in steps:
            step()
            reset()
        return clock() - t0

    probe.point = dict(batch=b, gamma=g, context=c)
    return probe


def at_speed(o: Overheads, speed: float) -> Overheads:
    """``o`` for a machine running at ``speed`` (relative to the profile) instead of ``o.speed``: every time
    term scaled by ``o.speed / speed``."""
    k = o.speed / speed
    return Overheads(**{f: (v * k if f != "speed" else speed) for f, v in o.as_dict().items()})


def admitted_prompts(requests, iterations) -> list:
    """Per iteration, the prompt lengths (tokens) of the requests it admitted, or None when it admitted
    none or re-admitted a preempted request (whose prefill also covers the tokens it had generated)."""
    fresh = requests[~requests["rejected"] & requests["admitted_s"].notna()]
    by_start = fresh.groupby("admitted_s")["prompt_tokens"].apply(list).to_dict()
    out = []
    for start, n in zip(iterations["start_s"].to_numpy(), iterations["admitted"].to_numpy()):
        prompts = by_start.get(float(start), []) if n > 0 else []
        out.append([int(x) for x in prompts] if n > 0 and len(prompts) == n else None)
    return out


def point_speeds(cost, step_points: list[dict]) -> np.ndarray:
    """Per re-timed point of a calibration: the profile's iteration time (behind ``cost``) over the
    profiler's step timed in the calibration (``profiler_s``) (dimensionless; > 1: faster than profiled)."""
    return np.array([cost.iteration(p["batch"], p["gamma"], float(p["context"])) / p["profiler_s"]
                     for p in step_points])


def speed_vs_profile(cost, step_points: list[dict]) -> float:
    """The machine's speed during a calibration relative to the profile behind ``cost``: the median over
    its points of :func:`point_speeds`."""
    return float(np.median(point_speeds(cost, step_points)))


def fit_overheads(cost, calibrations: list[dict], attention: str = "padded") -> tuple[Overheads, dict]:
    """The engine-side terms from :func:`calibrate`'s measurements, against the profile behind ``cost``
    (each calibration run compared with the profile at its own round's speed, its steps priced as the
    simulator charges them under ``attention``, :func:`model_step_times`):

    * ``speed``: median over rounds of the round's speed. Without a probe, a round's speed is
      :func:`speed_vs_profile` of its re-timed profiler steps. With one (every calibration has
      ``probe_s``), the probe is tied to the profile first: ``probe_ref_s``, the probe's time at the
      profile's speed, is the median over rounds and then over step points of (the profile's time over the
      re-timed step) × (the probe's time around that step) — each factor read in the same second, so the
      machine's speed cancels out, and many profile points so that no one noisy point sets the scale (the
      probe's median over the whole run against steps re-timed after it moved by 14 % (sd) from round to
      round on the 2-core VM; the per-point product, by 3 %) — and a round's speed is
      ``probe_ref_s / probe_s``, read inside the calibration run itself by the instrument the validation
      runs carry;
    * ``sched_*``: step time outside the model calls, ``base + per_seq·b + [γ > 0]·(spec + per_gamma·γ)``;
    * ``decode_s``, ``verify_s``, ``draft_s``: the step's model work in the run minus the profile's
      iteration at that speed, ``decode`` at γ = 0 and ``verify + γ·draft`` at γ > 0 (per-sequence lengths,
      mask, scatter, padding, caches cooled by the scheduler between steps — what a step costs inside a
      serving loop and not in the profiler's; a speculative step also samples the draft, draws the
      acceptance and builds the residual distribution, which a decode does not: on the tiny pair its
      extra work was about 100 µs at γ = 0 and 270 µs at γ = 1, so a line through both misplaced γ = 0);
    * ``sync_s``: with the engine's ``draft_sync``, a drafting run's γ = 0 step beyond the profile's decode
      *and draft decode* (the forward that keeps the draft's cache in step), beyond ``decode_s``; compared
      with the decode alone, the draft's forward had gone into ``decode_s``, which ``none`` gets too (+30 %);
    * ``admit_step_s``, ``admit_step_draft_s``: per admission, and per admission whose draft was prefilled,
      the step's extra time (model work and the time around it: fitted in both regressions, summed) in
      the iteration that admitted it. Without them the γ = 0 terms averaged the slower steps of admitting
      iterations over every step at the calibration's mix; at load 0.6, with more admissions per step,
      `adaptive` (γ = 0 with its draft prefilled) came out 3–4 % fast;
    * ``prefill_s``, ``prefill_draft_s``: the whole prefill phase minus the profile's prefill of the
      admitted prompts at that speed, per admission: the median over the iterations whose runs prefill the
      target only (``models`` = 1 in the calibration's table), and the median over those that prefill
      both models (``models`` = 2) minus that (the set-up and first-token sampling are per admission, not
      per model: on the tiny pair a target-only admission cost about 0.2 ms more than half of a two-model
      one).

    The terms are fitted once on all rounds' iterations together (least squares for the linear terms,
    medians for ``prefill``), each round's times first brought to the median speed (× the round's speed
    / the median), then clipped at 0. One round on its own separates ``verify_s`` from ``draft_s`` poorly
    (its runs at different γ follow one another while the machine's speed drifts: single rounds gave 0 and
    0.72 ms beside 0.13 and 0.05 ms), and a median taken term by term over such pairs mixed halves of
    different lines (verify 0, draft 0.48 ms: the simulator 30 % slow at γ = 4). Each round's own fit is
    kept in the details (``by_round``) for the model's round-to-round spread.
    Returns the terms and details (``by_round``: each calibration's own terms; with a probe,
    ``probe_ref_s`` and, per round, ``probe_ref_by_round`` and ``probe_run_over_steps``: the probe's median
    in the run over its median around the re-timed steps, 1 when the two read the machine alike)."""
    import pandas as pd

    ratios = [point_speeds(cost, c["step_points"]) for c in calibrations]
    hot = [float(np.median(r)) for r in ratios]
    probed = all(c.get("probe_s") for c in calibrations)
    if probed:
        refs = [float(np.median(r * [p["probe_s"] for p in c["step_points"]])) for r, c in zip(ratios, calibrations)]
        probe_ref = float(np.median(refs))
        speeds = [probe_ref / c["probe_s"] for c in calibrations]
        around = [float(np.median([p["probe_s"] for p in c["step_points"]])) for c in calibrations]
        probe_details = {"probe_ref_s": probe_ref, "probe_ref_by_round": refs,
                         "probe_run_over_steps": [round(c["probe_s"] / a, 3) for c, a in zip(calibrations, around)]}
    else:
        speeds, probe_details = hot, {}

    def lstsq(x, y) -> np.ndarray:
        """Least squares; a column the data cannot tell apart from the ones before it gets 0."""
        x = np.asarray(x, float)
        keep: list[int] = []
        for j in range(x.shape[1]):
            if np.linalg.matrix_rank(x[:, keep + [j]]) > len(keep):
                keep.append(j)
        coef = np.zeros(x.shape[1])
        if len(y):
            coef[keep] = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        return coef

    def with_profile(it):
        """Calibration iterations with the profile's seconds, computed once: each step's
        (``profile_step_s``, rows that ran one; with the draft decode of a ``draft_sync`` row's γ = 0 step)
        and each fresh admission's prefill (``profile_prefill_s``); ``sync_step``: the γ = 0 steps that
        ran a ``draft_sync`` draft forward."""
        it = it.copy()
        ran, adm = it["batch"] > 0, it["prompts"].notna()
        synced = it["draft_sync"].astype(bool) if "draft_sync" in it else pd.Series(False, index=it.index)
        it["sync_step"] = sync = synced & (it["gamma"] == 0)
        it["profile_step_s"] = it["profile_prefill_s"] = np.nan
        for rows, c in ((ran & ~sync, cost), (ran & sync, cost.with_draft_sync())):
            it.loc[rows, "profile_step_s"] = model_step_times(c, it[rows], attention)
        it.loc[adm, "profile_prefill_s"] = [model_prefill_time(cost, ps, m == 2)
                                            for ps, m in zip(it.loc[adm, "prompts"], it.loc[adm, "models"])]
        return it

    def fit(it, speed) -> np.ndarray:
        """The terms (in :func:`terms`' order) from calibration iterations ``it`` (:func:`with_profile`)
        timed at ``speed``."""
        dec = it[it["batch"] > 0]
        g, bsz = dec["gamma"].to_numpy(float), dec["batch"].to_numpy(float)
        pred = dec["profile_step_s"].to_numpy() / speed
        n_adm = dec["admitted"].to_numpy(float)
        admits = np.c_[n_adm, n_adm * (dec["models"].to_numpy() == 2)]  # per admission, per draft prefilled
        sched = lstsq(np.c_[np.ones_like(g), bsz, g > 0, g, admits], (dec["step_s"] - dec["step_model_s"]).to_numpy())
        step = lstsq(np.c_[g == 0, g > 0, g, dec["sync_step"], admits], dec["step_model_s"].to_numpy() - pred)
        admit = sched[4:] + step[4:]  # both parts of the step: its model work and the work around it
        adm = it[it["prompts"].notna()]
        models = adm["models"].to_numpy()
        p_pred = adm["profile_prefill_s"].to_numpy() / speed
        extra = (adm["prefill_s"].to_numpy() - p_pred) / adm["admitted"].to_numpy()  # per admission
        one, two = (float(np.median(extra[models == m])) if (models == m).any() else np.nan for m in (1, 2))
        if np.isnan(one):  # no target-only admissions: split evenly between the two models
            one = two / 2
        return np.r_[sched[:4], one, 0.0 if np.isnan(two) else two - one, step[:4], admit]

    def at(it, k: float):
        """``it`` with its times × ``k`` (a round's times brought to another speed)."""
        it = it.copy()
        for col in ("step_s", "step_model_s", "prefill_s"):
            it[col] = it[col] * k
        return it

    tables = [with_profile(c["iterations"]) for c in calibrations]
    fits = [fit(it, sp) for it, sp in zip(tables, speeds)]
    speed = float(np.median(speeds))
    pooled = pd.concat([at(it, sp / speed) for it, sp in zip(tables, speeds)], ignore_index=True)
    n_dec = int((pooled["batch"] > 0).sum())
    n_adm = int(pooled.loc[pooled["prompts"].notna(), "admitted"].sum())

    def terms(values, speed) -> Overheads:
        base, per_seq, spec, per_gamma, prefill, prefill_draft, decode, verify, draft, sync, adm, adm_draft = (
            max(0.0, float(v)) for v in values)
        return Overheads(sched_base_s=base, sched_per_seq_s=per_seq, sched_spec_s=spec, sched_per_gamma_s=per_gamma,
                         prefill_s=prefill, prefill_draft_s=prefill_draft, decode_s=decode, verify_s=verify,
                         draft_s=draft, sync_s=sync, admit_step_s=adm, admit_step_draft_s=adm_draft,
                         speed=float(speed))

    o = terms(fit(pooled, speed), speed)
    details = {"overheads": o.as_dict(), "by_round": [terms(f, sp).as_dict() for f, sp in zip(fits, speeds)],
               "speed_by_round": [round(x, 3) for x in speeds], "steps_speed_by_round": [round(x, 3) for x in hot],
               **probe_details,
               "calibration_iterations": n_dec, "admissions": n_adm,
               "step_points": [p for c in calibrations for p in c["step_points"]]}
    return o, details


# --- one comparison ------------------------------------------------------------------------------------------


def trace_slice(requests: int, *, start: int = 0, prompt_div: float = 16.0, output_div: float = 8.0,
                max_prompt: int = 96, max_output: int = 48):
    """The first ``requests`` of the shipped Azure conversation trace from row ``start`` (arrival pattern kept),
    lengths divided by ``prompt_div``/``output_div`` and capped so that small models can serve them."""
    from dataclasses import replace

    from sim import workload as wl
    from specbatch import traces_dir

    w = wl.load_trace(traces_dir() / "azure" / "AzureLLMInferenceTrace_conv.csv",
                      {"arrival": "TIMESTAMP", "prompt": "ContextTokens", "output": "GeneratedTokens"}, "datetime")
    w = w.take(np.arange(start, start + requests))
    arr = w.arrival_s - w.arrival_s[0]
    p = np.clip(np.round(w.prompt_tokens / prompt_div), 4, max_prompt).astype(np.int64)
    o = np.clip(np.round(w.output_tokens / output_div), 2, max_output).astype(np.int64)
    return replace(w, arrival_s=arr, prompt_tokens=p, output_tokens=o, name=f"azure_conv[{start}:{start + requests}]")


def rel_errors(real: dict, sim: dict) -> dict:
    """``(sim − real) / real`` for each of :data:`METRICS`."""
    return {m: float((sim[m] - real[m]) / real[m]) if real[m] else float("nan") for m in METRICS}


def spread(values) -> float:
    """Run-to-run spread of a metric: the semi-interquartile range over the median (dimensionless)."""
    q25, q50, q75 = np.percentile(np.asarray(values, float), [25, 50, 75])
    return float((q75 - q25) / 2 / q50) if q50 else float("nan")


def agreement(cases: list[dict], variant: str, noises=("noise", "model_noise")) -> dict:
    """Does ``variant`` agree with the engine within what this machine can tell apart? Per case and metric
    of :data:`GOALS`: the tolerance is the goal plus :data:`NOISE_WIDTHS` × the combined noise, the root
    sum of squares of the case's ``noises`` entries — ``noise``: the engine's run-to-run spread, or
    ``paired_noise`` for the paired comparison: the spread of the per-run ratios sim / engine;
    ``model_noise``: the simulator's spread when each round's own calibration replaces the median terms;
    ``speed_noise``: how far the simulator moves when the machine's speed in each run is off by the spread
    of the probe's readings within that run — each being the case's own or, if larger, the median over
    the cases (a spread from a handful of runs is itself noisy); an absent entry counts 0. Needs two or
    more rounds. Returns per-case tolerances and verdicts, and ``all`` (every case within its tolerance)."""
    pooled = {kind: {m: float(np.median([(c.get(kind) or {}).get(m, 0.0) for c in cases])) for m in GOALS}
              for kind in noises}
    out = []
    for c in cases:
        width = {m: float(np.hypot.reduce([max((c.get(k) or {}).get(m, 0.0), pooled[k][m]) for k in noises]))
                 for m in GOALS}
        tol = {m: GOALS[m] + NOISE_WIDTHS * width[m] for m in GOALS}
        ok = {m: bool(abs(c["errors"][variant][m]) <= tol[m]) for m in GOALS}
        out.append({"load": c["load"], "policy": c["policy"], "tolerance": tol, "within": ok})
    return {"variant": variant, "goals": GOALS, "noise_widths": NOISE_WIDTHS, "noises": list(noises),
            "pooled_noise": pooled, "cases": out, "all": all(all(x["within"].values()) for x in out)}


def step_agreement(iterations, diagnostics, cost, attention: str = "padded") -> dict:
    """Step-level check of the profile against the engine: for every engine iteration that ran a step,
    the profile's prediction (:func:`model_step_times` under ``attention``) divided by the engine's measured
    step time (``step_s``: the whole step incl. engine bookkeeping) and by its model work alone
    (``step_model_s``).
    Medians (dimensionless; > 1 = the profile is slower than the engine), overall and per batch size."""
    it = iterations.reset_index(drop=True)
    ran = (it["batch"] > 0).to_numpy() & (it["step_s"] > 0).to_numpy()
    it, model = it[ran], diagnostics["step_model_s"].to_numpy()[ran]
    pred = model_step_times(cost, it, attention)
    whole, work = pred / it["step_s"].to_numpy(), pred / model
    by_batch = {int(b): round(float(np.median(whole[(it["batch"] == b).to_numpy()])), 3)
                for b in sorted(it["batch"].unique())}
    return {"iterations": int(ran.sum()), "profile_over_step": round(float(np.median(whole)), 3),
            "profile_over_model_work": round(float(np.median(work)), 3), "profile_over_step_by_batch": by_batch}


def model_step_times(cost, iterations, attention: str = "padded") -> np.ndarray:
    """``cost.iteration(batch, γ, context)`` for every row of an iteration table whose rows all ran a step
    (seconds), at the context the simulator charges under ``attention`` (``cluster.attention``): the
    longest sequence's (``context_max``; the engine pads) or the mean (``context``)."""
    from sim.replica import STEP_CONTEXT

    column = STEP_CONTEXT[attention]
    return np.array([cost.iteration(int(b), int(g), float(c))
                     for b, g, c in zip(iterations["batch"], iterations["gamma"], iterations[column])])


def model_prefill_time(cost, prompts, drafts: bool) -> float:
    """Σ over ``prompts`` (tokens) of ``cost.prefill(prompt, "target")`` (+ ``"draft"`` when ``drafts``),
    seconds."""
    return sum(cost.prefill(float(n), "target") + (cost.prefill(float(n), "draft") if drafts else 0.0)
               for n in prompts)


def predicted_prefills(requests, iterations, cost, uses_draft: bool) -> list[tuple[int, float]]:
    """``(row, seconds)`` for every iteration (row of ``iterations``, index reset) that admitted only fresh
    requests (not resuming after a preemption): :func:`model_prefill_time` of its admitted prompts."""
    it = iterations.reset_index(drop=True)
    return [(i, model_prefill_time(cost, prompts, uses_draft))
            for i, prompts in enumerate(admitted_prompts(requests, it)) if prompts is not None]


def model_over_engine(result, cost, uses_draft: bool, attention: str = "padded") -> dict:
    """Where one engine run's time goes, ``cost`` (the full model at the run's speed) against the engine:
    Σ of the model's step times over the run's iterations (:func:`model_step_times`) ÷ Σ of the
    engine's step times, and Σ of the model's prefill times ÷ Σ of the engine's prefill phases over the
    iterations that admitted only fresh requests (dimensionless; < 1: the model is faster; None for a part
    the run did not have). Queueing turns these into the latency errors, amplified at load. The model's
    prefill includes the admissions' step terms (``admit_step_*``), as the simulator charges them; the
    engine's prefill phase does not (they land in its step)."""
    it = result.iterations.reset_index(drop=True)
    ran = it[it["batch"] > 0]
    step_pred = float(model_step_times(cost, ran, attention).sum())
    step_meas = float(ran["step_s"].sum())
    pf = predicted_prefills(result.requests, it, cost, uses_draft)
    pf_meas = sum(float(it["prefill_s"].iat[i]) for i, _ in pf)
    return {"steps": step_pred / step_meas if step_meas > 0 else None,
            "prefill": sum(t for _, t in pf) / pf_meas if pf_meas > 0 else None}


def prefill_agreement(requests, iterations, diagnostics, cost, uses_draft: bool) -> dict | None:
    """Prefill-level check of the profile against the engine: for every engine iteration that admitted only
    fresh requests (not resuming after a preemption), the profile's prefill prediction — Σ over the admitted
    prompts of ``cost.prefill(prompt, "target")`` (+ ``"draft"`` when the policy drafts) — divided by the
    engine's measured prefill forwards (``prefill_forward_s``) and by its whole prefill phase (``prefill_s``:
    the forwards plus cache set-up, first-token sampling and the copy into the slot). Medians
    (dimensionless; > 1 = the profile is slower than the engine); None when no iteration qualifies."""
    it = iterations.reset_index(drop=True)
    fwd = diagnostics["prefill_forward_s"].to_numpy()
    pred, f_meas, whole = [], [], []
    for i, t in predicted_prefills(requests, it, cost, uses_draft):
        if fwd[i] <= 0:
            continue  # no forward timed
        pred.append(t)
        f_meas.append(fwd[i])
        whole.append(float(it["prefill_s"].iat[i]))
    if not pred:
        return None
    pred = np.asarray(pred)
    return {"admissions": len(pred), "profile_over_forward": round(float(np.median(pred / np.asarray(f_meas))), 3),
            "profile_over_prefill": round(float(np.median(pred / np.asarray(whole))), 3)}


def frozen_policy(name: str, cost, acceptance, context: float):
    """A set-up policy whose ``setup`` is a no-op afterwards, so the engine and every simulator variant use
    the same γ table."""
    from sim.policies import make_policy

    p = make_policy(name, **POLICIES[name])
    p.setup(cost, acceptance, context)
    p.setup = lambda *a, **k: None
    return p


def validate(*, pair: str = REDUCED["pair"], requests: int = REDUCED["requests"], loads=REDUCED["loads"],
             policies=tuple(POLICIES), max_batch: int = REDUCED["max_batch"], max_prompt: int = REDUCED["max_prompt"],
             max_output: int = REDUCED["max_output"], max_gamma: int = REDUCED["max_gamma"], grid: dict | None = None,
             alpha: float = 0.7, clock: str = "cpu", threads: int = 1, device: str = "cpu", seed: int = 0,
             trace_start: int = 0, out: Path | str = "fidelity-out", profile: str | None = None,
             max_age_h: float = 12.0, repeats: int = REDUCED["repeats"], variants=None, draft_sync: bool = False,
             attention: str | None = None, log=print) -> dict:
    """Run the whole validation; write ``report.json`` and ``dashboard.html`` into ``out``; return the report.
    ``attention``: how the simulator charges a step's context (``cluster.attention``; default the engine's,
    padded)."""
    import pandas as pd
    import torch

    from profiler.engine import Engine, EngineConfig
    from sim.acceptance import AcceptanceModel
    from sim.capacity import estimate_capacity
    from sim.cluster import ClusterConfig, charged_cost, simulate
    from sim.metrics import summarize
    from sim import workload as wl
    from sim.profile import ProfileWarning, load_profile

    variants = variants or VARIANTS
    attention = attention or Engine.attention
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if int(repeats) < 1:
        raise ValueError(f"repeats={repeats}: expected at least 1 round")
    if pair.count(":") != 1 or not all(pair.split(":")):
        raise ValueError(f"pair {pair!r}: expected 'target:draft' (two presets or checkpoint folders)")
    target, draft = pair.split(":")
    grid = grid or REDUCED["grid"]
    torch.set_num_threads(threads)
    load_start = loadavg()
    prof_dir = Path(profile) if profile else out / "profile"
    acc = AcceptanceModel(alpha=alpha, max_gamma=max_gamma)
    base = trace_slice(requests, start=trace_start, max_prompt=max_prompt, max_output=max_output)
    max_len = max(max_prompt + max_output + max_gamma + 4, 64)
    setup, cases, calibrations = {}, [], []

    def set_up(prof) -> None:
        """The engine, and every case's workload and policy, from the first profile there is."""
        plain = make_cost(prof, None, (), max_batch, max_gamma)
        ecfg = EngineConfig(max_batch=max_batch, kv_capacity_tokens=max_batch * max_len, clock=clock,
                            threads=threads, device=device, seed=seed, dtype=str(prof.meta["dtype"]),
                            draft_sync=draft_sync)
        engine = Engine(target, draft, ecfg, max_len=max_len)
        cluster = ClusterConfig(max_batch=max_batch, kv_capacity_tokens=engine.capacity, draft_sync=draft_sync,
                                attention=attention)
        capacity = estimate_capacity(plain, base, cluster)
        table_cost = plain.with_draft_sync() if draft_sync else plain  # what the policies' γ tables are built from
        for load in loads:
            w = wl.set_rate(base, load * capacity)
            ref_ctx = float(w.prompt_tokens.mean() + w.output_tokens.mean() / 2)
            for pname in policies:
                cases.append({"load": load, "policy": pname, "rate_req_s": w.rate, "_w": w, "_runs": [],
                              "_pol": frozen_policy(pname, table_cost, acc, ref_ctx)})
        setup.update(plain=plain, engine=engine, cluster=cluster, capacity=capacity, probe=make_probe(engine))

    def one_round(k: int) -> None:
        """Round k: calibrate once, then replay every case once (the order rotated by k)."""
        if k >= repeats:
            return
        if not setup:
            with warnings.catch_warnings():  # an interim profile (one pass): its rate and γ tables only
                warnings.simplefilter("ignore", ProfileWarning)
                set_up(load_profile(prof_dir))
        engine, plain = setup["engine"], setup["plain"]
        calibrations.append(calibrate(engine, plain, acc, max_prompt=max_prompt, max_output=max_output,
                                      probe=setup["probe"]))
        for case in cases[k % len(cases):] + cases[:k % len(cases)]:
            la = loadavg()
            t0, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            r = engine.run(case["_w"], plain, case["_pol"], acc, seed=seed, probe=setup["probe"],
                           probe_every=PROBE_EVERY)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            host = {"kernel_s": ru1.ru_stime - ru0.ru_stime, "user_s": ru1.ru_utime - ru0.ru_utime,
                    "minor_faults": ru1.ru_minflt - ru0.ru_minflt}
            case["_runs"].append(dict(result=r, summary=summarize(r), wall_s=time.perf_counter() - t0, loadavg=la,
                                      diagnostics=engine.diagnostics, host=host,
                                      probe_s=float(np.median(engine.probes)), probe_spread=spread(engine.probes)))

    # The profile's passes and the engine's rounds interleave, so that the profile (the median over its
    # passes) and the engine runs (the median over rounds) sample the same stretch of the machine's speed.
    if profile is None and not fresh_profile(prof_dir, target, draft, clock, grid, max_age_h):
        log(f"profiling {draft} / {target} on {device} (clock={clock}, {PROFILE_PASSES} passes), each followed "
            f"by an engine round; {repeats} rounds in all ...")
        profile_pair(prof_dir, target, draft, grid, clock=clock, threads=threads, device=device, seed=seed,
                     passes=PROFILE_PASSES, after_pass=one_round)
        for k in range(PROFILE_PASSES, int(repeats)):
            one_round(k)
    else:
        log(f"reusing the profile {prof_dir}; {repeats} engine rounds ...")
        for k in range(int(repeats)):
            one_round(k)
    t_measured = time.perf_counter() - t_start
    prof = load_profile(prof_dir)  # the final profile: every pass merged
    plain, cluster, capacity = make_cost(prof, None, (), max_batch, max_gamma), setup["cluster"], setup["capacity"]
    over, cal = fit_overheads(plain, calibrations, attention)
    log(f"  engine-side terms ({repeats} calibrations): {over}")
    costs = {name: make_cost(prof, over, fixes, max_batch, max_gamma) for name, fixes in variants}

    def model_cost(o: Overheads, speed: float):
        """The full model with terms ``o`` rescaled to ``speed``."""
        return make_cost(prof, at_speed(o, speed), variants[-1][1], max_batch, max_gamma)

    def model_at(o: Overheads, speed: float, w, pol) -> dict:
        """Summary of the full model's simulation with terms ``o`` rescaled to ``speed``."""
        return summarize(simulate(w, model_cost(o, speed), pol, acc, cluster, seed=seed))

    for case in cases:
        w, pol, runs = case.pop("_w"), case.pop("_pol"), case.pop("_runs")
        r = runs[0]["result"]
        s_real = {**runs[0]["summary"], **{m: float(np.median([x["summary"][m] for x in runs])) for m in METRICS}}
        ran = [x for x in runs if len(x["result"].iterations)]
        steps = step_agreement(pd.concat([x["result"].iterations for x in ran]),
                               pd.concat([x["diagnostics"] for x in ran]),
                               charged_cost(plain, pol, cluster), attention) if ran else None
        prefill = prefill_agreement(r.requests, r.iterations, runs[0]["diagnostics"], plain, pol.uses_draft) \
            if len(r.iterations) else None
        case.update({"loadavg": runs[0]["loadavg"], "engine_wall_s": float(np.median([x["wall_s"] for x in runs])),
                     "engine_host": {k: round(float(np.mean([x["host"][k] for x in runs])), 3)
                                     for k in runs[0]["host"]},
                     "steps": steps, "prefill": prefill,
                     "real": {m: s_real[m] for m in METRICS + ("mean_batch", "mean_gamma", "iterations")},
                     "sim": {}, "errors": {}, "_real": r, "_sim": {}})
        if repeats > 1:
            # run-to-run spread of the engine: semi-interquartile range over the median
            case["noise"] = {m: spread([x["summary"][m] for x in runs]) for m in METRICS}
            case["real_runs"] = [{m: x["summary"][m] for m in METRICS + ("iterations",)} for x in runs]
            # the model's own spread: each round's calibrated terms (at the median speed) in turn
            by_round = [model_at(Overheads(**o), over.speed, w, pol) for o in cal["by_round"]]
            case["model_noise"] = {m: spread([x[m] for x in by_round]) for m in METRICS}
        load, pname = case["load"], case["policy"]
        for vname, _ in variants:
            sres = simulate(w, costs[vname], pol, acc, cluster, seed=seed)
            s_sim = summarize(sres)
            case["sim"][vname] = {m: s_sim[m] for m in METRICS + ("mean_batch", "mean_gamma", "iterations")}
            case["errors"][vname] = rel_errors(s_real, s_sim)
            case["_sim"][vname] = sres
        # paired: each engine run against the full model at the machine's speed its probe measured in that run
        # and, for the speed's uncertainty, at that speed × or ÷ (1 + the spread of the probe's readings in the run)
        speeds = [cal["probe_ref_s"] / x["probe_s"] for x in runs]
        paired, moved, parts = [], [], []  # parts: each run's step and prefill time, model / engine
        for x, speed in zip(runs, speeds):
            cost = model_cost(over, speed)
            at = summarize(simulate(w, cost, pol, acc, cluster, seed=seed))
            paired.append(rel_errors(x["summary"], at))
            parts.append(model_over_engine(x["result"], charged_cost(cost, pol, cluster), pol.uses_draft, attention))
            slow, fast = (model_at(over, speed * (1 + x["probe_spread"]) ** d, w, pol) for d in (-1, 1))
            moved.append({m: abs(slow[m] - fast[m]) / 2 / at[m] if at[m] else 0.0 for m in METRICS})
        case["errors"]["paired"] = {m: float(np.median([e[m] for e in paired])) for m in METRICS}
        case["model_over_engine"] = {}
        for part in ("steps", "prefill"):
            ratios = [r[part] for r in parts if r[part] is not None]
            case["model_over_engine"][part] = round(float(np.median(ratios)), 3) if ratios else None
        case["probe_speeds"] = [round(v, 3) for v in speeds]
        case["probe_spreads"] = [round(x["probe_spread"], 3) for x in runs]
        if repeats > 1:  # the spread of the per-run ratios sim / engine; the simulator's move with the speed
            case["paired_noise"] = {m: spread([1 + e[m] for e in paired]) for m in METRICS}
            case["speed_noise"] = {m: float(np.median([x[m] for x in moved])) for m in METRICS}
        e = case["errors"]["paired"]
        log(f"load {load:.2f} {pname:8s} real latency {s_real['latency_mean']:.3f}s  errors: "
            + "  ".join(f"{m} {100 * e[m]:+.1f}%" for m in HEADLINE)
            + "  (unpaired model: " + "  ".join(f"{m} {100 * case['errors'][variants[-1][0]][m]:+.1f}%"
                                                for m in HEADLINE) + ")")
    report = {
        "pair": {"target": target, "draft": draft}, "device": device, "clock": clock, "threads": threads,
        "draft_sync": draft_sync, "attention": attention,
        "requests": requests, "loads": list(loads), "policies": list(policies), "max_batch": max_batch,
        "alpha": alpha, "seed": seed, "workload": base.describe(), "capacity_req_s": capacity,
        "profile": str(prof_dir), "calibration": cal, "probe_point": setup["probe"].point,
        "variants": {**{n: list(f) for n, f in variants}, "paired": list(variants[-1][1]) + ["probe"]},
        "loadavg_start": load_start, "loadavg_end": loadavg(), "cpu_count": os.cpu_count(),
        "elapsed_s": {"profile_and_rounds": round(t_measured, 1), "total": round(time.perf_counter() - t_start, 1)},
        "cases": [{k: v for k, v in c.items() if not k.startswith("_")} for c in cases],
        "max_abs_error": {v: {m: float(max(abs(c["errors"][v][m]) for c in cases)) for m in METRICS}
                          for v in [n for n, _ in variants] + ["paired"]},
    }
    if repeats > 1:
        report["agreement"] = agreement(report["cases"], "paired", ("paired_noise", "model_noise", "speed_noise"))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_dashboard(cases, report, out / "dashboard.html", variants[-1][0])
    return report


# --- report --------------------------------------------------------------------------------------------------


def _cdf(x: np.ndarray):
    x = np.sort(x[~np.isnan(x)])
    return x, np.arange(1, len(x) + 1) / max(1, len(x))


def write_dashboard(cases: list[dict], report: dict, path: Path, variant: str) -> Path:
    """A self-contained HTML page (plotly.js embedded): per case, the two end-to-end latency CDFs and the two
    iteration timelines (step time and batch size over time), with the error table on top."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = []
    for c in cases:
        titles += [f"latency CDF — load {c['load']:g}, {c['policy']}", f"iteration timeline — load {c['load']:g}, "
                   f"{c['policy']}"]
    fig = make_subplots(rows=len(cases), cols=2, subplot_titles=titles, vertical_spacing=0.3 / max(1, len(cases)),
                        specs=[[{}, {"secondary_y": True}] for _ in cases])
    colors = {"real": "#1f77b4", "sim": "#d62728"}
    for i, c in enumerate(cases, 1):
        first = i == 1
        for who, res in (("real", c["_real"]), ("sim", c["_sim"][variant])):
            x, y = _cdf(res.requests["latency_s"].to_numpy())
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{who} latency CDF", legendgroup=who,
                                     line=dict(color=colors[who], shape="hv"), showlegend=first), row=i, col=1)
            it = res.iterations
            fig.add_trace(go.Scatter(x=it["start_s"], y=1e3 * (it["prefill_s"] + it["step_s"]), mode="markers",
                                     marker=dict(size=3, color=colors[who], opacity=0.5), legendgroup=who,
                                     name=f"{who} iteration ms", showlegend=first), row=i, col=2)
            fig.add_trace(go.Scatter(x=it["start_s"], y=it["batch"], mode="lines", legendgroup=who,
                                     line=dict(color=colors[who], width=1, dash="dot", shape="hv"),
                                     name=f"{who} batch size", showlegend=first), row=i, col=2, secondary_y=True)
        fig.update_xaxes(title_text="end-to-end latency (s)", row=i, col=1)
        fig.update_xaxes(title_text="time (s)", row=i, col=2)
        fig.update_yaxes(title_text="iteration (ms)", row=i, col=2)
        fig.update_yaxes(title_text="batch", row=i, col=2, secondary_y=True)
    fig.update_layout(height=330 * len(cases), width=1200, title="specbatch-validate: real engine vs simulator")
    ag = report.get("agreement")
    rows = []
    for k, c in enumerate(cases):
        shown = [v for v in (variant, "paired") if v in c["errors"]]
        for v in shown:
            rows.append(f"<tr><td>{c['load']:g}</td><td>{c['policy']}</td><td>{v}</td>" + "".join(
                f"<td>{100 * c['errors'][v][m]:+.1f}%</td>" for m in METRICS) + "</tr>")
        if ag:  # the paired comparison's tolerance and verdict, on the goal metrics
            x = ag["cases"][k]
            rows.append("<tr><td></td><td></td><td>tolerance</td>" + "".join(
                f"<td>±{100 * x['tolerance'][m]:.1f}% {'ok' if x['within'][m] else 'OUT'}</td>" if m in x["tolerance"]
                else "<td></td>" for m in METRICS) + "</tr>")
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    info = (f"pair {report['pair']['draft']} / {report['pair']['target']} on {report['device']}, clock={report['clock']}, "
            f"threads={report['threads']}, loadavg {report['loadavg_start']} → {report['loadavg_end']}; "
            f"'{variant}': the simulator against the median over the engine's runs (plots: the first run); "
            "'paired': each run against the simulator at the speed its probe read, median over runs")
    verdict = "" if not ag else (
        f"<p><b>{'All cases agree' if ag['all'] else 'Some cases disagree'}</b> with the engine within the goal + "
        f"{ag['noise_widths']:g} × the measured noise (root sum of squares of {', '.join(ag['noises'])}).</p>")
    html = ("<html><head><meta charset='utf-8'><title>specbatch-validate</title></head><body>"
            f"<h2>Simulator error (sim − real) / real</h2><p>{info}</p>{verdict}"
            f"<table border='1' cellpadding='3'><tr><th>load</th><th>policy</th><th>variant</th>{head}</tr>"
            f"{''.join(rows)}</table>"
            + fig.to_html(full_html=False, include_plotlyjs=True) + "</body></html>")
    path.write_text(html, encoding="utf-8")
    return path


def format_report(report: dict) -> str:
    variants = list(report["variants"])
    lines = [f"pair {report['pair']['draft']} / {report['pair']['target']}, device {report['device']}, "
             f"clock {report['clock']}, attention {report.get('attention', 'paged')}, "
             f"loadavg {report['loadavg_start']} -> {report['loadavg_end']}",
             f"engine-side terms ({len(report['calibration']['speed_by_round'])} calibrations): "
             + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in report["calibration"]["overheads"].items() if k != "speed")
             + f"; speed vs the profile {report['calibration']['overheads']['speed']:.3f} (by round "
             + ", ".join(f"{x:.2f}" for x in report["calibration"]["speed_by_round"]) + ")",
             f"{'load':>5} {'policy':9}{'variant':9}" + "".join(f"{m:>17}" for m in METRICS)]
    cal = report["calibration"]
    if "probe_ref_by_round" in cal:
        lines.insert(2, f"probe at the profile's speed {1e3 * cal['probe_ref_s']:.3f} ms (by round "
                     + ", ".join(f"{1e3 * x:.3f}" for x in cal["probe_ref_by_round"])
                     + "; the probe in the run over the probe around the re-timed steps: "
                     + ", ".join(f"{x:.2f}" for x in cal["probe_run_over_steps"]) + ")")
    for c in report["cases"]:
        for v in variants:
            lines.append(f"{c['load']:>5.2f} {c['policy']:9}{v:9}" + "".join(f"{100 * c['errors'][v][m]:>+16.1f}%"
                                                                         for m in METRICS))
        for kind, label in (("noise", "noise"), ("paired_noise", "p. noise"), ("model_noise", "sim n."),
                            ("speed_noise", "speed n.")):
            if kind in c:
                lines.append(f"{'':>5} {'':9}{label:9}" + "".join(f"{100 * c[kind][m]:>16.1f}%" for m in METRICS))
        if c.get("probe_speeds"):
            lines.append(f"{'':>5} {'':9}probe    the machine's speed in each run (profile = 1): "
                         + ", ".join(f"{v:.2f}" for v in c["probe_speeds"])
                         + " (spread within each run: " + ", ".join(f"{v:.2f}" for v in c["probe_spreads"]) + ")")
        if c.get("steps"):
            st = c["steps"]
            lines.append(f"{'':>5} {'':9}steps    profile / engine step time, median {st['profile_over_step']:.3f} "
                         f"(model work only {st['profile_over_model_work']:.3f}); by batch "
                         + ", ".join(f"{b}: {v:.2f}" for b, v in st["profile_over_step_by_batch"].items()))
        if c.get("model_over_engine"):
            me = c["model_over_engine"]
            lines.append(f"{'':>5} {'':9}model    full model at each run's speed / engine, Σ over a run (median): "
                         + ", ".join(f"{k} {v:.3f}" for k, v in me.items() if v is not None))
        if c.get("engine_host"):
            h = c["engine_host"]
            lines.append(f"{'':>5} {'':9}host     engine run: {h['user_s']:.2f} s user, {h['kernel_s']:.2f} s kernel, "
                         f"{h['minor_faults']} minor page faults")
        if c.get("prefill"):
            pf = c["prefill"]
            lines.append(f"{'':>5} {'':9}prefill  profile / engine prefill, median {pf['profile_over_prefill']:.3f} "
                         f"(forwards only {pf['profile_over_forward']:.3f}; {pf['admissions']} admitting iterations)")
    for v in variants:
        lines.append(f"max |error| {v:9}" + "".join(f"{100 * report['max_abs_error'][v][m]:>16.1f}%" for m in METRICS))
    if "agreement" in report:
        ag = report["agreement"]
        lines.append(f"agreement ('{ag['variant']}'): |error| within goal + {ag['noise_widths']:g} x noise "
                     f"(root sum of squares of {', '.join(ag['noises'])}; each the case's own, or the median over "
                     "cases if larger):")
        for x, c in zip(ag["cases"], report["cases"]):
            lines.append(f"{x['load']:>5.2f} {x['policy']:9}" + "  ".join(
                f"{m} {100 * c['errors'][ag['variant']][m]:+.1f}% vs ±{100 * x['tolerance'][m]:.1f}% "
                f"{'ok' if x['within'][m] else 'OUT'}" for m in ag["goals"]))
        lines.append("all cases agree within the measured noise" if ag["all"] else
                     "some cases disagree by more than the measured noise")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="specbatch-validate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default=REDUCED["pair"], help="target:draft presets (default %(default)s)")
    ap.add_argument("--requests", type=int, default=REDUCED["requests"])
    ap.add_argument("--loads", type=float, nargs="+", default=list(REDUCED["loads"]),
                    help="fractions of the estimated no-speculation capacity")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--max-batch", type=int, default=REDUCED["max_batch"])
    ap.add_argument("--max-prompt", type=int, default=REDUCED["max_prompt"])
    ap.add_argument("--max-output", type=int, default=REDUCED["max_output"])
    ap.add_argument("--alpha", type=float, default=0.7, help="synthetic acceptance rate")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="engine and profile clock (default: cpu on the CPU, wall on CUDA)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft-sync", action="store_true",
                    help="γ = 0 steps also run the draft, in the engine and the simulator (cluster.draft_sync)")
    ap.add_argument("--attention", choices=("paged", "padded"), default=None,
                    help="the context the simulator charges a step at (cluster.attention); default: the engine's, "
                         "padded (attention over the batch's longest sequence)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=REDUCED["repeats"],
                    help="rounds: each calibrates once and runs every case once (≥ 2: also reports run-to-run noise)")
    ap.add_argument("--profile", default=None, help="reuse this profile folder instead of profiling")
    ap.add_argument("--trace-start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="fidelity-out")
    a = ap.parse_args(argv)
    clock = a.clock or ("wall" if a.device.startswith("cuda") else "cpu")
    try:
        report = validate(pair=a.pair, requests=a.requests, loads=tuple(a.loads), policies=tuple(a.policies),
                          max_batch=a.max_batch, max_prompt=a.max_prompt, max_output=a.max_output, alpha=a.alpha,
                          clock=clock, threads=a.threads, device=a.device, seed=a.seed, out=a.out,
                          profile=a.profile, repeats=a.repeats, trace_start=a.trace_start,
                          draft_sync=a.draft_sync, attention=a.attention)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"specbatch-validate: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"wrote {Path(a.out) / 'report.json'} and {Path(a.out) / 'dashboard.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
