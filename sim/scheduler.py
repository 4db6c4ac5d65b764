"""The iteration-level scheduler of one serving replica, without a clock.

:class:`Scheduler` holds a replica's queue, running batch, KV accounting and counters, and applies the
scheduling rules; its caller owns time. The SimPy replica (:mod:`specbatch.sim.replica`) charges each
iteration from the cost model and waits for it on the simulated clock; the real engine
(:mod:`specbatch.fidelity.engine`) runs the models and reads a real clock. Both drive one iteration as:

1. :meth:`Scheduler.admit` (continuous batching) or :meth:`Scheduler.admit_whole` (static batching) takes
   waiting requests first-come-first-served;
2. the caller prefills them, then :meth:`Scheduler.join` adds them to the running batch with their first
   token, and :meth:`Scheduler.finish` lets go those whose output was that one token;
3. :meth:`Scheduler.choose_gamma` asks the policy for γ (a :class:`BatchView`), preempting the newest
   requests while the KV cache cannot hold the step (continuous batching);
4. :meth:`Scheduler.speculate` draws the accepted draft tokens (or the caller takes them from the models),
   the caller runs or charges the step, and :meth:`Scheduler.advance` commits the tokens;
5. :meth:`Scheduler.finish` lets go the requests that reached their output length, and
   :meth:`Scheduler.record` appends the iteration's row to the :class:`IterationLog`.

Admission (continuous): while the batch has fewer than ``max_batch`` sequences and the KV cache would hold
the request's context (prompt + tokens generated so far, + 1) below ``(1 - watermark)`` of its capacity; an
empty batch admits its first request regardless of the watermark. Admission (static): up to ``max_batch``
requests whose full lengths (prompt + output) fit in the capacity together. Preemption: the most recently
admitted request leaves (its KV freed), goes back to the head of the queue and is recomputed when
re-admitted, as vLLM does. KV is counted in tokens of context.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from .iterations import IterationLog, IterationRow
from .policies import BatchView, Policy
from .requests import RequestTable

# cluster.attention -> the iteration column holding the context a step is charged at: the batch's mean
# context, or its longest sequence's
STEP_CONTEXT = {"paged": "context", "padded": "context_max"}
ATTENTION = tuple(STEP_CONTEXT)
PREFILL = ("sequential", "batched", "chunked")  # cluster.prefill: an iteration's admitted prompts one by one,
#   together, or in chunks mixed with the verify step under a token budget (Scheduler.schedule_chunks)


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


class RunningBatch:
    """The running batch as aligned arrays in admission order.

    ``s`` is an int64 matrix with one row per sequence and columns :data:`ID` (request id), :data:`CTX`
    (context = prompt + generated, tokens), :data:`LEFT` (tokens still to generate), :data:`CTX0`, :data:`IT0`
    and :data:`G0` (the context, the scheduler's iteration count and its Σγ when the request joined: what
    it gained, its iterations and Σγ in this batch are differences at leave time). Iterations add their
    gains before the output cap (1 + accepted draft tokens), so a sequence that finishes leaves with
    ``LEFT`` ≤ 0: ``-LEFT`` tokens past its output length, which the cap cuts off. ``thr`` holds each
    sequence's acceptance thresholds (see :meth:`AcceptanceModel.thresholds`), or is ``None`` when every
    request shares one row (the scheduler's uniform stream then holds the accepted counts).

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

    @property
    def contexts(self) -> np.ndarray:
        """Each sequence's context (tokens); a view."""
        return self.s[:, self.CTX]

    @property
    def left(self) -> np.ndarray:
        """Each sequence's tokens still to generate (≤ 0 once finished); a view."""
        return self.s[:, self.LEFT]

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


class Scheduler:
    """One replica's scheduling state and rules (module docstring); no clock, no cost model.

    Public state, read by the drivers: ``waiting`` (queued request ids, head first), ``batch``
    (:class:`RunningBatch`), ``outstanding`` (requests submitted and not finished), ``queued_tokens``
    (prompt tokens of the queue), ``kv_tokens`` (the batch's context as of the last recorded iteration;
    the driver sets it), ``n_iter`` and ``gamma_total`` (decode/verify iterations so far and their Σγ),
    ``uniforms`` (the acceptance draws), ``capacity`` and ``admit_limit`` (KV tokens)."""

    def __init__(self, index: int, reqs: RequestTable, policy: Policy, rng: np.random.Generator, log: IterationLog,
                 *, max_batch: int, kv_capacity_tokens: int, max_gamma: int, watermark: float = 0.01,
                 attention: str = "paged"):
        if attention not in ATTENTION:
            raise ValueError(f"cluster.attention is {attention!r}; expected one of {list(ATTENTION)}")
        self.index, self.reqs, self.policy, self.log = index, reqs, policy, log
        self.max_batch, self.max_gamma = int(max_batch), int(max_gamma)
        self.capacity = int(kv_capacity_tokens)
        self.admit_limit = self.capacity * (1.0 - watermark)
        self.padded = attention == "padded"  # steps are charged at the longest sequence's context
        self.waiting: deque[int] = deque()
        self.batch = RunningBatch(max_gamma if reqs.shared_thr is None else None)
        shared = reqs.shared_thr  # every request's thresholds, when they are all the same
        self.uniforms = UniformStream(rng, thresholds=None if shared is None else shared[:max_gamma])
        self.outstanding = self.queued_tokens = self.kv_tokens = 0
        self.n_iter = self.gamma_total = 0
        # chunked prefill (enable_chunked): off unless a token budget is set
        self.token_budget: int | None = None
        self.chunk_cap: int | None = None
        self.prefilling: list[list] = []  # [rid, tokens prefilled, tokens to prefill], admission order
        self.prefill_held = self.prefill_left = self.prefill_reserved = 0

    # -- the queue --------------------------------------------------------------------------------------

    def submit(self, rid: int) -> None:
        """Queue request ``rid`` (its prompt + output must fit in the KV cache; the caller checks)."""
        self.waiting.append(rid)
        self.outstanding += 1
        self.queued_tokens += int(self.reqs.prompt[rid])
        self.reqs.replica[rid] = self.index

    def head_need(self) -> int | None:
        """KV tokens admitting the head of the queue takes (its context + 1), or ``None`` when none waits."""
        if not self.waiting:
            return None
        head = self.waiting[0]
        return int(self.reqs.prompt[head] + self.reqs.generated[head]) + 1

    def admit(self) -> list[int]:
        """Take the requests continuous batching admits now (FCFS, ``max_batch``, the KV watermark)."""
        r, admitted = self.reqs, []
        running = len(self.batch.s)  # (the array's length: cheaper than RunningBatch.__len__ on the hot path)
        room = self.max_batch - running
        used = self.kv_tokens
        while self.waiting and len(admitted) < room:
            rid = self.waiting[0]
            need = int(r.prompt[rid] + r.generated[rid]) + 1
            if used + need > self.admit_limit and (running or admitted):
                break
            self.waiting.popleft()
            self.queued_tokens -= int(r.prompt[rid])
            admitted.append(rid)
            used += need
        return admitted

    def admit_whole(self) -> list[int]:
        """Take the requests static batching runs together: FCFS up to ``max_batch`` whose prompt + output
        fit in the KV capacity together (the first one always)."""
        r, batch, used = self.reqs, [], 0
        while self.waiting and len(batch) < self.max_batch:
            rid = self.waiting[0]
            need = int(r.prompt[rid] + r.output[rid])
            if used + need > self.capacity and batch:
                break
            self.waiting.popleft()
            self.queued_tokens -= int(r.prompt[rid])
            batch.append(rid)
            used += need
        return batch

    # -- the running batch ------------------------------------------------------------------------------

    def join(self, rids: list[int], admitted_at: float, first_token_at: float) -> bool:
        """Add the prefilled requests ``rids`` to the batch with the token their prefill produced; a fresh
        request (not resuming after a preemption) is stamped admitted at ``admitted_at`` with its first token
        at ``first_token_at``. Returns whether one of them is done with that token (its output is one token
        long; the sequences already running all have tokens left)."""
        r, rows, done = self.reqs, [], False
        for rid in rids:  # per request: a few scalars (cheaper than numpy calls on a handful of rows)
            gen = int(r.generated[rid])
            ctx = int(r.prompt[rid]) + gen
            left = int(r.output[rid]) - gen - 1
            done = done or left <= 0
            rows.append((rid, ctx + 1, left, ctx + 1, self.n_iter, self.gamma_total))
            if math.isnan(r.first_token[rid]):
                r.admitted[rid] = admitted_at
                r.first_token[rid] = first_token_at
            r.generated[rid] += 1
        self.batch.extend(np.array(rows, np.int64).reshape(len(rows), 6),
                          None if self.batch.thr is None else r.accept_thr[rids])
        return done

    def view(self, now: float) -> BatchView:
        """The running batch as the policy sees it at ``now`` (the batch must not be empty)."""
        return self._view(now)[0]

    def _view(self, now: float) -> tuple[BatchView, int]:
        """:meth:`view` and the batch's KV tokens (Σ context)."""
        ctxs = self.batch.s[:, RunningBatch.CTX].tolist()
        used, n = sum(ctxs), len(ctxs)
        return BatchView(now, self.index, n, used / n, self.batch.ids, max(ctxs) if self.padded else used / n,
                         self.queued_tokens + self.prefill_left), used

    def gamma_for(self, view: BatchView) -> int:
        """The policy's γ for ``view``, capped at ``max_gamma``."""
        gamma = min(int(self.policy.choose(view)), self.max_gamma)
        if gamma < 0:
            raise ValueError(f"policy {self.policy.name!r} chose γ = {gamma}; γ must be ≥ 0")
        return gamma

    def choose_gamma(self, now: float) -> tuple[int, BatchView, list[int]]:
        """γ for the running batch at ``now``, preempting the newest requests until b·(γ+1) more tokens fit
        in the KV cache (a lone request that still does not fit runs with a smaller γ). Returns (γ, the view
        the policy chose it for, the ids preempted, newest first)."""
        preempted: list[int] = []
        while True:
            view, used = self._view(now)
            gamma = self.gamma_for(view)
            n = view.batch
            if used + n * (gamma + 1) <= self.capacity:
                return gamma, view, preempted
            if n == 1:  # a lone request always fits at γ = 0 (prompt + output ≤ capacity was checked)
                return max(0, min(gamma, self.capacity - used - 1)), view, preempted
            victim = int(self.leave(self.batch.take_last(), None)[0])
            self.reqs.preemptions[victim] += 1
            self.waiting.appendleft(victim)
            self.queued_tokens += int(self.reqs.prompt[victim])
            preempted.append(victim)

    def peek_cum(self, k: int, gamma: int) -> np.ndarray:
        """Tokens gained, 1 + accepted draft tokens, summed over the next k iterations at speculation length
        ``gamma`` ≥ 1: ``cum[j, i]`` for iterations 0..j (draw j·batch + i goes to sequence i), before the cap
        at the output length, without consuming the draws. A new array."""
        n, stream = len(self.batch.s), self.uniforms
        if stream.thresholds is not None:
            return np.add.accumulate(stream.peek_capped(k * n, gamma + 1).reshape(k, n), axis=0)
        u = stream.peek(k * n).reshape(k, n)
        cum = (u[:, :, None] < self.batch.thr[None, :, :gamma]).sum(axis=2)
        cum += 1
        np.add.accumulate(cum, axis=0, out=cum)  # (the ufunc itself: np.cumsum's wrapper costs more)
        return cum

    def peek_matched(self, k: int, match_rate: float) -> list[int]:
        """Sequences whose proposer matches in each of the next k iterations under a partial proposer (an
        n-gram drafter, :mod:`specbatch.sim.drafters`): draw j·batch + i matches when it is below
        ``match_rate``, the same draw that :meth:`peek_cum` reads for its acceptance. Not consumed."""
        n = len(self.batch)
        return (self.uniforms.peek(k * n).reshape(k, n) < match_rate).sum(axis=1).tolist()

    def peek_matched_rows(self, match_rate: float) -> np.ndarray:
        """Per running sequence (batch order), whether its proposer matches in the next iteration: the draw
        :meth:`peek_matched` counts (and :meth:`speculate` then reads for its acceptance). Not consumed."""
        return self.uniforms.peek(len(self.batch)) < match_rate

    def speculate(self, gamma: int) -> np.ndarray:
        """Draw one iteration's accepted draft tokens per sequence at speculation length ``gamma``."""
        if gamma == 0:
            return np.zeros(len(self.batch), np.int64)
        acc = self.peek_cum(1, gamma)[0] - 1
        self.uniforms.skip(len(self.batch))
        return acc

    def advance(self, view: BatchView, gamma: int, acc: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Commit one iteration at ``gamma`` in which each sequence accepted ``acc`` draft tokens, and show
        it to the policy. Returns the tokens each sequence gained after its output cap (min(1 + acc, tokens
        left)), their sum and the draft tokens accepted."""
        s = self.batch.s
        full = acc + 1
        gain = np.minimum(full, s[:, RunningBatch.LEFT])
        s[:, RunningBatch.CTX] += full
        s[:, RunningBatch.LEFT] -= full
        self.n_iter += 1
        self.gamma_total += gamma
        self.policy.observe(view, gamma, acc)
        return gain, int(gain.sum()), int(acc.sum())

    def advance_many(self, iterations: int, gamma: int, gained) -> None:
        """Commit ``iterations`` iterations at ``gamma`` that consumed the next ``iterations``·batch draws
        (none at γ = 0), in which each sequence gained ``gained`` tokens before its output cap (an array,
        or one number for all). The policy must not learn from iterations (:meth:`Policy.steady_gamma`)."""
        s = self.batch.s
        s[:, RunningBatch.CTX] += gained
        s[:, RunningBatch.LEFT] -= gained
        if gamma:  # UniformStream.skip, without its two calls when the draws are in the buffer (a plan peeked them)
            stream, used = self.uniforms, iterations * len(s)
            if stream.pos + used <= len(stream.buf):
                stream.pos += used
            else:
                stream.skip(used)
        self.n_iter += iterations
        self.gamma_total += iterations * gamma

    def finish(self, when: float) -> np.ndarray | None:
        """Let go the sequences with no tokens left, finished at ``when``; their ids, or ``None`` if none."""
        done = self.batch.finished()
        return None if done is None else self.leave(self.batch.take(done), when)

    def finish_known(self, when: float) -> int:
        """:meth:`finish` for a caller that knows at least one sequence has no tokens left (a fast-forward plan
        that ends with a finish): let them go, finished at ``when``, and return the tokens their output caps
        cut off (Σ −LEFT over them)."""
        batch = self.batch
        rows = batch.take(batch.s[:, RunningBatch.LEFT] <= 0)
        self.leave(rows, when)
        return -sum(rows[:, RunningBatch.LEFT].tolist())

    def leave(self, rows: np.ndarray, when: float | None) -> np.ndarray:
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
        return rows[:, RunningBatch.ID]

    def batch_tokens(self) -> int:
        """KV tokens the running batch holds (Σ context)."""
        return sum(self.batch.s[:, RunningBatch.CTX].tolist())

    # -- chunked prefill (cluster.prefill=chunked) -----------------------------------------------------------
    #
    # vLLM V1's and SGLang's default schedule. Each iteration the running batch is scheduled first: its
    # b·(γ+1) verify tokens come out of the token budget (γ capped at budget // b − 1). The budget left goes
    # to prompt chunks first come, first served: first the requests being prefilled (admission order), then
    # the queue's head while the batch (running + being prefilled) has fewer than max_batch sequences and the
    # KV cache would hold the request's whole context (+ 1) below the watermark, counting the running batch's
    # KV and the whole contexts of the requests being prefilled (the rule of :meth:`admit`). A request gets
    # min(tokens left to prefill, long_prefill_token_threshold, budget left, KV room) tokens; it holds KV for
    # the tokens prefilled so far; at the end of the iteration of its last chunk it gets its token (its first,
    # the TTFT, unless it is resuming) and joins the running batch for the next iteration. Preemption: when the
    # KV cache cannot hold the verify step, the newest request being prefilled goes back to the head of the
    # queue (its KV freed, its chunks recomputed), then the running batch's newest as in :meth:`choose_gamma`.

    def enable_chunked(self, token_budget: int, chunk_cap: int | None) -> None:
        """Schedule prompts in chunks under ``token_budget`` tokens per forward, at most ``chunk_cap`` tokens per
        request per forward (``None``: no cap)."""
        self.token_budget, self.chunk_cap = int(token_budget), None if chunk_cap is None else int(chunk_cap)

    def prefill_waiting(self) -> int:
        """Prompt tokens still to prefill: the queue's prompts plus what the requests being prefilled have left."""
        return self.queued_tokens + self.prefill_left

    def head_admissible(self) -> bool:
        """Whether chunked admission would take the queue's head now (slots and KV; the budget aside)."""
        if not self.waiting or len(self.batch) + len(self.prefilling) >= self.max_batch:
            return False
        if not len(self.batch) and not self.prefilling:
            return True
        # (kv_tokens = the batch's KV + prefill_held, as of the last iteration, which is now)
        return self.kv_tokens - self.prefill_held + self.prefill_reserved + self.head_need() <= self.admit_limit

    def view_chunked(self, now: float) -> tuple[BatchView, int]:
        """:meth:`_view` with the prefill waiting and the token budget filled in."""
        view, used = self._view(now)
        view.token_budget = self.token_budget
        return view, used

    def choose_gamma_chunked(self, now: float) -> tuple[int, BatchView, list[int]]:
        """:meth:`choose_gamma` under chunked prefill: γ capped at token_budget // b − 1, and the KV tokens held
        by requests being prefilled counted; the newest of those is preempted before any running sequence."""
        preempted: list[int] = []
        while True:
            view, used = self.view_chunked(now)
            n = view.batch
            gamma = min(self.gamma_for(view), self.token_budget // n - 1)
            if used + self.prefill_held + n * (gamma + 1) <= self.capacity:
                return gamma, view, preempted
            if self.prefilling:
                victim = self.drop_prefilling()
            elif n == 1:
                return max(0, min(gamma, self.capacity - used - 1)), view, preempted
            else:
                victim = int(self.leave(self.batch.take_last(), None)[0])
                self.waiting.appendleft(victim)
                self.queued_tokens += int(self.reqs.prompt[victim])
            self.reqs.preemptions[victim] += 1
            preempted.append(victim)

    def drop_prefilling(self) -> int:
        """Preempt the newest request being prefilled: its KV freed, back to the head of the queue."""
        rid, done, total = self.prefilling.pop()
        self.prefill_held -= done
        self.prefill_left -= total - done
        self.prefill_reserved -= total + 1
        self.waiting.appendleft(rid)
        self.queued_tokens += int(self.reqs.prompt[rid])
        return rid

    def schedule_chunks(self, verify_tokens: int, now: float) -> tuple[list[tuple[int, int, int]], int]:
        """The prompt chunks of this iteration, after the running batch's ``verify_tokens`` (b·(γ+1), which
        also grow its KV): [(rid, tokens already prefilled, chunk tokens), ...] in order, and how many requests
        were admitted (taken from the queue; a fresh one is stamped admitted at ``now``)."""
        left = self.token_budget - verify_tokens
        if left <= 0:
            return [], 0
        cap = self.chunk_cap
        running = self.batch_tokens()
        room = self.capacity - running - verify_tokens - self.prefill_held  # KV tokens free for chunks
        chunks: list[tuple[int, int, int]] = []
        for rid, done, total in self.prefilling:
            if left <= 0:
                return chunks, 0
            k = min(total - done, left, room)
            if cap is not None:
                k = min(k, cap)
            if done + k == total and k == room:  # the token its last chunk produces needs a slot too
                k -= 1
            if k <= 0:
                continue
            chunks.append((rid, done, k))
            left -= k
            room -= k + (done + k == total)
        r, admitted = self.reqs, 0
        while self.waiting and left > 0 and len(self.batch) + len(self.prefilling) < self.max_batch:
            rid = self.waiting[0]
            total = int(r.prompt[rid] + r.generated[rid])
            alone = not len(self.batch) and not self.prefilling
            if running + self.prefill_reserved + total + 1 > self.admit_limit and not alone:
                break
            k = min(total, left, room)
            if cap is not None:
                k = min(k, cap)
            if k == total and k == room:
                k -= 1
            if k <= 0:
                break
            self.waiting.popleft()
            self.queued_tokens -= int(r.prompt[rid])
            self.prefilling.append([rid, 0, total])
            self.prefill_left += total
            self.prefill_reserved += total + 1
            if math.isnan(r.first_token[rid]):
                r.admitted[rid] = now
            admitted += 1
            chunks.append((rid, 0, k))
            left -= k
            room -= k + (k == total)
        return chunks, admitted

    def commit_chunks(self, chunks: list[tuple[int, int, int]], now: float) -> tuple[int, bool]:
        """Apply this iteration's ``chunks`` (ended at ``now``): progress and held KV; the requests whose
        prompt is done join the running batch with the token the last chunk produced. Returns (how many
        joined, whether one of them is done with that token)."""
        if not chunks:
            return 0, False
        joined = []
        by_rid = {rid: k for rid, _, k in chunks}
        keep = []
        held = left = reserved = 0
        for entry in self.prefilling:
            k = by_rid.get(entry[0], 0)
            entry[1] += k
            left += k
            if entry[1] == entry[2]:
                joined.append(entry[0])
                held += k - entry[2]
                reserved += entry[2] + 1
            else:
                held += k
                keep.append(entry)
        self.prefilling = keep
        self.prefill_held += held
        self.prefill_left -= left
        self.prefill_reserved -= reserved
        if not joined:
            return 0, False
        r = self.reqs
        stamped = r.admitted[joined].copy()  # admitted at their first chunk (schedule_chunks), not now
        done = self.join(joined, now, now)
        r.admitted[joined] = stamped
        return len(joined), done

    # -- the record -------------------------------------------------------------------------------------

    def record(self, start: float, *, batch: int, gamma: int, prefill_s: float, step_s: float, tokens: int,
               accepted: int, admitted: int, preempted: int, context: float, context_max: float) -> None:
        """Append one iteration's row to the log; the replica, queue length and KV tokens are this scheduler's
        (:data:`specbatch.sim.iterations.ITERATION_COLUMNS` describes the fields)."""
        self.log.add(IterationRow(start, self.index, batch, gamma, prefill_s, step_s, tokens, accepted, admitted,
                                  preempted, len(self.waiting), self.kv_tokens, context, context_max))
