"""Shared test helpers: small cost profiles written from formulas with known answers."""
from __future__ import annotations

from pathlib import Path

import pytest

from specbatch.sim.profile import write_mixed, write_profile_meta, write_steps


def linear_step(base: float, per_token: float, per_ctx: float = 0.0, knee: int = 0):
    """A step-time formula: base + per_token·max(0, b·tokens − knee) + per_ctx·b·context (seconds).

    Below the knee the step is memory-bound (flat in work); above it, compute-bound (linear)."""
    def f(batch: int, tokens: int, context: int) -> float:
        return base + per_token * max(0, batch * tokens - knee) + per_ctx * batch * context
    return f


def write_formula_profile(folder: Path, verify, draft, prefill=lambda n: 1e-3 * n, *,
                          batches=(1, 2, 4, 8, 16, 32, 64), max_tokens=9, contexts=(128, 512, 2048),
                          prompts=(16, 64, 256, 1024, 4096), prefill_batches=(1,), batched_prefill=None,
                          kv_cache_bytes=10**9, kv_target=1000, kv_draft=100, name="test", mixed=True) -> Path:
    """Write a complete profile folder whose step times come from the given formulas. Prefill rows at each of
    ``prefill_batches``: ``batched_prefill(n, b)`` seconds for b prompts of n tokens (default b·prefill(n));
    the draft's prefill is a tenth of the target's. ``mixed``: also ``mixed.csv`` (:func:`formula_mixed_rows`)."""
    batched_prefill = batched_prefill or (lambda n, b: b * prefill(n))
    rows = []
    for c in contexts:
        for b in batches:
            for t in range(1, max_tokens + 1):
                v = verify(b, t, c)
                rows.append(dict(model="target", phase="decode" if t == 1 else "verify", batch=b, tokens=t, context=c,
                                 median_s=v, p10_s=v, p90_s=v, samples=5, status="ok"))
            d = draft(b, 1, c)
            rows.append(dict(model="draft", phase="decode", batch=b, tokens=1, context=c,
                             median_s=d, p10_s=d, p90_s=d, samples=5, status="ok"))
    for m, scale in (("target", 1.0), ("draft", 0.1)):
        for b in prefill_batches:
            for n in prompts:
                v = scale * (prefill(n) if b == 1 else batched_prefill(n, b))
                rows.append(dict(model=m, phase="prefill", batch=b, tokens=n, context=0,
                                 median_s=v, p10_s=v, p90_s=v, samples=5, status="ok"))
    folder.mkdir(parents=True, exist_ok=True)
    write_steps(folder, rows)
    if mixed:
        write_mixed(folder, formula_mixed_rows(verify, draft, prefill, batches, contexts, prompts))
    write_profile_meta(folder, {
        "source": "analytical", "date": "2026-01-01", "dtype": "float32",
        "device": {"name": name, "kind": "cpu", "memory_bytes": 2 * kv_cache_bytes, "kv_cache_bytes": kv_cache_bytes},
        "models": {"target": {"name": "t", "kv_bytes_per_token": kv_target},
                   "draft": {"name": "d", "kv_bytes_per_token": kv_draft}},
        "timing": {"method": "formula"},
    })
    return folder


def formula_mixed_rows(verify, draft, prefill, batches, contexts, prompts) -> list[dict]:
    """mixed.csv rows for a formula profile: a forward of b sequences' new tokens (γ+1 = 1 and 5 on the target,
    1 on the draft) at the shortest context plus a chunk of k tokens after p cached ones costs the step plus
    prefill(p + k) − prefill(p) (a tenth of it on the draft): the mixed-iteration rule's answer whenever the
    prefill curve's fixed part is below the step's, which these formulas keep."""
    rows, c, k = [], contexts[0], prompts[0]
    for b in (batches[0], batches[-1]):
        for p in (0, k):
            delta = prefill(p + k) - prefill(p)
            for m, t, step, scale in (("target", 1, verify, 1.0), ("target", 5, verify, 1.0), ("draft", 1, draft, 0.1)):
                v = step(b, t, c) + scale * delta
                rows.append(dict(model=m, batch=b, tokens=t, context=c, chunk_tokens=k, chunk_prefix=p, median_s=v,
                                 p10_s=v, p90_s=v, samples=5, status="ok"))
    return rows


