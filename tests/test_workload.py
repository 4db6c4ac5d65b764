"""Workloads: trace formats and time units, the shipped Azure traces, synthetic arrivals, transforms."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from specbatch.sim import workload as wl
from specbatch.sim.workload import WorkloadError
from specbatch import traces_dir

AZURE_COLUMNS = {"arrival": "TIMESTAMP", "prompt": "ContextTokens", "output": "GeneratedTokens"}


@pytest.fixture
def frame():
    return pd.DataFrame({"t": [0.5, 1.0, 1.0, 3.5], "p": [10, 20, 30, 40], "o": [1, 2, 3, 4]})


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_formats_load_identically(tmp_path, frame, suffix):
    path = tmp_path / f"trace.{suffix}"
    if suffix == "csv":
        frame.to_csv(path, index=False)
    elif suffix == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    w = wl.load_trace(path, {"arrival": "t", "prompt": "p", "output": "o"})
    assert w.arrival_s.tolist() == [0.0, 0.5, 0.5, 3.0]
    assert w.prompt_tokens.tolist() == [10, 20, 30, 40] and w.output_tokens.tolist() == [1, 2, 3, 4]


def test_time_units(tmp_path):
    (tmp_path / "ms.csv").write_text("t,p,o\n1000,1,1\n2500,1,1\n")
    assert wl.load_trace(tmp_path / "ms.csv", {"arrival": "t", "prompt": "p", "output": "o"}, "ms").arrival_s.tolist() == [0, 1.5]
    (tmp_path / "dt.csv").write_text("t,p,o\n2023-11-16 18:15:46.6805900,1,1\n2023-11-16 18:15:50.9951690,1,1\n")
    w = wl.load_trace(tmp_path / "dt.csv", {"arrival": "t", "prompt": "p", "output": "o"}, "datetime")
    assert w.arrival_s[1] == pytest.approx(4.314579)


def test_shipped_azure_traces_load_with_documented_statistics():
    conv = wl.load_trace(traces_dir() / "azure/AzureLLMInferenceTrace_conv.csv", AZURE_COLUMNS, "datetime")
    code = wl.load_trace(traces_dir() / "azure/AzureLLMInferenceTrace_code.csv", AZURE_COLUMNS, "datetime")
    assert len(conv) == 19366 and len(code) == 8819
    dc, dk = conv.describe(), code.describe()
    assert dc["rate_per_s"] == pytest.approx(5.53, abs=0.01) and dk["rate_per_s"] == pytest.approx(2.57, abs=0.01)
    assert dc["prompt_p50"] == 1020 and dc["output_p50"] == 129
    assert dk["prompt_p50"] == 1469 and dk["output_p50"] == 13
    assert dc["interarrival_cv"] == pytest.approx(1.09, abs=0.01) and dk["interarrival_cv"] == pytest.approx(13.2, abs=0.1)


def test_malformed_trace_names_file_row_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("t,p,o\n0.0,10,5\n1.0,abc,5\n")
    with pytest.raises(WorkloadError) as e:
        wl.load_trace(path, {"arrival": "t", "prompt": "p", "output": "o"})
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and "'p'" in msg and "'abc'" in msg
    skipped = wl.load_trace(path, {"arrival": "t", "prompt": "p", "output": "o"}, on_bad_rows="skip")
    assert len(skipped) == 1 and "skipped 1 row(s) with a bad 'p' value" in skipped.notes


def test_missing_column_lists_what_the_file_has(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("time,prompt,output\n0,1,1\n")
    with pytest.raises(WorkloadError, match=r"missing column\(s\) \['arrival'\].*'time'"):
        wl.load_trace(path)


@pytest.mark.parametrize("process,cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 3.0)])
def test_synthetic_arrivals_have_the_requested_rate_and_cv(process, cv):
    t = wl.synthetic_arrivals(50_000, rate=4.0, process=process, cv=cv, rng=np.random.default_rng(0))
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_synthetic_lengths_from_trace_and_lognormal(tmp_path):
    src = wl.Workload(np.arange(3.0), np.array([10, 20, 30]), np.array([1, 2, 3]))
    w = wl.synthetic(1000, rate=1.0, lengths_from=src, seed=1)
    assert set(zip(w.prompt_tokens, w.output_tokens)) <= {(10, 1), (20, 2), (30, 3)}
    ln = wl.synthetic(20_000, rate=1.0, prompt_lognormal=(500, 0.5), output_lognormal=(100, 1.0), seed=2)
    assert np.median(ln.prompt_tokens) == pytest.approx(500, rel=0.05)
    assert np.median(ln.output_tokens) == pytest.approx(100, rel=0.05)
    again = wl.synthetic(20_000, rate=1.0, prompt_lognormal=(500, 0.5), output_lognormal=(100, 1.0), seed=2)
    assert np.array_equal(ln.arrival_s, again.arrival_s)


def test_transforms():
    w = wl.Workload(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), np.array([5, 50, 500, 5, 5]), np.array([1, 10, 100, 1, 1]))
    win = wl.window(w, 1.0, 3.0)
    assert win.arrival_s.tolist() == [0.0, 1.0] and win.prompt_tokens.tolist() == [50, 500]
    assert len(wl.first_n(w, 2)) == 2
    assert wl.scale_time(w, 2.0).arrival_s.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert wl.set_rate(w, 4.0).rate == pytest.approx(4.0)
    capped = wl.cap_lengths(w, max_prompt=40, max_output=5)
    assert capped.prompt_tokens.tolist() == [5, 40, 40, 5, 5] and capped.output_tokens.tolist() == [1, 5, 5, 1, 1]
    with pytest.raises(WorkloadError, match="no request arrives"):
        wl.window(w, 10.0, 20.0)


def test_save_and_reload_roundtrip(tmp_path):
    w = wl.synthetic(50, rate=3.0, seed=4)
    for suffix in ("csv", "jsonl", "parquet"):
        wl.save_workload(w, tmp_path / f"w.{suffix}")
        back = wl.load_trace(tmp_path / f"w.{suffix}", {"arrival": "arrival_s"})
        assert np.allclose(back.arrival_s, w.arrival_s) and np.array_equal(back.output_tokens, w.output_tokens)


def test_csv_layouts_that_are_not_errors(tmp_path):
    """Quoted commas, empty cells in unused (even duplicate) columns, blank lines and rows that end in a
    trailing comma all load, to the same values."""
    for text in ('note,arrival,prompt,output,note\n"a, b",0,5,3,x\n\n"c",1,6,4,\n',
                 "arrival,prompt,output\n0,5,3,\n1,6,4,\n", "arrival,prompt,output\n0,5,3,\n1,6,4\n"):
        p = tmp_path / "ok.csv"
        p.write_text(text, encoding="utf-8")
        w = wl.load_trace(p)
        assert w.prompt_tokens.tolist() == [5, 6] and w.output_tokens.tolist() == [3, 4], text
        assert w.arrival_s.tolist() == [0.0, 1.0], text
