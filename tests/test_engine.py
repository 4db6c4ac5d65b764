"""The real engine: slot KV cache with mixed contexts, speculative decoding correctness, the simulator's
iteration semantics (same acceptance draws), preemption and the output tables."""
from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from specbatch.fidelity import engine as E  # noqa: E402
from specbatch.profiler import models as M  # noqa: E402
from specbatch.sim.acceptance import AcceptanceModel  # noqa: E402
from specbatch.sim.cluster import ClusterConfig, simulate  # noqa: E402
from specbatch.sim.cost_model import CostModel  # noqa: E402
from specbatch.sim.metrics import summarize  # noqa: E402
from specbatch.sim.policies import make_policy  # noqa: E402
from specbatch.sim.profile import load_profile  # noqa: E402
from specbatch.sim.iterations import ITERATION_COLUMNS  # noqa: E402
from specbatch.sim.workload import Workload  # noqa: E402

from conftest import linear_step, write_formula_profile  # noqa: E402


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    folder = write_formula_profile(tmp_path_factory.mktemp("p") / "formula", verify=linear_step(0.004, 0.0001),
                                   draft=linear_step(0.001, 0.00001), batches=(1, 2, 4, 8), contexts=(16, 64, 256),
                                   prompts=(8, 32, 128))
    return CostModel(load_profile(folder), max_batch=8, max_gamma=6)


def _workload(prompts, outputs, arrivals=None):
    n = len(prompts)
    return Workload(np.zeros(n) if arrivals is None else np.asarray(arrivals, float), np.asarray(prompts, np.int64),
                    np.asarray(outputs, np.int64))


def test_mixed_context_step_matches_single_sequences(models):
    """Two sequences of different lengths in one batched step give each one's own full-forward logits."""
    target, _ = models
    slots = E.SlotCache(target.config, 2, 64, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (7, 19)]
    for s, ids in enumerate(seqs):
        E.prefill_into_slot(target, slots, s, ids, 1.0, gen, "cpu")
    new = torch.tensor([[5, 6, 7], [8, 9, 10]])
    logits = E.batched_forward(target, slots, new, torch.tensor([7, 19]), True)
    with torch.inference_mode():
        for s, ids in enumerate(seqs):
            ref = target(input_ids=torch.tensor([ids + new[s].tolist()])).logits[0, -3:]
            torch.testing.assert_close(logits[s], ref, atol=1e-4, rtol=1e-4)


def _greedy(model, ids, n):
    with torch.inference_mode():
        seq = list(ids)
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("same_draft", [True, False])
@pytest.mark.parametrize("prefill", ["sequential", "batched"])
def test_real_greedy_speculation_reproduces_target_greedy(models, cost, same_draft, prefill):
    """Greedy speculative decoding (real acceptance, rollback per sequence, mixed contexts in a batch) emits
    exactly the target's own greedy continuation; an identical draft is always accepted. With batched
    prefill the two requests arriving together are prefilled in one right-padded forward per model."""
    target, draft = models
    cfg = E.EngineConfig(max_batch=4, acceptance="real", temperature=0.0, clock="cpu", warmup=False, prefill=prefill)
    eng = E.Engine("tiny-llama", "tiny-llama-draft", cfg, max_len=96, models=(target, target if same_draft else draft))
    w = _workload([5, 12, 9], [14, 9, 17], [0.0, 0.0, 0.001])
    r = eng.run(w, cost, make_policy("fixed", gamma=3), AcceptanceModel(alpha=0.5, max_gamma=6))
    req = r.requests
    assert (req["generated_tokens"] == req["output_tokens"]).all()
    for rid in range(3):
        p = int(w.prompt_tokens[rid])
        toks = eng.tokens[rid]
        assert len(toks) == p + int(w.output_tokens[rid])
        assert toks[p:] == _greedy(target, toks[:p], int(w.output_tokens[rid]))
    if same_draft:
        assert (req["accepted_tokens"] >= 3 * (req["iterations"] - 1)).all()


