"""The engine's CUDA-graph bookkeeping (specbatch.fidelity.graphs), run on the CPU with a capture that replays
like a graph: static inputs rewritten per call, one capture per (model, batch, tokens, span bucket), logits and
K/V writes equal to the eager forward's, and a greedy run that emits the target's own greedy tokens."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from specbatch.fidelity import engine as E  # noqa: E402
from specbatch.fidelity.graphs import StepGraphs, bucket_for, span_buckets  # noqa: E402
from specbatch.profiler.graphs import replay_like_capture  # noqa: E402
from specbatch.sim.acceptance import AcceptanceModel  # noqa: E402
from specbatch.sim.cost_model import CostModel  # noqa: E402
from specbatch.sim.policies import make_policy  # noqa: E402
from specbatch.sim.profile import load_profile  # noqa: E402
from specbatch.sim.workload import Workload  # noqa: E402

from conftest import linear_step, write_formula_profile  # noqa: E402


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    """Step costs from formulas (batch ≤ 4, γ ≤ 3: the graphs a run captures stay few)."""
    folder = write_formula_profile(tmp_path_factory.mktemp("p") / "formula", verify=linear_step(0.004, 0.0001),
                                   draft=linear_step(0.001, 0.00001), batches=(1, 2, 4), contexts=(16, 64, 256),
                                   prompts=(8, 32, 128))
    return CostModel(load_profile(folder), max_batch=4, max_gamma=3)


def test_span_buckets_grow_by_at_most_half_and_end_at_the_slot_length():
    assert span_buckets(2048) == [64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert span_buckets(154) == [64, 128, 154]
    assert span_buckets(64) == [64]
    b = span_buckets(4096)
    assert all(y <= 2 * x for x, y in zip(b[:2], b[1:3])) and all(y <= 1.5 * x for x, y in zip(b[1:], b[2:]))
    assert bucket_for(65, b) == 128 and bucket_for(64, b) == 64
    with pytest.raises(ValueError, match="KV slot overflow: 4097 > 4096"):
        bucket_for(4097, b)


def _filled(model, n_slots, lengths, max_len=96):
    slots = E.SlotCache(model.config, n_slots, max_len, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(3)
    for s, n in enumerate(lengths):
        E.prefill_into_slot(model, slots, s, torch.randint(0, 512, (n,), generator=gen).tolist(), 1.0, gen, "cpu")
    return slots


@pytest.mark.parametrize("tokens", [1, 4])
def test_replays_equal_the_eager_forward_and_capture_once_per_bucket(models, tokens):
    """Two calls with different lengths in the same bucket: one capture, and each replay's logits and K/V
    writes are the eager forward's (the graph body reads the static inputs, not the first call's values)."""
    target, _ = models
    graphs = StepGraphs(E.batched_forward, replay_like_capture, 96, "cpu")
    eager_slots, graph_slots = _filled(target, 3, [40, 19, 33]), _filled(target, 3, [40, 19, 33])
    for lengths in ([7, 19, 30], [40, 12, 33]):  # spans 30 + t and 40 + t: both in the 64 bucket
        ids = torch.tensor([[5, 6, 7, 8][:tokens], [9, 10, 11, 12][:tokens], [1, 2, 3, 4][:tokens]])
        lens = torch.tensor(lengths)
        ref = E.batched_forward(target, eager_slots, ids, lens, True)
        got = graphs.forward(target, graph_slots, ids, lens, True)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        for le, lg in zip(eager_slots.layers, graph_slots.layers):
            for s, n in enumerate(lengths):
                torch.testing.assert_close(lg.kbuf[s, :, :n + tokens], le.kbuf[s, :, :n + tokens])
                torch.testing.assert_close(lg.vbuf[s, :, :n + tokens], le.vbuf[s, :, :n + tokens])
    assert len(graphs.graphs) == 1 and graphs.late_captures == 1  # captured at the first call, replayed at the second


def test_greedy_run_on_graphs_emits_the_targets_greedy_tokens(models, cost):
    """A whole engine run with its batched forwards replayed (greedy, real acceptance, mixed contexts): the
    same tokens as the eager engine, every graph captured in the warm-up (no late capture)."""
    target, draft = models
    w = Workload(np.array([0.0, 0.0, 0.001]), np.array([5, 12, 9]), np.array([14, 9, 17]))
    tokens = {}
    for graphed in (False, True):
        cfg = E.EngineConfig(max_batch=4, acceptance="real", temperature=0.0, clock="cpu", warmup=True)
        eng = E.Engine("tiny-llama", "tiny-llama-draft", cfg, max_len=96, models=(target, draft))
        if graphed:
            eng.step_graphs = StepGraphs(E.batched_forward, replay_like_capture, eng.max_len, "cpu")
        r = eng.run(w, cost, make_policy("fixed", gamma=3), AcceptanceModel(alpha=0.5, max_gamma=3))
        assert (r.requests["generated_tokens"] == r.requests["output_tokens"]).all()
        tokens[graphed] = eng.tokens
    assert tokens[True] == tokens[False]
    # every (batch 1-4) x (target 1-4 new tokens, draft 1) x (buckets 64, 96) graph, all before the clock started
    assert len(eng.step_graphs.graphs) == 4 * 4 * 2 + 4 * 2 and eng.step_graphs.late_captures == 0


def test_graphs_on_the_cpu_are_refused_in_one_line(models):
    with pytest.raises(ValueError, match=r"graphs=True needs a CUDA device \(device='cpu'\)"):
        E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(graphs=True, warmup=False), max_len=64,
                 models=models)
    assert E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(warmup=False), max_len=64,
                    models=models).step_graphs is None  # auto: eager on the CPU


def test_chunked_run_on_graphs_emits_the_eager_engines_tokens(models, cost):
    """Chunked prefill with the plain steps replayed from graphs (the packed forwards stay eager): the same
    greedy tokens and accepted drafts as the eager chunked engine; the draft is the target itself, so a wrong
    KV write on either path would show as a rejected draft."""
    target, _ = models
    w = Workload(np.array([0.0, 0.0, 0.01, 0.02]), np.array([40, 23, 70, 10]), np.array([6, 9, 9, 4]))
    out = {}
    for graphed in (False, True):
        cfg = E.EngineConfig(max_batch=4, prefill="chunked", max_num_batched_tokens=24, clock="cpu",
                             acceptance="real", temperature=0.0)
        eng = E.Engine("tiny-llama", "tiny-llama", cfg, max_len=128, models=(target, target))
        if graphed:
            eng.step_graphs = StepGraphs(E.batched_forward, replay_like_capture, eng.max_len, "cpu")
        r = eng.run(w, cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.7), seed=0)
        out[graphed] = (eng.tokens, r.requests["accepted_tokens"].tolist())
    assert out[True] == out[False]
    assert eng.step_graphs.late_captures == 0 and len(eng.step_graphs.graphs) > 0
