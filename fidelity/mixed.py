"""The mixed-iteration rule against measured mixed forwards: ``python -m specbatch.fidelity.mixed <profile>``.

For every ok row of the profile's ``mixed.csv`` (:mod:`specbatch.profiler.mixed`) the rule of
:meth:`specbatch.sim.cost_model.CostModel.mixed_iteration`, read from the same profile's steps, predicts the
forward: on the target T_verify(b, γ, c) + [F + P(p + k) − P(p) − min(F, T_verify)], on the draft
T_draft(b, c) + [F_d + P_d(p + k) − P_d(p) − min(F_d, T_draft)]. The relative error (predicted / measured − 1)
per row, its median and largest magnitude per model are printed and stored in ``meta.json`` as
``mixed_check`` (:func:`rule_check`): once with the rule read from the profile's steps (what the simulator
charges) and, when the mixed sweep re-timed the steps the rule reads alongside the mixed points
(``specbatch-profile mode=mixed mixed.anchors=true``), once with the rule read from those (the rule's own
error, free of any difference in speed between the two measurements).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from specbatch.sim.cost_model import CostModel
from specbatch.sim.profile import STEP_COLUMNS, Profile, ProfileError, load_profile, write_profile_meta


def predicted(cost: CostModel, model: str, batch: int, tokens: int, context: float, chunk: tuple[int, int]) -> float:
    """Seconds the mixed-iteration rule gives one mixed forward of ``model`` (a mixed.csv row's point)."""
    if model == "target":
        extra, _ = cost.mixed_iteration(batch, tokens - 1, context, [chunk], draft=False)
        return cost.target_verify(batch, tokens - 1, context) + extra
    # the draft's share of a γ ≥ 1 iteration: its extra with draft=True less the target's
    with_draft, _ = cost.mixed_iteration(batch, 1, context, [chunk], draft=True)
    target_only, _ = cost.mixed_iteration(batch, 1, context, [chunk], draft=False)
    return cost.draft_decode(batch, context) + with_draft - target_only


def rule_check(profile: Profile) -> dict:
    """The rule against the profile's mixed rows: ``profile_steps`` (the rule read from steps.csv, as the
    simulator reads it: :func:`errors`) and, when ``meta.json`` has ``mixed.anchors`` (the steps the rule
    reads, re-timed alongside the mixed points), ``same_run_steps`` (the rule read from those)."""
    if profile.mixed is None:
        raise ProfileError(f"{profile.path}: no mixed.csv to check the rule against (specbatch-profile mode=mixed)")
    out = {"rule": "CostModel.mixed_iteration: step + F + Σ[P(p+k) − P(p)] − min(F, step)",
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "profile_steps": errors(profile)}
    anchors = (profile.meta.get("mixed") or {}).get("anchors")
    if anchors:
        steps = pd.DataFrame(anchors, columns=STEP_COLUMNS)
        out["same_run_steps"] = errors(Profile(path=profile.path, meta=profile.meta, steps=steps, mixed=profile.mixed))
    return out


def errors(profile: Profile) -> dict:
    """The rule's error on every ok mixed row of ``profile``, the rule read from ``profile.steps``: ``points``
    (each row's point, measured and predicted seconds, relative error predicted / measured − 1) and per model
    ``rows``, ``median_abs_rel_error``, ``max_abs_rel_error`` and ``median_rel_error`` (signed: > 0 the rule
    overprices)."""
    gmax = int(profile.mixed["tokens"].max())
    cost = CostModel(profile, max_batch=max(int(profile.mixed["batch"].max()), 1), max_gamma=max(gmax - 1, 1))
    points, by_model = [], {}
    for r in profile.mixed[profile.mixed["status"] == "ok"].itertuples():
        pred = predicted(cost, r.model, int(r.batch), int(r.tokens), float(r.context),
                         (int(r.chunk_prefix), int(r.chunk_tokens)))
        err = pred / float(r.median_s) - 1.0
        points.append({"model": r.model, "batch": int(r.batch), "tokens": int(r.tokens), "context": int(r.context),
                       "chunk_tokens": int(r.chunk_tokens), "chunk_prefix": int(r.chunk_prefix),
                       "measured_s": float(r.median_s), "predicted_s": pred, "rel_error": err})
        by_model.setdefault(r.model, []).append(err)
    out = {"points": points}
    for model, errs in by_model.items():
        e = np.asarray(errs)
        out[model] = {"rows": len(e), "median_abs_rel_error": float(np.median(np.abs(e))),
                      "max_abs_rel_error": float(np.max(np.abs(e))), "median_rel_error": float(np.median(e))}
    return out


def table(check: dict) -> list[str]:
    """Printable lines of :func:`rule_check`'s result: per comparison, one line per point and one summary per model."""
    lines = []
    for part, what in (("profile_steps", "the rule read from steps.csv (as the simulator reads it)"),
                       ("same_run_steps", "the rule read from the steps re-timed alongside (meta mixed.anchors)")):
        if part in check:
            lines += [f"-- {what}:"] + part_table(check[part])
    return lines


def part_table(check: dict) -> list[str]:
    """Printable lines of :func:`errors`' result: one per point, then one summary per model."""
    lines = [f"{'model':6s} {'b':>3s} {'tok':>3s} {'ctx':>5s} {'chunk':>5s} {'prefix':>6s} {'measured':>9s} "
             f"{'rule':>9s} {'error':>7s}"]
    for p in check["points"]:
        lines.append(f"{p['model']:6s} {p['batch']:3d} {p['tokens']:3d} {p['context']:5d} {p['chunk_tokens']:5d} "
                     f"{p['chunk_prefix']:6d} {p['measured_s']:9.4g} {p['predicted_s']:9.4g} {100 * p['rel_error']:+6.1f}%")
    for model in ("target", "draft"):
        if model in check:
            s = check[model]
            lines.append(f"{model}: {s['rows']} points, |error| median {100 * s['median_abs_rel_error']:.1f} %, max "
                         f"{100 * s['max_abs_rel_error']:.1f} % (signed median {100 * s['median_rel_error']:+.1f} %)")
    return lines


def store(profile: Profile, check: dict) -> None:
    """Write ``check`` into the profile's meta.json as ``mixed_check`` (the rest of meta.json unchanged)."""
    meta = json.loads((profile.path / "meta.json").read_text())
    meta.pop("schema_version", None)
    meta["mixed_check"] = check
    write_profile_meta(profile.path, meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specbatch.fidelity.mixed", description=__doc__.split("\n")[0])
    ap.add_argument("profile", help="a profile folder with mixed.csv")
    ap.add_argument("--no-store", action="store_true", help="print only; leave meta.json as it is")
    a = ap.parse_args(argv)
    try:
        prof = load_profile(a.profile)
        check = rule_check(prof)
    except ProfileError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(table(check)))
    if not a.no_store:
        store(prof, check)
        print(f"stored as mixed_check in {Path(a.profile) / 'meta.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