def test_synthetic_acceptance_matches_simulator_iteration_by_iteration(models, cost):
    """All requests at t = 0 fit one batch: the engine's batches, γ, accepted tokens and per-request
    iterations equal the simulator's (same thresholds, same generator stream)."""
    target, draft = models
    cfg = E.EngineConfig(max_batch=8, acceptance="synthetic", clock="cpu", warmup=False)
    eng = E.Engine("tiny-llama", "tiny-llama-draft", cfg, max_len=96, models=(target, draft))
    w = _workload([8, 20, 13, 30, 5], [17, 5, 30, 11, 23])
    acc = AcceptanceModel(alpha=0.6, concentration=4.0, max_gamma=6)
    batched = E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(**{**cfg.__dict__, "prefill": "batched"}),
                       max_len=96, models=(target, draft))
    for name, params, engine in (("fixed", {"gamma": 3}, eng), ("none", {}, eng), ("fixed", {"gamma": 3}, batched)):
        real = engine.run(w, cost, make_policy(name, **params), acc, seed=3)
        sim = simulate(w, cost, make_policy(name, **params), acc, ClusterConfig(max_batch=8, kv_capacity_tokens=8 * 96),
                       seed=3)
        assert list(real.iterations.columns) == list(ITERATION_COLUMNS)
        for col in ("batch", "gamma", "tokens", "accepted", "admitted", "kv_tokens"):
            assert real.iterations[col].tolist() == sim.iterations[col].tolist(), col
        for col in ("iterations", "accepted_tokens", "generated_tokens", "mean_gamma"):
            np.testing.assert_array_equal(real.requests[col].to_numpy(), sim.requests[col].to_numpy())
        s = summarize(real)
        assert s["completed"] == 5 and s["throughput_tok_s"] > 0
        t = real.requests
        assert (t["first_token_s"] >= t["arrival_s"]).all() and (t["finished_s"] >= t["first_token_s"]).all()


def test_probe_runs_every_eighth_iteration_outside_the_engine_clock(models, cost):
    """A probe (here: 0.25 s of busy CPU work, more than the whole replay) runs before every 8th iteration;
    its time is taken out of the engine's clock, so the replay's times do not grow by it, and what it
    returns is kept."""
    target, draft = models
    cfg = E.EngineConfig(max_batch=8, acceptance="synthetic", clock="cpu", warmup=False)
    eng = E.Engine("tiny-llama", "tiny-llama-draft", cfg, max_len=96, models=(target, draft))
    w = _workload([8, 20, 13, 30, 5], [17, 5, 30, 11, 23])
    acc = AcceptanceModel(alpha=0.6, max_gamma=6)

    def busy() -> float:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.25:
            pass
        return time.process_time() - t0

    plain = eng.run(w, cost, make_policy("fixed", gamma=3), acc, seed=3)
    assert eng.probes == []
    probed = eng.run(w, cost, make_policy("fixed", gamma=3), acc, seed=3, probe=busy)
    n = len(probed.iterations)
    assert n == len(plain.iterations) and len(eng.probes) == -(-n // 8) and min(eng.probes) >= 0.25
    spent = sum(eng.probes)  # 0.25 s per probe; the replay itself takes 0.1-0.2 s of CPU
    assert probed.requests["finished_s"].max() < plain.requests["finished_s"].max() + spent / 2


def test_preemption_and_wall_clock_arrivals(models, cost):
    """A small KV capacity forces preemptions (recompute on re-admission); arrivals are honoured in wall-clock
    time; every request finishes with its full output."""
    target, draft = models
    cfg = E.EngineConfig(max_batch=4, kv_capacity_tokens=70, acceptance="synthetic", clock="wall", warmup=False)
    eng = E.Engine("tiny-llama", "tiny-llama-draft", cfg, max_len=96, models=(target, draft))
    w = _workload([10, 12, 9, 11], [20, 18, 22, 16], [0.0, 0.0, 0.0, 0.05])  # three overlap: KV 70 must preempt
    r = eng.run(w, cost, make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.7, max_gamma=6))
    req = r.requests
    assert (req["generated_tokens"] == req["output_tokens"]).all()
    assert req["preemptions"].sum() > 0
    assert (req["admitted_s"] >= req["arrival_s"] - 1e-9).all()
    assert r.iterations["kv_tokens"].max() <= 70
    for rid in range(4):
        assert len(eng.tokens[rid]) == w.prompt_tokens[rid] + w.output_tokens[rid]


