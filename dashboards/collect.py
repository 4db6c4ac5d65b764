"""Collect finished runs (hydra multirun folders and single runs) into one tidy table: one row per run.

A run is a folder holding ``summary.json`` (written last by :mod:`specbatch.sim.run`, so it marks a complete run).
A multirun folder is searched recursively; incomplete runs (no ``summary.json``) are left out.

Columns of :func:`collect`'s table:

- run identity: ``run_dir`` (absolute path), ``study`` (the multirun folder holding ``multirun.yaml``, or
  the run folder itself for a single run), ``job`` (hydra job number: the subfolder name, else -1),
  ``overrides`` (the run's command-line overrides, space separated);
- every key of ``summary.json`` (:func:`specbatch.sim.metrics.summarize`, plus ``policy``, ``profile``, ``workload``,
  ``arrival_rate_req_s``, ``capacity_req_s``); lists (``busy_fraction``) as JSON text;
- ``sweep.<key>``: each override of the run (``key=value`` in ``.hydra/overrides.yaml``; leading ``+``,
  ``++`` and ``~`` dropped), with its value;
- ``cfg.<dotted.key>``: every leaf of the run's resolved ``config.yaml``;
- derived: ``policy_label`` (policy name and its parameters, e.g. ``fixed γ=2``), ``load`` (the
  ``workload.load`` fraction, else null), ``pair`` (``draft → target`` model names from the profile's
  ``meta.json``), ``profile_dir`` (resolved profile folder, when it still exists), ``scenario``
  (``workload · pair · profile``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

from specbatch.sim.profile import atomic_write

SUMMARY = "summary.json"


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every complete run under ``paths`` (a run folder itself, or folders searched recursively), sorted."""
    found: set[Path] = set()
    for p in paths:
        p = Path(p).expanduser().resolve()
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run or multirun folder")
        if (p / SUMMARY).is_file():
            found.add(p)
            continue
        for s in p.rglob(SUMMARY):
            rel = s.parent.relative_to(p).parts
            if any(part.startswith(".") for part in rel):  # .hydra, .submitit, hidden scratch folders
                continue
            found.add(s.parent)
    return sorted(found, key=_run_sort_key)


def _run_sort_key(p: Path):
    return (str(p.parent), int(p.name) if p.name.isdigit() else -1, p.name)


def _study_of(run: Path) -> Path:
    for d in (run.parent, run.parent.parent):
        if (d / "multirun.yaml").is_file():
            return d
    return run


def _overrides(run: Path) -> list[str]:
    f = run / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    got = yaml.safe_load(f.read_text()) or []
    return [str(x) for x in got]


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` → (key, value parsed as YAML); ``+``/``++``/``~`` prefixes are dropped."""
    key, _, value = text.partition("=")
    key = key.lstrip("+~")
    try:
        v = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        v = value
    if isinstance(v, (list, dict)):
        v = json.dumps(v)
    return key, v


def _flatten(d, prefix: str) -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
    elif isinstance(d, list):
        out[prefix] = json.dumps(d)
    else:
        out[prefix] = d
    return out


def _packaged_policy_defaults(name: str) -> dict:
    try:
        from importlib import resources
        f = resources.files("specbatch.conf") / "policy" / f"{name}.yaml"
        return yaml.safe_load(f.read_text()) or {} if f.is_file() else {}
    except Exception:
        return {}


def policy_label(policy_cfg: dict) -> str:
    """``none``, ``fixed γ=2``, ``adaptive``, ``adaptive context=512``: the name, plus γ and the parameters
    that differ from the packaged ``conf/policy/<name>.yaml``."""
    policy_cfg = dict(policy_cfg or {})
    name = str(policy_cfg.pop("name", "?"))
    defaults = _packaged_policy_defaults(name)
    parts = []
    for k, v in policy_cfg.items():
        if v is None or (k != "gamma" and k in defaults and defaults[k] == v):
            continue
        parts.append(f"γ={v}" if k == "gamma" else f"{k}={v}")
    return " ".join([name, *parts])


def _profile_info(cfg: dict, summary: dict) -> tuple[str | None, str]:
    """(resolved profile folder or None, 'draft → target' pair label)."""
    try:
        from specbatch.sim.run import resolve_profile
        d = resolve_profile(cfg.get("profile"))
        meta = json.loads((Path(d) / "meta.json").read_text())
        models = meta.get("models", {})
        pair = f"{models.get('draft', {}).get('name', '?')} → {models.get('target', {}).get('name', '?')}"
        return str(Path(d).resolve()), pair
    except Exception:  # the profile moved or was deleted: the table still holds the run
        return None, str(summary.get("profile", "?"))


def read_run(run: Path) -> dict:
    """One row of the table for the run folder ``run``."""
    run = Path(run).resolve()
    summary = json.loads((run / SUMMARY).read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    ovs = _overrides(run)
    study = _study_of(run)
    row: dict = {"run_dir": str(run), "study": str(study), "job": int(run.name) if run.name.isdigit() and study != run else -1,
                 "overrides": " ".join(ovs)}
    for k, v in summary.items():
        row[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
    for o in ovs:
        k, v = parse_override(o)
        row[f"sweep.{k}"] = v
    row.update(_flatten(cfg, "cfg"))
    row["policy_label"] = policy_label(cfg.get("policy", {"name": summary.get("policy")}))
    load = (cfg.get("workload") or {}).get("load")
    row["load"] = float(load) if load is not None and (cfg.get("workload") or {}).get("rate") is None else None
    row["profile_dir"], row["pair"] = _profile_info(cfg, summary)
    row["scenario"] = f"{summary.get('workload')} · {row['pair']} · {summary.get('profile')}"
    return row


def _tidy_types(df: pd.DataFrame) -> pd.DataFrame:
    """Parquet needs one type per column: object columns holding mixed types become text."""
    for c in df.columns:
        if df[c].dtype != object:
            continue
        kinds = {type(v) for v in df[c].dropna()}
        if len(kinds) > 1 and not kinds <= {int, float}:
            df[c] = df[c].map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v))
        elif kinds <= {int, float} and kinds:
            df[c] = pd.to_numeric(df[c])
    return df


def collect(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """The tidy table (one row per complete run) of every run under ``paths``."""
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no complete run (a folder with {SUMMARY}) under {list(map(str, paths))}")
    df = pd.DataFrame([read_run(r) for r in runs])
    first = ["study", "job", "run_dir", "scenario", "workload", "pair", "profile", "policy_label", "load"]
    sweep = sorted(c for c in df.columns if c.startswith("sweep."))
    cfgc = sorted(c for c in df.columns if c.startswith("cfg."))
    rest = [c for c in df.columns if c not in first and c not in sweep and c not in cfgc]
    return _tidy_types(df[first + sweep + rest + cfgc].reset_index(drop=True))


def swept_keys(df: pd.DataFrame) -> list[str]:
    """The ``sweep.*`` columns whose value differs between runs."""
    return [c for c in df.columns if c.startswith("sweep.") and df[c].astype(str).nunique(dropna=False) > 1]


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the table as Parquet (atomically)."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
