"""CUDA graphs of the timed decode and verify forwards, as serving engines replay them.

vLLM and SGLang capture the model forward of a decode / verify step once per batch size into a CUDA graph and
replay it, so a step costs its kernels, not the host's launches of them. :class:`GraphedModel` does the same for
one profile point: it stands in for the model in :func:`specbatch.profiler.models.decode_one_token` and
:func:`~specbatch.profiler.models.verify` (which call ``model(cache=..., input_ids=..., position_ids=...)``)
and replays one captured forward; sampling, the acceptance test and the rollback stay eager, as in the engines
(whose samplers run outside the graph).

What a graph fixes, and how the point respects it. A replay runs the captured kernels on the captured
addresses with the captured shapes, and no Python:

* inputs: the forward reads static ``input_ids`` / ``position_ids`` tensors; each call copies its inputs in;
* the pre-allocated cache (:class:`~specbatch.profiler.models.PreallocLayer`): ``update`` writes positions
  ``length .. length + tokens`` of fixed buffers and attention reads the first ``length + tokens``; both are
  Python-side slices taken at capture, so a replay is right only when the cache holds the same ``length`` as
  at capture (the point's context). Each call checks that, and since a replay does not run ``update``, sets
  the Python-side length to ``context + tokens`` itself afterwards, exactly as an eager forward leaves it;
  the step's rollback then works unchanged. Rolled-back positions are simply overwritten by the next replay.
* outputs: the logits tensor allocated during capture (the graph's memory pool) is rewritten by every replay.

``capture(fn, reset)`` is the policy: :func:`cuda_capture` (warm-up on a side stream, then
``torch.cuda.graph``) on CUDA; :func:`eager_capture` (the identity: every "replay" is the eager forward) and
:func:`replay_like_capture` (eager, but the Python-side cache length is restored after each run as a replay
would leave it) let a CPU test run all of the bookkeeping. The CUDA path itself has not been run in a CPU-only
session (see ``benchmarks/gpu_session.sh``).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from specbatch.profiler import models as M

Capture = Callable[[Callable[[], None], Callable[[], None]], Callable[[], None]]


def eager_capture(fn: Callable[[], None], reset: Callable[[], None]) -> Callable[[], None]:
    """No graph: "replaying" runs ``fn`` eagerly (CPU, or graphs switched off)."""
    return fn


def replay_like_capture(fn: Callable[[], None], reset: Callable[[], None]) -> Callable[[], None]:
    """Eager, but leaving Python-side state as a graph replay does (unchanged: ``reset`` after each run), so
    that a CPU test exercises :class:`GraphedModel`'s length bookkeeping. Warms up twice, as :func:`cuda_capture`."""
    for _ in range(2):
        fn()
        reset()

    def replay():
        fn()
        reset()

    return replay


def cuda_capture(fn: Callable[[], None], reset: Callable[[], None], warmup: int = 2) -> Callable[[], None]:
    """Capture ``fn`` into a ``torch.cuda.CUDAGraph`` and return its ``replay``.

    ``warmup`` eager runs on a side stream first (lazy initialisation, cuBLAS workspaces and autotuning must not
    happen during capture, as the torch CUDA-graph notes require), ``reset()`` after each run and after the
    capture (which also runs ``fn``'s Python once, advancing the cache's Python-side length)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
            reset()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    reset()
    torch.cuda.synchronize()

    def replay():
        graph.replay()

    replay.graph = graph  # keeps the graph (and its memory pool) alive as long as the replay function
    return replay


def capture_for(device: str, graphs: bool) -> Capture:
    """The capture policy of a sweep: CUDA graphs on CUDA when ``graphs``, else eager."""
    if graphs and not str(device).startswith("cuda"):
        raise ValueError("timing.graphs=true needs a CUDA device (CUDA graphs); use timing.graphs=false on CPU")
    return cuda_capture if graphs else eager_capture


class GraphedModel:
    """One captured forward of ``model`` over ``cache`` at its current length: ``batch`` x ``tokens`` new
    tokens, logits of the last ``logits_to_keep`` tokens (0 = all, as ``verify`` asks; 1 as decode asks).

    Called like the model (``model(cache=..., input_ids=..., position_ids=..., use_cache=True,
    logits_to_keep=...)``), so :func:`specbatch.profiler.models.forward` and the step functions take it in
    the model's place."""

    def __init__(self, model, cache, batch: int, tokens: int, logits_to_keep: int, capture: Capture):
        if not all(isinstance(layer, M.PreallocLayer) for layer in cache.layers):
            raise ValueError("CUDA graphs need the pre-allocated cache (cache=prealloc): a growing cache "
                             "changes tensor addresses and shapes at every step")
        self.model, self.config, self.cache = model, model.config, cache
        self.tokens, self.logits_to_keep = tokens, logits_to_keep
        self.context = cache.get_seq_length()
        device = cache.layers[0].kbuf.device
        self.input_ids = torch.zeros((batch, tokens), dtype=torch.long, device=device)
        self.position_ids = (torch.arange(tokens, device=device) + self.context).repeat(batch, 1)
        self.out: dict = {}

        def run() -> None:
            o = M.forward(model, cache, input_ids=self.input_ids, position_ids=self.position_ids, use_cache=True,
                          logits_to_keep=logits_to_keep)
            self.out["logits"] = o.logits

        with torch.inference_mode():
            self.replay = capture(run, lambda: M.set_cache_length(cache, self.context))

    def forward(self, cache=None, input_ids=None, position_ids=None, use_cache=True, logits_to_keep=0, **kwargs):
        if cache is not self.cache:
            raise ValueError("a GraphedModel replays over the cache it was captured on")
        if cache.get_seq_length() != self.context:
            raise ValueError(f"graph captured at {self.context} cached positions, the cache holds "
                             f"{cache.get_seq_length()}: a replay would write and read the wrong positions")
        if tuple(input_ids.shape) != tuple(self.input_ids.shape) or logits_to_keep != self.logits_to_keep:
            raise ValueError(f"graph captured for input {tuple(self.input_ids.shape)}, logits_to_keep="
                             f"{self.logits_to_keep}; called with {tuple(input_ids.shape)}, {logits_to_keep}")
        if kwargs.get("attention_mask") is not None:
            raise ValueError("a GraphedModel replays a forward without an attention mask")
        self.input_ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.replay()
        M.set_cache_length(cache, self.context + self.tokens)  # as the forward's cache.update leaves it
        return SimpleNamespace(logits=self.out["logits"])

    __call__ = forward