def test_bad_settings_are_clear_errors(models, cost):
    with pytest.raises(ValueError, match="acceptance"):
        E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(acceptance="magic"), models=models)
    with pytest.raises(ValueError, match="clock"):
        E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(clock="sundial"), models=models)
    with pytest.raises(ValueError, match=r"prefill='bogus'; expected one of \['sequential', 'batched', 'chunked'\]"):
        E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(prefill="bogus"), models=models)
    with pytest.raises(ValueError, match=r"prefill='chunked' with drafter='eagle'"):
        E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(prefill="chunked", drafter="eagle"), models=models)
    # process CPU time would leave out the GPU's work: refused on CUDA before anything touches a GPU
    with pytest.raises(ValueError, match="clock='cpu' with device='cuda'.*use clock=wall"):
        E.make_clock("cpu", "cuda")
    assert E.make_clock("cpu", "cpu") is time.process_time and E.make_clock("wall", "cpu") is time.perf_counter
    eng = E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(max_batch=2, warmup=False), max_len=32,
                   models=models)
    with pytest.raises(ValueError, match="KV positions"):
        eng.run(_workload([30], [10]), cost, make_policy("none"), AcceptanceModel(alpha=0.5, max_gamma=6))


def test_draft_sync_runs_the_draft_at_gamma_zero(models, monkeypatch):
    eng = E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(max_batch=2, warmup=False), max_len=64,
                   models=models)
    calls = []
    real = E.batched_forward

    def spy(model, slots, tokens, lengths, all_logits):
        calls.append(("draft" if model is eng.draft else "target", tokens.shape[1]))
        return real(model, slots, tokens, lengths, all_logits)

    monkeypatch.setattr(E, "batched_forward", spy)
    last, lengths = torch.zeros(2, dtype=torch.long), torch.tensor([5, 9])
    eng.spec_step(last, lengths, 0, None)
    assert calls == [("target", 1)]
    calls.clear()
    eng.spec_step(last, lengths, 0, None, draft_sync=True)
    assert calls == [("draft", 1), ("target", 1)]  # the draft sees the last token too, its cache stays in step
    calls.clear()
    eng.spec_step(last, lengths, 2, None, draft_sync=True)
    assert calls == [("draft", 1), ("draft", 1), ("target", 3)]  # γ ≥ 1: unchanged


# --- drafter kinds (issue #25): an EAGLE head and n-gram lookup ------------------------------------------------


@pytest.mark.parametrize("prefill", ["sequential", "batched"])
def test_eagle_and_ngram_engines_serve_requests_and_greedy_matches_the_target(models, cost, prefill):
    """Real greedy speculation with an EAGLE head (random weights) or n-gram lookup still emits exactly the
    target's greedy continuation (only the target decides); the head keeps one layer of KV per slot."""
    target, draft = models
    w = _workload([5, 12, 9], [14, 9, 17], [0.0, 0.0, 0.001])
    for kind in ("eagle", "ngram"):
        cfg = E.EngineConfig(max_batch=4, acceptance="real", temperature=0.0, clock="cpu", warmup=True,
                             prefill=prefill, drafter=kind, prompt_lookup_min=1, prompt_lookup_max=3)
        eng = E.Engine("tiny-llama", "tiny-llama-draft", cfg, max_len=96, models=(target, draft))
        if kind == "eagle":
            assert len(eng.dcache.layers) == 1 and eng.head.config.hidden_size == target.config.hidden_size
        else:
            assert eng.dcache is None and eng.head is None
        r = eng.run(w, cost, make_policy("fixed", gamma=3), AcceptanceModel(alpha=0.5, max_gamma=6))
        req = r.requests
        assert (req["generated_tokens"] == req["output_tokens"]).all(), kind
        for rid in range(3):
            p = int(w.prompt_tokens[rid])
            toks = eng.tokens[rid]
            assert toks[p:] == _greedy(target, toks[:p], int(w.output_tokens[rid])), (kind, rid)


