"""Does the engine's speculative step pay a cost per new shape?

In a serving run the attention span (longest sequence + new tokens) changes at almost every iteration; a
profile and a micro-benchmark repeat one shape. This times ``Engine.spec_step`` (batch ``--batch``, γ =
``--gamma``) with the same span at every call and with a span the process has not seen yet at every call,
and on CUDA once with SDPA's cuDNN backend allowed and once with it disabled
(``torch.backends.cuda.enable_cudnn_sdp(False)``), which builds an execution plan per shape.

    python benchmarks/engine_shapes.py                                   # tiny pair on the CPU
    python benchmarks/engine_shapes.py --device cuda --target llama-2-7b --draft llama-68m

Prints the median step time of each variant and the ratio fresh ÷ repeated (1.0: no per-shape cost).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from specbatch.fidelity import engine as E


def time_steps(eng: E.Engine, batch: int, gamma: int, spans: list[int], clock) -> float:
    """Median seconds of ``spec_step`` with the cached length of every sequence set to each of ``spans``."""
    last = torch.zeros(batch, dtype=torch.long, device=eng.device)
    ts = []
    for n in spans:
        lengths = torch.full((batch,), n, dtype=torch.long, device=eng.device)
        t0 = clock()
        eng.spec_step(last, lengths, gamma, None)
        ts.append(clock() - t0)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--target", default="tiny-llama")
    ap.add_argument("--draft", default="tiny-llama-draft")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    ap.add_argument("--start", type=int, default=100, help="first cached length")
    a = ap.parse_args()

    cuda = a.device.startswith("cuda")
    max_len = a.start + 2 * a.steps * 8 + a.gamma + 8
    eng = E.Engine(a.target, a.draft, E.EngineConfig(device=a.device, dtype="bfloat16" if cuda else "float32",
                                                     max_batch=a.batch, clock="wall", warmup=False),
                   max_len=max_len)
    clock = E.make_clock("wall", a.device)
    backends = [("cudnn allowed", True), ("cudnn disabled", False)] if cuda else [("cpu", None)]
    print(f"{a.draft} / {a.target} on {a.device}: spec_step batch {a.batch}, γ {a.gamma}, "
          f"median of {a.steps} steps per variant")
    fresh_next = a.start + 1
    for name, cudnn in backends:
        if cudnn is not None:
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        same = [a.start] * a.steps
        time_steps(eng, a.batch, a.gamma, same[:3], clock)  # warm this span (and the backend) up
        t_same = time_steps(eng, a.batch, a.gamma, same, clock)
        fresh = list(range(fresh_next, fresh_next + a.steps))  # one new span per call, never seen before
        fresh_next += a.steps
        t_fresh = time_steps(eng, a.batch, a.gamma, fresh, clock)
        print(f"  {name:15s} repeated span {1e3 * t_same:8.2f} ms   fresh span {1e3 * t_fresh:8.2f} ms   "
              f"fresh ÷ repeated {t_fresh / t_same:5.2f}")
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.1f} s")
