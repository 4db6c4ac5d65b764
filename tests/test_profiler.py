"""Profiler tests: tiny presets on CPU (hidden 64, 2 layers), one thread, short budgets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hydra import compose, initialize_config_dir  # noqa: E402

from specbatch.profiler import cli, models as M, sweep  # noqa: E402
from specbatch.profiler.roofline import GPU_SPECS, Shape, calibrate, step_time, write_analytical_profile  # noqa: E402
from specbatch.sim.profile import load_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["threads=1", "progress=false", "timing.warmup=1", "timing.min_samples=3", "timing.max_samples=5",
        "timing.point_budget_s=0.02", "timing.floor_samples=2"]


def make_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(cli._conf_dir()), version_base=None):
        return compose("profile", overrides=["pair=tiny", "grid=tiny", f"out_dir={tmp_path}", "name=p", *FAST,
                                             *overrides])


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prof")
    out = cli.run(make_cfg(tmp))
    return out


def test_cli_writes_valid_profile(tmp_path):
    """The hydra app, as a user runs it, writes a profile load_profile accepts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "specbatch.profiler.cli", "pair=tiny", "grid=tiny", f"out_dir={tmp_path}",
                        "grid.batches=[1,2]", "grid.gammas=[0,2]", "grid.contexts=[16]", "grid.prefill_lengths=[8]",
                        *FAST], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    prof = load_profile(tmp_path / "tiny-llama-draft__tiny-llama-cpu-float32")
    assert prof.meta["source"] == "measured"
    assert (prof.steps["status"] == "ok").all()


def test_bad_input_is_a_clear_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "specbatch.profiler.cli", "pair=tiny", "grid=tiny", "grid.batches=[0]",
                        f"out_dir={tmp_path}", "progress=false"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "grid.batches" in r.stderr


def test_format_and_conventions(tiny_profile):
    prof = load_profile(tiny_profile)
    m = prof.meta
    assert m["device"]["kind"] == "cpu" and m["device"]["threads"] == 1 and m["device"]["kv_cache_bytes"] > 0
    assert m["timing"]["cache"].startswith("prealloc") and m["timing"]["complete"] is True
    assert m["models"]["target"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # layers, kv heads, head dim, fp32
    s = prof.steps
    assert (s["status"] == "ok").all() and (s["samples"] >= 2).all()
    assert ((s["p10_s"] <= s["median_s"]) & (s["median_s"] <= s["p90_s"])).all()
    draft = s[s.model == "draft"]
    assert set(draft.phase) == {"decode", "prefill"} and (draft[draft.phase == "decode"].tokens == 1).all()
    tgt = s[s.model == "target"]
    assert set(tgt[tgt.phase == "decode"].tokens) == {1} and set(tgt[tgt.phase == "verify"].tokens) == {2, 3}
    assert (s[s.phase == "prefill"].context == 0).all()
    # full grid: 2 contexts x 3 batches x (1 draft + 3 target) + 2 lengths x 1 batch x 2 models
    assert len(s) == 2 * 3 * 4 + 2 * 2


def test_prealloc_cache_matches_full_forward():
    model, _ = M.load_model("tiny-llama", torch.float32, "cpu")
    ids = torch.randint(0, 512, (2, 12))
    with torch.inference_mode():
        full = model(input_ids=ids).logits
    for kind in ("prealloc", "dynamic"):
        cache = M.make_cache(kind, model.config, 2, 0, 12, torch.float32, "cpu")
        M.prefill(model, cache, ids[:, :8])
        assert cache.get_seq_length() == 8  # the step wrote into the cache it was given
        with torch.inference_mode():
            pos = torch.arange(8, 12).expand(2, 4)
            out = M.forward(model, cache, input_ids=ids[:, 8:], position_ids=pos, use_cache=True).logits
        torch.testing.assert_close(out, full[:, 8:], rtol=1e-4, atol=1e-4)
        assert cache.get_seq_length() == 12
        M.rollback(cache, 3)
        assert cache.get_seq_length() == 9


def test_cache_keyword_follows_the_forward_signature():
    class New:
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Old:
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class Neither:
        def forward(self, input_ids=None, **kwargs): ...

    assert M.cache_keyword(New) == "cache" and M.cache_keyword(Old) == "past_key_values"
    with pytest.raises(TypeError, match="Neither.forward takes neither"):
        M.cache_keyword(Neither)


def test_verify_greedy_accepts_target_tokens_and_rolls_back():
    model, _ = M.load_model("tiny-llama", torch.float32, "cpu")
    cache = M.make_cache("prealloc", model.config, 1, 0, 20, torch.float32, "cpu")
    ids = torch.randint(0, 512, (1, 6))
    M.prefill(model, cache, ids[:, :5])
    seq, toks = ids.clone(), []
    with torch.inference_mode():  # greedy continuation of the target = a perfect draft
        for _ in range(3):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1)
            toks.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
    draft = torch.stack(toks, 1)
    n_acc, _ = M.verify(model, cache, ids[:, 5], draft, None, temperature=0.0)
    assert int(n_acc) == 3 and cache.get_seq_length() == 5 + 4
    bad = (draft + 1) % 512
    M.rollback(cache, 4)
    n_acc, _ = M.verify(model, cache, ids[:, 5], bad, None, temperature=0.0)
    assert int(n_acc) == 0 and cache.get_seq_length() == 5 + 1  # rejected positions rolled back


