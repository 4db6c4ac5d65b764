"""The figures a device session is for, printed from the profiles (and the validation) it wrote.

    python benchmarks/gpu_figures.py PROFILE_DIR [PROFILE_DIR ...] [--ab OLD NEW] [--validation REPORT_JSON]

Per profile: the target's batch-1 decode against its HBM bound (weights + KV bytes / bandwidth) at each
context, verify(γ=4) / decode by batch size, γ*(b) from the simulator's own quantitative model
(:func:`specbatch.sim.quant.optimal_gamma` on the profile's cost model) at α 0.6 / 0.7 / 0.8 and the
reference context, the roofline_ratio block, the SDPA backends the profiler probed, and the checks of
issue #22 at α 0.7 — decode ≤ 1.5× its bound, verify(γ=4)/decode ≤ 1.2 at batch 1 and not falling with
batch, γ* non-increasing in batch — each printed as ``check ... yes/no`` (a benchmark's printout: the
figures decide, not this script). ``--ab``: the same points before and after (old / new, median ms).
``--validation``: the validation's verdict and its per-case errors.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from specbatch.profiler.roofline import Shape, format_ratios, step_cost
from specbatch.sim.cost_model import CostModel
from specbatch.sim.profile import load_profile
from specbatch.sim.quant import optimal_gamma

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ALPHAS = (0.6, 0.7, 0.8)
CHECK_ALPHA = 0.7
GOAL_METRICS = ("latency_mean", "latency_p99", "throughput_tok_s")  # the ones issue #23 sets goals for


def median_s(ok, model: str, phase: str, batch: int, tokens: int, context: int) -> float | None:
    r = ok[(ok.model == model) & (ok.phase == phase) & (ok.batch == batch) & (ok.tokens == tokens)
           & (ok.context == context)]
    return float(r.median_s.iloc[0]) if len(r) else None


def check(label: str, ok: bool | None) -> str:
    return f"    check {label}: {'n/a' if ok is None else ('yes' if ok else 'no')}"


def decode_lines(prof, contexts: list[int]) -> tuple[list[str], dict]:
    """Batch-1 target decode per context against its HBM bound; returns the lines and {context: ratio}."""
    m, ok = prof.meta, prof.ok_steps
    dev = m["device"].get("roofline") or {}
    shape = Shape.from_config(m["models"]["target"]["config"])
    lines, ratios = [], {}
    for c in contexts:
        dec = median_s(ok, "target", "decode", 1, 1, c)
        if dec is None:
            continue
        line = f"    context {c:5d}: target decode batch 1 {dec * 1e3:8.3f} ms"
        if dev:
            _, nbytes = step_cost(shape, 1, 1, c, 1, DTYPE_BYTES[m["dtype"]])
            bound = nbytes / dev["bandwidth_bytes_per_s"]
            ratios[c] = dec / bound
            line += (f" | HBM bound {bound * 1e3:.3f} ms ({nbytes / 1e6:.1f} MB at "
                     f"{dev['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s) -> {ratios[c]:.2f}x")
        lines.append(line)
    return lines, ratios


def verify_over_decode(ok, context: int) -> dict[int, float]:
    """{batch: T_verify(b, γ=4, c) / T_decode(b, c)} where both were measured."""
    out = {}
    for b in sorted(set(ok[ok.model == "target"].batch)):
        dec, ver = median_s(ok, "target", "decode", b, 1, context), median_s(ok, "target", "verify", b, 5, context)
        if dec and ver:
            out[int(b)] = ver / dec
    return out


def gamma_stars(prof, context: int) -> dict[float, dict[int, int]]:
    """{α: {b: γ*}} at the measured batch sizes, from the profile's cost model as the simulator builds it."""
    ok = prof.ok_steps
    batches = sorted(int(b) for b in set(ok[(ok.model == "target") & (ok.context == context)].batch))
    gammas = sorted({int(t) - 1 for t in ok[(ok.model == "target") & (ok.phase == "verify")].tokens})
    cost = CostModel(prof, max_batch=max(batches), max_gamma=max(gammas, default=0))
    return {a: {b: optimal_gamma(cost, a, b, context) for b in batches} for a in ALPHAS}


