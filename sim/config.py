"""The one schema of ``specbatch-sim``'s config: hydra structured configs (dataclasses in hydra's ConfigStore).

Each default lives here, once: the yaml files under ``conf/`` keep only what differs from it (a workload
preset's trace path and columns, a policy's parameters). :func:`checked` validates a whole config once,
before anything is loaded, and raises :class:`ConfigError` with one line naming the key, the value and what
was expected, e.g. ``cluster.watermark is 'x'; expected a fraction in [0, 1)``.

The schema's fields are typed ``Any`` on purpose: OmegaConf's own conversions are looser than the checks
below (it reads ``yes`` as true, ``inf`` as a number) and its messages span several lines; the checks here
are the types. Dict fields (``acceptance.class_alpha``, ``workload.classes``, ``workload.columns``) are open,
so a whole dict can be given on the command line (``acceptance.class_alpha='{chat: 0.45, code: 0.9}'``).

Schemas in the ConfigStore (registered on import; ``conf/__init__.py`` imports this module):

* ``specbatch_schema`` — the root (:class:`SimConfig`), first in ``conf/config.yaml``'s defaults list;
* ``schema/workload/trace`` and ``schema/workload/synthetic`` — the two kinds of workload, named by each
  workload preset's defaults list (``/schema/workload/trace@_here_``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .cluster import ClusterConfig
from .workload import TIME_UNIT_CHOICES, WorkloadError


class ConfigError(ValueError):
    """A config value is missing or out of range; the message names the key."""


class WorkloadConfigError(ConfigError, WorkloadError):
    """A ``workload.*`` config value is bad (both a :class:`ConfigError` and a :class:`WorkloadError`)."""


# --- the schema ----------------------------------------------------------------------------------------------

AZURE_COLUMNS = {"arrival": "TIMESTAMP", "prompt": "ContextTokens", "output": "GeneratedTokens"}
AZURE_CONV = "azure/AzureLLMInferenceTrace_conv.csv"


@dataclass
class WorkloadBase:
    """Keys of every workload. Transforms apply in this order: window, first_n (traces), length caps,
    time_scale, then rate or load."""

    kind: Any = MISSING       # trace | synthetic
    max_prompt: Any = None    # clip prompt lengths (tokens)
    max_output: Any = None    # clip output lengths (tokens)
    time_scale: Any = None    # multiply the arrival rate by this factor (compress time)
    rate: Any = None          # set the mean arrival rate (requests/s) ...
    load: Any = None          # ... or set it to this fraction of the cluster's estimated no-speculation capacity


@dataclass
class TraceWorkload(WorkloadBase):
    """A request trace file (CSV, JSON lines or Parquet; ``.gz``/``.bz2``/``.zip``/``.xz``/``.zst`` compressed too)."""

    kind: Any = "trace"
    path: Any = MISSING       # absolute, relative to the working directory, or to traces/
    format: Any = "auto"      # csv | jsonl | parquet | auto (by suffix)
    columns: Dict[str, Any] = field(default_factory=lambda: {"arrival": "arrival", "prompt": "prompt",
                                                             "output": "output"})
    time_unit: Any = "auto"   # auto | s | ms | datetime
    sort: Any = False         # true: sort rows by arrival instead of failing on unsorted input
    on_bad_rows: Any = "error"  # error | skip (skipped rows are counted in workload.json)
    class_column: Any = None  # optional column with a request class, for class-dependent acceptance
    start_s: Any = None       # keep requests arriving in [start_s, end_s) seconds after the first
    end_s: Any = None
    first_n: Any = None       # keep the first N requests (null: all)


@dataclass
class Lengths:
    """Where a synthetic workload's (prompt, output) lengths come from."""

    source: Any = "trace"     # trace (resample (prompt, output) pairs) | lognormal
    path: Any = AZURE_CONV
    columns: Dict[str, Any] = field(default_factory=lambda: dict(AZURE_COLUMNS))
    time_unit: Any = "datetime"
    prompt_median: Any = 512  # lognormal only (tokens)
    prompt_sigma: Any = 1.0
    output_median: Any = 128
    output_sigma: Any = 1.0


