"""How far the simulator is from the engine: relative errors, run-to-run spread, the verdict against the
accuracy goals given the measured noise, and step- and prefill-level checks of the profile against the
engine's own timings."""
from __future__ import annotations

import numpy as np

from specbatch.fidelity.calibrate import admitted_prompts, model_prefill_time, model_step_times

METRICS = ("latency_mean", "latency_p50", "latency_p99", "ttft_mean", "ttft_p50", "ttft_p99",
           "tpot_mean", "tpot_p50", "tpot_p99", "throughput_tok_s")
HEADLINE = ("latency_mean", "latency_p99", "throughput_tok_s")
# the accuracy goals (|relative error|) and how many noise widths a measured error may exceed them by
GOALS = {"latency_mean": 0.05, "latency_p99": 0.10, "throughput_tok_s": 0.05}
NOISE_WIDTHS = 3.0
# a tolerance wider than this many times the goal cannot tell agreement from disagreement: the verdict is
# "inconclusive", not "agree" (goal + 3 x noise > 2 x goal, i.e. a combined noise above a third of the goal)
CONCLUSIVE_OVER_GOAL = 2.0
VERDICTS = ("agree", "disagree", "inconclusive")
EXIT_CODES = {"agree": 0, "disagree": 1, "inconclusive": 3}  # specbatch-validate's exit status (2: bad input)


def rel_errors(real: dict, sim: dict) -> dict:
    """``(sim − real) / real`` for each of :data:`METRICS`."""
    return {m: float((sim[m] - real[m]) / real[m]) if real[m] else float("nan") for m in METRICS}


def spread(values) -> float:
    """Run-to-run spread of a metric: the semi-interquartile range over the median (dimensionless)."""
    q25, q50, q75 = np.percentile(np.asarray(values, float), [25, 50, 75])
    return float((q75 - q25) / 2 / q50) if q50 else float("nan")


def metric_verdict(error: float, goal: float, tolerance: float) -> str:
    """One metric of one case: ``"disagree"`` when the error is outside the tolerance (even a wide one);
    ``"inconclusive"`` when it is inside but the tolerance is wider than :data:`CONCLUSIVE_OVER_GOAL` × the
    goal (the noise, not the simulator, decides), or when the error or the tolerance is not a number;
    else ``"agree"``."""
    if not (np.isfinite(error) and np.isfinite(tolerance)):
        return "inconclusive"
    if abs(error) > tolerance:
        return "disagree"
    return "inconclusive" if tolerance > CONCLUSIVE_OVER_GOAL * goal else "agree"


def combine(verdicts) -> str:
    """Several verdicts as one: ``"disagree"`` if any disagrees, ``"agree"`` if every one agrees (and there is
    at least one), else ``"inconclusive"``."""
    verdicts = list(verdicts)
    if "disagree" in verdicts:
        return "disagree"
    return "agree" if verdicts and all(v == "agree" for v in verdicts) else "inconclusive"


def agreement(cases: list[dict], variant: str, noises=("noise", "model_noise")) -> dict:
    """Does ``variant`` agree with the engine within what this machine can tell apart? Per case and metric
    of :data:`GOALS`: the tolerance is the goal plus :data:`NOISE_WIDTHS` × the combined noise, the root
    sum of squares of the case's ``noises`` entries — ``noise``: the engine's run-to-run spread, or
    ``paired_noise`` for the paired comparison: the spread of the per-run ratios sim / engine;
    ``model_noise``: the simulator's spread when each round's own calibration replaces the median terms;
    ``speed_noise``: how far the simulator moves when the machine's speed in each run is off by the spread
    of the probe's readings within that run — each being the case's own or, if larger, the median over
    the cases (a spread from a handful of runs is itself noisy); an absent entry counts 0. Needs two or
    more rounds.

    Each metric's verdict is :func:`metric_verdict` (an error within a tolerance wider than
    :data:`CONCLUSIVE_OVER_GOAL` × the goal is "inconclusive", never "agree"); a case's and the overall
    ``verdict`` are :func:`combine` of theirs. Returns per case the combined ``noise``, ``tolerance``,
    ``within`` (|error| ≤ tolerance), ``verdicts`` and ``verdict``; overall ``verdict`` and ``all_within``
    (every case's error within its tolerance, whether that agrees or is inconclusive)."""
    pooled = {kind: {m: float(np.median([(c.get(kind) or {}).get(m, 0.0) for c in cases])) for m in GOALS}
              for kind in noises}
    out = []
    for c in cases:
        width = {m: float(np.hypot.reduce([max((c.get(k) or {}).get(m, 0.0), pooled[k][m]) for k in noises]))
                 for m in GOALS}
        tol = {m: GOALS[m] + NOISE_WIDTHS * width[m] for m in GOALS}
        err = {m: float(c["errors"][variant][m]) for m in GOALS}
        ok = {m: bool(abs(err[m]) <= tol[m]) for m in GOALS}
        verdicts = {m: metric_verdict(err[m], GOALS[m], tol[m]) for m in GOALS}
        out.append({"load": c["load"], "policy": c["policy"], "noise": width, "tolerance": tol, "within": ok,
                    "verdicts": verdicts, "verdict": combine(verdicts.values())})
    return {"variant": variant, "goals": GOALS, "noise_widths": NOISE_WIDTHS,
            "conclusive_over_goal": CONCLUSIVE_OVER_GOAL, "noises": list(noises), "pooled_noise": pooled,
            "cases": out, "verdict": combine(x["verdict"] for x in out),
            "all_within": all(all(x["within"].values()) for x in out)}


