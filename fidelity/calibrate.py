"""The engine-side time the profile misses, measured on the engine and added to the simulator's cost model.

The profile times each step alone, on a batch whose sequences all have the same context, back to back.
A serving engine also spends time between and around those steps, and its steps run inside a serving
loop. :class:`EngineCostModel` adds the
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
  profile's prefill forwards; with batched prefill also per forward of several prompts; with chunked
  prefill, per prompt chunk in a forward: what an iteration that carries chunks takes beyond the
  mixed-iteration rule and the step's terms (the chunks' token gathering, staging rows, per-part attention,
  the move into a running slot, and the rule's own error on this machine), per chunk whose draft is
  prefilled too, and per draft forward of the chunks alone (γ = 0 with the draft prefilled);
* ``step`` — the step's model work inside the run beyond the profile's step: per γ = 0 step (a decode),
  per γ > 0 step (a verify, with the draft's sampling, the acceptance draws and the residual distribution),
  per draft forward, and with ``draft_sync`` per γ = 0 step's draft forward: per-sequence lengths
  (position ids, one scatter per layer, a boolean mask, attention padded to the longest sequence) and
  caches cooled by the scheduler's work between steps; and
  per admission, and per admission whose draft is prefilled too, the extra time of the step that follows
  the prefill in the same iteration (tens of µs on the tiny pair; likely the prefill's forwards cooling
  the caches the step runs from). The simulator charges those two per admission with the prefill (it
  has no per-iteration admission cost), so its first token comes that much later than the engine's.

**Drafters** (the engine's ``drafter``, the simulator's ``drafter.kind``): "draft" names the drafter's part
throughout. With an EAGLE head the re-timed step is one head step (the profile's ``eagle`` decode row),
``draft_s`` is per head step and ``prefill_draft_s`` / ``admit_step_draft_s`` per admission whose head is
prefilled (the head over the target's prompt hidden states, beyond the profile's ``eagle`` prefill rows).
With n-gram lookup the re-timed step is one lookup for the batch (an ``ngram`` row), a step is priced by
the rows that proposed (the engine's ``matched``, :func:`model_step_times`), ``draft_s`` is per draft
position of a speculating step (there is no draft forward) and the draft-prefill terms are 0 (nothing is
prefilled for it).

:mod:`specbatch.fidelity.validate` runs the calibrations between its engine runs and compares the simulator with
and without each term (its ``variants``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specbatch.sim.cost_model import CostModel
from specbatch.sim.policies import Policy

# the engine-side terms, in the order the report's variants add them (:class:`EngineCostModel`'s ``fixes``)
FIXES = ("speed", "sched", "prefill", "step")


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
    # with batched prefill (one forward for an iteration's admissions): per forward, beyond the per-prompt terms
    prefill_forward_s: float = 0.0  # per target prefill forward (fresh cache, sampling); 0 when prefill is sequential
    prefill_forward_draft_s: float = 0.0  # per draft prefill forward
    decode_s: float = 0.0  # per γ = 0 step (one target decode) inside the run, beyond the profiled step
    verify_s: float = 0.0  # per γ > 0 step's target verify inside the run, beyond the profiled step
    draft_s: float = 0.0  # per batched draft forward inside the run, beyond the profiled step
    sync_s: float = 0.0  # per γ = 0 step's draft forward with draft_sync (no sampling), beyond the profiled one
    admit_step_s: float = 0.0  # per admission: the step of the iteration that admitted it, beyond the other terms
    admit_step_draft_s: float = 0.0  # per admission whose draft is prefilled too: the same step's further extra
    # chunked prefill, beyond the mixed-iteration rule: per prompt chunk in a forward, per chunk whose draft is
    # prefilled too, and per draft forward of the chunks alone (γ = 0 without a draft_sync step)
    chunk_s: float = 0.0
    chunk_draft_s: float = 0.0
    chunk_forward_draft_s: float = 0.0
    speed: float = 1.0  # the profile's step time over the same step timed during the engine runs (dimensionless)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class EngineCostModel:
    """A :class:`CostModel` (``base``, the profile's) plus the engine-side terms of ``overheads`` named in
    ``fixes`` (see the module docstring), wherever the simulator and the policies price a step or a
    prefill: :meth:`iteration` and its list and array forms, :meth:`prefill`, :meth:`prefill_batch`,
    :meth:`iteration_table`. The single model steps (:meth:`target_verify`, :meth:`draft_decode`) and the
    profile's facts are ``base``'s, unscaled."""

    def __init__(self, base: CostModel, overheads: Overheads, fixes=FIXES):
        self.base, self.overheads, self.fixes = base, overheads, tuple(fixes)
        self.profile, self.contexts = base.profile, base.contexts
        self.max_batch, self.max_gamma = base.max_batch, base.max_gamma
        self.drafter = base.drafter  # (the engine-side terms are fitted on this drafter's steps, :func:`calibrate`)

    # -- the base model's facts and single steps ----------------------------------------------------------

    @property
    def draft_sync(self) -> bool:
        return self.base.draft_sync

    @property
    def warned(self) -> bool:
        """Whether the base model has issued its extrapolation warning (set by the cluster's workers too)."""
        return self.base.warned

    @warned.setter
    def warned(self, value: bool) -> None:
        self.base.warned = value

    def has_prefill(self, model: str = "target") -> bool:
        return self.base.has_prefill(model)

    def has_prefill_batches(self, model: str = "target") -> bool:
        return self.base.has_prefill_batches(model)

    def target_verify(self, batch: int, gamma: int, context: float) -> float:
        return self.base.target_verify(batch, gamma, context)

    def draft_decode(self, batch: int, context: float) -> float:
        return self.base.draft_decode(batch, context)

    def with_draft_sync(self) -> "EngineCostModel":
        """The same terms on ``base.with_draft_sync()`` (a γ = 0 step also runs one draft decode)."""
        return self if self.draft_sync else EngineCostModel(self.base.with_draft_sync(), self.overheads, self.fixes)

    # -- the engine-side terms ---------------------------------------------------------------------------

    def _terms(self, batch: int, gamma: int, width: float | None = None) -> list[float]:
        """Seconds added to one iteration, in the order they are added. ``width``: the draft tokens per
        sequence its verify took (default γ; a partial proposer's step whose rows proposed nothing is a decode)."""
        o, terms = self.overheads, []
        width = gamma if width is None else width
        if "step" in self.fixes:
            # a draft_sync γ = 0 step also runs one draft forward
            terms.append(o.verify_s + width * o.draft_s if width else o.decode_s + self.draft_sync * o.sync_s)
        if "sched" in self.fixes:
            terms.append(o.sched_base_s + o.sched_per_seq_s * batch
                         + (o.sched_spec_s + o.sched_per_gamma_s * gamma if gamma else 0.0))
        return terms

    def _scale(self) -> float:
        """Factor on the profile's times: 1 / speed with the ``speed`` term."""
        return 1.0 / self.overheads.speed if "speed" in self.fixes else 1.0

    def _prefill_terms(self, model: str, prompts: int = 1) -> float:
        """Seconds added to one prefill forward of ``prompts`` admitted prompts on ``model``: per prompt,
        its prefill and admission-step terms; per forward, the forward's set-up (batched prefill)."""
        o, t = self.overheads, 0.0
        draft = model == "draft"
        if "step" in self.fixes:
            t = t + prompts * (o.admit_step_draft_s if draft else o.admit_step_s)
        if "prefill" in self.fixes:
            t = t + prompts * (o.prefill_draft_s if draft else o.prefill_s)
            t = t + (o.prefill_forward_draft_s if draft else o.prefill_forward_s)
        return t

    # -- the priced queries (each adds the terms in one order, so the three iteration forms agree bit for bit)

    def iteration(self, batch: int, gamma: int, context: float) -> float:
        t = self.base.iteration(batch, gamma, context) * self._scale()
        for term in self._terms(batch, gamma):
            t = t + term
        return t

    def iteration_list(self, batch: int, gamma: int, contexts) -> list[float]:
        k = self._scale()
        t = [x * k for x in self.base.iteration_list(batch, gamma, contexts)]
        for term in self._terms(batch, gamma):
            t = [x + term for x in t]
        return t

    def iteration_many(self, batch: int, gamma: int, contexts) -> np.ndarray:
        t = self.base.iteration_many(batch, gamma, contexts) * self._scale()
        for term in self._terms(batch, gamma):
            t = t + term
        return t

    def iteration_matched(self, batch: int, gamma: int, matched: int, context: float) -> float:
        """:meth:`CostModel.iteration_matched` (a partial proposer's step) with the terms of :meth:`iteration`,
        the step's at the draft tokens verified per sequence, γ·matched/batch (none matched: a decode's)."""
        t = self.base.iteration_matched(batch, gamma, matched, context) * self._scale()
        for term in self._terms(batch, gamma, gamma * matched / batch):
            t = t + term
        return t

    def iteration_table(self, context, batches: np.ndarray | None = None) -> np.ndarray:
        """:meth:`CostModel.iteration_table` priced by this model's :meth:`iteration`."""
        return CostModel.iteration_table(self, context, batches)

    def prefill(self, prompt_tokens: float, model: str = "target") -> float:
        return self.base.prefill(prompt_tokens, model) * self._scale() + self._prefill_terms(model)

    def prefill_batch(self, prompts, model: str = "target", attention: str = "paged") -> float:
        if len(prompts) == 1:
            return self.prefill(prompts[0], model)
        return self.base.prefill_batch(prompts, model, attention) * self._scale() + self._prefill_terms(model,
                                                                                                        len(prompts))

    # -- chunked prefill: the base model's rule at the engine's speed, and ``chunk_s`` per chunk --

    def mixed_rule(self, model: str = "target") -> dict:
        return self.base.mixed_rule(model)

    def chunk_seconds(self, chunks, model: str = "target") -> float:
        return self.base.chunk_seconds(chunks, model) * self._scale()

    def mixed_iteration(self, batch: int, gamma: int, context: float, chunks, draft: bool = True) -> tuple[float, float]:
        """:meth:`CostModel.mixed_iteration` with the chunks' extra at the engine's speed plus, under the
        ``prefill`` fix, ``chunk_s`` per chunk (and ``chunk_draft_s`` with ``draft``) and
        ``chunk_forward_draft_s`` when the draft runs its chunks in a forward of their own (γ = 0 without a
        draft_sync step), and the step priced by :meth:`iteration` (the engine-side step terms)."""
        extra, _ = self.base.mixed_iteration(batch, gamma, context, chunks, draft)
        extra = extra * self._scale()
        if chunks and "prefill" in self.fixes:
            o = self.overheads
            extra = extra + len(chunks) * (o.chunk_s + draft * o.chunk_draft_s)
            if draft and not gamma and not (batch and self.draft_sync):  # the draft's chunks run on their own
                extra = extra + o.chunk_forward_draft_s
        return extra, self.iteration(batch, gamma, context) if batch else 0.0


class ConstantGamma(Policy):
    """Calibration policy: always ``gamma``; ``drafts``: the draft model is used (prefilled at admission).
    Not a serving policy: it is not registered."""

    name = "calibration"

    def __init__(self, gamma: int, drafts: bool = True):
        self.gamma, self.uses_draft = int(gamma), bool(drafts)

    def choose(self, view) -> int:
        return self.gamma


def make_cost(profile, overheads: Overheads | None, fixes, max_batch: int,
              max_gamma: int, drafter=None) -> CostModel | EngineCostModel:
    """The simulator's cost model for ``profile`` pricing ``drafter``'s steps (a
    :class:`specbatch.sim.drafters.Drafter`; None: the draft model) as ``specbatch-sim drafter=...`` does: with
    ``overheads`` and some ``fixes``, the :class:`EngineCostModel` adding those terms, else the plain
    :class:`CostModel`."""
    base = CostModel(profile, max_batch=max_batch, max_gamma=max_gamma, drafter=drafter)
    return base if overheads is None or not fixes else EngineCostModel(base, overheads, fixes)


def step_models(engine) -> list[tuple[str, object]]:
    """``(role, model)`` of the models whose KV caches :func:`profiler_steps` steps: the target and the
    engine's drafter (the draft model, or the EAGLE head; none for n-gram lookup)."""
    drafter = {"draft_model": engine.draft, "eagle": engine.head}.get(engine.cfg.drafter)
    return [("target", engine.target)] + ([("draft", drafter)] if drafter is not None else [])


def profiler_steps(engine, batch: int, gamma: int, context: int, caches: dict | None = None) -> list:
    """``(step, reset)`` pairs of the profiler's own steps for one iteration at (batch, γ, context) on the
    engine's models (:func:`specbatch.profiler.sweep.make_step`, the work one ``steps.csv`` row times): the target's
    decode (γ = 0) or verify of γ + 1 tokens, then, when γ > 0, one step of the engine's drafter — a draft
    decode, an EAGLE head step (an ``eagle`` row) or one n-gram lookup for the batch proposing γ tokens
    (an ``ngram`` row, :func:`specbatch.profiler.sweep.ngram_step`). ``caches``: ``{"target": ..., "draft": ...}``
    (:func:`step_models`) holding ``context`` positions with room for γ + 1 more (fresh ones when None)."""
    from specbatch.profiler import models as M
    from specbatch.profiler.sweep import make_step, ngram_step
    from specbatch.sim.drafters import ROWS  # the profile's rows that price each drafter's step

    dev, temp, gen = engine.device, engine.cfg.temperature, engine.gen
    if caches is None:
        caches = {role: M.make_cache("prealloc", m.config, batch, context, gamma + 1, engine.dtype, dev)
                  for role, m in step_models(engine)}
    steps = [make_step(("target", "verify" if gamma else "decode", batch, gamma + 1, context), engine.target,
                       caches["target"], engine.vocab, temp, gen, dev)]
    if gamma and engine.cfg.drafter == "ngram":
        window = {"prompt_lookup_min": engine.cfg.prompt_lookup_min, "prompt_lookup_max": engine.cfg.prompt_lookup_max}
        steps.append(ngram_step(batch, context, window, engine.cfg.seed, proposed=gamma))
    elif gamma:
        role, model = step_models(engine)[1]
        steps.append(make_step((ROWS[engine.cfg.drafter], "decode", batch, 1, context), model, caches[role],
                               engine.vocab, temp, gen, dev))
    return steps


def retime(engine, batch: int, gamma: int, context: int, caches: dict, clock, repeats: int = 5) -> list[float]:
    """The profiler's steps at (batch, γ, context) (:func:`profiler_steps` on ``caches``) each called
    ``repeats`` + 1 times on ``clock``, the first call warming the shape up and not kept: the median seconds
    of the target's step, then (γ > 0) of one drafter step."""
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
    profiler's own steps (:func:`specbatch.profiler.sweep.make_step`: γ draft decodes + one verify, timed back to
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

    from specbatch.profiler import models as M
    from specbatch.fidelity.engine import make_clock
    from specbatch.sim import workload as wl
    from specbatch.sim.cluster import ClusterConfig
    from specbatch.sim.capacity import estimate_capacity

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
        t["models"] = 2 if drafts and cost.drafter.prefill else 1  # models prefilled per admission (ngram: 1)
        # as sim.cluster charges a drafting policy (an ngram proposer has no KV to keep in step)
        t["draft_sync"] = bool(engine.cfg.draft_sync and drafts and cost.drafter.per_token)
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
                      for role, m in step_models(engine)}
            for g in gammas:
                before = probe() if probe is not None else None
                med = retime(engine, b, g, c, caches, clock, repeats)
                drafted = (g if cost.drafter.per_token else 1) * med[1] if g else 0.0  # (ngram: one lookup)
                point = dict(batch=b, gamma=g, context=c, profiler_s=med[0] + drafted)
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
    """The machine's speed during an engine run, for :meth:`specbatch.fidelity.engine.Engine.run`'s ``probe``: the
    profiler's own steps at ``point`` (one verify of γ + 1 tokens and one draft decode, on caches of their
    own), run once to warm them and timed the second time, as the sweep times a point; the probe returns
    those seconds. The calibration runs carry the same probe, and :func:`fit_overheads` ties its time to
    the profile's speed (``probe_ref_s``): a run whose probe took ``probe_s`` ran at ``probe_ref_s / probe_s``
    of the profile's speed. (Timed cold, without the warming call, it read the machine slower than the
    profile's warm steps, the ``step`` terms fitted against it came out at 0, and the simulator was 7–30 %
    slow.) ``probe.point`` is the point."""
    from specbatch.fidelity.engine import make_clock

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
    profiler's step timed in the calibration (``profiler_s``) (dimensionless; > 1: faster than profiled).
    A partial proposer's (ngram) point is priced with every sequence proposing γ, as it was re-timed."""
    def profiled(b: int, g: int, c: float) -> float:
        if g and cost.drafter.partial:
            return cost.iteration_matched(b, g, b, c)
        return cost.iteration(b, g, c)

    return np.array([profiled(p["batch"], p["gamma"], float(p["context"])) / p["profiler_s"] for p in step_points])


def speed_vs_profile(cost, step_points: list[dict]) -> float:
    """The machine's speed during a calibration relative to the profile behind ``cost``: the median over
    its points of :func:`point_speeds`."""
    return float(np.median(point_speeds(cost, step_points)))


def fit_overheads(cost, calibrations: list[dict], *, attention: str = "padded",
                  prefill: str = "sequential") -> tuple[Overheads, dict]:
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
      iteration at that speed, ``decode`` at γ = 0 and ``verify + γ·draft`` at γ > 0, γ the draft tokens the
      step verified (:func:`verify_width`: an ngram step whose rows proposed nothing is a decode) (per-sequence lengths,
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
    * with ``prefill="chunked"`` the iterations that carried prompt chunks are left out of the fits above
      and the per-admission ``prefill`` terms are 0; ``chunk_s`` is the median over those iterations of
      their time less the profile's step and the rule's chunks (:meth:`CostModel.mixed_iteration`) at the
      round's speed and less the fitted ``sched`` and ``step`` terms, per chunk, over the runs that prefill
      the target only; ``chunk_draft_s`` the same over the drafting runs' iterations whose draft chunks rode
      in a decode forward, less ``chunk_s``; ``chunk_forward_draft_s`` the median of the same less both per
      chunk over the iterations whose draft ran its chunks in a forward of their own (γ = 0 with the draft
      prefilled and no draft_sync step);
    * ``prefill_s``, ``prefill_draft_s``: the whole prefill phase minus the profile's prefill of the
      admitted prompts at that speed, per admission: the median over the iterations whose runs prefill the
      target only (``models`` = 1 in the calibration's table), and the median over those that prefill
      both models (``models`` = 2) minus that (the set-up and first-token sampling are per admission, not
      per model: on the tiny pair a target-only admission cost about 0.2 ms more than half of a two-model
      one). With ``prefill="batched"`` (one forward per model for an iteration's admissions, priced by
      :func:`model_prefill_time`) the set-up is per forward and the copy per prompt: a line on [1, k] for
      the target and on the same for iterations that prefill the draft too (k admissions) through the
      median extra time of each (draft?, k) group, weighted by √(group size), giving ``prefill_forward_s``,
      ``prefill_s``, ``prefill_forward_draft_s``, ``prefill_draft_s`` (plain least squares over the
      iterations let a few slow multi-prompt phases lift the terms: the single admissions, most of a
      validation's, came out 0.2 ms dear).

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
        ran a ``draft_sync`` draft forward; ``width``: :func:`verify_width`."""
        it = it.copy()
        # chunked prefill: admissions are chunks inside the verify forward (no prefill phase of their own)
        it["chunked_step"] = it["chunks"].map(len) > 0 if "chunks" in it else False
        if prefill == "chunked":
            it["prompts"] = None
        ran, adm = it["batch"] > 0, it["prompts"].notna()
        synced = it["draft_sync"].astype(bool) if "draft_sync" in it else pd.Series(False, index=it.index)
        it["sync_step"] = sync = synced & (it["gamma"] == 0)
        it["profile_step_s"] = it["profile_prefill_s"] = np.nan
        for rows, c in ((ran & ~sync, cost), (ran & sync, cost.with_draft_sync())):
            it.loc[rows, "profile_step_s"] = model_step_times(c, it[rows], attention=attention)
        it["width"] = verify_width(cost, it, attention=attention)
        it.loc[adm, "profile_prefill_s"] = [model_prefill_time(cost, ps, m == 2, attention=attention, prefill=prefill)
                                            for ps, m in zip(it.loc[adm, "prompts"], it.loc[adm, "models"])]
        if prefill == "chunked":  # what the rule adds for the chunks (the step is profile_step_s)
            from specbatch.sim.replica import STEP_CONTEXT

            mixed = it[it["chunked_step"]]
            it["profile_chunks_s"] = 0.0
            it.loc[mixed.index, "profile_chunks_s"] = [
                cost.mixed_iteration(int(b), int(g), float(c), list(ch), m == 2)[0] for b, g, c, ch, m in
                zip(mixed["batch"], mixed["gamma"], mixed[STEP_CONTEXT[attention]], mixed["chunks"], mixed["models"])]
        return it

    def sched_columns(it) -> np.ndarray:
        """Per iteration, what the ``sched`` terms multiply: 1, the batch, γ > 0, γ."""
        g = it["gamma"].to_numpy(float)
        return np.c_[np.ones_like(g), it["batch"].to_numpy(float), g > 0, g]

    def step_columns(it) -> np.ndarray:
        """Per iteration, what the ``step`` terms multiply: a decode, a verify, the draft tokens it verified per
        sequence (γ but for a partial proposer), a draft_sync forward."""
        w = it["width"].to_numpy(float)
        return np.c_[w == 0, w > 0, w, it["sync_step"]]

    def fit(it, speed) -> np.ndarray:
        """The terms (in :func:`terms`' order) from calibration iterations ``it`` (:func:`with_profile`)
        timed at ``speed``."""
        dec = it[(it["batch"] > 0) & ~it["chunked_step"]]  # (a step that carried prompt chunks: the rule prices it)
        pred = dec["profile_step_s"].to_numpy() / speed
        n_adm = dec["admitted"].to_numpy(float)
        admits = np.c_[n_adm, n_adm * (dec["models"].to_numpy() == 2)]  # per admission, per draft prefilled
        sched = lstsq(np.c_[sched_columns(dec), admits], (dec["step_s"] - dec["step_model_s"]).to_numpy())
        step = lstsq(np.c_[step_columns(dec), admits], dec["step_model_s"].to_numpy() - pred)
        admit = sched[4:] + step[4:]  # both parts of the step: its model work and the work around it
        chunk = chunk_terms(it, sched, step, speed) if prefill == "chunked" else (0.0, 0.0, 0.0)
        adm = it[it["prompts"].notna() & ~it["chunked_step"]]
        models = adm["models"].to_numpy()
        p_pred = adm["profile_prefill_s"].to_numpy() / speed
        k = adm["admitted"].to_numpy(float)
        if prefill == "batched":  # one forward per model per iteration: per forward + per prompt, per model
            # a line through the median extra time of each (draft prefilled?, admissions) group, weighted by
            # √(group size): the medians keep a few slow phases from pulling the common single admissions
            extra = pd.Series(adm["prefill_s"].to_numpy() - p_pred).groupby([models == 2, k])
            med, size = extra.median(), extra.size().to_numpy(float)
            d, kk = (med.index.get_level_values(i).to_numpy(float) for i in (0, 1))
            w = np.sqrt(size)
            fwd, one, fwd_draft, two = lstsq(np.c_[np.ones_like(kk), kk, d, d * kk] * w[:, None], med.to_numpy() * w)
            return np.r_[sched[:4], one, two, fwd, fwd_draft, step[:4], admit, 0.0, 0.0, 0.0]
        extra = (adm["prefill_s"].to_numpy() - p_pred) / k  # per admission (and per forward: one each)
        one, two = (float(np.median(extra[models == m])) if (models == m).any() else np.nan for m in (1, 2))
        if np.isnan(one):  # no target-only admissions: split evenly between the two models (or none: chunked)
            one = two / 2 if not np.isnan(two) else 0.0
        return np.r_[sched[:4], one, 0.0 if np.isnan(two) else two - one, 0.0, 0.0, step[:4], admit, list(chunk)]

    def chunk_terms(it, sched, step, speed) -> tuple[float, float, float]:
        """(``chunk_s``, ``chunk_draft_s``, ``chunk_forward_draft_s``) from the iterations that carried chunks,
        each one's residual = its time − the profile's step and the rule's chunks at ``speed`` − the fitted
        sched and step terms: the median residual per chunk over the target-only runs; over the drafting
        runs' iterations whose draft chunks rode in a decode forward, that median less ``chunk_s``; over
        those whose draft ran them in a forward of their own, the median residual less both per chunk."""
        mix = it[it["chunked_step"]]
        g, ran = mix["gamma"].to_numpy(float), mix["batch"].to_numpy() > 0
        terms = ran * (sched_columns(mix) @ sched[:4] + step_columns(mix) @ step[:4])
        model = (np.nan_to_num(mix["profile_step_s"].to_numpy()) + mix["profile_chunks_s"].to_numpy()) / speed
        n = mix["chunks"].map(len).to_numpy(float)
        resid = mix["step_s"].to_numpy() - model - terms
        drafts = mix["models"].to_numpy() == 2
        alone = drafts & (g == 0) & ~(ran & mix["draft_sync"].to_numpy(bool))

        def median(x) -> float:
            return float(np.median(x)) if len(x) else 0.0

        per_chunk = median(resid[~drafts] / n[~drafts])
        ride = drafts & ~alone
        per_draft = median(resid[ride] / n[ride]) - per_chunk if ride.any() else 0.0
        return per_chunk, per_draft, median(resid[alone] - (per_chunk + per_draft) * n[alone])

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
        (base, per_seq, spec, per_gamma, per_prompt, per_prompt_draft, per_forward, per_forward_draft, decode, verify,
         draft, sync, adm, adm_draft, chunk, chunk_draft, chunk_forward_draft) = (max(0.0, float(v)) for v in values)
        return Overheads(sched_base_s=base, sched_per_seq_s=per_seq, sched_spec_s=spec, sched_per_gamma_s=per_gamma,
                         prefill_s=per_prompt, prefill_draft_s=per_prompt_draft, prefill_forward_s=per_forward,
                         prefill_forward_draft_s=per_forward_draft, decode_s=decode, verify_s=verify,
                         draft_s=draft, sync_s=sync, admit_step_s=adm, admit_step_draft_s=adm_draft,
                         chunk_s=chunk, chunk_draft_s=chunk_draft, chunk_forward_draft_s=chunk_forward_draft,
                         speed=float(speed))

    o = terms(fit(pooled, speed), speed)
    details = {"overheads": o.as_dict(), "by_round": [terms(f, sp).as_dict() for f, sp in zip(fits, speeds)],
               "speed_by_round": [round(x, 3) for x in speeds], "steps_speed_by_round": [round(x, 3) for x in hot],
               **probe_details,
               "calibration_iterations": n_dec, "admissions": n_adm,
               "step_points": [p for c in calibrations for p in c["step_points"]]}
    return o, details


def model_step_times(cost, iterations, *, attention: str = "padded") -> np.ndarray:
    """``cost.iteration(batch, γ, context)`` for every row of an iteration table whose rows all ran a step
    (seconds), at the context the simulator charges under ``attention`` (``cluster.attention``): the
    longest sequence's (``context_max``; the engine pads) or the mean (``context``). A partial proposer's
    (ngram) γ > 0 rows are charged as the simulator charges them, by the sequences that proposed (the
    table's ``matched``, the engine's diagnostics) under ``attention``
    (:func:`specbatch.sim.drafters.charged_matched`)."""
    from specbatch.sim.drafters import charged_matched
    from specbatch.sim.replica import STEP_CONTEXT

    column = STEP_CONTEXT[attention]
    b_, g_, c_ = iterations["batch"], iterations["gamma"], iterations[column]
    if not cost.drafter.partial:
        return np.array([cost.iteration(int(b), int(g), float(c)) for b, g, c in zip(b_, g_, c_)])
    if "matched" not in iterations:
        raise ValueError("model_step_times: a partial proposer's steps need the iterations' 'matched' column "
                         "(the engine's diagnostics)")
    padded = attention == "padded"
    return np.array([cost.iteration_matched(int(b), int(g), charged_matched(int(m), int(b), padded), float(c))
                     if g else cost.iteration(int(b), 0, float(c))
                     for b, g, c, m in zip(b_, g_, c_, iterations["matched"])])


def verify_width(cost, iterations, *, attention: str = "padded") -> np.ndarray:
    """Per row of an iteration table, the draft tokens per sequence its verify took, as the simulator charges
    it: γ, but for a partial proposer (ngram) γ·m/b with m the rows charged as proposing
    (:func:`specbatch.sim.drafters.charged_matched` of the table's ``matched`` under ``attention``; padded: γ
    when any row proposed, 0 when none did). The ``step`` terms follow it (:meth:`EngineCostModel._terms`):
    the engine's extra work in a step grows with the tokens it verifies."""
    from specbatch.sim.drafters import charged_matched

    g = iterations["gamma"].to_numpy(float)
    if not cost.drafter.partial:
        return g
    padded = attention == "padded"
    return np.array([gam * charged_matched(int(m), int(b), padded) / b if gam and b else 0.0
                     for gam, b, m in zip(g, iterations["batch"], iterations["matched"])])


def model_prefill_time(cost, prompts, drafts: bool, *, attention: str = "padded", prefill: str = "sequential") -> float:
    """Seconds the simulator charges for prefilling ``prompts`` (tokens) on the target (and the draft when
    ``drafts``) under ``cluster.prefill``: Σ of ``cost.prefill(prompt, model)``, or with ``"batched"`` one
    ``cost.prefill_batch(prompts, model, attention)`` per model."""
    models = ("target", "draft") if drafts else ("target",)
    if prefill == "batched":
        return sum(cost.prefill_batch([float(n) for n in prompts], m, attention) for m in models)
    return sum(sum(cost.prefill(float(n), m) for m in models) for n in prompts)
