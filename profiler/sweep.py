"""The profiling sweep: time every grid point of a draft/target pair and write a profile folder.

Order: prefill points first; then for each context, for each batch (ascending), the draft decode point, then
target decode (γ = 0) and verify (γ >= 1) points. After every point ``steps.csv`` is rewritten atomically, so an
interrupted run resumes from the points already written. A point that runs out of memory is written with
``status=oom`` and larger batches of that model at that context are skipped.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from specbatch.profiler import drafters as D
from specbatch.sim.profile import STEP_COLUMNS, load_profile, write_profile_meta, write_steps

KEY = ["model", "phase", "batch", "tokens", "context"]


@dataclass
class Grid:
    batches: list[int]
    gammas: list[int]
    contexts: list[int]
    prefill_lengths: list[int]
    prefill_batches: list[int]

    @classmethod
    def from_cfg(cls, g, where: str = "grid") -> "Grid":
        vals = {}
        for k in ("batches", "gammas", "contexts", "prefill_lengths", "prefill_batches"):
            v = g.get(k) if hasattr(g, "get") else None
            if v is None:
                raise ValueError(f"{where}.{k} is missing; expected a list of integers")
            v = [int(x) for x in v]
            low = 0 if k == "gammas" else 1
            if not v or any(x < low for x in v):
                raise ValueError(f"{where}.{k} = {v}; expected a non-empty list of integers >= {low}")
            vals[k] = sorted(set(v))
        return cls(**vals)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _mem_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _mem_total_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded), or None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device (torch {torch.__version__})")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r}; expected cpu, cuda, cuda:N or auto")
    return device


def resolve_dtype(dtype: str, device: str):
    from specbatch.profiler.models import DTYPES

    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _activation_bytes(cfg, batch: int, tokens: int, dtype_bytes: int, with_logits_all: bool) -> int:
    """Rough upper estimate of transient memory for one step (logits in fp32 x3, MLP activations x4)."""
    vocab = cfg.vocab_size
    ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", 4 * cfg.hidden_size)
    logit_tokens = tokens if with_logits_all else 1
    return batch * (logit_tokens * vocab * 4 * 3 + tokens * ffn * dtype_bytes * 4 + tokens * cfg.hidden_size * 16)


class NoPointMeasured(RuntimeError):
    """A sweep ended (its deadline spent) before any point was measured."""


def run_profile(cfg, *, out_dir: str | os.PathLike, grid: Grid, progress: bool = True,
                points: set[tuple] | None = None) -> Path:
    """Profile ``cfg.pair`` on ``cfg.device`` over ``grid``; write and return the profile folder.

    ``cfg`` is the specbatch-profile config (see ``conf/profile.yaml``). ``points``: measure only these grid
    points, as ``(model, phase, batch, tokens, context)`` tuples (a remeasurement; see :func:`run_passes`).
    """
    import torch
    import transformers

    from specbatch.profiler import attention as A
    from specbatch.profiler import models as M
    from specbatch.profiler.graphs import capture_for
    from specbatch.profiler.host_memory import keep_freed_memory
    from specbatch.profiler.roofline import device_roofline, roofline_ratios
    from specbatch.profiler.timing import make_timer, measure_point, resolve_clock

    t_start = time.perf_counter()
    load_start = loadavg()
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.dtype), device)
    host_memory = keep_freed_memory(device)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out = Path(out_dir)
    tm = cfg.timing
    deadline = float(tm.deadline_s) if tm.get("deadline_s") else None
    temperature = float(tm.get("temperature", 1.0))

    attention = A.check(str(cfg.get("attention") or A.DEFAULT))
    graphs = graphs_enabled(cfg, device)
    if graphs and str(cfg.cache) != "prealloc":
        raise ValueError(f"timing.graphs=true needs cache=prealloc (cache={cfg.cache}: a growing cache changes "
                         "addresses and shapes at every step); set timing.graphs=false")
    capture = capture_for(device, graphs) if graphs else None  # None: plain eager steps, as without graphs
    target, tinfo = M.load_model(str(cfg.pair.target), dtype, device, seed=int(cfg.seed), attention=attention)
    draft, dinfo = M.load_model(str(cfg.pair.draft), dtype, device, seed=int(cfg.seed) + 1, attention=attention)
    for info, m in ((tinfo, target), (dinfo, draft)):
        info["kv_bytes_per_token"] = M.kv_bytes_per_token(m.config, dtype)
    models = {"target": target, "draft": draft}
    drafters = drafters_of(cfg)
    runners, extra_models = dict(models), {}  # runners: what each row's model column runs on (ngram: nothing)
    if "eagle" in drafters:
        head, einfo = D.load_eagle_head(target.config, dtype, device, seed=int(cfg.seed) + 2, attention=attention)
        einfo["kv_bytes_per_token"] = D.eagle_kv_bytes_per_token(target.config, dtype)
        runners["eagle"], extra_models["eagle"] = head, einfo
    if "ngram" in drafters:
        extra_models["ngram"] = ngram_info(cfg, grid)
    roof_device = device_roofline(device, dtype)  # (measured once per process and device)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()

    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        dev_name, kv_free = torch.cuda.get_device_name(), int(free)
    else:
        total, dev_name, kv_free = _mem_total_bytes(), _cpu_name(), _mem_available_bytes()
    limit = cfg.get("memory_limit_bytes")
    if limit is None and not device.startswith("cuda"):
        limit = int(0.8 * kv_free)  # never let a CPU sweep swap the machine to death
    limit = int(limit) if limit is not None else None
    kv_cache_bytes = min(kv_free, limit) if limit is not None else kv_free

    clock = resolve_clock(str(cfg.timing.get("clock", "auto")), device, torch.get_num_threads())
    meta = {
        "source": "measured",
        "pair": {"target": str(cfg.pair.target), "draft": str(cfg.pair.draft), "name": cfg.pair.get("name")},
        "device": {"name": dev_name, "kind": "cuda" if device.startswith("cuda") else "cpu",
                   "memory_bytes": int(total), "kv_cache_bytes": int(kv_cache_bytes),
                   "kv_cache_bytes_note": "device memory free after loading both models' weights"
                   + (f", capped by memory_limit_bytes={limit}" if limit is not None else ""),
                   "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "loadavg_start": load_start, "note": cfg.get("note"), "roofline": roof_device},
        "dtype": str(dtype).replace("torch.", ""),
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "python": sys.version.split()[0], "specbatch": _specbatch_version()},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": {"target": tinfo, "draft": dinfo, **extra_models},
        "timing": {
            "clock": clock,
            "method": ("cuda_events+synchronize" if device.startswith("cuda") else
                       "time.process_time" if clock == "cpu" else "time.perf_counter")
            + ("; decode and verify forwards replayed from CUDA graphs captured once per point" if graphs else ""),
            "graphs": graphs,
            "attention": describe_attention(attention, models, grid, dtype, device,
                                            key=(str(cfg.pair.target), str(cfg.pair.draft))),
            "cache": _cache_description(str(cfg.cache)),
            "warmup": int(tm.warmup), "min_samples": int(tm.min_samples), "max_samples": int(tm.max_samples),
            "floor_samples": int(tm.floor_samples), "rel_precision": float(tm.rel_precision),
            "point_budget_s": float(tm.point_budget_s), "deadline_s": deadline,
            "sampling_temperature": temperature,
            "included": "draft decode: forward of 1 token + sampling; target decode/verify: forward of γ+1 tokens, "
                        "acceptance test, residual/bonus sampling and rollback of rejected positions; "
                        "prefill: forward of the prompt into an empty cache, last-token logits only"
                        + ("; with graphs, a decode/verify forward is the copy of the step's token ids and "
                           "positions into the graph's static inputs and one replay (sampling, acceptance and "
                           "rollback eager, as in serving engines); prefill is eager" if graphs else ""),
            **({"included_drafters": "eagle decode: one head step (embedding + fusion of the token and a target "
                                     "hidden state, one decoder layer over the head's own KV cache, norm, LM head) "
                                     "+ sampling; eagle prefill: the head over the prompt's tokens and target "
                                     "hidden states into an empty cache, last-token logits; ngram decode: CPU time "
                                     "of the prompt lookup for the batch (no model work)"}
               if len(drafters) > 1 else {}),
            "sdpa_force_gqa": os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA"),
            "sdpa_backends": M.attention_backends(device) or None,
            "host_memory": host_memory,
            "grid": grid.as_dict(),
            "conventions": "target γ=0 is written as phase=decode tokens=1; γ>=1 as phase=verify tokens=γ+1; "
                           "draft rows are phase=decode tokens=1; prefill rows have context=0",
            "drafters": drafters,
            "complete": False,
        },
    }

    if tm.get("reference"):
        meta["timing"]["reference"] = {"point": list(REFERENCE_POINT), "file": "reference.csv",
                                       "what": "seconds of the reference step read just before and just after "
                                               "each point (warmed by a call right before each reading); "
                                               "merged passes divide each point by it"}

    rows = _resume_rows(out, meta) if cfg.get("resume", True) else []
    done = {tuple(r[k] for k in KEY) for r in rows}
    oom_ceiling: dict[tuple[str, int, str], int] = {}  # (model, context|length, kind) -> smallest OOM batch
    for r in rows:
        if r["status"] == "oom":
            pre = r["phase"] == "prefill"
            k = (r["model"], int(r["tokens"] if pre else r["context"]), "prefill" if pre else "step")
            oom_ceiling[k] = min(oom_ceiling.get(k, 1 << 30), int(r["batch"]))
    out.mkdir(parents=True, exist_ok=True)
    write_profile_meta(out, meta)

    timer = make_timer(device, meta["timing"]["clock"])
    gmax = max(grid.gammas)
    plan = _plan(grid, models, drafters)
    if points is not None:
        plan = [p for p in plan if p in points]
    # (the EAGLE head and n-gram lookup draft for the target: they reach as far as it does)
    skipped_ctx = [p for p in plan if _too_long(models[p[0] if p[0] == "draft" else "target"], p)]
    plan = [p for p in plan if p not in skipped_ctx]
    todo = [p for p in plan if tuple(_key(p)) not in done]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="profile points", unit="pt",
               disable=not progress, dynamic_ncols=True)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    skipped_oom, timed_out = 0, False
    reference = _reference(models["target"], dtype, device, temperature, timer, int(cfg.seed), capture) \
        if tm.get("reference") else None
    ref_rows = _resume_references(out) if reference is not None and rows else []
    last_ref = None  # the reference reading after the previous point: the next point's "before"
    groups: dict[tuple, list] = {}
    for p in todo:  # group points sharing one cache: (model, kind, batch, context)
        groups.setdefault((p[0], p[1] == "prefill", p[2], p[4] if p[1] != "prefill" else p[3]), []).append(p)
    for (role, is_prefill, batch, ctx_or_len), pts in groups.items():
        if deadline is not None and time.perf_counter() - t_start > deadline:
            timed_out = True
            break
        if role == "ngram":  # CPU work on token ids: no model, no cache, no device time
            for p in pts:
                stats = measure_ngram(p, meta["models"]["ngram"], tm, int(cfg.seed), deadline, t_start,
                                      meta["timing"]["clock"])
                if stats is None:
                    timed_out = True
                    break
                rows.append(_row(p, stats, "ok"))
                write_steps(out, rows)
                bar.update(1)
            if timed_out:
                break
            continue
        model = runners[role]
        ceil_key = (role, ctx_or_len, "prefill" if is_prefill else "step")  # per context, or per prompt length
        if batch > oom_ceiling.get(ceil_key, 1 << 30):
            skipped_oom += len(pts)
            bar.update(len(pts))
            continue
        if deadline is not None and time.perf_counter() - t_start > deadline:
            timed_out = True
            break
        vocab = model.config.vocab_size
        cache = None
        try:
            if is_prefill:
                length = ctx_or_len
                need = M.cache_bytes(model.config, batch, length, dtype) + \
                    _activation_bytes(model.config, batch, length, dtype_bytes, False)
            else:
                length = ctx_or_len + gmax + 1
                need = M.cache_bytes(model.config, batch, length, dtype) + \
                    _activation_bytes(model.config, batch, gmax + 1, dtype_bytes, True) + batch * gmax * vocab * 4
            if limit is not None and need > limit:
                raise M.ProfilerOOM(f"{role} batch={batch} needs ~{need} bytes > memory limit {limit}")
            cache = M.make_cache(str(cfg.cache), model.config, batch, 0 if is_prefill else ctx_or_len,
                                 length - (0 if is_prefill else ctx_or_len), dtype, device)
        except Exception as e:  # noqa: BLE001
            if not M.is_oom(e):
                raise
            for p in pts:
                rows.append(_row(p, None, "oom"))
            oom_ceiling[ceil_key] = min(oom_ceiling.get(ceil_key, 1 << 30), batch)
            _free(device)
            write_steps(out, rows)
            bar.update(len(pts))
            continue
        for p in pts:
            if deadline is not None and time.perf_counter() - t_start > deadline:
                timed_out = True
                break
            try:
                step, reset = make_step(p, model, cache, vocab, temperature, gen, device, capture=capture)
                budget = float(tm.point_budget_s)
                if deadline is not None:
                    budget = max(0.0, min(budget, deadline - (time.perf_counter() - t_start)))
                before = (last_ref if last_ref is not None else reference()) if reference is not None else None
                stats = measure_point(step, timer, tm, reset=reset, budget_s=budget)
                rows.append(_row(p, stats, "ok"))
                if reference is not None:
                    last_ref = reference()
                    ref_rows.append({**dict(zip(KEY, p)), "reference_s": (before + last_ref) / 2})
                    _write_references(out, ref_rows)
            except Exception as e:  # noqa: BLE001
                if not M.is_oom(e):
                    raise
                rows.append(_row(p, None, "oom"))
                oom_ceiling[ceil_key] = min(oom_ceiling.get(ceil_key, 1 << 30), batch)
                _free(device)
                if cache is not None:
                    M.rollback(cache, cache.get_seq_length() - (0 if is_prefill else ctx_or_len))
            write_steps(out, rows)
            bar.update(1)
            bar.set_postfix_str(f"{role} {p[1]} b={batch} t={p[3]} c={p[4]}")
        del cache
        _free(device)
        if timed_out:
            break
    bar.close()

    meta["timing"]["complete"] = not timed_out
    meta["timing"]["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    meta["timing"]["points_planned"] = len(plan)
    meta["timing"]["points_written"] = len(rows)
    meta["timing"]["points_skipped_after_oom"] = skipped_oom
    meta["timing"]["points_skipped_beyond_max_context"] = len(skipped_ctx)
    meta["device"]["loadavg_end"] = loadavg()
    if not rows:
        raise NoPointMeasured(f"{out}: no point could be measured (deadline {deadline}s too short?)")
    meta["roofline_ratio"] = roofline_ratios(pd.DataFrame(rows, columns=STEP_COLUMNS), meta)
    write_profile_meta(out, meta)
    load_profile(out)  # the folder we leave behind must be valid
    return out


# The speed reference (``timing.reference``): a target verify of γ = 2 at batch 4, context 32, on a cache of its own
REFERENCE_POINT = ("target", "verify", 4, 3, 32)


def _reference(model, dtype, device: str, temperature: float, timer, seed: int, capture=None):
    """A function returning the seconds of one :data:`REFERENCE_POINT` step, run once untimed right before
    (so that it is timed warm, as a point's samples are). Its own cache and random generator: the sweep's
    draws do not depend on whether the reference is on."""
    import torch

    from specbatch.profiler import models as M

    role, phase, batch, tokens, context = REFERENCE_POINT
    cache = M.make_cache("prealloc", model.config, batch, context, tokens, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed + 7919)
    step, reset = make_step(REFERENCE_POINT, model, cache, model.config.vocab_size, temperature, gen, device,
                            capture=capture)

    def read() -> float:
        step()
        reset()
        t = timer(step)
        reset()
        return t

    return read


def _write_references(out: Path, rows: list[dict]) -> None:
    from specbatch.sim.profile import atomic_write_text

    atomic_write_text(out / "reference.csv", pd.DataFrame(rows, columns=KEY + ["reference_s"]).to_csv(index=False))


def _resume_references(out: Path) -> list[dict]:
    f = out / "reference.csv"
    return pd.read_csv(f).to_dict("records") if f.is_file() else []


REPAIR_SWEEPS = 3  # sweeps of the disputed points per repair round of run_passes


def run_passes(cfg, *, out_dir: str | os.PathLike, grid: Grid, passes: int, max_passes: int | None = None,
               repairs: int = 3, progress: bool = True, after_pass=None) -> Path:
    """Sweep ``grid`` ``passes`` times (into ``out_dir/pass<k>/``, each a valid profile) and write the merged
    profile into ``out_dir``; return it.

    Merge: a point measured in any sweep gets the median of its sweep medians (p10 the smallest, p90 the
    largest, samples summed); a point out of memory in every sweep that reached it is written ``oom``. On a
    host whose speed changes for seconds at a time (a shared VM; a GPU step bound by the host's kernel
    launches) one sweep records whichever speed each point fell in, the median over sweeps the common one.

    While the merged profile fails the monotonicity gate (:func:`specbatch.sim.profile.check_monotone`) the disputed
    points, both ends of every violation, are remeasured: a repair round sweeps just those points
    :data:`REPAIR_SWEEPS` times (into ``out_dir/repair<r>_<s>/``), so that neighbours are timed alternately,
    seconds apart, and their new medians join the merge. After ``repairs`` rounds whole passes are added,
    up to ``max_passes`` (default: ``passes``); the last failure is raised. ``timing.deadline_s`` bounds all
    sweeps together: each pass gets an equal share of the time left, a repair sweep what is left, and once it
    is spent no sweep starts and those there are are merged. ``meta.json`` is the last pass's, with
    ``timing.passes`` (the passes merged), ``timing.repairs`` (the points each round remeasured),
    ``timing.merge``, the total ``elapsed_s``, and ``complete`` only if all ``passes`` ran and each was
    complete.

    ``after_pass(k)``, when given, is called after each of the first ``passes`` passes, with the passes so far
    already merged into ``out_dir``: other measurements interleaved with the passes (specbatch-validate runs
    its engine rounds there, so that the profile and the engine sample the same stretch of time).
    """
    from omegaconf import OmegaConf

    from specbatch.profiler.roofline import roofline_ratios
    from specbatch.sim.profile import ProfileError, check_monotone, monotone_violations

    max_passes = max(int(passes), int(max_passes or passes))
    if int(passes) < 1:
        raise ValueError(f"timing.passes={passes}; expected at least 1")
    if int(repairs) < 0:
        raise ValueError(f"timing.repairs={repairs}; expected 0 or more")
    out = Path(out_dir)
    t_start = time.perf_counter()
    total = float(cfg.timing.deadline_s) if cfg.timing.get("deadline_s") else None
    frames, references, metas, repaired = [], [], [], []

    def time_left() -> float | None:
        return None if total is None else total - (time.perf_counter() - t_start)

    def sweep(name: str, share: int = 1, points: set[tuple] | None = None) -> dict:
        sweep_cfg, left = cfg, time_left()
        if left is not None:
            sweep_cfg = OmegaConf.merge(cfg, {"timing": {"deadline_s": max(left, 1e-9) / share}})
        run_profile(sweep_cfg, out_dir=out / name, grid=grid, progress=progress, points=points)
        frames.append(pd.read_csv(out / name / "steps.csv"))
        ref = out / name / "reference.csv"
        references.append(pd.read_csv(ref) if ref.is_file() else None)
        return json.loads((out / name / "meta.json").read_text())  # the sweep's meta

    def merge() -> None:
        merged = merge_passes(frames, references)
        write_steps(out, merged)
        typical = merged.attrs.get("typical_reference_s")
        meta = json.loads(json.dumps(metas[-1]))
        meta.pop("schema_version", None)
        meta["device"]["loadavg_start"] = metas[0]["device"].get("loadavg_start")
        meta["roofline_ratio"] = roofline_ratios(merged, meta)
        if "reference" in meta["timing"]:
            meta["timing"]["reference"]["typical_s"] = typical
        meta["timing"].update(passes=len(metas), deadline_s=total, repairs=repaired,
                              merge="median over sweeps of each point's median (p10 min, p90 max, samples "
                                    "summed)" + (", each first multiplied by the typical reference reading over "
                                                 "the one around it" if typical else "")
                              + "; oom where no sweep measured the point",
                              complete=len(metas) >= int(passes) and all(m["timing"].get("complete") for m in metas),
                              elapsed_s=round(time.perf_counter() - t_start, 1))
        write_profile_meta(out, meta)

    def spent() -> bool:
        left = time_left()
        return left is not None and left <= 0

    for k in range(int(passes)):
        if k and spent():
            break  # the deadline is spent: merge the passes there are
        metas.append(sweep(f"pass{k}", share=int(passes) - k))
        if after_pass is not None:
            merge()
            after_pass(k)
    merge()
    while not spent():
        profile = load_profile(out)
        found = monotone_violations(profile)
        if not found:
            return out
        if len(repaired) < int(repairs):
            rows = {r for i, j, _ in found for r in (i, j)}  # both ends of every violation
            points = {(str(m), str(ph), int(b), int(t), int(c))
                      for m, ph, b, t, c in (profile.steps.loc[r, KEY] for r in rows)}
            example = found[0][2].split(": ", 1)[-1].split("; a bigger step")[0]
            print(f"specbatch-profile: {len(found)} monotonicity violation(s), e.g. {example}; "
                  f"remeasuring {len(points)} point(s) {REPAIR_SWEEPS} times (repair round {len(repaired) + 1} "
                  f"of {repairs})", file=sys.stderr)
            for s in range(REPAIR_SWEEPS):
                if spent():
                    break
                try:
                    sweep(f"repair{len(repaired)}_{s}", points=points)
                except NoPointMeasured:  # the deadline ran out while this sweep built its models
                    break
            repaired.append({"points": sorted(list(p) for p in points), "violations": len(found)})
        elif len(metas) < max_passes:
            metas.append(sweep(f"pass{len(metas)}"))
        else:
            raise ProfileError(found[0][2] + f" (after {len(metas)} passes and {len(repaired)} repair rounds)")
        merge()
    check_monotone(load_profile(out))  # an incomplete profile (passes cut short) gets a warning, not an error
    return out


def typical_reference(references: list) -> float | None:
    """The median of every sweep's reference readings (seconds), or None unless every sweep has them."""
    if not references or any(r is None for r in references):
        return None
    return float(np.median(pd.concat(references)["reference_s"]))


def merge_passes(frames: list[pd.DataFrame], references: list | None = None, key: list[str] = KEY) -> pd.DataFrame:
    """The rows of several sweeps of one grid (whole or some of its points) merged as :func:`run_passes`
    describes, sorted by ``key`` (the columns naming a point: :data:`KEY` for steps.csv rows).

    ``references`` (one ``reference.csv`` frame per sweep, or None) put every sweep's points on one clock
    first: a point's times are multiplied by the typical reference reading (:func:`typical_reference`) over
    the reading around that point, so that a point timed while the machine ran slow counts at the speed the
    machine usually had (the result's ``attrs["typical_reference_s"]``). Without a reading for every
    measured point of every sweep, nothing is rescaled (and ``attrs`` is empty)."""
    typical, scaled = typical_reference(references), None
    if typical is not None:
        scaled = []
        for f, ref in zip(frames, references):
            f = f.merge(ref, on=key, how="left")
            ok = f["status"] == "ok"
            if f.loc[ok, "reference_s"].isna().any():
                scaled = None
                break
            k = typical / f.loc[ok, "reference_s"]
            for col in ("median_s", "p10_s", "p90_s"):
                f.loc[ok, col] = f.loc[ok, col] * k
            scaled.append(f.drop(columns="reference_s"))
        frames = scaled or frames
    rows = pd.concat(frames, ignore_index=True)
    ok = rows[rows["status"] == "ok"]
    merged = ok.groupby(key, as_index=False).agg(median_s=("median_s", "median"), p10_s=("p10_s", "min"),
                                                  p90_s=("p90_s", "max"), samples=("samples", "sum"))
    merged["status"] = "ok"
    oom = rows[rows["status"] == "oom"].drop_duplicates(key)
    measured = pd.MultiIndex.from_frame(merged[key])
    oom = oom[~pd.MultiIndex.from_frame(oom[key]).isin(measured)]
    out = pd.concat([merged, oom[merged.columns]], ignore_index=True).sort_values(key, ignore_index=True)
    if scaled:
        out.attrs["typical_reference_s"] = typical
    return out


def graphs_enabled(cfg, device: str) -> bool:
    """``timing.graphs``: null/auto (default) = CUDA graphs on CUDA, eager on CPU; true / false to force."""
    tm = cfg.get("timing") or {}
    v = tm.get("graphs") if hasattr(tm, "get") else None
    if v is None or str(v) == "auto":
        return str(device).startswith("cuda")
    return bool(v)


_PROBED: dict[tuple, dict] = {}  # describe_attention's results in this process (passes share them)


def describe_attention(attention: str, models: dict, grid: Grid, dtype, device: str, key=None) -> dict:
    """meta.json ``timing.attention``: the attention implementation, the mask each phase takes, and the SDPA
    backend each phase of each model actually runs on, probed (:func:`specbatch.profiler.attention.probe_backend`)
    with one eager forward at batch 1: decode and verify (γ = 4, or the largest γ) at the grid's shortest
    context, prefill at its shortest prompt. ``key`` (e.g. the pair's names): reuse the result of an earlier
    call with the same key and settings in this process (the passes and repair sweeps of one run)."""
    import torch

    from specbatch.profiler import attention as A
    from specbatch.profiler import models as M

    info = {"implementation": attention}
    if attention == "eager":
        return {**info, "backend": "eager: matmul + softmax with an explicit mask (no SDPA)"}
    if attention == A.NAME:
        info["paths"] = {"decode": A.PATHS["none"], "verify": A.PATHS["lower_right"], "prefill": A.PATHS["causal"]}
        info["builds_4d_mask"] = not A.builds_no_mask(attention)
    else:
        info["paths"] = "transformers sdpa: a 4-D boolean mask for multi-token steps over a non-empty cache"
    ctx, plen = min(grid.contexts), min(grid.prefill_lengths)
    gamma = 4 if 4 in grid.gammas else max(1, max(grid.gammas))
    memo = None if key is None else (key, attention, str(dtype), str(device), ctx, gamma, plen)
    if memo in _PROBED:
        return json.loads(json.dumps(_PROBED[memo]))
    backend = {}
    for role, model in models.items():
        per = {}
        for phase, context, tokens in (("decode", ctx, 1), ("verify", ctx, gamma + 1), ("prefill", 0, plen)):
            try:
                cache = M.make_cache("prealloc", model.config, 1, context, tokens, dtype, device)
                ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
                pos = torch.arange(context, context + tokens, device=device)[None]

                def run(cache=cache, ids=ids, pos=pos):
                    with torch.inference_mode():
                        M.forward(model, cache, input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1)

                per[phase] = A.probe_backend(run, lambda cache=cache, context=context: M.set_cache_length(cache, context))
            except Exception as e:  # noqa: BLE001 (an OOM or a context beyond the model: say so, do not fail)
                per[phase] = f"probe failed: {type(e).__name__}: {str(e)[:120]}"
        backend[role] = per
    info["backend"] = backend
    info["probe"] = (f"batch 1, context {ctx}, γ {gamma}, prompt {plen}: one eager forward per phase under "
                     "torch.nn.attention.sdpa_kernel([b]) for each enabled backend b in the order flash, efficient, "
                     "cudnn, math; the first that runs without error")
    info["device"] = "cuda" if str(device).startswith("cuda") else "cpu"
    if memo is not None:
        _PROBED[memo] = info
    return json.loads(json.dumps(info))


def _specbatch_version() -> str:
    try:
        import specbatch

        return specbatch.__version__
    except Exception:  # noqa: BLE001
        return "unknown"


def _cache_description(kind: str) -> str:
    if kind == "prealloc":
        return ("prealloc: profiler.models.PreallocLayer, K/V buffers pre-allocated per (batch, context) point and "
                "written in place; attention spans exactly the cached tokens; rollback is O(1)")
    if kind == "dynamic":
        return "dynamic: transformers DynamicCache (torch.cat of the whole cache on every update)"
    raise ValueError(f"cache={kind!r}; expected 'prealloc' or 'dynamic'")


def _plan(grid: Grid, models, drafters=("draft",)) -> list[tuple]:
    """Points as ``(model, phase, batch, tokens, context)`` in sweep order. ``drafters`` beyond ``draft``:
    ``eagle`` decode points on the draft decode's batch × context grid and prefill points on its prefill grid;
    ``ngram`` decode points on the same batch × context grid."""
    pts = []
    for c in grid.contexts:
        for b in grid.batches:
            for role in drafters:
                pts.append((role, "decode", b, 1, c))
            for g in grid.gammas:
                pts.append(("target", "decode" if g == 0 else "verify", b, g + 1, c))
    for length in grid.prefill_lengths:
        for b in grid.prefill_batches:
            for role in ("draft", "eagle", "target"):
                if role in drafters or role == "target":
                    pts.append((role, "prefill", b, length, 0))
    # group points sharing a cache together: draft first, then target, per (context, batch)
    # prefill first (cheap, and every deadline-bounded profile then has it), then by context and batch
    return sorted(pts, key=lambda p: (p[1] != "prefill", p[4] if p[1] != "prefill" else p[3], p[2], p[0] == "target"))


def _key(p) -> list:
    return list(p)


def _too_long(model, p) -> bool:
    from specbatch.profiler.models import max_context

    lim = max_context(model)
    return lim is not None and p[3] + p[4] > lim


def _row(p, stats, status) -> dict:
    r = dict(zip(KEY, p))
    if stats is None:
        r.update(median_s=float("nan"), p10_s=float("nan"), p90_s=float("nan"), samples=0, status=status)
    else:
        r.update(median_s=stats.median_s, p10_s=stats.p10_s, p90_s=stats.p90_s, samples=stats.samples, status=status)
    return r


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def make_step(p, model, cache, vocab, temperature, gen, device, capture=None):
    """``(step, reset)`` closures for the profile point ``p`` = ``(model, phase, batch, tokens, context)`` on
    ``cache`` (holding ``context`` positions per sequence): ``step`` is exactly what the sweep times for that
    row of ``steps.csv``; ``reset`` restores the cache length (untimed).

    ``capture`` (a :mod:`specbatch.profiler.graphs` capture policy, e.g. ``cuda_capture``): the decode / verify
    forward is captured here, once, and every ``step`` replays it (:class:`~specbatch.profiler.graphs.GraphedModel`);
    ``None``: eager forwards. Prefill is always eager."""
    import torch

    from specbatch.profiler import models as M

    role, phase, batch, tokens, context = p
    base = cache.get_seq_length()
    if role == "eagle":
        return _eagle_step(p, model, cache, vocab, temperature, gen, device, capture)
    if phase == "prefill":
        ids = torch.randint(0, vocab, (batch, tokens), device=device, generator=gen)
        return (lambda: M.prefill(model, cache, ids)), (lambda: M.rollback(cache, cache.get_seq_length() - base))
    if capture is not None:
        from specbatch.profiler.graphs import GraphedModel

        model = GraphedModel(model, cache, batch, tokens, 1 if role == "draft" else 0, capture)
    if role == "draft":
        last = torch.randint(0, vocab, (batch,), device=device, generator=gen)
        return ((lambda: M.decode_one_token(model, cache, last, temperature)),
                (lambda: M.rollback(cache, cache.get_seq_length() - base)))
    gamma = tokens - 1
    last = torch.randint(0, vocab, (batch,), device=device, generator=gen)
    dtok = torch.randint(0, vocab, (batch, gamma), device=device, generator=gen)
    dprobs = torch.softmax(torch.randn(batch, gamma, vocab, device=device, generator=gen), -1) if gamma else None
    return ((lambda: M.verify(model, cache, last, dtok, dprobs, temperature, gen)),
            (lambda: M.rollback(cache, cache.get_seq_length() - base)))


def _eagle_step(p, head, cache, vocab, temperature, gen, device, capture=None):
    """:func:`make_step` for an ``eagle`` row: decode = one head step (:func:`~specbatch.profiler.drafters.
    eagle_decode_one_token`: fusion, layer, LM head, sampling; CUDA graphs as for a draft decode), prefill = the
    head over the prompt's tokens and (random) target hidden states (:func:`~specbatch.profiler.drafters.eagle_prefill`)."""
    import torch

    from specbatch.profiler import drafters as D
    from specbatch.profiler import models as M

    _, phase, batch, tokens, _ = p
    base = cache.get_seq_length()
    width = head.config.hidden_size
    dtype = head.fc.weight.dtype
    reset = (lambda: M.rollback(cache, cache.get_seq_length() - base))
    if phase == "prefill":
        ids = torch.randint(0, vocab, (batch, tokens), device=device, generator=gen)
        hidden = torch.randn(batch, tokens, width, device=device, generator=gen).to(dtype)
        return (lambda: D.eagle_prefill(head, cache, ids, hidden)), reset
    if capture is not None:
        head = D.GraphedEagle(head, cache, batch, 1, capture)
    last = torch.randint(0, vocab, (batch,), device=device, generator=gen)
    hidden = torch.randn(batch, width, device=device, generator=gen).to(dtype)
    return (lambda: D.eagle_decode_one_token(head, cache, last, hidden, temperature)), reset


def drafters_of(cfg) -> list[str]:
    """``cfg.drafters`` (default ``[draft]``, the profiles written before drafter kinds): the drafters whose
    rows the sweep writes beside the target's, in :data:`specbatch.profiler.drafters.KINDS` order; ``draft`` is
    always among them (a profile needs the draft model's rows)."""
    from specbatch.profiler.drafters import KINDS

    v = cfg.get("drafters") if hasattr(cfg, "get") else None
    names = ["draft"] if v is None else ([str(v)] if isinstance(v, str) else [str(x) for x in v])
    bad = [x for x in names if x not in KINDS]
    if bad or "draft" not in names:
        raise ValueError(f"drafters={names}; expected a list of {list(KINDS)} that includes draft "
                         "(e.g. drafters=[draft,eagle,ngram])")
    return [k for k in KINDS if k in names]


def ngram_info(cfg, grid: Grid) -> dict:
    """meta.json ``models.ngram``: the lookup's settings (``ngram.prompt_lookup_min/max``, vLLM's names and
    defaults), the proposals timed per row (γ_max of the grid) and the synthetic sequences."""
    from specbatch.profiler import drafters as D

    ng = cfg.get("ngram") if hasattr(cfg, "get") else None
    ng = ng or {}
    lo = int(ng.get("prompt_lookup_min") or D.PROMPT_LOOKUP_MIN)
    hi = int(ng.get("prompt_lookup_max") or max(lo, D.PROMPT_LOOKUP_MAX))
    if not 1 <= lo <= hi:
        raise ValueError(f"ngram.prompt_lookup_min={lo}, prompt_lookup_max={hi}; expected 1 <= min <= max")
    gmax = max(grid.gammas)
    return {"name": "ngram", "kv_bytes_per_token": 0, "parameters": 0, "weight_bytes": 0,
            "prompt_lookup_min": lo, "prompt_lookup_max": hi,
            "config": {"prompt_lookup_min": lo, "prompt_lookup_max": hi, "proposed_tokens": gmax},
            "method": "prompt lookup (profiler/drafters.py ngram_propose): for n from prompt_lookup_max down to "
                      "prompt_lookup_min the sequence's last n tokens are searched for earlier in it (numpy "
                      "sliding windows); the tokens after the earliest occurrence of the longest n are proposed "
                      f"(up to γ_max = {gmax}); one CPU loop over the batch",
            "timed": "decode rows: seconds on the sweep's clock (timing.clock: time.perf_counter for wall, "
                     "time.process_time for cpu; no device time) to propose for batch sequences of context tokens each",
            "sequences": "synthetic (drafters.synthetic_sequences): random tokens from a 64-token vocabulary in "
                         "16-token spans, each span after the first copying an earlier span of its sequence with "
                         "probability 0.5, so some sequences end in a repeated span (a hit) and others not "
                         "(a miss: every n is searched); seeded by (seed, batch, context)"}


def ngram_step(batch: int, context: int, info: dict, seed: int, proposed: int | None = None):
    """``(step, reset)`` for an ``ngram`` decode point, as :func:`make_step` for a model's: ``step`` proposes
    for ``batch`` synthetic sequences of ``context`` tokens (seeded by (seed, batch, context)) with the
    window of ``info`` (meta.json ``models.ngram``), up to ``proposed`` tokens (default the profile's);
    ``reset`` does nothing (the lookup changes no state)."""
    from specbatch.profiler import drafters as D

    seqs = D.synthetic_sequences(batch, context, seed=hash((seed, batch, context)) & 0xFFFFFFFF)
    k = info["config"]["proposed_tokens"] if proposed is None else int(proposed)
    lo, hi = info["prompt_lookup_min"], info["prompt_lookup_max"]
    return (lambda: D.ngram_propose_batch(seqs, k, lo, hi)), (lambda: None)


def measure_ngram(p, info: dict, tm, seed: int, deadline: float | None, t_start: float, clock: str = "wall"):
    """Time one ``ngram`` decode point with :func:`~specbatch.profiler.timing.measure_point` on the host timer of
    the sweep's ``clock``; ``None`` when the deadline is spent."""
    from specbatch.profiler import timing

    _, _, batch, _, context = p
    budget = float(tm.point_budget_s)
    if deadline is not None:
        budget = deadline - (time.perf_counter() - t_start)
        if budget <= 0:
            return None
        budget = min(budget, float(tm.point_budget_s))
    step, _ = ngram_step(batch, context, info, seed)
    return timing.measure_point(step, timing.make_timer("cpu", clock), tm, budget_s=budget)


def _resume_rows(out: Path, meta: dict) -> list[dict]:
    """Rows already written in ``out`` by a run with the same pair, device, dtype, cache and attention
    backends (else an error)."""
    steps, mpath = out / "steps.csv", out / "meta.json"
    if not steps.is_file():
        return []
    try:
        old = json.loads(mpath.read_text())
    except (OSError, ValueError):
        raise ValueError(f"{mpath}: cannot resume, meta.json is missing or unreadable; "
                         "delete the folder or pass resume=false") from None
    for path, new in (("pair.target", meta["pair"]["target"]), ("pair.draft", meta["pair"]["draft"]),
                      ("dtype", meta["dtype"]), ("device.kind", meta["device"]["kind"]),
                      ("timing.cache", meta["timing"]["cache"]),
                      ("timing.sdpa_backends", meta["timing"]["sdpa_backends"]),
                      ("timing.graphs", meta["timing"]["graphs"]),
                      ("timing.attention.implementation", meta["timing"]["attention"]["implementation"])):
        cur = old
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur != new:
            raise ValueError(f"{mpath}: cannot resume, field '{path}' is {cur!r} but this run has {new!r}; "
                             "use another name or resume=false")
    df = pd.read_csv(steps)
    missing = [c for c in STEP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{steps}: cannot resume, missing column(s) {missing}")
    return df[STEP_COLUMNS].to_dict("records")
