"""The engine-style attention (profiler/attention.py) computes what transformers' masked paths compute.

CPU, fp32: logits of prefill, decode and verify (γ = 1..8, empty and filled cache) equal those of the eager
(explicit-mask) and sdpa paths to 1e-5, for a GQA preset (tiny-llama: 4 query heads over 2 K/V heads), an MHA
llama preset and an OPT preset; and no 4-D mask reaches the attention function.
"""
from __future__ import annotations

import pytest
import torch

from specbatch.profiler import attention as A
from specbatch.profiler import models as M

PRESETS = ["tiny-llama", "tiny-llama-draft", "tiny-opt"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def built():
    out = {}
    for name in PRESETS:
        out[name] = {impl: M.load_model(name, torch.float32, "cpu", seed=3, attention=impl)[0]
                     for impl in ("eager", "sdpa", A.NAME)}
    return out


def _caches(cfg, batch, context, new):
    """Two pre-allocated caches with the same random K/V of ``context`` positions (room for ``new`` more)."""
    torch.manual_seed(11)
    a = M.make_cache("prealloc", cfg, batch, context, new, torch.float32, "cpu")
    b = M.make_cache("prealloc", cfg, batch, context, new, torch.float32, "cpu")
    for la, lb in zip(a.layers, b.layers):
        lb.kbuf.copy_(la.kbuf)
        lb.vbuf.copy_(la.vbuf)
    return a, b


@torch.inference_mode()
def _logits(model, cache, ids):
    b, t = ids.shape
    start = cache.get_seq_length()
    pos = torch.arange(start, start + t).unsqueeze(0).expand(b, t)
    out = M.forward(model, cache, input_ids=ids, position_ids=pos, use_cache=True)
    assert cache.get_seq_length() == start + t
    return out.logits


def _compare(models, batch, context, tokens, ref="eager"):
    cfg = models[A.NAME].config
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
    c_ref, c_new = _caches(cfg, batch, context, tokens)
    want = _logits(models[ref], c_ref, ids)
    got = _logits(models[A.NAME], c_new, ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for la, lb in zip(c_ref.layers, c_new.layers):  # the same K/V written
        torch.testing.assert_close(lb.keys, la.keys, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("ref", ["eager", "sdpa"])
def test_decode_and_prefill_match(built, name, ref):
    for batch in (1, 3):
        _compare(built[name], batch, 0, 1, ref)   # decode into an empty cache
        _compare(built[name], batch, 37, 1, ref)  # decode: one query, no mask
        _compare(built[name], batch, 0, 16, ref)  # prefill: is_causal
        _compare(built[name], batch, 0, 5, ref)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("context", [0, 1, 40])
def test_verify_matches_masked_paths(built, name, context):
    for gamma in range(1, 9):
        _compare(built[name], 2, context, gamma + 1, "eager")
        _compare(built[name], 2, context, gamma + 1, "sdpa")


def test_the_profiler_steps_match(built):
    """prefill, decode_one_token and verify (the timed steps) give the same results on both paths."""
    models = built["tiny-llama"]
    cfg = models[A.NAME].config
    for temperature in (0.0, 1.0):
        res = []
        for impl in ("eager", A.NAME):
            c = _caches(cfg, 2, 20, 9)[0]
            g = torch.Generator().manual_seed(5)
            last = torch.tensor([3, 7])
            draft = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(1))
            probs = torch.softmax(torch.randn(2, 4, cfg.vocab_size, generator=torch.Generator().manual_seed(2)), -1)
            torch.manual_seed(0)
            tok = M.decode_one_token(models[impl], c, last, temperature)
            M.rollback(c, 1)
            n, nxt = M.verify(models[impl], c, last, draft, probs, temperature, g)
            pre = M.prefill(models[impl], M.make_cache("prealloc", cfg, 2, 0, 12, torch.float32, "cpu"),
                            torch.arange(24).reshape(2, 12))
            res.append((tok, n, nxt, pre, c.get_seq_length()))
        (t0, n0, x0, p0, l0), (t1, n1, x1, p1, l1) = res
        assert torch.equal(t0, t1) and torch.equal(n0, n1) and torch.equal(x0, x1) and l0 == l1
        torch.testing.assert_close(p1, p0, atol=ATOL, rtol=0)


def test_no_mask_reaches_the_attention_function(monkeypatch):
    """transformers builds no mask for the registered name; the function sees the shapes it dispatches on."""
    assert A.builds_no_mask(A.NAME) and not A.builds_no_mask("sdpa")
    seen = []
    real = A.engine_attention

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append((attention_mask, query.shape[2], key.shape[2]))
        return real(module, query, key, value, attention_mask, **kw)

    model, _ = M.load_model("tiny-llama", torch.float32, "cpu")  # (registers the real function)
    monkeypatch.setitem(__import__("transformers").AttentionInterface._global_mapping, A.NAME, spy)
    cache = M.make_cache("prealloc", model.config, 2, 0, 30, torch.float32, "cpu")
    for t in (8, 1, 5):  # prefill, decode, verify
        _logits(model, cache, torch.zeros(2, t, dtype=torch.long))
    layers = model.config.num_hidden_layers
    assert [(m, q, k) for m, q, k in seen[::layers]] == [(None, 8, 8), (None, 1, 9), (None, 5, 14)]
    assert [A.mask_kind(q, k) for _, q, k in seen[::layers]] == ["causal", "none", "lower_right"]


def test_mask_kind_and_a_given_mask():
    assert A.mask_kind(1, 1) == A.mask_kind(1, 50) == "none"
    assert A.mask_kind(7, 7) == "causal" and A.mask_kind(5, 12) == "lower_right"
    assert A.mask_kind(5, 12, has_mask=True) == "given" and A.mask_kind(5, 12, causal=False) == "none"
    with pytest.raises(ValueError):
        A.mask_kind(6, 5)
    # a caller's mask (the fidelity engine's ragged slots) is honoured: equal to plain masked SDPA
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = torch.rand(2, 1, 3, 10) > 0.3
    mask[..., 0] = True

    class Mod:
        is_causal = True

    out, _ = A.engine_attention(Mod(), q, k, v, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, A.expand_kv(k, 2), A.expand_kv(v, 2), attn_mask=mask)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=ATOL, rtol=0)
    assert A.gqa_plan(q, k, v, False) == "native" and A.gqa_plan(q, q, q, False) == "same"


def test_backend_probe_on_cpu():
    """The probe reports the first backend that runs; on CPU the fp32 flash kernel takes all three shapes."""
    model, _ = M.load_model("tiny-llama", torch.float32, "cpu")
    cache = M.make_cache("prealloc", model.config, 1, 10, 5, torch.float32, "cpu")
    for t in (1, 5):
        assert A.probe_backend(lambda: _logits(model, cache, torch.zeros(1, t, dtype=torch.long)),
                               lambda: M.rollback(cache, cache.get_seq_length() - 10)) == "flash"
        assert cache.get_seq_length() == 10
    with pytest.raises(ValueError):
        A.check("flash_attention_9")