def test_ngram_synthetic_proposals_follow_the_simulators_match_draws(models, tmp_path):
    """Synthetic acceptance with n-gram lookup: a row proposes γ tokens exactly when the simulator's seeded draw
    matches (match rate 0.5), so the engine replays the simulator's iterations token for token, and the
    simulator (padded attention) charges each step for the engine's own proposers: lookup + verify of γ + 1
    tokens when any row proposed, lookup + a 1-token verify when none did."""
    from specbatch.sim.drafters import charged_matched, make_drafter

    from conftest import add_drafter_rows

    target, draft = models
    folder = write_formula_profile(tmp_path / "formula", verify=linear_step(0.004, 0.0001),
                                   draft=linear_step(0.001, 0.00001), batches=(1, 2, 4, 8), contexts=(16, 64, 256),
                                   prompts=(8, 32, 128))
    ngram = CostModel(load_profile(add_drafter_rows(folder, ngram=linear_step(0.0002, 0.00001))), max_batch=8,
                      max_gamma=6, drafter=make_drafter("ngram", match_rate=0.5))
    acc = AcceptanceModel(alpha=0.9, max_gamma=6, match_rate=0.5)
    cfg = E.EngineConfig(max_batch=4, acceptance="synthetic", clock="cpu", warmup=False, drafter="ngram")
    eng = E.Engine("tiny-llama", "tiny-llama-draft", cfg, max_len=96, models=(target, draft))
    w = _workload([6, 10, 8], [12, 15, 9])
    r = eng.run(w, ngram, make_policy("fixed", gamma=3), acc, seed=1)
    sim = simulate(w, ngram, make_policy("fixed", gamma=3), acc,
                   ClusterConfig(max_batch=4, kv_capacity_tokens=eng.capacity, attention="padded"), seed=1)
    cols = ["batch", "gamma", "tokens", "accepted", "admitted"]
    assert r.iterations[cols].to_numpy().tolist() == sim.iterations[cols].to_numpy().tolist()
    it, m = sim.iterations, eng.diagnostics["matched"].to_numpy()
    spec = (it["gamma"] > 0).to_numpy()
    assert ((m > 0) & (m < it["batch"].to_numpy())).any() and (spec & (m == 0)).any()  # partial and no matches
    assert (it["accepted"].to_numpy()[m == 0] == 0).all()  # no proposal, nothing accepted
    charged = [ngram.iteration_matched(int(b), 3, charged_matched(int(k), int(b), True), float(c))
               for b, c, k in zip(it["batch"][spec], it["context_max"][spec], m[spec])]
    assert it["step_s"][spec].tolist() == pytest.approx(charged, rel=1e-12)
    assert (r.requests["generated_tokens"] == r.requests["output_tokens"]).all()


