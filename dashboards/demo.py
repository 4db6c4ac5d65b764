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
    from sim.policies import policy_names

    conf = resources.files("specbatch.conf") / "policy"
    return [n for n in policy_names() if n not in (*CORE_POLICIES, "fixed") and (conf / f"{n}.yaml").is_file()]


def analytical_profile(folder: Path) -> Path:
    """A stand-in profile from a simple roofline-like formula, for when no measured profile is shipped:
    verify is memory-bound (flat) up to 128 tokens of work per step, then linear; KV reads grow with
    batch × context; the draft is ~12× cheaper."""
    from sim.profile import write_profile_meta, write_steps

    def verify(b, t, c):
        return 0.020 + 0.00012 * max(0, b * t - 128) + 2e-8 * b * c

    def draft(b, c):
        return 0.0016 + 0.000004 * b + 2e-9 * b * c

    rows = []
    for c in (128, 512, 2048, 8192):
        for b in (1, 2, 4, 8, 16, 32, 48, 64):
            for t in range(1, 10):
                v = verify(b, t, c)
                rows.append(dict(model="target", phase="decode" if t == 1 else "verify", batch=b, tokens=t, context=c,
                                 median_s=v, p10_s=v * 0.97, p90_s=v * 1.03, samples=1, status="ok"))
            d = draft(b, c)
            rows.append(dict(model="draft", phase="decode", batch=b, tokens=1, context=c, median_s=d, p10_s=d * 0.97,
                             p90_s=d * 1.03, samples=1, status="ok"))
    for m, scale in (("target", 1.0), ("draft", 0.08)):
        for n in (16, 64, 256, 1024, 4096, 8192, 16384):
            v = scale * (0.02 + 6e-5 * n)
            rows.append(dict(model=m, phase="prefill", batch=1, tokens=n, context=0, median_s=v, p10_s=v, p90_s=v,
                             samples=1, status="ok"))
    folder.mkdir(parents=True, exist_ok=True)
    write_steps(folder, rows)
    write_profile_meta(folder, {
        "source": "analytical", "date": "2026-01-01", "dtype": "float16",
        "device": {"name": "demo-formula", "kind": "cuda", "memory_bytes": 80 * 10**9, "kv_cache_bytes": 40 * 10**9},
        "models": {"target": {"name": "target-7b (formula)", "kv_bytes_per_token": 524288},
                   "draft": {"name": "draft-160m (formula)", "kv_bytes_per_token": 36864}},
        "timing": {"method": "formula (dashboards.demo stand-in)"},
    })
    return folder


def pick_profile(name: str, out: Path) -> str:
    """The profile folder to use: ``name`` resolved and checked; for ``default``, an analytical stand-in
    when no usable measured profile is shipped (said loudly)."""
    import warnings

    from sim.cost_model import CostModel
    from sim.profile import ProfileError, load_profile
    from sim.run import ConfigError, resolve_profile

    try:
        path = resolve_profile(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CostModel(load_profile(path))  # validates the whole profile now, not in every run
        return str(path)
    except (ConfigError, ProfileError) as e:
        if name not in ("", "default"):
            raise
        print(f"specbatch-demo: no usable shipped profile ({e})\n  → using an analytical stand-in profile "
              "(not a measurement)", file=sys.stderr)
        return str(analytical_profile(out / "profile-analytical").resolve())


def sweep(sweep_dir: Path, overrides: list[str], jobs: int) -> int:
    cmd = [sys.executable, "-m", "sim.cli", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}",
           f"hydra.sweep.dir={sweep_dir}", "print_summary=false", *overrides]
    print("+ specbatch-sim " + " ".join(cmd[3:]), flush=True)
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
    profile = pick_profile(a.profile, out)
    common = [f"profile={profile}", f"workload={a.workload}", f"workload.first_n={a.requests}", f"workload.load={a.loads}"]
    extras = extra_policies()
    rc = sweep(out / "policies", [f"policy={','.join([*CORE_POLICIES, *extras])}", *common], a.jobs)
    if rc != 0 and extras:
        print(f"specbatch-demo: the sweep with {extras} failed; rerunning with the core policies only", file=sys.stderr)
        rc = sweep(out / "policies", [f"policy={','.join(CORE_POLICIES)}", *common], a.jobs)
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