def figures(path: Path) -> None:
    try:
        prof = load_profile(path)
    except Exception as e:  # noqa: BLE001 (a failed capture is reported, the other figures still print)
        print(f"--- {path.name}: no profile ({e})")
        return
    m, ok = prof.meta, prof.ok_steps
    t, att = m["timing"], m["timing"].get("attention") or {}
    print(f"--- {path.name}: {m['device']['name']}, {m['dtype']}, attention {att.get('implementation')}, "
          f"graphs {t.get('graphs')}, passes {t.get('passes')}, complete {t.get('complete')}, {len(ok)} ok points")
    print(f"    SDPA backend per phase (probed): {json.dumps(att.get('backend'))}")
    contexts = sorted(int(c) for c in set(ok[ok.model == "target"].context))
    if not contexts:
        return
    lines, ratios = decode_lines(prof, contexts)
    print("\n".join(lines))
    ref = contexts[len(contexts) // 2]
    vd = verify_over_decode(ok, ref)
    print(f"    verify(γ=4)/decode at context {ref}: " + "  ".join(f"b{b}:{v:.2f}" for b, v in vd.items()))
    stars = gamma_stars(prof, ref)
    for a, row in stars.items():
        print(f"    γ*(b) at context {ref}, α={a}: " + "  ".join(f"b{b}:{g}" for b, g in row.items()))
    print("    " + format_ratios(m.get("roofline_ratio") or {}).replace("\n", "\n    "))
    dec_ratio = ratios.get(min(ratios)) if ratios else None
    print(check(f"batch-1 decode ≤ 1.5x its HBM bound (context {min(ratios) if ratios else '-'}: "
                f"{'-' if dec_ratio is None else f'{dec_ratio:.2f}x'})", None if dec_ratio is None else dec_ratio <= 1.5))
    v1 = vd.get(1)
    print(check(f"verify(γ=4)/decode ≤ 1.2 at batch 1 ({'-' if v1 is None else f'{v1:.2f}'})",
                None if v1 is None else v1 <= 1.2))
    vals = list(vd.values())
    print(check("verify(γ=4)/decode not falling with batch (5 % noise allowed)",
                None if len(vals) < 2 else all(b >= a * 0.95 for a, b in zip(vals, vals[1:]))))
    g = list(stars[CHECK_ALPHA].values())
    print(check(f"γ* non-increasing in batch at α={CHECK_ALPHA}", bool(np.all(np.diff(g) <= 0)) if g else None))


def ab_table(old: Path, new: Path) -> None:
    try:
        po, pn = load_profile(old).ok_steps, load_profile(new).ok_steps
    except Exception as e:  # noqa: BLE001
        print(f"--- before/after: not available ({e})")
        return
    print("--- before/after on this device (median ms; old = transformers sdpa + explicit masks, eager; "
          "new = engine attention + graphs where on)")
    for r in pn.itertuples():
        o = median_s(po, r.model, r.phase, r.batch, r.tokens, r.context)
        if o is not None:
            print(f"    {r.model:6s} {r.phase:7s} batch {r.batch:4d} tokens {r.tokens:5d} context {r.context:5d}: "
                  f"old {o * 1e3:9.3f}  new {r.median_s * 1e3:9.3f}  old/new {o / r.median_s:6.2f}")


def validation_lines(path: Path) -> None:
    if not path.is_file():
        print(f"--- validation: no report ({path})")
        return
    rep = json.loads(path.read_text())
    print(f"--- validation {rep['pair']['draft']} / {rep['pair']['target']} on {rep['device']}: "
          f"{rep.get('verdict_summary', rep.get('verdict'))}")
    for v, errs in rep["max_abs_error"].items():
        print(f"    max |error| {v:9}" + "".join(f"  {m} {100 * errs[m]:.1f}%" for m in GOAL_METRICS))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profiles", nargs="*", type=Path)
    ap.add_argument("--ab", nargs=2, type=Path, metavar=("OLD", "NEW"))
    ap.add_argument("--validation", type=Path)
    a = ap.parse_args(argv)
    for p in a.profiles:
        figures(p)
    if a.ab:
        ab_table(*a.ab)
    if a.validation:
        validation_lines(a.validation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
