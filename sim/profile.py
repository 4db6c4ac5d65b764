"""The cost-profile format: the contract between the profiler (writer) and the simulator (reader).

A profile is a folder ``traces/profiles/<name>/`` holding

``meta.json``
    ``schema_version`` (int, :data:`SCHEMA_VERSION`), ``source`` (``measured`` | ``analytical``),
    ``device`` ({name, kind (cuda|cpu), memory_bytes, kv_cache_bytes, threads}), ``dtype``,
    ``libraries`` ({torch, transformers, ...}), ``date`` (ISO 8601), ``models`` ({target, draft}: each
    {name, config, parameters, kv_bytes_per_token}), ``timing`` ({method, cache, warmup, ...}).
``steps.csv``
    one row per measured point, columns :data:`STEP_COLUMNS`:
    ``model`` (target|draft), ``phase`` (decode|verify|prefill), ``batch`` (sequences),
    ``tokens`` (new tokens per sequence: 1 for decode, γ+1 for verify, the prompt length for prefill),
    ``context`` (KV-cache length in tokens before the step), ``median_s``, ``p10_s``, ``p90_s`` (seconds),
    ``samples`` (timed repeats), ``status`` (ok|oom|error).
``acceptance.csv`` (optional)
    columns :data:`ACCEPTANCE_COLUMNS`: ``position`` (1-based draft position), ``alpha`` (probability that
    the draft token at that position is accepted given all earlier ones were), ``samples``. The dataset and
    temperature it was measured with live in ``meta.json`` under ``acceptance``.

:func:`load_profile` validates all of it and raises :class:`ProfileError` naming the file, row and field.
:func:`write_profile_meta`, :func:`append_steps` are what the profiler uses to write one.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1
STEP_COLUMNS = ["model", "phase", "batch", "tokens", "context", "median_s", "p10_s", "p90_s", "samples", "status"]
ACCEPTANCE_COLUMNS = ["position", "alpha", "samples"]
MODELS = ("target", "draft")
PHASES = ("decode", "verify", "prefill")
STATUSES = ("ok", "oom", "error")
META_REQUIRED = ["schema_version", "source", "device", "dtype", "date", "models", "timing"]


class ProfileError(ValueError):
    """A profile folder is missing a file or holds a value that is not what the format expects."""


@dataclass
class Profile:
    """A loaded, validated cost profile.

    ``steps`` holds every row of ``steps.csv`` (all statuses); ``ok_steps`` only the ``ok`` ones.
    ``acceptance`` is ``None`` when the profile has no ``acceptance.csv``.
    """

    path: Path
    meta: dict
    steps: pd.DataFrame
    acceptance: pd.DataFrame | None = None
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.path.name

    @property
    def ok_steps(self) -> pd.DataFrame:
        return self.steps[self.steps["status"] == "ok"]

    def kv_bytes_per_token(self, model: str) -> int:
        """Bytes of KV cache one token occupies in ``model`` (target or draft)."""
        return int(self.meta["models"][model]["kv_bytes_per_token"])

    @property
    def kv_cache_bytes(self) -> int:
        """Device memory left for KV cache after both models' weights (bytes)."""
        return int(self.meta["device"]["kv_cache_bytes"])

    @property
    def per_position_alpha(self) -> np.ndarray | None:
        """Conditional acceptance rate per draft position (position 1 first), or ``None``."""
        if self.acceptance is None:
            return None
        return self.acceptance.sort_values("position")["alpha"].to_numpy(dtype=float)


def _err(path: Path, msg: str) -> ProfileError:
    return ProfileError(f"{path}: {msg}")