@dataclass
class SyntheticWorkload(WorkloadBase):
    """Poisson or Gamma arrivals with lengths from a trace or lognormals."""

    kind: Any = "synthetic"
    n: Any = 1000             # requests
    process: Any = "poisson"  # poisson | gamma
    cv: Any = 1.0             # coefficient of variation of inter-arrival times (gamma only)
    classes: Optional[Dict[str, Any]] = None  # class name -> fraction of requests
    lengths: Lengths = field(default_factory=Lengths)


WORKLOAD_KINDS = {"trace": TraceWorkload, "synthetic": SyntheticWorkload}


@dataclass
class Acceptance:
    source: Any = "scalar"    # scalar (use alpha) | profile (per-position rates from the profile's acceptance.csv)
    alpha: Any = 0.7          # conditional probability that a draft token is accepted
    concentration: Any = None  # Beta concentration of per-request acceptance; null = all requests alike
    class_alpha: Dict[str, Any] = field(default_factory=dict)  # request class name -> mean alpha
    drift_per_hour: Any = 0.0  # linear drift of alpha with arrival time (per hour)


@dataclass
class Drafter:
    """``drafter.*``: what proposes draft tokens (sim/drafters.py). Each kind's documented defaults are in
    ``conf/drafter/<kind>.yaml``; these schema defaults are ``draft_model``'s."""

    kind: Any = "draft_model"  # draft_model | eagle | ngram
    positions: Any = None     # per-position acceptance rates of the drafter; null: the acceptance group's
    match_rate: Any = 1.0     # ngram: probability that a sequence's lookup finds a match in an iteration
    prompt_lookup_min: Any = None  # ngram: smallest n-gram window (tokens)
    prompt_lookup_max: Any = None  # ngram: largest n-gram window (tokens)


# The cluster keys and their defaults are ClusterConfig's (sim/cluster.py): one place for both.
Cluster = dataclasses.make_dataclass(
    "Cluster", [(f.name, Any, field(default=f.default)) for f in dataclasses.fields(ClusterConfig)])


@dataclass
class SLO:
    ttft_s: Any = 10.0
    tpot_s: Any = 0.5


@dataclass
class SimConfig:
    workload: Any = MISSING   # a workload preset (conf/workload/<name>.yaml) on a WORKLOAD_KINDS schema
    policy: Any = MISSING     # a policy (conf/policy/<name>.yaml): name + the policy's parameters
    cluster: Cluster = field(default_factory=Cluster)
    acceptance: Acceptance = field(default_factory=Acceptance)
    drafter: Drafter = field(default_factory=Drafter)
    profile: Any = "default"  # "default", a name under traces/profiles/, or a folder path
    max_gamma: Any = 8        # largest speculation length any policy may pick
    seed: Any = 0
    slo: SLO = field(default_factory=SLO)
    save_iterations: Any = True  # write iterations.parquet
    print_summary: Any = True
    study: Any = None         # set by +study=<name> (conf/study)


def _open_dicts(node: DictConfig, paths: tuple[str, ...]) -> DictConfig:
    for p in paths:
        OmegaConf.set_struct(OmegaConf.select(node, p), False)
    return node


def _schema(cls) -> DictConfig:
    """``cls`` as a config whose dict fields take new keys under hydra's struct mode."""
    node = OmegaConf.structured(cls)
    opens = {SimConfig: ("acceptance.class_alpha",), TraceWorkload: ("columns",),
             SyntheticWorkload: ("lengths.columns",), Acceptance: ("class_alpha",)}.get(cls, ())
    return _open_dicts(node, opens)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="specbatch_schema", node=_schema(SimConfig))
    for kind, cls in WORKLOAD_KINDS.items():
        cs.store(group="schema/workload", name=kind, node=_schema(cls))


register()


# --- checks --------------------------------------------------------------------------------------------------


