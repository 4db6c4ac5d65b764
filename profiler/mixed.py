"""Timing of mixed forwards (chunked prefill): the rows of a profile's ``mixed.csv``.

A mixed point ``(model, batch, tokens, context, chunk_tokens, chunk_prefix)`` is one packed forward
(:mod:`specbatch.profiler.packed`) of ``batch`` sequences' ``tokens`` new tokens each at ``context`` cached
tokens (the target's verify of γ+1 tokens, or the draft's decode of 1) plus one prompt chunk of
``chunk_tokens`` tokens after ``chunk_prefix`` cached tokens of its own sequence, followed by what the
matching steps.csv step does after its forward (target: the acceptance test with residual/bonus sampling on
the verify logits; draft: sampling one token per sequence); the chunk's last-token logits are computed and
not sampled. Timed like the step points (:func:`specbatch.profiler.timing.measure`), in ``passes`` sweeps of
the grid, each point the median of its pass medians.

The grid (``mixed`` in conf/profile.yaml, :class:`MixedGrid`): batches × γ × contexts × chunk lengths ×
chunk prefixes on the target, and batches × contexts × chunk lengths × prefixes on the draft (γ does not
change its one-token decode). Unset lists default from the step grid (:meth:`MixedGrid.from_cfg`), so that
each (batch, γ, context) is a measured step and each chunk length a measured prefill length.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from specbatch.sim.profile import MIXED_COLUMNS, MIXED_KEY, write_mixed


class MixedPoint(NamedTuple):
    model: str
    batch: int
    tokens: int
    context: int
    chunk_tokens: int
    chunk_prefix: int


@dataclass
class MixedGrid:
    batches: list[int]
    gammas: list[int]
    contexts: list[int]
    chunk_tokens: list[int]
    chunk_prefixes: list[int]
    models: list[str]

    @classmethod
    def from_cfg(cls, m, grid) -> "MixedGrid":
        """``m`` (the ``mixed`` config: lists or null) over the step ``grid``: null batches = the smallest, middle
        and largest of grid.batches; gammas = 0 and 4 (or the largest γ) among grid.gammas; contexts = the
        grid's middle context; chunk_tokens = the prefill lengths but the longest; chunk_prefixes = 0 and the
        second-longest prefill length; models = draft and target."""
        get = (lambda k: m.get(k)) if m is not None and hasattr(m, "get") else (lambda k: None)
        mid = lambda v: v[len(v) // 2]  # noqa: E731
        lengths = grid.prefill_lengths
        defaults = {
            "batches": sorted({grid.batches[0], mid(grid.batches), grid.batches[-1]}),
            "gammas": sorted({0, 4 if 4 in grid.gammas else max(grid.gammas)}),
            "contexts": [mid(grid.contexts)],
            "chunk_tokens": lengths[:-1] if len(lengths) > 1 else lengths,
            "chunk_prefixes": sorted({0, lengths[-2] if len(lengths) > 1 else lengths[0]}),
            "models": ["target", "draft"],
        }
        vals = {}
        for k, d in defaults.items():
            v = get(k)
            v = d if v is None else ([str(x) for x in v] if k == "models" else [int(x) for x in v])
            low = 0 if k in ("gammas", "chunk_prefixes") else 1
            if k == "models":
                if not v or any(x not in ("target", "draft") for x in v):
                    raise ValueError(f"mixed.models = {v}; expected a non-empty list of target, draft")
            elif not v or any(x < low for x in v):
                raise ValueError(f"mixed.{k} = {v}; expected a non-empty list of integers >= {low}")
            vals[k] = sorted(set(v))
        return cls(**vals)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def points(self) -> list[MixedPoint]:
        pts = []
        for c in self.contexts:
            for b in self.batches:
                for p in self.chunk_prefixes:
                    for k in self.chunk_tokens:
                        if "draft" in self.models:
                            pts.append(MixedPoint("draft", b, 1, c, k, p))
                        if "target" in self.models:
                            pts += [MixedPoint("target", b, g + 1, c, k, p) for g in self.gammas]
        return pts


def anchor_points(mgrid: MixedGrid, grid) -> list[tuple]:
    """The steps.csv points the mixed-iteration rule reads for ``mgrid`` (``(model, phase, batch, tokens,
    context)``): each (batch, γ, context) step of the target and the draft, and the batch-1 prefill at every
    grid prefill length up to the first that reaches the longest chunk end (prefix + tokens); re-timed in the
    same passes as the mixed points, so the rule can be checked against steps measured alongside them."""
    reach = max(p + k for p in mgrid.chunk_prefixes for k in mgrid.chunk_tokens)
    lengths = [n for n in grid.prefill_lengths if n < reach] + [n for n in grid.prefill_lengths if n >= reach][:1]
    pts = []
    for m in mgrid.models:
        pts += [(m, "prefill", 1, n, 0) for n in lengths]
        for c in mgrid.contexts:
            for b in mgrid.batches:
                gammas = mgrid.gammas if m == "target" else [0]
                pts += [(m, "decode" if g == 0 else "verify", b, g + 1, c) for g in gammas]
    return pts


def measure_anchors(points: list[tuple], models: dict, tm, timer, dtype, device, temperature: float,
                    seed: int) -> list[dict]:
    """One sweep of the steps.csv ``points`` with the sweep's own step functions
    (:func:`specbatch.profiler.sweep.make_step`); returns steps.csv rows."""
    import torch

    from specbatch.profiler import models as M
    from specbatch.profiler.sweep import KEY, make_step
    from specbatch.profiler.timing import measure_point

    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for p in points:
        role, phase, batch, tokens, context = p
        model = models[role]
        cache = M.make_cache("prealloc", model.config, batch, 0 if phase == "prefill" else context,
                             tokens, dtype, device)
        step, reset = make_step(p, model, cache, model.config.vocab_size, temperature, gen, device)
        s = measure_point(step, timer, tm, reset=reset)
        rows.append({**dict(zip(KEY, p)), "median_s": s.median_s, "p10_s": s.p10_s, "p90_s": s.p90_s,
                     "samples": s.samples, "status": "ok"})
    return rows


INCLUDED = ("one packed forward (profiler/packed.py: the batch's new tokens and the chunk's flattened into one "
            "input, per-token positions, attention per part) + what the matching steps.csv step does after its "
            "forward (target: acceptance test and residual/bonus sampling; draft: sampling); logits at the verify "
            "tokens and the chunk's last token")


def make_mixed_step(p: MixedPoint, model, dtype, device, temperature: float, gen):
    """A ``step`` closure timing mixed point ``p`` on ``model`` (attention :data:`specbatch.profiler.attention.NAME`),
    with its own cache of ``batch + 1`` rows (random K/V in the cached positions). Every call writes the same
    positions, so no reset is needed between repeats."""
    import torch

    from specbatch.profiler import models as M
    from specbatch.profiler import packed as P

    b, t, c, k, pre = p.batch, p.tokens, p.context, p.chunk_tokens, p.chunk_prefix
    vocab = model.config.vocab_size
    cache = P.packed_cache(model.config, b + 1, max(c + t, pre + k), dtype, device)
    plan = P.PackedPlan.build(torch.full((b,), c, dtype=torch.long), t, [P.Chunk(b, pre, k)], device)
    ids = torch.randint(0, vocab, (plan.total_tokens,), device=device, generator=gen)
    gamma = t - 1
    dtok = ids[:b * t].reshape(b, t)[:, 1:]
    dprobs = torch.softmax(torch.randn(b, gamma, vocab, device=device, generator=gen), -1) if gamma else None

    def step():
        logits = P.packed_forward(model, cache, ids, plan)
        if p.model == "draft":
            probs = torch.softmax(logits[:b] / temperature, -1) if temperature > 0 else None
            return torch.multinomial(probs, 1, generator=gen) if probs is not None else logits[:b].argmax(-1)
        return M.speculative_sample(logits[:b * t].reshape(b, t, -1), dtok, dprobs, temperature, gen)

    return step


def measure_points(points: list[MixedPoint], models: dict, tm, timer, dtype, device, temperature: float,
                   seed: int, progress: bool = False) -> list[dict]:
    """One sweep of ``points`` (``models``: role -> model); returns mixed.csv rows (``oom`` rows for points
    that ran out of memory)."""
    import torch

    from specbatch.profiler import models as M
    from specbatch.profiler.timing import measure_point

    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for p in points:
        try:
            step = make_mixed_step(p, models[p.model], dtype, device, temperature, gen)
            s = measure_point(step, timer, tm)
            rows.append({**p._asdict(), "median_s": s.median_s, "p10_s": s.p10_s, "p90_s": s.p90_s,
                         "samples": s.samples, "status": "ok"})
        except Exception as e:  # noqa: BLE001
            if not M.is_oom(e):
                raise
            rows.append({**p._asdict(), "median_s": float("nan"), "p10_s": float("nan"), "p90_s": float("nan"),
                         "samples": 0, "status": "oom"})
        if progress:
            r = rows[-1]
            print(f"  mixed {p.model} b={p.batch} tokens={p.tokens} c={p.context} chunk={p.chunk_tokens}@{p.chunk_prefix}: "
                  f"{r['median_s']:.4g} s ({r['samples']} samples)", flush=True)
    return rows


def run_mixed(cfg, out_dir, mgrid: MixedGrid, passes: int = 1, models: dict | None = None,
              progress: bool = True, anchors_of=None) -> Path:
    """Time ``mgrid``'s mixed points ``passes`` times on ``cfg``'s pair, device, dtype, threads, seed and
    timing settings, and write ``out_dir/mixed.csv`` (the passes merged as steps are,
    :func:`specbatch.profiler.sweep.merge_passes`) and ``meta.json``'s ``mixed`` (grid, passes, clock, threads, attention, load averages, what a time includes). ``out_dir`` must hold a
    profile of the same pair and dtype (its steps are left as they are). ``models``: role -> already loaded
    model (attention :data:`specbatch.profiler.attention.NAME`). ``anchors_of``: the step grid, whose
    :func:`anchor_points` are then re-timed in each pass before the mixed points and stored (merged) in
    ``meta.json`` as ``mixed.anchors`` (steps.csv rows)."""
    import torch

    from specbatch.profiler import attention as A
    from specbatch.profiler import models as M
    from specbatch.profiler.sweep import loadavg, merge_passes, resolve_device, resolve_dtype
    from specbatch.profiler.timing import make_timer, resolve_clock
    from specbatch.sim.profile import load_profile, write_profile_meta

    out = Path(out_dir)
    prof = load_profile(out)
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.dtype), device)
    dtype_name = str(dtype).replace("torch.", "")
    for key, want, have in (("pair.target", str(cfg.pair.target), prof.meta.get("pair", {}).get("target")),
                            ("pair.draft", str(cfg.pair.draft), prof.meta.get("pair", {}).get("draft")),
                            ("dtype", dtype_name, prof.meta.get("dtype"))):
        if have is not None and want != have:
            raise ValueError(f"{out}/meta.json: {key} is {have!r} but this run has {want!r}; mixed rows must be "
                             "measured on the profile's own pair and dtype")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    clock = resolve_clock(str(cfg.timing.get("clock", "auto")), device, torch.get_num_threads())
    if models is None:
        models = {"target": M.load_model(str(cfg.pair.target), dtype, device, seed=int(cfg.seed), attention=A.NAME)[0]}
        if "draft" in mgrid.models:
            models["draft"] = M.load_model(str(cfg.pair.draft), dtype, device, seed=int(cfg.seed) + 1,
                                           attention=A.NAME)[0]
    timer = make_timer(device, clock)
    temperature = float(cfg.timing.get("temperature", 1.0))
    frames, anchor_frames, loads, t0 = [], [], [], time.perf_counter()
    anchors = anchor_points(mgrid, anchors_of) if anchors_of is not None else []
    for k in range(int(passes)):
        loads.append(loadavg())
        if anchors:
            anchor_frames.append(pd.DataFrame(measure_anchors(anchors, models, cfg.timing, timer, dtype, device,
                                                              temperature, int(cfg.seed) + k)))
        rows = measure_points(mgrid.points(), models, cfg.timing, timer, dtype, device, temperature,
                              int(cfg.seed) + k, progress)
        frames.append(pd.DataFrame(rows, columns=MIXED_COLUMNS))
        write_mixed(out, merge_passes(frames, key=MIXED_KEY))
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("schema_version", None)
    meta["mixed"] = {
        "grid": mgrid.as_dict(), "passes": int(passes), "clock": clock, "threads": torch.get_num_threads(),
        "attention": A.NAME, "included": INCLUDED, "loadavg_start": loads, "loadavg_end": loadavg(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "timing": {k: cfg.timing.get(k) for k in ("warmup", "min_samples", "max_samples", "floor_samples",
                                                   "rel_precision", "point_budget_s")},
        "merge": "median over passes of each point's median (p10 min, p90 max, samples summed)",
        "check": "python -m specbatch.fidelity.mixed <profile>: the mixed-iteration rule against these rows "
                 "(meta.json mixed_check)",
    }
    if anchors:
        meta["mixed"]["anchors"] = json.loads(merge_passes(anchor_frames).to_json(orient="records"))
        meta["mixed"]["anchors_note"] = ("the steps.csv points the rule reads at this grid, re-timed in each pass "
                                         "before the mixed points with the same settings (merged as steps are)")
    write_profile_meta(out, meta)
    load_profile(out)
    return out
