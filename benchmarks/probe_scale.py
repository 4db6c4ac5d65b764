"""Do specbatch-validate's instruments agree, and how still does the probe's scale hold?

1. **Sweep vs re-timing.** The profiler's sweep (``specbatch.profiler.timing.measure`` on models and caches of its
   own) and the calibration's re-timing (``specbatch.fidelity.calibrate.calibrate``: one warm call, then the median of
   5, on the engine's models) time the same profiler steps, alternately, in one process. Their ratio is 1
   when the profile and the calibration differ only by when they ran.
2. **The probe's scale** (``probe_ref_s``: the probe's time at the profile's speed) in each of ``--rounds``
   calibrations against one profile, estimated two ways: the probe's median over the calibration run ×
   the speed of the steps re-timed after it (``run median``), and the probe read just before and just
   after each re-timed step (``around steps``: what :func:`specbatch.fidelity.calibrate.fit_overheads` uses). Every
   case of a validation is simulated at a speed proportional to this one number, so its round-to-round
   spread is a shift common to all of them.

    python benchmarks/probe_scale.py                         # profiles the tiny pair first (3 passes)
    python benchmarks/probe_scale.py --profile fidelity-out/profile --rounds 8

CPU clock (process time), 1 thread, the reduced validation's pair and grid.
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from specbatch.profiler import models as M
from specbatch.fidelity import calibrate as C, validate as V
from specbatch.profiler import timing
from specbatch.fidelity.engine import Engine, EngineConfig, make_clock
from specbatch.profiler.sweep import make_step
from specbatch.profiler.timing import measure
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.profile import load_profile

R = V.REDUCED
MAX_LEN = R["max_prompt"] + R["max_output"] + R["max_gamma"] + 4


def swept(models: dict, point: tuple, gen, timer) -> float:
    """The sweep's timing of one profile point on ``models`` (as ``specbatch-validate`` configures it), seconds."""
    role, _, b, tokens, c = point
    m = models[role]
    cache = M.make_cache("prealloc", m.config, b, c, max(R["grid"]["gammas"]) + 1, torch.float32, "cpu")
    step, reset = make_step(point, m, cache, m.config.vocab_size, 1.0, gen, "cpu")
    return measure(step, timer, reset=reset, budget_s=0.1, **V.PROFILE_TIMING).median_s


def retimed(eng: Engine, b: int, g: int, c: int) -> list[float]:
    """The calibration's re-timing of the target step (and the draft decode when γ > 0), seconds."""
    caches = {role: M.make_cache("prealloc", m.config, b, c, 5, eng.dtype, eng.device)  # as calibrate: γ ≤ 4
              for role, m in (("target", eng.target), ("draft", eng.draft))}
    return C.retime(eng, b, g, c, caches, make_clock("cpu", eng.device))


def sweep_vs_retiming(eng: Engine, repeats: int) -> pd.DataFrame:
    target, draft = (M.load_model(name, torch.float32, "cpu", seed=s)[0]
                     for name, s in ((R["pair"].split(":")[0], 0), (R["pair"].split(":")[1], 1)))
    models, gen, rows = {"target": target, "draft": draft}, torch.Generator().manual_seed(0), []
    timer = timing.make_timer("cpu", "cpu")  # the timer the validation's sweep uses: this process's CPU time
    for _ in range(repeats):
        for b in R["grid"]["batches"]:
            for c in (32, 96):
                for g in (0, 2, 4):
                    again = retimed(eng, b, g, c)
                    rows.append(dict(model="target", batch=b, ratio=swept(models, (
                        "target", "verify" if g else "decode", b, g + 1, c), gen, timer) / again[0]))
                    if g:
                        rows.append(dict(model="draft", batch=b,
                                         ratio=swept(models, ("draft", "decode", b, 1, c), gen, timer) / again[1]))
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", help="a profile of the reduced pair and grid (default: take one, 3 passes)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="sweeps of the points compared in part 1")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    target, draft = R["pair"].split(":")
    with tempfile.TemporaryDirectory() as tmp:
        prof_dir = Path(args.profile) if args.profile else V.profile_pair(Path(tmp) / "profile", target, draft,
                                                                           R["grid"], passes=3)
        cost = C.make_cost(load_profile(prof_dir), None, (), R["max_batch"], R["max_gamma"])
    eng = Engine(target, draft, EngineConfig(max_batch=R["max_batch"], kv_capacity_tokens=R["max_batch"] * MAX_LEN,
                                             clock="cpu", threads=1, seed=0), max_len=MAX_LEN)

    df = sweep_vs_retiming(eng, args.repeats)
    print(f"1. sweep ÷ re-timing of the same steps, timed alternately ({len(df)} pairs): median "
          f"{df['ratio'].median():.3f}; by model and batch:")
    print(df.groupby(["model", "batch"])["ratio"].median().unstack().round(3).to_string())

    probe, acc = C.make_probe(eng), AcceptanceModel(alpha=0.7, max_gamma=R["max_gamma"])
    run_median, around = [], []
    for _ in range(args.rounds):
        cal = C.calibrate(eng, cost, acc, max_prompt=R["max_prompt"], max_output=R["max_output"], probe=probe)
        run_median.append(C.speed_vs_profile(cost, cal["step_points"]) * cal["probe_s"])
        around.append(C.fit_overheads(cost, [cal])[1]["probe_ref_by_round"][0])
    print(f"\n2. the probe's scale (ms) in {args.rounds} calibration rounds:")
    for name, x in (("run median", run_median), ("around steps", around)):
        x = np.asarray(x) * 1e3
        print(f"   {name:13} median {np.median(x):.3f}  sd {x.std(ddof=1) / x.mean():.1%} of the mean  "
              f"(" + ", ".join(f"{v:.3f}" for v in x) + ")")
    print(f"   around steps ÷ run median, medians: {np.median(around) / np.median(run_median):.3f}")


if __name__ == "__main__":
    main()
