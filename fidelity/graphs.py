"""CUDA graphs of the engine's batched forwards, as vLLM and SGLang replay theirs.

A serving engine captures its decode / verify forward once per batch size and replays it, so that a step
costs its kernels, not the host's launches of them; the profiler times its points the same way
(:mod:`specbatch.profiler.graphs`). :class:`StepGraphs` does it for the engine's
:func:`specbatch.fidelity.engine.batched_forward`: one graph per (model, its slot cache, batch b, new tokens t,
span bucket, logits kept), replayed with the step's token ids and per-sequence cached lengths copied into static buffers.

Why a span bucket: the engine attends over the longest sequence's span with a per-sequence mask (padded
attention), and a graph fixes the span it attends over. A step whose span is ``need`` = max(lengths) + t runs
the graph of the smallest bucket ≥ ``need`` (:func:`span_buckets`: 64, 128, 192, 256, 384, 512, 768, ...: at
most 1.5× the span beyond 128, capped at the slots' length), the mask hiding the positions past each sequence's
own; vLLM's paged attention needs no bucket because its kernel reads the lengths inside the graph.

Correctness of a replay. Inside the graph everything derived from the inputs (positions, the mask, the
scatter index of the new K/V) is computed from the static ``tokens`` / ``lengths`` buffers, so a replay writes
each sequence's new K/V at its own positions and reads the right ones. Capture runs the forward eagerly
(twice, on a side stream) on the *current* step's inputs, so its K/V writes are the step's own and repeating
them is harmless: a graph may be captured in the middle of a run. The logits are the graph's own tensor,
rewritten by its next replay: :meth:`StepGraphs.forward` returns a copy.

Graphs are captured in :meth:`StepGraphs.capture_all` (the engine's untimed warm-up: every batch size, every
new-token count a run may use, every bucket, as vLLM captures at start-up) and otherwise on first use
(counted in :attr:`StepGraphs.late_captures`: such a step's time includes its capture). EAGLE and n-gram
steps and every prefill stay eager. On a CPU the same bookkeeping runs with
:func:`specbatch.profiler.graphs.replay_like_capture` (tests); the CUDA path has not run in a CPU-only session.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from specbatch.profiler.graphs import Capture

#: the smallest span bucket (positions)
FIRST_BUCKET = 64


def span_buckets(max_len: int) -> list[int]:
    """The spans graphs are captured at for slots of ``max_len`` positions: 64, 128, then alternately × 1.5 and
    × 4/3 (192, 256, 384, 512, 768, 1024, 1536, 2048, ...: each at most 1.5× the previous), the last = ``max_len``."""
    out, s = [], FIRST_BUCKET
    while s < max_len:
        out.append(s)
        if s < 2 * FIRST_BUCKET:
            s *= 2
        elif s & (s - 1) == 0:  # a power of two
            s = s * 3 // 2
        else:
            s = s // 3 * 4
    out.append(max_len)
    return out


def bucket_for(need: int, buckets: list[int]) -> int:
    """The smallest bucket ≥ ``need`` positions (``ValueError`` past the last: the slots overflow)."""
    for s in buckets:
        if s >= need:
            return s
    raise ValueError(f"KV slot overflow: {need} > {buckets[-1]} positions (raise max_len)")


class GraphKey(NamedTuple):
    """What a graph fixes: the model and its slot cache (by identity), the batch, the new tokens per sequence,
    the span attended over and whether all logits are kept."""

    model: int
    slots: int
    batch: int
    tokens: int
    span: int
    all_logits: bool

    @classmethod
    def of(cls, model, slots, batch: int, tokens: int, span: int, all_logits: bool) -> "GraphKey":
        return cls(id(model), id(slots), int(batch), int(tokens), int(span), bool(all_logits))


class _Graph:
    """One captured forward: its static inputs, and the replay that rewrites ``out['logits']``."""

    def __init__(self, forward, model, slots, tokens: torch.Tensor, lengths: torch.Tensor, span: int,
                 all_logits: bool, capture: Capture):
        self.tokens, self.lengths = tokens.clone(), lengths.clone()  # the static inputs, first the step's own
        self.out: dict = {}

        def run() -> None:
            self.out["logits"] = forward(model, slots, self.tokens, self.lengths, all_logits, span=span)

        with torch.inference_mode():
            self.replay = capture(run, lambda: None)


class StepGraphs:
    """The engine's graphs: ``forward(model, slots, tokens, lengths, all_logits)`` in place of
    :func:`~specbatch.fidelity.engine.batched_forward` (``forward_fn``, which must accept ``span=``)."""

    def __init__(self, forward_fn, capture: Capture, max_len: int, device):
        self.forward_fn, self.capture, self.device = forward_fn, capture, device
        self.buckets = span_buckets(max_len)
        self.graphs: dict[GraphKey, _Graph] = {}
        #: graphs captured during a timed run (first use), not in the warm-up
        self.late_captures = 0

    def forward(self, model, slots, tokens: torch.Tensor, lengths: torch.Tensor, all_logits: bool) -> torch.Tensor:
        b, t = tokens.shape
        span = bucket_for(int(lengths.max()) + t, self.buckets)
        key = GraphKey.of(model, slots, b, t, span, all_logits)
        g = self.graphs.get(key)
        if g is None:
            self.late_captures += 1
            g = self._capture(key, model, slots, tokens, lengths)
        else:
            g.tokens.copy_(tokens)
            g.lengths.copy_(lengths)
        g.replay()
        return g.out["logits"].clone()

    def _capture(self, key: GraphKey, model, slots, tokens, lengths) -> _Graph:
        g = self.graphs[key] = _Graph(self.forward_fn, model, slots, tokens, lengths, key.span, key.all_logits,
                                      self.capture)
        return g

    def capture_all(self, model, slots, batches, new_tokens, all_logits: bool) -> int:
        """Capture every (batch, new tokens, bucket) graph of ``model`` not captured yet, on inputs that write
        K/V only where no sequence lives yet (each row's cache holds ``span - t`` positions, the new tokens at
        the end of the bucket: slots are rewritten before they are read). Returns how many were captured."""
        done = 0
        for b in batches:
            for t in new_tokens:
                for span in self.buckets:
                    key = GraphKey.of(model, slots, b, t, span, all_logits)
                    if key in self.graphs or span < t:
                        continue
                    tokens = torch.zeros((b, t), dtype=torch.long, device=self.device)
                    lengths = torch.full((b,), span - t, dtype=torch.long, device=self.device)
                    self._capture(key, model, slots, tokens, lengths)
                    done += 1
        return done
