"""Request arrivals: load real traces, generate synthetic ones, and transform them.

A :class:`Workload` is three aligned arrays sorted by arrival: ``arrival_s`` (seconds from the first
arrival, float64, non-decreasing), ``prompt_tokens`` and ``output_tokens`` (int64, ≥ 1), plus an optional
``request_class`` (int codes into ``class_names``; used by acceptance models that differ by class).

Every load error is a :class:`WorkloadError` naming the file, the row (1-based, header excluded as in a
spreadsheet: data row 1 is the first after the header) and the column.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

TIME_UNITS = ("s", "ms", "datetime")


class WorkloadError(ValueError):
    """A trace file or workload setting is malformed; the message names the file, row and column."""


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival. Invariants: equal lengths, arrivals non-decreasing from 0, tokens ≥ 1."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    name: str = "workload"
    request_class: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    @property
    def rate(self) -> float:
        """Mean arrival rate (requests/second) over the span of the arrivals."""
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else float("inf")

    def take(self, idx: np.ndarray) -> "Workload":
        rc = None if self.request_class is None else self.request_class[idx]
        return replace(self, arrival_s=self.arrival_s[idx], prompt_tokens=self.prompt_tokens[idx],
                       output_tokens=self.output_tokens[idx], request_class=rc)

    def describe(self) -> dict:
        """Summary statistics (counts, rate, length percentiles) as a plain dict."""
        ia = np.diff(self.arrival_s)
        return {
            "name": self.name, "requests": len(self), "duration_s": self.duration_s, "rate_per_s": self.rate,
            "interarrival_cv": float(ia.std() / ia.mean()) if len(ia) > 1 and ia.mean() > 0 else float("nan"),
            "prompt_p50": float(np.median(self.prompt_tokens)), "prompt_mean": float(self.prompt_tokens.mean()),
            "output_p50": float(np.median(self.output_tokens)), "output_mean": float(self.output_tokens.mean()),
        }


# --- loading -----------------------------------------------------------------------------------------------


def _read_table(path: Path, fmt: str, usecols: list[str]) -> pd.DataFrame:
    if fmt == "auto":
        suffix = "".join(path.suffixes[-2:]).lower()
        fmt = "parquet" if suffix.endswith(".parquet") else "jsonl" if suffix.endswith((".jsonl", ".ndjson")) else "csv"
    try:
        if fmt == "csv":
            head = pd.read_csv(path, nrows=0)
            _check_columns(path, list(head.columns), usecols)
            return pd.read_csv(path, usecols=usecols, dtype=str, keep_default_na=False)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            _check_columns(path, names, usecols)
            return pd.read_parquet(path, columns=usecols)
        if fmt == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
            _check_columns(path, list(df.columns), usecols)
            return df[usecols]
    except WorkloadError:
        raise
    except UnicodeDecodeError as e:
        raise WorkloadError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise WorkloadError(f"{path}: file is empty; expected a header row with columns {usecols}") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise WorkloadError(f"{path}: cannot be read as {fmt} ({str(e).splitlines()[0]})") from None
    raise WorkloadError(f"{path}: unknown format {fmt!r}; expected csv, jsonl, parquet or auto")


def _check_columns(path: Path, have: list[str], want: list[str]) -> None:
    missing = [c for c in want if c not in have]
    if missing:
        raise WorkloadError(f"{path}: missing column(s) {missing}; the file has {have}. "
                            "Set workload.columns to map arrival/prompt/output to the file's column names")


def _parse_times(raw: pd.Series, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (seconds as float64, bad-row mask)."""
    if unit == "datetime":
        ts = pd.to_datetime(raw, errors="coerce", format="mixed")
        bad = ts.isna().to_numpy()
        secs = np.full(len(raw), np.nan)
        secs[~bad] = (ts[~bad] - ts[~bad].min()).dt.total_seconds().to_numpy() if (~bad).any() else []
        return secs, bad
    v = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(v) | (v < 0)
    return (v / 1000.0 if unit == "ms" else v), bad


