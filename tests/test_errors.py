"""Malformed input: every bad trace, profile or config gives one clear error naming the file, the row (or
config key), the bad value and what was expected -- never a traceback from deep inside pandas or numpy."""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import linear_step, write_formula_profile
from specbatch.sim import workload as wl
from specbatch.sim.cost_model import CostModel
from specbatch.sim.profile import ProfileError, ProfileWarning, load_profile
from specbatch.sim.run import ConfigError, run
from specbatch.sim.workload import SkippedRowsWarning, WorkloadError
from specbatch import conf_dir

HEADER = "arrival,prompt,output\n"


def _load(path, **kw):
    return wl.load_trace(path, **kw)


# --- traces ----------------------------------------------------------------------------------------------------

# (case id, file text, row, column, bad value, words that must appear); row None = a file-level error.
TRACE_CASES = [
    ("missing-column", "arrival,prompt\n0,5\n", None, None, None, ["missing column(s) ['output']", "the file has"]),
    ("misnamed-column", "time,prompt,output\n0,5,3\n", None, None, None, ["missing column(s) ['arrival']", "'time'"]),
    ("header-spaces", "arrival, prompt,output\n0,5,3\n", None, None, None, ["' prompt'", "surrounding spaces"]),
    ("tab-separated", "arrival\tprompt\toutput\n0\t5\t3\n", None, None, None, ["tab-", "comma-separated"]),
    ("duplicate-column", "arrival,prompt,output,output\n0,5,3,3\n", None, "output", None, ["appears 2 times"]),
    ("non-numeric-token", HEADER + "0,5,3\n1,abc,3\n", 2, "prompt", "'abc'", ["not a number", "positive integer"]),
    ("non-numeric-time", HEADER + "0,5,3\nsoon,5,3\n", 2, "arrival", "'soon'", ["not a number", "non-negative time"]),
    ("negative-output", HEADER + "0,5,-4\n", 1, "output", "'-4'", ["negative"]),
    ("negative-time", HEADER + "-1,5,4\n", 1, "arrival", "'-1'", ["negative"]),
    ("nan-token", HEADER + "0,5,3\n1,NaN,3\n", 2, "prompt", "'NaN'", ["NaN or infinite"]),
    ("nan-time", HEADER + "nan,5,3\n", 1, "arrival", "'nan'", ["NaN or infinite"]),
    ("infinite-time", HEADER + "0,5,3\ninf,5,3\n", 2, "arrival", "'inf'", ["NaN or infinite"]),
    ("empty-cell", HEADER + "0,5,3\n1,,3\n", 2, "prompt", "''", ["empty"]),
    ("short-row", HEADER + "0,5,3\n1,5\n", 2, "output", "''", ["empty"]),
    ("extra-field", HEADER + "0,5,3\n1,5,3,9\n", None, None, None, ["line 3 has 4 fields but the header has 3",
                                                                     "quoted"]),
    ("extra-fields-unused-column", "arrival,prompt,output,note\n0,5,3,a\n\n1,5,3,b,c,d\n", None, None, None,
     ["line 4 has 6 fields but the header has 4"]),
    ("extra-field-first-row", HEADER + "0,5,3,9\n1,5,3\n", None, None, None, ["row 1 has 4 fields but the header has 3"]),
    ("extra-field-after-trailing-commas", HEADER + "0,5,3,\n1,5,3,9\n", None, None, None,
     ["row 2 has a value in field 4 but the header has 3 fields"]),
    ("zero-prompt", HEADER + "0,0,3\n", 1, "prompt", "'0'", ["zero", "positive integer token count"]),
    ("zero-output", HEADER + "0,5,3\n1,5,0\n", 2, "output", "'0'", ["zero"]),
    ("fractional-tokens", HEADER + "0,5.5,3\n", 1, "prompt", "'5.5'", ["not an integer"]),
    ("overflowing-tokens", HEADER + "0,99999999999999999999999,3\n", 1, "prompt", "'99999999999999999999999'",
     ["larger than"]),
    ("unsorted", HEADER + "0,5,3\n2,5,3\n1,5,3\n", 3, "arrival", None, ["goes backwards", "workload.sort=true"]),
    ("empty-file", "", None, None, None, ["file is empty", "header row"]),
    ("blank-file", "\n  \n", None, None, None, ["file is empty"]),
    ("header-only", HEADER, None, None, None, ["no data rows"]),
]


