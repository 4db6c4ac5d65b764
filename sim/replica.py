"""One serving replica: a SimPy process that batches requests and decodes speculatively.

The scheduling rules and state are :class:`specbatch.sim.scheduler.Scheduler`'s; the replica prices each
iteration with the cost model, waits for it on the simulated clock and plans quiet stretches ahead
(fast-forward). SimPy's internals are reached only through :mod:`specbatch.sim.simpy_adapter`.

Continuous batching (Orca/vLLM, iteration level). Each iteration, at simulated time t0:

1. **Admit** waiting requests first-come-first-served while the running batch has fewer than
   ``max_batch`` sequences and the KV cache holds the request's context (prompt + tokens generated so far)
   below ``(1 - watermark)`` of its capacity (an empty replica admits regardless of the watermark).
2. **Prefill** the admitted requests one after another: Σ T_prefill(context) on the target, plus on the
   draft when the policy uses one. Each admitted request gains a token at t0 + prefill time (its first
   token — the TTFT — unless it is resuming after a preemption).
3. **Speculate** on the running batch (b sequences, mean context c̄): the policy picks γ; if the KV cache
   cannot hold b·(γ+1) more tokens, the most recently admitted request is preempted (its KV freed, it
   goes back to the head of the queue and is recomputed on re-admission, as vLLM does) and γ is picked
   again; a lone request that still does not fit runs with a smaller γ. The step costs
   γ·T_draft(b, c) + T_verify(b, γ, c) (γ = 0: one target decode, no draft) at the context c the
   attention reads per sequence: the mean c̄ with ``attention="paged"`` (each sequence attends over its own
   KV: vLLM's paged attention, varlen flash kernels) or the longest sequence's with ``attention="padded"``
   (every sequence attends over the longest one's span, masked: batched HF transformers, specbatch's own
   engine). Each request gains 1 + accepted draft tokens, capped by the tokens it has left.
4. The iteration is **one** SimPy timeout of prefill + step seconds; its effects are committed when it
   ends. Requests that reach their output length finish then and leave.

**Fast-forward.** Between two changes of the running batch the iterations are a pure function of the
batch, the acceptance draws and the cost model when the policy's γ depends only on (batch size, the
context the step is charged at) (:meth:`Policy.steady_gamma`). The replica then plans up to the next
event that can change the batch in one vectorised step — the first request to finish, the first
iteration whose KV growth would need a preemption, a change of γ — and waits for it with a single SimPy
event. An arrival that could
be admitted mid-plan cuts the plan at the next iteration boundary. Results are identical to stepping
one event per iteration (same floats, same random draws); ``fast_forward=False`` does the latter.

Arrivals at time t are dispatched before any replica starts an iteration at t (they are scheduled with
SimPy's urgent priority), so a request arriving exactly at an iteration boundary joins that iteration.

Static batching (``mode="static"``, the seed paper's prototype): the replica takes up to ``max_batch``
waiting requests whose full lengths (prompt + output) fit in the KV cache, prefills them and decodes
until the longest finishes; every step is charged at the starting batch size (finished sequences stay
as padding, and their contexts count in the mean and the longest). Requests arriving meanwhile wait for
the next batch.

KV accounting is in tokens: one token of context occupies target KV plus draft KV (when a draft is used).
"""
from __future__ import annotations

import math
from bisect import bisect_left

import numpy as np
import simpy

from .acceptance import AcceptanceModel
from .cost_model import CostModel
from .drafters import charged_matched
from .iterations import IterationLog
from .policies import BatchView, Policy
from .requests import RequestTable
from .scheduler import ATTENTION, PREFILL, STEP_CONTEXT, RunningBatch, Scheduler
from .simpy_adapter import at_time, hand_over

__all__ = ["ATTENTION", "PREFILL", "STEP_CONTEXT", "Replica"]

CTX, LEFT = RunningBatch.CTX, RunningBatch.LEFT


