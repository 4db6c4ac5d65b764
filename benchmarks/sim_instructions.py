"""Simulator cost in instructions executed: an A/B for hot-path changes that machine noise cannot blur.

    python benchmarks/sim_instructions.py                        # this checkout
    python benchmarks/sim_instructions.py --against 5d2c36d      # and another revision (temporary git worktree;
                                                                 # one with the specbatch namespace)
    python benchmarks/sim_instructions.py --cases saturated      # one case only

Wall-clock A/B runs of the simulator on a shared VM cannot resolve changes of a few per cent: paired runs
of the same code differ by up to 1.6×. The number of instructions the process executes, counted by
valgrind's callgrind, does not depend on the machine's speed: with a fixed seed (and ``PYTHONHASHSEED=0``)
a repeated run gives the same count to within a few parts per million (the same code checked out in
two folders differs by about 0.3 %, from the paths: smaller differences between revisions mean nothing). Each case runs under callgrind
twice per revision — once up to the simulation (imports, trace, cost model, workloads) and once through
it — and the difference is the simulation's own count, printed per simulated request. Every revision runs
the same driver (this file) against its own ``specbatch`` package tree (a plain install into a temporary
folder); a hash of both result tables shows whether
the revisions simulate the same thing. Instructions are not seconds (numpy's vectorised loops, memory and
caches weigh differently), but for this interpreter-bound code the two move together.

Cases (the shipped CPU profile, acceptance α = 0.7, γ = 4, max batch 32):

* ``saturated`` — the first 3,000 Azure conversation requests at the trace's rate on one replica
  (batches stay full: a plan per join and leave);
* ``light`` — the first 1,000 at 0.5 of the replica's capacity (small batches, many short plans);
* ``cluster`` — 5,000 requests with conversation lengths, Poisson at 0.8 of the capacity of 64 replicas,
  round robin, one process (the 1M × 64 benchmark's shape).

Needs valgrind (``apt-get install valgrind``); a case takes about a minute of CPU under it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"saturated": 3000, "light": 1000, "cluster": 5000}  # simulated requests


def child(case: str) -> None:
    """Build every case's inputs (so the setup count is the same for all), then simulate ``case`` (or nothing,
    for ``setup``) and print a hash of the result tables."""
    warnings.simplefilter("ignore")
    import pandas as pd

    from specbatch.sim.acceptance import AcceptanceModel
    from specbatch.sim.capacity import estimate_capacity
    from specbatch.sim.cluster import ClusterConfig, simulate
    from specbatch.sim.cost_model import CostModel
    from specbatch.sim.policies import make_policy
    from specbatch.sim.profile import load_profile
    from specbatch.sim.run import resolve_profile
    from specbatch.sim.workload import first_n, set_rate
    from sim_speed import cluster_workload, conv_trace  # this file's neighbour; specbatch comes from the revision

    cost = CostModel(load_profile(resolve_profile("default")), max_batch=32)
    conv = conv_trace()
    one, many = ClusterConfig(replicas=1, max_batch=32), ClusterConfig(replicas=64, max_batch=32)
    light = first_n(conv, CASES["light"])
    runs = {"saturated": (first_n(conv, CASES["saturated"]), one),
            "light": (set_rate(light, 0.5 * estimate_capacity(cost, light, one)), one),
            "cluster": (cluster_workload(CASES["cluster"], cost, many, conv), many)}
    if case == "setup":
        return
    w, cluster = runs[case]
    r = simulate(w, cost, make_policy("fixed", gamma=4), AcceptanceModel(alpha=0.7), cluster, seed=0)
    digest = hashlib.sha1()
    for table in (r.requests, r.iterations):
        digest.update(pd.util.hash_pandas_object(table).to_numpy().tobytes())
    print(f"tables {digest.hexdigest()[:12]}")


def package_tree(source: Path, into: Path) -> Path:
    """A plain (non-editable) install of ``source``'s ``specbatch`` package into ``into``, to put first on
    ``PYTHONPATH``: the folders map onto ``specbatch.*`` only through an install, and the editable install's
    finder would otherwise serve this checkout's modules to every revision."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(into), str(source)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{source}: cannot install its package tree:\n{done.stderr[-2000:]}")
    return into


def count(source: Path, case: str) -> tuple[int, str]:
    """Instructions executed by ``child(case)`` with the package tree ``source`` first on the path, and its
    output."""
    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, str(Path(__file__).resolve()),
           "--child", case]  # (this file's folder, benchmarks/, is first on sys.path: sim_speed comes from it)
    out = subprocess.run(cmd, cwd=source, env=env, capture_output=True, text=True)
    found = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if out.returncode or not found:
        raise SystemExit(f"{source}: case {case} failed under valgrind (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return int(found.group(1)), out.stdout.strip()


def measure(sources: dict[str, Path], cases: list[str], jobs: int) -> dict:
    tasks = [(name, case) for name in sources for case in ["setup"] + cases]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = dict(zip(tasks, pool.map(lambda t: count(sources[t[0]], t[1]), tasks)))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", metavar="REV", help="also measure this git revision (checked out in a temporary worktree)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="valgrind runs at a time")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child)
        return 0
    if shutil.which("valgrind") is None:
        print("error: valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    sources = {"this": ROOT}
    with tempfile.TemporaryDirectory(prefix="specbatch-ab-") as tmp:
        if a.against:
            other = Path(tmp) / "other"
            add = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), a.against],
                                 capture_output=True, text=True)
            if add.returncode:
                print(f"error: cannot check out {a.against!r}: {add.stderr.strip()}", file=sys.stderr)
                return 2
            sources[a.against] = other
        try:
            trees = {name: package_tree(src, Path(tmp) / f"pkg-{i}") for i, (name, src) in enumerate(sources.items())}
            res = measure(trees, a.cases, a.jobs)
        finally:
            if a.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(sources[a.against])],
                               capture_output=True)
    setup = ", ".join(f"{n} {res[(n, 'setup')][0] / 1e9:.3f} G" for n in sources)
    print(f"instructions per simulated request (callgrind; simulation only: run − setup); setup {setup}")
    head = f"{'case':>10} {'requests':>8}" + "".join(f" {n:>14}" for n in sources)
    print(head + (f" {'this / ' + a.against:>22} {'same tables':>11}" if a.against else ""))
    for case in a.cases:
        per = {n: (res[(n, case)][0] - res[(n, "setup")][0]) / CASES[case] for n in sources}
        line = f"{case:>10} {CASES[case]:>8}" + "".join(f" {per[n]:>14,.0f}" for n in sources)
        if a.against:
            same = res[("this", case)][1] == res[(a.against, case)][1]
            line += f" {per['this'] / per[a.against]:>22.3f} {'yes' if same else 'NO':>11}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