def test_forced_oom_by_memory_limit(tmp_path):
    """A memory limit just above the batch-2 needs turns batch 4 into an oom point; the sweep goes on."""
    cfg = make_cfg(tmp_path)
    model, _ = M.load_model("tiny-llama", torch.float32, "cpu")
    need2 = M.cache_bytes(model.config, 2, 32 + 3, torch.float32) + \
        sweep._activation_bytes(model.config, 2, 3, 4, True) + 2 * 2 * 512 * 4
    cfg.memory_limit_bytes = int(need2 * 1.5)
    out = cli.run(cfg)
    s = load_profile(out).steps
    oom = s[s.status == "oom"]
    assert len(oom) > 0 and set(oom.batch) == {4} and (oom.samples == 0).all()
    assert not ((s.batch > 4) & (s.phase != "prefill")).any()
    assert (s[s.phase == "prefill"].status == "ok").all()  # the sweep went on after the oom


def test_injected_oom_exception_skips_larger_batches(tmp_path, monkeypatch):
    """An OutOfMemoryError raised inside a step is recorded as oom; larger batches at that context are skipped."""
    real = M.verify

    def fake_verify(model, cache, last, *a, **k):
        if last.shape[0] >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, cache, last, *a, **k)

    monkeypatch.setattr(M, "verify", fake_verify)
    out = cli.run(make_cfg(tmp_path))
    s = load_profile(out).steps
    tgt = s[(s.model == "target") & (s.phase != "prefill")]
    assert set(tgt[tgt.batch == 1].status) == {"ok"}
    assert set(tgt[tgt.batch == 2].status) == {"oom"} and (tgt.batch <= 2).all()
    assert set(s[(s.model == "draft") & (s.phase == "decode")].batch) == {1, 2, 4}  # draft unaffected


def test_resume_after_interrupt(tmp_path, monkeypatch):
    from specbatch.profiler import timing

    calls = {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return timing_measure(*a, **k)

    timing_measure = timing.measure
    monkeypatch.setattr(timing, "measure", interrupting)
    with pytest.raises(KeyboardInterrupt):
        cli.run(make_cfg(tmp_path))
    folder = tmp_path / "p"
    first = pd.read_csv(folder / "pass0" / "steps.csv")  # the interrupted (only) pass
    assert len(first) == 6
    monkeypatch.setattr(timing, "measure", timing_measure)
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return timing_measure(*a, **k)

    monkeypatch.setattr(timing, "measure", counting)
    cli.run(make_cfg(tmp_path))
    prof = load_profile(folder)
    remeasured = sum(len(r["points"]) for r in prof.meta["timing"]["repairs"]) * sweep.REPAIR_SWEEPS
    assert len(prof.steps) == 28 and counted["n"] == 28 - 6 + remeasured
    resumed = load_profile(folder / "pass0").steps  # in sweep order: the points written before, then the rest
    pd.testing.assert_frame_equal(resumed.iloc[:6].reset_index(drop=True)[first.columns],
                                  first.astype(resumed.dtypes.to_dict()))


def test_resume_refuses_other_settings(tmp_path, tiny_profile):
    cfg = make_cfg(Path(tiny_profile).parent, "cache=dynamic")
    with pytest.raises(ValueError, match="timing.cache"):
        cli.run(cfg)


def test_dynamic_cache_profile(tmp_path):
    out = cli.run(make_cfg(tmp_path, "cache=dynamic", "grid.batches=[1]", "grid.contexts=[16]"))
    assert "DynamicCache" in load_profile(out).meta["timing"]["cache"]


def _save_tiny_checkpoint(path: Path, seed: int = 0, perturb: float = 0.0) -> Path:
    import transformers

    from specbatch.profiler.presets import make_config

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config("tiny-llama"))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb * p.std().clamp_min(1e-3))
    model.save_pretrained(path)
    return path


