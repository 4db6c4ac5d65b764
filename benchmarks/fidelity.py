"""Full fidelity benchmark: the real engine vs the simulator, 2 loads x 3 policies, ``--repeats`` engine rounds
interleaved with the profile's passes (run-to-run noise from the rounds), on the reduced tiny pair and on a
bigger pair (llama-68m shapes as target and draft).

    python benchmarks/fidelity.py                       # both pairs, CPU clock, results in fidelity-bench/
    python benchmarks/fidelity.py --pairs tiny --clock wall --requests 80
    python benchmarks/fidelity.py --pairs llama68m --requests 60 --rounds 3   # 3 x (profile, engine, simulator)
    python benchmarks/fidelity.py --reports runs/*/report.json   # the tables over validations already run

Writes ``<out>/<pair>/report.json`` and ``dashboard.html`` per pair and prints the error tables
(``(sim − real) / real`` per metric, per simulator variant: the plain profile, then each engine-side term
added, see :mod:`specbatch.fidelity.calibrate`), the agreement check (goal + 3 × noise), with the machine's load average.

With ``--rounds R`` the whole validation (a fresh profile, the engine runs, the simulator) runs R times, into
``<out>/<pair>/round<k>/``, and a last table compares, per case, the median over rounds of the engine's
metric with the median over rounds of the simulator's ("model" variant), beside the spread of the
per-round errors: on a machine whose speed drifts between the profile and the runs, the rounds sample
that drift instead of betting on one draw of it; a second table gives the median over rounds of the paired
errors (the headline comparison: each engine run against the simulator at its probed speed), and a third
their mean ± standard error: the model's bias per case, separated from one validation's scatter.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from specbatch.fidelity.validate import HEADLINE, REDUCED, format_report, validate  # noqa: E402
from specbatch.sim.profile import ProfileError  # noqa: E402

PAIRS = {
    "tiny": dict(pair="tiny-llama:tiny-llama-draft", grid=REDUCED["grid"], max_prompt=96, max_output=48,
                 max_batch=8),
    # llama-68m shapes (hidden 768, 2 layers, vocab 32000) as both target and draft: the presets have no smaller
    # model with the same 32000-token vocabulary, and the engine feeds target tokens to the draft. Steps last
    # milliseconds to tens of milliseconds, well above the tiny pair's Python-level jitter.
    "llama68m": dict(pair="llama-68m:llama-68m", max_prompt=96, max_output=48, max_batch=8,
                     grid=dict(batches=[1, 2, 3, 4, 5, 6, 7, 8], gammas=[0, 1, 2, 4, 6], contexts=[32, 160],
                               prefill_lengths=[8, 32, 96], prefill_batches=[1])),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--loads", type=float, nargs="+", default=list(REDUCED["loads"]))
    ap.add_argument("--repeats", type=int, default=REDUCED["repeats"],
                    help="engine rounds per validation (the first after each of the profile's passes)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="fidelity-bench")
    ap.add_argument("--rounds", type=int, default=1, help="whole validations per pair (profile included)")
    ap.add_argument("--reports", nargs="+", metavar="REPORT_JSON",
                    help="run nothing: summarize these report.json files (whole validations of the same cases)")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error(f"--rounds is {a.rounds}; expected an integer ≥ 1")
    if a.reports:
        print(summarize_rounds("reports", [load_report(Path(x)) for x in a.reports]))
        return 0
    for name in a.pairs:
        p = PAIRS[name]
        reports = []
        for k in range(a.rounds):
            out = Path(a.out) / name / (f"round{k}" if a.rounds > 1 else "")
            try:
                report = validate(pair=p["pair"], grid=p["grid"], max_prompt=p["max_prompt"],
                                  max_output=p["max_output"], max_batch=p["max_batch"], requests=a.requests,
                                  loads=tuple(a.loads), repeats=a.repeats, clock=a.clock, threads=a.threads,
                                  device=a.device, out=out)
            except ProfileError as e:  # the machine too noisy for this round's profile: reported, not hidden
                if a.rounds == 1:
                    raise
                print(f"== {name}, round {k}: no valid profile ({e}); round left out")
                continue
            print(f"== {name} ({p['pair']}){f', round {k}' if a.rounds > 1 else ''}, {report['elapsed_s']['total']} s")
            print(format_report(report))
            reports.append(report)
        if len(reports) > 1:
            print(summarize_rounds(name, reports))
    return 0


def load_report(path: Path) -> dict:
    """A ``report.json`` of specbatch-validate, or SystemExit naming the file and what is wrong."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--reports: {path}: not a readable JSON file ({e})") from None
    cases = report.get("cases") if isinstance(report, dict) else None
    if not cases or any("paired" not in c.get("errors", {}) for c in cases):
        raise SystemExit(f"--reports: {path}: no cases with paired errors; expected a specbatch-validate report.json")
    return report


