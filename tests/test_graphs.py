"""CUDA-graph bookkeeping of the profiler (profiler/graphs.py), exercised on CPU.

A replay runs no Python: ``replay_like_capture`` runs the forward eagerly but puts the cache's Python-side
length back as a replay leaves it, so these tests check that :class:`GraphedModel` keeps the cache length,
inputs and outputs right for the timed steps. The real ``cuda_capture`` runs only where CUDA is.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from specbatch.profiler import graphs as G
from specbatch.profiler import models as M
from specbatch.profiler.sweep import graphs_enabled, make_step


@pytest.fixture(scope="module")
def model():
    return M.load_model("tiny-llama", torch.float32, "cpu", seed=2)[0]


def _cache(model, batch, context, new=9):
    torch.manual_seed(4)
    return M.make_cache("prealloc", model.config, batch, context, new, torch.float32, "cpu")


@pytest.mark.parametrize("capture", [G.eager_capture, G.replay_like_capture])
def test_graphed_steps_equal_eager_steps(model, capture):
    vocab = model.config.vocab_size
    last = torch.tensor([1, 2, 3])
    draft = torch.randint(0, vocab, (3, 4), generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(torch.randn(3, 4, vocab, generator=torch.Generator().manual_seed(1)), -1)
    for temperature in (0.0, 1.0):
        out = []
        for graphed in (False, True):
            c = _cache(model, 3, 25)
            gm = G.GraphedModel(model, c, 3, 5, 0, capture) if graphed else model
            assert c.get_seq_length() == 25  # capture leaves the cache as it found it
            runs = []
            for _ in range(3):  # replayed repeatedly, rolled back by the step itself
                n, nxt = M.verify(gm, c, last, draft, probs, temperature, torch.Generator().manual_seed(9))
                runs.append((n, nxt, c.get_seq_length()))
                assert c.get_seq_length() == 25 + 1 + int(n.max())
                M.rollback(c, c.get_seq_length() - 25)
            dm = G.GraphedModel(model, c, 3, 1, 1, capture) if graphed else model
            torch.manual_seed(3)
            tok = M.decode_one_token(dm, c, last, temperature)
            assert c.get_seq_length() == 26
            out.append((runs, tok))
        (r0, t0), (r1, t1) = out
        assert torch.equal(t0, t1)
        for (n0, x0, l0), (n1, x1, l1) in zip(r0, r1):
            assert torch.equal(n0, n1) and torch.equal(x0, x1) and l0 == l1


def test_graph_refuses_what_a_replay_would_get_wrong(model):
    c = _cache(model, 2, 10)
    gm = G.GraphedModel(model, c, 2, 3, 0, G.replay_like_capture)
    ids, pos = torch.zeros(2, 3, dtype=torch.long), torch.arange(10, 13).repeat(2, 1)
    gm(cache=c, input_ids=ids, position_ids=pos)
    assert c.get_seq_length() == 13
    with pytest.raises(ValueError, match="captured at 10"):  # the cache was not rolled back
        gm(cache=c, input_ids=ids, position_ids=pos)
    M.rollback(c, 3)
    with pytest.raises(ValueError, match="captured for input"):
        gm(cache=c, input_ids=torch.zeros(2, 4, dtype=torch.long), position_ids=pos)
    with pytest.raises(ValueError, match="cache it was captured on"):
        gm(cache=_cache(model, 2, 10), input_ids=ids, position_ids=pos)
    with pytest.raises(ValueError, match="pre-allocated"):
        G.GraphedModel(model, M.make_cache("dynamic", model.config, 2, 10, 3, torch.float32, "cpu"), 2, 3, 0,
                       G.eager_capture)


def test_make_step_with_a_capture_policy(model):
    """The sweep's steps: capture once in make_step, then step/reset as the timing loop runs them."""
    for p in [("target", "verify", 2, 5, 12), ("target", "decode", 2, 1, 12), ("draft", "decode", 2, 1, 12)]:
        c = _cache(model, 2, 12)
        step, reset = make_step(p, model, c, model.config.vocab_size, 1.0, torch.Generator().manual_seed(0), "cpu",
                                capture=G.replay_like_capture)
        for _ in range(4):
            step()
            assert c.get_seq_length() > 12
            reset()
            assert c.get_seq_length() == 12


def test_graphs_config_and_policy():
    on = OmegaConf.create({"timing": {"graphs": None}})
    assert graphs_enabled(on, "cuda") and not graphs_enabled(on, "cpu")
    assert not graphs_enabled(OmegaConf.create({"timing": {"graphs": False}}), "cuda")
    assert graphs_enabled(OmegaConf.create({"timing": {"graphs": True}}), "cpu")  # then refused:
    with pytest.raises(ValueError, match="CUDA"):
        G.capture_for("cpu", True)
    assert G.capture_for("cpu", False) is G.eager_capture and G.capture_for("cuda", True) is G.cuda_capture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager():  # pragma: no cover - run on a GPU machine
    m = M.load_model("tiny-llama", torch.bfloat16, "cuda", seed=2)[0]
    c = M.make_cache("prealloc", m.config, 2, 30, 5, torch.bfloat16, "cuda")
    ids = torch.randint(0, 512, (2, 5), device="cuda")
    pos = torch.arange(30, 35, device="cuda").repeat(2, 1)
    want = M.forward(m, c, input_ids=ids, position_ids=pos, use_cache=True).logits.clone()
    M.rollback(c, 5)
    gm = G.GraphedModel(m, c, 2, 5, 0, G.cuda_capture)
    for _ in range(2):
        got = gm(cache=c, input_ids=ids, position_ids=pos).logits
        torch.testing.assert_close(got, want)
        M.rollback(c, 5)
