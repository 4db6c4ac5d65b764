"""Studies: sweeps of simulator runs defined once in ``conf/study/<name>.yaml``, run in-process or by hydra.

A study config is a ``# @package _global_`` hydra config whose ``hydra.sweeper.params`` lists the swept
overrides (comma-separated values, the basic sweeper's syntax), so ``specbatch-sim -m +study=<name>``
runs it as a multirun. :func:`run_study` runs the same cartesian product in this process (optionally in
``jobs`` worker processes), composing each point with hydra's compose API exactly as the multirun would,
and returns one tidy table.

Study table (:func:`run_study`; also written to ``<out_dir>/study.csv``) — one row per run:

* ``study`` (str), ``run`` (int, 0-based index in sweep order);
* one column per swept override, named as the override key, holding the value as written in the sweep
  (str), e.g. ``policy`` (``fixed_gamma/g2``, ``adaptive``, ...), ``workload`` (``azure_conv``),
  ``workload.load``, ``cluster.max_batch``, ``seed``; numeric values are converted to numbers;
* ``arm`` (str): the policy as a label — ``fixed-<γ>`` for fixed, ``none`` for no speculation (γ = 0,
  no draft), else the policy name; ``policy_name`` (registered name) and ``gamma`` (fixed γ, else NaN);
* ``profile``, ``workload_name`` (str);
* every scalar of :func:`specbatch.sim.metrics.summarize` (see its docstring for definitions and units):
  ``throughput_tok_s``, ``throughput_req_s``, ``goodput_req_s``, ``goodput_tok_s``, ``slo_attainment``,
  ``ttft_*``, ``tpot_*``, ``latency_*`` (``_mean``, ``_p50``, ``_p90``, ``_p99``; seconds), ``mean_batch``,
  ``mean_gamma``, ``mean_accepted``, ``tokens_per_iteration``, ``preemptions``, ``iterations``,
  ``makespan_s``, ``requests``, ``completed``, ``rejected``, ``busy_fraction_mean``, ``kv_capacity_tokens``,
  ``arrival_rate_req_s``, ``capacity_req_s``;
* ``wall_s``: seconds the run took.

The oracle (:func:`oracle`) is the best fixed-γ arm (``fixed-*`` and ``none``) at each load level —
per (workload, load, max_batch) group, by the median over seeds of a metric; :func:`compare` gives each
arm's median, spread over seeds and gap to that oracle.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from specbatch import conf_dir

#: Metrics and their direction: True = higher is better.
METRICS = {"throughput_tok_s": True, "goodput_req_s": True, "goodput_tok_s": True, "slo_attainment": True,
           "latency_mean": False, "latency_p50": False, "latency_p99": False, "tpot_mean": False,
           "tpot_p50": False, "tpot_p99": False, "ttft_mean": False, "ttft_p99": False}
#: Columns that identify a load level (the oracle is chosen within each); only those present are used.
GROUP_KEYS = ["workload", "workload.load", "workload.rate", "cluster.max_batch", "cluster.replicas",
              "cluster.max_num_batched_tokens",  # (the budget: study `chunked`)
              "drafter"]  # (the drafter kind: study `drafters`)


def study_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "study").glob("*.yaml"))


def sweep_params(name: str) -> dict[str, list[str]]:
    """The swept overrides of study ``name``: ``{key: [value, ...]}`` from ``hydra.sweeper.params``."""
    path = conf_dir() / "study" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"study {name!r} not found; expected one of {study_names()} (conf/study/<name>.yaml)")
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params")
    if not params:
        raise ValueError(f"{path}: key 'hydra.sweeper.params' is missing or empty")
    return {str(k): [v.strip() for v in str(vals).split(",")] for k, vals in params.items()}


def expand(params: dict[str, list[str]], only: dict[str, list[str]] | None = None) -> list[dict[str, str]]:
    """Cartesian product of the swept values, in hydra's basic-sweeper order (first key outermost).
    ``only`` replaces the value list of the keys it names (to run a slice of a study)."""
    params = dict(params)
    for k, v in (only or {}).items():
        if k not in params:
            raise ValueError(f"override {k!r} is not swept by this study; swept keys: {list(params)}")
        params[k] = [str(x) for x in v]
    keys = list(params)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(params[k] for k in keys))]


def _is_group(key: str) -> bool:
    return (conf_dir() / key.replace(".", "/")).is_dir()


def compose_runs(name: str, points: list[dict[str, str]], overrides: list[str] = ()) -> list[dict]:
    """The resolved run configs (plain dicts) for sweep points, as ``specbatch-sim -m`` would compose them.

    Hydra composes once per distinct choice of config-group options (``policy``, ``workload``, ...); the
    plain value overrides (``workload.load``, ``seed``, ...) are then set on a copy, as hydra would."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    cache: dict[tuple, object] = {}
    out = []
    with initialize_config_module(config_module="specbatch.conf", version_base=None):
        for point in points:
            groups = tuple((k, v) for k, v in point.items() if _is_group(k))
            if groups not in cache:
                cache[groups] = compose(config_name="config",
                                        overrides=[f"+study={name}", *[f"{k}={v}" for k, v in groups], *overrides])
            cfg = cache[groups].copy()
            for k, v in point.items():
                if not _is_group(k):
                    if OmegaConf.select(cfg, k, default="__missing__") == "__missing__":
                        raise ValueError(f"study {name}: swept key {k!r} is not in the config")
                    OmegaConf.update(cfg, k, yaml_value(v), merge=False)
            out.append(OmegaConf.to_container(cfg, resolve=True))
    GlobalHydra.instance().clear()
    return out


