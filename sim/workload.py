"""Request arrivals: load real traces, generate synthetic ones, and transform them.

A :class:`Workload` is three aligned arrays sorted by arrival: ``arrival_s`` (seconds from the first
arrival, float64, non-decreasing), ``prompt_tokens`` and ``output_tokens`` (int64, ≥ 1), plus an optional
``request_class`` (int codes into ``class_names``; used by acceptance models that differ by class).

Every load error is a :class:`WorkloadError` naming the file, the row (1-based, header excluded as in a
spreadsheet: data row 1 is the first after the header) and the column.
"""
from __future__ import annotations

import csv
import json
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

TIME_UNITS = ("s", "ms", "datetime")
#: ``time_unit`` values a trace may be loaded with: ``auto`` decides between the others from the column.
TIME_UNIT_CHOICES = (*TIME_UNITS, "auto")
#: Compressed traces (suffix → pandas' compression name); the format is read from the suffix before it.
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip", ".zst": "zstd"}
FORMATS_HELP = ("supported formats: csv (a header row), jsonl (.jsonl/.ndjson/.json: one JSON object per line), "
                "parquet; optionally compressed (" + ", ".join(COMPRESSION) + ")")
ECHO_CHARS = 200  # longest text of a file's content quoted in a message


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

CHUNK_ROWS = 1 << 18  # rows parsed at a time: memory stays bounded by the chunk plus the result arrays
MAX_TOKENS = 10**9  # a token count above this is a data error (and would overflow sums of lengths)
COLUMN_KEYS = ("arrival", "prompt", "output")

# Why a value is bad (codes 1..; 0 = good). Used in error messages and in the skipped-row notes.
_TOKEN_REASONS = ("", "empty", "not a number", "NaN or infinite", "negative", "zero", "not an integer",
                  f"larger than {MAX_TOKENS:,} tokens")
_TIME_REASONS = ("", "empty", "not a number", "NaN or infinite", "negative")
_DATETIME_REASONS = ("", "empty", "not a date-time", "a number, not a date-time string")
_NAN_WORDS = ("nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity", "na", "n/a", "null", "none")


class SkippedRowsWarning(UserWarning):
    """``on_bad_rows=skip`` dropped rows from a trace; the message (and ``Workload.notes``) says how many and why."""


def _compression(path: Path) -> str | None:
    return COMPRESSION.get(path.suffix.lower())


def _detect_format(path: Path, fmt: str) -> str:
    if fmt == "auto":
        stem = Path(path.stem) if _compression(path) else path
        suffix = stem.suffix.lower()
        return ("parquet" if suffix == ".parquet" else "jsonl" if suffix in (".jsonl", ".ndjson", ".json")
                else "csv")
    if fmt not in ("csv", "jsonl", "parquet"):
        raise WorkloadError(f"{path}: unknown format {fmt!r}; expected csv, jsonl, parquet or auto")
    return fmt


def _open(path: Path, mode: str = "rb", **kw):
    """The file, decompressed if its suffix names a compression (as pandas reads it)."""
    comp = _compression(path)
    if comp is None:
        return open(path, mode, **kw)
    import io

    if comp == "gzip":
        import gzip
        raw = gzip.open(path, "rb")
    elif comp == "bz2":
        import bz2
        raw = bz2.open(path, "rb")
    elif comp == "xz":
        import lzma
        raw = lzma.open(path, "rb")
    elif comp == "zip":
        import zipfile
        z = zipfile.ZipFile(path)
        names = [n for n in z.namelist() if not n.endswith("/")]
        if len(names) != 1:
            raise WorkloadError(f"{path}: a zip archive with {len(names)} files; expected exactly one trace file in it")
        raw = z.open(names[0])
    else:
        try:
            import zstandard
        except ImportError:
            raise WorkloadError(f"{path}: zstd-compressed, and the zstandard package is not installed "
                                "(pip install zstandard, or decompress the file)") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return raw if "b" in mode else io.TextIOWrapper(raw, **kw)