def add_drafter_rows(folder: Path, eagle=None, ngram=None, *, eagle_prefill: float = 0.02, kv_eagle=10,
                     lookup=(1, 4)) -> Path:
    """Append drafter rows to a formula profile: ``eagle(b, 1, c)`` decode rows at the target decode rows' grid
    and prefill rows at the target prefill rows' (batch, length) points, ``eagle_prefill`` × the target's time,
    and/or ``ngram(b, 1, c)`` decode rows (CPU seconds per proposal call); with ``models.eagle`` (``kv_eagle``
    bytes per token) / ``models.ngram`` (0 bytes, the lookup window) in meta.json."""
    import json

    import pandas as pd

    steps = pd.read_csv(folder / "steps.csv")
    tgt = steps[(steps["model"] == "target") & (steps["tokens"] == 1) & (steps["phase"] == "decode")]
    pre = steps[(steps["model"] == "target") & (steps["phase"] == "prefill")]
    rows = []
    for name, f in (("eagle", eagle), ("ngram", ngram)):
        if f is None:
            continue
        for b, c in zip(tgt["batch"], tgt["context"]):
            v = f(int(b), 1, int(c))
            rows.append(dict(model=name, phase="decode", batch=int(b), tokens=1, context=int(c), median_s=v, p10_s=v,
                             p90_s=v, samples=5, status="ok"))
    if eagle is not None:
        for b, n, t in zip(pre["batch"], pre["tokens"], pre["median_s"]):
            v = eagle_prefill * float(t)
            rows.append(dict(model="eagle", phase="prefill", batch=int(b), tokens=int(n), context=0, median_s=v,
                             p10_s=v, p90_s=v, samples=5, status="ok"))
    write_steps(folder, pd.concat([steps, pd.DataFrame(rows)], ignore_index=True))
    meta = json.loads((folder / "meta.json").read_text())
    if eagle is not None:
        meta["models"]["eagle"] = {"name": "e", "kv_bytes_per_token": kv_eagle}
    if ngram is not None:
        meta["models"]["ngram"] = {"name": "ngram", "kv_bytes_per_token": 0, "prompt_lookup_min": lookup[0],
                                   "prompt_lookup_max": lookup[1]}
    write_profile_meta(folder, meta)
    return folder


@pytest.fixture(scope="module")
def models():
    """The tiny target and draft presets (random weights, fp32, CPU, one thread) for engine tests."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from specbatch.profiler import models as M

    torch.set_num_threads(1)
    t, _ = M.load_model("tiny-llama", torch.float32, "cpu", seed=0)
    d, _ = M.load_model("tiny-llama-draft", torch.float32, "cpu", seed=1)
    return t, d


@pytest.fixture
def formula_profile(tmp_path):
    """A profile where verify is memory-bound up to 64 tokens of work, then linear; draft is cheap."""
    return write_formula_profile(tmp_path / "formula",
                                 verify=linear_step(0.010, 0.0005, knee=64),
                                 draft=linear_step(0.001, 0.00002))


# --- `make test-fast`: which tests are slow -----------------------------------------------------------------
# Tests marked slow here, beside those decorated @pytest.mark.slow, so that `make test-fast` (-m "not slow")
# stays near 2 minutes on 2 cores. Measured on the 2-core VM under load (2026-12-03, load average ~9): every
# test below took over 2 s (most run the simulator or hydra in a subprocess, or real models); the modules run
# real models, engines, launchers or installs throughout. A test that grows slow goes here or gets the marker.
SLOW_MODULES = {"test_engine.py", "test_profiler.py", "test_profiler_shipped.py", "test_parallel.py",
                "test_multirun.py", "test_launcher_ray.py", "test_core_install.py"}
SLOW_TESTS = {
    "test_atomic.py": {"test_cli_skips_a_complete_run_and_redoes_an_incomplete_one",
                       "test_killed_run_leaves_no_summary_and_the_rerun_resumes"},
    "test_attention.py": {"test_decode_and_prefill_match", "test_verify_matches_masked_paths"},
    "test_capacity.py": {"test_load_one_and_above_scale_the_saturation_rate", "test_poisson_load_is_the_busy_fraction",
                         "test_unservable_requests_do_not_count_toward_the_rate"},
    "test_cli.py": {"test_adaptive_table_is_saved_with_the_run", "test_bad_config_gives_a_clear_error",
                    "test_default_run_uses_the_shipped_profile", "test_plain_install_works_from_any_directory",
                    "test_run_writes_every_output"},
    "test_config.py": {"test_hydra_composition_errors_are_one_line"},
    "test_properties.py": {"test_every_request_completes_exactly_once_with_its_output_tokens",
                           "test_fast_forward_is_exactly_one_event_per_iteration"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS.get(module, ()):
            item.add_marker(pytest.mark.slow)
