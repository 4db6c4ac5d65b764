"""specbatch-tune: the exported formats parse back to the γ*(b) table they came from."""
from __future__ import annotations

import json

import pytest

from conftest import linear_step, write_formula_profile
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.policies import optimal_gamma_table
from specbatch.sim.tune import gamma_for_batch, main, tune


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return write_formula_profile(tmp_path_factory.mktemp("t") / "p", verify=linear_step(0.010, 0.0005, knee=64),
                                 draft=linear_step(0.001, 0.00002))


def test_export_files_parse_back(profile, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(["--profile", str(profile), "--alpha", "0.8", "--context", "512", "--max-batch", "64",
                 "--out", str(out)]) == 0
    assert "γ" in capsys.readouterr().out
    result = json.loads((out / "tune.json").read_text())
    vllm = json.loads((out / "vllm.json").read_text())
    sglang = json.loads((out / "sglang.json").read_text())
    res, cost, acc = tune(str(profile), 0.8, context=512, max_batch=64)
    table = optimal_gamma_table(cost, AcceptanceModel(alpha=0.8), 512)
    assert result["table"] == {str(b + 1): int(g) for b, g in enumerate(table)}
    assert vllm == result["vllm"] and sglang == result["sglang"]
    for b in range(1, 65):
        assert gamma_for_batch(vllm, b) == table[b - 1]
        tier = next(t for t in sglang["speculative_tiers"] if t["max_batch_size"] >= b)
        assert tier["speculative_num_steps"] == table[b - 1]
        assert tier["speculative_num_draft_tokens"] == table[b - 1] + 1
    # γ* reaches 0 at large batch on this profile, so speculation is switched off above some batch size.
    assert table[-1] == 0 and vllm["speculative_disable_by_batch_size"] is not None
    assert table[vllm["speculative_disable_by_batch_size"] - 1] > 0
    ranges = result["ranges"]
    assert ranges[0]["min_batch"] == 1 and ranges[-1]["max_batch"] == 64
    assert all(r["speedup_min"] <= r["speedup_mean"] <= r["speedup_max"] for r in ranges)
    assert all(r["speedup_min"] >= 1.0 - 1e-9 for r in ranges)


@pytest.mark.parametrize("what", ["json", "vllm", "sglang"])
def test_print_formats_are_json(profile, capsys, what):
    assert main(["--profile", str(profile), "--out", "-", "--print", what]) == 0
    json.loads(capsys.readouterr().out)


def test_report_prints(profile, capsys):
    assert main(["--profile", str(profile), "--out", "-", "--print", "report"]) == 0
    assert "compute-bound" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [(["--alpha", "1.5"], "--alpha"), (["--context", "0"], "--context"),
                                      (["--acceptance", "profile"], "acceptance.csv")])
def test_bad_values_exit_2_naming_the_option(profile, capsys, args, msg):
    assert main(["--profile", str(profile), "--out", "-", *args]) == 2
    assert msg in capsys.readouterr().err


def test_missing_profile_exits_2(tmp_path, capsys):
    assert main(["--profile", str(tmp_path / "nope"), "--out", "-"]) == 2
    assert "error" in capsys.readouterr().err


def test_draft_sync_export_and_speedup_over_no_speculation(profile):
    res, cost, acc = tune(str(profile), 0.3, context=512, max_batch=64)
    synced, scost, _ = tune(str(profile), 0.3, context=512, max_batch=64, draft_sync=True)
    assert res["draft_sync"] is False and synced["draft_sync"] is True and scost.draft_sync
    assert res["ranges"][-1]["gamma"] == 0 and synced["ranges"][-1]["gamma"] == 0  # both end with speculation off
    # where the table says γ = 0 with draft_sync, serving is slower than without speculation by the draft step
    for r in synced["ranges"]:
        if r["gamma"] == 0:
            b = r["min_batch"]
            want = cost.target_verify(b, 0, 512) / (cost.target_verify(b, 0, 512) + cost.draft_decode(b, 512))
            assert r["speedup_min"] <= round(want, 4) + 1e-4 < 1
    for r in res["ranges"]:  # without draft_sync, γ = 0 is exactly no speculation
        if r["gamma"] == 0:
            assert r["speedup_min"] == r["speedup_max"] == 1.0


# --- issue #26, items 5 and 17 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_profile(tmp_path_factory):
    """Measured up to batch 16, γ 4 (5 tokens), contexts 128..2048."""
    return write_formula_profile(tmp_path_factory.mktemp("s") / "p", verify=linear_step(0.010, 0.0005, knee=64),
                                 draft=linear_step(0.001, 0.00002), batches=(1, 2, 4, 8, 16), max_tokens=5)


def test_defaults_stay_inside_the_profile_and_say_nothing(small_profile, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--profile", str(small_profile)]) == 0
    result = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert result["max_batch"] == 16 and result["max_gamma"] == 4 and result["extrapolated"] == []
    err = capsys.readouterr().err
    assert "warning" not in err
    assert err == f"specbatch-tune: wrote {'tune/tune.json'}, tune/vllm.json, tune/sglang.json\n"


def test_every_extrapolated_axis_is_said(small_profile, capsys):
    assert main(["--profile", str(small_profile), "--out", "-", "--max-batch", "64", "--max-gamma", "6",
                 "--context", "4096", "--print", "json"]) == 0
    cap = capsys.readouterr()
    result = json.loads(cap.out)
    lines = cap.err.splitlines()
    head = "specbatch-tune: warning: extrapolating beyond profile p's measured grid: "
    assert lines == [head + n for n in result["extrapolated"]]
    assert lines[0] == head + ("batch 17–64 is beyond the largest measured batch size 16: step times there are "
                               "extrapolated linearly from the last two measured batch sizes")
    assert lines[1] == head + ("γ 5–6 is beyond the largest measured γ 4 (verify of 5 tokens): verify times there "
                               "are extrapolated linearly from the last two measured γ")
    assert lines[2] == head + ("context 4096 tokens is beyond the longest measured context 2048: step times are "
                               "extrapolated linearly from the last two measured contexts")
    assert main(["--profile", str(small_profile), "--out", "-", "--context", "64", "--print", "vllm"]) == 0
    assert capsys.readouterr().err == head + ("context 64 tokens is below the shortest measured context 128: step "
                                              "times are held at their values at 128 tokens\n")


@pytest.mark.parametrize("what", ["report", "json", "vllm", "sglang"])
def test_printing_alone_writes_nothing_and_out_writes_and_says_where(small_profile, tmp_path, capsys, monkeypatch,
                                                                     what):
    monkeypatch.chdir(tmp_path)
    assert main(["--profile", str(small_profile), "--print", what]) == 0
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().err == ""
    assert main(["--profile", str(small_profile), "--print", what, "--out", "x"]) == 0
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["sglang.json", "tune.json", "vllm.json"]
    assert capsys.readouterr().err == "specbatch-tune: wrote x/tune.json, x/vllm.json, x/sglang.json\n"