@pytest.mark.parametrize("case,text,row,col,value,words", TRACE_CASES, ids=[c[0] for c in TRACE_CASES])
def test_malformed_csv_trace(tmp_path, case, text, row, col, value, words):
    path = tmp_path / f"{case}.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(WorkloadError) as e:
        _load(path)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    if row is not None:
        assert f"row {row}," in msg, msg
    if col is not None:
        assert f"'{col}'" in msg, msg
    if value is not None:
        assert value in msg, msg
    for w in words:
        assert w in msg, msg


def test_wrong_encodings_name_the_row(tmp_path):
    latin = tmp_path / "latin1.csv"
    latin.write_bytes((HEADER + "0,5,3\n").encode() + "1,5,3,café\n".encode("latin-1"))
    with pytest.raises(WorkloadError, match=r"not UTF-8 text \(line 3 \(data row 2\).*re-save the file as UTF-8"):
        _load(latin)
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes((HEADER + "0,5,3\n").encode("utf-16"))
    with pytest.raises(WorkloadError, match="UTF-16"):
        _load(utf16)
    bom = tmp_path / "bom.csv"  # a UTF-8 byte-order mark is fine
    bom.write_bytes(b"\xef\xbb\xbf" + (HEADER + "0,5,3\n").encode())
    assert len(_load(bom)) == 1


def test_malformed_jsonl_and_parquet(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival": 0, "prompt": 5, "output": 3}\n{"arrival": 1, "prompt": 5,\n')
    with pytest.raises(WorkloadError, match=r"bad.jsonl: cannot be read as JSON lines \(line 2 \(row 2\)"):
        _load(bad)
    array = tmp_path / "array.jsonl"
    array.write_text('{"arrival": 0, "prompt": 5, "output": 3}\n[1, 5, 3]\n')
    with pytest.raises(WorkloadError, match=r"line 2 \(row 2\) is list; expected a JSON object"):
        _load(array)
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"arrival": 0, "prompt": 5, "output": 3}\n{"arrival": 1, "prompt": "many", "output": 3}\n')
    with pytest.raises(WorkloadError, match=r"row 2, column 'prompt': 'many' is not a number"):
        _load(typed)
    null = tmp_path / "null.jsonl"
    null.write_text('{"arrival": 0, "prompt": 5, "output": null}\n')
    with pytest.raises(WorkloadError, match=r"row 1, column 'output': '' is empty"):
        _load(null)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(WorkloadError, match="empty.jsonl: file is empty"):
        _load(empty)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(WorkloadError, match="garbage.parquet: cannot be read as parquet"):
        _load(garbage)
    pq = tmp_path / "neg.parquet"
    pd.DataFrame({"arrival": [0.0, 1.0], "prompt": [5, -2], "output": [3, 3]}).to_parquet(pq)
    with pytest.raises(WorkloadError, match=r"row 2, column 'prompt': -2 is negative"):
        _load(pq)


def test_bad_datetimes_and_settings(tmp_path):
    dt = tmp_path / "dt.csv"
    dt.write_text(HEADER + "2024-01-01 00:00:00,5,3\nyesterday,5,3\n")
    with pytest.raises(WorkloadError, match=r"row 2, column 'arrival': 'yesterday' is not a date-time"):
        _load(dt, time_unit="datetime")
    ok = tmp_path / "ok.csv"
    ok.write_text(HEADER + "0,5,3\n")
    with pytest.raises(WorkloadError, match=r"time_unit 'hours'; expected one of \['s', 'ms', 'datetime'\]"):
        _load(ok, time_unit="hours")
    with pytest.raises(WorkloadError, match="on_bad_rows 'ignore'; expected 'error' or 'skip'"):
        _load(ok, on_bad_rows="ignore")
    with pytest.raises(WorkloadError, match=r"unknown key\(s\) \['arival'\]"):
        _load(ok, columns={"arival": "arrival"})
    with pytest.raises(WorkloadError, match="trace file not found"):
        _load(tmp_path / "nope.csv")
    with pytest.raises(WorkloadError, match="unknown format 'xml'"):
        _load(ok, fmt="xml")