def describe_verdict(case: dict, metric: str) -> str:
    """A case's verdict on one metric in words: ``agree``, ``DISAGREE``, or ``inconclusive (noise X %)``
    (the combined noise that made the tolerance too wide to tell)."""
    v = case["verdicts"][metric]
    if v == "inconclusive":
        return f"inconclusive (noise {100 * case['noise'][metric]:.1f} %)"
    return "DISAGREE" if v == "disagree" else v


def summary(ag: dict | None) -> str:
    """The overall verdict in one sentence (``ag``: :func:`agreement`'s result, None with one round)."""
    if ag is None:
        return ("inconclusive: one round gives no noise estimate, so no verdict (run with --repeats 2 or more); "
                "exit status 3")
    goals = ", ".join(f"{m} {100 * g:g} %" for m, g in ag["goals"].items())
    n = {v: sum(x["verdict"] == v for x in ag["cases"]) for v in VERDICTS}
    counts = f"{n['agree']} agree, {n['disagree']} disagree, {n['inconclusive']} inconclusive of {len(ag['cases'])}"
    head = {"agree": "agree: every case agrees with the engine within its goal",
            "disagree": "disagree: some case's error is outside its tolerance",
            "inconclusive": (f"inconclusive: on some case the noise widened the tolerance beyond "
                             f"{ag['conclusive_over_goal']:g} x the goal, so this machine cannot tell")}[ag["verdict"]]
    return (f"{head} ({counts} cases; goals {goals}; tolerance goal + {ag['noise_widths']:g} x noise); "
            f"exit status {EXIT_CODES[ag['verdict']]}")


def step_agreement(iterations, diagnostics, cost, *, attention: str = "padded") -> dict:
    """Step-level check of the profile against the engine: for every engine iteration that ran a step,
    the profile's prediction (:func:`model_step_times` under ``attention``) divided by the engine's measured
    step time (``step_s``: the whole step incl. engine bookkeeping) and by its model work alone
    (``step_model_s``).
    Medians (dimensionless; > 1 = the profile is slower than the engine), overall and per batch size.
    (``diagnostics``' ``matched`` prices a partial proposer's steps, :func:`model_step_times`.)"""
    it = with_matched(iterations, diagnostics)
    ran = (it["batch"] > 0).to_numpy() & (it["step_s"] > 0).to_numpy()
    it, model = it[ran], diagnostics["step_model_s"].to_numpy()[ran]
    pred = model_step_times(cost, it, attention=attention)
    whole, work = pred / it["step_s"].to_numpy(), pred / model
    by_batch = {int(b): round(float(np.median(whole[(it["batch"] == b).to_numpy()])), 3)
                for b in sorted(it["batch"].unique())}
    return {"iterations": int(ran.sum()), "profile_over_step": round(float(np.median(whole)), 3),
            "profile_over_model_work": round(float(np.median(work)), 3), "profile_over_step_by_batch": by_batch}


def predicted_prefills(requests, iterations, cost, uses_draft: bool, *, attention: str = "padded",
                       prefill: str = "sequential") -> list[tuple[int, float]]:
    """``(row, seconds)`` for every iteration (row of ``iterations``, index reset) that admitted only fresh
    requests (not resuming after a preemption): :func:`model_prefill_time` of its admitted prompts."""
    it = iterations.reset_index(drop=True)
    return [(i, model_prefill_time(cost, prompts, uses_draft, attention=attention, prefill=prefill))
            for i, prompts in enumerate(admitted_prompts(requests, it)) if prompts is not None]


def with_matched(iterations, diagnostics):
    """``iterations`` (index reset) with the engine's ``matched`` column from ``diagnostics`` (when it has one):
    the sequences that proposed in each iteration, which price a partial proposer's steps."""
    it = iterations.reset_index(drop=True)
    if diagnostics is not None and "matched" in diagnostics:
        it = it.assign(matched=diagnostics["matched"].to_numpy())
    return it


