"""The shipped CPU profile: valid, measured, and shows the seed phenomenon."""
from __future__ import annotations

from pathlib import Path

import pytest

from sim.profile import load_profile

NAME = "cpu-llama68m-tinyllama1.1b"


def _path() -> Path:
    try:
        from specbatch import profiles_dir

        p = profiles_dir() / NAME
        if p.is_dir():
            return p
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[1] / "traces" / "profiles" / NAME


@pytest.fixture(scope="module")
def prof():
    return load_profile(_path())


def test_shipped_profile_is_measured_and_described(prof):
    m = prof.meta
    assert m["source"] == "measured" and m["device"]["kind"] == "cpu" and m["device"]["threads"] >= 1
    assert m["models"]["draft"]["name"] == "llama-68m" and m["models"]["target"]["name"] == "tinyllama-1.1b"
    assert m["timing"]["cache"].startswith("prealloc") and "grid" in m["timing"]
    assert "loadavg_start" in m["device"]
    ok = prof.ok_steps
    assert {"decode", "verify", "prefill"} <= set(ok.phase)
    assert set(ok[ok.model == "draft"].phase) >= {"decode", "prefill"}


def test_verify_cost_relative_to_decode_grows_with_batch(prof, request):
    """Seed phenomenon: verifying γ+1 tokens costs ~ one decode at batch 1, but much more at large batch."""
    if "interim" in str(prof.meta["device"].get("note")) or not prof.meta["timing"].get("complete", True):
        request.applymarker(pytest.mark.xfail(
            reason="interim capture on a shared, overloaded machine (see meta.device.note/loadavg): "
                   "rerun profiler/cpu_capture.sh at a quiet moment", strict=False))
    ok = prof.ok_steps
    tgt = ok[ok.model == "target"]
    checked = 0
    for ctx, g in tgt.groupby("context"):
        dec = g[g.phase == "decode"].set_index("batch")["median_s"]
        for tokens, v in g[g.phase == "verify"].groupby("tokens"):
            if tokens < 3:
                continue
            ratio = (v.set_index("batch")["median_s"] / dec).dropna()
            if len(ratio) < 3:
                continue
            small, large = ratio.iloc[0], ratio.iloc[-1]
            assert large > small * 1.2, (ctx, tokens, ratio.to_dict())
            checked += 1
    assert checked >= 1