def config_number(value, key: str, kind=float, minimum: float | None = None, strict: bool = False,
                  maximum: float | None = None, error=None) -> float | int:
    """``value`` (config key ``key``) as ``kind`` (float or int) within the bounds, else a :class:`ConfigError`
    naming the key, the value and what was expected. ``strict`` makes ``minimum`` exclusive. Booleans, NaN and
    infinities are never numbers here."""
    error = error or ConfigError
    lo = "" if minimum is None else (f" > {minimum:g}" if strict else f" ≥ {minimum:g}")
    hi = "" if maximum is None else f" ≤ {maximum:g}"
    expected = f"{'an integer' if kind is int else 'a number'}{lo}{' and' if lo and hi else ''}{hi}"
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        v = float(value)
        if not math.isfinite(v):
            raise ValueError
        if kind is int:
            if isinstance(value, str) or v != int(v):
                raise ValueError
            v = int(v)
    except (TypeError, ValueError, OverflowError):
        raise error(f"{key} is {value!r}; expected {expected}") from None
    if (minimum is not None and (v <= minimum if strict else v < minimum)) or (maximum is not None and v > maximum):
        raise error(f"{key} is {value!r}; expected {expected}")
    return v


def _optional(value, key, check, what: str, error=ConfigError):
    """None, or ``check(value)``; a failing check says ``expected <what> or null``."""
    if value is None:
        return None
    try:
        return check(value)
    except ConfigError:
        raise error(f"{key} is {value!r}; expected {what} or null") from None