def mixed_times(cost, iterations, chunks, uses_draft: bool, *, attention: str = "padded") -> np.ndarray:
    """Seconds the simulator charges each iteration of a chunked-prefill run (``cluster.prefill=chunked``):
    extra + step of ``cost.mixed_iteration`` at the iteration's batch, γ and charged context (``attention``)
    with its ``chunks`` [(prefilled, tokens), ...] (the engine's ``diagnostics["chunks"]``), the draft's share
    included when the policy drafts."""
    from specbatch.sim.replica import STEP_CONTEXT

    column = STEP_CONTEXT[attention]
    return np.array([sum(cost.mixed_iteration(int(b), int(g), float(c) if b else 0.0, list(ch), uses_draft))
                     for b, g, c, ch in zip(iterations["batch"], iterations["gamma"], iterations[column], chunks)])


def chunked_agreement(iterations, diagnostics, cost, uses_draft: bool, *, attention: str = "padded") -> dict:
    """Iteration-level check under chunked prefill: the simulator's charge (:func:`mixed_times`) over the
    engine's iteration (``step_s``: its forwards and bookkeeping) and over its model work alone
    (``step_model_s``), medians over the iterations that carried prompt chunks and over those that did not
    (dimensionless; > 1 = the simulator is slower than the engine)."""
    it = iterations.reset_index(drop=True)
    chunks = diagnostics["chunks"].tolist()
    pred = mixed_times(cost, it, chunks, uses_draft, attention=attention)
    whole, work = pred / it["step_s"].to_numpy(), pred / diagnostics["step_model_s"].to_numpy()
    mixed = np.array([len(c) > 0 for c in chunks])
    out = {"iterations": len(it), "with_chunks": int(mixed.sum())}
    for name, sel in (("mixed", mixed), ("plain", ~mixed)):
        out[f"model_over_{name}_iteration"] = round(float(np.median(whole[sel])), 3) if sel.any() else None
        out[f"model_over_{name}_model_work"] = round(float(np.median(work[sel])), 3) if sel.any() else None
    return out


def model_over_engine(result, cost, uses_draft: bool, *, attention: str = "padded",
                      prefill: str = "sequential", diagnostics=None, chunks=None) -> dict:
    """Where one engine run's time goes, ``cost`` (the full model at the run's speed) against the engine:
    Σ of the model's step times over the run's iterations (:func:`model_step_times`) ÷ Σ of the
    engine's step times, and Σ of the model's prefill times ÷ Σ of the engine's prefill phases over the
    iterations that admitted only fresh requests (dimensionless; < 1: the model is faster; None for a part
    the run did not have). Queueing turns these into the latency errors, amplified at load. The model's
    prefill includes the admissions' step terms (``admit_step_*``), as the simulator charges them; the
    engine's prefill phase does not (they land in its step). ``diagnostics``: the run's engine diagnostics
    (their ``matched`` prices a partial proposer's steps). Chunked prefill (``chunks``: the run's chunks per
    iteration): the model's charge of every iteration (:func:`mixed_times`) ÷ the engine's, as ``steps``;
    ``prefill`` None (no separate prefill phase)."""
    it = with_matched(result.iterations, diagnostics)
    if prefill == "chunked":
        meas = float(it["step_s"].sum())
        pred = float(mixed_times(cost, it, chunks, uses_draft, attention=attention).sum())
        return {"steps": pred / meas if meas > 0 else None, "prefill": None}
    ran = it[it["batch"] > 0]
    step_pred = float(model_step_times(cost, ran, attention=attention).sum())
    step_meas = float(ran["step_s"].sum())
    pf = predicted_prefills(result.requests, it, cost, uses_draft, attention=attention, prefill=prefill)
    pf_meas = sum(float(it["prefill_s"].iat[i]) for i, _ in pf)
    return {"steps": step_pred / step_meas if step_meas > 0 else None,
            "prefill": sum(t for _, t in pf) / pf_meas if pf_meas > 0 else None}


def prefill_agreement(requests, iterations, diagnostics, cost, uses_draft: bool, *, attention: str = "padded",
                      prefill: str = "sequential") -> dict | None:
    """Prefill-level check of the profile against the engine: for every engine iteration that admitted only
    fresh requests (not resuming after a preemption), the profile's prefill prediction
    (:func:`model_prefill_time` of the admitted prompts, on the draft too when the policy drafts) — divided by the
    engine's measured prefill forwards (``prefill_forward_s``) and by its whole prefill phase (``prefill_s``:
    the forwards plus cache set-up, first-token sampling and the copy into the slot). Medians
    (dimensionless; > 1 = the profile is slower than the engine); None when no iteration qualifies."""
    it = iterations.reset_index(drop=True)
    fwd = diagnostics["prefill_forward_s"].to_numpy()
    pred, f_meas, whole = [], [], []
    for i, t in predicted_prefills(requests, it, cost, uses_draft, attention=attention, prefill=prefill):
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
