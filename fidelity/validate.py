"""specbatch-validate: does the simulator agree with real execution on this machine?

For a draft/target pair it (1) profiles the pair here (or reuses a fresh profile), (2) replays the same
trace slice through the real engine (:mod:`specbatch.fidelity.engine`) and through the simulator
(:func:`specbatch.sim.cluster.simulate`) with the same policy, acceptance model, seed and cluster shape, and
(3) reports the relative error ``(sim − real) / real`` of mean, p50 and p99 end-to-end latency, TTFT, TPOT
and throughput, plus a self-contained dashboard overlaying the two latency CDFs and iteration timelines.

    specbatch-validate                                # reduced: tiny pair, 2 loads x 3 policies
    specbatch-validate --pair llama-68m:tiny-llama-draft --requests 120 --out fidelity-out
    specbatch-validate --clock wall                   # wall clock (a quiet machine of your own)
    specbatch-validate --drafter eagle                # an EAGLE head drafts (or ngram: prompt lookup), in both

What the profile misses, measured on the engine and added to the simulator (the report's simulator
variants), is :mod:`specbatch.fidelity.calibrate`; the errors, noise and agreement verdict are :mod:`specbatch.fidelity.agreement`.

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

**Verdict.** Per case and goal metric the paired error is compared with its tolerance, the goal plus 3 × the
measured noise (:func:`specbatch.fidelity.agreement.agreement`): outside it the case disagrees; inside it
the case agrees only when the tolerance is at most twice the goal — a wider one means the machine was too
noisy to tell, and the case is inconclusive. The validation agrees when every case agrees, disagrees when
any case disagrees, and is inconclusive otherwise (or with one round, which gives no noise estimate). The
report (``verdict``, ``verdict_summary``), the printed summary and the dashboard say which; the exit status
is 0 (agree), 1 (disagree), 3 (inconclusive), 2 (bad input).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from specbatch.fidelity.agreement import (EXIT_CODES, HEADLINE, METRICS, agreement, chunked_agreement, describe_verdict,
                                          model_over_engine, prefill_agreement, rel_errors, spread, step_agreement,
                                          summary)
from specbatch.fidelity.calibrate import (FIXES, PROBE_EVERY, Overheads, at_speed, calibrate, fit_overheads, make_cost,
                                make_probe)
from specbatch.profiler.sweep import loadavg
from specbatch.sim.replica import ATTENTION, PREFILL

PROFILE_PASSES = 3  # sweeps of the profile's grid in a validation (each merged at the machine's typical speed)
# how the validation's sweep samples each point (profiler.timing.measure), beside point_budget_s
PROFILE_TIMING = dict(warmup=2, min_samples=9, max_samples=60, floor_samples=5, rel_precision=0.02)
POLICIES = {"none": {}, "fixed": {"gamma": 4}, "adaptive": {}}  # the validation's policies, and their parameters
# further policies a validation may name (--policies): the online ones see the engine's own iterations
MORE_POLICIES = {"adaptive_context": {}, "goodput": {}, "threshold": {}, "ema_tiers": {}}
# cumulative: what each term buys on top of the previous ones
VARIANTS = tuple((name, FIXES[:k]) for k, name in enumerate(("profile", "+speed", "+sched", "+prefill", "model")))

# the reduced validation: tiny pair, small grid, short trace slice
REDUCED = dict(pair="tiny-llama:tiny-llama-draft", requests=40, repeats=5, loads=(0.3, 0.6), max_batch=8,
               max_prompt=96, max_output=48, max_gamma=6,
               grid=dict(batches=[1, 2, 4, 8], gammas=[0, 1, 2, 4, 6], contexts=[32, 160],
                         prefill_lengths=[8, 32, 96], prefill_batches=[1]))


def profile_pair(out: Path, target: str, draft: str, grid: dict, *, clock: str = "cpu", threads: int = 1,
                 device: str = "cpu", point_budget_s: float = 0.1, seed: int = 0, passes: int = 3,
                 max_passes: int = 4, repairs: int = 3, reference: bool = True, after_pass=None,
                 drafters: tuple = ("draft",), graphs: bool = False) -> Path:
    """Profile ``draft``/``target`` on this machine into ``out`` with the profiler's sweep.

    On a shared machine the speed drifts between points (other jobs come and go; a group of neighbouring
    points can land in a slow second), so the grid is swept ``passes`` times (3 by default, so that the median
    outvotes one slow pass) and each point keeps the median of its pass medians; while the result fails the
    profile's monotonicity check the disputed points are remeasured (up to ``repairs`` rounds), then whole
    passes are added (up to ``max_passes``); ``after_pass(k)`` runs after pass k; see
    :func:`specbatch.profiler.sweep.run_passes`. ``reference``: each point read against the sweep's speed reference
    (``timing.reference``), so that the passes are merged at the machine's typical speed."""
    from omegaconf import OmegaConf

    from specbatch.profiler.sweep import Grid, run_passes

    cfg = OmegaConf.create(dict(
        pair=dict(target=target, draft=draft, name=f"{draft}__{target}"), device=device, dtype="auto",
        threads=threads, cache="prealloc", seed=seed, resume=False, memory_limit_bytes=None, drafters=list(drafters),
        note=f"specbatch-validate, clock={clock}, loadavg at start {loadavg()}",
        timing=dict(**PROFILE_TIMING, point_budget_s=point_budget_s, deadline_s=None, temperature=1.0,
                    reference=reference, clock=clock,  # the engine's clock (timing.clock)
                    graphs=graphs)))  # the engine's way of running a step (graphs or eager): like with like
    run_passes(cfg, out_dir=out, grid=Grid.from_cfg(grid), passes=passes, max_passes=max(passes, max_passes),
               repairs=repairs, progress=False, after_pass=after_pass)
    return out