def _echo(text) -> str:
    """``text`` quoted, cut to :data:`ECHO_CHARS` characters."""
    t = repr(text)
    return t if len(t) <= ECHO_CHARS else t[:ECHO_CHARS] + f"... ({len(t):,} characters)"


def _locate_bad_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 lies: 'line L (data row R), byte B', for the error message."""
    with _open(path, "rb") as f:
        head = f.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return "the file starts with a UTF-16 byte-order mark (it is UTF-16, not UTF-8)"
    with _open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                where = "the header line" if lineno == 1 else f"line {lineno} (data row {lineno - 1})"
                return f"{where}, byte {offset + e.start} of the file: {line[e.start:e.start + 1]!r} ({e.reason})"
            offset += len(line)
    return "unknown position"


def _not_utf8(path: Path) -> WorkloadError:
    return WorkloadError(f"{path}: not UTF-8 text ({_locate_bad_utf8(path)}); re-save the file as UTF-8")


def _csv_head(path: Path) -> tuple[list[str], list[str]]:
    """The header row (the first non-blank line) and the first data row after it (``[]`` if none), as the csv
    module reads them."""
    rows: list[list[str]] = []
    try:
        with _open(path, "rt", encoding="utf-8-sig", newline="") as f:
            for row in csv.reader(f):
                if any(c.strip() for c in row):
                    rows.append(row)
                    if len(rows) == 2:
                        break
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as e:
        raise WorkloadError(f"{path}: the header row cannot be read as CSV ({e})") from None
    rows += [[]] * (2 - len(rows))
    return rows[0], rows[1]


def _check_columns(path: Path, have: list[str], want: list[str], fmt: str = "") -> None:
    if not have:
        raise WorkloadError(f"{path}: file is empty; expected a header row with columns {want}")
    missing = [c for c in want if c not in have]
    if missing:
        hint = ""
        spaced = [h for h in have if h != h.strip() and h.strip() in missing]
        if spaced:
            hint = f" (the header has {spaced}: names with surrounding spaces; remove the spaces)"
        elif len(have) == 1 and any(sep in have[0] for sep in ("\t", ";", "|")):
            hint = " (the header looks tab-, semicolon- or bar-separated; specbatch reads comma-separated CSV)"
        if fmt == "csv" and (Path(path.stem) if _compression(path) else path).suffix.lower() != ".csv":
            hint += f" (read as CSV by its suffix; {FORMATS_HELP}: set workload.format)"
        raise WorkloadError(f"{path}: missing column(s) {missing}; the file has {_echo(have)}{hint}. "
                            "Set workload.columns to map arrival/prompt/output to the file's column names")
    for c in dict.fromkeys(want):
        if have.count(c) > 1:
            pos = [i + 1 for i, h in enumerate(have) if h == c]
            raise WorkloadError(f"{path}: column '{c}' appears {len(pos)} times in the header (columns {pos}); "
                                "expected each column once")


def _locate_bad_json(path: Path, want: list[str]) -> str:
    with _open(path, "rt", encoding="utf-8") as f:
        row = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if lineno == 1 and line.lstrip().startswith("["):
                    return (f"it starts with '[': a JSON array, not JSON lines; expected one JSON object per line "
                            f"with keys {want}")
                return f"line {lineno} (row {row}) is not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(obj, dict):
                return (f"line {lineno} (row {row}) is {type(obj).__name__}; expected a JSON object with keys {want} "
                        "on each line")
    return "not valid JSON lines"


def _too_many_fields(path: Path, what: str) -> WorkloadError:
    return WorkloadError(f"{path}: {what}; expected one value per header column (a stray comma, or a value with "
                         "a comma that is not quoted?)")


def _csv_chunks(path: Path, have: list[str], first: list[str], usecols: list[str], dtypes: dict | None):
    """CSV chunks of ``usecols``; a row with more (non-empty) fields than the header is an error naming it.

    Every column is parsed (unused ones as text, then dropped): pandas checks a row's field count only when
    it reads all of them. A file whose rows end in empty fields (a trailing comma) is read with that many
    unnamed columns, which must stay empty (``first``, the first data row, tells how many there are)."""
    width = max(len(have), len(first))
    extra = [f"__specbatch_trailing_{j}" for j in range(width - len(have))]
    names = [h if h in usecols else f"__specbatch_column_{i}" for i, h in enumerate(have)] + extra
    if dtypes is None:
        kw = dict(dtype=str, keep_default_na=False)
    else:
        kw = dict(dtype={**{h: str for h in names}, **dtypes})
    offset = 0
    try:
        for df in pd.read_csv(path, header=0, names=names, index_col=False, chunksize=CHUNK_ROWS,
                              encoding="utf-8-sig", **kw):
            for c in extra:
                filled = df[c].fillna("").astype(str).str.strip().str.len().to_numpy() > 0
                if filled.any():
                    row = offset + int(np.flatnonzero(filled)[0]) + 1
                    raise _too_many_fields(path, f"row {row} has a value in field {len(have) + 1 + extra.index(c)} "
                                                 f"but the header has {len(have)} fields")
            offset += len(df)
            yield df[usecols]
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m is None:
            raise
        raise _too_many_fields(path, f"line {m.group(2)} has {m.group(3)} fields but the header has {len(have)}") \
            from None


def _chunks(path: Path, fmt: str, usecols: list[str], dtypes: dict | None):
    """Yield the trace as DataFrames of at most CHUNK_ROWS rows holding ``usecols``.

    CSV with ``dtypes=None`` reads every cell as text (exact values for messages); with ``dtypes`` the C
    parser converts numbers directly (fast; raises ValueError on a non-numeric cell)."""
    if fmt == "csv":
        have, first = _csv_head(path)
        _check_columns(path, have, usecols, fmt)
        if len(first) > len(have) and any(c.strip() for c in first[len(have):]):
            raise _too_many_fields(path, f"row 1 has {len(first)} fields but the header has {len(have)}")
        yield from _csv_chunks(path, have, first, usecols, dtypes)
    elif fmt == "jsonl":
        with _open(path, "rb") as f:
            head = f.read(1 << 16).lstrip()
        if not head:
            raise WorkloadError(f"{path}: file is empty; expected one JSON object per line with keys {usecols}")
        if not head.startswith(b"{"):
            raise WorkloadError(f"{path}: cannot be read as JSON lines ({_locate_bad_json(path, usecols)})")
        first = True
        try:
            reader = pd.read_json(path, lines=True, dtype=False, chunksize=CHUNK_ROWS, encoding="utf-8")
            for df in reader:
                if first:
                    _check_columns(path, [str(c) for c in df.columns], usecols)
                    first = False
                yield df.reindex(columns=usecols)
        except (ValueError, TypeError, AttributeError) as e:  # pandas: TypeError/AttributeError for a non-object line
            if isinstance(e, (WorkloadError, UnicodeDecodeError)):
                raise
            raise WorkloadError(f"{path}: cannot be read as JSON lines ({_locate_bad_json(path, usecols)})") from None
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise WorkloadError(f"{path}: cannot be read as parquet ({str(e).splitlines()[0]})") from None
        _check_columns(path, pf.schema_arrow.names, usecols, fmt)
        for batch in pf.iter_batches(batch_size=CHUNK_ROWS, columns=usecols):
            yield batch.to_pandas()


def _text(s: pd.Series) -> pd.Series:
    return s.astype(str).str.strip().str.lower()


def _token_codes(s: pd.Series, typed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(values as int64 with bad entries set to 1, reason codes into _TOKEN_REASONS)."""
    s = _no_booleans(s)
    v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float) if not typed else s.to_numpy(dtype=float)
    nan = np.isnan(v)
    code = np.zeros(len(v), np.uint8)
    if nan.any() or not np.isfinite(v).all():
        t = _text(s[nan]) if nan.any() else None
        empty = np.zeros(len(v), bool)
        words = np.zeros(len(v), bool)
        if t is not None:
            empty[nan] = (s[nan].isna() | (t == "")).to_numpy()
            words[nan] = t.isin(_NAN_WORDS).to_numpy()
        code = np.select([empty, nan & ~words, nan | np.isinf(v)], [1, 2, 3], 0).astype(np.uint8)
    with np.errstate(invalid="ignore"):
        fin = code == 0
        code[fin & (v < 0)] = 4
        code[fin & (v == 0)] = 5
        code[(code == 0) & (v != np.floor(v))] = 6
        code[(code == 0) & (v > MAX_TOKENS)] = 7
    out = np.where(code == 0, v, 1).astype(np.int64)
    return out, code