def test_load_saved_checkpoint(tmp_path):
    ckpt = _save_tiny_checkpoint(tmp_path / "ckpt")
    model, info = M.load_model(str(ckpt), torch.float32, "cpu")
    assert info["weights"] == "checkpoint folder" and info["parameters"] > 0
    out = cli.run(make_cfg(tmp_path, f"pair.target={ckpt}", "grid.batches=[1]", "grid.gammas=[0,1]",
                           "grid.contexts=[16]", "grid.prefill_lengths=[8]"))
    assert load_profile(out).meta["models"]["target"]["weights"] == "checkpoint folder"
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        M.load_model(str(tmp_path / "missing"), torch.float32, "cpu")


def test_acceptance_identical_and_perturbed_draft(tmp_path):
    from specbatch.profiler.acceptance import encode, measure_acceptance

    target, _ = M.load_model(str(_save_tiny_checkpoint(tmp_path / "t")), torch.float32, "cpu")
    same, _ = M.load_model(str(tmp_path / "t"), torch.float32, "cpu")
    other, _ = M.load_model(str(_save_tiny_checkpoint(tmp_path / "d", perturb=0.5)), torch.float32, "cpu")
    prompts = [encode(t, None, 512) for t in ("hello world", "speculative decoding is", "a b c d")]
    alpha, n = measure_acceptance(target, same, prompts, gamma=4, temperature=0.0, max_new_tokens=12)
    assert alpha == [1.0] * 4 and min(n) > 0
    alpha_t, _ = measure_acceptance(target, same, prompts, gamma=4, temperature=1.0, max_new_tokens=12)
    assert alpha_t == [1.0] * 4  # identical distributions: u * q <= p always holds
    alpha_p, _ = measure_acceptance(target, other, prompts, gamma=4, temperature=0.0, max_new_tokens=24)
    assert alpha_p[0] < 1.0