MIXED_PASSES = 2  # sweeps of the mixed grid (chunked prefill) after the profile's passes


def mixed_rows(prof_dir: Path, target: str, draft: str, models: dict, *, clock: str, threads: int, device: str,
               seed: int, point_budget_s: float = 0.1, log=print) -> dict:
    """Time the profile's mixed forwards (:func:`specbatch.profiler.mixed.run_mixed`, the default grid over the
    profile's own, with the steps the rule reads re-timed alongside) on the engine's ``models`` into
    ``prof_dir``, and check the mixed-iteration rule against them (:func:`specbatch.fidelity.mixed.rule_check`,
    stored in meta.json); returns the check."""
    from omegaconf import OmegaConf

    from specbatch.fidelity.mixed import rule_check, store, table
    from specbatch.profiler.mixed import MixedGrid, run_mixed
    from specbatch.profiler.sweep import Grid
    from specbatch.sim.profile import load_profile

    meta = json.loads((prof_dir / "meta.json").read_text())
    grid = Grid.from_cfg(meta["timing"]["grid"])
    cfg = OmegaConf.create(dict(pair=dict(target=target, draft=draft), device=device, dtype=meta["dtype"],
                                threads=threads, seed=seed,
                                timing=dict(**PROFILE_TIMING, point_budget_s=point_budget_s, temperature=1.0,
                                            clock=clock)))
    mgrid = MixedGrid.from_cfg(None, grid)
    log(f"timing {len(mgrid.points())} mixed forwards x {MIXED_PASSES} passes (chunked prefill) ...")
    run_mixed(cfg, prof_dir, mgrid, MIXED_PASSES, models=models, progress=False, anchors_of=grid)
    prof = load_profile(prof_dir)
    check = rule_check(prof)
    store(prof, check)
    for line in table(check):
        if not line.startswith(("target ", "draft ", "model ")):
            log("  " + line)
    return check