class _Plan:
    """Iterations planned ahead for an unchanged running batch of ``n`` sequences at speculation length
    ``gamma``. Iteration j runs from ``times[j]`` to ``times[j+1]`` (seconds; iteration 0 starts at ``t0``
    with ``prefill_s`` of prefill; ``ends`` = ``times[1:]``) at mean context ``contexts[j]`` (tokens), costing
    ``steps[j]``; all four are lists of floats (long plans compute them with numpy, then convert once).
    ``maxes[j]``: the longest sequence's context (tokens) under padded attention, else ``None``.
    ``cum[j, i]`` = tokens sequence i gained by the end of iteration j before the cap at its output length
    (``None`` when γ = 0: then it is j + 1); ``tot[j]`` = Σ_i cum[j, i]; ``ctx0`` = the batch's context
    before iteration 0. Only the last planned iteration can finish a request (``finishes``).
    ``submitted``: times of requests queued while the plan ran. ``event``: the wake-up the replica waits on;
    ``rows``: the iterations it will commit (all of them, unless :meth:`Replica._cut` shortened the plan)."""

    __slots__ = ("t0", "prefill_s", "admitted", "n", "gamma", "cum", "tot", "ctx0", "finishes", "ends", "times",
                 "contexts", "maxes", "steps", "queue0", "submitted", "cuttable", "event", "rows")


