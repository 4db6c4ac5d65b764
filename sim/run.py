"""From a resolved config to a finished run: build the workload, cost model, policy and cluster,
simulate, and write the outputs. The hydra app (:mod:`specbatch.sim.cli`) and the studies call :func:`run`.

Outputs of a run (written atomically into ``out_dir``; ``summary.json`` last, so its presence marks a
complete run):

``requests.parquet``   one row per request (:meth:`specbatch.sim.requests.RequestTable.frame`)
``iterations.parquet`` one row per replica iteration (:data:`specbatch.sim.iterations.ITERATION_COLUMNS`)
``policy.json``        the policy's description (for ``adaptive``: its batch → γ table)
``workload.json``      the replayed workload's statistics and any skipped-row notes
``config.yaml``        the resolved config
``summary.json``       the summary metrics (:func:`specbatch.sim.metrics.summarize`)
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from specbatch import profiles_dir, traces_dir

from . import workload as wl
from .acceptance import AcceptanceModel
from .config import ConfigError, WorkloadConfigError, checked, cluster_config, config_number, drafter_config, one_line
from .capacity import estimate_capacity, rate_for_load
from .cluster import ClusterConfig, SimResult, simulate
from .cost_model import CostModel
from .metrics import summarize
from .policies import Policy, make_policy
from .profile import Profile, ProfileError, atomic_write, atomic_write_text, load_profile


def resolve_path(path: str, what: str) -> Path:
    """An absolute path, a path relative to the working directory, or one relative to the shipped traces."""
    p = Path(os.path.expanduser(str(path)))
    if p.exists():
        return p
    shipped = traces_dir() / p
    if not p.is_absolute() and shipped.exists():
        return shipped
    raise ConfigError(f"{what}: {path!r} not found (looked in {Path.cwd()} and {traces_dir()})")


def default_profile_dir() -> Path:
    """The shipped default profile: the newest measured CUDA profile if any, else the newest measured one."""
    root = profiles_dir()
    found = []
    for meta in sorted(root.glob("*/meta.json")):
        try:
            m = json.loads(meta.read_text())
        except json.JSONDecodeError:
            continue
        if m.get("source") == "measured":
            found.append((m.get("device", {}).get("kind") == "cuda", str(m.get("date", "")), meta.parent))
    if not found:
        raise ConfigError(f"profile: no measured profile shipped in {root}; pass profile=<folder>")
    return max(found)[2]


def resolve_profile(name: str) -> Path:
    """``default``, a shipped profile name, or a folder path."""
    if name in (None, "", "default"):
        return default_profile_dir()
    if (profiles_dir() / name / "meta.json").exists():
        return profiles_dir() / name
    return resolve_path(name, "profile")


def build_acceptance(cfg: DictConfig, profile: Profile, max_gamma: int, w: wl.Workload) -> AcceptanceModel:
    """The acceptance model of a checked config (:func:`specbatch.sim.config.checked`): the ``acceptance``
    group, with the drafter's per-position rates (``drafter.positions``) in place of ``acceptance.alpha`` when
    set, and its ``match_rate``."""
    a = cfg.acceptance
    drafter = drafter_config(cfg.drafter)
    class_alpha = {}
    for cname, alpha in a.class_alpha.items():
        if cname not in w.class_names:
            raise ConfigError(f"acceptance.class_alpha: class {cname!r} not in the workload's classes "
                              f"{list(w.class_names)} (set workload.class_column)")
        class_alpha[w.class_names.index(cname)] = float(alpha)
    try:
        if drafter.positions is not None:
            return AcceptanceModel(positions=list(drafter.positions), concentration=a.concentration,
                                   class_alpha=class_alpha, drift_per_hour=a.drift_per_hour, max_gamma=max_gamma,
                                   match_rate=drafter.match_rate)
        if a.source == "profile":
            pos = profile.per_position_alpha
            if pos is None:
                raise ConfigError(f"acceptance.source=profile but {profile.path} has no acceptance.csv")
            return AcceptanceModel(positions=pos, concentration=a.concentration, class_alpha=class_alpha,
                                   drift_per_hour=a.drift_per_hour, max_gamma=max_gamma)
        return AcceptanceModel(alpha=float(a.alpha), concentration=a.concentration, class_alpha=class_alpha,
                               drift_per_hour=a.drift_per_hour, max_gamma=max_gamma)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def load_workload(cfg: DictConfig) -> wl.Workload:
    """The workload of a checked config before any rate/load rescaling (which needs the cost model)."""
    c = cfg.workload
    if c.kind == "trace":
        w = wl.load_trace(resolve_path(c.path, "workload.path"), dict(c.columns), c.time_unit, c.format,
                          c.on_bad_rows, c.sort, c.class_column)
        if c.start_s is not None or c.end_s is not None:
            w = wl.window(w, c.start_s, c.end_s)
        if c.first_n is not None:
            w = wl.first_n(w, int(c.first_n))
    else:
        lengths_from = None
        lc = c.lengths
        if lc.source == "trace":
            lengths_from = wl.load_trace(resolve_path(lc.path, "workload.lengths.path"), dict(lc.columns), lc.time_unit)
        w = wl.synthetic(int(c.n), 1.0, c.process, float(c.cv), lengths_from,
                         (lc.prompt_median, lc.prompt_sigma), (lc.output_median, lc.output_sigma),
                         seed=int(cfg.seed), name=f"synthetic-{c.process}")
        if c.classes:
            w = assign_classes(w, dict(c.classes), int(cfg.seed))
    return wl.cap_lengths(w, c.max_prompt, c.max_output)


def preset_workload(spec: str, overrides: list[str] = ()) -> wl.Workload:
    """The workload of a workload preset (``conf/workload/<spec>.yaml``) or of a trace file (``spec`` a path, read
    as ``workload=trace workload.path=<spec>``), loaded as ``specbatch-sim`` loads it (:func:`load_workload`, the
    same schema and checks); ``overrides`` are hydra overrides of ``workload.*`` (e.g. ``workload.first_n=null``).
    No rate or load is applied."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from specbatch import conf_dir

    preset = (conf_dir() / "workload" / f"{spec}.yaml").is_file()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="specbatch.conf", version_base=None):
            cfg = compose(config_name="config", overrides=[f"workload={spec if preset else 'trace'}", *overrides])
    except Exception as e:  # hydra's composition errors: a bad override
        raise ConfigError(one_line(str(e))) from None
    finally:
        GlobalHydra.instance().clear()
    if not preset:
        OmegaConf.update(cfg, "workload.path", str(spec), merge=False)
    return load_workload(checked(cfg))