def test_mixed_time_zones_are_converted_not_a_crash(tmp_path):
    path = tmp_path / "tz.csv"
    path.write_text(HEADER + "2024-03-31T00:30:00+01:00,5,3\n2024-03-31T01:30:00+02:00,5,3\n2024-03-31 00:00:00,5,3\n")
    w = _load(path, time_unit="datetime")  # 23:30Z, 23:30Z, 00:00Z (naive = UTC)
    assert w.arrival_s.tolist() == [0.0, 0.0, 1800.0]


def test_skip_mode_reports_how_many_rows_and_why(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text(HEADER + "0,5,3\n1,x,3\n2,5,0\n3,,0\n4,5,3\nnan,5,3\n6,5,2.5\n")
    with pytest.warns(SkippedRowsWarning, match="skipped 5 of 7 row"):
        w = _load(path, on_bad_rows="skip")
    assert len(w) == 2 and w.arrival_s.tolist() == [0.0, 4.0]
    notes = "\n".join(w.notes)
    assert "skipped 5 of 7 row(s); 2 left" in notes
    assert "skipped 2 row(s) with a bad 'prompt' value" in notes
    assert "column 'prompt' was not a number in 1 row(s) (first: row 2, 'x')" in notes
    assert "column 'prompt' was empty in 1 row(s) (first: row 4, '')" in notes
    assert "column 'output' was zero in 2 row(s) (first: row 3, '0')" in notes
    assert "column 'output' was not an integer in 1 row(s) (first: row 7, '2.5')" in notes
    assert "column 'arrival' was NaN or infinite in 1 row(s) (first: row 6, 'nan')" in notes


def test_skip_mode_keeps_original_row_numbers_in_later_errors(tmp_path):
    path = tmp_path / "skip_unsorted.csv"
    path.write_text(HEADER + "0,5,3\n1,x,3\n2,x,3\n5,5,3\n4,5,3\n")
    with pytest.warns(SkippedRowsWarning):
        with pytest.raises(WorkloadError, match=r"row 5, column 'arrival': arrival goes backwards"):
            _load(path, on_bad_rows="skip")


def test_skip_mode_with_every_row_bad_says_why(tmp_path):
    path = tmp_path / "allbad.csv"
    path.write_text(HEADER + "0,0,3\n1,0,3\n")
    with pytest.raises(WorkloadError, match=r"every row was bad.*'prompt' was zero in 2 row\(s\)"):
        _load(path, on_bad_rows="skip")


def test_unsorted_trace_loads_with_sort_true(tmp_path):
    path = tmp_path / "unsorted.csv"
    path.write_text(HEADER + "3,30,3\n1,10,1\n2,20,2\n1,11,1\n")
    w = _load(path, sort=True)
    assert w.arrival_s.tolist() == [0.0, 0.0, 1.0, 2.0]
    assert w.prompt_tokens.tolist() == [10, 11, 20, 30]  # stable: equal times keep file order


def test_duplicate_timestamps_are_legal(tmp_path):
    path = tmp_path / "burst.csv"
    path.write_text(HEADER + "".join(f"5.0,{i + 1},2\n" for i in range(500)) + "6.0,1,1\n")
    w = _load(path)
    assert len(w) == 501 and (w.arrival_s[:500] == 0).all() and w.arrival_s[-1] == 1.0


def test_fast_and_text_paths_agree(tmp_path):
    """Large files take a typed fast path; a single odd cell reparses as text -- same numbers either way."""
    rng = np.random.default_rng(3)
    n = 5000
    t = np.cumsum(rng.exponential(0.1, n))
    p, o = rng.integers(1, 4000, n), rng.integers(1, 500, n)
    clean = tmp_path / "clean.csv"
    pd.DataFrame({"arrival": t, "prompt": p, "output": o}).to_csv(clean, index=False)
    odd = tmp_path / "odd.csv"
    odd.write_text(clean.read_text() + f"{t[-1] + 1},lots,1\n")
    a = _load(clean)
    with pytest.warns(SkippedRowsWarning):
        b = _load(odd, on_bad_rows="skip")
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert np.array_equal(a.output_tokens, b.output_tokens)


# --- profiles --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_profile(tmp_path_factory):
    return write_formula_profile(tmp_path_factory.mktemp("profiles") / "good",
                                 verify=linear_step(0.010, 0.0005, 1e-7, knee=16), draft=linear_step(0.001, 0.00002),
                                 batches=(1, 2, 4, 8), max_tokens=5, contexts=(128, 512), prompts=(16, 256, 1024))


def _variant(src: Path, dst: Path, steps=None, meta=None, write_steps: bytes | None = None,
             write_meta: bytes | None = None, remove: str | None = None, acceptance: bytes | None = None) -> Path:
    shutil.copytree(src, dst)
    if steps is not None:
        df = steps(pd.read_csv(dst / "steps.csv"))
        df.to_csv(dst / "steps.csv", index=False)
    if meta is not None:
        m = json.loads((dst / "meta.json").read_text())
        meta(m)
        (dst / "meta.json").write_text(json.dumps(m))
    if write_steps is not None:
        (dst / "steps.csv").write_bytes(write_steps)
    if write_meta is not None:
        (dst / "meta.json").write_bytes(write_meta)
    if acceptance is not None:
        (dst / "acceptance.csv").write_bytes(acceptance)
    if remove:
        (dst / remove).unlink()
    return dst


def _at(df, value, col, **where):
    m = np.ones(len(df), bool)
    for k, v in where.items():
        m &= (df[k] == v).to_numpy()
    df.loc[m, col] = value
    return df


def _set(key, value):
    def f(m):
        m[key] = value
    return f


def _drop_point(**where):
    def f(df):
        m = np.ones(len(df), bool)
        for k, v in where.items():
            m &= (df[k] == v).to_numpy()
        return df[~m]
    return f


def _scale(factor, **where):
    def f(df):
        m = np.ones(len(df), bool)
        for k, v in where.items():
            m &= (df[k] == v).to_numpy()
        for col in ("median_s", "p10_s", "p90_s"):  # a consistent row: p10 ≤ median ≤ p90 still holds
            df.loc[m, col] = df.loc[m, col] * factor
        return df
    return f


STEP_LINE = 7  # the test edits data row 6 (0-based index 5): "row 6 (line 7)"
PROFILE_CASES = [
    ("missing-meta", dict(remove="meta.json"), "meta.json", ["file not found"]),
    ("missing-steps", dict(remove="steps.csv"), "steps.csv", ["file not found"]),
    ("schema-version", dict(meta=_set("schema_version", 2)), "meta.json", ["'schema_version' is 2", "schema version 1"]),
    ("schema-version-string", dict(meta=_set("schema_version", "1")), "meta.json", ["'schema_version' is '1'"]),
    ("meta-missing-key", dict(meta=lambda m: m.pop("device")), "meta.json", ["missing key(s) ['device']"]),
    ("meta-not-json", dict(write_meta=b"{schema_version: 1"), "meta.json", ["not valid JSON"]),
    ("meta-not-object", dict(write_meta=b"[1, 2]"), "meta.json", ["expected a JSON object"]),
    ("meta-latin1", dict(write_meta='{"dtype": "é"}'.encode("latin-1")), "meta.json", ["not UTF-8 text", "line 1"]),
    ("kv-bytes-zero", dict(meta=lambda m: m["models"]["draft"].update(kv_bytes_per_token=0)), "meta.json",
     ["'models.draft.kv_bytes_per_token' is 0", "positive, finite number"]),
    ("device-not-object", dict(meta=_set("device", "cpu")), "meta.json", ["key 'device' is 'cpu'"]),
    ("steps-empty", dict(write_steps=b""), "steps.csv", ["file is empty"]),
    ("steps-header-only", dict(write_steps=b"model,phase,batch,tokens,context,median_s,p10_s,p90_s,samples,status\n"),
     "steps.csv", ["no rows"]),
    ("steps-missing-column", dict(steps=lambda d: d.drop(columns=["p90_s"])), "steps.csv", ["missing column(s) ['p90_s']"]),
    ("steps-bad-phase", dict(steps=lambda d: d.assign(phase=d["phase"].where(d.index != 5, "decoding"))),
     "steps.csv", [f"row 6 (line {STEP_LINE}), column 'phase': 'decoding'", "expected one of"]),
    ("steps-zero-time", dict(steps=lambda d: d.assign(median_s=d["median_s"].where(d.index != 5, 0.0))),
     "steps.csv", [f"row 6 (line {STEP_LINE}), column 'median_s': 0.0", "positive, finite time"]),
    ("steps-negative-time", dict(steps=lambda d: d.assign(p10_s=d["p10_s"].where(d.index != 5, -0.5))),
     "steps.csv", ["column 'p10_s': -0.5"]),
    ("steps-nan-time", dict(steps=lambda d: d.assign(median_s=d["median_s"].where(d.index != 5, np.nan))),
     "steps.csv", ["column 'median_s': nan"]),
    ("steps-p10-above-median", dict(steps=lambda d: d.assign(p10_s=d["p10_s"].where(d.index != 5, d["median_s"] * 2))),
     "steps.csv", [f"row 6 (line {STEP_LINE}): p10_s", "expected p10_s ≤ median_s ≤ p90_s"]),
    ("steps-batch-zero", dict(steps=lambda d: d.assign(batch=d["batch"].where(d.index != 5, 0))),
     "steps.csv", ["column 'batch': 0", "positive integer"]),
    ("steps-batch-text", dict(steps=lambda d: d.assign(batch=d["batch"].astype(str).where(d.index != 5, "eight"))),
     "steps.csv", ["column 'batch': 'eight'"]),
    ("steps-duplicate", dict(steps=lambda d: pd.concat([d, d.iloc[[3]]], ignore_index=True)), "steps.csv",
     ["row 4 (line 5) and row", "duplicate point"]),
    ("steps-latin1", dict(write_steps=b"model,phase\n\xe9,decode\n"), "steps.csv", ["not UTF-8 text (line 2"]),
    ("non-monotone-batch", dict(steps=_scale(0.3, model="target", batch=8, tokens=3, context=512)), "steps.csv",
     ["target decode/verify time falls", "at batch=4", "at batch=8", "tokens=3, context=512", "40 %"]),
    ("non-monotone-tokens", dict(steps=_scale(0.5, model="target", batch=1, tokens=4, context=128)), "steps.csv",
     ["at tokens=3", "at tokens=4", "batch=1, context=128"]),
    ("non-monotone-prefill", dict(steps=_scale(0.1, model="target", phase="prefill", tokens=1024)), "steps.csv",
     ["target prefill time falls", "tokens=256", "tokens=1024"]),
    ("oom-only-batch", dict(steps=lambda d: _at(d, "oom", "status", model="target", batch=2, phase="verify")),
     "steps.csv", ["only oom/error rows at batch 2", "ok rows at larger batches"]),
    ("no-draft-rows", dict(steps=lambda d: d[d["model"] != "draft"]), "steps.csv", ["no ok draft decode rows"]),
    ("unfillable-hole", dict(steps=lambda d: d[~((d["model"] == "draft") & (d["phase"] == "decode") &
                                                 (d["context"] == 128) & (d["batch"] > 1))
                                               & ~((d["model"] == "draft") & (d["phase"] == "decode") &
                                                   (d["context"] == 512) & (d["batch"] == 1))]),
     "steps.csv", ["draft decode grid", "no measured neighbour"]),
    ("acceptance-alpha", dict(acceptance=b"position,alpha,samples\n1,0.8,10\n2,1.2,10\n"), "acceptance.csv",
     ["row 2 (line 3), column 'alpha': 1.2", "probability in [0, 1]"]),
    ("acceptance-positions", dict(acceptance=b"position,alpha,samples\n1,0.8,10\n3,0.5,10\n"), "acceptance.csv",
     ["'position' must hold 1..2"]),
    ("acceptance-utf16", dict(acceptance="position,alpha\n".encode("utf-16")), "acceptance.csv", ["not UTF-8 text"]),
    ("acceptance-empty", dict(acceptance=b""), "acceptance.csv", ["file is empty"]),
]


@pytest.mark.parametrize("case,edit,file,words", PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES])
def test_malformed_profile(tmp_path, good_profile, case, edit, file, words):
    folder = _variant(good_profile, tmp_path / case, **edit)
    with pytest.raises(ProfileError) as e:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CostModel(load_profile(folder), max_batch=8, max_gamma=4)
    msg = str(e.value)
    assert str(folder / file) in msg, msg
    for w in words:
        assert w in msg, msg