class Replica:
    """A serving replica: a :class:`Scheduler` (:attr:`sched`) run on a SimPy environment, each iteration
    charged from the cost model. Requests enter through :meth:`submit`; :attr:`outstanding` counts those
    not yet finished; :attr:`busy_s` is the simulated time spent in iterations."""

    PLAN_ITERATIONS = 256  # longest fast-forward plan (iterations); a longer quiet spell takes several

    def __init__(self, env: simpy.Environment, index: int, reqs: RequestTable, cost: CostModel, policy: Policy,
                 acceptance: AcceptanceModel, rng: np.random.Generator, log: IterationLog, *, max_batch: int,
                 kv_capacity_tokens: int, watermark: float = 0.01, mode: str = "continuous",
                 fast_forward: bool = False, attention: str = "paged", prefill: str = "sequential",
                 token_budget: int = 2048, chunk_cap: int | None = None):
        if mode not in ("continuous", "static"):
            raise ValueError(f"cluster.mode is {mode!r}; expected 'continuous' or 'static'")
        if prefill not in PREFILL:
            raise ValueError(f"cluster.prefill is {prefill!r}; expected one of {list(PREFILL)}")
        self.sched = Scheduler(index, reqs, policy, rng, log, max_batch=max_batch, kv_capacity_tokens=kv_capacity_tokens,
                               max_gamma=cost.max_gamma, watermark=watermark, attention=attention)
        self.env, self.index, self.reqs, self.cost = env, index, reqs, cost
        self.policy, self.acceptance, self.log = policy, acceptance, log
        # A partial proposer (ngram, sim/drafters.py): its steps are charged for the sequences that matched.
        self.match_rate = cost.drafter.match_rate if cost.drafter.partial else None
        self.draft_prefill = policy.uses_draft and cost.drafter.prefill  # the draft prefills too (ngram: none)
        self.busy_s = 0.0
        self.fast_forward = bool(fast_forward)
        self.attention = attention
        self.padded = attention == "padded"  # steps are charged at the longest sequence's context
        self.batched_prefill = prefill == "batched"  # an iteration's admissions share one prefill forward
        self.chunked = prefill == "chunked"  # prompt chunks share the verify forward under a token budget
        if self.chunked:
            if mode != "continuous":
                raise ValueError(f"cluster.prefill is 'chunked' but cluster.mode is {mode!r}; expected 'continuous'")
            self.sched.enable_chunked(token_budget, chunk_cap)
        self._ones = np.ones(self.sched.max_batch, np.int64)  # for row sums of a plan's (k, batch) token counts
        self._prefill_times: dict[int, tuple[float, float]] = {}  # context -> (target, draft) prefill seconds
        self._plan: _Plan | None = None  # the fast-forward plan being waited on
        self._wake: simpy.Event | None = None
        self.process = env.process(self._run_static() if mode == "static" else
                                   self._run_chunked() if self.chunked else self._run_continuous())

    # -- entry ----------------------------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Requests submitted and not finished."""
        return self.sched.outstanding

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens of the requests waiting in the queue."""
        return self.sched.queued_tokens

    def submit(self, rid: int) -> None:
        """Queue request ``rid`` (its prompt + output must fit in the KV cache; the cluster checks)."""
        plan, sched = self._plan, self.sched
        if plan is not None:
            plan.submitted.append(self.env.now)
            # It could join at the next iteration boundary only if there is a free slot and nobody queued
            # ahead of it (a queued head is blocked by the KV cache, which only fills up during a plan).
            if plan.cuttable and not sched.waiting and len(sched.batch) < sched.max_batch:
                plan.cuttable = False
                self._cut(plan)
        sched.submit(rid)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def kv_in_use(self) -> int:
        """KV tokens held by the running batch as of the last iteration that ended before now."""
        plan = self._plan
        if plan is None:
            return self.sched.kv_tokens
        done = bisect_left(plan.ends, self.env.now)  # iterations that ended before now
        return self.sched.kv_tokens if done == 0 else plan.ctx0 + int(plan.tot[done - 1])

    def _sleep_until_work(self) -> simpy.Event:
        self._wake = self.env.event()
        return self._wake

    # -- shared pieces --------------------------------------------------------------------------------------

    def _prefill(self, rids: list[int], t0: float) -> tuple[float, bool]:
        """Prefill ``rids`` (:meth:`_prefill_seconds`) and join them to the batch with their first token;
        return the seconds taken and whether one of them is done with that token."""
        total = self._prefill_seconds(rids)
        return total, self.sched.join(rids, t0, t0 + total)

    def _step_seconds(self, batch: int, gamma: int, context: float) -> float:
        """The next speculative step's seconds: :meth:`CostModel.iteration`, or for a partial proposer (n-gram)
        at γ > 0 the step of the sequences charged as proposing in the next draw
        (:func:`~specbatch.sim.drafters.charged_matched`; peeked, which :meth:`Scheduler.speculate` then reads)."""
        if not gamma or self.match_rate is None:
            return self.cost.iteration(batch, gamma, context)
        matched = self.sched.peek_matched(1, self.match_rate)[0]
        return self.cost.iteration_matched(batch, gamma, charged_matched(matched, batch, self.padded), context)

    def _prefill_seconds(self, rids: list[int]) -> float:
        """Seconds to prefill ``rids``' contexts on the target (and the draft when the policy uses one): one
        after another, or with ``prefill="batched"`` (and more than one) together in one forward per model."""
        r, cost, known, draft = self.reqs, self.cost, self._prefill_times, self.draft_prefill
        if self.batched_prefill and len(rids) > 1:
            contexts = [int(r.prompt[rid]) + int(r.generated[rid]) for rid in rids]
            total = cost.prefill_batch(contexts, "target", self.attention)
            if draft:
                total += cost.prefill_batch(contexts, "draft", self.attention)
            return total
        total = 0.0
        for rid in rids:
            ctx = int(r.prompt[rid]) + int(r.generated[rid])
            times = known.get(ctx)
            if times is None:  # prompt lengths repeat: the cost model is asked once per length
                times = known[ctx] = (cost.prefill(ctx, "target"), cost.prefill(ctx, "draft") if draft else 0.0)
            total += times[0]
            if draft:
                total += times[1]
        return total

    # -- continuous batching -----------------------------------------------------------------------------

    def _run_continuous(self):
        env, sched = self.env, self.sched
        b = sched.batch
        while True:  # (len(b.s), not len(b): a builtin call, not RunningBatch.__len__, once per plan)
            if not len(b.s) and not sched.waiting:
                yield self._sleep_until_work()
            t0 = env.now
            admitted = sched.admit()
            prefill_s = 0.0
            if admitted:
                prefill_s = self._prefill_seconds(admitted)
                if sched.join(admitted, t0, t0 + prefill_s):  # one of them is done with its first token
                    sched.finish(t0 + prefill_s)
            if len(b.s) and self.fast_forward:
                plan = self._make_plan(t0, prefill_s, len(admitted))
                if plan is not None:
                    yield from self._follow(plan)
                    continue
            gamma = tokens = accepted = n = 0
            preempted = ()
            step_s = ctx_mean = 0.0
            ctx_max = 0.0 if self.padded else math.nan  # (tracked under padded attention only)
            if len(b):
                gamma, view, preempted = sched.choose_gamma(t0 + prefill_s)
                n, ctx_mean = view.batch, view.context
                if self.padded:
                    ctx_max = view.step_context
                step_s = self._step_seconds(n, gamma, view.step_context)
                acc = sched.speculate(gamma)
            duration = prefill_s + step_s
            yield env.timeout(duration)
            self.busy_s += duration
            if n:
                _, tokens, accepted = sched.advance(view, gamma, acc)
                sched.finish(env.now)
            sched.kv_tokens = sched.batch_tokens()
            sched.record(t0, batch=n, gamma=gamma, prefill_s=prefill_s, step_s=step_s, tokens=tokens + len(admitted),
                         accepted=accepted, admitted=len(admitted), preempted=len(preempted), context=ctx_mean,
                         context_max=ctx_max)

    # -- chunked prefill (continuous batching, cluster.prefill=chunked) ------------------------------------

    def _run_chunked(self):
        """Continuous batching with chunked prefill (:meth:`Scheduler.schedule_chunks` has the rules): each
        iteration is one forward of the running batch's verify step and the prompt chunks, priced by
        :meth:`CostModel.mixed_iteration` (recorded as ``prefill_s`` = what the chunks add, ``step_s`` = the
        speculative iteration). While no prompt is being prefilled and the queue's head cannot be admitted,
        the iterations are today's and fast-forward plans them as in :meth:`_run_continuous`."""
        env, cost, sched = self.env, self.cost, self.sched
        b = sched.batch
        while True:
            if not len(b) and not sched.waiting and not sched.prefilling:
                yield self._sleep_until_work()
            t0 = env.now
            if self.fast_forward and len(b) and not sched.prefilling and not sched.head_admissible():
                plan = self._make_plan(t0, 0.0, 0)
                if plan is not None:
                    yield from self._follow(plan)
                    continue
            gamma = tokens = accepted = n = 0
            preempted = ()
            ctx_mean = step_context = 0.0
            ctx_max = 0.0 if self.padded else math.nan
            if len(b):
                gamma, view, preempted = sched.choose_gamma_chunked(t0)
                n, ctx_mean, step_context = view.batch, view.context, view.step_context
                if self.padded:
                    ctx_max = step_context
                acc = sched.speculate(gamma)
            chunks, admitted = sched.schedule_chunks(n * (gamma + 1), t0)
            if not n and not chunks:  # nothing can run (cannot happen: an empty replica admits its head)
                yield self._sleep_until_work()
                continue
            prefill_s, step_s = cost.mixed_iteration(n, gamma, step_context, [(p, k) for _, p, k in chunks],
                                                     self.draft_prefill)
            duration = prefill_s + step_s
            yield env.timeout(duration)
            self.busy_s += duration
            if n:
                _, tokens, accepted = sched.advance(view, gamma, acc)
            joined, _ = sched.commit_chunks(chunks, env.now)
            if n or joined:
                sched.finish(env.now)
            sched.kv_tokens = sched.batch_tokens() + sched.prefill_held
            sched.record(t0, batch=n, gamma=gamma, prefill_s=prefill_s, step_s=step_s, tokens=tokens + joined,
                         accepted=accepted, admitted=admitted, preempted=len(preempted), context=ctx_mean,
                         context_max=ctx_max)

    # -- fast-forward (continuous batching) ------------------------------------------------------------

    def _make_plan(self, t0: float, prefill_s: float, admitted: int) -> _Plan | None:
        """Plan the iterations from ``t0`` up to the first that changes the batch or γ, or ``None`` when this
        iteration must be stepped alone (a learning policy, or a preemption is due)."""
        sched = self.sched
        s = sched.batch.s
        n = len(s)
        ctxs = s[:, CTX].tolist()
        ctx0, max0 = sum(ctxs), max(ctxs)
        steady = self.policy.steady_gamma(n, max0 if self.padded else ctx0 / n)  # the step's charged context
        if steady is None:
            return None
        gamma, limit = min(int(steady[0]), sched.max_gamma), steady[1]
        if self.chunked:  # the verify tokens b·(γ+1) must fit in the token budget
            gamma = min(gamma, sched.token_budget // n - 1)
        slack = sched.capacity - ctx0 - n * (gamma + 1)  # KV tokens the batch may still grow by
        if gamma < 0 or slack < 0:
            return None  # choose_gamma reports the bad γ / preempts
        left = s[:, LEFT]
        lmin = min(left.tolist())
        # Nobody can finish before iteration ceil(lmin / (γ+1)); the one with lmin tokens left is done by lmin.
        k = min(lmin, 2 * (-(-lmin // (gamma + 1))) + 4, self.PLAN_ITERATIONS)
        if gamma:
            cum = sched.peek_cum(k, gamma)
            # Iterations before the first finish (k: none): the row of the first done entry in row-major
            # order ("someone is done" never turns false again). argmax on a bool array stops at the first
            # True; it and the int64 dot product cost a fraction of numpy's axis reductions at these sizes.
            done = (cum >= left).reshape(-1)
            j = int(done.argmax())
            first = j // n if done[j] else k
            tot = cum.dot(self._ones[:n])
        else:
            cum, first = None, lmin - 1
            tot = np.arange(n, n * (k + 1), n)
        rows, maxes = self._plan_rows(min(first + 1, k), n, ctx0, max0, slack, limit, cum, tot, s)
        p = _Plan()
        matched = gamma and self.match_rate is not None  # a partial proposer: one step at a time, as stepping
        if rows <= 12 or matched:  # up to about a dozen iterations Python floats beat numpy's per-call overheads
            contexts = [ctx0 / n] + [(ctx0 + g) / n for g in tot[:rows - 1].tolist()]
            if matched:
                it = self.cost.iteration_matched
                steps = [it(n, gamma, charged_matched(m, n, self.padded), c)
                         for m, c in zip(sched.peek_matched(rows, self.match_rate), maxes or contexts)]
            else:
                steps = self.cost.iteration_list(n, gamma, maxes or contexts)
            times = [t0, t0 + (prefill_s + steps[0])]
            for step in steps[1:]:  # running sums, as SimPy's clock
                times.append(times[-1] + step)
            p.ends = times[1:]
        else:  # the same computation, vectorised (bit-identical: same operations in the same order)
            contexts = np.empty(rows)
            contexts[0] = ctx0
            contexts[1:] = tot[:rows - 1]
            contexts[1:] += ctx0
            contexts /= n
            steps = self.cost.iteration_many(n, gamma, contexts if maxes is None else np.array(maxes, float))
            times = np.empty(rows + 1)  # running sums, as SimPy's clock
            times[0] = t0
            times[1:] = steps
            times[1] = prefill_s + times[1]
            np.add.accumulate(times, out=times)
            times, steps, contexts = times.tolist(), steps.tolist(), contexts.tolist()
            p.ends = times[1:]
        p.t0, p.prefill_s, p.admitted, p.n, p.gamma = t0, prefill_s, admitted, n, gamma
        p.cum, p.tot, p.ctx0 = cum, tot, ctx0
        p.finishes = first < k and len(steps) == first + 1
        p.times, p.steps, p.contexts, p.maxes = times, steps, contexts, maxes
        p.queue0, p.submitted, p.cuttable = len(sched.waiting), [], False
        p.rows = len(steps)
        return p

    def _plan_rows(self, rows: int, n: int, ctx0: int, max0: int, slack: int, limit: float, cum, tot,
                   s: np.ndarray) -> tuple[int, list | None]:
        """Shorten a plan of ``rows`` iterations to stop before one that would need a preemption, see γ change
        (the charged context reaching ``limit``), or could admit the queued head (kept out at t0 counting
        requests that finished at prefill; KV only grows during the plan, so checking the first boundary
        suffices). Returns the iterations kept and, under padded attention, the longest sequence's context
        at the start of each (ascending; else ``None``)."""
        if rows > 1 and tot[rows - 2] > slack:
            rows = int(np.searchsorted(tot[:rows - 1], slack, side="right")) + 1
        maxes = None
        if self.padded:
            maxes = [max0] + ((cum[:rows - 1] + s[:, CTX]).max(axis=1).tolist() if cum is not None
                              else list(range(max0 + 1, max0 + rows)))
            if rows > 1 and limit != np.inf and maxes[rows - 1] >= limit:
                rows = bisect_left(maxes, limit)  # maxes[0] < limit: steady_gamma was asked at max0
        elif rows > 1 and limit != np.inf and (ctx0 + int(tot[rows - 2])) / n >= limit:
            rows = int(np.searchsorted((ctx0 + tot[:rows - 1]) / n, limit, side="left")) + 1
        sched = self.sched
        if rows > 1 and n < sched.max_batch and sched.waiting:
            need = sched.head_need()
            if need is not None and ctx0 + int(tot[0]) + need <= sched.admit_limit:
                rows = 1
        if maxes is not None:
            del maxes[rows:]
        return rows, maxes

    def _follow(self, p: _Plan):
        """Wait until the plan's last iteration ends — or, when :meth:`_cut` shortens it, until the iteration
        in progress at the cut ends — then commit what ran."""
        self._plan = p
        p.cuttable = True
        p.event = at_time(self.env, p.ends[-1])
        yield p.event
        self._plan = None
        self._commit(p, p.rows)

    def _cut(self, p: _Plan) -> None:
        """End the plan being followed with the iteration in progress now (the first whose end is ≥ now):
        its wake-up moves from the plan's end to that iteration's end (:func:`hand_over`)."""
        rows = bisect_left(p.ends, self.env.now) + 1
        if rows == p.rows:
            return  # the plan ends with that iteration anyway
        old, p.rows = p.event, rows
        p.event = at_time(self.env, p.ends[rows - 1])
        hand_over(self.process, old, p.event)

    def _commit(self, p: _Plan, rows: int) -> None:
        """Apply the plan's first ``rows`` iterations: batch state, counters, busy time and the log."""
        sched, gamma = self.sched, p.gamma
        sched.advance_many(rows, gamma, p.cum[rows - 1] if gamma else rows)  # (gains before the output caps)
        steps = p.steps[:rows]
        busy = self.busy_s + (p.prefill_s + steps[0])
        for step in steps[1:]:  # in order, as one event per iteration would add them
            busy += step
        self.busy_s = busy
        if p.finishes and rows == len(p.steps):  # a finishing plan ends with ≥ 1 done
            cut = sched.finish_known(self.env.now)  # tokens the output caps cut off
            kv = sched.kv_tokens = sum(sched.batch.s[:, CTX].tolist())  # (batch_tokens(), without the call)
        else:
            cut = 0
            kv = sched.kv_tokens = p.ctx0 + int(p.tot[rows - 1])
        submitted, ends = p.submitted, p.ends
        queued_from = [j for j in (bisect_left(ends, when) for when in submitted) if j < rows] \
            if submitted else submitted
        maxes = p.maxes[:rows] if p.maxes is not None else None
        self.log.add_plan(self.index, p.n, gamma, p.prefill_s, p.admitted, p.queue0, p.ctx0, kv, cut,
                          p.times[:rows], steps, p.contexts[:rows], maxes, p.tot[:rows], queued_from)

    # -- static batching ---------------------------------------------------------------------------------

    def _run_static(self):
        env, sched = self.env, self.sched
        b = sched.batch
        while True:
            if not sched.waiting:
                yield self._sleep_until_work()
            t0 = env.now
            batch = sched.admit_whole()
            prefill_s, done = self._prefill(batch, t0)
            b0 = len(batch)
            pad = [0, 0]  # context (sum, longest) of sequences that finished but still occupy a slot
            if done:
                rows = b.take(b.finished())
                pad = [int(rows[:, CTX].sum()), max(rows[:, CTX].tolist())]  # (none has run: LEFT = 0 at most)
                sched.leave(rows, t0 + prefill_s)
            yield from self._decode_static(t0, prefill_s, b0, pad)
            sched.kv_tokens = 0

    def _decode_static(self, t0: float, prefill_s: float, b0: int, pad: list[int]):
        """Decode a static batch of ``b0`` until its last sequence finishes, every step charged at ``b0``;
        the first iteration carries the prefill. ``pad``: context (sum, longest) of the finished ones."""
        env, sched = self.env, self.sched
        b = sched.batch
        first = True
        while len(b) or first:
            ts = env.now
            ctx_mean = (int(b.s[:, CTX].sum()) + pad[0]) / b0
            ctx_max = max(b.s[:, CTX].tolist() + [pad[1]]) if self.padded else math.nan
            gamma, step_s, tokens, accepted = 0, 0.0, 0, 0
            if len(b):
                view = BatchView(ts, self.index, b0, ctx_mean, b.ids, ctx_max if self.padded else ctx_mean)
                gamma = sched.gamma_for(view)
                step_s = self._step_seconds(b0, gamma, view.step_context)
                acc = sched.speculate(gamma)
            pre = prefill_s if first else 0.0
            yield env.timeout(pre + step_s)
            self.busy_s += pre + step_s
            if len(b):
                _, tokens, accepted = sched.advance(view, gamma, acc)
                done = b.finished()
                if done is not None:
                    rows = b.take(done)
                    kept = rows[:, CTX] + np.minimum(rows[:, LEFT], 0)  # (cut past the cap)
                    pad[0] += int(kept.sum())
                    pad[1] = max([pad[1]] + kept.tolist())
                    sched.leave(rows, env.now)
            sched.kv_tokens = int(b.s[:, CTX].sum()) + pad[0]
            sched.record(t0 if first else ts, batch=b0 if step_s else 0, gamma=gamma, prefill_s=pre, step_s=step_s,
                         tokens=tokens + (b0 if first else 0), accepted=accepted, admitted=b0 if first else 0,
                         preempted=0, context=ctx_mean, context_max=ctx_max)
            first = False
