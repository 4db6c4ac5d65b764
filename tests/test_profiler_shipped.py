"""The shipped CPU profile: valid, measured, and shows the seed phenomenon."""
from __future__ import annotations

from pathlib import Path

import pytest

from specbatch.sim.profile import load_profile

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


def _ratios(prof):
    """verify(γ+1 tokens) / decode(1 token) per (context, tokens, batch) from the shipped target rows."""
    ok = prof.ok_steps
    tgt = ok[ok.model == "target"]
    out = {}
    for ctx, g in tgt.groupby("context"):
        dec = g[g.tokens == 1].set_index("batch")["median_s"]
        for tokens, v in g[g.tokens > 1].groupby("tokens"):
            out[(ctx, tokens)] = (v.set_index("batch")["median_s"] / dec).dropna()
    return out


def test_verify_cost_relative_to_decode_grows_with_batch(prof):
    """Seed phenomenon: from batch 4 up, verifying γ+1 tokens costs more and more relative to one decode
    step (memory-bound at small batch, compute-bound at large batch). At the longest context the batch-32
    decode step is itself slowed by KV traffic (its ratio drops back), so "large batch" is the largest ratio
    among batches ≥ 16."""
    checked = 0
    for (ctx, tokens), ratio in _ratios(prof).items():
        if tokens < 3 or 4 not in ratio.index or ratio.index.max() < 16:
            continue
        large = ratio[ratio.index >= 16].max()
        assert large > ratio[4] * 1.15, (ctx, tokens, ratio.round(2).to_dict())
        checked += 1
    assert checked >= 4


def test_single_sequence_decode_is_disproportionately_cheap_on_this_cpu(prof):
    """On this CPU (fp32, MKL) one decoded token takes the matrix-vector fast path, so at batch 1 even two
    tokens cost well over one: the seed phenomenon starts at batch 4, not 1 (see README, "The shipped CPU
    profile"). A GPU profile is memory-bound at batch 1 instead."""
    for (ctx, tokens), ratio in _ratios(prof).items():
        if tokens == 5 and 1 in ratio.index and 4 in ratio.index:
            assert ratio[1] > 1.5 * ratio[4], (ctx, ratio.round(2).to_dict())


def test_shipped_profile_has_mixed_forwards_and_their_rule_check(prof):
    """The mixed forwards (chunked prefill) cover the documented grid, and meta.json's mixed_check is what the
    rule gives on them now (a change to the rule must re-store it: python -m specbatch.fidelity.mixed)."""
    from specbatch.fidelity.mixed import rule_check

    m, info = prof.mixed, prof.meta["mixed"]
    g = info["grid"]
    assert (m["status"] == "ok").all() and len(m) == len(g["batches"]) * len(g["chunk_tokens"]) * len(
        g["chunk_prefixes"]) * (len(g["gammas"]) + 1)
    assert info["anchors"] and info["loadavg_start"] and info["threads"] == 1 and info["clock"] == "cpu"
    now, stored = rule_check(prof), prof.meta["mixed_check"]
    for part in ("profile_steps", "same_run_steps"):
        assert [p["rel_error"] for p in now[part]["points"]] == pytest.approx(
            [p["rel_error"] for p in stored[part]["points"]], abs=1e-12)
        assert stored[part]["target"]["rows"] == 24 and stored[part]["draft"]["rows"] == 12
