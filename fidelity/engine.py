"""A real serving engine: batched speculative decoding with the preset models, in real time.

It replays a :class:`specbatch.sim.workload.Workload` on the local device (CPU here, CUDA where present) with the
*simulator's* scheduler, :class:`specbatch.sim.scheduler.Scheduler` (admission, preemption, γ choice,
acceptance draws, bookkeeping and the iteration record), in place of the simulated clock and cost model the
real work on the models. The iteration semantics are therefore those of the simulator's continuous batching
(:mod:`specbatch.sim.replica`):

1. requests whose arrival time has passed (wall clock since the start) join the queue;
2. FCFS admission up to ``max_batch`` and the KV capacity (tokens, same watermark rule);
3. sequential per-request prefill of the admitted requests on the target (and on the draft when the policy
   uses one), each into its own slot of the batch's KV cache; their first token is stamped when the last
   prefill of the iteration ends;
4. one speculative iteration for the whole running batch: the policy picks γ (same ``Policy`` object,
   same ``BatchView``), γ draft decode steps with batch b, one target verify of γ+1 tokens per sequence,
   then each request gains 1 + accepted (capped by what it has left) and finished requests leave.
   The KV caches are rolled back per sequence to the accepted prefix.

Chunked prefill (``EngineConfig.prefill="chunked"``, the simulator's ``cluster.prefill=chunked``): steps 2–4 are
the simulator's chunked iteration (``Replica._run_chunked``): γ capped by the token budget, then prompt
chunks first come, first served in the budget left after the batch's b·(γ+1) verify tokens, all in **one
packed forward** per model (:mod:`specbatch.profiler.packed`: the tokens flattened, attention per part); the
draft's chunks ride in its first decode forward (at γ = 0 in the draft_sync forward, or a forward of their
own). A request being prefilled holds a staging row of the slot caches (rows ``max_batch..2·max_batch-1``)
and moves into the running slots with the token its last chunk produced, stamped at the iteration's end.

Drafter (``EngineConfig.drafter``, the simulator's ``drafter.kind``): ``draft_model`` (the pair's draft, as
above), ``eagle`` (an EAGLE-style head built from the target's config with random weights,
:mod:`specbatch.profiler.drafters`: each draft step fuses the last token's embedding with a hidden state, the
target's from the last verify forward at first, then the head's own, and runs one decoder layer over the
head's one-layer KV slots and the LM head; the target's prefill feeds the head's prefill) or ``ngram``
(prompt lookup in the request's own token ids, on the CPU, for up to γ tokens; the verify forward takes
1 + the most any row proposed, padded, so a row with no match verifies its 1 token; acceptance, synthetic or
real, counts only proposed tokens). With synthetic acceptance the n-gram proposals follow the simulator's
seeded match draws: the lookup runs (its CPU time is the step's), then a row whose draw matched
(:meth:`~specbatch.sim.scheduler.Scheduler.peek_matched_rows`, ``drafter.match_rate``) proposes γ tokens (the
lookup's, filled up with its last token) and the others none, so engine and simulator verify the same widths
(random token ids rarely repeat a 5-gram: a real lookup would almost never match). The drafter's work sits
inside the step's clock interval as the draft model's does.

Acceptance is ``synthetic`` (the simulator's seeded Bernoulli draws: same thresholds, same generator
stream as :func:`specbatch.sim.cluster.simulate` with the same seed, as vLLM's synthetic rejection sampler) or
``real`` (the speculative-sampling test on the models' distributions at ``temperature``; greedy at 0).
Both run the same model and sampling work, so a step costs the same in either mode.

KV cache: one pre-allocated buffer per layer of ``max_batch`` slots × ``max_len`` positions (a subclass of
the profiler's :class:`~specbatch.profiler.models.PreallocLayer`). The running batch occupies slots ``0..b-1``; a
request leaving frees its slot by moving the last slot's sequence into it (:class:`_Slots`). Sequences have different
lengths (mixed contexts): each step writes every sequence's new K/V at its own positions (one scatter per
layer) and attends over ``max(length) + new`` positions with a per-sequence boolean mask, i.e. attention
is padded to the longest sequence of the batch (:attr:`Engine.attention`, the simulator's
``cluster.attention="padded"``). (A fully accepted round leaves the draft's KV entry for
the last draft token unwritten, and without ``draft_sync`` a γ = 0 iteration leaves the draft's entries for
that iteration's token unwritten: the draft does none of the work the cost model does not charge. Timing
is unaffected; in ``real`` mode the draft's next proposals read those unwritten positions, so real
acceptance comes out lower than a serving engine's. ``draft_sync=True`` removes the γ = 0 gaps; the
fully-accepted one would take an extra draft forward, as gpt-fast runs, which the cost model does not have.)

Clock: ``wall`` is ``time.perf_counter`` with arrivals honoured by sleeping until the next one when idle —
the real thing on a machine of one's own. ``cpu`` is this process's CPU time (``time.process_time``; run
torch with one thread) with idle gaps jumped over instead of slept: arrivals are honoured in the engine's
own CPU clock, so the replay is immune to other processes competing for the cores of a shared machine
(profile with the same clock, see :mod:`specbatch.fidelity.validate`).

Memory: on the CPU the engine sets glibc's malloc as the profiler does (:mod:`specbatch.profiler.host_memory`), and
before the clock starts it warms up at the largest shapes of the run (the longest prompt, the full batch at
the largest γ over the longest span), so that steps reuse memory instead of page-faulting it back in.

Outputs: the same per-request table (:meth:`specbatch.sim.requests.RequestTable.frame`) and per-iteration table
(:data:`specbatch.sim.iterations.ITERATION_COLUMNS`) as the simulator, returned as a :class:`specbatch.sim.cluster.SimResult`, so
:func:`specbatch.sim.metrics.summarize` applies to both.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from transformers.cache_utils import Cache

from specbatch.fidelity.graphs import StepGraphs
from specbatch.profiler import models as M
from specbatch.profiler import packed as P
from specbatch.profiler.host_memory import keep_freed_memory
from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cluster import SimResult, charged_context, request_table
from specbatch.sim.cost_model import CostModel
from specbatch.sim.policies import Policy
from specbatch.sim.iterations import IterationLog
from specbatch.sim.scheduler import PREFILL, Scheduler
from specbatch.sim.workload import Workload

ACCEPTANCE_MODES = ("synthetic", "real")
CLOCKS = ("wall", "cpu")
#: what proposes the draft tokens (the simulator's ``drafter.kind``): the pair's draft model, an EAGLE head on
#: the target's hidden states (:mod:`specbatch.profiler.drafters`), or n-gram lookup in the request's own tokens
DRAFTERS = ("draft_model", "eagle", "ngram")
#: the admission prefill modes the engine runs (of the simulator's ``cluster.prefill`` modes)
ENGINE_PREFILL = tuple(m for m in PREFILL if m in ("sequential", "batched", "chunked"))


def uses_graphs(cfg: "EngineConfig") -> bool:
    """Whether an engine with ``cfg`` replays its batched forwards from CUDA graphs: ``cfg.graphs``, by
    default (None) on CUDA. A profile it is validated against is taken the same way (``timing.graphs``)."""
    on_cuda = str(cfg.device).startswith("cuda")
    if cfg.graphs and not on_cuda:
        raise ValueError(f"graphs=True needs a CUDA device (device={cfg.device!r})")
    return on_cuda if cfg.graphs is None else bool(cfg.graphs)


def make_clock(kind: str, device) -> Callable[[], float]:
    """The engine's clock in seconds: ``wall`` (``time.perf_counter``) or ``cpu`` (this process's CPU time).

    On CUDA every reading first waits for the queued GPU work (``torch.cuda.synchronize``), so an interval
    covers the kernels it launched, not only their launch; ``cpu`` is refused there (it does not count GPU time).
    """
    if kind not in CLOCKS:
        raise ValueError(f"clock={kind!r}; expected one of {CLOCKS}")
    if not str(device).startswith("cuda"):
        return time.perf_counter if kind == "wall" else time.process_time
    if kind != "wall":
        raise ValueError(f"clock={kind!r} with device={device!r}: the CPU-time clock does not count GPU work; "
                         "use clock=wall on CUDA")

    def cuda_wall() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return cuda_wall


# --- the slot KV cache -------------------------------------------------------------------------------------


class _StepState:
    """What the next forward writes and reads, shared by all layers of one cache."""

    __slots__ = ("lo", "hi", "index", "span")

    def __init__(self):
        self.lo, self.hi, self.index, self.span = 0, 0, None, 0


class SlotLayer(M.PreallocLayer):
    """A :class:`~specbatch.profiler.models.PreallocLayer` whose batch rows are independent sequences (slots).

    ``update`` scatters the new tokens of slot ``lo + i`` at that sequence's own positions and returns the
    K/V of slots ``lo..hi-1`` over the first ``span`` positions (the caller passes the matching mask); during
    a packed forward (``holder["plan"]`` set, :mod:`specbatch.profiler.packed`) it writes each token at its
    plan's row and position and returns the whole buffers."""

    def __init__(self, max_len: int, state: _StepState, holder: dict):
        super().__init__(max_len)
        self.state, self.holder = state, holder

    def update(self, key_states, value_states, *args, **kwargs):
        plan = self.holder["plan"]
        if plan is not None:  # a packed forward (chunked prefill): every token at its own row and position
            P.write_packed(self.kbuf, self.vbuf, plan, key_states, value_states)
            return self.kbuf, self.vbuf
        s = self.state
        idx = s.index.expand(-1, key_states.shape[1], -1, key_states.shape[-1])
        kb, vb = self.kbuf[s.lo:s.hi], self.vbuf[s.lo:s.hi]
        kb.scatter_(2, idx, key_states)
        vb.scatter_(2, idx, value_states)
        return kb[:, :, :s.span], vb[:, :, :s.span]

    def get_seq_length(self) -> int:
        return self.state.span


