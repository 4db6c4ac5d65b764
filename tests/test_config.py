"""The structured config (sim/config.py) and the workload/output fixes of issue #26: one schema, one default per
key, bad values refused in one line naming the key, numbers never misread as times, strict JSON outputs."""
from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from specbatch.sim import workload as wl
from specbatch.sim.cluster import ClusterConfig
from specbatch.sim.config import ConfigError, checked
from specbatch.sim.run import run
from specbatch.sim.workload import WorkloadError


def compose_cfg(*overrides):
    with initialize_config_module("specbatch.conf", version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def shipped():
    return compose_cfg()


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# --- one schema ----------------------------------------------------------------------------------------------


def test_cluster_defaults_are_cluster_configs(shipped):
    ours = {f.name: f.default for f in dataclasses.fields(ClusterConfig)}
    assert OmegaConf.to_container(shipped.cluster) == ours
    assert ClusterConfig().max_batch == shipped.cluster.max_batch == 32


def test_presets_keep_their_values_and_take_schema_defaults(shipped):
    w = shipped.workload
    assert (w.kind, w.path, w.time_unit, w.first_n, w.load, w.rate) == \
        ("trace", "azure/AzureLLMInferenceTrace_conv.csv", "datetime", 1000, 0.8, None)
    assert (w.sort, w.on_bad_rows, w.format) == (False, "error", "auto")
    t = compose_cfg("workload=trace", "workload.path=x.csv").workload
    assert (t.time_unit, t.load, t.rate, t.first_n) == ("auto", None, None, None)
    two = compose_cfg("workload=two_class").workload
    assert (two.n, two.process, two.load, dict(two.classes)) == (300, "poisson", 0.7, {"chat": 0.5, "code": 0.5})


def test_class_alpha_dict_override_composes():
    """The override conf/workload/two_class.yaml documents (was "Key 'chat' is not in struct")."""
    cfg = compose_cfg("workload=two_class", "acceptance.class_alpha={chat: 0.45, code: 0.9}")
    assert dict(cfg.acceptance.class_alpha) == {"chat": 0.45, "code": 0.9}
    checked(cfg)


def test_checked_fills_defaults_of_a_partial_config():
    cfg = checked({"workload": {"kind": "trace", "path": "x.csv"}, "policy": {"name": "none"}})
    assert cfg.cluster.max_batch == 32 and cfg.workload.time_unit == "auto" and cfg.slo.ttft_s == 10.0


@pytest.mark.parametrize("override,expected", [
    ("workload.first_n=1.5", "workload.first_n is 1.5; expected at least 1"),
    ("workload.first_n=true", "workload.first_n is True; expected at least 1"),
    ("workload.first_n=abc", "workload.first_n is 'abc'; expected at least 1"),
    ("cluster.replicas=true", "cluster.replicas is True; expected an integer ≥ 1"),
    ("workload.sort=maybe", "workload.sort is 'maybe'; expected true or false"),
    ("workload.load=inf", "workload.load is inf; expected a positive fraction of capacity or null"),
    ("workload.load=abc", "workload.load is 'abc'; expected a positive fraction of capacity or null"),
    ("workload.time_unit=hours", "workload.time_unit is 'hours'"),
    ("cluster.watermark=x", "cluster.watermark is 'x'; expected a fraction in [0, 1)"),
    ("cluster.kv_capacity_tokens=inf", "cluster.kv_capacity_tokens is inf"),
    ("acceptance.class_alpha={chat: 1.5}", "acceptance.class_alpha.chat is 1.5; expected a probability in [0, 1]"),
    ("+workload.bogus=1", "workload.bogus is not a config key"),
])
def test_bad_values_are_refused_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        checked(compose_cfg(override))
    assert expected in str(e.value) and "\n" not in str(e.value)


def sim(args, cwd):
    return subprocess.run([sys.executable, "-m", "specbatch.sim.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_hydra_composition_errors_are_one_line(tmp_path):
    for override, expected in (("workload.bogus=1", "workload.bogus is not a config key"),
                               ("workload=nope", "Could not find 'workload/nope'")):
        p = sim([override, f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
        assert p.returncode == 2
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("specbatch-sim: error: ") and expected in lines[0], p.stderr


# --- arrival times: numbers are never misread ------------------------------------------------------------------


def _csv(tmp_path, name, arrivals, n=None):
    path = tmp_path / name
    path.write_text("arrival,prompt,output\n" + "".join(f"{a},5,3\n" for a in arrivals))
    return path


def test_numbers_under_datetime_are_refused(tmp_path):
    years = _csv(tmp_path, "years.csv", [1999, 2000, 2001])  # read as calendar years before
    with pytest.raises(WorkloadError, match=r"row 1, column 'arrival': '1999' is a number.*time_unit=s or "):
        wl.load_trace(years, time_unit="datetime")
    ns = tmp_path / "ns.jsonl"  # read as ns since the epoch before
    ns.write_text("".join(json.dumps({"arrival": a, "prompt": 5, "output": 3}) + "\n" for a in (0, 5, 9)))
    with pytest.raises(WorkloadError, match=r"row 1, column 'arrival': 0 is a number"):
        wl.load_trace(ns, time_unit="datetime")


def test_auto_time_unit(tmp_path):
    dt = tmp_path / "dt.csv"
    dt.write_text("arrival,prompt,output\n2024-01-01 00:00:00,5,3\n2024-01-01 00:00:02,5,3\n")
    w = wl.load_trace(dt, time_unit="auto")
    assert w.arrival_s.tolist() == [0.0, 2.0] and "date-time" in w.notes[0]
    w = wl.load_trace(_csv(tmp_path, "epoch_s.csv", [1.7e9, 1.7e9 + 3]), time_unit="auto")
    assert w.arrival_s.tolist() == [0.0, 3.0] and "seconds" in w.notes[0]
    w = wl.load_trace(_csv(tmp_path, "epoch_ms.csv", [1_700_000_000_000, 1_700_000_003_000]), time_unit="auto")
    assert w.arrival_s.tolist() == [0.0, 3.0] and "milliseconds" in w.notes[0]
    with pytest.raises(WorkloadError, match=r"cannot tell as seconds or milliseconds; set workload.time_unit=s or "
                                            r"workload.time_unit=ms"):
        wl.load_trace(_csv(tmp_path, "rel.csv", [0, 250, 900]), time_unit="auto")


def test_parquet_timestamps_are_datetimes_whatever_the_unit(tmp_path):
    path = tmp_path / "ts.parquet"
    pd.DataFrame({"arrival": pd.to_datetime(["2024-01-01 00:00:00", "2024-01-01 00:00:02.5"], format="ISO8601"),
                  "prompt": [5, 6], "output": [3, 4]}).to_parquet(path)
    for unit in ("s", "ms", "auto", "datetime"):
        assert wl.load_trace(path, time_unit=unit).arrival_s.tolist() == [0.0, 2.5], unit


def test_booleans_are_not_token_counts(tmp_path):
    path = tmp_path / "bool.jsonl"
    path.write_text('{"arrival": 0, "prompt": 5, "output": 3}\n{"arrival": 1, "prompt": true, "output": 3}\n')
    with pytest.raises(WorkloadError, match=r"row 2, column 'prompt': True is not a number"):
        wl.load_trace(path)


@pytest.mark.parametrize("text", ['[0, 5, 3]\n[1, 5, 3]\n', '[{"arrival": 0, "prompt": 5, "output": 3}]\n'])
def test_json_arrays_are_one_line_errors(tmp_path, text):
    path = tmp_path / "a.jsonl"
    path.write_text(text)
    with pytest.raises(WorkloadError) as e:
        wl.load_trace(path)
    assert "a.jsonl: cannot be read as JSON lines" in str(e.value) and "JSON object" in str(e.value)


def test_compressed_and_json_traces(tmp_path):
    gz = tmp_path / "t.csv.gz"
    gz.write_bytes(gzip.compress(b"arrival,prompt,output\n0,5,3\n1.5,6,4\n"))
    assert wl.load_trace(gz).arrival_s.tolist() == [0.0, 1.5]
    jgz = tmp_path / "t.jsonl.gz"
    jgz.write_bytes(gzip.compress(b'{"arrival": 0, "prompt": 5, "output": 3}\n'))
    assert len(wl.load_trace(jgz)) == 1
    js = tmp_path / "t.json"
    js.write_text('{"arrival": 0, "prompt": 5, "output": 3}\n{"arrival": 2, "prompt": 5, "output": 3}\n')
    assert wl.load_trace(js).arrival_s.tolist() == [0.0, 2.0]
    wide = tmp_path / "wide.txt"
    wide.write_text(",".join(f"column_{i}" for i in range(2000)) + "\n" + ",".join("1" * 2000) + "\n")
    with pytest.raises(WorkloadError) as e:
        wl.load_trace(wide)
    assert len(str(e.value)) < 800 and "supported formats" in str(e.value)


def test_rate_of_a_trace_without_one_is_an_error():
    one = wl.Workload(np.zeros(1), np.ones(1, np.int64), np.ones(1, np.int64), name="one")
    burst = wl.Workload(np.zeros(3), np.ones(3, np.int64), np.ones(3, np.int64), name="burst")
    with pytest.raises(WorkloadError, match=r"workload.load is set but the workload \(one\) is a single request"):
        wl.set_rate(one, 2.0, "workload.load")
    with pytest.raises(WorkloadError, match=r"3 requests that all arrive at the same instant.*workload.rate=null"):
        wl.set_rate(burst, 2.0)


# --- whole runs: the user's own trace, strict JSON outputs --------------------------------------------------------


@pytest.fixture
def small_profile(tmp_path):
    from conftest import linear_step, write_formula_profile
    return write_formula_profile(tmp_path / "p", verify=linear_step(0.010, 0.0005, knee=64),
                                 draft=linear_step(0.001, 0.00002))


def _trace_run(tmp_path, profile, arrivals, *overrides):
    path = _csv(tmp_path, "mine.csv", arrivals)
    cfg = compose_cfg("workload=trace", f"workload.path={path}", "workload.time_unit=s", f"profile={profile}",
                      "policy=fixed", *overrides)
    out = tmp_path / "out"
    return run(cfg, out), out


def test_own_trace_keeps_its_rate_and_outputs_are_strict_json(tmp_path, small_profile):
    arrivals = [0.5 * i for i in range(20)]
    r, out = _trace_run(tmp_path, small_profile, arrivals)
    assert r.workload.arrival_s.tolist() == arrivals  # not rescaled to a load
    for f in ("summary.json", "workload.json", "policy.json"):
        strict_json((out / f).read_text())


@pytest.mark.parametrize("arrivals,overrides", [([3.0], ()), ([1.0, 1.0, 1.0], ()),
                                                ([0.0, 1.0], ("cluster.kv_capacity_tokens=4",))])
def test_edge_runs_write_strict_json(tmp_path, small_profile, arrivals, overrides):
    """One request, one burst (infinite rate) and every request rejected: null, never Infinity or NaN."""
    r, out = _trace_run(tmp_path, small_profile, arrivals, *overrides)
    for f in ("summary.json", "workload.json", "policy.json"):
        strict_json((out / f).read_text())
    assert strict_json((out / "workload.json").read_text())["rate_per_s"] is None or len(arrivals) > 1 and \
        arrivals[0] != arrivals[-1]


def test_load_on_a_one_request_trace_is_an_error(tmp_path, small_profile):
    with pytest.raises(WorkloadError, match="workload.load is set but"):
        _trace_run(tmp_path, small_profile, [3.0], "workload.load=0.5")


def test_validate_takes_its_workload_from_the_workload_config(tmp_path):
    """specbatch-validate's trace: the azure_conv preset by default (as the hard-coded path was), any preset or file."""
    from specbatch import traces_dir
    from specbatch.fidelity.validate import trace_slice

    w = wl.load_trace(traces_dir() / "azure" / "AzureLLMInferenceTrace_conv.csv",
                      {"arrival": "TIMESTAMP", "prompt": "ContextTokens", "output": "GeneratedTokens"}, "datetime")
    a = trace_slice(30, start=1200)  # beyond the preset's first_n: every row is there
    assert a.name == "azure_conv[1200:1230]"
    assert np.array_equal(a.arrival_s, w.arrival_s[1200:1230] - w.arrival_s[1200])
    mine = _csv(tmp_path, "mine.csv", [0, 1, 2.5])
    with pytest.raises(WorkloadError, match="cannot tell as seconds or milliseconds"):  # the trace preset's auto
        trace_slice(2, workload=str(mine))


@pytest.mark.parametrize("overrides", [(), ("workload=two_class",), ("workload=synthetic", "policy=fixed"),
                                       ("+study=paper",)])
def test_a_composed_config_is_already_checked(overrides):
    """The run writes the checked config; the resume check (cli.completed_summary) compares the composed one."""
    cfg = compose_cfg(*overrides)
    assert OmegaConf.to_yaml(checked(cfg)) == OmegaConf.to_yaml(cfg)