def assign_classes(w: wl.Workload, classes: dict, seed: int) -> wl.Workload:
    """Give each request a class drawn at random with the given fractions (``workload.classes``:
    class name → fraction), for class-dependent acceptance (``acceptance.class_alpha``)."""
    names = [str(k) for k in classes]
    try:
        frac = np.array([float(classes[k]) for k in classes])
    except (TypeError, ValueError):
        raise ConfigError(f"workload.classes is {classes!r}; expected class name -> positive fraction") from None
    if not len(frac) or not (frac > 0).all():
        raise ConfigError(f"workload.classes is {classes!r}; expected class name -> positive fraction")
    rc = np.random.default_rng([seed, 1]).choice(len(names), len(w), p=frac / frac.sum())
    return replace(w, request_class=rc.astype(np.int64), class_names=tuple(names))


def apply_rate(cfg: DictConfig, w: wl.Workload, cost: CostModel, cluster: ClusterConfig) -> tuple[wl.Workload, dict]:
    """Apply ``time_scale``, then ``rate`` or ``load`` (a fraction of the estimated capacity)."""
    c = cfg.workload
    info = {}
    if c.time_scale is not None:
        w = wl.scale_time(w, float(c.time_scale))
    if c.load is not None or c.kind == "synthetic":
        cap = estimate_capacity(cost, w, cluster)
        info["capacity_req_s"] = cap
    if c.rate is not None:
        w = wl.set_rate(w, float(c.rate), "workload.rate")
    elif c.load is not None:
        w = wl.set_rate(w, rate_for_load(cost, w, cluster, float(c.load), capacity=cap), "workload.load")
    return w, info


@dataclass
class Run:
    """A finished run: its inputs and outputs."""

    result: SimResult
    summary: dict
    workload: wl.Workload
    policy: Policy
    profile: Profile


def build_cluster(cfg: DictConfig) -> ClusterConfig:
    return cluster_config(cfg.cluster)


def check_policy_params(name: str, params: dict, max_gamma: int) -> None:
    """Range checks on the common policy keys that the policy classes would only trip over mid-run."""
    for key in ("gamma", "max_gamma"):
        if params.get(key) is not None:
            config_number(params[key], f"policy.{key}", int, minimum=0)
            if int(params[key]) > max_gamma:
                raise ConfigError(f"policy.{key} is {params[key]!r} but max_gamma is {max_gamma}; the simulator's "
                                  f"tables stop at max_gamma: set max_gamma={int(params[key])} or lower policy.{key}")
    if params.get("context") is not None:
        config_number(params["context"], "policy.context", minimum=0.0, strict=True)