def _bool(value, key, error=ConfigError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{key} is {value!r}; expected true or false")
    return value


def _choice(value, key, choices, error=ConfigError) -> str:
    if not isinstance(value, str) or value not in choices:
        raise error(f"{key} is {value!r}; expected one of {list(choices)}")
    return value


def _text(value, key, what: str, error=ConfigError) -> str:
    if not isinstance(value, str) or not value.strip():
        raise error(f"{key} is {value!r}; expected {what}")
    return value


def _keys(cfg, cls, prefix: str) -> None:
    """Every key of ``cfg`` is a field of ``cls`` (recursively for dataclass fields); MISSING ones are set."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    for k in cfg.keys():
        if k not in names:
            raise ConfigError(f"{prefix}{k} is not a config key; expected one of {sorted(names)}")
    for name, f in names.items():
        if name in cfg and dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            sub = cfg[name]
            if sub is not None and not isinstance(sub, (dict, DictConfig)):
                raise ConfigError(f"{prefix}{name} is {sub!r}; expected a mapping of keys {sorted(_field_names(f.type))}")
            if sub is not None:
                _keys(sub, f.type, f"{prefix}{name}.")


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _dataclass_fields_resolved(cls):
    """Field types resolved (``from __future__ import annotations`` leaves them as strings)."""
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]


for _cls in (WorkloadBase, TraceWorkload, Lengths, SyntheticWorkload, Acceptance, Drafter, SLO, SimConfig):
    _dataclass_fields_resolved(_cls)


def _mapping(value, key, error=ConfigError) -> dict:
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, dict):
        raise error(f"{key} is {value!r}; expected a mapping")
    return value


def checked(cfg) -> DictConfig:
    """``cfg`` (a composed config, a partial DictConfig or a plain dict) on the schema, every value checked.

    Missing keys take the schema's defaults; an unknown key, a wrong type or an out-of-range value raises
    :class:`ConfigError` naming the key (``workload.*`` keys: :class:`WorkloadConfigError`)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(one_line(str(e))) from None
    if plain.get("workload") is None:
        raise ConfigError("workload is not set; expected a workload preset (e.g. workload=azure_conv or "
                          "workload=trace workload.path=<file>)")
    if plain.get("policy") is None:
        raise ConfigError("policy is not set; expected a policy (e.g. policy=adaptive)")
    workload, policy = plain.pop("workload"), plain.pop("policy")
    _keys(plain, SimConfig, "")
    if not isinstance(workload, dict):
        raise ConfigError(f"workload is {workload!r}; expected a workload preset (e.g. workload=azure_conv)")
    if not isinstance(policy, dict) or not isinstance(policy.get("name"), str):
        raise ConfigError(f"policy is {policy!r}; expected a policy with a name (e.g. policy=adaptive)")
    kind = workload.get("kind", "trace")
    if kind not in WORKLOAD_KINDS:
        raise WorkloadConfigError(f"workload.kind is {kind!r}; expected 'trace' or 'synthetic'")
    wcls = WORKLOAD_KINDS[kind]
    try:
        _keys(workload, wcls, "workload.")
    except ConfigError as e:
        raise WorkloadConfigError(f"{e} (keys of a {kind} workload)") from None
    out = OmegaConf.merge(_schema(SimConfig), plain)
    wnode = OmegaConf.merge(_schema(wcls), workload)
    OmegaConf.set_struct(out, False)
    out.workload = wnode
    out.policy = policy
    _check(out)
    return out


def one_line(text: str) -> str:
    """An OmegaConf/hydra message (several lines, with full_key/object_type details) as one line."""
    keep = [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith(("full_key:", "object_type", "reference_type",
                                                          "Set the environment variable HYDRA_FULL_ERROR"))]
    return "; ".join(keep)


def _check(c: DictConfig) -> None:
    """Every value of a config on the schema (:func:`checked`)."""
    _text(c.profile, "profile", "a profile name or folder")
    config_number(c.max_gamma, "max_gamma", int, minimum=0)
    config_number(c.seed, "seed", int, minimum=0)
    config_number(c.slo.ttft_s, "slo.ttft_s", minimum=0.0, strict=True)
    config_number(c.slo.tpot_s, "slo.tpot_s", minimum=0.0, strict=True)
    _bool(c.save_iterations, "save_iterations")
    _bool(c.print_summary, "print_summary")
    _check_acceptance(c.acceptance)
    drafter_config(c.drafter, c.acceptance)
    cluster_config(c.cluster)
    if c.workload.kind == "trace":
        _check_trace(c.workload)
    else:
        _check_synthetic(c.workload)
    _check_rate(c.workload)


def cluster_config(c) -> ClusterConfig:
    """``cluster.*`` as a checked :class:`ClusterConfig` (its ``validate`` holds the checks)."""
    cl = ClusterConfig(**OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c)
    try:
        cl.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cl


def _probability(value, key) -> float:
    try:
        return config_number(value, key, minimum=0.0, maximum=1.0)
    except ConfigError:
        raise ConfigError(f"{key} is {value!r}; expected a probability in [0, 1]") from None


def drafter_config(d, acceptance=None):
    """``drafter.*`` as a checked :class:`specbatch.sim.drafters.Drafter`; with ``acceptance``, also refuses
    ``acceptance.source=profile`` beside drafter positions (the profile's acceptance.csv is the draft model's)."""
    from .drafters import DRAFTER_KINDS, Drafter as DrafterSpec

    _choice(d.kind, "drafter.kind", DRAFTER_KINDS)
    positions = d.positions
    if positions is not None:
        if isinstance(positions, (int, float)) and not isinstance(positions, bool):
            positions = [positions]
        positions = OmegaConf.to_container(positions) if isinstance(positions, (DictConfig,)) or \
            OmegaConf.is_list(positions) else positions
        if not isinstance(positions, (list, tuple)) or not positions:
            raise ConfigError(f"drafter.positions is {d.positions!r}; expected a list of probabilities in [0, 1] or null")
        positions = tuple(_probability(a, f"drafter.positions[{i}]") for i, a in enumerate(positions))
    match = config_number(d.match_rate, "drafter.match_rate", minimum=0.0, strict=True, maximum=1.0)
    lo = _optional(d.prompt_lookup_min, "drafter.prompt_lookup_min",
                   lambda v: config_number(v, "drafter.prompt_lookup_min", int, minimum=1), "an integer ≥ 1")
    hi = _optional(d.prompt_lookup_max, "drafter.prompt_lookup_max",
                   lambda v: config_number(v, "drafter.prompt_lookup_max", int, minimum=1), "an integer ≥ 1")
    if acceptance is not None and positions is not None and acceptance.source == "profile":
        raise ConfigError(f"acceptance.source is 'profile' but drafter.positions is {list(positions)}: the profile's "
                          "acceptance.csv measures the draft model; set drafter.positions=null to use it, or "
                          "acceptance.source=scalar")
    try:
        return DrafterSpec(kind=d.kind, positions=positions, match_rate=match, prompt_lookup_min=lo,
                           prompt_lookup_max=hi)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_acceptance(a) -> None:
    _choice(a.source, "acceptance.source", ("scalar", "profile"))
    if a.source == "scalar":
        _probability(a.alpha, "acceptance.alpha")
    if a.concentration is not None:
        config_number(a.concentration, "acceptance.concentration", minimum=0.0, strict=True)
    config_number(a.drift_per_hour, "acceptance.drift_per_hour")
    for name, alpha in _mapping(a.class_alpha, "acceptance.class_alpha").items():
        _probability(alpha, f"acceptance.class_alpha.{name}")


W = WorkloadConfigError


def _tokens(value, key) -> int | None:
    return _optional(value, key, lambda v: config_number(v, key, int, minimum=1), "a positive integer token count",
                     error=W)


def _columns(value, key) -> None:
    cols = _mapping(value, key, error=W)
    for k, v in cols.items():
        if k not in ("arrival", "prompt", "output"):
            raise W(f"{key}.{k} is not a column key; expected keys ['arrival', 'prompt', 'output']")
        _text(v, f"{key}.{k}", "a column name (text)", error=W)


def _check_trace(w) -> None:
    if OmegaConf.is_missing(w, "path") or w.path is None:
        raise W("workload.path is not set; expected a trace file (workload=trace workload.path=<file>)")
    _text(w.path, "workload.path", "a trace file path", error=W)
    _choice(w.format, "workload.format", ("auto", "csv", "jsonl", "parquet"), error=W)
    _columns(w.columns, "workload.columns")
    _choice(w.time_unit, "workload.time_unit", TIME_UNIT_CHOICES, error=W)
    _bool(w.sort, "workload.sort", error=W)
    _choice(w.on_bad_rows, "workload.on_bad_rows", ("error", "skip"), error=W)
    if w.class_column is not None:
        _text(w.class_column, "workload.class_column", "a column name or null", error=W)
    for k in ("start_s", "end_s"):
        _optional(w[k], f"workload.{k}", lambda v, k=k: config_number(v, k), "a time in seconds", error=W)
    if w.first_n is not None:
        try:
            config_number(w.first_n, "workload.first_n", int, minimum=1)
        except ConfigError:
            raise W(f"workload.first_n is {w.first_n!r}; expected at least 1 (a whole number of requests) "
                    "or null") from None


def _check_synthetic(w) -> None:
    config_number(w.n, "workload.n", int, minimum=1, error=W)
    _choice(w.process, "workload.process", ("poisson", "gamma"), error=W)
    config_number(w.cv, "workload.cv", minimum=0.0, strict=True, error=W)
    if w.classes is not None:
        classes = _mapping(w.classes, "workload.classes", error=W)
        if not classes:
            raise W("workload.classes is {}; expected class name -> positive fraction, or null")
        for name, frac in classes.items():
            config_number(frac, f"workload.classes.{name}", minimum=0.0, strict=True, error=W)
    lc = w.lengths
    _choice(lc.source, "workload.lengths.source", ("trace", "lognormal"), error=W)
    if lc.source == "trace":
        _text(lc.path, "workload.lengths.path", "a trace file path", error=W)
        _columns(lc.columns, "workload.lengths.columns")
        _choice(lc.time_unit, "workload.lengths.time_unit", TIME_UNIT_CHOICES, error=W)
    else:
        for k in ("prompt_median", "output_median"):
            config_number(lc[k], f"workload.lengths.{k}", minimum=1.0, error=W)
        for k in ("prompt_sigma", "output_sigma"):
            config_number(lc[k], f"workload.lengths.{k}", minimum=0.0, error=W)


def _check_rate(w) -> None:
    _tokens(w.max_prompt, "workload.max_prompt")
    _tokens(w.max_output, "workload.max_output")
    if w.time_scale is not None:
        v = config_number(w.time_scale, "workload.time_scale", error=W)
        if not v > 0:
            raise W(f"workload.time_scale is {float(v)}; expected a positive factor")
    if w.rate is not None:
        config_number(w.rate, "workload.rate", error=W)  # positive: wl.set_rate says so
    if w.load is not None:
        try:
            config_number(w.load, "workload.load", minimum=0.0, strict=True)
        except ConfigError:
            raise W(f"workload.load is {w.load!r}; expected a positive fraction of capacity or null") from None
    if w.rate is not None and w.load is not None:
        raise W("workload.rate and workload.load are both set; set one of them (the other to null)")
    if w.kind == "synthetic" and w.rate is None and w.load is None:
        raise W("a synthetic workload needs workload.rate or workload.load")