def _no_booleans(s: pd.Series) -> pd.Series:
    """``s`` with JSON/Parquet booleans as text ('True'), so that they read as "not a number", never as 1."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype(str)
    if s.dtype == object:
        isbool = s.map(lambda x: isinstance(x, (bool, np.bool_))).to_numpy(dtype=bool)
        if isbool.any():
            s = s.copy()
            s[isbool] = s[isbool].astype(str)
    return s


def _numbers_in(s: pd.Series) -> np.ndarray:
    """Which entries of ``s`` are numbers (or text that reads as one)."""
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return np.zeros(len(s), bool)
    return pd.to_numeric(_no_booleans(s), errors="coerce").notna().to_numpy()


def _time_codes(s: pd.Series, unit: str, typed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(float seconds, or int64 ns since the epoch for date-times; reason codes)."""
    if unit == "datetime":
        try:
            ts = pd.to_datetime(s, errors="coerce", format="mixed", utc=True)
        except (ValueError, TypeError, OverflowError):  # pandas raises on some mixes even with coerce
            ts = pd.Series([pd.to_datetime(x, errors="coerce", utc=True) for x in s], index=s.index)
        numeric = _numbers_in(s)
        bad = ts.isna().to_numpy() | numeric  # a number is never a date-time (pandas reads it as ns, "2023" as a year)
        code = np.zeros(len(s), np.uint8)
        if bad.any():
            empty = (s.isna() | (_text(s) == "")).to_numpy()
            code[bad] = np.where(numeric[bad], 3, np.where(empty[bad], 1, 2))
        ns = ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        return np.where(bad, 0, ns), code
    v, code = _token_codes(s, typed)  # reuse the number checks; remap the token-only ones
    fv = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float) if not typed else s.to_numpy(dtype=float)
    code = np.where(code >= 5, 0, code).astype(np.uint8)  # zero, fractions and large values are fine times
    secs = np.where(code == 0, fv, 0.0)
    return (secs / 1000.0 if unit == "ms" else secs), code


