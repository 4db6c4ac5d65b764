"""Profiler speed and measurement spread on a small run.

Prints grid points per minute (all of the sweep, model build excluded) and the spread p90/p10 of the
measurements (median and max over points). Defaults: the tiny preset pair, grid ``tiny``, CPU.

    python benchmarks/profile_speed.py [--pair tiny] [--grid tiny] [--device cpu] [--threads 1] [overrides...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="tiny")
    ap.add_argument("--grid", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides, e.g. timing.point_budget_s=0.1")
    a = ap.parse_args(argv)

    from hydra import compose, initialize_config_dir

    from specbatch.profiler import cli
    from specbatch.sim.profile import load_profile

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(cli._conf_dir()), version_base=None):
            cfg = compose("profile", overrides=[f"pair={a.pair}", f"grid={a.grid}", f"device={a.device}",
                                                f"threads={a.threads}", f"out_dir={tmp}", "name=bench",
                                                "progress=false", *a.overrides])
        t0 = time.perf_counter()
        out = cli.run(cfg)
        wall = time.perf_counter() - t0
        prof = load_profile(out)
    ok = prof.ok_steps
    spread = (ok["p90_s"] / ok["p10_s"]).to_numpy()
    sweep_s = float(prof.meta["timing"].get("elapsed_s", wall))
    print(f"pair={a.pair} grid={a.grid} device={a.device} threads={a.threads}: {len(prof.steps)} points "
          f"({len(ok)} ok) in {sweep_s:.1f} s (wall incl. start-up {wall:.1f} s)")
    print(f"points per minute: {len(prof.steps) / sweep_s * 60:.1f}")
    print(f"spread p90/p10: median {float(sorted(spread)[len(spread) // 2]):.3f}, max {spread.max():.3f}; "
          f"samples per point: median {int(ok['samples'].median())}")
    print(f"loadavg start {prof.meta['device'].get('loadavg_start')} end {prof.meta['device'].get('loadavg_end')}")


if __name__ == "__main__":
    main()