def test_ngram_step_proposes_what_follow_says_else_what_the_lookup_finds(models, cost):
    """:meth:`Engine.spec_step` with n-gram lookup: without ``follow`` (real acceptance) a row proposes what the
    lookup found and a synthetic draw is capped at it; with ``follow`` a row proposes γ tokens (the lookup's,
    filled up with its last token) or none, whatever the lookup found."""
    target, draft = models
    cfg = E.EngineConfig(max_batch=4, acceptance="synthetic", clock="cpu", warmup=False, drafter="ngram",
                         prompt_lookup_min=1, prompt_lookup_max=2)
    eng = E.Engine("tiny-llama", "tiny-llama-draft", cfg, max_len=96, models=(target, draft))
    lengths = torch.tensor([4])
    eng.tcache.set_step(0, 1, torch.arange(4)[None], 4)
    miss, hit = [np.array([1, 2, 3, 4, 5], np.int64)], [np.array([7, 8, 9, 7, 8], np.int64)]
    n_acc, ids, _ = eng.spec_step(torch.tensor([5]), lengths, 3, torch.tensor([3]), histories=miss)
    assert int(n_acc[0]) == 0 and ids.shape == (1, 1) and int(eng.proposed[0]) == 0
    # [7, 8] recurs: 9, 7, 8 proposed; the draw of 2 stands
    n_acc, ids, _ = eng.spec_step(torch.tensor([8]), lengths, 3, torch.tensor([2]), histories=hit)
    assert int(n_acc[0]) == 2 and ids[0].tolist() == [8, 9, 7, 8] and int(eng.proposed[0]) == 3
    n_acc, ids, _ = eng.spec_step(torch.tensor([5]), lengths, 3, torch.tensor([3]), histories=miss,
                                  follow=np.array([True]))
    assert int(n_acc[0]) == 3 and ids[0].tolist() == [5, 5, 5, 5] and int(eng.proposed[0]) == 3
    hit2 = [np.array([7, 8, 9, 7, 8, 9, 7, 8], np.int64)]  # the lookup finds 9, 7, 8 (then 9 fills nothing)
    n_acc, ids, _ = eng.spec_step(torch.tensor([8]), lengths, 4, torch.tensor([1]), histories=hit2,
                                  follow=np.array([True]))
    assert ids[0].tolist()[:4] == [8, 9, 7, 8] and int(eng.proposed[0]) == 4
    n_acc, ids, _ = eng.spec_step(torch.tensor([8]), lengths, 3, torch.tensor([0]), histories=hit,
                                  follow=np.array([False]))
    assert int(n_acc[0]) == 0 and ids.shape == (1, 1) and int(eng.proposed[0]) == 0


def test_eagle_draft_sync_runs_the_head_at_gamma_zero(models):
    """With draft_sync a γ = 0 step also runs the EAGLE head on the decoded token (writing its KV at that
    position, as the simulator charges one eagle row for it); without, the head's cache is left as it was."""
    target, draft = models
    eng = E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(max_batch=2, clock="cpu", warmup=False,
                                                                   drafter="eagle"), max_len=32, models=(target, draft))
    lengths, last = torch.tensor([3, 5]), torch.tensor([1, 2])
    k = eng.dcache.layers[0].kbuf
    eng.spec_step(last, lengths, 0, None, draft_sync=False)
    assert not k[0, :, 3].any() and not k[1, :, 5].any()
    eng.spec_step(last, lengths, 0, None, draft_sync=True)
    assert k[0, :, 3].abs().sum() > 0 and k[1, :, 5].abs().sum() > 0 and not k[0, :, 4].any()


def test_the_calibrations_profiler_steps_are_the_drafters(models, monkeypatch):
    """fidelity.calibrate re-times the engine's own drafter: an EAGLE head step on a one-layer cache beside the
    target's verify, one n-gram lookup for the batch proposing γ (no cache), and a draft decode by default."""
    from specbatch.fidelity import calibrate as C
    from specbatch.profiler import drafters as D

    target, draft = models
    calls = []
    real = D.ngram_propose_batch
    monkeypatch.setattr(D, "ngram_propose_batch", lambda seqs, k, lo, hi: calls.append((len(seqs), k)) or real(
        seqs, k, lo, hi))
    for kind in ("draft_model", "eagle", "ngram"):
        eng = E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(max_batch=4, clock="cpu", warmup=False,
                                                                       drafter=kind), max_len=64, models=models)
        roles = [role for role, _ in C.step_models(eng)]
        assert roles == (["target"] if kind == "ngram" else ["target", "draft"])
        if kind == "eagle":
            assert C.step_models(eng)[1][1] is eng.head
        assert len(C.profiler_steps(eng, 2, 0, 16)) == 1  # γ = 0: the target's decode alone
        times = C.retime(eng, 2, 3, 16, {r: M.make_cache("prealloc", m.config, 2, 16, 4, eng.dtype, "cpu")
                                         for r, m in C.step_models(eng)}, time.process_time, repeats=1)
        assert len(times) == 2 and times[0] > 0 and times[1] >= 0  # (a lookup may read 0 on a coarse clock)
    assert calls == [(2, 3), (2, 3)]  # the ngram step: the warming call and the timed one