def _check_meta(path: Path, meta: dict) -> None:
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise _err(path, f"missing key(s) {missing}; expected {META_REQUIRED}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise _err(path, f"key 'schema_version' is {meta['schema_version']!r}; this specbatch reads {SCHEMA_VERSION}")
    if meta["source"] not in ("measured", "analytical"):
        raise _err(path, f"key 'source' is {meta['source']!r}; expected 'measured' or 'analytical'")
    for m in MODELS:
        model = meta["models"].get(m) if isinstance(meta["models"], dict) else None
        if not isinstance(model, dict):
            raise _err(path, f"key 'models.{m}' is missing; expected a dict with 'kv_bytes_per_token'")
        kv = model.get("kv_bytes_per_token")
        if not isinstance(kv, (int, float)) or kv <= 0:
            raise _err(path, f"key 'models.{m}.kv_bytes_per_token' is {kv!r}; expected a positive number")
    dev = meta["device"]
    kvc = dev.get("kv_cache_bytes") if isinstance(dev, dict) else None
    if not isinstance(kvc, (int, float)) or kvc <= 0:
        raise _err(path, f"key 'device.kv_cache_bytes' is {kvc!r}; expected a positive number of bytes")


def _check_steps(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in STEP_COLUMNS if c not in df.columns]
    if missing:
        raise _err(path, f"missing column(s) {missing}; expected columns {STEP_COLUMNS}")
    if df.empty:
        raise _err(path, "no rows")
    for col, allowed in (("model", MODELS), ("phase", PHASES), ("status", STATUSES)):
        bad = ~df[col].isin(allowed)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise _err(path, f"row {i + 2}, column '{col}': {df[col].iloc[i]!r}; expected one of {list(allowed)}")
    for col in ("batch", "tokens", "context", "samples"):
        v = pd.to_numeric(df[col], errors="coerce")
        bad = v.isna() | (v < 0) | (v != np.floor(v))
        if col in ("batch", "tokens"):
            bad |= v < 1
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise _err(path, f"row {i + 2}, column '{col}': {df[col].iloc[i]!r}; expected a non-negative integer")
        df[col] = v.astype(np.int64)
    ok = (df["status"] == "ok").to_numpy()
    for col in ("median_s", "p10_s", "p90_s"):
        v = pd.to_numeric(df[col], errors="coerce")
        bad = ok & (v.isna() | ~(v > 0) | ~np.isfinite(v)).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _err(path, f"row {i + 2}, column '{col}': {df[col].iloc[i]!r}; expected a positive time in seconds")
        df[col] = v.astype(float)
    dup = df.duplicated(["model", "phase", "batch", "tokens", "context"], keep=False)
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise _err(path, f"row {i + 2}: duplicate point (model, phase, batch, tokens, context)")
    return df


def _check_acceptance(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ACCEPTANCE_COLUMNS if c not in df.columns]
    if missing:
        raise _err(path, f"missing column(s) {missing}; expected {ACCEPTANCE_COLUMNS}")
    if df.empty:
        raise _err(path, "no rows")
    a = pd.to_numeric(df["alpha"], errors="coerce")
    bad = a.isna() | (a < 0) | (a > 1)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise _err(path, f"row {i + 2}, column 'alpha': {df['alpha'].iloc[i]!r}; expected a probability in [0, 1]")
    pos = pd.to_numeric(df["position"], errors="coerce")
    expected = np.arange(1, len(df) + 1)
    if pos.isna().any() or not np.array_equal(np.sort(pos.to_numpy()), expected):
        raise _err(path, f"column 'position' must hold 1..{len(df)} exactly once each")
    df = df.assign(alpha=a.astype(float), position=pos.astype(np.int64))
    return df.sort_values("position").reset_index(drop=True)


def load_profile(path: str | os.PathLike) -> Profile:
    """Load and validate the profile folder at ``path``.

    Raises :class:`ProfileError` naming the file, row and field when anything is missing or malformed.
    """
    path = Path(path)
    if not path.is_dir():
        raise ProfileError(f"{path}: profile folder not found (expected a folder with meta.json and steps.csv)")
    meta_path, steps_path, acc_path = path / "meta.json", path / "steps.csv", path / "acceptance.csv"
    for p in (meta_path, steps_path):
        if not p.is_file():
            raise _err(p, "file not found; a profile folder needs meta.json and steps.csv")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _err(meta_path, f"not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _err(meta_path, "expected a JSON object")
    _check_meta(meta_path, meta)
    try:
        steps = pd.read_csv(steps_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise _err(steps_path, f"cannot be parsed as CSV ({e})") from None
    steps = _check_steps(steps_path, steps)
    acceptance = None
    if acc_path.is_file():
        try:
            acceptance = _check_acceptance(acc_path, pd.read_csv(acc_path))
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise _err(acc_path, f"cannot be parsed as CSV ({e})") from None
    return Profile(path=path, meta=meta, steps=steps, acceptance=acceptance)


# --- writing (used by the profiler and by tests) -------------------------------------------------------------


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_profile_meta(folder: str | os.PathLike, meta: dict) -> None:
    """Write ``meta.json`` (atomically) after checking it carries the required keys."""
    meta = {"schema_version": SCHEMA_VERSION, **meta}
    _check_meta(Path(folder) / "meta.json", meta)
    atomic_write_text(Path(folder) / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_steps(folder: str | os.PathLike, rows: list[dict] | pd.DataFrame) -> None:
    """Write (replace) ``steps.csv`` atomically from row dicts with the :data:`STEP_COLUMNS` keys."""
    df = pd.DataFrame(rows, columns=STEP_COLUMNS)
    atomic_write_text(Path(folder) / "steps.csv", df.to_csv(index=False))


def write_acceptance(folder: str | os.PathLike, alphas: list[float] | np.ndarray, samples: list[int] | np.ndarray) -> None:
    """Write ``acceptance.csv`` atomically: one row per draft position (1-based)."""
    df = pd.DataFrame({"position": np.arange(1, len(alphas) + 1), "alpha": alphas, "samples": samples})
    if not ((df["alpha"] >= 0) & (df["alpha"] <= 1)).all() or any(math.isnan(a) for a in df["alpha"]):
        raise ProfileError(f"{folder}/acceptance.csv: alpha values must lie in [0, 1]")
    atomic_write_text(Path(folder) / "acceptance.csv", df.to_csv(index=False))