def test_acceptance_from_jsonl_via_cli(tmp_path):
    ckpt = _save_tiny_checkpoint(tmp_path / "ckpt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("one two three", "four five")) + "\n")
    out = cli.run(make_cfg(tmp_path, f"pair.target={ckpt}", f"pair.draft={ckpt}", "grid.batches=[1]",
                           "grid.gammas=[0,1]", "grid.contexts=[16]", "grid.prefill_lengths=[8]",
                           f"acceptance.prompts_file={prompts}", "acceptance.gamma=3",
                           "acceptance.max_new_tokens=6"))
    prof = load_profile(out)
    assert list(prof.per_position_alpha) == [1.0, 1.0, 1.0]
    assert prof.meta["acceptance"]["temperature"] == 0.0 and prof.meta["acceptance"]["prompts"] == 2
    assert (out / "acceptance" / "T1" / "acceptance.csv").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n')
    from specbatch.profiler.acceptance import read_prompts

    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_prompts(None, bad)


# --- roofline ----------------------------------------------------------------------------------------------


def _shape(name):
    from specbatch.profiler.presets import make_config

    return Shape.from_config(make_config(name))


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "opt-6.7b", "qwen2.5-7b"])
def test_roofline_monotone_in_batch_and_tokens(name):
    s = _shape(name)
    peak, bw, _, _ = GPU_SPECS["h100-sxm"]
    kw = dict(peak_flops=peak, bandwidth=bw, eff_compute=0.6, eff_memory=0.8, overhead_s=0.005)
    for c in (128, 2048):
        for t in (1, 5, 9):
            times = [step_time(s, b, t, c, t, **kw) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
            assert all(b >= a for a, b in zip(times, times[1:]))
        for b in (1, 16, 256):
            times = [step_time(s, b, t, c, t, **kw) for t in range(1, 10)]
            assert all(y >= x for x, y in zip(times, times[1:]))
    # memory-bound at batch 1, compute-bound at large batch x tokens: verify costs ~ decode at b=1 only
    r1 = step_time(s, 1, 9, 128, 9, **kw) / step_time(s, 1, 1, 128, 1, **kw)
    r256 = step_time(s, 256, 9, 128, 9, **kw) / step_time(s, 256, 1, 128, 1, **kw)
    assert r1 < 1.1 < r256


def test_roofline_profile_and_calibration(tmp_path):
    from specbatch.profiler.presets import make_config

    grid = sweep.Grid([1, 4, 16, 64, 256], [0, 1, 4, 8], [128, 2048], [128, 1024], [1])
    truth = write_analytical_profile(tmp_path / "truth", gpu="h100-sxm", target_cfg=make_config("llama-2-7b"),
                                     draft_cfg=make_config("llama-68m"), target_name="llama-2-7b",
                                     draft_name="llama-68m", grid=grid, eff_compute=0.45, eff_memory=0.7,
                                     overhead_s=0.004)
    prof = load_profile(truth)
    assert prof.meta["source"] == "analytical" and (prof.steps.status == "oom").any()
    fit = calibrate(truth, peak_flops=GPU_SPECS["h100-sxm"][0], bandwidth=GPU_SPECS["h100-sxm"][1], dtype_bytes=2)
    assert fit["eff_compute"] == pytest.approx(0.45, rel=0.02) and fit["eff_memory"] == pytest.approx(0.7, rel=0.02)
    assert fit["fit_median_rel_error"] < 1e-3


def test_roofline_cli(tmp_path):
    out = cli.run(make_cfg(tmp_path, "mode=roofline", "pair=llama-68m__llama-2-7b", "grid=gpu", "roofline.gpu=a100-80gb"))
    prof = load_profile(out)
    assert prof.meta["source"] == "analytical" and prof.meta["device"]["name"] == "a100-80gb"
    cal = make_cfg(tmp_path, "mode=roofline", "pair=llama-68m__llama-2-7b", "grid=gpu", "roofline.gpu=h200",
                   f"roofline.calibrate_on={out}", "name=cal")
    with pytest.raises(ValueError, match="force_calibration"):
        cli.run(cal)


def _rows(*rows):
    return pd.DataFrame([dict(zip(["model", "phase", "batch", "tokens", "context", "median_s", "p10_s", "p90_s",
                                   "samples", "status"], r)) for r in rows])


def test_merge_passes_takes_the_median_over_passes_and_keeps_oom_points():
    nan = float("nan")
    p0 = _rows(("target", "decode", 1, 1, 16, 1.0, 0.9, 1.1, 5, "ok"), ("target", "decode", 8, 1, 16, 9.0, 8, 10, 5, "ok"),
               ("target", "decode", 16, 1, 16, nan, nan, nan, 0, "oom"), ("target", "decode", 32, 1, 16, nan, nan, nan, 0, "oom"))
    p1 = _rows(("target", "decode", 1, 1, 16, 2.0, 1.8, 2.5, 4, "ok"), ("target", "decode", 8, 1, 16, 3.0, 2, 4, 6, "ok"),
               ("target", "decode", 16, 1, 16, 5.0, 4, 6, 3, "ok"), ("target", "decode", 32, 1, 16, nan, nan, nan, 0, "oom"))
    p2 = _rows(("target", "decode", 1, 1, 16, 1.2, 1.1, 1.3, 5, "ok"), ("target", "decode", 8, 1, 16, 4.0, 3.5, 4.5, 5, "ok"))
    m = sweep.merge_passes([p0, p1, p2]).set_index("batch")
    assert list(m.index) == [1, 8, 16, 32]
    assert m.loc[1, "median_s"] == 1.2 and m.loc[1, "p10_s"] == 0.9 and m.loc[1, "p90_s"] == 2.5
    assert m.loc[1, "samples"] == 14
    assert m.loc[8, "median_s"] == 4.0  # the median, not the mean (5.33) of 9, 3, 4
    assert m.loc[16, "status"] == "ok" and m.loc[16, "median_s"] == 5.0  # measured in one pass: oom elsewhere is dropped
    assert m.loc[32, "status"] == "oom" and np.isnan(m.loc[32, "median_s"])


def test_merge_passes_puts_each_point_at_the_typical_reference_speed():
    """A pass timed while the machine ran at half speed (its reference readings twice as long) counts at the
    machine's typical speed; without a reading for every measured point nothing is rescaled."""
    def ref(*rows):
        return pd.DataFrame([dict(zip(["model", "phase", "batch", "tokens", "context", "reference_s"], r)) for r in rows])

    p0 = _rows(("target", "decode", 1, 1, 16, 1.0, 0.9, 1.1, 5, "ok"), ("target", "decode", 8, 1, 16, 4.0, 3.6, 4.4, 5, "ok"))
    p1 = _rows(("target", "decode", 1, 1, 16, 2.0, 1.8, 2.2, 5, "ok"), ("target", "decode", 8, 1, 16, 8.0, 7.2, 8.8, 5, "ok"))
    p2 = _rows(("target", "decode", 1, 1, 16, 1.1, 1.0, 1.2, 5, "ok"), ("target", "decode", 8, 1, 16, 3.0, 2.7, 3.3, 5, "ok"))
    r0 = ref(("target", "decode", 1, 1, 16, 1.0), ("target", "decode", 8, 1, 16, 1.0))
    r1 = ref(("target", "decode", 1, 1, 16, 2.0), ("target", "decode", 8, 1, 16, 2.0))  # the slow pass
    r2 = ref(("target", "decode", 1, 1, 16, 1.0), ("target", "decode", 8, 1, 16, 0.75))  # a fast second at batch 8
    assert sweep.typical_reference([r0, r1, r2]) == 1.0
    m = sweep.merge_passes([p0, p1, p2], [r0, r1, r2])
    assert m.attrs["typical_reference_s"] == 1.0
    m = m.set_index("batch")
    assert m.loc[1, "median_s"] == pytest.approx(1.0)  # 1.0, 2.0 / 2, 1.1 -> median 1.0
    assert m.loc[8, "median_s"] == pytest.approx(4.0)  # 4.0, 8.0 / 2, 3.0 / 0.75
    assert m.loc[1, "p90_s"] == pytest.approx(1.2)  # p90: the largest after rescaling (1.1, 1.1, 1.2)
    plain = sweep.merge_passes([p0, p1, p2]).set_index("batch")
    assert plain.loc[8, "median_s"] == 4.0 and plain.loc[1, "median_s"] == 1.1
    missing = sweep.merge_passes([p0, p1, p2], [r0, r1.iloc[:1], r2])  # batch 8 unread in pass 1
    assert missing.set_index("batch").equals(plain) and not missing.attrs
    assert sweep.typical_reference([r0, None]) is None and sweep.merge_passes([p0, p1], [r0, None]).equals(
        sweep.merge_passes([p0, p1]))


def test_passes_from_the_cli_merge_and_share_the_deadline(tmp_path, monkeypatch):
    seen = []
    real = sweep.run_profile

    def spy(cfg, **kw):
        seen.append(cfg.timing.deadline_s)
        return real(cfg, **kw)

    import specbatch.sim.profile as sim_profile

    real_check, checks = sim_profile.monotone_violations, []

    def first_check_disputes_rows_0_and_1(profile):  # so that a repair round always runs
        checks.append(profile)
        return [(0, 1, "made up: rows 0 and 1")] if len(checks) == 1 else real_check(profile)

    monkeypatch.setattr(sweep, "run_profile", spy)
    monkeypatch.setattr(sim_profile, "monotone_violations", first_check_disputes_rows_0_and_1)
    out = cli.run(make_cfg(tmp_path, "timing.passes=2", "timing.deadline_s=600", "grid.batches=[1,2]",
                           "grid.gammas=[0,2]", "grid.contexts=[16]", "grid.prefill_lengths=[8]"))
    # half of the total, then all that is left after a first pass of a few seconds, then repair sweeps of the
    # disputed points with what is left (one round at least, for the made-up dispute; more if the timing noise
    # made a real one)
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["timing"]["repairs"]) >= 1 and len(seen) == 2 + sweep.REPAIR_SWEEPS * len(meta["timing"]["repairs"])
    assert 290 < seen[0] <= 300 and 500 < seen[1] < 600
    assert meta["timing"]["passes"] == 2 and meta["timing"]["complete"] and meta["timing"]["deadline_s"] == 600
    merged = pd.read_csv(out / "steps.csv").set_index(sweep.KEY)
    sweeps = pd.concat([pd.read_csv(d / "steps.csv") for d in sorted(out.glob("pass*")) + sorted(out.glob("repair*"))])
    assert len(merged) == len(sweeps.query("status == 'ok'").drop_duplicates(sweep.KEY))
    # each point: the median of the medians of the sweeps that measured it -- the two passes' mean where no
    # repair sweep remeasured it, the median of five where a repair round did (three sweeps of those points)
    per_point = sweeps.groupby(sweep.KEY)["median_s"]
    np.testing.assert_allclose(merged["median_s"], per_point.median().loc[merged.index])
    rounds = [{tuple(p) for p in r["points"]} for r in meta["timing"]["repairs"]]
    expected = [2 + sweep.REPAIR_SWEEPS * sum(k in points for points in rounds) for k in merged.index]
    assert per_point.size().loc[merged.index].tolist() == expected
    load_profile(out)