def yaml_value(v: str):
    """A swept value as hydra reads it (``0.7`` → float, ``3`` → int, ``null`` → None, else the string)."""
    import yaml

    return yaml.safe_load(v)


def compose_run(name: str, point: dict[str, str], overrides: list[str] = ()) -> dict:
    """The resolved run config (plain dict) for one sweep point."""
    return compose_runs(name, [point], overrides)[0]


def _number(v: str):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v else f


def arm_label(policy: dict) -> str:
    if policy["name"] == "fixed":
        return f"fixed-{int(policy['gamma'])}"
    return str(policy["name"])


def _run_one(job: tuple[int, dict, dict, str | None]) -> dict:
    from .run import run

    i, point, cfg_dict, out = job
    cfg = OmegaConf.create(cfg_dict)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = run(cfg, out)
    summary = {k: v for k, v in r.summary.items()
               if isinstance(v, (int, float, str, np.generic)) or v is None}
    summary["workload_name"] = summary.pop("workload", None)
    summary.pop("policy", None)
    row = {"run": i, **{k: _number(v) for k, v in point.items()}, "arm": arm_label(cfg_dict["policy"]),
           "policy_name": cfg_dict["policy"]["name"],
           "gamma": float(cfg_dict["policy"]["gamma"]) if cfg_dict["policy"]["name"] == "fixed" else np.nan,
           **summary}
    row["wall_s"] = time.perf_counter() - t0
    return row


def run_study(name: str, out_dir: str | os.PathLike | None = None, *, profile: str | None = None,
              seeds: list[int] | None = None, only: dict[str, list] | None = None, overrides: list[str] = (),
              jobs: int = 1, save_runs: bool = False, progress: bool = False) -> pd.DataFrame:
    """Run study ``name`` and return the tidy table described in the module docstring.

    ``profile``: a profile override (folder or shipped name); ``seeds``: replace the swept seeds;
    ``only``: replace the values of swept keys (e.g. ``{"workload.load": [0.7]}``); ``overrides``: extra
    hydra overrides applied to every run (e.g. ``["workload.first_n=100"]``); ``jobs``: worker processes;
    ``out_dir``: where ``study.csv`` (and with ``save_runs``, one folder of run outputs per run,
    ``run-<i>``) are written.
    """
    only = dict(only or {})
    if seeds is not None:
        only["seed"] = list(seeds)
    extra = list(overrides) + ([f"profile={profile}"] if profile else [])
    points = expand(sweep_params(name), only)
    out = Path(out_dir) if out_dir is not None else None
    cfgs = compose_runs(name, points, extra)
    jobs_list = [(i, p, c, str(out / f"run-{i}") if (out and save_runs) else None)
                 for i, (p, c) in enumerate(zip(points, cfgs))]
    rows = []
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for row in ex.map(_run_one, jobs_list):
                rows.append(row)
                if progress:
                    print(f"  run {row['run'] + 1}/{len(points)} {row['arm']} done", file=sys.stderr)
    else:
        for job in jobs_list:
            rows.append(_run_one(job))
            if progress:
                print(f"  run {job[0] + 1}/{len(points)} {rows[-1]['arm']} done", file=sys.stderr)
    table = pd.DataFrame(rows)
    table.insert(0, "study", name)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "study.csv", index=False)
    return table


def _group_keys(table: pd.DataFrame) -> list[str]:
    return [k for k in GROUP_KEYS if k in table.columns]


