"""Analytical (roofline) profiles for devices not at hand.

    time(step) = max(FLOPs / (peak_flops * eff_compute), bytes / (bandwidth * eff_memory)) + overhead_s

FLOPs: 2 x linear parameters x new tokens, attention 4 x layers x heads x head_dim x new tokens x context
(causal average within the new tokens), LM head 2 x hidden x vocab per token whose logits are kept.
Bytes: all weights once (embedding rows excepted), the whole KV cache read, the new K/V written, the fp32 logits.
Same output format as a measured profile, with ``source: analytical``. Public specs: dense bf16 tensor FLOP/s
(no sparsity), HBM/GDDR bandwidth, memory.
"""
from __future__ import annotations

import datetime as _dt
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specbatch.sim.profile import load_profile, write_profile_meta, write_steps

GPU_SPECS = {
    # name: (peak dense bf16 FLOP/s, memory bandwidth B/s, memory bytes, name fragments of the real device)
    "a100-80gb": (312e12, 2.039e12, 80e9, ("A100",)),
    "h100-sxm": (989e12, 3.35e12, 80e9, ("H100",)),
    "h200": (989e12, 4.8e12, 141e9, ("H200",)),
    "l40s": (362e12, 0.864e12, 48e9, ("L40S",)),
    "rtx-4090": (165.2e12, 1.008e12, 24e9, ("4090",)),
}


