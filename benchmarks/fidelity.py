"""Full fidelity benchmark: the real engine vs the simulator, 2 loads x 3 policies, two engine runs per case
(run-to-run noise), on the reduced tiny pair and on a bigger pair (llama-68m target, tiny-llama-draft).

    python benchmarks/fidelity.py                       # both pairs, CPU clock, results in fidelity-bench/
    python benchmarks/fidelity.py --pairs tiny --clock wall --requests 80

Writes ``<out>/<pair>/report.json`` and ``dashboard.html`` per pair and prints the error tables
(``(sim − real) / real`` per metric, per simulator variant: the plain profile, then each engine-side term
added, see :mod:`profiler.validate`), with the machine's load average.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiler.validate import REDUCED, format_report, validate  # noqa: E402

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
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="fidelity-bench")
    a = ap.parse_args(argv)
    for name in a.pairs:
        p = PAIRS[name]
        report = validate(pair=p["pair"], grid=p["grid"], max_prompt=p["max_prompt"], max_output=p["max_output"],
                          max_batch=p["max_batch"], requests=a.requests, loads=tuple(a.loads), repeats=a.repeats,
                          clock=a.clock, threads=a.threads, device=a.device, out=Path(a.out) / name)
        print(f"== {name} ({p['pair']}), {report['elapsed_s']['total']} s")
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