def test_cudnn_attention_is_off_on_cuda_unless_asked_for(monkeypatch):
    """cuDNN SDPA builds a plan per new shape (see attention_backends); the flags are settable without a GPU."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        monkeypatch.delenv("SPECBATCH_SDPA_CUDNN", raising=False)
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert M.attention_backends("cpu") == {} and torch.backends.cuda.cudnn_sdp_enabled()  # CPU: untouched
        assert M.attention_backends("cuda:0")["cudnn"] is False and not torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setenv("SPECBATCH_SDPA_CUDNN", "1")
        assert M.attention_backends("cuda")["cudnn"] is True and torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_cpu_profile_records_no_sdpa_backends(tiny_profile):
    assert json.loads((tiny_profile / "meta.json").read_text())["timing"]["sdpa_backends"] is None


def test_passes_stop_when_the_deadline_is_spent(tmp_path, tiny_profile, monkeypatch):
    """With a fake clock: each pass takes 10 s; a 15 s deadline leaves room for two of three passes."""
    import shutil

    clock, seen = [0.0], []

    def fake_run_profile(cfg, *, out_dir, grid, progress, points=None):
        seen.append(cfg.timing.deadline_s)
        shutil.copytree(tiny_profile, out_dir, ignore=shutil.ignore_patterns("pass*", "repair*"))
        clock[0] += 10.0
        return out_dir

    monkeypatch.setattr(sweep, "run_profile", fake_run_profile)
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: clock[0])
    cfg = make_cfg(tmp_path, "timing.deadline_s=15")
    out = sweep.run_passes(cfg, out_dir=tmp_path / "p3", grid=sweep.Grid.from_cfg(cfg.grid), passes=3,
                           progress=False)
    assert seen == [5.0, 2.5]  # 15 s / 3, then the 5 s left / 2; the third pass never starts
    meta = json.loads((out / "meta.json").read_text())
    assert meta["timing"]["passes"] == 2 and meta["timing"]["complete"] is False
    assert len(pd.read_csv(out / "steps.csv")) == len(pd.read_csv(tiny_profile / "steps.csv"))


def _fake_sweeps(tiny_profile, slow_in_passes, slow_in_repairs, calls):
    """A stand-in for run_profile writing a monotone profile (time = 1 ms x batch x tokens) except that the
    target decode point at batch 1, context 16 takes 10 ms in whole passes (``slow_in_passes``) and in repair
    sweeps (``slow_in_repairs``): ten times batch 2's 2 ms, a violation of the monotonicity gate."""
    import shutil

    def fake_run_profile(cfg, *, out_dir, grid, progress, points=None):
        calls.append((Path(out_dir).name, points))
        shutil.copytree(tiny_profile, out_dir, ignore=shutil.ignore_patterns("pass*", "repair*"))
        steps = pd.read_csv(Path(out_dir) / "steps.csv")
        steps = steps[steps["status"] == "ok"].copy()
        steps["median_s"] = 1e-3 * steps["batch"] * steps["tokens"] * (1 + steps["context"] / 1000)
        slow = (steps["model"] == "target") & (steps["phase"] == "decode") & (steps["batch"] == 1) & \
            (steps["context"] == 16)
        if slow_in_repairs if points is not None else slow_in_passes:
            steps.loc[slow, "median_s"] = 10e-3
        steps["p10_s"], steps["p90_s"] = steps["median_s"], steps["median_s"]
        if points is not None:
            steps = steps[[tuple(r) in points for r in steps[sweep.KEY].itertuples(index=False)]]
        steps.to_csv(Path(out_dir) / "steps.csv", index=False)
        return out_dir

    return fake_run_profile