def fresh_profile(path: Path, target: str, draft: str, clock: str, grid: dict, max_age_h: float,
                  drafters: tuple = ("draft",)) -> bool:
    """True when ``path`` holds a complete profile of this pair, clock and grid, with the rows of
    ``drafters``, younger than ``max_age_h``."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        age = _dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(meta["date"])
        return (meta["pair"]["target"] == target and meta["pair"]["draft"] == draft and meta["timing"].get("complete")
                and meta["timing"].get("clock") == clock and meta["timing"]["grid"] == grid
                and set(drafters) <= set(meta["timing"].get("drafters", ["draft"]))
                and age.total_seconds() < max_age_h * 3600)
    except (OSError, KeyError, ValueError, TypeError):
        return False


# --- one comparison ------------------------------------------------------------------------------------------


def trace_slice(requests: int, *, start: int = 0, prompt_div: float = 16.0, output_div: float = 8.0,
                max_prompt: int = 96, max_output: int = 48, workload: str = "azure_conv"):
    """The first ``requests`` of a trace from row ``start`` (arrival pattern kept), lengths divided by
    ``prompt_div``/``output_div`` and capped so that small models can serve them. ``workload``: a workload preset
    of ``specbatch-sim`` (``conf/workload/<name>.yaml``; default the Azure conversation trace) or a trace file,
    read with the simulator's loader and schema (:func:`specbatch.sim.run.preset_workload`; ``first_n`` lifted)."""
    from dataclasses import replace

    from specbatch.sim.run import preset_workload

    w = preset_workload(workload, ["workload.first_n=null"])  # a trace preset: every row
    if start < 0 or start + requests > len(w):
        raise ValueError(f"--trace-start {start} + --requests {requests} runs past the {len(w)} requests of "
                         f"workload {workload!r}")
    w = w.take(np.arange(start, start + requests))
    arr = w.arrival_s - w.arrival_s[0]
    p = np.clip(np.round(w.prompt_tokens / prompt_div), 4, max_prompt).astype(np.int64)
    o = np.clip(np.round(w.output_tokens / output_div), 2, max_output).astype(np.int64)
    label = Path(workload).stem
    return replace(w, arrival_s=arr, prompt_tokens=p, output_tokens=o, name=f"{label}[{start}:{start + requests}]")


def validation_drafter(kind: str, match_rate: float | None = None):
    """The simulator's drafter for a validation whose engine drafts with ``kind``: that kind's documented
    n-gram window and match rate (``conf/drafter/<kind>.yaml``; ``match_rate`` in place of its own), without
    per-position rates (the validation's synthetic ``alpha`` decides acceptance for every kind)."""
    from specbatch.sim.drafters import make_drafter

    return make_drafter(kind, positions=None, **({} if match_rate is None else {"match_rate": match_rate}))


def drafter_label(report: dict) -> str:
    """A report's drafter in a few words: its kind (draft_model in reports without one), and an n-gram
    drafter's match rate and window."""
    d = report.get("drafter") or {"kind": "draft_model"}
    if d["kind"] != "ngram":
        return d["kind"]
    return f"ngram (match rate {d['match_rate']:g}, window {d['prompt_lookup_min']}-{d['prompt_lookup_max']})"


def frozen_policy(name: str, cost, acceptance, context):
    """A set-up policy whose ``setup`` is a no-op afterwards, so the engine and every simulator variant use
    the same γ table."""
    from specbatch.sim.policies import make_policy

    p = make_policy(name, **{**POLICIES, **MORE_POLICIES}[name])
    p.setup(cost, acceptance, context)
    p.setup = lambda *a, **k: None
    return p