def run(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> Run:
    """Simulate the configured run; write its outputs to ``out_dir`` when given.

    Every config value is checked before the (possibly long) simulation starts: a bad one raises
    :class:`ConfigError` naming its key (:func:`specbatch.sim.config.checked`); missing keys take the schema's
    defaults, and the outputs' ``config.yaml`` holds the full checked config."""
    cfg = checked(cfg)
    max_gamma, seed = int(cfg.max_gamma), int(cfg.seed)
    slo_ttft, slo_tpot = float(cfg.slo.ttft_s), float(cfg.slo.tpot_s)
    cluster = build_cluster(cfg)
    profile = load_profile(resolve_profile(cfg.profile))
    drafter = drafter_config(cfg.drafter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_lookup_window(drafter, profile)
        cost = CostModel(profile, max_batch=cluster.max_batch, max_gamma=max_gamma, drafter=drafter)
        w = load_workload(cfg)
        w, rate_info = apply_rate(cfg, w, cost, cluster)
        acceptance = build_acceptance(cfg, profile, max_gamma, w)
        params = {k: v for k, v in OmegaConf.to_container(cfg.policy, resolve=True).items() if k != "name"}
        try:
            policy = make_policy(cfg.policy.name, **params)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_policy_params(cfg.policy.name, params, max_gamma)
        for model in ("target", "draft") if policy.uses_draft and drafter.prefill else ("target",):
            if not cost.has_prefill(model):
                raise ProfileError(f"{profile.path}/steps.csv: no ok prefill rows for model={model} at batch 1; "
                                   f"policy {cfg.policy.name!r} needs the {model} prefill time")
        result = simulate(w, cost, policy, acceptance, cluster, seed=seed)
    for wmsg in caught:  # re-emit once each (the cost model warns once per kind of extrapolation)
        warnings.warn(wmsg.message, wmsg.category, stacklevel=2)
    summary = summarize(result, slo_ttft, slo_tpot)
    summary.update({"policy": cfg.policy.name, "profile": profile.name, "workload": w.name,
                    "arrival_rate_req_s": w.rate, **rate_info})
    r = Run(result, summary, w, policy, profile)
    if out_dir is not None:
        write_outputs(r, cfg, Path(out_dir))
    return r


def check_lookup_window(drafter, profile: Profile) -> None:
    """Warn when an ngram drafter's n-gram window differs from the one the profile's ngram rows were timed with
    (``meta.json`` ``models.ngram.prompt_lookup_min``/``prompt_lookup_max``): the proposer's CPU time depends on it."""
    if drafter.kind != "ngram" or not isinstance(profile.meta["models"].get("ngram"), dict):
        return
    timed = profile.meta["models"]["ngram"]
    for key in ("prompt_lookup_min", "prompt_lookup_max"):
        ours, theirs = getattr(drafter, key), timed.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            warnings.warn(f"drafter.{key} is {ours} but {profile.path}/meta.json times the ngram proposer with "
                          f"{key}={theirs}; its CPU time is charged as measured", UserWarning, stacklevel=2)


def _atomic_parquet(df, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def finite_json(obj):
    """``obj`` with every NaN or infinite float as None (JSON null): the outputs are strict JSON."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _json(obj) -> str:
    def default(o):
        if isinstance(o, np.ndarray):
            return finite_json(o.tolist())
        raise TypeError(f"not JSON serialisable: {type(o)}")
    return json.dumps(finite_json(obj), indent=2, default=default, allow_nan=False) + "\n"


OUTPUT_FILES = ("requests.parquet", "iterations.parquet", "policy.json", "workload.json", "config.yaml", "summary.json")


def write_outputs(r: Run, cfg: DictConfig, out: Path) -> None:
    """Write the run's outputs, each atomically (temporary file + rename), ``summary.json`` last: a folder
    with a ``summary.json`` holds a complete run; a run killed or failing mid-write leaves none."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # a rerun is incomplete until its summary lands
    for name in OUTPUT_FILES:  # temporaries of a run killed mid-write (never read as outputs)
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    _atomic_parquet(r.result.requests, out / "requests.parquet")
    if cfg.save_iterations:
        _atomic_parquet(r.result.iterations, out / "iterations.parquet")
    atomic_write_text(out / "policy.json", _json(r.result.policy))
    atomic_write_text(out / "workload.json", _json({**r.workload.describe(), "notes": list(r.workload.notes)}))
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_text(out / "summary.json", _json(r.summary))


__all__ = ["run", "Run", "ConfigError", "ProfileError", "resolve_profile", "load_workload", "preset_workload",
           "write_outputs", "config_number", "WorkloadConfigError"]
