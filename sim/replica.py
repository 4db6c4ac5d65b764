"""One serving replica: a SimPy process that batches requests and decodes speculatively.

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

from collections import deque

import math
from bisect import bisect_left

import numpy as np
import simpy

from .acceptance import AcceptanceModel
from .cost_model import CostModel
from .events import at_time
from .iterations import IterationLog
from .policies import BatchView, Policy
from .requests import RequestTable

# cluster.attention -> the iteration column holding the context a step is charged at: the batch's mean
# context, or its longest sequence's
STEP_CONTEXT = {"paged": "context", "padded": "context_max"}
ATTENTION = tuple(STEP_CONTEXT)
PREFILL = ("sequential", "batched")  # cluster.prefill: an iteration's admitted prompts one by one, or together


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


class UniformStream:
    """An endless stream of U(0, 1) draws from one generator, read strictly in order.

    The values do not depend on how reads are split (a generator's ``random(a)`` then ``random(b)`` equals
    ``random(a + b)``), so reading k·b values at once or b values k times gives the same numbers.

    With ``thresholds`` (a non-increasing vector shared by every request, P(≥ j draft tokens accepted) for
    j = 1..len), the stream also holds each draw's tokens gained at full length, 1 + accepted with
    ``accepted = #{j : U < thresholds[j]}``, computed a block at a time; at speculation length γ a draw
    gains ``min(gain, γ + 1)`` (the thresholds are non-increasing, so the first γ are the ones passed)."""

    __slots__ = ("rng", "buf", "gain", "capped", "pos", "block", "thresholds")

    def __init__(self, rng: np.random.Generator, block: int = 1 << 16, thresholds: np.ndarray | None = None):
        self.rng, self.block = rng, block
        self.buf = np.empty(0)
        self.thresholds = None if thresholds is None else np.asarray(thresholds, float).tolist()
        self.gain = np.empty(0, np.int64)
        self.capped: dict[int, np.ndarray] = {}  # cap -> min(gain, cap), built when first asked for
        self.pos = 0

    def _fill(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            fresh = self.rng.random(max(self.block, n))
            self.buf = np.concatenate([self.buf[self.pos:], fresh])
            if self.thresholds is not None:  # one pass per threshold: cheaper than a binary search per draw
                gain = np.ones(len(fresh), np.int64)
                for t in self.thresholds:
                    gain += fresh < t
                self.gain = np.concatenate([self.gain[self.pos:], gain])
                self.capped = {}
            self.pos = 0

    def peek(self, n: int) -> np.ndarray:
        """The next ``n`` values, without consuming them."""
        self._fill(n)
        return self.buf[self.pos:self.pos + n]

    def peek_capped(self, n: int, cap: int) -> np.ndarray:
        """``min(gain, cap)`` of the next ``n`` values (needs ``thresholds``), not consumed; a read-only view.
        The capped block is computed once per block and cap (a policy uses a handful of γ values)."""
        self._fill(n)
        capped = self.capped.get(cap)
        if capped is None:
            capped = self.capped[cap] = np.minimum(self.gain, cap)
            capped.flags.writeable = False
        return capped[self.pos:self.pos + n]

    def skip(self, n: int) -> None:
        """Consume the next ``n`` values."""
        self._fill(n)
        self.pos += n


class _Running:
    """The running batch as aligned arrays in admission order.

    ``s`` is an int64 matrix with one row per sequence and columns :data:`ID` (request id), :data:`CTX`
    (context = prompt + generated, tokens), :data:`LEFT` (tokens still to generate), :data:`CTX0`, :data:`IT0`
    and :data:`G0` (the context, the replica's iteration count and its Σγ when the request joined: what
    it gained, its iterations and Σγ in this batch are differences at leave time). Iterations add their
    gains before the output cap (1 + accepted draft tokens), so a sequence that finishes leaves with
    ``LEFT`` ≤ 0: ``-LEFT`` tokens past its output length, which the cap cuts off. ``thr`` holds each
    sequence's acceptance thresholds (see :meth:`AcceptanceModel.thresholds`), or is ``None`` when every
    request shares one row (the replica's uniform stream then holds the accepted counts).

    Small reductions over the batch (≤ ``max_batch`` values) go through ``tolist()``: Python's ``sum`` and
    ``min`` on a short list cost a fraction of a numpy reduction's call overhead.
    """

    ID, CTX, LEFT, CTX0, IT0, G0 = range(6)
    __slots__ = ("s", "thr")

    def __init__(self, k: int | None):
        self.s = np.empty((0, 6), np.int64)
        self.thr = None if k is None else np.empty((0, k))

    def __len__(self) -> int:
        return len(self.s)

    @property
    def ids(self) -> np.ndarray:
        return self.s[:, self.ID]

    def extend(self, rows: np.ndarray, thr: np.ndarray | None) -> None:
        self.s = np.concatenate([self.s, rows])
        if self.thr is not None:
            self.thr = np.concatenate([self.thr, thr])

    def take(self, sel: np.ndarray) -> np.ndarray:
        """Remove the rows where the boolean mask ``sel`` is true and return them."""
        out = self.s.compress(sel, axis=0)
        keep = ~sel
        self.s = self.s.compress(keep, axis=0)
        if self.thr is not None:
            self.thr = self.thr.compress(keep, axis=0)
        return out

    def take_last(self) -> np.ndarray:
        """Remove the most recently admitted row and return it."""
        out = self.s[-1:].copy()
        self.s = self.s[:-1]
        if self.thr is not None:
            self.thr = self.thr[:-1]
        return out

    def finished(self) -> np.ndarray | None:
        """Boolean mask of the rows with no tokens left, or ``None`` when there are none."""
        left = self.s[:, self.LEFT]
        return left <= 0 if len(left) and min(left.tolist()) <= 0 else None


class Replica:
    """A serving replica. Requests enter through :meth:`submit`; :attr:`outstanding` counts those not yet
    finished; :attr:`kv_tokens` is the running batch's context (tokens) as of the last iteration."""

    PLAN_ITERATIONS = 256  # longest fast-forward plan (iterations); a longer quiet spell takes several

    def __init__(self, env: simpy.Environment, index: int, reqs: RequestTable, cost: CostModel, policy: Policy,
                 acceptance: AcceptanceModel, rng: np.random.Generator, log: IterationLog, *, max_batch: int,
                 kv_capacity_tokens: int, watermark: float = 0.01, mode: str = "continuous",
                 fast_forward: bool = False, attention: str = "paged", prefill: str = "sequential"):
        if mode not in ("continuous", "static"):
            raise ValueError(f"cluster.mode is {mode!r}; expected 'continuous' or 'static'")
        if attention not in ATTENTION:
            raise ValueError(f"cluster.attention is {attention!r}; expected one of {list(ATTENTION)}")
        if prefill not in PREFILL:
            raise ValueError(f"cluster.prefill is {prefill!r}; expected one of {list(PREFILL)}")
        self.env, self.index, self.reqs, self.cost = env, index, reqs, cost
        self.policy, self.acceptance, self.rng, self.log = policy, acceptance, rng, log
        self.max_batch = int(max_batch)
        self.capacity = int(kv_capacity_tokens)
        self.admit_limit = self.capacity * (1.0 - watermark)
        self.waiting: deque[int] = deque()
        self.batch = _Running(cost.max_gamma if reqs.shared_thr is None else None)
        self.outstanding = 0
        self.kv_tokens = 0
        self.queued_tokens = 0
        self.busy_s = 0.0
        self.n_iter = 0  # decode/verify iterations so far
        self.gamma_total = 0  # Σ γ over those iterations
        shared = reqs.shared_thr  # every request's thresholds, when they are all the same
        self.uniforms = UniformStream(rng, thresholds=None if shared is None else shared[:cost.max_gamma])
        self.fast_forward = bool(fast_forward)
        self.attention = attention
        self.padded = attention == "padded"  # steps are charged at the longest sequence's context
        self.batched_prefill = prefill == "batched"  # an iteration's admissions share one prefill forward
        self._ones = np.ones(self.max_batch, np.int64)  # for row sums of a plan's (k, batch) token counts
        self._prefill_times: dict[int, tuple[float, float]] = {}  # context -> (target, draft) prefill seconds
        self._plan: _Plan | None = None  # the fast-forward plan being waited on
        self._wake: simpy.Event | None = None
        self.process = env.process(self._run_static() if mode == "static" else self._run_continuous())

    # -- entry ----------------------------------------------------------------------------------------------

    def submit(self, rid: int) -> None:
        """Queue request ``rid`` (its prompt + output must fit in the KV cache; the cluster checks)."""
        plan = self._plan
        if plan is not None:
            plan.submitted.append(self.env.now)
            # It could join at the next iteration boundary only if there is a free slot and nobody queued
            # ahead of it (a queued head is blocked by the KV cache, which only fills up during a plan).
            if plan.cuttable and not self.waiting and len(self.batch) < self.max_batch:
                plan.cuttable = False
                self._cut(plan)
        self.waiting.append(rid)
        self.outstanding += 1
        self.queued_tokens += int(self.reqs.prompt[rid])
        self.reqs.replica[rid] = self.index
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def kv_in_use(self) -> int:
        """KV tokens held by the running batch as of the last iteration that ended before now."""
        plan = self._plan
        if plan is None:
            return self.kv_tokens
        done = bisect_left(plan.ends, self.env.now)  # iterations that ended before now
        return self.kv_tokens if done == 0 else plan.ctx0 + int(plan.tot[done - 1])

    def _sleep_until_work(self) -> simpy.Event:
        self._wake = self.env.event()
        return self._wake

    # -- shared pieces --------------------------------------------------------------------------------------

    def _prefill(self, rids: list[int], t0: float) -> tuple[float, bool]:
        """Prefill ``rids`` — one after another, or with ``prefill="batched"`` (and more than one) together in
        one forward per model — join them to the batch with their first token, stamp admission and
        first-token times; return the seconds taken and whether one of them is done with that token (its
        output is one token long; the sequences already running all have tokens left)."""
        r, cost, draft, known = self.reqs, self.cost, self.policy.uses_draft, self._prefill_times
        together = self.batched_prefill and len(rids) > 1
        total = 0.0
        rows, contexts = [], []
        done = False
        for rid in rids:  # per request: a few scalars (cheaper than numpy calls on a handful of rows)
            gen = int(r.generated[rid])
            ctx = int(r.prompt[rid]) + gen
            if together:
                contexts.append(ctx)  # priced together below
            else:
                times = known.get(ctx)
                if times is None:  # prompt lengths repeat: the cost model is asked once per length
                    times = known[ctx] = (cost.prefill(ctx, "target"), cost.prefill(ctx, "draft") if draft else 0.0)
                total += times[0]
                if draft:
                    total += times[1]
            left = int(r.output[rid]) - gen - 1
            done = done or left <= 0
            rows.append((rid, ctx + 1, left, ctx + 1, self.n_iter, self.gamma_total))
        if together:
            total = cost.prefill_batch(contexts, "target", self.attention)
            if draft:
                total += cost.prefill_batch(contexts, "draft", self.attention)
        first = t0 + total
        for rid in rids:
            if math.isnan(r.first_token[rid]):  # fresh, not resuming after a preemption
                r.admitted[rid] = t0
                r.first_token[rid] = first
            r.generated[rid] += 1
        self.batch.extend(np.array(rows, np.int64).reshape(len(rows), 6),
                          None if self.batch.thr is None else r.accept_thr[rids])
        return total, done

    def _speculate(self, gamma: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample one iteration for the batch: (accepted draft tokens, tokens gained) per request."""
        b = self.batch
        if gamma == 0:
            acc = np.zeros(len(b), np.int64)
        else:
            acc = self._peek_cum(1, gamma)[0] - 1
            self.uniforms.skip(len(b))
        return acc, np.minimum(acc + 1, b.s[:, _Running.LEFT])

    def _peek_cum(self, k: int, gamma: int) -> np.ndarray:
        """Tokens gained, 1 + accepted draft tokens, summed over the next k iterations at speculation length
        ``gamma`` ≥ 1: ``cum[j, i]`` for iterations 0..j (draw j·batch + i goes to sequence i), before the cap
        at the output length, without consuming the draws. A new array."""
        n, stream = len(self.batch), self.uniforms
        if stream.thresholds is not None:
            return np.add.accumulate(stream.peek_capped(k * n, gamma + 1).reshape(k, n), axis=0)
        u = stream.peek(k * n).reshape(k, n)
        cum = (u[:, :, None] < self.batch.thr[None, :, :gamma]).sum(axis=2)
        cum += 1
        np.add.accumulate(cum, axis=0, out=cum)  # (the ufunc itself: np.cumsum's wrapper costs more)
        return cum

    def _leave(self, rows: np.ndarray, when: float | None) -> np.ndarray:
        """Write back the state of ``rows`` (taken out of the batch); ``when`` = finish time (or ``None`` for a
        preemption). Returns the ids that left."""
        r = self.reqs
        for rid, ctx, left, ctx0, it0, g0 in rows.tolist():
            iterations = self.n_iter - it0
            r.generated[rid] = ctx - r.prompt[rid] + min(left, 0)  # (the tokens past the output cap dropped)
            r.accepted_sum[rid] += ctx - ctx0 - iterations  # each iteration gained 1 + accepted draft tokens
            r.iterations[rid] += iterations
            r.gamma_sum[rid] += self.gamma_total - g0
            if when is not None:
                r.finished[rid] = when
        if when is not None:
            self.outstanding -= len(rows)
        return rows[:, _Running.ID]

    def _advance(self, gamma: int, acc: np.ndarray, gain: np.ndarray) -> tuple[int, int]:
        """Apply one iteration to the batch: ``acc`` draft tokens accepted per sequence, ``gain`` = tokens
        gained after the output cap (min(1 + acc, LEFT)); return (tokens gained, draft tokens accepted)."""
        s = self.batch.s
        full = acc + 1
        s[:, _Running.CTX] += full
        s[:, _Running.LEFT] -= full
        self.n_iter += 1
        self.gamma_total += gamma
        return int(gain.sum()), int(acc.sum())

    # -- continuous batching -----------------------------------------------------------------------------

    def _admit(self) -> list[int]:
        r = self.reqs
        admitted: list[int] = []
        room = self.max_batch - len(self.batch)
        used = self.kv_tokens
        while self.waiting and len(admitted) < room:
            rid = self.waiting[0]
            need = int(r.prompt[rid] + r.generated[rid]) + 1
            if used + need > self.admit_limit and (len(self.batch) or admitted):
                break
            self.waiting.popleft()
            self.queued_tokens -= int(r.prompt[rid])
            admitted.append(rid)
            used += need
        return admitted

    def _pick_gamma(self, now: float) -> tuple[int, BatchView, int]:
        """Choose γ; preempt the newest requests until b·(γ+1) more tokens fit. Returns (γ, view, preempted)."""
        b, r = self.batch, self.reqs
        preempted = 0
        while True:
            ctxs = b.s[:, _Running.CTX].tolist()
            used, n = sum(ctxs), len(ctxs)
            view = BatchView(now, self.index, n, used / n, b.ids, max(ctxs) if self.padded else used / n)
            gamma = min(int(self.policy.choose(view)), self.cost.max_gamma)
            if gamma < 0:
                raise ValueError(f"policy {self.policy.name!r} chose γ = {gamma}; γ must be ≥ 0")
            if used + n * (gamma + 1) <= self.capacity:
                return gamma, view, preempted
            if n == 1:  # a lone request always fits at γ = 0 (prompt + output ≤ capacity was checked)
                return max(0, min(gamma, self.capacity - used - 1)), view, preempted
            victim = self._leave(b.take_last(), None)
            r.preemptions[victim] += 1
            self.waiting.appendleft(int(victim[0]))
            self.queued_tokens += int(r.prompt[victim[0]])
            preempted += 1

    def _run_continuous(self):
        env, cost, b = self.env, self.cost, self.batch
        while True:
            if not len(b) and not self.waiting:
                yield self._sleep_until_work()
            t0 = env.now
            admitted = self._admit()
            prefill_s = 0.0
            if admitted:
                prefill_s, done = self._prefill(admitted, t0)
                if done:
                    self._leave(b.take(b.finished()), t0 + prefill_s)
            if len(b) and self.fast_forward:
                plan = self._make_plan(t0, prefill_s, len(admitted))
                if plan is not None:
                    yield from self._follow(plan)
                    continue
            gamma = preempted = tokens = accepted = n = 0
            step_s = ctx_mean = 0.0
            ctx_max = 0.0 if self.padded else math.nan  # (tracked under padded attention only)
            if len(b):
                gamma, view, preempted = self._pick_gamma(t0 + prefill_s)
                n, ctx_mean = view.batch, view.context
                if self.padded:
                    ctx_max = view.step_context
                step_s = cost.iteration(n, gamma, view.step_context)
                acc, gain = self._speculate(gamma)
            duration = prefill_s + step_s
            yield env.timeout(duration)
            self.busy_s += duration
            if n:
                tokens, accepted = self._advance(gamma, acc, gain)
                self.policy.observe(view, gamma, acc)
                done = b.finished()
                if done is not None:
                    self._leave(b.take(done), env.now)
            self.kv_tokens = sum(b.s[:, _Running.CTX].tolist())
            self.log.add(t0, self.index, n, gamma, prefill_s, step_s, tokens + len(admitted), accepted,
                         len(admitted), preempted, len(self.waiting), self.kv_tokens, ctx_mean, ctx_max)

    # -- fast-forward (continuous batching) ------------------------------------------------------------

    def _make_plan(self, t0: float, prefill_s: float, admitted: int) -> _Plan | None:
        """Plan the iterations from ``t0`` up to the first that changes the batch or γ, or ``None`` when this
        iteration must be stepped alone (a learning policy, or a preemption is due)."""
        b = self.batch
        s, n = b.s, len(b)
        ctxs = s[:, _Running.CTX].tolist()
        ctx0, max0 = sum(ctxs), max(ctxs)
        steady = self.policy.steady_gamma(n, max0 if self.padded else ctx0 / n)  # the step's charged context
        if steady is None:
            return None
        gamma, limit = min(int(steady[0]), self.cost.max_gamma), steady[1]
        slack = self.capacity - ctx0 - n * (gamma + 1)  # KV tokens the batch may still grow by
        if gamma < 0 or slack < 0:
            return None  # _pick_gamma reports the bad γ / preempts
        left = s[:, _Running.LEFT]
        lmin = min(left.tolist())
        # Nobody can finish before iteration ceil(lmin / (γ+1)); the one with lmin tokens left is done by lmin.
        k = min(lmin, 2 * (-(-lmin // (gamma + 1))) + 4, self.PLAN_ITERATIONS)
        if gamma:
            cum = self._peek_cum(k, gamma)
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
        rows = min(first + 1, k)

        # Stop before an iteration that would need a preemption, see γ change (the charged context reaching
        # `limit`), or could admit the queued head (kept out at t0 counting requests that finished at
        # prefill; KV only grows during the plan, so checking the first boundary suffices).
        if rows > 1 and tot[rows - 2] > slack:
            rows = int(np.searchsorted(tot[:rows - 1], slack, side="right")) + 1
        maxes = None  # padded attention: the longest sequence at the start of each iteration (ascending)
        if self.padded:
            maxes = [max0] + ((cum[:rows - 1] + s[:, _Running.CTX]).max(axis=1).tolist() if gamma
                              else list(range(max0 + 1, max0 + rows)))
            if rows > 1 and limit != np.inf and maxes[rows - 1] >= limit:
                rows = bisect_left(maxes, limit)  # maxes[0] < limit: steady_gamma was asked at max0
        elif rows > 1 and limit != np.inf and (ctx0 + int(tot[rows - 2])) / n >= limit:
            rows = int(np.searchsorted((ctx0 + tot[:rows - 1]) / n, limit, side="left")) + 1
        if self.waiting and n < self.max_batch and rows > 1:
            head = self.waiting[0]
            if ctx0 + int(tot[0]) + int(self.reqs.prompt[head] + self.reqs.generated[head]) + 1 <= self.admit_limit:
                rows = 1
        if maxes is not None:
            del maxes[rows:]
        p = _Plan()
        if rows <= 12:  # up to about a dozen iterations Python floats beat numpy's per-call overheads
            contexts = [ctx0 / n] + [(ctx0 + g) / n for g in tot[:rows - 1].tolist()]
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
        p.queue0, p.submitted, p.cuttable = len(self.waiting), [], False
        p.rows = len(steps)
        return p

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
        its wake-up moves from the plan's end to that iteration's end. (A SimPy interrupt would do the same
        at the cost of an extra event and an exception.)"""
        rows = bisect_left(p.ends, self.env.now) + 1
        if rows == p.rows:
            return  # the plan ends with that iteration anyway
        old, p.rows = p.event, rows
        p.event = at_time(self.env, p.ends[rows - 1])
        # SimPy 4: a waiting process is its target event's callback; hand it over, and the old event, still
        # queued, fires with nobody waiting (what Process.interrupt does to it, too)
        p.event.callbacks, old.callbacks = old.callbacks, []
        self.process._target = p.event

    def _commit(self, p: _Plan, rows: int) -> None:
        """Apply the plan's first ``rows`` iterations: batch state, counters, busy time and the log."""
        b, n = self.batch, p.n
        s = b.s
        gained = p.cum[rows - 1] if p.gamma else rows  # before the output caps
        s[:, _Running.CTX] += gained
        s[:, _Running.LEFT] -= gained
        if p.gamma:
            self.uniforms.pos += rows * n  # the plan peeked k·n ≥ rows·n draws: they are in the buffer
        self.n_iter += rows
        self.gamma_total += rows * p.gamma
        steps = p.steps[:rows]
        busy = self.busy_s + (p.prefill_s + steps[0])
        for step in steps[1:]:  # in order, as one event per iteration would add them
            busy += step
        self.busy_s = busy
        cut = 0
        if p.finishes and rows == len(p.steps):  # a finishing plan ends with ≥ 1 done
            done = b.take(s[:, _Running.LEFT] <= 0)
            cut = -sum(done[:, _Running.LEFT].tolist())  # tokens the output caps cut off
            self._leave(done, self.env.now)
            self.kv_tokens = sum(b.s[:, _Running.CTX].tolist())
        else:
            self.kv_tokens = p.ctx0 + int(p.tot[rows - 1])
        queued_from = [j for j in (bisect_left(p.ends, when) for when in p.submitted) if j < rows] \
            if p.submitted else p.submitted
        maxes = p.maxes[:rows] if p.maxes is not None else None
        self.log.add_plan(self.index, n, p.gamma, p.prefill_s, p.admitted, p.queue0, p.ctx0, self.kv_tokens, cut,
                          p.times[:rows], steps, p.contexts[:rows], maxes, p.tot[:rows], queued_from)

    # -- static batching ---------------------------------------------------------------------------------

    def _run_static(self):
        env, r, cost, b = self.env, self.reqs, self.cost, self.batch
        while True:
            if not self.waiting:
                yield self._sleep_until_work()
            t0 = env.now
            batch: list[int] = []
            used = 0
            while self.waiting and len(batch) < self.max_batch:
                rid = self.waiting[0]
                need = int(r.prompt[rid] + r.output[rid])
                if used + need > self.capacity and batch:
                    break
                self.waiting.popleft()
                self.queued_tokens -= int(r.prompt[rid])
                batch.append(rid)
                used += need
            prefill_s, done = self._prefill(batch, t0)
            b0 = len(batch)
            pad_ctx = pad_max = 0  # context (sum, longest) of sequences that finished but still occupy a slot
            if done:
                rows = b.take(b.finished())
                pad_ctx += int(rows[:, _Running.CTX].sum())  # (none has run: LEFT = 0 at most)
                pad_max = max(rows[:, _Running.CTX].tolist())
                self._leave(rows, t0 + prefill_s)
            first = True
            while len(b) or first:
                ts = env.now
                ctx_mean = (int(b.s[:, _Running.CTX].sum()) + pad_ctx) / b0
                ctx_max = max(b.s[:, _Running.CTX].tolist() + [pad_max]) if self.padded else math.nan
                gamma, step_s, tokens, accepted = 0, 0.0, 0, 0
                if len(b):
                    view = BatchView(ts, self.index, b0, ctx_mean, b.ids, ctx_max if self.padded else ctx_mean)
                    gamma = min(int(self.policy.choose(view)), cost.max_gamma)
                    step_s = cost.iteration(b0, gamma, view.step_context)
                    acc, gain = self._speculate(gamma)
                pre = prefill_s if first else 0.0
                yield env.timeout(pre + step_s)
                self.busy_s += pre + step_s
                if len(b):
                    tokens, accepted = self._advance(gamma, acc, gain)
                    self.policy.observe(view, gamma, acc)
                    done = b.finished()
                    if done is not None:
                        rows = b.take(done)
                        kept = rows[:, _Running.CTX] + np.minimum(rows[:, _Running.LEFT], 0)  # (cut past the cap)
                        pad_ctx += int(kept.sum())
                        pad_max = max([pad_max] + kept.tolist())
                        self._leave(rows, env.now)
                self.kv_tokens = int(b.s[:, _Running.CTX].sum()) + pad_ctx
                self.log.add(t0 if first else ts, self.index, b0 if step_s else 0, gamma, pre, step_s,
                             tokens + (b0 if first else 0), accepted, b0 if first else 0, 0, len(self.waiting),
                             self.kv_tokens, ctx_mean, ctx_max)
                first = False
            self.kv_tokens = 0