@dataclass
class _Bad:
    """Bad-value bookkeeping for one column: count and first row per reason, and that row's raw value."""

    reasons: tuple[str, ...]
    count: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)  # reason code -> (row, raw value)

    def add(self, code: np.ndarray, raw: pd.Series, offset: int) -> None:
        for c in np.unique(code[code > 0]).tolist():
            idx = np.flatnonzero(code == c)
            self.count[c] = self.count.get(c, 0) + len(idx)
            if c not in self.first:
                self.first[c] = (offset + int(idx[0]) + 1, raw.iloc[int(idx[0])])


def _raw(v):
    if isinstance(v, float) and np.isnan(v):
        return ""  # a missing value (JSON null, absent key)
    return v.item() if isinstance(v, np.generic) else v


def load_trace(path: str | os.PathLike, columns: dict | None = None, time_unit: str = "s", fmt: str = "auto",
               on_bad_rows: str = "error", sort: bool = False, class_column: str | None = None,
               name: str | None = None) -> Workload:
    """Load a request trace from CSV, JSONL or Parquet.

    ``columns`` maps ``arrival``, ``prompt`` and ``output`` to the file's column names. ``time_unit`` is
    ``s``, ``ms`` or ``datetime`` (date-time strings; time zones are honoured, naive times taken as UTC).
    ``on_bad_rows="skip"`` drops rows with missing, non-numeric, NaN, negative, zero or fractional token
    values and records how many and why (per column and reason, with the first such row) in
    ``Workload.notes`` and a :class:`SkippedRowsWarning`; ``"error"`` raises on the first one. Unsorted
    arrivals raise unless ``sort=True``; equal arrival times (bursts) are fine. Arrivals are shifted so the
    first is at 0 s. Rows are numbered from 1 for the first data row (the header is not counted).

    The file is parsed in chunks of :data:`CHUNK_ROWS` rows, so memory stays bounded by the result arrays
    (24 bytes per request) plus one chunk.
    """
    path = Path(path)
    unknown = sorted(set(columns or {}) - set(COLUMN_KEYS))
    if unknown:
        raise WorkloadError(f"{path}: workload.columns has unknown key(s) {unknown}; expected keys {list(COLUMN_KEYS)}")
    columns = {"arrival": "arrival", "prompt": "prompt", "output": "output", **(columns or {})}
    if time_unit not in TIME_UNIT_CHOICES:
        raise WorkloadError(f"{path}: time_unit {time_unit!r}; expected one of {list(TIME_UNITS)} or 'auto'")
    if on_bad_rows not in ("error", "skip"):
        raise WorkloadError(f"{path}: on_bad_rows {on_bad_rows!r}; expected 'error' or 'skip'")
    if not path.is_file():
        raise WorkloadError(f"{path}: trace file not found" + (" (it is a folder)" if path.is_dir() else ""))
    fmt = _detect_format(path, fmt)
    ca, cp, co = columns["arrival"], columns["prompt"], columns["output"]
    usecols = list(dict.fromkeys([ca, cp, co] + ([class_column] if class_column else [])))
    if len(usecols) < 3 + bool(class_column):
        raise WorkloadError(f"{path}: workload.columns maps two keys to one column ({columns}); "
                            "expected distinct columns for arrival, prompt and output")
    try:
        time_unit, unit_note = _resolve_time_unit(path, fmt, usecols, ca, time_unit)
        typed = None
        if fmt == "csv":  # fast path: let the C parser convert numbers; fall back to text on anything odd
            typed = {cp: "float64", co: "float64", ca: str if time_unit == "datetime" else "float64"}
            if class_column:
                typed[class_column] = str
        try:
            parsed = _parse(path, fmt, usecols, typed, ca, cp, co, class_column, time_unit, on_bad_rows)
        except _Fallback:
            parsed = _parse(path, fmt, usecols, None, ca, cp, co, class_column, time_unit, on_bad_rows)
    except WorkloadError:
        raise
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except pd.errors.EmptyDataError:
        raise WorkloadError(f"{path}: file is empty; expected a header row with columns {usecols}") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise WorkloadError(f"{path}: cannot be read as {fmt} ({str(e).splitlines()[0]})") from None
    t, p, o, classes, bad, keep, n_rows = parsed
    if n_rows == 0:
        raise WorkloadError(f"{path}: no data rows (only a header)")
    notes = [unit_note] if unit_note else []
    rows = None  # original 0-based row index of each kept request, when rows were dropped
    if keep is not None:
        n_bad = int((~keep).sum())
        detail = []
        for col, b in bad.items():
            total = int(sum(b.count.values()))
            if total:
                notes.append(f"skipped {total} row(s) with a bad '{col}' value")
                for c in sorted(b.count):
                    row, raw = b.first[c]
                    detail.append(f"column '{col}' was {b.reasons[c]} in {b.count[c]} row(s) (first: row {row}, {_raw(raw)!r})")
        notes = ([unit_note] if unit_note else []) + [f"skipped {n_bad} of {n_rows} row(s); {n_rows - n_bad} left"] \
            + notes[bool(unit_note):] + detail
        if not keep.any():
            raise WorkloadError(f"{path}: every row was bad; nothing left to replay ({'; '.join(detail)})")
        rows = np.flatnonzero(keep)
        t, p, o = t[keep], p[keep], o[keep]
        classes = classes[keep] if classes is not None else None
        warnings.warn(f"{path}: " + "; ".join(notes[bool(unit_note):]), SkippedRowsWarning, stacklevel=2)
    if time_unit == "datetime":
        t = (t - t.min()) / 1e9
    if not sort:
        dec = np.flatnonzero(np.diff(t) < 0)
        if len(dec):
            i = int(dec[0]) + 1
            row = (rows[i] if rows is not None else i) + 1
            raise WorkloadError(f"{path}: row {row}, column '{ca}': arrival goes backwards "
                                f"({t[i]:.6f} s after {t[i - 1]:.6f} s); sort the file or set workload.sort=true")
    order = np.argsort(t, kind="stable")
    if not np.array_equal(order, np.arange(len(order))):
        t, p, o = t[order], p[order], o[order]
        classes = classes[order] if classes is not None else None
    rc, class_names = None, ()
    if class_column:
        codes, uniques = pd.factorize(classes, sort=True)
        rc, class_names = codes.astype(np.int64), tuple(str(u) for u in uniques)
    return Workload(arrival_s=t - t[0], prompt_tokens=p, output_tokens=o, name=name or path.stem,
                    request_class=rc, class_names=class_names, notes=tuple(notes))