def test_small_timing_dips_and_filled_holes_are_accepted(tmp_path, good_profile):
    dip = _variant(good_profile, tmp_path / "dip", steps=_scale(0.85, model="target", batch=8, tokens=3, context=512))
    CostModel(load_profile(dip), max_batch=8, max_gamma=4)  # 15 % below batch 4: noise, allowed
    hole = _variant(good_profile, tmp_path / "hole", steps=_drop_point(model="target", batch=4, tokens=3, context=512))
    full = CostModel(load_profile(good_profile), max_batch=8, max_gamma=4)
    filled = CostModel(load_profile(hole), max_batch=8, max_gamma=4)
    # linear in batch between 2 and 8 at tokens=3 (compute-bound part is linear in b·tokens)
    assert filled.target_verify(4, 2, 512) == pytest.approx(full.target_verify(4, 2, 512), rel=0.05)
    top_oom = _variant(good_profile, tmp_path / "oom", steps=lambda d: _at(d, "oom", "status", model="target", batch=8,
                                                                           phase="verify"))
    CostModel(load_profile(top_oom), max_batch=8, max_gamma=4)  # oom at the largest batch only bounds the grid


def test_incomplete_profile_gets_a_warning_not_an_error(tmp_path, good_profile):
    """An interim capture (meta.json timing.complete=false) is used knowingly: the same finding is a warning."""
    folder = _variant(good_profile, tmp_path / "interim", steps=_scale(0.3, model="target", batch=8, tokens=3, context=512),
                      meta=lambda m: m["timing"].update(complete=False))
    with pytest.warns(ProfileWarning, match=r"time falls .* at batch=8 .*timing.complete=false"):
        CostModel(load_profile(folder), max_batch=8, max_gamma=4)