def validate(*, pair: str = REDUCED["pair"], requests: int = REDUCED["requests"], loads=REDUCED["loads"],
             policies=tuple(POLICIES), max_batch: int = REDUCED["max_batch"], max_prompt: int = REDUCED["max_prompt"],
             max_output: int = REDUCED["max_output"], max_gamma: int = REDUCED["max_gamma"], grid: dict | None = None,
             alpha: float = 0.7, clock: str = "cpu", threads: int = 1, device: str = "cpu", seed: int = 0,
             trace_start: int = 0, workload: str = "azure_conv", out: Path | str = "fidelity-out", profile: str | None = None,
             max_age_h: float = 12.0, repeats: int = REDUCED["repeats"], variants=None, draft_sync: bool = False,
             attention: str | None = None, prefill: str = "sequential", drafter: str = "draft_model",
             graphs: bool | None = None, match_rate: float | None = None, max_num_batched_tokens: int = 64,
             log=print) -> dict:
    """Run the whole validation; write ``report.json`` and ``dashboard.html`` into ``out``; return the report.
    ``attention``: how the simulator charges a step's context (``cluster.attention``; default the engine's,
    padded). ``prefill``: ``"batched"`` prefills an iteration's admissions in one forward per model, in the
    engine and the simulator (``cluster.prefill``), and profiles prefill at batch sizes up to ``max_batch``;
    ``"chunked"`` splits prompts into chunks under ``max_num_batched_tokens`` tokens per forward, verify first
    (the engine's packed forwards; the simulator's mixed-iteration rule), and times the profile's mixed
    forwards (:func:`mixed_rows`) once the profile's passes are done (a ``profile`` given with mixed forwards
    keeps its own; the rule is checked against them).
    ``graphs``: the engine replays its batched forwards from CUDA graphs and the profile is taken with graphs
    (default: on CUDA; :func:`specbatch.fidelity.engine.uses_graphs`).
    ``drafter``: what drafts, in the engine and the simulator (``drafter.kind``, :func:`validation_drafter`;
    ``match_rate``: an n-gram drafter's, default ``conf/drafter/ngram.yaml``'s)."""
    import pandas as pd
    import torch

    from specbatch.fidelity.engine import Engine, EngineConfig, uses_graphs
    from specbatch.sim.acceptance import AcceptanceModel
    from specbatch.sim.capacity import estimate_capacity
    from specbatch.sim.cluster import ClusterConfig, charged_context, charged_cost, simulate
    from specbatch.sim.metrics import summarize
    from specbatch.sim import workload as wl
    from specbatch.sim.profile import ProfileWarning, load_profile

    variants = variants or VARIANTS
    graphs = uses_graphs(EngineConfig(device=device, graphs=graphs))
    attention = attention or Engine.attention
    spec = validation_drafter(drafter, match_rate)
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if int(repeats) < 1:
        raise ValueError(f"repeats={repeats}: expected at least 1 round")
    if pair.count(":") != 1 or not all(pair.split(":")):
        raise ValueError(f"pair {pair!r}: expected 'target:draft' (two presets or checkpoint folders)")
    target, draft = pair.split(":")
    grid = dict(grid or REDUCED["grid"])
    if prefill == "batched":  # the prefill grid over batch sizes the cost model interpolates in
        grid["prefill_batches"] = sorted({*grid["prefill_batches"], 1, 2, min(4, max_batch), max_batch})
    torch.set_num_threads(threads)
    load_start = loadavg()
    prof_dir = Path(profile) if profile else out / "profile"
    acc = AcceptanceModel(alpha=alpha, max_gamma=max_gamma, match_rate=spec.match_rate)
    base = trace_slice(requests, start=trace_start, max_prompt=max_prompt, max_output=max_output, workload=workload)
    max_len = max(max_prompt + max_output + max_gamma + 4, 64)
    setup, cases, calibrations = {}, [], []

    def set_up(prof) -> None:
        """The engine, and every case's workload and policy, from the first profile there is."""
        plain = make_cost(prof, None, (), max_batch, max_gamma, drafter=spec)
        ecfg = EngineConfig(max_batch=max_batch, kv_capacity_tokens=max_batch * max_len, clock=clock,
                            threads=threads, device=device, seed=seed, dtype=str(prof.meta["dtype"]),
                            draft_sync=draft_sync, prefill=prefill, drafter=drafter, graphs=graphs,
                            max_num_batched_tokens=max_num_batched_tokens,
                            **({"prompt_lookup_min": spec.prompt_lookup_min, "prompt_lookup_max": spec.prompt_lookup_max}
                               if drafter == "ngram" else {}))
        engine = Engine(target, draft, ecfg, max_len=max_len)
        cluster = ClusterConfig(max_batch=max_batch, kv_capacity_tokens=engine.capacity, draft_sync=draft_sync,
                                attention=attention, prefill=prefill, max_num_batched_tokens=max_num_batched_tokens)
        capacity = estimate_capacity(plain, base, cluster)
        table_cost = plain.with_draft_sync() if draft_sync else plain  # what the policies' γ tables are built from
        for load in loads:
            w = wl.set_rate(base, load * capacity)
            ref_ctx = charged_context(w, Engine.attention, table_cost.max_batch)  # the tables an engine that pads gets
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
    prof_drafters = ("draft",) if drafter == "draft_model" else ("draft", drafter)
    if profile is None and not fresh_profile(prof_dir, target, draft, clock, grid, max_age_h, prof_drafters):
        log(f"profiling {draft} / {target} on {device} (clock={clock}, {PROFILE_PASSES} passes), each followed "
            f"by an engine round; {repeats} rounds in all ...")
        profile_pair(prof_dir, target, draft, grid, clock=clock, threads=threads, device=device, seed=seed,
                     passes=PROFILE_PASSES, after_pass=one_round,
                     drafters=prof_drafters, graphs=graphs)
        for k in range(PROFILE_PASSES, int(repeats)):
            one_round(k)
    else:
        log(f"reusing the profile {prof_dir}; {repeats} engine rounds ...")
        for k in range(int(repeats)):
            one_round(k)
    prof = load_profile(prof_dir)  # the final profile: every pass merged
    mixed_check = None
    if prefill == "chunked" and profile is not None and prof.mixed is not None:
        from specbatch.fidelity.mixed import rule_check  # a profile of the user's: its mixed forwards as they are

        mixed_check = rule_check(prof)
    elif prefill == "chunked":
        e = setup["engine"]
        mixed_check = mixed_rows(prof_dir, target, draft, {"target": e.target, "draft": e.draft}, clock=clock,
                                 threads=threads, device=device, seed=seed, log=log)
        prof = load_profile(prof_dir)  # with its mixed forwards
    t_measured = time.perf_counter() - t_start
    plain, cluster, capacity = make_cost(prof, None, (), max_batch, max_gamma, spec), setup["cluster"], setup["capacity"]
    over, cal = fit_overheads(plain, calibrations, attention=attention, prefill=prefill)
    log(f"  engine-side terms ({repeats} calibrations): {over}")
    costs = {name: make_cost(prof, over, fixes, max_batch, max_gamma, spec) for name, fixes in variants}

    def model_cost(o: Overheads, speed: float):
        """The full model with terms ``o`` rescaled to ``speed``."""
        return make_cost(prof, at_speed(o, speed), variants[-1][1], max_batch, max_gamma, spec)

    def model_at(o: Overheads, speed: float, w, pol) -> dict:
        """Summary of the full model's simulation with terms ``o`` rescaled to ``speed``."""
        return summarize(simulate(w, model_cost(o, speed), pol, acc, cluster, seed=seed))

    for case in cases:
        w, pol, runs = case.pop("_w"), case.pop("_pol"), case.pop("_runs")
        r = runs[0]["result"]
        s_real = {**runs[0]["summary"], **{m: float(np.median([x["summary"][m] for x in runs])) for m in METRICS}}
        ran = [x for x in runs if len(x["result"].iterations)]
        drafts = pol.uses_draft and spec.prefill  # the drafter prefills admitted prompts too (ngram: never)
        its = diags = None
        if ran:
            its = pd.concat([x["result"].iterations for x in ran])
            diags = pd.concat([x["diagnostics"] for x in ran])
        steps = prefills = chunks = None
        if ran and prefill == "chunked":
            chunks = chunked_agreement(its, diags, charged_cost(plain, pol, cluster), pol.uses_draft,
                                       attention=attention)
        elif ran:
            steps = step_agreement(its, diags, charged_cost(plain, pol, cluster), attention=attention)
            prefills = prefill_agreement(r.requests, r.iterations, runs[0]["diagnostics"], plain, drafts,
                                         attention=attention, prefill=prefill) if len(r.iterations) else None
        case.update({"loadavg": runs[0]["loadavg"], "engine_wall_s": float(np.median([x["wall_s"] for x in runs])),
                     "engine_host": {k: round(float(np.mean([x["host"][k] for x in runs])), 3)
                                     for k in runs[0]["host"]},
                     "steps": steps, "prefill": prefills, "chunked": chunks,
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
            parts.append(model_over_engine(x["result"], charged_cost(cost, pol, cluster), drafts,
                                           attention=attention, prefill=prefill, diagnostics=x["diagnostics"],
                                           chunks=x["diagnostics"]["chunks"].tolist()))
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
        "draft_sync": draft_sync, "attention": attention, "prefill": prefill,
        "graphs": {"enabled": graphs, "late_captures": setup["engine"].step_graphs.late_captures
                   if setup["engine"].step_graphs is not None else 0},
        **({"max_num_batched_tokens": max_num_batched_tokens, "mixed_check": mixed_summary(mixed_check)}
           if prefill == "chunked" else {}),
        "drafter": spec.describe(),
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
    add_verdict(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_dashboard(cases, report, out / "dashboard.html", variants[-1][0])
    return report


# --- report --------------------------------------------------------------------------------------------------


def mixed_summary(check: dict | None) -> dict | None:
    """The mixed-iteration rule's error per comparison and model (:func:`specbatch.fidelity.mixed.rule_check`),
    without the points."""
    if check is None:
        return None
    return {part: {m: v for m, v in check[part].items() if m != "points"}
            for part in ("profile_steps", "same_run_steps") if part in check}


def add_verdict(report: dict) -> dict:
    """``report["verdict"]``: the agreement's overall verdict (agree / disagree / inconclusive; inconclusive
    without an agreement: one round gives no noise estimate), and ``verdict_summary``, the sentence saying
    so and the exit status it gives (:data:`~specbatch.fidelity.agreement.EXIT_CODES`)."""
    report["verdict"] = report["agreement"]["verdict"] if "agreement" in report else "inconclusive"
    report["verdict_summary"] = summary(report.get("agreement"))
    return report


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
                f"<td>±{100 * x['tolerance'][m]:.1f}% {describe_verdict(x, m)}</td>" if m in x["tolerance"]
                else "<td></td>" for m in METRICS) + "</tr>")
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    info = (f"pair {report['pair']['draft']} / {report['pair']['target']} on {report['device']}, "
            f"drafter {drafter_label(report)}, "
            f"clock={report['clock']}, "
            f"threads={report['threads']}, loadavg {report['loadavg_start']} → {report['loadavg_end']}; "
            f"'{variant}': the simulator against the median over the engine's runs (plots: the first run); "
            "'paired': each run against the simulator at the speed its probe read, median over runs")
    verdict = (f"<p class='verdict' data-verdict='{report.get('verdict', 'inconclusive')}'><b>Verdict: "
               f"{summary(ag)}</b></p>")
    if ag:
        verdict += (f"<p>A case agrees when its error is within the goal + {ag['noise_widths']:g} × the measured "
                    f"noise (root sum of squares of {', '.join(ag['noises'])}) and that tolerance is at most "
                    f"{ag['conclusive_over_goal']:g} × the goal; within a wider tolerance it is inconclusive.</p>")
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
             f"drafter {drafter_label(report)}, "
             f"clock {report['clock']}, attention {report.get('attention', 'paged')}, "
             f"prefill {report.get('prefill', 'sequential')}"
             + (f" (budget {report['max_num_batched_tokens']} tokens)" if report.get("prefill") == "chunked" else "")
             + f", loadavg {report['loadavg_start']} -> {report['loadavg_end']}",
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
        if c.get("chunked"):
            ch = c["chunked"]
            lines.append(f"{'':>5} {'':9}chunked  model / engine iteration, median: with chunks "
                         f"{ch['model_over_mixed_iteration']} (model work {ch['model_over_mixed_model_work']}), "
                         f"without {ch['model_over_plain_iteration']}; {ch['with_chunks']} of {ch['iterations']} "
                         "iterations carried chunks")
        if c.get("prefill"):
            pf = c["prefill"]
            lines.append(f"{'':>5} {'':9}prefill  profile / engine prefill, median {pf['profile_over_prefill']:.3f} "
                         f"(forwards only {pf['profile_over_forward']:.3f}; {pf['admissions']} admitting iterations)")
    for part, check in (report.get("mixed_check") or {}).items():
        lines.append(f"mixed-iteration rule vs the profile's mixed forwards ({part}): " + "; ".join(
            f"{m} |error| median {100 * x['median_abs_rel_error']:.1f} %, max {100 * x['max_abs_rel_error']:.1f} %"
            for m, x in check.items()))
    for v in variants:
        lines.append(f"max |error| {v:9}" + "".join(f"{100 * report['max_abs_error'][v][m]:>16.1f}%" for m in METRICS))
    if "agreement" in report:
        ag = report["agreement"]
        lines.append(f"agreement ('{ag['variant']}'): |error| within goal + {ag['noise_widths']:g} x noise "
                     f"(root sum of squares of {', '.join(ag['noises'])}; each the case's own, or the median over "
                     f"cases if larger); a tolerance over {ag['conclusive_over_goal']:g} x the goal is inconclusive:")
        for x, c in zip(ag["cases"], report["cases"]):
            lines.append(f"{x['load']:>5.2f} {x['policy']:9}" + "  ".join(
                f"{m} {100 * c['errors'][ag['variant']][m]:+.1f}% vs ±{100 * x['tolerance'][m]:.1f}% "
                f"{describe_verdict(x, m)}" for m in ag["goals"]))
    lines.append("verdict: " + report.get("verdict_summary", summary(report.get("agreement"))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="specbatch-validate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="exit status: 0 every case agrees, 1 some case disagrees, 3 inconclusive "
                                        "(the measured noise is too wide to tell, or one round gave no noise "
                                        "estimate), 2 bad input")
    ap.add_argument("--pair", default=REDUCED["pair"], help="target:draft presets (default %(default)s)")
    ap.add_argument("--requests", type=int, default=REDUCED["requests"])
    ap.add_argument("--loads", type=float, nargs="+", default=list(REDUCED["loads"]),
                    help="fractions of the estimated no-speculation capacity")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES) + list(MORE_POLICIES))
    ap.add_argument("--max-batch", type=int, default=REDUCED["max_batch"])
    ap.add_argument("--max-prompt", type=int, default=REDUCED["max_prompt"])
    ap.add_argument("--max-output", type=int, default=REDUCED["max_output"])
    ap.add_argument("--alpha", type=float, default=0.7, help="synthetic acceptance rate")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="engine and profile clock (default: cpu on the CPU, wall on CUDA)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft-sync", action="store_true",
                    help="γ = 0 steps also run the draft, in the engine and the simulator (cluster.draft_sync)")
    ap.add_argument("--attention", choices=ATTENTION, default=None,
                    help="the context the simulator charges a step at (cluster.attention); default: the engine's, "
                         "padded (attention over the batch's longest sequence)")
    ap.add_argument("--prefill", choices=PREFILL, default="sequential",
                    help="an iteration's admissions: one prefill forward each, one forward for all of them, or "
                         "chunks inside the verify forward under a token budget, in the engine and the simulator "
                         "(cluster.prefill); batched profiles prefill at several batch sizes, chunked also times "
                         "mixed forwards")
    ap.add_argument("--max-num-batched-tokens", type=int, default=64,
                    help="with --prefill chunked: tokens per forward, verify first (cluster.max_num_batched_tokens; "
                         "default %(default)s, so that the reduced trace's prompts are split)")
    ap.add_argument("--drafter", choices=("draft_model", "eagle", "ngram"), default="draft_model",
                    help="what drafts, in the engine and the simulator (drafter.kind): the pair's draft model, an "
                         "EAGLE head built from the target (random weights; the profile gets its eagle rows) or "
                         "n-gram lookup (ngram rows; the engine's proposals follow the simulator's match draws)")
    ap.add_argument("--match-rate", type=float, default=None,
                    help="--drafter ngram: probability that a sequence's lookup proposes in an iteration "
                         "(default conf/drafter/ngram.yaml's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="the engine replays its batched forwards from CUDA graphs and the profile is taken with "
                         "graphs (default: on CUDA); --no-graphs runs both eagerly")
    ap.add_argument("--repeats", type=int, default=REDUCED["repeats"],
                    help="rounds: each calibrates once and runs every case once (≥ 2: also reports run-to-run noise)")
    ap.add_argument("--profile", default=None, help="reuse this profile folder instead of profiling")
    ap.add_argument("--workload", default="azure_conv",
                    help="a specbatch-sim workload preset (conf/workload/<name>.yaml) or a trace file, read with the "
                         "simulator's loader (default %(default)s)")
    ap.add_argument("--trace-start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="fidelity-out")
    a = ap.parse_args(argv)
    from specbatch.profiler.cli import require_profile_extra
    require_profile_extra("specbatch-validate")  # the core install (no torch): one line naming the extra
    clock = a.clock or ("wall" if a.device.startswith("cuda") else "cpu")
    try:
        report = validate(pair=a.pair, requests=a.requests, loads=tuple(a.loads), policies=tuple(a.policies),
                          max_batch=a.max_batch, max_prompt=a.max_prompt, max_output=a.max_output, alpha=a.alpha,
                          clock=clock, threads=a.threads, device=a.device, seed=a.seed, out=a.out,
                          profile=a.profile, repeats=a.repeats, trace_start=a.trace_start, workload=a.workload,
                          draft_sync=a.draft_sync, attention=a.attention, prefill=a.prefill, drafter=a.drafter,
                          graphs=a.graphs, match_rate=a.match_rate, max_num_batched_tokens=a.max_num_batched_tokens)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"specbatch-validate: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"wrote {Path(a.out) / 'report.json'} and {Path(a.out) / 'dashboard.html'}")
    return EXIT_CODES[report["verdict"]]


if __name__ == "__main__":
    sys.exit(main())