def test_unknown_drafter_is_a_clear_error(models):
    with pytest.raises(ValueError, match="drafter"):
        E.Engine("tiny-llama", "tiny-llama-draft", E.EngineConfig(drafter="medusa"), max_len=64, models=models)


@pytest.mark.parametrize("policy, kv", [(("fixed", {"gamma": 2}), None), (("none", {}), None),
                                        (("fixed", {"gamma": 3}), 85)])
def test_chunked_prefill_generates_the_tokens_of_whole_prefills(models, cost, policy, kv):
    """Greedy real acceptance, the target drafting for itself: prompts split into chunks under a 24-token
    budget, in the verify's packed forward (and the draft's), generate exactly the tokens the sequential
    engine generates, with the same draft tokens accepted per request; every forward stays within the budget; a tight KV cache (85 tokens) preempts and the tokens still agree."""
    w = _workload([40, 23, 70, 10, 33], [6, 3, 9, 1, 5], [0.0, 0.0, 0.01, 0.02, 0.05])
    tokens, results = {}, {}
    for mode in ("sequential", "chunked"):
        cfg = E.EngineConfig(max_batch=4, prefill=mode, max_num_batched_tokens=24, clock="cpu", acceptance="real",
                             temperature=0.0, kv_capacity_tokens=kv)
        eng = E.Engine("tiny-llama", "tiny-llama", cfg, max_len=128, models=(models[0], models[0]))
        results[mode] = eng.run(w, cost, make_policy(policy[0], **policy[1]), AcceptanceModel(alpha=0.7), seed=0)
        tokens[mode] = eng.tokens
    for rid in range(5):
        assert len(tokens["chunked"][rid]) == w.prompt_tokens[rid] + w.output_tokens[rid]
        assert tokens["chunked"][rid] == tokens["sequential"][rid]
    # the draft is the target itself: with its KV right it proposes the target's greedy tokens, all accepted;
    # prefilled in chunks, it must propose (and have accepted) what it does after a whole prefill
    accepted = {m: r.requests["accepted_tokens"].tolist() for m, r in results.items()}
    assert accepted["chunked"] == accepted["sequential"]
    if policy[1].get("gamma"):  # (the request of one output token never speculates)
        assert all(a > 0 for a, out in zip(accepted["chunked"], w.output_tokens) if out > 2)
    it = results["chunked"].iterations
    verify = it["batch"] * (it["gamma"] + 1)
    chunk_tokens = np.array([sum(k for _, k in c) for c in eng.chunk_log])
    assert (verify + chunk_tokens <= 24).all() and chunk_tokens.sum() >= w.prompt_tokens.sum()
    assert (chunk_tokens > 0).sum() > len(w)  # prompts really were split
    if kv is not None:
        assert results["chunked"].requests["preemptions"].sum() > 0


def test_chunked_engine_replays_the_simulators_schedule(models, cost):
    """Synthetic acceptance: the engine's chunked iterations are the simulator's (same scheduler, same draws):
    batch, γ, admissions, tokens per iteration and every request's output agree."""
    w = _workload([40, 23, 70, 10, 33], [6, 3, 9, 1, 5])
    cfg = E.EngineConfig(max_batch=4, prefill="chunked", max_num_batched_tokens=24, clock="cpu")
    eng = E.Engine("tiny-llama", "tiny-llama-draft", cfg, max_len=128, models=models)
    pol, acc = make_policy("fixed", gamma=2), AcceptanceModel(alpha=0.7)
    real = eng.run(w, cost, pol, acc, seed=3)
    sim = simulate(w, cost, make_policy("fixed", gamma=2), acc, ClusterConfig(
        max_batch=4, prefill="chunked", max_num_batched_tokens=24, attention="padded",
        kv_capacity_tokens=eng.capacity), seed=3)
    cols = ["batch", "gamma", "tokens", "admitted", "accepted"]
    assert real.iterations[cols].reset_index(drop=True).equals(sim.iterations[cols].reset_index(drop=True))
    assert (real.requests["generated_tokens"] == sim.requests["generated_tokens"]).all()
