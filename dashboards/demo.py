"""``specbatch-demo`` (``make demo``): the default policy study and its dashboard.

Policies none, fixed γ ∈ {2, 4}, adaptive (and every other registered policy that ships a
``conf/policy/<name>.yaml``) × a few load levels on the Azure conversation trace (the first few hundred
requests), on the shipped profile, run as two hydra multirun sweeps with the local joblib launcher:

    <out>/policies/   policy=none,adaptive,...  × workload.load
    <out>/fixed/      policy=fixed policy.gamma=2,4 × workload.load

then collected into ``<out>/runs.parquet`` and ``<out>/dashboard.html`` (path printed last).
``--resume <out>`` reruns an interrupted demo: runs whose outputs are complete are skipped.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from .build import build_dashboard
from .collect import collect, write_table

CORE_POLICIES = ("none", "adaptive")
FIXED_GAMMAS = (2, 4)


def extra_policies() -> list[str]:
    """Registered policies beyond none/fixed/adaptive that ship a config (``conf/policy/<name>.yaml``)."""
    from specbatch.sim.policies import policy_names

    conf = resources.files("specbatch.conf") / "policy"
    return [n for n in policy_names() if n not in (*CORE_POLICIES, "fixed") and (conf / f"{n}.yaml").is_file()]


def pick_profile(name: str) -> str:
    """The profile folder to use (``default``: the shipped measured profile), validated once up front."""
    import warnings

    from specbatch.sim.cost_model import CostModel
    from specbatch.sim.profile import load_profile
    from specbatch.sim.run import resolve_profile

    path = resolve_profile(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CostModel(load_profile(path))  # validates the whole profile now, not in every run
    return str(path)


def sim_command() -> list[str]:
    """The installed ``specbatch-sim`` script (beside this interpreter, else on PATH). Running the script, not
    ``python -m specbatch.sim.cli``, keeps a checkout in the working directory from shadowing the installed package
    (whose ``specbatch.conf`` only exists in the install)."""
    script = Path(sys.executable).with_name("specbatch-sim")
    found = str(script) if script.is_file() else shutil.which("specbatch-sim")
    return [found] if found else [sys.executable, "-m", "specbatch.sim.cli"]


def sweep(sweep_dir: Path, overrides: list[str], jobs: int) -> int:
    args = ["-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}", f"hydra.sweep.dir={sweep_dir}",
            "print_summary=false", *overrides]
    cmd = [*sim_command(), *args]
    print("+ specbatch-sim " + " ".join(args), flush=True)
    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="specbatch-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="study folder (default multirun/demo/<date>_<time>)")
    p.add_argument("--resume", default=None, help="an earlier demo's folder: complete runs are not redone")
    p.add_argument("--profile", default="default", help="profile name or folder (default: the shipped one)")
    p.add_argument("--requests", type=int, default=300, help="first N requests of the trace")
    p.add_argument("--loads", default="0.5,0.8,1.0", help="load levels (fractions of no-speculation capacity)")
    p.add_argument("--workload", default="azure_conv", help="workload config (conf/workload)")
    p.add_argument("--jobs", type=int, default=-1, help="parallel runs (-1: one per core)")
    p.add_argument("--static", default="", help="also export figures: comma list of png, svg")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    out = Path(a.resume or a.out or Path("multirun/demo") / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        profile = pick_profile(a.profile)
    except ValueError as e:  # ConfigError, ProfileError
        print(f"specbatch-demo: error: {e}", file=sys.stderr)
        return 2
    common = [f"profile={profile}", f"workload={a.workload}", f"workload.first_n={a.requests}", f"workload.load={a.loads}"]
    extras = extra_policies()
    rc = sweep(out / "policies", [f"policy={','.join([*CORE_POLICIES, *extras])}", *common], a.jobs)
    rc2 = sweep(out / "fixed", ["policy=fixed", f"policy.gamma={','.join(map(str, FIXED_GAMMAS))}", *common], a.jobs)
    if rc or rc2:
        print(f"specbatch-demo: a sweep failed (exit {rc or rc2}); the dashboard shows the complete runs", file=sys.stderr)
    try:
        table = collect([out])
    except FileNotFoundError as e:
        print(f"specbatch-demo: error: {e}", file=sys.stderr)
        return 1
    write_table(table, out / "runs.parquet")
    static = tuple(f.strip() for f in a.static.split(",") if f.strip())
    html = build_dashboard(table, out / "dashboard.html", title="specbatch demo: speculation policies × load",
                           static=static)
    print(f"{len(table)} runs in {time.monotonic() - t0:.0f} s; table: {out / 'runs.parquet'}")
    print(f"dashboard: {html}")
    return 0 if not (rc or rc2) else 1


if __name__ == "__main__":
    sys.exit(main())
