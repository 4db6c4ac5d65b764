"""Summary metrics of a simulation. Every metric is defined here, in the docstring of :func:`summarize`."""
from __future__ import annotations

import numpy as np

from .cluster import SimResult

PERCENTILES = (50, 90, 99)


def _stats(x: np.ndarray, prefix: str) -> dict:
    x = x[~np.isnan(x)]
    out = {f"{prefix}_mean": float(x.mean()) if len(x) else float("nan")}
    for p in PERCENTILES:
        out[f"{prefix}_p{p}"] = float(np.percentile(x, p)) if len(x) else float("nan")
    return out


def summarize(result: SimResult, slo_ttft_s: float = 2.0, slo_tpot_s: float = 0.2) -> dict:
    """Summary of one run. Definitions (times in seconds, rates per second of simulated time):

    - ``requests``: requests in the workload; ``completed``: requests that finished; ``rejected``: requests
      never served because prompt + output exceed a replica's KV capacity.
    - ``makespan_s``: time of the last finish (the first arrival is at 0).
    - ``throughput_tok_s``: output tokens of completed requests / makespan; ``throughput_req_s``: completed
      requests / makespan.
    - ``ttft``: time to first token = first token time − arrival (queueing + prefill).
    - ``tpot``: time per output token after the first = (finish − first token) / (output tokens − 1), for
      requests with more than one output token.
    - ``latency``: end-to-end = finish − arrival. Each with ``_mean``, ``_p50``, ``_p90``, ``_p99``.
    - ``goodput_req_s``: completed requests meeting both SLOs (TTFT ≤ ``slo_ttft_s`` and TPOT ≤
      ``slo_tpot_s``; a one-token request needs only the TTFT SLO) / makespan; ``goodput_tok_s`` the same
      in output tokens; ``slo_attainment``: fraction of all requests meeting both SLOs.
    - ``mean_batch``: mean running-batch size over decode/verify iterations, weighted by iteration time.
    - ``mean_gamma``: mean γ over iterations, weighted by sequences (Σ b·γ / Σ b).
    - ``mean_accepted``: mean accepted draft tokens per sequence per speculative (γ > 0) iteration.
    - ``tokens_per_iteration``: mean tokens a sequence gained per decode/verify iteration.
    - ``preemptions``: total preemptions; ``iterations``: total replica iterations.
    - ``busy_fraction``: per replica, time spent in iterations / makespan (list), and its mean.
    """
    if not slo_ttft_s > 0 or not slo_tpot_s > 0:
        raise ValueError(f"SLOs must be positive seconds (got ttft={slo_ttft_s}, tpot={slo_tpot_s})")
    req, it = result.requests, result.iterations
    done = req[~req["rejected"]]
    span = result.makespan_s if result.makespan_s > 0 else float("nan")
    ttft, tpot = done["ttft_s"].to_numpy(), done["tpot_s"].to_numpy()
    ok = (ttft <= slo_ttft_s) & (np.isnan(tpot) | (tpot <= slo_tpot_s))
    dec = it[it["batch"] > 0]
    w = dec["step_s"].to_numpy()
    b = dec["batch"].to_numpy()
    g = dec["gamma"].to_numpy()
    spec = dec[dec["gamma"] > 0]
    gen_decode = (done["generated_tokens"] - 1).sum()
    out = {
        "requests": int(len(req)), "completed": int(len(done)), "rejected": int(req["rejected"].sum()),
        "makespan_s": result.makespan_s,
        "throughput_tok_s": float(done["output_tokens"].sum() / span),
        "throughput_req_s": float(len(done) / span),
        **_stats(ttft, "ttft"), **_stats(tpot, "tpot"), **_stats(done["latency_s"].to_numpy(), "latency"),
        "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
        "goodput_req_s": float(ok.sum() / span),
        "goodput_tok_s": float(done["output_tokens"].to_numpy()[ok].sum() / span),
        "slo_attainment": float(ok.sum() / len(req)) if len(req) else float("nan"),
        "mean_batch": float((w * b).sum() / w.sum()) if w.sum() > 0 else float("nan"),
        "mean_gamma": float((b * g).sum() / b.sum()) if b.sum() > 0 else 0.0,
        "mean_accepted": float(spec["accepted"].sum() / spec["batch"].sum()) if len(spec) else 0.0,
        "tokens_per_iteration": float(gen_decode / max(1, done["iterations"].sum())),
        "preemptions": int(req["preemptions"].sum()),
        "iterations": int(len(it)),
        "busy_fraction": [float(x / span) for x in result.busy_s],
        "busy_fraction_mean": float(np.mean(result.busy_s) / span),
        "kv_capacity_tokens": result.kv_capacity_tokens,
    }
    return out


def format_summary(s: dict) -> str:
    """A short human-readable table of the headline metrics."""
    rows = [
        ("requests (completed / rejected)", f"{s['completed']} / {s['rejected']}"),
        ("makespan", f"{s['makespan_s']:.2f} s"),
        ("throughput", f"{s['throughput_tok_s']:.1f} tok/s, {s['throughput_req_s']:.3f} req/s"),
        ("TTFT mean / p50 / p99", f"{s['ttft_mean']:.3f} / {s['ttft_p50']:.3f} / {s['ttft_p99']:.3f} s"),
        ("TPOT mean / p50 / p99", f"{s['tpot_mean'] * 1e3:.1f} / {s['tpot_p50'] * 1e3:.1f} / {s['tpot_p99'] * 1e3:.1f} ms"),
        ("latency mean / p50 / p99", f"{s['latency_mean']:.2f} / {s['latency_p50']:.2f} / {s['latency_p99']:.2f} s"),
        (f"goodput (TTFT ≤ {s['slo_ttft_s']} s, TPOT ≤ {s['slo_tpot_s']} s)",
         f"{s['goodput_req_s']:.3f} req/s ({100 * s['slo_attainment']:.1f} % of requests)"),
        ("mean batch / mean γ / accepted per iter", f"{s['mean_batch']:.1f} / {s['mean_gamma']:.2f} / {s['mean_accepted']:.2f}"),
        ("tokens per iteration", f"{s['tokens_per_iteration']:.2f}"),
        ("preemptions / iterations", f"{s['preemptions']} / {s['iterations']}"),
        ("busy fraction (mean over replicas)", f"{100 * s['busy_fraction_mean']:.1f} %"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
