"""Drafter kinds on the profiler side (issue #25): the EAGLE head's shape and KV bytes, the n-gram proposer,
the eagle/ngram rows a sweep writes, and the rows shipped in the CPU profile."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from specbatch.profiler import drafters as D

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "traces" / "profiles" / "cpu-llama68m-tinyllama1.1b"


# --- n-gram proposer (numpy only) --------------------------------------------------------------------------


def test_ngram_hit_proposes_what_followed_the_earliest_occurrence():
    seq = [7, 1, 2, 3, 4, 5, 9, 1, 2, 3, 6, 8, 1, 2, 3]
    # the suffix [1, 2, 3] first occurs at 1: propose what followed it there
    assert D.ngram_propose(seq, 3, 3, 3).tolist() == [4, 5, 9]
    assert D.ngram_propose(seq, 1, 3, 3).tolist() == [4]
    assert D.ngram_propose(seq, 0, 3, 3).tolist() == []


def test_ngram_miss_proposes_nothing():
    assert D.ngram_propose([1, 2, 3, 4, 5, 6], 4, 1, 3).tolist() == []
    assert D.ngram_propose([5], 4, 1, 1).tolist() == []
    assert D.ngram_propose([], 4, 1, 1).tolist() == []


def test_ngram_tries_the_longest_n_first_and_stops_at_min():
    # last 2 tokens [8, 9] occur at 0 (followed by 1); last 1 token [9] occurs earlier at 3 (followed by 4)
    seq = [8, 9, 1, 9, 4, 8, 9]
    assert D.ngram_propose(seq, 2, 1, 2).tolist() == [1, 9]     # n = 2 matches first
    assert D.ngram_propose(seq, 2, 1, 1).tolist() == [1, 9]     # n = 1: earliest [9] is at 1
    assert D.ngram_propose(seq, 2, 3, 3).tolist() == []         # [4, 8, 9] never occurred before
    assert D.ngram_propose([4, 8, 9, 2, 4, 8, 9], 2, 3, 5).tolist() == [2, 4]  # n = 3 found, 4 and 5 not


def test_ngram_proposals_stop_at_the_end_of_the_sequence():
    # [1, 2] at 0 is followed by 1, 2 only (the suffix itself): the proposal is cut there
    assert D.ngram_propose([1, 2, 1, 2], 5, 2, 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        D.ngram_propose([1, 2], 2, 3, 2)


def test_ngram_vllm_defaults_and_synthetic_sequences_hit_and_miss():
    assert (D.PROMPT_LOOKUP_MIN, D.PROMPT_LOOKUP_MAX) == (5, 5)  # vLLM SpeculativeConfig: both 5 when unset
    seqs = D.synthetic_sequences(32, 256, seed=1)
    assert all(len(s) == 256 for s in seqs)
    found = [len(p) for p in D.ngram_propose_batch(seqs, 4)]
    assert 0 < sum(n > 0 for n in found) < 32  # both hits and misses


# --- EAGLE head -------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from specbatch.profiler import models as M  # noqa: E402
from specbatch.profiler import sweep  # noqa: E402
from specbatch.profiler.presets import make_config  # noqa: E402


def test_eagle_head_shapes_and_kv_bytes_by_hand():
    tc = make_config("tiny-llama")  # hidden 64, 4 heads, 2 K/V heads (head_dim 16), MLP 128, vocab 512
    head, info = D.load_eagle_head(tc, torch.float32, "cpu")
    h, kvh, hd, ffn, vocab = 64, 2, 16, 128, 512
    assert head.config.num_hidden_layers == 1 and info["config"]["num_hidden_layers"] == 1
    assert tuple(head.fc.weight.shape) == (h, 2 * h) and head.fc.bias is not None
    assert tuple(head.lm_head.weight.shape) == (vocab, h)
    layer = h * h + 2 * h * kvh * hd + h * h + 3 * h * ffn + 2 * h  # q, k+v, o, gate/up/down, two norms
    want = {"embedding": vocab * h, "fusion": 2 * h * h + h, "layer": layer, "norm": h, "lm_head": vocab * h}
    assert info["parameters_by_part"] == want and info["parameters"] == sum(want.values())
    assert info["parameters_own"] == want["fusion"] + layer + h
    assert D.eagle_kv_bytes_per_token(tc, torch.float32) == 2 * kvh * hd * 4 == 256
    assert D.eagle_kv_bytes_per_token(tc, torch.bfloat16) == 128
    # TinyLlama-1.1B (config only): hidden 2048, 32 heads, 4 K/V heads of 64: one layer's KV is 2·4·64·4 bytes
    big = make_config("tinyllama-1.1b")
    ec = D.eagle_config(big)
    assert (ec.hidden_size, ec.num_hidden_layers, ec.num_attention_heads, ec.num_key_value_heads, ec.head_dim,
            ec.intermediate_size, ec.vocab_size) == (2048, 1, 32, 4, 64, 5632, 32000)
    assert D.eagle_kv_bytes_per_token(big, torch.float32) == 2048
    assert D.eagle_kv_bytes_per_token(big, torch.float32) * 22 == M.kv_bytes_per_token(big, torch.float32)
    # an OPT target: a Llama-style layer at its width, MLP width ffn_dim, K/V heads = heads
    oc = D.eagle_config(make_config("tiny-opt"))
    assert (oc.hidden_size, oc.num_key_value_heads, oc.intermediate_size) == (64, 4, 128)


def test_eagle_steps_use_the_prealloc_cache_and_match_a_full_forward():
    tc = make_config("tiny-llama")
    head, _ = D.load_eagle_head(tc, torch.float32, "cpu")
    ids, hid = torch.randint(0, 512, (2, 9)), torch.randn(2, 9, 64)
    cache = M.make_cache("prealloc", head.config, 2, 0, 9, torch.float32, "cpu")
    full, _ = D.eagle_forward(head, cache, ids, hid, logits_to_keep=0)
    step = M.make_cache("prealloc", head.config, 2, 0, 10, torch.float32, "cpu")
    D.eagle_prefill(head, step, ids[:, :8], hid[:, :8])
    assert step.get_seq_length() == 8
    last, _ = D.eagle_forward(head, step, ids[:, 8:], hid[:, 8:])
    assert torch.allclose(last[:, -1], full[:, -1], atol=1e-4)
    tok, out = D.eagle_decode_one_token(head, step, ids[:, 0], hid[:, 0], temperature=0)
    assert tok.shape == (2,) and out.shape == (2, 64) and step.get_seq_length() == 10


def test_eagle_decode_replays_like_a_graph():
    from specbatch.profiler.graphs import replay_like_capture

    head, _ = D.load_eagle_head(make_config("tiny-llama"), torch.float32, "cpu")
    cache = M.make_cache("prealloc", head.config, 2, 5, 2, torch.float32, "cpu")
    g = D.GraphedEagle(head, cache, 2, 1, replay_like_capture)
    tok, _ = D.eagle_decode_one_token(g, cache, torch.tensor([1, 2]), torch.randn(2, 64))
    assert cache.get_seq_length() == 6 and tok.shape == (2,)


# --- the sweep's rows ---------------------------------------------------------------------------------------


def _cfg(tmp_path, drafters):
    from omegaconf import OmegaConf

    return OmegaConf.create(dict(
        pair=dict(target="tiny-llama", draft="tiny-llama-draft", name="tiny"), device="cpu", dtype="float32",
        threads=1, cache="prealloc", seed=0, resume=False, memory_limit_bytes=None, note=None, drafters=drafters,
        ngram=dict(prompt_lookup_min=2, prompt_lookup_max=3),
        timing=dict(warmup=1, min_samples=3, max_samples=5, floor_samples=2, rel_precision=0.02,
                    point_budget_s=0.02, deadline_s=None, temperature=1.0)))


GRID = dict(batches=[1, 2, 4], gammas=[0, 1, 2], contexts=[16, 32], prefill_lengths=[8, 16], prefill_batches=[1])


def _load(path):
    """The profile at ``path`` (load_profile once the simulator side accepts drafter rows, else the CSV)."""
    from specbatch.sim import profile as P

    if "eagle" in P.MODELS and "ngram" in P.MODELS:
        return P.load_profile(path).steps
    return pd.read_csv(Path(path) / "steps.csv")


def drafter_monotone_violations(steps: pd.DataFrame, tolerance: float = 0.40) -> list[str]:
    """The monotonicity gate (sim.profile.check_monotone's rule) on eagle decode (along batch), eagle prefill
    (along prompt length) and ngram decode (along batch): a time may not fall by more than ``tolerance``."""
    ok = steps[steps["status"] == "ok"]
    found = []
    for model, phase, axis, fixed in (("eagle", "decode", "batch", "context"), ("ngram", "decode", "batch", "context"),
                                      ("eagle", "prefill", "tokens", "batch")):
        g = ok[(ok["model"] == model) & (ok["phase"] == phase)]
        for key, s in g.groupby(fixed):
            t = s.sort_values(axis)[[axis, "median_s"]].to_numpy()
            for (a0, t0), (a1, t1) in zip(t[:-1], t[1:]):
                if t1 < (1 - tolerance) * t0:
                    found.append(f"{model} {phase} {fixed}={key}: {t0:.4g} s at {axis}={a0:g} -> {t1:.4g} s at {a1:g}")
    return found


def test_sweep_writes_eagle_and_ngram_rows_per_the_contract(tmp_path):
    grid = sweep.Grid.from_cfg(GRID)
    out = sweep.run_profile(_cfg(tmp_path, ["draft", "eagle", "ngram"]), out_dir=tmp_path / "p", grid=grid,
                            progress=False)
    steps = _load(out)
    meta = json.loads((out / "meta.json").read_text())
    key = lambda df: sorted(map(tuple, df[["batch", "tokens", "context"]].to_numpy().tolist()))  # noqa: E731
    draft_dec = steps[(steps.model == "draft") & (steps.phase == "decode")]
    for m in ("eagle", "ngram"):
        dec = steps[(steps.model == m) & (steps.phase == "decode")]
        assert key(dec) == key(draft_dec) and (dec.status == "ok").all() and (dec.median_s > 0).all()
    assert set(steps[steps.model == "ngram"].phase) == {"decode"}
    pre = steps[(steps.model == "eagle") & (steps.phase == "prefill")]
    assert key(pre) == key(steps[(steps.model == "draft") & (steps.phase == "prefill")])
    assert (pre.context == 0).all() and (pre.batch == 1).all()
    e, n = meta["models"]["eagle"], meta["models"]["ngram"]
    assert e["kv_bytes_per_token"] == 256 and e["config"]["num_hidden_layers"] == 1 and e["parameters"] > 0
    assert n["kv_bytes_per_token"] == 0 and (n["prompt_lookup_min"], n["prompt_lookup_max"]) == (2, 3)
    assert n["config"]["proposed_tokens"] == 2  # γ_max of the grid
    assert meta["timing"]["drafters"] == ["draft", "eagle", "ngram"]


def test_default_drafters_write_the_old_rows_only(tmp_path):
    grid = sweep.Grid.from_cfg({**GRID, "batches": [1], "contexts": [16], "gammas": [0, 1], "prefill_lengths": [8]})
    cfg = _cfg(tmp_path, None)
    out = sweep.run_profile(cfg, out_dir=tmp_path / "p", grid=grid, progress=False)
    steps = pd.read_csv(out / "steps.csv")
    assert set(steps.model) == {"target", "draft"}
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["models"]) == {"target", "draft"} and "included_drafters" not in meta["timing"]
    with pytest.raises(ValueError, match="drafters"):
        sweep.drafters_of(_cfg(tmp_path, ["eagle"]))
    with pytest.raises(ValueError, match="drafters"):
        sweep.drafters_of(_cfg(tmp_path, ["draft", "medusa"]))


def test_profile_yaml_keeps_draft_only_by_default():
    from omegaconf import OmegaConf

    conf = OmegaConf.load(ROOT / "conf" / "profile.yaml")
    assert list(conf.drafters) == ["draft"]
    assert (conf.ngram.prompt_lookup_min, conf.ngram.prompt_lookup_max) == (5, 5)


# --- the shipped CPU profile ----------------------------------------------------------------------------------


def test_shipped_cpu_profile_has_eagle_and_ngram_rows_on_the_draft_grid():
    steps = _load(SHIPPED)
    if not (steps.model == "eagle").any():
        pytest.skip("the shipped CPU profile has no drafter rows yet")
    meta = json.loads((SHIPPED / "meta.json").read_text())
    key = lambda df: sorted(map(tuple, df[["batch", "context"]].to_numpy().tolist()))  # noqa: E731
    draft_dec = steps[(steps.model == "draft") & (steps.phase == "decode")]
    for m in ("eagle", "ngram"):
        dec = steps[(steps.model == m) & (steps.phase == "decode")]
        assert key(dec) == key(draft_dec) and (dec.status == "ok").all()
    pre = steps[(steps.model == "eagle") & (steps.phase == "prefill")]
    assert sorted(pre.tokens) == sorted(meta["timing"]["grid"]["prefill_lengths"])
    assert meta["models"]["eagle"]["kv_bytes_per_token"] == 2048  # one TinyLlama layer, fp32
    assert meta["models"]["eagle"]["config"]["hidden_size"] == 2048
    assert meta["models"]["ngram"]["kv_bytes_per_token"] == 0
    note = meta["timing"]["drafters_note"]
    assert note["date"] and note["loadavg_start"] and note["threads"] == meta["device"]["threads"]
    assert drafter_monotone_violations(steps) == []