def _check_metric(metric: str) -> bool:
    if metric not in METRICS:
        raise ValueError(f"metric is {metric!r}; expected one of {sorted(METRICS)}")
    return METRICS[metric]


def oracle(table: pd.DataFrame, metric: str = "latency_mean") -> pd.DataFrame:
    """Per load level (the present :data:`GROUP_KEYS`): the fixed-γ arm with the best median ``metric``
    over seeds. Columns: the group keys, ``oracle_arm``, ``oracle_<metric>``."""
    higher = _check_metric(metric)
    keys = _group_keys(table)
    fixed = table[table["arm"].str.startswith("fixed-") | (table["arm"] == "none")]
    if fixed.empty:
        raise ValueError("the study has no fixed-γ arms (fixed-*, none) to choose an oracle from")
    med = fixed.groupby(keys + ["arm"], dropna=False)[metric].median().reset_index()
    idx = med.groupby(keys, dropna=False)[metric].idxmax() if higher else med.groupby(keys, dropna=False)[metric].idxmin()
    best = med.loc[idx.to_numpy()].rename(columns={"arm": "oracle_arm", metric: f"oracle_{metric}"})
    return best.reset_index(drop=True)


def compare(table: pd.DataFrame, metric: str = "latency_mean") -> pd.DataFrame:
    """Each arm at each load level: ``median``, ``min``, ``max`` of ``metric`` over seeds, ``n`` seeds, the
    oracle arm and value, ``gap_pct`` (how much worse than the oracle, in percent of the oracle's value;
    negative = better than the best fixed γ), and ``rank`` of the arm within its load level (1 = best)."""
    higher = _check_metric(metric)
    keys = _group_keys(table)
    g = table.groupby(keys + ["arm"], dropna=False)[metric]
    out = g.agg(median="median", min="min", max="max", n="count").reset_index()
    out = out.merge(oracle(table, metric), on=keys, how="left")
    ref = out[f"oracle_{metric}"]
    out["gap_pct"] = 100 * ((ref - out["median"]) if higher else (out["median"] - ref)) / ref
    out["rank"] = out.groupby(keys, dropna=False)["median"].rank(ascending=not higher, method="min").astype(int)
    out.insert(len(keys) + 1, "metric", metric)
    return out


def gap_pivot(table: pd.DataFrame, metric: str = "latency_mean") -> pd.DataFrame:
    """Gap to the per-load oracle in percent (median over seeds): rows = arm, columns = load level
    (the group keys joined with ``/``); the last row names each level's oracle arm."""
    c = compare(table, metric)
    keys = _group_keys(table)
    c["level"] = c[keys].astype(str).agg("/".join, axis=1)
    pv = c.pivot(index="arm", columns="level", values="gap_pct")
    orc = c.drop_duplicates("level").set_index("level")["oracle_arm"]
    return pd.concat([pv.round(1).astype(object), orc.to_frame().T.rename(index={"oracle_arm": "(oracle)"})])


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specbatch.sim.study", description="Run a study and print its comparison.")
    p.add_argument("name", help=f"study name ({', '.join(study_names())})")
    p.add_argument("--profile", default=None)
    p.add_argument("--out", default=None, help="folder for study.csv (default: outputs/study-<name>)")
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--metric", action="append", default=None, help=f"one of {sorted(METRICS)} (repeatable)")
    p.add_argument("--override", action="append", default=[], help="extra hydra override for every run")
    args = p.parse_args(argv)
    from .profile import ProfileError
    from .run import ConfigError

    out = args.out or f"outputs/study-{args.name}"
    t0 = time.perf_counter()
    try:
        table = run_study(args.name, out, profile=args.profile, seeds=args.seeds, overrides=args.override,
                          jobs=args.jobs, progress=True)
    except (ConfigError, ProfileError, ValueError) as e:
        print(f"sim.study: error: {e}", file=sys.stderr)
        return 2
    pd.set_option("display.width", 200, "display.max_rows", 500)
    for metric in args.metric or ["latency_mean", "throughput_tok_s"]:
        c = compare(table, metric)
        print(f"\n== {args.name}: {metric} (median over {int(c['n'].max())} seeds; gap to the per-load oracle) ==")
        print(c.drop(columns=["metric"]).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        print(f"\n-- gap to the oracle in % of {metric} (rows: arm; columns: {'/'.join(_group_keys(table))}) --")
        print(gap_pivot(table, metric).to_string())
    print(f"\n{len(table)} runs in {time.perf_counter() - t0:.0f} s; table: {Path(out) / 'study.csv'}; "
          f"profile {table['profile'].iloc[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