def test_missing_profile_folder():
    with pytest.raises(ProfileError, match="/no/such/profile: profile folder not found"):
        load_profile("/no/such/profile")


# --- configs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "small.csv"
    path.write_text(HEADER + "".join(f"{i * 0.2},{40 + 7 * i},{5 + i % 6}\n" for i in range(12)))
    return path


@pytest.fixture(scope="module")
def base_cfg(good_profile, small_trace):
    """The shipped config composed once (composing costs ~0.5 s), pointed at the small trace and profile."""
    base = [f"profile={good_profile}", f"workload.path={small_trace}",
            "workload.columns={arrival:arrival,prompt:prompt,output:output}", "workload.time_unit=s",
            "workload.first_n=null", "workload.load=null", "workload.rate=4", "cluster.max_batch=8", "max_gamma=4",
            "print_summary=false"]
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=base)


def _cfg(base, **keys):
    """A copy of ``base`` with dotted keys set (``policy`` replaces the whole policy group)."""
    cfg = copy.deepcopy(base)
    for k, v in keys.items():
        OmegaConf.update(cfg, k.replace("__", "."), v, merge=False, force_add=True)
    return cfg


CONFIG_CASES = [
    (dict(policy={"name": "speculate_harder"}), "policy.name is 'speculate_harder'"),
    (dict(policy={"name": "fixed", "gamma": -1}), "policy.gamma is -1; expected an integer ≥ 0"),
    (dict(policy={"name": "fixed", "gamma": 9}), "policy.gamma is 9 but max_gamma is 4"),
    (dict(policy={"name": "adaptive", "context": None, "max_gamma": -2}), "policy.max_gamma is -2"),
    (dict(policy={"name": "adaptive", "context": 0, "max_gamma": None}), "policy.context is 0; expected a number > 0"),
    (dict(max_gamma=-1), "max_gamma is -1; expected an integer ≥ 0"),
    (dict(acceptance__alpha=1.5), "acceptance.alpha is 1.5; expected a probability in [0, 1]"),
    (dict(acceptance__alpha=-0.1), "acceptance.alpha is -0.1; expected a probability in [0, 1]"),
    (dict(acceptance__alpha="high"), "acceptance.alpha is 'high'"),
    (dict(acceptance__concentration=0), "acceptance.concentration is 0"),
    (dict(acceptance__source="oracle"), "acceptance.source is 'oracle'"),
    (dict(slo__ttft_s=0), "slo.ttft_s is 0; expected a number > 0"),
    (dict(slo__tpot_s=-0.1), "slo.tpot_s is -0.1; expected a number > 0"),
    (dict(slo__ttft_s="fast"), "slo.ttft_s is 'fast'"),
    (dict(seed="lucky"), "seed is 'lucky'; expected an integer ≥ 0"),
    (dict(cluster__replicas=0), "cluster.replicas is 0; expected an integer ≥ 1"),
    (dict(cluster__router="nearest"), "cluster.router is 'nearest'"),
    (dict(cluster__watermark=1.0), "cluster.watermark is 1.0"),
    (dict(cluster__kv_capacity_tokens=1), "cluster.kv_capacity_tokens is 1"),
    (dict(cluster__kv_capacity_tokens=2.5), "cluster.kv_capacity_tokens is 2.5; expected an integer ≥ 2"),
    (dict(cluster__watermark="high"), "cluster.watermark is 'high'; expected a fraction in [0, 1)"),
    (dict(cluster__fast_forward="yes"), "cluster.fast_forward is 'yes'; expected true or false"),
    (dict(cluster__workers=0), "cluster.workers is 0; expected an integer ≥ 1"),
    (dict(cluster__draft_sync="sometimes"), "cluster.draft_sync is 'sometimes'; expected true or false"),
    (dict(cluster__workers=2, cluster__replicas=4, cluster__router="least_kv"),
     "cluster.workers is 2 but router 'least_kv' looks at every replica's state"),
    (dict(workload__kind="replay"), "workload.kind is 'replay'"),
    (dict(workload__path="/no/such/trace.csv"), "workload.path: '/no/such/trace.csv' not found"),
    (dict(profile="/no/such/profile"), "profile: '/no/such/profile' not found"),
]


