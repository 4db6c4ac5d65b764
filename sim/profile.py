"""The cost-profile format: the contract between the profiler (writer) and the simulator (reader).

A profile is a folder ``traces/profiles/<name>/`` holding

``meta.json``
    ``schema_version`` (int, :data:`SCHEMA_VERSION`), ``source`` (``measured`` | ``analytical``),
    ``device`` ({name, kind (cuda|cpu), memory_bytes, kv_cache_bytes, threads}), ``dtype``,
    ``libraries`` ({torch, transformers, ...}), ``date`` (ISO 8601), ``models`` ({target, draft}: each
    {name, config, parameters, kv_bytes_per_token}; optionally ``eagle`` (kv_bytes_per_token: one decoder
    layer's KV at the target's shape) and ``ngram`` (kv_bytes_per_token 0; ``prompt_lookup_min``,
    ``prompt_lookup_max``)), ``timing`` ({method, cache, warmup, ...}).
``steps.csv``
    one row per measured point, columns :data:`STEP_COLUMNS`:
    ``model`` (target|draft|eagle|ngram), ``phase`` (decode|verify|prefill), ``batch`` (sequences),
    ``tokens`` (new tokens per sequence: 1 for decode, γ+1 for verify, the prompt length for prefill),
    ``context`` (KV-cache length in tokens before the step), ``median_s``, ``p10_s``, ``p90_s`` (seconds),
    ``samples`` (timed repeats), ``status`` (ok|oom|error).
    Drafter rows (optional): ``eagle`` decode rows (batch, tokens=1, context) time one EAGLE head step (one
    decoder layer at the target's width, the fusion layer and the target's LM head), its prefill rows (batch
    1, tokens = prompt length, context 0) the head's prefill over the prompt's hidden states; ``ngram`` decode
    rows (batch, tokens=1, context) are the CPU seconds to propose for ``batch`` sequences of ``context``
    tokens by prompt lookup (no prefill rows).
``mixed.csv`` (optional; ``cluster.prefill=chunked`` needs it)
    one row per measured mixed forward (chunked prefill: one packed forward of ``batch`` sequences' new tokens
    at ``context`` cached tokens each and one prompt chunk of ``chunk_tokens`` tokens after ``chunk_prefix``
    cached tokens of its own sequence; profiler/packed.py), columns :data:`MIXED_COLUMNS`: ``model``
    (target|draft), ``batch`` (sequences, ≥ 1), ``tokens`` (new tokens per sequence: γ+1 for the target's
    verify, 1 for a draft decode), ``context``, ``chunk_tokens`` (≥ 1), ``chunk_prefix`` (≥ 0), ``median_s``,
    ``p10_s``, ``p90_s``, ``samples``, ``status`` as in steps.csv. What the times include, the grid and the
    passes are in ``meta.json`` under ``mixed``; the mixed-iteration rule's error on these rows
    (``specbatch.sim.cost_model.CostModel.mixed_iteration`` against each row) under ``mixed_check``.
``acceptance.csv`` (optional)
    columns :data:`ACCEPTANCE_COLUMNS`: ``position`` (1-based draft position), ``alpha`` (probability that
    the draft token at that position is accepted given all earlier ones were), ``samples``. The dataset and
    temperature it was measured with live in ``meta.json`` under ``acceptance``.

:func:`load_profile` validates all of it and raises :class:`ProfileError` naming the file, row and field.
:func:`write_profile_meta`, :func:`write_steps`, :func:`write_mixed` are what the profiler uses to write one.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1
STEP_COLUMNS = ["model", "phase", "batch", "tokens", "context", "median_s", "p10_s", "p90_s", "samples", "status"]
ACCEPTANCE_COLUMNS = ["position", "alpha", "samples"]
MIXED_COLUMNS = ["model", "batch", "tokens", "context", "chunk_tokens", "chunk_prefix", "median_s", "p10_s", "p90_s",
                 "samples", "status"]
MIXED_MODELS = ("target", "draft")
MIXED_KEY = ["model", "batch", "tokens", "context", "chunk_tokens", "chunk_prefix"]
MODELS = ("target", "draft", "eagle", "ngram")
# meta.json ``models`` entries every profile has; ``eagle`` and ``ngram`` (drafter rows) are optional
REQUIRED_MODELS = ("target", "draft")
PHASES = ("decode", "verify", "prefill")
STATUSES = ("ok", "oom", "error")
META_REQUIRED = ["schema_version", "source", "device", "dtype", "date", "models", "timing"]
# A measured time may dip by up to this fraction as batch or tokens grow (timing noise); a larger fall is an error.
# Measured CPU profiles show genuine dips of 25-30 % where the BLAS library switches kernels with the
# matrix shape (e.g. batch 2 slower than batch 4 for a small model); a larger drop is a broken measurement.
MONOTONE_TOLERANCE = 0.40


class ProfileError(ValueError):
    """A profile folder is missing a file or holds a value that is not what the format expects."""


class ProfileWarning(UserWarning):
    """A profile is usable but suspect (e.g. an incomplete capture whose times fall as the step grows)."""


@dataclass
class Profile:
    """A loaded, validated cost profile.

    ``steps`` holds every row of ``steps.csv`` (all statuses); ``ok_steps`` only the ``ok`` ones.
    ``acceptance`` is ``None`` when the profile has no ``acceptance.csv``, ``mixed`` when it has no ``mixed.csv``.
    """

    path: Path
    meta: dict
    steps: pd.DataFrame
    acceptance: pd.DataFrame | None = None
    mixed: pd.DataFrame | None = None
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.path.name

    @property
    def ok_steps(self) -> pd.DataFrame:
        return self.steps[self.steps["status"] == "ok"]

    def kv_bytes_per_token(self, model: str) -> int:
        """Bytes of KV cache one token occupies in ``model`` (target, draft, eagle or ngram)."""
        return int(self.meta["models"][model]["kv_bytes_per_token"])

    def has_model(self, model: str) -> bool:
        """Whether ``meta.json`` describes ``model`` and ``steps.csv`` has ``ok`` decode rows for it."""
        s = self.ok_steps
        return isinstance(self.meta["models"].get(model), dict) and bool(
            ((s["model"] == model) & (s["phase"] == "decode")).any())

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


def _row(i: int) -> str:
    """Data row ``i`` (0-based index into the CSV's rows) as 'row R (line L)': R counts data rows from 1,
    L is the line in the file (the header is line 1)."""
    return f"row {i + 1} (line {i + 2})"


def _show(v) -> str:
    """A cell value for an error message: plain Python repr, never ``np.float64(...)``."""
    return repr(v.item() if isinstance(v, np.generic) else v)


def _not_utf8(path: Path) -> ProfileError:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return _err(path, f"not UTF-8 text (line {lineno}, byte {e.start + 1} of that line: "
                                  f"{line[e.start:e.start + 1]!r}); re-save the file as UTF-8")
    return _err(path, "not UTF-8 text; re-save the file as UTF-8")


def _positive_finite(v) -> bool:
    """A JSON number > 0 and finite (``NaN``/``Infinity``, which Python's json reads, and booleans are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _json_show(v) -> str:
    """A meta.json value as the file spells it (``NaN``, ``Infinity``, ``true``, ``null``, ``"text"``)."""
    return json.dumps(v) if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def _check_meta(path: Path, meta: dict) -> None:
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise _err(path, f"missing key(s) {missing}; expected {META_REQUIRED}")
    if type(meta["schema_version"]) is not int or meta["schema_version"] != SCHEMA_VERSION:
        raise _err(path, f"key 'schema_version' is {meta['schema_version']!r}; this specbatch reads schema version "
                         f"{SCHEMA_VERSION} (the integer {SCHEMA_VERSION}); re-profile or convert the profile")
    if meta["source"] not in ("measured", "analytical"):
        raise _err(path, f"key 'source' is {meta['source']!r}; expected 'measured' or 'analytical'")
    for m in REQUIRED_MODELS:
        model = meta["models"].get(m) if isinstance(meta["models"], dict) else None
        if not isinstance(model, dict):
            raise _err(path, f"key 'models.{m}' is missing; expected a dict with 'kv_bytes_per_token'")
        kv = model.get("kv_bytes_per_token")
        if not _positive_finite(kv):
            raise _err(path, f"key 'models.{m}.kv_bytes_per_token' is {_json_show(kv)}; expected a positive, "
                             "finite number")
    _check_drafter_meta(path, meta["models"])
    dev = meta["device"]
    if not isinstance(dev, dict):
        raise _err(path, f"key 'device' is {dev!r}; expected an object with 'kv_cache_bytes'")
    kvc = dev.get("kv_cache_bytes") if isinstance(dev, dict) else None
    if not _positive_finite(kvc):
        raise _err(path, f"key 'device.kv_cache_bytes' is {_json_show(kvc)}; expected a positive, finite number "
                         "of bytes")


def _check_drafter_meta(path: Path, models: dict) -> None:
    """The optional drafter entries: ``models.eagle.kv_bytes_per_token`` positive (one decoder layer's KV),
    ``models.ngram.kv_bytes_per_token`` 0 or more (prompt lookup keeps no KV), both finite."""
    for m, low in (("eagle", "a positive"), ("ngram", "a non-negative")):
        model = models.get(m)
        if model is None:
            continue
        if not isinstance(model, dict):
            raise _err(path, f"key 'models.{m}' is {_json_show(model)}; expected a dict with 'kv_bytes_per_token'")
        kv = model.get("kv_bytes_per_token")
        ok = _positive_finite(kv) if m == "eagle" else (
            isinstance(kv, (int, float)) and not isinstance(kv, bool) and math.isfinite(kv) and kv >= 0)
        if not ok:
            raise _err(path, f"key 'models.{m}.kv_bytes_per_token' is {_json_show(kv)}; expected {low}, finite number")


def _check_table(path: Path, df: pd.DataFrame, columns: list[str], allowed: dict, positive: tuple,
                 counts: tuple) -> None:
    """The checks steps.csv and mixed.csv share: every column in ``columns``, at least one row, each column of
    ``allowed`` within its values, each of ``counts`` a non-negative integer (``positive``: ≥ 1), converted
    to int64 in place. The first bad row is a :class:`ProfileError` naming it, its column and what was expected."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise _err(path, f"missing column(s) {missing}; expected columns {columns}")
    if df.empty:
        raise _err(path, "no rows")
    for col, values in allowed.items():
        bad = ~df[col].isin(values)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise _err(path, f"{_row(i)}, column '{col}': {_show(df[col].iloc[i])}; expected one of {list(values)}")
    for col in counts:
        v = pd.to_numeric(df[col], errors="coerce")
        bad = v.isna() | (v < (1 if col in positive else 0)) | (v != np.floor(v))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            what = "a positive integer" if col in positive else "a non-negative integer"
            raise _err(path, f"{_row(i)}, column '{col}': {_show(df[col].iloc[i])}; expected {what}")
        df[col] = v.astype(np.int64)


def _check_steps(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    _check_table(path, df, STEP_COLUMNS, {"model": MODELS, "phase": PHASES, "status": STATUSES},
                 positive=("batch", "tokens"), counts=("batch", "tokens", "context", "samples"))
    return _check_times(path, df, ["model", "phase", "batch", "tokens", "context"])


def _check_mixed(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    _check_table(path, df, MIXED_COLUMNS, {"model": MIXED_MODELS, "status": STATUSES},
                 positive=("batch", "tokens", "chunk_tokens"),
                 counts=("batch", "tokens", "context", "chunk_tokens", "chunk_prefix", "samples"))
    return _check_times(path, df, MIXED_KEY)


def _check_times(path: Path, df: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """The time columns of a steps.csv / mixed.csv frame: positive and ordered (p10 ≤ median ≤ p90) on ok
    rows; and each ``key`` point once."""
    ok = (df["status"] == "ok").to_numpy()
    for col in ("median_s", "p10_s", "p90_s"):
        v = pd.to_numeric(df[col], errors="coerce")
        bad = ok & (v.isna() | ~(v > 0) | ~np.isfinite(v)).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _err(path, f"{_row(i)}, column '{col}': {_show(df[col].iloc[i])}; expected a positive, finite time "
                             "in seconds (status=ok rows need all three times)")
        df[col] = v.astype(float)
    disordered = ok & ((df["p10_s"] > df["median_s"]) | (df["median_s"] > df["p90_s"])).to_numpy()
    if disordered.any():
        i = int(np.flatnonzero(disordered)[0])
        r = df.iloc[i]
        raise _err(path, f"{_row(i)}: p10_s {float(r['p10_s']):g}, median_s {float(r['median_s']):g}, p90_s {float(r['p90_s']):g}; "
                         "expected p10_s ≤ median_s ≤ p90_s")
    dup = df.duplicated(key, keep=False)
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        point = df.loc[df.index[i], key].to_dict()
        j = int(np.flatnonzero(dup.to_numpy())[1])
        raise _err(path, f"{_row(i)} and {_row(j)}: duplicate point {point}; expected each ({', '.join(key)}) once")
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
        raise _err(path, f"{_row(i)}, column 'alpha': {_show(df['alpha'].iloc[i])}; expected a probability in [0, 1]")
    pos = pd.to_numeric(df["position"], errors="coerce")
    expected = np.arange(1, len(df) + 1)
    if pos.isna().any() or not np.array_equal(np.sort(pos.to_numpy()), expected):
        raise _err(path, f"column 'position' must hold 1..{len(df)} exactly once each")
    df = df.assign(alpha=a.astype(float), position=pos.astype(np.int64))
    return df.sort_values("position").reset_index(drop=True)


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """Read a profile CSV; an empty, unparsable or non-UTF-8 file is a :class:`ProfileError` naming it."""
    try:
        return pd.read_csv(path, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise _err(path, f"file is empty; expected a header row with columns {columns}") from None
    except pd.errors.ParserError as e:
        raise _err(path, f"cannot be parsed as CSV ({str(e).strip()})") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


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
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _err(meta_path, f"not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise _not_utf8(meta_path) from None
    if not isinstance(meta, dict):
        raise _err(meta_path, "expected a JSON object")
    _check_meta(meta_path, meta)
    steps = _check_steps(steps_path, _read_csv(steps_path, STEP_COLUMNS))
    acceptance = mixed = None
    if acc_path.is_file():
        acceptance = _check_acceptance(acc_path, _read_csv(acc_path, ACCEPTANCE_COLUMNS))
    if (path / "mixed.csv").is_file():
        mixed = _check_mixed(path / "mixed.csv", _read_csv(path / "mixed.csv", MIXED_COLUMNS))
    return Profile(path=path, meta=meta, steps=steps, acceptance=acceptance, mixed=mixed)


def check_monotone(profile: Profile, tolerance: float = MONOTONE_TOLERANCE, strict: bool | None = None) -> None:
    """Raise :class:`ProfileError` when a measured time falls by more than ``tolerance`` (a fraction) as batch
    or tokens grow with the other axes fixed, naming both rows. Smaller dips are timing noise and allowed.

    Checked among ``ok`` rows: the target decode/verify surface (tokens = γ+1) along batch and along tokens,
    draft decode along batch, and prefill along prompt length and batch.

    ``strict=None`` (default): a profile whose ``meta.json`` declares ``timing.complete: false`` (an
    interim or interrupted capture, used knowingly) gets a :class:`ProfileWarning` with the same message
    instead of the error; every other profile gets the error."""
    if strict is None:
        timing = profile.meta.get("timing")
        strict = not (isinstance(timing, dict) and timing.get("complete") is False)
    try:
        _check_monotone(profile, tolerance)
    except ProfileError as e:
        if strict:
            raise
        warnings.warn(f"{e} (meta.json says timing.complete=false, so this is a warning: results from this "
                      "profile are unreliable)", ProfileWarning, stacklevel=2)


def monotone_violations(profile: Profile, tolerance: float = MONOTONE_TOLERANCE) -> list[tuple[int, int, str]]:
    """Every place where :func:`check_monotone` finds a time falling by more than ``tolerance``, as
    ``(row, next_row, message)``: ``row`` and ``next_row`` index ``profile.steps`` (the smaller and the bigger
    step), ``message`` names both; in the order of the checks (group, then axis, then the fixed axes)."""
    path = profile.path / "steps.csv"
    s = profile.ok_steps
    groups = [
        ("target decode/verify", s[(s["model"] == "target") & s["phase"].isin(["decode", "verify"])]),
        ("draft decode", s[(s["model"] == "draft") & (s["phase"] == "decode")]),
        ("target prefill", s[(s["model"] == "target") & (s["phase"] == "prefill")]),
        ("draft prefill", s[(s["model"] == "draft") & (s["phase"] == "prefill")]),
        ("eagle decode", s[(s["model"] == "eagle") & (s["phase"] == "decode")]),
        ("eagle prefill", s[(s["model"] == "eagle") & (s["phase"] == "prefill")]),
        ("ngram decode", s[(s["model"] == "ngram") & (s["phase"] == "decode")]),
    ]
    axes = ("batch", "tokens", "context")
    found = []
    for what, g in groups:
        if len(g) < 2:
            continue
        cols = {a: g[a].to_numpy(dtype=np.int64) for a in axes}
        t = g["median_s"].to_numpy(dtype=float)
        idx = g.index.to_numpy()
        for axis in ("batch", "tokens"):
            fixed = [a for a in axes if a != axis]
            order = np.lexsort([cols[axis]] + [cols[a] for a in reversed(fixed)])  # by fixed axes, then axis
            same = np.ones(len(order) - 1, bool)
            for a in fixed:
                v = cols[a][order]
                same &= v[1:] == v[:-1]
            ts = t[order]
            bad = same & (ts[1:] < (1.0 - tolerance) * ts[:-1])
            for k in np.flatnonzero(bad):
                j0, j1 = order[k], order[k + 1]
                t0, t1 = ts[k], ts[k + 1]
                at = ", ".join(f"{a}={int(cols[a][j1])}" for a in fixed)
                found.append((int(idx[j0]), int(idx[j1]), str(_err(
                    path, f"{what} time falls from {t0:.6g} s at {axis}={int(cols[axis][j0])} "
                          f"({_row(int(idx[j0]))}) to {t1:.6g} s at {axis}={int(cols[axis][j1])} "
                          f"({_row(int(idx[j1]))}) with {at}: a drop of {100 * (1 - t1 / t0):.0f} %, more than "
                          f"the {100 * tolerance:.0f} % allowed for timing noise; a bigger step cannot be that "
                          "much faster; remeasure these points"))))
    return found


def _check_monotone(profile: Profile, tolerance: float) -> None:
    found = monotone_violations(profile, tolerance)
    if found:
        raise ProfileError(found[0][2])


# --- writing (used by the profiler and by tests) -------------------------------------------------------------


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status, kernel ≥ 4.7);
    else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Create ``path`` so that a reader never sees a half-written file: ``write(tmp)`` fills a hidden
    temporary file in the same folder, which is flushed to disk and then renamed over ``path``. The file gets
    the permissions ``open()`` would give it: an existing ``path``'s mode, else 0666 less the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode open() would: an existing file's, else 0666 & ~umask.
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_profile_meta(folder: str | os.PathLike, meta: dict) -> None:
    """Write ``meta.json`` (atomically) after checking it carries the required keys."""
    meta = {"schema_version": SCHEMA_VERSION, **meta}
    _check_meta(Path(folder) / "meta.json", meta)
    atomic_write_text(Path(folder) / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_steps(folder: str | os.PathLike, rows: list[dict] | pd.DataFrame) -> None:
    """Write (replace) ``steps.csv`` atomically from row dicts with the :data:`STEP_COLUMNS` keys."""
    df = pd.DataFrame(rows, columns=STEP_COLUMNS)
    atomic_write_text(Path(folder) / "steps.csv", df.to_csv(index=False))


def write_mixed(folder: str | os.PathLike, rows: list[dict] | pd.DataFrame) -> None:
    """Write (replace) ``mixed.csv`` atomically from row dicts with the :data:`MIXED_COLUMNS` keys."""
    df = pd.DataFrame(rows, columns=MIXED_COLUMNS)
    atomic_write_text(Path(folder) / "mixed.csv", df.to_csv(index=False))


def write_acceptance(folder: str | os.PathLike, alphas: list[float] | np.ndarray, samples: list[int] | np.ndarray) -> None:
    """Write ``acceptance.csv`` atomically: one row per draft position (1-based)."""
    df = pd.DataFrame({"position": np.arange(1, len(alphas) + 1), "alpha": alphas, "samples": samples})
    if not ((df["alpha"] >= 0) & (df["alpha"] <= 1)).all() or any(math.isnan(a) for a in df["alpha"]):
        raise ProfileError(f"{folder}/acceptance.csv: alpha values must lie in [0, 1]")
    atomic_write_text(Path(folder) / "acceptance.csv", df.to_csv(index=False))