EPOCH_S = (1e9, 1e10)  # Unix time in seconds: 2001-09-09 .. 2286-11-20
EPOCH_MS = (1e12, 1e13)  # the same span in milliseconds


def _resolve_time_unit(path: Path, fmt: str, usecols: list[str], ca: str, time_unit: str) -> tuple[str, str]:
    """(the unit to read the arrival column with, a note saying what was decided, or "").

    A Parquet timestamp column is read as date-times whatever ``time_unit`` says (its raw integers are
    microseconds or nanoseconds, never seconds). ``auto`` takes date-time strings as date-times and numbers
    as seconds or milliseconds when their size says so (Unix times: 1e9-1e10 s, 1e12-1e13 ms); otherwise it
    refuses to guess."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
        except (pa.ArrowException, OSError) as e:
            raise WorkloadError(f"{path}: cannot be read as parquet ({str(e).splitlines()[0]})") from None
        _check_columns(path, names, usecols, fmt)
        typ = pf.schema_arrow.field(ca).type
        if pa.types.is_timestamp(typ) or pa.types.is_date(typ):
            if time_unit in ("datetime",):
                return "datetime", ""
            return "datetime", (f"time_unit={time_unit}: column '{ca}' is a Parquet {typ} column, read as "
                                "date-times")
        if time_unit != "auto":
            return time_unit, ""
        sample = next(pf.iter_batches(batch_size=1000, columns=[ca])).to_pandas()[ca] if pf.metadata.num_rows \
            else pd.Series([], dtype=object)
    elif time_unit != "auto":
        return time_unit, ""
    else:
        sample = pd.Series([], dtype=object)
        for df in _chunks(path, fmt, usecols, None):
            sample = df[ca].head(1000)
            break
    s = sample[sample.notna() & (_text(sample) != "")]
    if not len(s):
        return "s", ""  # no arrival to read: the row checks report the empty values
    numeric = _numbers_in(s)
    if not numeric.any():
        return "datetime", f"time_unit=auto: column '{ca}' holds date-time strings; read as date-times"
    if not numeric.all():
        i, j = int(np.flatnonzero(numeric)[0]), int(np.flatnonzero(~numeric)[0])
        raise WorkloadError(f"{path}: column '{ca}' mixes numbers ({_echo(_raw(s.iloc[i]))}) and text "
                            f"({_echo(_raw(s.iloc[j]))}); time_unit=auto cannot tell how to read it: fix the column "
                            "or set workload.time_unit=s, ms or datetime")
    v = pd.to_numeric(_no_booleans(s), errors="coerce").to_numpy(dtype=float)
    lo, hi = float(np.min(v)), float(np.max(v))
    if EPOCH_S[0] <= lo and hi < EPOCH_S[1]:
        return "s", f"time_unit=auto: column '{ca}' holds Unix times in seconds ({lo:.10g}..); read as seconds"
    if EPOCH_MS[0] <= lo and hi < EPOCH_MS[1]:
        return "ms", f"time_unit=auto: column '{ca}' holds Unix times in milliseconds ({lo:.13g}..); read as ms"
    raise WorkloadError(f"{path}: column '{ca}' holds numbers ({lo:g} to {hi:g} in the first {len(v)} rows), "
                        "which time_unit=auto cannot tell as seconds or milliseconds; set workload.time_unit=s or "
                        "workload.time_unit=ms")


class _Fallback(Exception):
    """The fast typed parse met something it cannot describe exactly; reparse as text."""


def _parse(path, fmt, usecols, typed, ca, cp, co, class_column, time_unit, on_bad_rows):
    """Parse every chunk. Returns (t, p, o, classes, bad-bookkeeping, keep-mask or None, rows)."""
    treasons = _DATETIME_REASONS if time_unit == "datetime" else _TIME_REASONS
    bad = {ca: _Bad(treasons), cp: _Bad(_TOKEN_REASONS), co: _Bad(_TOKEN_REASONS)}
    ts, ps, os_, cs, masks = [], [], [], [], []
    offset = 0
    any_bad = False
    try:
        for df in _chunks(path, fmt, usecols, typed):
            is_typed = typed is not None
            t, ct = _time_codes(df[ca], time_unit, is_typed and time_unit != "datetime")
            p, cp_ = _token_codes(df[cp], is_typed)
            o, co_ = _token_codes(df[co], is_typed)
            badrow = (ct > 0) | (cp_ > 0) | (co_ > 0)
            if badrow.any():
                if is_typed:
                    raise _Fallback
                any_bad = True
                if on_bad_rows == "error":
                    i = int(np.flatnonzero(badrow)[0])
                    col, code, reasons = ((ca, ct[i], treasons) if ct[i] else (cp, cp_[i], _TOKEN_REASONS) if cp_[i]
                                          else (co, co_[i], _TOKEN_REASONS))
                    what = ("a date-time" if time_unit == "datetime" else "a finite, non-negative time") \
                        if col == ca else "a positive integer token count"
                    if col == ca and time_unit == "datetime" and code == 3:
                        raise WorkloadError(f"{path}: row {offset + i + 1}, column '{col}': {_raw(df[col].iloc[i])!r} "
                                            "is a number, but time_unit=datetime reads date-time strings; for "
                                            "numeric times set workload.time_unit=s or workload.time_unit=ms")
                    raise WorkloadError(f"{path}: row {offset + i + 1}, column '{col}': {_raw(df[col].iloc[i])!r} "
                                        f"is {reasons[code]}; expected {what} (set workload.on_bad_rows=skip to drop such rows)")
                for col, code in ((ca, ct), (cp, cp_), (co, co_)):
                    bad[col].add(code, df[col], offset)
            ts.append(t)
            ps.append(p)
            os_.append(o)
            masks.append(~badrow)
            if class_column:
                cls = df[class_column]  # a missing class is the class named "" (never the invalid code -1)
                cs.append(cls.where(cls.notna(), "").astype(str).to_numpy(dtype=object))
            offset += len(df)
    except ValueError as e:
        if typed is not None and not isinstance(e, (WorkloadError, UnicodeDecodeError)):
            raise _Fallback from None  # e.g. "could not convert string to float"
        raise
    if offset == 0:
        return np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64), None, bad, None, 0
    t = np.concatenate(ts)
    p, o = np.concatenate(ps), np.concatenate(os_)
    classes = np.concatenate(cs) if class_column else None
    keep = np.concatenate(masks) if any_bad else None
    return t, p, o, classes, bad, keep, offset


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


def set_rate(w: Workload, rate: float, key: str = "workload.rate") -> Workload:
    """Rescale arrival times so the mean rate over the trace is ``rate`` requests/second.

    A workload whose arrivals all fall at one instant (one request, or a single burst) has no rate to rescale:
    a :class:`WorkloadError` naming ``key`` (the config key that asked for the rate) says so."""
    if not rate > 0:
        raise WorkloadError(f"workload rate is {rate}; expected a positive rate in requests/second")
    if len(w) < 2 or w.duration_s == 0:
        what = "a single request" if len(w) < 2 else f"{len(w)} requests that all arrive at the same instant"
        raise WorkloadError(f"{key} is set but the workload ({w.name}) is {what}: it has no arrival rate to "
                            f"rescale; set {key}=null to replay the arrivals as they are")
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