def _parse_tokens(raw: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    v = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(v) | (v < 1) | (v != np.floor(v))
    return np.where(bad, 1, v).astype(np.int64), bad


def load_trace(path: str | os.PathLike, columns: dict | None = None, time_unit: str = "s", fmt: str = "auto",
               on_bad_rows: str = "error", sort: bool = False, class_column: str | None = None,
               name: str | None = None) -> Workload:
    """Load a request trace from CSV, JSONL or Parquet.

    ``columns`` maps ``arrival``, ``prompt`` and ``output`` to the file's column names. ``time_unit`` is
    ``s``, ``ms`` or ``datetime`` (date-time strings). ``on_bad_rows="skip"`` drops rows with missing,
    non-numeric, negative or zero values and records how many and why in ``Workload.notes``; ``"error"``
    raises on the first one. Unsorted arrivals raise unless ``sort=True``. Arrivals are shifted so the
    first is at 0 s.
    """
    path = Path(path)
    columns = {"arrival": "arrival", "prompt": "prompt", "output": "output", **(columns or {})}
    if time_unit not in TIME_UNITS:
        raise WorkloadError(f"{path}: time_unit {time_unit!r}; expected one of {list(TIME_UNITS)}")
    if on_bad_rows not in ("error", "skip"):
        raise WorkloadError(f"{path}: on_bad_rows {on_bad_rows!r}; expected 'error' or 'skip'")
    if not path.is_file():
        raise WorkloadError(f"{path}: trace file not found")
    usecols = [columns["arrival"], columns["prompt"], columns["output"]] + ([class_column] if class_column else [])
    df = _read_table(path, fmt, usecols)
    if df.empty:
        raise WorkloadError(f"{path}: no data rows (only a header)")
    t, bad_t = _parse_times(df[columns["arrival"]], time_unit)
    p, bad_p = _parse_tokens(df[columns["prompt"]])
    o, bad_o = _parse_tokens(df[columns["output"]])
    notes = []
    bad_any = bad_t | bad_p | bad_o
    if bad_any.any():
        if on_bad_rows == "error":
            i = int(np.flatnonzero(bad_any)[0])
            col, what = ((columns["arrival"], "a finite, non-negative time" if time_unit != "datetime" else "a date-time")
                         if bad_t[i] else (columns["prompt"], "a positive integer token count") if bad_p[i]
                         else (columns["output"], "a positive integer token count"))
            raise WorkloadError(f"{path}: row {i + 1}, column '{col}': {df[col].iloc[i]!r}; expected {what} "
                                "(set workload.on_bad_rows=skip to drop such rows)")
        for mask, col in ((bad_t, columns["arrival"]), (bad_p, columns["prompt"]), (bad_o, columns["output"])):
            if mask.any():
                notes.append(f"skipped {int(mask.sum())} row(s) with a bad '{col}' value")
        keep = ~bad_any
        t, p, o, df = t[keep], p[keep], o[keep], df[keep]
        if len(t) == 0:
            raise WorkloadError(f"{path}: every row was bad; nothing left to replay")
        if time_unit == "datetime":
            t = t - t.min()
    if not sort:
        dec = np.flatnonzero(np.diff(t) < 0)
        if len(dec):
            i = int(dec[0]) + 1
            raise WorkloadError(f"{path}: row {i + 1}, column '{columns['arrival']}': arrival goes backwards "
                                f"({t[i]:.6f} s after {t[i - 1]:.6f} s); sort the file or set workload.sort=true")
    order = np.argsort(t, kind="stable")
    t, p, o = t[order], p[order], o[order]
    rc, class_names = None, ()
    if class_column:
        codes, uniques = pd.factorize(df[class_column].astype(str).to_numpy()[order], sort=True)
        rc, class_names = codes.astype(np.int64), tuple(uniques)
    return Workload(arrival_s=t - t[0], prompt_tokens=p, output_tokens=o, name=name or path.stem,
                    request_class=rc, class_names=class_names, notes=tuple(notes))


# --- synthetic arrivals --------------------------------------------------------------------------------------


def synthetic_arrivals(n: int, rate: float, process: str = "poisson", cv: float = 1.0,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` arrival times (seconds, first at 0) with mean rate ``rate`` requests/second.

    ``poisson``: exponential inter-arrivals (CV 1). ``gamma``: Gamma inter-arrivals with coefficient of
    variation ``cv`` (shape 1/cv², scale cv²/rate): cv > 1 is burstier than Poisson, cv < 1 smoother.
    """
    if n < 1:
        raise WorkloadError(f"workload.arrivals.n is {n}; expected at least 1 request")
    if not rate > 0:
        raise WorkloadError(f"workload.arrivals.rate is {rate}; expected a positive rate in requests/second")
    rng = rng or np.random.default_rng(0)
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, n - 1)
    elif process == "gamma":
        if not cv > 0:
            raise WorkloadError(f"workload.arrivals.cv is {cv}; expected a positive coefficient of variation")
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n - 1)
    else:
        raise WorkloadError(f"workload.arrivals.process is {process!r}; expected 'poisson' or 'gamma'")
    return np.concatenate([[0.0], np.cumsum(gaps)])


def lognormal_lengths(n: int, median: float, sigma: float, max_tokens: int | None,
                      rng: np.random.Generator) -> np.ndarray:
    """Token counts from a lognormal with the given median and log-space sigma, rounded, ≥ 1."""
    if not median >= 1 or not sigma >= 0:
        raise WorkloadError(f"lognormal lengths need median ≥ 1 and sigma ≥ 0 (got median={median}, sigma={sigma})")
    v = np.maximum(1, np.rint(rng.lognormal(np.log(median), sigma, n))).astype(np.int64)
    return np.minimum(v, max_tokens) if max_tokens else v


def synthetic(n: int, rate: float, process: str = "poisson", cv: float = 1.0, lengths_from: Workload | None = None,
              prompt_lognormal: tuple[float, float] = (512, 1.0), output_lognormal: tuple[float, float] = (128, 1.0),
              seed: int = 0, name: str = "synthetic") -> Workload:
    """A synthetic workload: Poisson/Gamma arrivals with lengths resampled jointly (prompt, output pairs)
    from ``lengths_from`` (a trace's empirical distribution) or drawn from lognormals (median, sigma)."""
    rng = np.random.default_rng(seed)
    t = synthetic_arrivals(n, rate, process, cv, rng)
    if lengths_from is not None:
        idx = rng.integers(0, len(lengths_from), n)
        p, o = lengths_from.prompt_tokens[idx], lengths_from.output_tokens[idx]
        rc = None if lengths_from.request_class is None else lengths_from.request_class[idx]
        return Workload(t, p.copy(), o.copy(), name=name, request_class=rc, class_names=lengths_from.class_names)
    p = lognormal_lengths(n, prompt_lognormal[0], prompt_lognormal[1], None, rng)
    o = lognormal_lengths(n, output_lognormal[0], output_lognormal[1], None, rng)
    return Workload(t, p, o, name=name)


# --- transforms ------------------------------------------------------------------------------------------------


def window(w: Workload, start_s: float | None = None, end_s: float | None = None) -> Workload:
    """Requests arriving in [start_s, end_s) (seconds from the first arrival), re-based to start at 0."""
    lo = -np.inf if start_s is None else start_s
    hi = np.inf if end_s is None else end_s
    idx = np.flatnonzero((w.arrival_s >= lo) & (w.arrival_s < hi))
    if len(idx) == 0:
        raise WorkloadError(f"{w.name}: no request arrives in the window [{start_s}, {end_s}) s "
                            f"(the trace spans 0 to {w.duration_s:.1f} s)")
    out = w.take(idx)
    return replace(out, arrival_s=out.arrival_s - out.arrival_s[0])


def first_n(w: Workload, n: int) -> Workload:
    """The first ``n`` requests by arrival."""
    if n < 1:
        raise WorkloadError(f"workload.first_n is {n}; expected at least 1")
    return w.take(np.arange(min(n, len(w))))


def scale_time(w: Workload, factor: float) -> Workload:
    """Compress time by ``factor``: the arrival rate is multiplied by ``factor`` (>1 = more load)."""
    if not factor > 0:
        raise WorkloadError(f"workload.time_scale is {factor}; expected a positive factor")
    return replace(w, arrival_s=w.arrival_s / factor)


def set_rate(w: Workload, rate: float) -> Workload:
    """Rescale arrival times so the mean rate over the trace is ``rate`` requests/second."""
    if not rate > 0:
        raise WorkloadError(f"workload rate is {rate}; expected a positive rate in requests/second")
    if len(w) < 2 or w.duration_s == 0:
        return w
    return scale_time(w, rate / w.rate)


def cap_lengths(w: Workload, max_prompt: int | None = None, max_output: int | None = None) -> Workload:
    """Clip prompt and output lengths to the given maxima (tokens); ``None`` leaves them as they are."""
    p, o = w.prompt_tokens, w.output_tokens
    for v, name in ((max_prompt, "max_prompt"), (max_output, "max_output")):
        if v is not None and v < 1:
            raise WorkloadError(f"workload.{name} is {v}; expected a positive token count or null")
    if max_prompt:
        p = np.minimum(p, max_prompt)
    if max_output:
        o = np.minimum(o, max_output)
    return replace(w, prompt_tokens=p, output_tokens=o)


def save_workload(w: Workload, path: str | os.PathLike) -> None:
    """Write a workload as a trace file (CSV/JSONL/Parquet by suffix) with columns arrival_s, prompt, output."""
    path = Path(path)
    df = pd.DataFrame({"arrival_s": w.arrival_s, "prompt": w.prompt_tokens, "output": w.output_tokens})
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix in (".jsonl", ".ndjson"):
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    else:
        df.to_csv(path, index=False)
