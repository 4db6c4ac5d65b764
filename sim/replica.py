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
   γ·T_draft(b, c̄) + T_verify(b, γ, c̄) (γ = 0: one target decode, no draft). Each request gains
   1 + accepted draft tokens, capped by the tokens it has left.
4. The iteration is **one** SimPy timeout of prefill + step seconds; its effects are committed when it
   ends. Requests that reach their output length finish then and leave.

Static batching (``mode="static"``, the seed paper's prototype): the replica takes up to ``max_batch``
waiting requests whose full lengths (prompt + output) fit in the KV cache, prefills them and decodes
until the longest finishes; every step is charged at the starting batch size (finished sequences stay
as padding). Requests arriving meanwhile wait for the next batch.

KV accounting is in tokens: one token of context occupies target KV plus draft KV (when a draft is used).
"""
from __future__ import annotations

from array import array
from collections import deque

import numpy as np
import simpy

from .acceptance import AcceptanceModel
from .cost_model import CostModel
from .policies import BatchView, Policy
from .requests import RequestTable

ITERATION_COLUMNS = ("start_s", "replica", "batch", "gamma", "prefill_s", "step_s", "tokens", "accepted", "admitted",
                     "preempted", "queue", "kv_tokens", "context")


class IterationLog:
    """Append-only, column-wise record of every iteration (compact ``array('d')`` columns)."""

    def __init__(self):
        self.cols = {c: array("d") for c in ITERATION_COLUMNS}
        self._appenders = [self.cols[c].append for c in ITERATION_COLUMNS]

    def add(self, *values: float) -> None:
        for f, v in zip(self._appenders, values):
            f(v)

    def __len__(self) -> int:
        return len(self.cols["start_s"])


class _Running:
    """The running batch as aligned arrays in admission order.

    ``s`` is an int64 matrix with one row per sequence and columns :data:`ID` (request id), :data:`CTX`
    (context = prompt + generated, tokens), :data:`LEFT` (tokens still to generate), :data:`ACC` (accepted
    draft tokens while in this batch), :data:`IT0` and :data:`G0` (the replica's iteration count and Σγ when
    the request joined: its iterations and Σγ are differences at leave time). ``thr`` holds each
    sequence's acceptance thresholds (see :meth:`AcceptanceModel.thresholds`).
    """

    ID, CTX, LEFT, ACC, IT0, G0 = range(6)
    __slots__ = ("s", "thr")

    def __init__(self, k: int):
        self.s = np.empty((0, 6), np.int64)
        self.thr = np.empty((0, k))

    def __len__(self) -> int:
        return len(self.s)

    @property
    def ids(self) -> np.ndarray:
        return self.s[:, self.ID]

    def extend(self, rows: np.ndarray, thr: np.ndarray) -> None:
        self.s = np.concatenate([self.s, rows])
        self.thr = np.concatenate([self.thr, thr])

    def take(self, sel) -> np.ndarray:
        """Remove the rows selected by ``sel`` (a boolean mask or a slice) and return them."""
        out = self.s[sel]
        if isinstance(sel, slice):
            keep = np.ones(len(self.s), bool)
            keep[sel] = False
        else:
            keep = ~sel
        self.s, self.thr = self.s[keep], self.thr[keep]
        return out


class Replica:
    """A serving replica. Requests enter through :meth:`submit`; :attr:`outstanding` counts those not yet
    finished; :attr:`kv_tokens` is the running batch's context (tokens) as of the last iteration."""

    _UNIFORM_BLOCK = 1 << 16

    def __init__(self, env: simpy.Environment, index: int, reqs: RequestTable, cost: CostModel, policy: Policy,
                 acceptance: AcceptanceModel, rng: np.random.Generator, log: IterationLog, *, max_batch: int,
                 kv_capacity_tokens: int, watermark: float = 0.01, mode: str = "continuous"):
        if mode not in ("continuous", "static"):
            raise ValueError(f"cluster.mode is {mode!r}; expected 'continuous' or 'static'")
        self.env, self.index, self.reqs, self.cost = env, index, reqs, cost
        self.policy, self.acceptance, self.rng, self.log = policy, acceptance, rng, log
        self.max_batch = int(max_batch)
        self.capacity = int(kv_capacity_tokens)
        self.admit_limit = self.capacity * (1.0 - watermark)
        self.waiting: deque[int] = deque()
        self.batch = _Running(cost.max_gamma)
        self.outstanding = 0
        self.kv_tokens = 0
        self.queued_tokens = 0
        self.busy_s = 0.0
        self.n_iter = 0  # decode/verify iterations so far
        self.gamma_total = 0  # Σ γ over those iterations
        self._u = np.empty(0)
        self._upos = 0
        self._wake: simpy.Event | None = None
        self.process = env.process(self._run_static() if mode == "static" else self._run_continuous())

    # -- entry ----------------------------------------------------------------------------------------------

    def submit(self, rid: int) -> None:
        """Queue request ``rid`` (its prompt + output must fit in the KV cache; the cluster checks)."""
        self.waiting.append(rid)
        self.outstanding += 1
        self.queued_tokens += int(self.reqs.prompt[rid])
        self.reqs.replica[rid] = self.index
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _sleep_until_work(self) -> simpy.Event:
        self._wake = self.env.event()
        return self._wake

    # -- shared pieces --------------------------------------------------------------------------------------

    def _uniforms(self, n: int) -> np.ndarray:
        """``n`` uniforms from the replica's generator, drawn in blocks (same seed → same stream)."""
        if self._upos + n > len(self._u):
            self._u = self.rng.random(max(self._UNIFORM_BLOCK, n))
            self._upos = 0
        u = self._u[self._upos:self._upos + n]
        self._upos += n
        return u

    def _prefill(self, rids: list[int], t0: float) -> float:
        """Prefill ``rids`` one after another, join them to the batch with their first token, stamp
        admission and first-token times; return the seconds taken."""
        r, cost, draft = self.reqs, self.cost, self.policy.uses_draft
        ids = np.asarray(rids, np.int64)
        total = 0.0
        for ctx in (r.prompt[ids] + r.generated[ids]).tolist():
            total += cost.prefill(ctx, "target")
            if draft:
                total += cost.prefill(ctx, "draft")
        fresh = ids[np.isnan(r.first_token[ids])]
        r.admitted[fresh] = t0
        r.first_token[fresh] = t0 + total
        gen = r.generated[ids] + 1
        r.generated[ids] = gen
        rows = np.empty((len(ids), 6), np.int64)
        rows[:, _Running.ID] = ids
        rows[:, _Running.CTX] = r.prompt[ids] + gen
        rows[:, _Running.LEFT] = r.output[ids] - gen
        rows[:, _Running.ACC] = 0
        rows[:, _Running.IT0] = self.n_iter
        rows[:, _Running.G0] = self.gamma_total
        self.batch.extend(rows, r.accept_thr[ids])
        return total

    def _speculate(self, gamma: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample one iteration for the batch: (accepted draft tokens, tokens gained) per request."""
        b = self.batch
        if gamma == 0:
            acc = np.zeros(len(b), np.int64)
        else:
            acc = (self._uniforms(len(b))[:, None] < b.thr[:, :gamma]).sum(axis=1)
        return acc, np.minimum(acc + 1, b.s[:, _Running.LEFT])

    def _leave(self, sel, when: float | None) -> np.ndarray:
        """Remove rows ``sel`` from the batch and write their state back; ``when`` = finish time (or
        ``None`` for a preemption). Returns the ids that left."""
        rows = self.batch.take(sel)
        r, ids = self.reqs, rows[:, _Running.ID]
        r.generated[ids] = rows[:, _Running.CTX] - r.prompt[ids]
        r.accepted_sum[ids] += rows[:, _Running.ACC]
        r.iterations[ids] += self.n_iter - rows[:, _Running.IT0]
        r.gamma_sum[ids] += self.gamma_total - rows[:, _Running.G0]
        if when is not None:
            r.finished[ids] = when
            self.outstanding -= len(ids)
        return ids

    def _advance(self, gamma: int, acc: np.ndarray, gain: np.ndarray) -> tuple[int, int]:
        """Apply one iteration's gains to the batch; return (tokens gained, draft tokens accepted)."""
        s = self.batch.s
        s[:, _Running.CTX] += gain
        s[:, _Running.LEFT] -= gain
        s[:, _Running.ACC] += acc
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
            used = int(b.s[:, _Running.CTX].sum())
            n = len(b)
            view = BatchView(now, self.index, n, used / n, b.ids)
            gamma = min(int(self.policy.choose(view)), self.cost.max_gamma)
            if gamma < 0:
                raise ValueError(f"policy {self.policy.name!r} chose γ = {gamma}; γ must be ≥ 0")
            if used + n * (gamma + 1) <= self.capacity:
                return gamma, view, preempted
            if n == 1:  # a lone request always fits at γ = 0 (prompt + output ≤ capacity was checked)
                return max(0, min(gamma, self.capacity - used - 1)), view, preempted
            victim = self._leave(slice(n - 1, n), None)
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
                prefill_s = self._prefill(admitted, t0)
                first_done = b.s[:, _Running.LEFT] <= 0
                if first_done.any():
                    self._leave(first_done, t0 + prefill_s)
            gamma = preempted = tokens = accepted = n = 0
            step_s = ctx_mean = 0.0
            if len(b):
                gamma, view, preempted = self._pick_gamma(t0 + prefill_s)
                n, ctx_mean = view.batch, view.context
                step_s = cost.iteration(n, gamma, ctx_mean)
                acc, gain = self._speculate(gamma)
            duration = prefill_s + step_s
            yield env.timeout(duration)
            self.busy_s += duration
            if n:
                tokens, accepted = self._advance(gamma, acc, gain)
                self.policy.observe(view, gamma, acc)
                done = b.s[:, _Running.LEFT] <= 0
                if done.any():
                    self._leave(done, env.now)
            self.kv_tokens = int(b.s[:, _Running.CTX].sum())
            self.log.add(t0, self.index, n, gamma, prefill_s, step_s, tokens + len(admitted), accepted,
                         len(admitted), preempted, len(self.waiting), self.kv_tokens, ctx_mean)

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
            prefill_s = self._prefill(batch, t0)
            b0 = len(batch)
            pad_ctx = 0  # context of sequences that finished but still occupy their batch slot
            done = b.s[:, _Running.LEFT] <= 0
            if done.any():
                pad_ctx += int(b.s[done, _Running.CTX].sum())
                self._leave(done, t0 + prefill_s)
            first = True
            while len(b) or first:
                ts = env.now
                ctx_mean = (int(b.s[:, _Running.CTX].sum()) + pad_ctx) / b0
                gamma, step_s, tokens, accepted = 0, 0.0, 0, 0
                if len(b):
                    view = BatchView(ts, self.index, b0, ctx_mean, b.ids)
                    gamma = min(int(self.policy.choose(view)), cost.max_gamma)
                    step_s = cost.iteration(b0, gamma, ctx_mean)
                    acc, gain = self._speculate(gamma)
                pre = prefill_s if first else 0.0
                yield env.timeout(pre + step_s)
                self.busy_s += pre + step_s
                if len(b):
                    tokens, accepted = self._advance(gamma, acc, gain)
                    self.policy.observe(view, gamma, acc)
                    done = b.s[:, _Running.LEFT] <= 0
                    if done.any():
                        pad_ctx += int(b.s[done, _Running.CTX].sum())
                        self._leave(done, env.now)
                self.kv_tokens = int(b.s[:, _Running.CTX].sum()) + pad_ctx
                self.log.add(t0 if first else ts, self.index, b0 if step_s else 0, gamma, pre, step_s,
                             tokens + (b0 if first else 0), accepted, b0 if first else 0, 0, len(self.waiting),
                             self.kv_tokens, ctx_mean)
                first = False
            self.kv_tokens = 0
