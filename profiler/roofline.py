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