def summarize_rounds(name: str, reports: list[dict]) -> str:
    """The tables over several whole validations of the same cases."""
    keys = [(c["load"], c["policy"]) for c in reports[0]["cases"]]
    for r in reports[1:]:
        other = [(c["load"], c["policy"]) for c in r["cases"]]
        if other != keys:
            raise SystemExit(f"{name}: the validations' cases differ ({keys} vs {other}); expected the same cases")
    n = len(reports)
    lines = [
        f"== {name}: error of the medians over {n} rounds (\"model\" variant); per-round errors in brackets",
        rounds_table(reports, "model"),
        f"== {name}: median over {n} rounds of the paired errors (each run at its probed speed); per-round "
        "errors in brackets", rounds_table(reports, "paired"),
        f"== {name}: the paired errors' mean over {n} rounds ± its standard error (sd: one validation's scatter)",
        bias_table(reports)]
    steps = [c["steps"]["profile_over_step"] for r in reports for c in r["cases"] if c.get("steps")]
    if steps:
        lines.append(f"profile / engine step time, median per case: median {np.median(steps):.3f} over "
                     f"{len(steps)} cases x rounds (range {min(steps):.2f}–{max(steps):.2f})")
    return "\n".join(lines)


def bias_table(reports: list[dict]) -> str:
    """Per case and headline metric: mean ± standard error of the paired errors over the validations (the
    model's bias, and how well that many validations pin it down), and their standard deviation."""
    lines = [f"{'load':>5} {'policy':9}" + "".join(f"{m:>30}" for m in HEADLINE)]
    for i, c in enumerate(reports[0]["cases"]):
        cells = []
        for m in HEADLINE:
            e = 100 * np.array([r["cases"][i]["errors"]["paired"][m] for r in reports])
            sd = float(e.std(ddof=1))
            cells.append(f"{e.mean():+.1f} ± {sd / np.sqrt(len(e)):.1f}% (sd {sd:.1f})")
        lines.append(f"{c['load']:>5.2f} {c['policy']:9}" + "".join(f"{x:>30}" for x in cells))
    return "\n".join(lines)


def rounds_table(reports: list[dict], variant: str) -> str:
    """Per case and headline metric: for a simulator variant, the median over rounds of the simulator's
    value over the median of the engine's, minus 1; for ``paired`` (no single simulated value: each run
    has its own speed), the median of the per-round errors; and the per-round errors."""
    lines = [f"{'load':>5} {'policy':9}" + "".join(f"  {m:>34}" for m in HEADLINE)]
    errors = {m: [] for m in HEADLINE}
    for i, c in enumerate(reports[0]["cases"]):
        cells = []
        for m in HEADLINE:
            per_round = [r["cases"][i]["errors"][variant][m] for r in reports]
            if variant == "paired":
                err = float(np.median(per_round))
            else:
                err = np.median([r["cases"][i]["sim"][variant][m] for r in reports]) / \
                    np.median([r["cases"][i]["real"][m] for r in reports]) - 1
            errors[m].append(err)
            cells.append(f"{100 * err:+.1f}% [{', '.join(f'{100 * e:+.0f}' for e in per_round)}]")
        lines.append(f"{c['load']:>5.2f} {c['policy']:9}" + "".join(f"  {x:>34}" for x in cells))
    # A bias shows as a mean error away from 0 (noise averages out over cases) and a step ratio away from 1.
    lines.append(f"{'mean':>5} {'':9}" + "".join(f"  {f'{100 * np.mean(errors[m]):+.1f}%':>34}" for m in HEADLINE))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