@pytest.mark.parametrize("keys,expected", CONFIG_CASES, ids=[c[1].split(" is ")[0].split(":")[0] + f"-{i}"
                                                            for i, c in enumerate(CONFIG_CASES)])
def test_bad_config_is_a_config_error_naming_the_key(base_cfg, keys, expected):
    with pytest.raises(ConfigError) as e:
        run(_cfg(base_cfg, **keys))
    assert expected in str(e.value)


@pytest.mark.parametrize("keys,expected", [
    (dict(workload__rate=0), "workload rate is 0.0; expected a positive rate"),
    (dict(workload__time_scale=-2), "workload.time_scale is -2.0"),
    (dict(workload__first_n=0), "workload.first_n is 0; expected at least 1"),
    (dict(workload__max_output=0), "workload.max_output is 0"),
    (dict(workload__start_s=100), "no request arrives in the window"),
])
def test_bad_workload_settings_are_workload_errors(base_cfg, keys, expected):
    with pytest.raises(WorkloadError) as e:
        run(_cfg(base_cfg, **keys))
    assert expected in str(e.value)


def test_profile_without_prefill_rows_fails_before_simulating(tmp_path, good_profile, base_cfg):
    folder = _variant(good_profile, tmp_path / "noprefill", steps=lambda d: d[d["phase"] != "prefill"])
    with pytest.raises(ProfileError, match="no ok prefill rows for model=target"):
        run(_cfg(base_cfg, profile=str(folder)))


def test_missing_request_class_is_the_empty_class(tmp_path):
    path = tmp_path / "classes.csv"
    path.write_text("arrival,prompt,output,kind\n0,5,3,code\n1,5,3,\n2,5,3,chat\n")
    w = _load(path, class_column="kind")
    assert w.class_names == ("", "chat", "code") and w.request_class.tolist() == [2, 0, 1]