class SlotCache:
    """Per-model KV cache of ``slots`` sequences × ``max_len`` positions."""

    def __init__(self, cfg, slots: int, max_len: int, dtype, device):
        layers, kv_heads, head_dim = M.kv_shape(cfg)
        self.state = _StepState()
        #: the plan of a packed forward in progress (profiler.packed.packed_forward sets and clears it)
        self.plan_holder: dict = {"plan": None}
        self.layers = [SlotLayer(max_len, self.state, self.plan_holder) for _ in range(layers)]
        for layer in self.layers:
            layer.allocate(slots, kv_heads, head_dim, dtype, device, fill=False)
            layer.kbuf.zero_()
            layer.vbuf.zero_()
        self.cache = Cache(layers=self.layers)
        self.max_len = max_len

    def set_step(self, lo: int, hi: int, positions: torch.Tensor, span: int) -> None:
        """Next forward: slots ``lo..hi-1`` write at ``positions`` (rows × new tokens); attend ``span``."""
        if span > self.max_len:
            raise ValueError(f"KV slot overflow: {span} > {self.max_len} positions (raise max_len)")
        self.state.lo, self.state.hi, self.state.span = lo, hi, span
        self.state.index = positions[:, None, :, None]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst``."""
        for layer in self.layers:
            layer.kbuf[dst, :, :length].copy_(layer.kbuf[src, :, :length])
            layer.vbuf[dst, :, :length].copy_(layer.vbuf[src, :, :length])


# --- model steps ------------------------------------------------------------------------------------------


def _cached_lengths(batch, rows: list[int], device) -> torch.Tensor:
    """Cached positions per slot of the running ``batch`` (``rows``: each batch row's slot): its context − 1,
    the last token not being in the cache yet."""
    lengths = torch.empty(len(rows), dtype=torch.long)
    if rows:
        lengths[rows] = torch.as_tensor(batch.contexts - 1)
    return lengths.to(device)


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampled tokens (b,) and the probabilities they were drawn from (None when greedy)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1), None
    p = torch.softmax(logits / temperature, -1)
    return torch.multinomial(p, 1, generator=gen)[:, 0], p


def _fresh_cache(model, slots: SlotCache, batch: int, length: int, device) -> Cache:
    """An empty pre-allocated cache for ``batch`` sequences of ``length`` positions, in the slots' dtype."""
    layers, kv_heads, head_dim = M.kv_shape(model.config)
    tmp = Cache(layers=[M.PreallocLayer(length) for _ in range(layers)])
    for layer in tmp.layers:
        layer.allocate(batch, kv_heads, head_dim, slots.layers[0].kbuf.dtype, device, fill=False)
    return tmp


@torch.inference_mode()
def prefill_into_slot(model, slots: SlotCache, slot: int, ids: list[int], temperature: float,
                      gen: torch.Generator, device, clock=time.perf_counter) -> tuple[int, float]:
    """Prefill one sequence (batch 1) into ``slot`` with the profiler's prefill step; return its next token
    and the seconds (on ``clock``) of the forward alone.

    The forward is :func:`specbatch.profiler.models.prefill` on a fresh pre-allocated cache (exactly the profiled
    step); its K/V is then copied into the slot and the first token sampled."""
    n = len(ids)
    tmp = _fresh_cache(model, slots, 1, n, device)
    x = torch.tensor([ids], device=device)
    t0 = clock()
    logits = M.prefill(model, tmp, x)
    fwd = clock() - t0
    for src, dst in zip(tmp.layers, slots.layers):
        dst.kbuf[slot, :, :n].copy_(src.kbuf[0])
        dst.vbuf[slot, :, :n].copy_(src.vbuf[0])
    tok, _ = _sample(logits, temperature, gen)
    return int(tok[0]), fwd


@torch.inference_mode()
def prefill_into_slots(model, slots: SlotCache, slot_list: list[int], prompts: list[list[int]], temperature: float,
                       gen: torch.Generator, device, clock=time.perf_counter, return_hidden: bool = False):
    """Prefill several sequences in one forward into ``slot_list``; return their next tokens and the seconds
    (on ``clock``) of the forward alone.

    The prompts are right-padded to the longest (causal attention keeps every real token from seeing the
    padding after it, so no mask is needed) and run as one batch on a fresh pre-allocated cache: the
    profiler's prefill step at (batch, longest length). Each row's K/V up to its own length is copied into
    its slot, and its first token is sampled from the logits at its last real position (the decoder's output
    there through the LM head: as many positions as the profiled step's last-token logits)."""
    b, n = len(prompts), max(len(ids) for ids in prompts)
    tmp = _fresh_cache(model, slots, b, n, device)
    x = torch.tensor([ids + [ids[-1]] * (n - len(ids)) for ids in prompts], device=device)
    last = torch.tensor([len(ids) - 1 for ids in prompts], device=device)
    positions = torch.arange(n, device=device).expand(b, n)
    t0 = clock()
    hidden = M.forward(model.get_decoder(), tmp, input_ids=x, position_ids=positions, use_cache=True).last_hidden_state
    logits = model.get_output_embeddings()(hidden[torch.arange(b, device=device), last])
    fwd = clock() - t0
    for src, dst in zip(tmp.layers, slots.layers):
        for row, (slot, ids) in enumerate(zip(slot_list, prompts)):
            dst.kbuf[slot, :, :len(ids)].copy_(src.kbuf[row, :, :len(ids)])
            dst.vbuf[slot, :, :len(ids)].copy_(src.vbuf[row, :, :len(ids)])
    tok, _ = _sample(logits, temperature, gen)
    if return_hidden:  # (an EAGLE head's prefill reads the prompt's hidden states)
        return [int(t) for t in tok.tolist()], fwd, hidden
    return [int(t) for t in tok.tolist()], fwd


@torch.inference_mode()
def head_prefill_into_slots(head, slots: SlotCache, slot_list: list[int], prompts: list[list[int]],
                            hidden: torch.Tensor, device, clock=time.perf_counter) -> float:
    """The EAGLE head's prefill of several sequences in one forward (right-padded as
    :func:`prefill_into_slots`) over their tokens and the target's hidden states ``hidden`` (b, n, width) on a
    fresh one-layer cache; each row's K/V is copied into its slot. Returns the seconds of the forward."""
    from specbatch.profiler.drafters import eagle_prefill

    b, n = len(prompts), max(len(ids) for ids in prompts)
    tmp = _fresh_cache(head, slots, b, n, device)
    x = torch.tensor([ids + [ids[-1]] * (n - len(ids)) for ids in prompts], device=device)
    t0 = clock()
    eagle_prefill(head, tmp, x, hidden[:, :n])
    fwd = clock() - t0
    for src, dst in zip(tmp.layers, slots.layers):
        for row, (slot, ids) in enumerate(zip(slot_list, prompts)):
            dst.kbuf[slot, :, :len(ids)].copy_(src.kbuf[row, :, :len(ids)])
            dst.vbuf[slot, :, :len(ids)].copy_(src.vbuf[row, :, :len(ids)])
    return fwd


@torch.inference_mode()
def batched_forward(model, slots: SlotCache, tokens: torch.Tensor, lengths: torch.Tensor, all_logits: bool,
                    span: int | None = None):
    """One forward of ``tokens`` (b, t) for slots ``0..b-1`` whose caches hold ``lengths`` (b,) positions,
    attending over ``span`` positions (default the longest sequence's, max(lengths) + t; a CUDA graph fixes a
    larger one, :mod:`specbatch.fidelity.graphs`: the mask hides what lies past each sequence)."""
    b, t = tokens.shape
    positions = lengths[:, None] + torch.arange(t, device=tokens.device)[None, :]
    if span is None:
        span = int(lengths.max()) + t
    slots.set_step(0, b, positions, span)
    out = M.forward(model, slots.cache, input_ids=tokens, position_ids=positions,
                    attention_mask=P.verify_mask(lengths, t, span), use_cache=True, logits_to_keep=0 if all_logits else 1)
    return out.logits


# --- the engine -------------------------------------------------------------------------------------------


class _Slots:
    """The running sequences' places in the engine's KV slots, their token ids and their last tokens.

    The running batch occupies slots ``0..b-1``; a sequence leaving frees its slot by moving the last
    slot's sequence into it. ``history``: token ids per request id (prompt, random ids drawn from ``rng``,
    then the generated tokens); ``last_tok[s]``: slot s's newest token, not yet in its KV cache."""

    def __init__(self, engine: "Engine", reqs, rng: np.random.Generator, uses_draft: bool):
        self.engine, self.reqs, self.rng, self.uses_draft = engine, reqs, rng, uses_draft
        self.history: dict[int, list[int]] = {}
        self.slot_of: dict[int, int] = {}
        self.slot_rid: list[int] = []  # slot -> request id
        self.last_tok = torch.zeros(engine.cfg.max_batch, dtype=torch.long, device=engine.device)
        # chunked prefill: a request being prefilled holds a staging row (max_batch and up) until its last chunk
        self.stage_of: dict[int, int] = {}
        self.free_stage = list(range(2 * engine.cfg.max_batch - 1, engine.cfg.max_batch - 1, -1)) \
            if engine.cfg.prefill == "chunked" else []

    def tokens_of(self, rid: int) -> list[int]:
        """Request ``rid``'s token ids (its prompt drawn at the first call)."""
        h = self.history.get(rid)
        if h is None:
            h = self.history[rid] = self.rng.integers(0, self.engine.vocab, int(self.reqs.prompt[rid])).tolist()
        return h

    def stage(self, rid: int) -> int:
        """A staging row for ``rid``, whose prompt is prefilled in chunks."""
        self.tokens_of(rid)
        row = self.stage_of[rid] = self.free_stage.pop()
        return row

    def unstage(self, rid: int) -> None:
        """Free ``rid``'s staging row (preempted while being prefilled: its chunks are redone)."""
        self.free_stage.append(self.stage_of.pop(rid))

    def join_staged(self, rid: int, first_token: int) -> None:
        """Move ``rid``'s prefilled K/V from its staging row into the next running slot, with the token its
        last chunk produced."""
        eng, row, slot = self.engine, self.stage_of.pop(rid), len(self.slot_rid)
        n = len(self.history[rid])
        eng.tcache.move(row, slot, n)
        if self.uses_draft:
            eng.dcache.move(row, slot, n)
        self.free_stage.append(row)
        self.slot_of[rid] = slot
        self.slot_rid.append(rid)
        self.last_tok[slot] = first_token
        self.history[rid].append(first_token)

    def open(self, rids: list[int]) -> tuple[list[int], list[list[int]]]:
        """Give each of ``rids`` the next free slot; return the slots and the token histories to prefill."""
        new_slots, hists = [], []
        for rid in rids:
            h = self.tokens_of(rid)
            self.slot_of[rid] = len(self.slot_rid)
            new_slots.append(len(self.slot_rid))
            self.slot_rid.append(rid)
            hists.append(h)
        return new_slots, hists

    def free(self, ids) -> None:
        """Free the slots of request ``ids`` (``None``: none)."""
        if ids is None:
            return
        eng = self.engine
        for rid in np.asarray(ids).tolist():
            s = self.slot_of.pop(rid)
            end = len(self.slot_rid) - 1
            moved = self.slot_rid.pop()
            if s != end:
                n = len(self.history[moved])
                eng.tcache.move(end, s, n)
                if self.uses_draft and eng.dcache is not None:
                    eng.dcache.move(end, s, n)
                if eng.hidden is not None:
                    eng.hidden[s] = eng.hidden[end]
                self.last_tok[s] = self.last_tok[end]
                self.slot_rid[s] = moved
                self.slot_of[moved] = s

    def forget(self, ids: list[int]) -> None:
        """Free preempted requests' slots (or staging rows); their histories keep the prompt and the tokens
        counted as generated, which re-admission prefills."""
        r = self.reqs
        for rid in ids:
            self.history[rid] = self.history[rid][:int(r.prompt[rid] + r.generated[rid])]
        staged = [rid for rid in ids if rid in self.stage_of]
        for rid in staged:
            self.unstage(rid)
        self.free([rid for rid in ids if rid not in staged])


class _ReplayClock:
    """The engine's clock from the start of a replay (seconds): ``read`` (a :func:`make_clock` clock) less
    its reading at the start, plus the idle time jumped over (``cpu`` clock), less the time spent aside."""

    def __init__(self, read: Callable[[], float], kind: str):
        self.read, self.kind = read, kind
        self.skipped = 0.0
        self.origin = read()

    def now(self) -> float:
        return self.read() - self.origin + self.skipped

    def idle_until(self, t: float) -> None:
        """Wait until ``t``: sleep (``wall``), or jump over the gap (``cpu``: its clock does not run idle)."""
        if self.kind == "wall":
            time.sleep(max(0.0, t - self.now()))
        else:
            self.skipped += max(0.0, t - self.now())

    def aside(self, fn: Callable[[], float]) -> float:
        """``fn()``, its time taken out of this clock."""
        t = self.read()
        out = fn()
        self.skipped -= self.read() - t
        return out


@dataclass
class EngineConfig:
    """Engine shape and run settings (``max_batch``/``kv_capacity_tokens``/``watermark`` as in the cluster)."""

    max_batch: int = 8
    kv_capacity_tokens: int | None = None  # None: max_batch x max_len
    watermark: float = 0.01
    acceptance: str = "synthetic"  # synthetic | real
    temperature: float = 1.0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = 1
    seed: int = 0
    clock: str = "wall"  # wall (perf_counter, sleeps until arrivals) | cpu (this process's CPU time, see run)
    warmup: bool = True  # run a few untimed steps first (allocator, first-call overheads)
    draft_sync: bool = False  # γ = 0 steps of a drafting policy also run the draft (see ClusterConfig.draft_sync)
    prefill: str = "sequential"  # admissions: one forward each, "batched", or "chunked" (ClusterConfig.prefill)
    max_num_batched_tokens: int = 2048  # chunked: tokens per forward, verify first (ClusterConfig's key)
    long_prefill_token_threshold: int | None = None  # chunked: most prompt tokens per request per forward
    drafter: str = "draft_model"  # draft_model | eagle | ngram (DRAFTERS; the simulator's drafter.kind)
    prompt_lookup_min: int = 5  # drafter=ngram: vLLM's names and defaults (profiler.drafters)
    prompt_lookup_max: int = 5
    graphs: bool | None = None  # replay the batched forwards from CUDA graphs (fidelity.graphs); None: on CUDA
    extra: dict = field(default_factory=dict)


class Engine:
    """Target + draft models with slot KV caches, driven by the simulator's scheduler in wall-clock time."""

    #: every sequence attends over the longest one's span (masked): the simulator's ``cluster.attention``
    attention = "padded"

    def __init__(self, target: str, draft: str, cfg: EngineConfig | None = None, max_len: int = 2048,
                 models: tuple | None = None):
        self.cfg = cfg = cfg or EngineConfig()
        make_clock(cfg.clock, cfg.device)  # refuses an unknown clock, and cpu on CUDA
        if cfg.acceptance not in ACCEPTANCE_MODES:
            raise ValueError(f"acceptance={cfg.acceptance!r}; expected one of {ACCEPTANCE_MODES}")
        if cfg.prefill not in ENGINE_PREFILL:
            raise ValueError(f"prefill={cfg.prefill!r}; expected one of {list(ENGINE_PREFILL)}")
        if cfg.prefill == "chunked" and cfg.drafter != "draft_model":
            raise ValueError(f"prefill='chunked' with drafter={cfg.drafter!r}: the engine runs chunked prefill with "
                             "drafter=draft_model only")
        if cfg.prefill == "chunked" and not cfg.max_num_batched_tokens >= cfg.max_batch:
            raise ValueError(f"max_num_batched_tokens={cfg.max_num_batched_tokens}; expected at least max_batch "
                             f"({cfg.max_batch}) tokens per forward")
        if cfg.drafter not in DRAFTERS:
            raise ValueError(f"drafter={cfg.drafter!r}; expected one of {list(DRAFTERS)}")
        if not 1 <= cfg.prompt_lookup_min <= cfg.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={cfg.prompt_lookup_min}, prompt_lookup_max={cfg.prompt_lookup_max}; "
                             "expected 1 <= min <= max")
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.device = cfg.device
        self.dtype = M.DTYPES[cfg.dtype]
        #: glibc malloc settings (CPU): freed step memory stays in the process, as in the profiler's sweep
        self.host_memory = keep_freed_memory(cfg.device)
        if models is None:
            self.target, _ = M.load_model(target, self.dtype, self.device, seed=cfg.seed)
            self.draft, _ = M.load_model(draft, self.dtype, self.device, seed=cfg.seed + 1)
        else:
            self.target, self.draft = models
        self.vocab = min(self.target.config.vocab_size, self.draft.config.vocab_size)
        self.max_len = int(max_len)
        # chunked prefill: rows max_batch.. stage the requests being prefilled (_Slots.stage)
        rows = cfg.max_batch * (2 if cfg.prefill == "chunked" else 1)
        self.tcache = SlotCache(self.target.config, rows, self.max_len, self.dtype, self.device)
        #: drafter=eagle: the EAGLE head (random weights, built from the target's config) and, per slot, the
        #: target's hidden state for the slot's last token (the head's input at the next draft step)
        self.head = self.hidden = None
        if cfg.drafter == "eagle":
            from specbatch.profiler.drafters import load_eagle_head

            self.head, _ = load_eagle_head(self.target.config, self.dtype, self.device, seed=cfg.seed + 2)
            self.hidden = torch.zeros(cfg.max_batch, self.target.config.hidden_size, dtype=self.dtype,
                                      device=self.device)
        # the drafter's KV slots: the draft model's, the head's (one layer), none for n-gram lookup
        dcfg = {"draft_model": self.draft.config, "eagle": getattr(self.head, "config", None)}.get(cfg.drafter)
        self.dcache = SlotCache(dcfg, rows, self.max_len, self.dtype, self.device) if dcfg else None
        #: drafter=ngram: tokens proposed per batch row in the last step (n-gram lookup may find fewer than γ)
        self.proposed: torch.Tensor | None = None
        self.match_rate = 1.0  # the run's acceptance.match_rate (set by run)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        #: the batched forwards' CUDA graphs (None: eager), see :meth:`forward`
        self.step_graphs = None
        if uses_graphs(cfg):
            from specbatch.profiler.graphs import capture_for

            self.step_graphs = StepGraphs(batched_forward, capture_for(self.device, True), self.max_len, self.device)

    def forward(self, model, slots: SlotCache, tokens: torch.Tensor, lengths: torch.Tensor, all_logits: bool):
        """:func:`batched_forward`, replayed from its CUDA graph when the engine has them (:attr:`step_graphs`)."""
        if self.step_graphs is None:
            return batched_forward(model, slots, tokens, lengths, all_logits)
        return self.step_graphs.forward(model, slots, tokens, lengths, all_logits)

    @property
    def capacity(self) -> int:
        c = self.cfg
        return int(c.kv_capacity_tokens) if c.kv_capacity_tokens is not None else c.max_batch * self.max_len

    # -- one speculative step on slots 0..b-1 -----------------------------------------------------------------

    @torch.inference_mode()
    def spec_step(self, last: torch.Tensor, lengths: torch.Tensor, gamma: int, synthetic_acc: torch.Tensor | None,
                  draft_sync: bool = False, histories: list | None = None, follow: np.ndarray | None = None):
        """γ draft decodes + one verify for slots ``0..b-1``: ``last`` (b,) tokens not yet cached,
        ``lengths`` (b,) cached positions. Returns ``(n_accepted (b,), new_tokens (b, γ+1), next_token (b,))``;
        ``synthetic_acc`` (b,) overrides the acceptance decision (the models still do all the work).
        ``draft_sync``: at γ = 0 the draft also runs on ``last``, so its KV cache stays in step.
        ``drafter`` eagle / ngram: :meth:`_eagle_step` / :meth:`_ngram_step` (``histories``: each row's token ids,
        ``last`` included, as int64 arrays; ``follow``: per row, whether it proposes γ tokens, else the lookup
        decides)."""
        if self.cfg.drafter == "eagle":
            return self._eagle_step(last, lengths, gamma, synthetic_acc, draft_sync)
        if self.cfg.drafter == "ngram":
            return self._ngram_step(last, lengths, gamma, synthetic_acc, histories, follow)
        temp, gen = self.cfg.temperature, self.gen
        b = last.shape[0]
        drafts, qs = [], []
        tok = last
        for k in range(gamma):
            logits = self.forward(self.draft, self.dcache, tok[:, None], lengths + k, False)[:, -1]
            tok, q = _sample(logits, temp, gen)
            drafts.append(tok)
            qs.append(q)
        if not gamma and draft_sync:  # the draft sees the token the target decodes (vLLM's K = 0 path)
            self.forward(self.draft, self.dcache, tok[:, None], lengths, False)
        d = torch.stack(drafts, 1) if gamma else last.new_empty((b, 0))
        ids = torch.cat([last[:, None], d], 1)
        logits = self.forward(self.target, self.tcache, ids, lengths, True).float()  # (b, γ+1, V)
        n_acc, next_tok = M.speculative_sample(logits, d, torch.stack(qs, 1) if gamma and temp > 0 else None, temp,
                                               gen, synthetic_acc)
        return n_acc, ids, next_tok

    @torch.inference_mode()
    def mixed_step(self, last: torch.Tensor, lengths: torch.Tensor, gamma: int, synthetic_acc: torch.Tensor | None,
                   chunks: list, chunk_ids: torch.Tensor, finishing: list[bool], draft: bool,
                   draft_sync: bool = False):
        """:meth:`spec_step` (drafter draft_model) with prompt chunks in the same forwards, as chunked prefill
        runs: ``chunks`` (:class:`specbatch.profiler.packed.Chunk` at their staging rows) with their tokens
        ``chunk_ids`` concatenated ride in the target's verify forward and, when the policy drafts (``draft``),
        in the draft's first decode forward, or with γ = 0 in its draft_sync forward or a forward of their own
        (:func:`specbatch.profiler.packed.packed_forward`). Returns ``(n_accepted, new_tokens, next_token)`` as
        :meth:`spec_step` (None when no sequence runs) and the first token of each chunk whose ``finishing``
        is set (sampled from its last position's logits)."""
        temp, gen, b, dev = self.cfg.temperature, self.gen, last.shape[0], last.device
        drafts, qs, tok = [], [], last
        pending = draft and bool(chunks)  # the draft's chunks, not yet run

        def packed(model, slots, tokens, rows, per_row):
            plan = P.PackedPlan.build(lengths[:rows], per_row, chunks, dev)
            return P.packed_forward(model, slots.cache, torch.cat([tokens, chunk_ids]), plan, slots.plan_holder)

        for k in range(gamma):
            if pending:
                logits, pending = packed(self.draft, self.dcache, tok, b, 1)[:b], False
            else:
                logits = self.forward(self.draft, self.dcache, tok[:, None], lengths + k, False)[:, -1]
            tok, q = _sample(logits, temp, gen)
            drafts.append(tok)
            qs.append(q)
        if not gamma and pending:  # the chunks alone, or with the draft_sync token of every sequence
            packed(self.draft, self.dcache, last if draft_sync else last[:0], b if draft_sync else 0, 1)
        elif not gamma and draft_sync and b:
            self.forward(self.draft, self.dcache, last[:, None], lengths, False)
        d = torch.stack(drafts, 1) if gamma else last.new_empty((b, 0))
        ids = torch.cat([last[:, None], d], 1)
        logits = packed(self.target, self.tcache, ids.reshape(-1), b, gamma + 1)
        v = b * (gamma + 1)
        n_acc = next_tok = None
        if b:
            n_acc, next_tok = M.speculative_sample(logits[:v].reshape(b, gamma + 1, -1), d,
                                                   torch.stack(qs, 1) if gamma and temp > 0 else None, temp, gen,
                                                   synthetic_acc)
        firsts: list[int] = []
        if any(finishing):
            sel = torch.tensor([v + i for i, f in enumerate(finishing) if f], device=dev)
            firsts = _sample(logits[sel], temp, gen)[0].tolist()
        return n_acc, ids, next_tok, firsts

    def _verify(self, last: torch.Tensor, lengths: torch.Tensor, d: torch.Tensor):
        """The target's forward of ``[last, d]`` per slot: logits (b, w+1, V) as floats and, with an EAGLE head,
        the hidden states (b, w+1, hidden) it reads (the decoder, then the LM head on every position: the same
        work as :func:`batched_forward` with all logits)."""
        ids = torch.cat([last[:, None], d], 1)
        if self.head is None:
            return ids, self.forward(self.target, self.tcache, ids, lengths, True).float(), None
        b, t = ids.shape
        positions = lengths[:, None] + torch.arange(t, device=ids.device)[None, :]
        span = int(lengths.max()) + t
        self.tcache.set_step(0, b, positions, span)
        hidden = M.forward(self.target.get_decoder(), self.tcache.cache, input_ids=ids, position_ids=positions,
                           attention_mask=P.verify_mask(lengths, t, span), use_cache=True).last_hidden_state
        return ids, self.target.get_output_embeddings()(hidden).float(), hidden

    def _eagle_step(self, last, lengths, gamma: int, synthetic_acc, draft_sync: bool = False):
        """γ EAGLE head steps + one verify: head step k reads the token sampled last and a hidden state (the
        target's for the slot's last token at k = 0, the head's own output after), writes its one-layer KV at
        ``lengths + k``; the verify's hidden state at each row's accepted position is kept for the next step.
        ``draft_sync`` at γ = 0: one head forward on ``last`` (no sampling) keeps the head's KV in step, as the
        draft model's (the simulator charges it one ``eagle`` decode row)."""
        temp, gen, b = self.cfg.temperature, self.gen, last.shape[0]
        drafts, qs = [], []
        tok, hid = last, self.hidden[:b]
        for k in range(gamma):
            logits, out = self._head_step(tok, hid, lengths + k)
            tok, q = _sample(logits[:, -1], temp, gen)
            hid = out[:, -1]
            drafts.append(tok)
            qs.append(q)
        if not gamma and draft_sync:
            self._head_step(last, hid, lengths)
        d = torch.stack(drafts, 1) if gamma else last.new_empty((b, 0))
        ids, logits, hidden = self._verify(last, lengths, d)
        n_acc, next_tok = M.speculative_sample(logits, d, torch.stack(qs, 1) if gamma and temp > 0 else None, temp,
                                               gen, synthetic_acc)
        self.hidden[:b] = hidden[torch.arange(b, device=hidden.device), n_acc]
        return n_acc, ids, next_tok

    def _head_step(self, tok: torch.Tensor, hid: torch.Tensor, cached: torch.Tensor):
        """One EAGLE head forward of ``tok`` (b,) with hidden states ``hid`` (b, width) for slots ``0..b-1``
        whose head caches hold ``cached`` (b,) positions; returns the head's (logits, hidden states)."""
        from specbatch.profiler.drafters import eagle_forward

        span = int(cached.max()) + 1
        self.dcache.set_step(0, tok.shape[0], cached[:, None], span)
        return eagle_forward(self.head, self.dcache.cache, tok[:, None], hid[:, None],
                             attention_mask=P.verify_mask(cached, 1, span), position_ids=cached[:, None])

    def _ngram_step(self, last, lengths, gamma: int, synthetic_acc, histories, follow=None):
        """N-gram lookup (:func:`specbatch.profiler.drafters.ngram_propose`, CPU) in each row's own tokens for
        up to γ proposals, then one verify of 1 + the most any row proposed (rows with fewer are padded; a row
        with none verifies its 1 token; no proposal anywhere: plain decode). Acceptance counts only proposed
        tokens: synthetic counts are capped at each row's proposals, the real test accepts a proposal with the
        target's probability of it (the proposer's distribution is a point mass) and never a padding token.
        ``follow`` (per row, synthetic acceptance): a row proposes γ tokens where True (the lookup's, filled up
        with its last token) and none where False, whatever the lookup found. :attr:`proposed` keeps the
        proposals per row."""
        from specbatch.profiler.drafters import ngram_propose_batch

        cfg, temp, gen, b, dev = self.cfg, self.cfg.temperature, self.gen, last.shape[0], last.device
        props = ngram_propose_batch(histories, gamma, cfg.prompt_lookup_min, cfg.prompt_lookup_max) if gamma \
            else [np.zeros(0, np.int64)] * b
        if follow is not None and gamma:
            fill = last.tolist()
            props = [np.r_[x, np.full(gamma - len(x), fill[i], np.int64)][:gamma] if f else x[:0]
                     for i, (x, f) in enumerate(zip(props, follow))]
        k = torch.tensor([len(x) for x in props], device=dev)
        w = int(k.max()) if b else 0
        d = last[:, None].repeat(1, w)  # padding: the row's last token (never accepted)
        for i, x in enumerate(props):
            if len(x):
                d[i, :len(x)] = torch.as_tensor(x, device=dev)
        self.proposed = k
        ids, logits, _ = self._verify(last, lengths, d)
        live = torch.arange(w, device=dev)[None, :] < k[:, None]
        if synthetic_acc is not None:
            n_acc = torch.minimum(synthetic_acc, k)
        elif temp <= 0:
            n_acc = ((logits[:, :w].argmax(-1) == d) & live).int().cumprod(1).sum(1)
        else:
            p_tok = torch.softmax(logits[:, :w] / temp, -1).gather(-1, d[..., None])[..., 0]
            n_acc = ((torch.rand(b, w, device=dev, generator=gen) <= p_tok) & live).int().cumprod(1).sum(1)
        q = None
        if temp > 0 and w:
            q = torch.zeros(b, w, logits.shape[-1], device=dev)
            q.scatter_(2, d[..., None], live[..., None].float())
        n_acc, next_tok = M.speculative_sample(logits, d, q, temp, gen, n_acc)
        return n_acc, ids, next_tok

    def warm_up(self, gamma: int = 2, prompt: int = 16) -> None:
        """Untimed work at the largest shapes a run will use (first-call allocations, lazy inits, and the
        heap's high-water mark, see :mod:`specbatch.profiler.host_memory`): a prefill of ``prompt`` tokens on each model,
        then steps of the full batch at γ = 0 and ``gamma`` over the longest span the slots hold."""
        b = self.cfg.max_batch
        pairs = ((self.target, self.tcache),) + (((self.draft, self.dcache),) if self.cfg.drafter == "draft_model"
                                                  else ())
        for model, slots in pairs:
            ids = torch.randint(0, self.vocab, (prompt,), generator=self.gen, device=self.device).tolist()
            prefill_into_slot(model, slots, 0, ids, self.cfg.temperature, self.gen, self.device)
        if self.head is not None:
            hist = [torch.randint(0, self.vocab, (prompt,), generator=self.gen, device=self.device).tolist()]
            hidden = prefill_into_slots(self.target, self.tcache, [0], hist, self.cfg.temperature, self.gen,
                                        self.device, return_hidden=True)[2]
            head_prefill_into_slots(self.head, self.dcache, [0], hist, hidden, self.device)
        last = torch.zeros(b, dtype=torch.long, device=self.device)
        lengths = torch.full((b,), self.max_len - gamma - 1, device=self.device)
        rng = np.random.default_rng(0)  # n-gram lookup over histories as long as the slots hold
        hists = [rng.integers(0, 64, self.max_len - gamma).astype(np.int64) for _ in range(b)]
        if self.step_graphs is not None:
            self.capture_graphs(gamma)
        for g in (0, gamma):
            self.spec_step(last, lengths, g, None, histories=hists)
        if self.cfg.prefill == "chunked":  # the packed forwards at the full batch and the budget's largest chunk
            k = max(1, min(self.cfg.max_num_batched_tokens - b * (gamma + 1), self.max_len))
            ids = torch.randint(0, self.vocab, (k,), generator=self.gen, device=self.device)
            self.mixed_step(last, lengths, gamma, None, [P.Chunk(b, 0, k)], ids, [True], draft=True)

    def capture_graphs(self, gamma: int) -> int:
        """Capture the batched forwards' graphs a run up to γ = ``gamma`` uses (every batch size; the target's
        1..γ+1 new tokens, the draft model's 1) ahead of the timed run, as vLLM captures at start-up; return
        how many were new. With an EAGLE head every step stays eager (its verify keeps the hidden states)."""
        sg, batches = self.step_graphs, range(1, self.cfg.max_batch + 1)
        if self.cfg.drafter == "eagle":
            return 0
        n = sg.capture_all(self.target, self.tcache, batches, range(1, gamma + 2), True)
        if self.cfg.drafter == "draft_model":
            n += sg.capture_all(self.draft, self.dcache, batches, (1,), False)
        return n

    def _iteration(self, sched: Scheduler, slots: "_Slots", clock: "_ReplayClock",
                   t0: float) -> tuple[float, float, float, int]:
        """One iteration from ``t0``: admit and prefill, one speculative step, leave, record. Returns the
        seconds of prefill forwards, of the step's model work, the iteration's end and the sequences that
        proposed draft tokens in it."""
        admitted = sched.admit()
        fwd = model_s = 0.0
        t1 = t0
        if admitted:
            fwd = self._prefill_admitted(slots, admitted, clock.read)
            t1 = clock.now()
            if sched.join(admitted, t0, t1):
                slots.free(sched.finish(t1))
        gamma = tokens = accepted = n = matched = 0
        preempted: list[int] = []
        ctx_mean = ctx_max = 0.0
        if len(sched.batch):
            gamma, view, preempted = sched.choose_gamma(t1)
            if preempted:  # their generated tokens are recomputed at re-admission
                slots.forget(preempted)
            n, ctx_mean, ctx_max = view.batch, view.context, view.step_context  # (padded: the longest)
            model_s, tokens, accepted = self._step(sched, slots, view, gamma, clock)
            if gamma:  # (n-gram lookup may leave rows without a proposal)
                matched = int((self.proposed > 0).sum()) if self.cfg.drafter == "ngram" else n
            slots.free(sched.finish(clock.now()))
        t2 = clock.now()
        sched.kv_tokens = sched.batch_tokens()
        sched.record(t0, batch=n, gamma=gamma, prefill_s=t1 - t0, step_s=t2 - t1, tokens=tokens + len(admitted),
                     accepted=accepted, admitted=len(admitted), preempted=len(preempted), context=ctx_mean,
                     context_max=ctx_max)
        return fwd, model_s, t2, matched

    def _iteration_chunked(self, sched: Scheduler, slots: "_Slots", clock: "_ReplayClock",
                           t0: float) -> tuple[float, float, float, int]:
        """One chunked-prefill iteration from ``t0``, as the simulator's (``Replica._run_chunked``): γ for the
        running batch under the token budget, the prompt chunks the scheduler fits after its b·(γ+1) verify
        tokens, their forwards (:meth:`_chunked_step`), then the requests whose last chunk ran join the batch
        with the token it produced. Recorded as ``step_s`` (the whole iteration; ``prefill_s`` 0: the chunks'
        share of one forward is not separable). Returns (0, the seconds of model work, the iteration's end)."""
        gamma = n = 0
        view, preempted, ctx_mean, ctx_max = None, [], 0.0, 0.0
        if len(sched.batch):
            gamma, view, preempted = sched.choose_gamma_chunked(t0)
            if preempted:
                slots.forget(preempted)
            n, ctx_mean, ctx_max = view.batch, view.context, view.step_context
        chunks, admitted = sched.schedule_chunks(n * (gamma + 1), t0)
        totals = {rid: total for rid, _, total in sched.prefilling}
        for rid, done, _ in chunks:
            if rid not in slots.stage_of:
                slots.stage(rid)
        model_s, tokens, accepted, firsts = self._chunked_step(sched, slots, view, gamma, chunks, totals, clock)
        t2 = clock.now()
        joined, _ = sched.commit_chunks(chunks, t2)
        for rid, tok in firsts:
            slots.join_staged(rid, tok)
        if n or joined:
            slots.free(sched.finish(t2))
        sched.kv_tokens = sched.batch_tokens() + sched.prefill_held
        sched.record(t0, batch=n, gamma=gamma, prefill_s=0.0, step_s=t2 - t0, tokens=tokens + joined,
                     accepted=accepted, admitted=admitted, preempted=len(preempted), context=ctx_mean,
                     context_max=ctx_max)
        self.chunk_log.append([(done, k) for _, done, k in chunks])
        return 0.0, model_s, t2, n if gamma else 0  # (a draft model proposes for every row)

    def _chunked_step(self, sched: Scheduler, slots: "_Slots", view, gamma: int, chunks: list, totals: dict,
                      clock: "_ReplayClock") -> tuple[float, int, int, list[tuple[int, int]]]:
        """The running batch's step at ``gamma`` (none when ``view`` is None) and the prompt ``chunks``
        [(rid, prefilled, tokens)] on the models (:meth:`mixed_step`), the step committed to ``sched``; returns
        the seconds of model work, the tokens gained, the draft tokens accepted and (rid, first token) for each
        request whose last chunk ran (``totals``: rid -> tokens to prefill)."""
        b, device = sched.batch, self.device
        n = len(b) if view is not None else 0
        rid_rows = b.ids.tolist() if n else []
        rows = [slots.slot_of[r] for r in rid_rows]
        acc, syn = self._draws(sched, gamma, rows)
        parts = [P.Chunk(slots.stage_of[rid], done, k) for rid, done, k in chunks]
        ids = torch.tensor([t for rid, done, k in chunks for t in slots.history[rid][done:done + k]],
                           dtype=torch.long, device=device)
        finishing = [done + k == totals[rid] for rid, done, k in chunks]
        tm = clock.read()
        n_acc, ids_t, next_tok, firsts = self.mixed_step(slots.last_tok[:n], _cached_lengths(b, rows, device), gamma,
                                                         syn, parts, ids, finishing, slots.uses_draft,
                                                         self.cfg.draft_sync and slots.uses_draft)
        model_s = clock.read() - tm
        tokens = accepted = 0
        if n:
            tokens, accepted = self._advance(sched, slots, view, gamma, acc, rows, rid_rows, n_acc, ids_t, next_tok)
        done_rids = [rid for (rid, _, _), f in zip(chunks, finishing) if f]
        return model_s, tokens, accepted, list(zip(done_rids, firsts))

    def _advance(self, sched: Scheduler, slots: "_Slots", view, gamma: int, acc, rows: list[int],
                 rid_rows: list[int], n_acc, ids_t, next_tok) -> tuple[int, int]:
        """Commit a step's outcome (acceptance counts ``acc``, or the real test's ``n_acc``) to ``sched`` and the
        slots' tokens; returns the tokens gained and the draft tokens accepted."""
        n_acc_l, ids_l, next_l = n_acc.tolist(), ids_t.tolist(), next_tok.tolist()
        if self.cfg.acceptance != "synthetic":
            acc = np.array([n_acc_l[s] for s in rows], np.int64)
        slots.last_tok[:len(rows)] = next_tok
        gain, tokens, accepted = sched.advance(view, gamma, acc)
        for rid, s, g in zip(rid_rows, rows, gain.tolist()):
            slots.history[rid].extend((ids_l[s][1:1 + n_acc_l[s]] + [next_l[s]])[:g])
        return tokens, accepted

    def _prefill_admitted(self, slots: "_Slots", admitted: list[int], clock: Callable[[], float]) -> float:
        """Prefill the admitted requests' histories into new slots (one forward each, or with
        ``prefill="batched"`` one per model for all); return the seconds of the forwards."""
        temp, gen, dev, draft = self.cfg.temperature, self.gen, self.device, slots.uses_draft
        new_slots, hists = slots.open(admitted)
        if self.cfg.drafter != "draft_model":
            return self._prefill_admitted_drafter(slots, new_slots, hists, draft, clock)
        if self.cfg.prefill == "batched" and len(admitted) > 1:
            toks, fwd = prefill_into_slots(self.target, self.tcache, new_slots, hists, temp, gen, dev, clock)
            if draft:
                fwd += prefill_into_slots(self.draft, self.dcache, new_slots, hists, temp, gen, dev, clock)[1]
        else:
            toks, fwd = [], 0.0
            for s, h in zip(new_slots, hists):
                tok, f = prefill_into_slot(self.target, self.tcache, s, h, temp, gen, dev, clock)
                fwd += f
                if draft:
                    fwd += prefill_into_slot(self.draft, self.dcache, s, h, temp, gen, dev, clock)[1]
                toks.append(tok)
        for s, h, tok in zip(new_slots, hists, toks):
            slots.last_tok[s] = tok
            h.append(tok)
        return fwd

    def _prefill_admitted_drafter(self, slots: "_Slots", new_slots: list[int], hists: list[list[int]], draft: bool,
                                  clock: Callable[[], float]) -> float:
        """:meth:`_prefill_admitted` for drafter eagle / ngram: the target's prefill (one forward each, or one
        for all with ``prefill="batched"``); with an EAGLE head (when the policy drafts) the head's prefill over
        the prompt's hidden states too, and the last prompt position's hidden state kept for its first step.
        N-gram lookup has no prefill."""
        temp, gen, dev = self.cfg.temperature, self.gen, self.device
        groups = [(new_slots, hists)] if self.cfg.prefill == "batched" and len(hists) > 1 else \
            [([s], [h]) for s, h in zip(new_slots, hists)]
        toks, fwd = [], 0.0
        for g_slots, g_hists in groups:
            t, f, hidden = prefill_into_slots(self.target, self.tcache, g_slots, g_hists, temp, gen, dev, clock,
                                              return_hidden=True)
            toks += t
            fwd += f
            if self.head is not None:
                if draft:
                    fwd += head_prefill_into_slots(self.head, self.dcache, g_slots, g_hists, hidden, dev, clock)
                for row, (s, h) in enumerate(zip(g_slots, g_hists)):
                    self.hidden[s] = hidden[row, len(h) - 1]
        for s, h, tok in zip(new_slots, hists, toks):
            slots.last_tok[s] = tok
            h.append(tok)
        return fwd

    def _step(self, sched: Scheduler, slots: "_Slots", view, gamma: int, clock: "_ReplayClock") -> tuple[float, int, int]:
        """The speculative step of the running batch at ``gamma`` on the models, committed to ``sched``;
        returns the seconds of model work, the tokens gained and the draft tokens accepted."""
        b, synthetic = sched.batch, self.cfg.acceptance == "synthetic"
        n, rid_rows = len(b), b.ids.tolist()
        rows = [slots.slot_of[r] for r in rid_rows]  # slot of each batch row
        ngram = self.cfg.drafter == "ngram" and gamma > 0
        follow = None
        if ngram and synthetic:  # the simulator's match draws decide who proposes (read before speculate uses them)
            follow = np.zeros(n, bool)
            follow[rows] = sched.peek_matched_rows(self.match_rate)
        acc, syn = self._draws(sched, gamma, rows)
        hists = [np.asarray(slots.history[slots.slot_rid[s]], np.int64) for s in range(n)] if ngram else None
        tm = clock.read()
        n_acc, ids_t, next_tok = self.spec_step(slots.last_tok[:n], _cached_lengths(b, rows, self.device), gamma,
                                                syn, self.cfg.draft_sync and slots.uses_draft, histories=hists,
                                                follow=follow)
        model_s = clock.read() - tm
        if synthetic and ngram:  # only proposed tokens can be accepted
            acc = np.minimum(acc, self.proposed.cpu().numpy()[rows])
        return (model_s, *self._advance(sched, slots, view, gamma, acc, rows, rid_rows, n_acc, ids_t, next_tok))

    def _draws(self, sched: Scheduler, gamma: int, rows: list[int]) -> tuple[np.ndarray | None, torch.Tensor | None]:
        """The step's synthetic acceptance draws (:meth:`Scheduler.speculate`) per batch row, and as a tensor per
        slot (``rows``: the slot of each batch row) for the models; (None, None) under real acceptance or with
        no running batch, and no tensor at γ = 0."""
        if self.cfg.acceptance != "synthetic" or not rows:
            return None, None
        acc = sched.speculate(gamma)
        if not gamma:
            return acc, None
        syn = torch.empty(len(rows), dtype=torch.long)
        syn[rows] = torch.as_tensor(acc)
        return acc, syn.to(self.device)

    # -- serving loop ------------------------------------------------------------------------------------------

    def run(self, workload: Workload, cost: CostModel, policy: Policy, acceptance: AcceptanceModel,
            seed: int = 0, reference_context=None, time_limit_s: float | None = None,
            probe: Callable[[], float] | None = None, probe_every: int = 8) -> SimResult:
        """Replay ``workload`` (arrivals honoured in the engine's clock, see the module docstring) and return the same tables as
        :func:`specbatch.sim.cluster.simulate` with one replica. ``cost`` only sets up the policy (and ``max_gamma``).

        ``probe``: a reference measurement run before every ``probe_every``-th iteration, its time taken out of
        the engine's clock (the replay does not see it); what it returns is kept in :attr:`probes` — e.g. the
        seconds a fixed profiler step takes, the machine's speed during the run."""
        cfg = self.cfg
        if len(workload) == 0:
            raise ValueError("the workload has no requests")
        need = int((workload.prompt_tokens + workload.output_tokens).max()) + cost.max_gamma + 2
        if need > self.max_len:
            raise ValueError(f"a request needs {need} KV positions but the engine's slots hold {self.max_len}")
        # same seeding as sim.cluster.simulate with replicas=1
        seeds = np.random.SeedSequence(seed).spawn(3)
        reqs = request_table(workload, acceptance, cost.max_gamma, seeds[0])
        if reference_context is None:
            reference_context = charged_context(workload, self.attention, cost.max_batch)
        policy = copy.deepcopy(policy)
        policy.setup(cost, acceptance, reference_context)
        capacity = self.capacity
        log = IterationLog()
        sched = Scheduler(0, reqs, policy, np.random.default_rng(seeds[2]), log, max_batch=cfg.max_batch,
                          kv_capacity_tokens=capacity, max_gamma=cost.max_gamma, watermark=cfg.watermark,
                          attention=self.attention)  # policies see the step's context
        chunked = cfg.prefill == "chunked"
        if chunked:
            sched.enable_chunked(cfg.max_num_batched_tokens, cfg.long_prefill_token_threshold)
        #: chunked prefill, per iteration: the chunks it ran, [(tokens already prefilled, chunk tokens), ...]
        self.chunk_log = []
        reqs.rejected[:] = (reqs.prompt + reqs.output) > capacity
        slots = _Slots(self, reqs, np.random.default_rng([seed, 7]), policy.uses_draft)
        if cfg.warmup:
            self.warm_up(cost.max_gamma, int(workload.prompt_tokens.max()))
        clock = _ReplayClock(make_clock(cfg.clock, self.device), cfg.clock)
        arrivals = reqs.arrival.tolist()
        order = [i for i in range(reqs.n) if not reqs.rejected[i]]
        nxt = busy = 0
        probes, diag = [], []  # diag, per iteration: prefill forwards, speculative step (model work), proposers
        self.match_rate = acceptance.match_rate  # (n-gram proposals under synthetic acceptance follow its draws)
        while nxt < len(order) or sched.outstanding:
            t = clock.now()
            while nxt < len(order) and arrivals[order[nxt]] <= t:
                sched.submit(order[nxt])
                nxt += 1
            if not len(sched.batch) and not sched.waiting and not sched.prefilling:
                clock.idle_until(arrivals[order[nxt]])
                continue
            if probe is not None and len(diag) % probe_every == 0:
                probes.append(clock.aside(probe))
            if time_limit_s is not None and t > time_limit_s:
                raise TimeoutError(f"engine run exceeded {time_limit_s} s")
            t0 = clock.now()
            fwd, model_s, t2, matched = (self._iteration_chunked if chunked else self._iteration)(sched, slots, clock,
                                                                                               t0)
            diag.append((fwd, model_s, matched))
            busy += t2 - t0

        iters = log.frame()
        fin = reqs.finished[~reqs.rejected]
        makespan = float(np.nanmax(fin)) if len(fin) else 0.0
        #: engine-only diagnostics per iteration (aligned with the iteration table): seconds in prefill
        #: forwards and in the speculative step's model work (chunked: the packed forwards, chunks included;
        #: the rest of prefill_s/step_s is engine overhead), and ``matched``: the sequences that proposed draft
        #: tokens (the batch at γ > 0 but for n-gram lookup)
        self.diagnostics = pd.DataFrame(diag, columns=["prefill_forward_s", "step_model_s", "matched"])
        #: chunked prefill: the chunks each iteration ran, [(tokens already prefilled, chunk tokens), ...]
        self.diagnostics["chunks"] = self.chunk_log if chunked else [[] for _ in diag]
        #: what ``probe`` returned, in order (empty without a probe)
        self.probes = probes
        #: token ids per request id: prompt (random ids) + the generated tokens
        self.tokens = slots.history
        return SimResult(requests=reqs.frame(), iterations=iters, busy_s=[busy], makespan_s=makespan,
                         kv_capacity_tokens=capacity, policy=policy.describe())