@dataclass
class Shape:
    """What the roofline needs of a model (all counts, no units)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict | object) -> "Shape":
        get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
        try:
            hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
            return cls(model_type=str(get("model_type") or "llama"), hidden=hidden, layers=int(get("num_hidden_layers")),
                       heads=heads, kv_heads=int(get("num_key_value_heads") or heads),
                       head_dim=int(get("head_dim") or hidden // heads),
                       ffn=int(get("intermediate_size") or get("ffn_dim")), vocab=int(get("vocab_size")))
        except (TypeError, ValueError) as e:
            raise ValueError(f"model config {cfg!r} lacks a field the roofline needs ({e}); expected hidden_size, "
                             "num_hidden_layers, num_attention_heads, intermediate_size|ffn_dim, vocab_size") from None

    @property
    def linear_params(self) -> int:
        attn = self.hidden * self.heads * self.head_dim * 2 + 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = (2 if self.model_type == "opt" else 3) * self.hidden * self.ffn
        return self.layers * (attn + mlp)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def weight_bytes(self, dtype_bytes: int) -> int:
        return (self.linear_params + 2 * self.vocab * self.hidden) * dtype_bytes


def step_cost(s: Shape, batch: int, tokens: int, context: int, logit_tokens: int, dtype_bytes: int = 2):
    """``(flops, bytes)`` of one forward step: ``batch`` sequences, ``tokens`` new tokens each, ``context``
    tokens already cached, logits kept for ``logit_tokens`` tokens per sequence."""
    bt = batch * tokens
    flops = 2 * bt * s.linear_params
    flops += 4 * bt * s.layers * s.heads * s.head_dim * (context + (tokens + 1) / 2)
    flops += 2 * batch * logit_tokens * s.hidden * s.vocab
    kvb = s.kv_bytes_per_token(dtype_bytes)
    nbytes = (s.linear_params + s.vocab * s.hidden) * dtype_bytes + batch * (context + tokens) * kvb + bt * kvb
    nbytes += batch * logit_tokens * s.vocab * 4
    return flops, nbytes


def step_time(s: Shape, batch, tokens, context, logit_tokens, *, peak_flops, bandwidth, eff_compute, eff_memory,
              overhead_s, dtype_bytes=2) -> float:
    """Seconds of one step under the roofline."""
    f, b = step_cost(s, batch, tokens, context, logit_tokens, dtype_bytes)
    return max(f / (peak_flops * eff_compute), b / (bandwidth * eff_memory)) + overhead_s


def _points(grid, gmax: int):
    for c in grid.contexts:
        for b in grid.batches:
            yield ("draft", "decode", b, 1, c)
            for g in grid.gammas:
                yield ("target", "decode" if g == 0 else "verify", b, g + 1, c)
    for length in grid.prefill_lengths:
        for b in grid.prefill_batches:
            for role in ("draft", "target"):
                yield (role, "prefill", b, length, 0)


def _logit_tokens(phase: str, tokens: int) -> int:
    return 1 if phase in ("prefill", "decode") else tokens


def calibrate(measured: str | Path, *, peak_flops: float, bandwidth: float, dtype_bytes: int) -> dict:
    """Fit ``eff_compute``, ``eff_memory``, ``overhead_s`` to a measured profile (least squares on log time).

    Returns the fit and its error: median and max absolute relative error over the ok points.
    """
    from scipy.optimize import least_squares

    prof = load_profile(measured)
    shapes = {m: Shape.from_config({**prof.meta["models"][m].get("config", {})}) for m in ("target", "draft")}
    df = prof.ok_steps
    if df.empty:
        raise ValueError(f"{measured}: no ok points to calibrate on")
    costs = np.array([step_cost(shapes[r.model], r.batch, r.tokens, r.context, _logit_tokens(r.phase, r.tokens),
                                dtype_bytes) for r in df.itertuples()])
    y = df["median_s"].to_numpy()

    def model(x):
        ec, em, oh = np.exp(x)
        return np.maximum(costs[:, 0] / (peak_flops * ec), costs[:, 1] / (bandwidth * em)) + oh

    best = None
    for x0 in ([-0.7, -0.3, -6.0], [-2.0, -1.0, -4.0], [-4.0, -3.0, -8.0]):
        r = least_squares(lambda x: np.log(model(x)) - np.log(y), x0,
                          bounds=([-12, -12, -20], [0, 0, 2]))
        if best is None or r.cost < best.cost:
            best = r
    ec, em, oh = np.exp(best.x)
    rel = np.abs(model(best.x) / y - 1)
    return {"eff_compute": float(ec), "eff_memory": float(em), "overhead_s": float(oh),
            "fit_median_rel_error": float(np.median(rel)), "fit_max_rel_error": float(rel.max()),
            "fit_points": int(len(y)), "calibrated_on": str(measured)}


def write_analytical_profile(out: str | Path, *, gpu: str, target_cfg, draft_cfg, target_name: str, draft_name: str,
                             grid, eff_compute: float, eff_memory: float, overhead_s: float, dtype: str = "bfloat16",
                             memory_reserve_fraction: float = 0.1, calibration: dict | None = None) -> Path:
    """Write a roofline profile for ``gpu`` (a key of :data:`GPU_SPECS`) in the measured-profile format.

    A point whose KV cache (both models, ``context + max γ + 1`` positions) exceeds the memory left after
    weights and a reserve gets ``status=oom``.
    """
    if gpu not in GPU_SPECS:
        raise ValueError(f"roofline.gpu={gpu!r}; expected one of {sorted(GPU_SPECS)}")
    peak, bw, mem, _ = GPU_SPECS[gpu]
    if calibration:
        eff_compute, eff_memory, overhead_s = (calibration["eff_compute"], calibration["eff_memory"],
                                               calibration["overhead_s"])
    for name, v in (("eff_compute", eff_compute), ("eff_memory", eff_memory)):
        if not 0 < v <= 1:
            raise ValueError(f"roofline.{name}={v}; expected a fraction in (0, 1]")
    dbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    shapes = {"target": Shape.from_config(target_cfg), "draft": Shape.from_config(draft_cfg)}
    weights = sum(s.weight_bytes(dbytes) for s in shapes.values())
    kv_cache_bytes = int(mem * (1 - memory_reserve_fraction) - weights)
    if kv_cache_bytes <= 0:
        raise ValueError(f"{target_name} + {draft_name} weights ({weights / 1e9:.1f} GB) do not fit on {gpu}")
    kv_pair = sum(s.kv_bytes_per_token(dbytes) for s in shapes.values())
    gmax = max(grid.gammas)
    rows = []
    for role, phase, b, t, c in _points(grid, gmax):
        positions = t if phase == "prefill" else c + gmax + 1
        if b * positions * kv_pair > kv_cache_bytes:
            rows.append(dict(model=role, phase=phase, batch=b, tokens=t, context=c, median_s=math.nan,
                             p10_s=math.nan, p90_s=math.nan, samples=0, status="oom"))
            continue
        sec = step_time(shapes[role], b, t, c, _logit_tokens(phase, t), peak_flops=peak, bandwidth=bw,
                        eff_compute=eff_compute, eff_memory=eff_memory, overhead_s=overhead_s, dtype_bytes=dbytes)
        rows.append(dict(model=role, phase=phase, batch=b, tokens=t, context=c, median_s=sec, p10_s=sec, p90_s=sec,
                         samples=0, status="ok"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_steps(out, rows)

    def minfo(name, cfg, s):
        cfgd = cfg if isinstance(cfg, dict) else {k: getattr(cfg, k, None) for k in (
            "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "ffn_dim", "vocab_size")}
        return {"name": name, "config": {k: v for k, v in cfgd.items() if v is not None},
                "parameters": int(s.linear_params + 2 * s.vocab * s.hidden),
                "kv_bytes_per_token": s.kv_bytes_per_token(dbytes)}

    write_profile_meta(out, {
        "source": "analytical",
        "device": {"name": gpu, "kind": "cuda", "memory_bytes": int(mem), "kv_cache_bytes": kv_cache_bytes,
                   "threads": None, "peak_flops": peak, "bandwidth_bytes_per_s": bw},
        "dtype": dtype,
        "libraries": {},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": {"target": minfo(target_name, target_cfg, shapes["target"]),
                   "draft": minfo(draft_name, draft_cfg, shapes["draft"])},
        "timing": {"method": "roofline", "cache": "analytical (KV read once per step)", "grid": grid.as_dict(),
                   "formula": "max(FLOPs/(peak*eff_compute), bytes/(bandwidth*eff_memory)) + overhead_s",
                   "eff_compute": eff_compute, "eff_memory": eff_memory, "overhead_s": overhead_s,
                   "memory_reserve_fraction": memory_reserve_fraction, "calibration": calibration,
                   "conventions": "as measured profiles: target γ=0 phase=decode tokens=1, γ>=1 verify tokens=γ+1"},
    })
    load_profile(out)
    return out


# --- physical sanity of a measured profile: each phase against its device's roofline lower bound -------------

#: the phases :func:`roofline_ratios` reports: (label, model, phase, γ) (verify: γ = 4, or the grid's largest γ
#: when it has no 4; each entry records its tokens = γ + 1)
SANITY_PHASES = (("draft decode", "draft", "decode", None), ("target decode", "target", "decode", None),
                 ("verify", "target", "verify", 4), ("prefill", "target", "prefill", None))


def gpu_spec_for(name: str) -> str | None:
    """The :data:`GPU_SPECS` key whose name fragments occur in the device name ``name`` (e.g. ``"NVIDIA H100
    80GB HBM3"`` -> ``h100-sxm``), or None. A PCIe H100 (2.0 TB/s, 756 TFLOP/s) is not an SXM one: refused."""
    low = name.lower()
    if "h100" in low and "pcie" in low:
        return None
    for key, (_, _, _, fragments) in GPU_SPECS.items():
        if any(f.lower() in low for f in fragments):
            return key
    return None


def measure_host(device: str, dtype, *, copy_bytes: int = 1 << 27, n: int = 1024, repeats: int = 5) -> dict:
    """Bandwidth and compute peak of ``device`` measured on the spot (STREAM-like copy, matmul).

    Bandwidth: the best of ``repeats`` copies of a ``copy_bytes`` tensor into another (read + write counted,
    ``2 * copy_bytes`` bytes; the STREAM "copy" kernel). Peak: the best of ``repeats`` ``n x n`` matmuls in
    ``dtype`` (``2 n^3`` FLOPs), with torch's threads. Best, not median: the bound is what the device can do."""
    import time

    import torch

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    src = torch.ones(copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def best(fn) -> float:
        fn()
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t_copy = best(lambda: dst.copy_(src))
    t_mm = best(lambda: torch.mm(a, b))
    return {"bandwidth_bytes_per_s": 2 * copy_bytes / t_copy, "peak_flops": 2 * n ** 3 / t_mm,
            "source": f"measured on the spot: best of {repeats} copies of a {copy_bytes >> 20} MiB fp32 tensor "
                      f"(read + write counted) and best of {repeats} {n}x{n} matmuls in "
                      f"{str(dtype).replace('torch.', '')} ({torch.get_num_threads()} torch threads)"}


@functools.cache
def device_roofline(device: str, dtype) -> dict:
    """The bandwidth and peak the roofline bound of a profile uses (meta.json ``device.roofline``).

    CUDA: the public spec of a known GPU (:data:`GPU_SPECS`: dense bf16 tensor FLOP/s, HBM bandwidth; H100 SXM
    3.35 TB/s, H200 4.8 TB/s, 989 TFLOP/s both), with the on-the-spot measurement recorded beside it; an unknown
    GPU uses the measurement. CPU: the measurement (:func:`measure_host`). Measured once per process (the passes
    and repair sweeps of a run share it)."""
    import torch

    measured = measure_host(device, dtype)
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name()
        key = gpu_spec_for(name)
        if key is not None:
            peak, bw, _, _ = GPU_SPECS[key]
            return {"peak_flops": peak, "bandwidth_bytes_per_s": bw,
                    "source": f"public spec of {key} (roofline.GPU_SPECS) for {name!r}", "measured": measured}
    return measured


def bound_s(s: Shape, phase: str, batch: int, tokens: int, context: int, *, peak_flops: float, bandwidth: float,
            dtype_bytes: int) -> float:
    """The roofline lower bound (seconds) of one profiled step: ``max(FLOPs / peak, bytes / bandwidth)`` with
    :func:`step_cost`'s counts (logits kept: 1 token at decode and prefill, all γ+1 at verify)."""
    f, b = step_cost(s, batch, tokens, context, _logit_tokens(phase, tokens), dtype_bytes)
    return max(f / peak_flops, b / bandwidth)


def roofline_ratios(steps, meta: dict) -> dict:
    """Measured time over roofline bound for :data:`SANITY_PHASES`, at batch 1 and at the largest batch measured
    (decode and verify at the shortest context of the grid, prefill at its longest prompt): the
    meta.json ``roofline_ratio`` block. A ratio is >= 1 when the bound holds (a ratio below 1 means a wrong
    device figure or cost count); how far above 1 is the overhead a serving engine would not pay."""
    dev = (meta.get("device") or {}).get("roofline")
    if not dev:
        return {"note": "no device roofline figures in meta.device.roofline"}
    dbytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(meta.get("dtype")), 2)
    ok = steps[steps["status"] == "ok"]
    out = {"peak_flops": dev["peak_flops"], "bandwidth_bytes_per_s": dev["bandwidth_bytes_per_s"],
           "source": dev.get("source"), "dtype_bytes": dbytes,
           "what": "measured median / max(FLOPs/peak, bytes/bandwidth) (roofline.step_cost); decode and verify at "
                   "the shortest context, prefill at the longest prompt", "phases": {}}
    for label, role, phase, gamma in SANITY_PHASES:
        shape = Shape.from_config(meta["models"][role]["config"])
        rows = ok[(ok["model"] == role) & (ok["phase"] == phase)]
        if gamma is not None:
            tokens = gamma + 1 if (rows["tokens"] == gamma + 1).any() else \
                (int(rows["tokens"].max()) if len(rows) else None)
            rows = rows[rows["tokens"] == tokens]
        if rows.empty:
            continue
        rows = rows[rows["tokens"] == rows["tokens"].max()] if phase == "prefill" else \
            rows[rows["context"] == rows["context"].min()]
        entry = {}
        for b in sorted({1, int(rows["batch"].max())}):
            r = rows[rows["batch"] == b]
            if r.empty:
                continue
            r = r.iloc[0]
            bound = bound_s(shape, phase, b, int(r["tokens"]), int(r["context"]), peak_flops=dev["peak_flops"],
                            bandwidth=dev["bandwidth_bytes_per_s"], dtype_bytes=dbytes)
            entry[f"batch{b}"] = {"batch": b, "tokens": int(r["tokens"]), "context": int(r["context"]),
                                  "gamma": int(r["tokens"]) - 1 if phase == "verify" else None,
                                  "measured_s": float(r["median_s"]), "bound_s": bound,
                                  "ratio": float(r["median_s"]) / bound}
        out["phases"][label] = entry
    return out


LAUNCH_BOUND_RATIO = 3.0  # batch-1 decode this far above its bound: launch-bound or misconfigured


def launch_bound_warnings(block: dict) -> list[str]:
    """One line per decode phase whose batch-1 time exceeds :data:`LAUNCH_BOUND_RATIO` × its roofline bound:
    at batch 1 a decode step streams the weights once, so a step far slower than that pays for something a
    serving engine does not (host-side kernel launches without CUDA graphs, a wrong dtype, a misread device)."""
    out = []
    for label in ("draft decode", "target decode"):
        e = (block.get("phases") or {}).get(label, {}).get("batch1")
        if e and e["ratio"] > LAUNCH_BOUND_RATIO:
            out.append(f"warning: {label} at batch 1 takes {e['ratio']:.1f}x its roofline bound "
                       f"({e['measured_s'] * 1e3:.3f} ms against {e['bound_s'] * 1e3:.3f} ms; more than "
                       f"{LAUNCH_BOUND_RATIO:g}x): launch-bound or misconfigured measurement")
    return out


def format_ratios(block: dict) -> str:
    """The ``roofline_ratio`` block as a few printable lines."""
    if "phases" not in block:
        return f"roofline: {block.get('note', 'no figures')}"
    lines = [f"roofline bound: {block['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, {block['peak_flops'] / 1e12:.2f} "
             f"TFLOP/s ({block['source']})"]
    for label, entry in block["phases"].items():
        for e in entry.values():
            lines.append(f"  {label:14s} batch {e['batch']:4d} tokens {e['tokens']:5d} context {e['context']:5d}: "
                         f"{e['measured_s'] * 1e3:9.3f} ms measured, {e['bound_s'] * 1e3:9.3f} ms bound, "
                         f"ratio {e['ratio']:7.2f}")
    return "\n".join(lines)