def test_disputed_points_are_remeasured_until_the_profile_is_monotone(tmp_path, tiny_profile, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "run_profile", _fake_sweeps(tiny_profile, True, False, calls))
    cfg = make_cfg(tmp_path)
    out = sweep.run_passes(cfg, out_dir=tmp_path / "r", grid=sweep.Grid.from_cfg(cfg.grid), passes=2,
                           progress=False)
    # both ends of both violations: 10 ms at batch 1 falls to 2.032 ms at batch 2 and at γ = 1 (tokens 2)
    disputed = {("target", "decode", 1, 1, 16), ("target", "decode", 2, 1, 16), ("target", "verify", 1, 2, 16)}
    assert calls == [("pass0", None), ("pass1", None)] + \
        [(f"repair0_{s}", disputed) for s in range(sweep.REPAIR_SWEEPS)]
    merged = pd.read_csv(out / "steps.csv").set_index(sweep.KEY)["median_s"]
    # batch 1: the median of 10, 10, 1.016, 1.016, 1.016 ms; batch 2 measured 2.032 ms in all five sweeps
    assert merged[("target", "decode", 1, 1, 16)] == pytest.approx(1.016e-3)
    assert merged[("target", "decode", 2, 1, 16)] == pytest.approx(2.032e-3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["timing"]["repairs"] == [{"points": sorted(list(p) for p in disputed), "violations": 2}]
    assert meta["timing"]["passes"] == 2 and meta["timing"]["complete"]
    from specbatch.sim.profile import check_monotone

    check_monotone(load_profile(out))


def test_after_pass_runs_between_the_passes_on_the_profile_merged_so_far(tmp_path, tiny_profile, monkeypatch):
    """specbatch-validate interleaves its engine rounds with the passes: the hook runs after each of the first
    ``passes`` passes (not after repairs), and sees the passes so far merged into the output folder."""
    calls, seen = [], []
    monkeypatch.setattr(sweep, "run_profile", _fake_sweeps(tiny_profile, True, False, calls))

    def after_pass(k):
        meta = json.loads((tmp_path / "r" / "meta.json").read_text())
        seen.append((k, meta["timing"]["passes"], [n for n, _ in calls]))

    cfg = make_cfg(tmp_path)
    sweep.run_passes(cfg, out_dir=tmp_path / "r", grid=sweep.Grid.from_cfg(cfg.grid), passes=3, progress=False,
                     after_pass=after_pass)
    assert seen == [(0, 1, ["pass0"]), (1, 2, ["pass0", "pass1"]), (2, 3, ["pass0", "pass1", "pass2"])]
    repairs = [n for n, _ in calls][3:]  # the slow point needs repair sweeps; the hook does not run after them
    assert repairs and all(n.startswith("repair") for n in repairs) and len(seen) == 3


def test_a_violation_that_survives_every_repair_and_pass_is_an_error(tmp_path, tiny_profile, monkeypatch):
    from specbatch.sim.profile import ProfileError

    calls = []
    monkeypatch.setattr(sweep, "run_profile", _fake_sweeps(tiny_profile, True, True, calls))
    cfg = make_cfg(tmp_path)
    with pytest.raises(ProfileError, match=r"target decode/verify time falls .* batch=1 .* batch=2 .*"
                                           r"after 3 passes and 2 repair rounds"):
        sweep.run_passes(cfg, out_dir=tmp_path / "r", grid=sweep.Grid.from_cfg(cfg.grid), passes=2, max_passes=3,
                         repairs=2, progress=False)
    names = [n for n, _ in calls]
    assert names == ["pass0", "pass1"] + [f"repair{r}_{s}" for r in range(2) for s in range(sweep.REPAIR_SWEEPS)] + \
        ["pass2"]


def test_run_profile_measures_only_the_points_asked_for(tmp_path):
    cfg = make_cfg(tmp_path)
    points = {("target", "verify", 2, 3, 32), ("draft", "decode", 4, 1, 16), ("draft", "prefill", 1, 8, 0)}
    out = sweep.run_profile(cfg, out_dir=tmp_path / "some", grid=sweep.Grid.from_cfg(cfg.grid), progress=False,
                            points=points)
    steps = load_profile(out).steps
    assert {tuple(r) for r in steps[sweep.KEY].itertuples(index=False)} == points
    assert (steps["status"] == "ok").all() and (steps["median_s"] > 0).all()


def test_clock_auto_is_cpu_time_with_one_cpu_thread():
    """timing.clock=auto: the process's CPU time on a CPU with one thread (a descheduled step is not charged for
    the wait), the wall clock otherwise; cpu with two threads or on CUDA is refused naming the key."""
    from specbatch.profiler.timing import make_timer, resolve_clock

    assert resolve_clock("auto", "cpu", 1) == "cpu"
    assert resolve_clock("auto", "cpu", 2) == "wall" and resolve_clock("auto", "cuda", 1) == "wall"
    for device, threads in (("cpu", 2), ("cuda:0", 1)):
        with pytest.raises(ValueError, match="timing.clock=cpu"):
            resolve_clock("cpu", device, threads)
    with pytest.raises(ValueError, match=r"timing.clock='gpu'; expected one of"):
        resolve_clock("gpu", "cpu", 1)
    import time
    slept = make_timer("cpu", "cpu")(lambda: time.sleep(0.05))  # waiting costs no CPU time
    assert slept < 0.02 and make_timer("cpu", "wall")(lambda: time.sleep(0.05)) >= 0.05


def test_mode_mixed_adds_mixed_forwards_and_the_rule_checks_them(tmp_path, tiny_profile):
    """mode=mixed times the mixed grid into an existing profile (steps.csv untouched), with the steps the rule
    reads re-timed alongside; fidelity.mixed checks the rule against both."""
    import shutil

    from specbatch.fidelity.mixed import rule_check

    shutil.copytree(tiny_profile, tmp_path / "p")
    steps = (tmp_path / "p" / "steps.csv").read_bytes()
    cli.run(make_cfg(tmp_path, "mode=mixed", "mixed.anchors=true", "mixed.batches=[1,4]", "mixed.gammas=[0,2]"))
    assert (tmp_path / "p" / "steps.csv").read_bytes() == steps
    prof = load_profile(tmp_path / "p")
    m = prof.mixed
    # tiny grid: chunk lengths [8] (the prefill lengths but the longest), prefixes 0 and 8, context 32
    assert len(m) == 2 * 2 * (2 + 1) and (m["status"] == "ok").all() and set(m["context"]) == {32}
    assert set(m["chunk_prefix"]) == {0, 8} and set(m[m["model"] == "target"]["tokens"]) == {1, 3}
    info = prof.meta["mixed"]
    assert info["passes"] == 1 and info["clock"] == "cpu" and info["threads"] == 1 and info["anchors"]
    check = rule_check(prof)
    for part in ("profile_steps", "same_run_steps"):
        assert len(check[part]["points"]) == len(m)
        assert all(np.isfinite(p["rel_error"]) and p["predicted_s"] > 0 for p in check[part]["points"])
    with pytest.raises(FileNotFoundError, match="mode=mixed adds mixed forwards to an existing profile"):
        cli.run(make_cfg(tmp_path, "mode=mixed", "name=absent"))
