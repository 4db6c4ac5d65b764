"""``specbatch-tune``: export the batch → γ table of a profile and acceptance model for a serving engine.

    specbatch-tune --profile <folder|name|default> [--alpha 0.7 | --acceptance profile] [--context 1024]
                   [--max-batch 64] [--max-gamma 8] [--draft-sync] [--out tune/] [--print json|vllm|sglang|report]

It computes γ*(b) = argmax_γ b·E(α, γ) / T(b, γ, c) for b = 1..max_batch at the given context (tokens)
with :mod:`specbatch.sim.quant`, compresses it into batch ranges with the predicted speedup (throughput at γ* over
throughput without speculation, from the profile) and writes three files into ``--out``. With
``--draft-sync`` a γ = 0 iteration still costs one draft decode (vLLM runs its drafter at K = 0 to keep
its KV cache in step), which makes γ = 0 dearer against γ ≥ 1:

``tune.json``
    ``{"profile", "device", "acceptance": {"source", "alpha_mean", "positions"}, "context_tokens",
    "max_batch", "max_gamma", "draft_sync", "table": {"<b>": γ}, "ranges": [{"min_batch", "max_batch", "gamma",
    "speedup_min", "speedup_max", "speedup_mean"}], "vllm": <vllm.json>, "sglang": <sglang.json>}``
``vllm.json``
    ``{"num_speculative_tokens_per_batch_size": [[min_batch, max_batch, γ], ...],
    "speculative_disable_by_batch_size": B | null}`` — the per-range γ (batch sizes inclusive), and the
    batch size above which speculation is off (the start of a trailing γ = 0 range minus one; ``null`` when
    γ* > 0 up to max_batch). Paste into ``--speculative-config``.
``sglang.json``
    ``{"speculative_tiers": [{"max_batch_size", "speculative_num_steps", "speculative_num_draft_tokens",
    "speculative_eagle_topk"}, ...]}`` — SGLang-style tiers: the first tier whose ``max_batch_size`` is at
    least the running batch applies (num_steps = γ, num_draft_tokens = γ + 1, topk 1: chain drafts);
    num_steps 0 means speculation off.

Exit status 2 with a message naming the option on a bad value or profile.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from .acceptance import AcceptanceModel
from .cost_model import CostModel
from .policies import table_to_ranges
from .profile import ProfileError, atomic_write_text, load_profile
from .quant import optimal_gamma_over_batches, point_curve, report


def ranges_with_speedup(cost: CostModel, acceptance: AcceptanceModel, context: float,
                        max_gamma: int | None = None) -> tuple[np.ndarray, list[dict]]:
    """(γ*(b) for b = 1..max_batch, the ranges with predicted speedup min/max/mean over each range).
    The speedup is over serving without speculation (a plain target decode per iteration)."""
    table = optimal_gamma_over_batches(cost, acceptance, context, max_gamma=max_gamma)
    speed = []
    for b in range(1, cost.max_batch + 1):
        e, t = point_curve(cost, acceptance, b, context, max_gamma)
        g = table[b - 1]
        plain = cost.target_verify(b, 0, context)  # no speculation at all (no draft step, even with draft_sync)
        speed.append((e[g] / t[g]) / (e[0] / plain))
    out = []
    for lo, hi, g in table_to_ranges(table):
        s = np.asarray(speed[lo - 1:hi])
        out.append({"min_batch": lo, "max_batch": hi, "gamma": g, "speedup_min": round(float(s.min()), 4),
                    "speedup_max": round(float(s.max()), 4), "speedup_mean": round(float(s.mean()), 4)})
    return table, out


def vllm_config(ranges: list[dict]) -> dict:
    """The vLLM-style value: per-range γ and the batch size above which speculation is disabled."""
    disable = None
    if len(ranges) > 1 and ranges[-1]["gamma"] == 0:
        disable = ranges[-1]["min_batch"] - 1
    return {"num_speculative_tokens_per_batch_size": [[r["min_batch"], r["max_batch"], r["gamma"]] for r in ranges],
            "speculative_disable_by_batch_size": disable}


def sglang_config(ranges: list[dict]) -> dict:
    """SGLang-style tiers, ascending by ``max_batch_size``."""
    return {"speculative_tiers": [{"max_batch_size": r["max_batch"], "speculative_num_steps": r["gamma"],
                                   "speculative_num_draft_tokens": r["gamma"] + 1, "speculative_eagle_topk": 1}
                                  for r in ranges]}


def gamma_for_batch(vllm: dict, batch: int) -> int:
    """Read a γ back from a :func:`vllm_config` value (what an engine would do), for checks and tests."""
    off = vllm.get("speculative_disable_by_batch_size")
    if off is not None and batch > off:
        return 0
    for lo, hi, g in vllm["num_speculative_tokens_per_batch_size"]:
        if lo <= batch <= hi:
            return int(g)
    raise ValueError(f"batch {batch} not covered by num_speculative_tokens_per_batch_size")


def tune(profile_dir: str, alpha: float | None = 0.7, acceptance_source: str = "scalar", context: float = 1024.0,
         max_batch: int = 64, max_gamma: int = 8, draft_sync: bool = False) -> tuple[dict, CostModel, AcceptanceModel]:
    """Build the export (the ``tune.json`` dict) for a profile folder; see the module docstring."""
    if not context > 0:
        raise ValueError(f"--context is {context}; expected a positive number of tokens")
    if max_batch < 1:
        raise ValueError(f"--max-batch is {max_batch}; expected an integer ≥ 1")
    if max_gamma < 0:
        raise ValueError(f"--max-gamma is {max_gamma}; expected an integer ≥ 0")
    profile = load_profile(profile_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cost = CostModel(profile, max_batch=max_batch, max_gamma=max_gamma)
    if draft_sync:
        cost = cost.with_draft_sync()
    if acceptance_source == "profile":
        pos = profile.per_position_alpha
        if pos is None:
            raise ValueError(f"--acceptance profile: {profile.path} has no acceptance.csv; pass --alpha instead")
        acc = AcceptanceModel(positions=pos, max_gamma=max_gamma)
    elif acceptance_source == "scalar":
        if alpha is None or not 0 <= alpha <= 1:
            raise ValueError(f"--alpha is {alpha}; expected a probability in [0, 1]")
        acc = AcceptanceModel(alpha=alpha, max_gamma=max_gamma)
    else:
        raise ValueError(f"--acceptance is {acceptance_source!r}; expected 'scalar' or 'profile'")
    table, ranges = ranges_with_speedup(cost, acc, context)
    out = {
        "profile": profile.name, "device": profile.meta.get("device", {}).get("name"),
        "acceptance": {"source": acceptance_source, "alpha_mean": acc.mean_alpha,
                       "positions": [float(x) for x in acc.rates(max(1, max_gamma))]},
        "context_tokens": float(context), "max_batch": max_batch, "max_gamma": max_gamma, "draft_sync": draft_sync,
        "table": {str(b + 1): int(g) for b, g in enumerate(table)},
        "ranges": ranges, "vllm": vllm_config(ranges), "sglang": sglang_config(ranges),
    }
    return out, cost, acc


def format_ranges(result: dict) -> str:
    lines = [f"profile {result['profile']}  α(mean) = {result['acceptance']['alpha_mean']:.3f}  "
             f"context {result['context_tokens']:.0f} tokens",
             f"{'batch':>11} {'γ':>3} {'predicted speedup (min / mean / max)':>38}"]
    for r in result["ranges"]:
        lines.append(f"{r['min_batch']:>5}–{r['max_batch']:<5} {r['gamma']:>3} "
                     f"{r['speedup_min']:>14.2f}x / {r['speedup_mean']:.2f}x / {r['speedup_max']:.2f}x")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specbatch-tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="default", help="profile folder, shipped profile name, or 'default'")
    p.add_argument("--alpha", type=float, default=0.7, help="scalar acceptance rate (with --acceptance scalar)")
    p.add_argument("--acceptance", choices=["scalar", "profile"], default="scalar",
                   help="scalar: --alpha; profile: per-position rates from the profile's acceptance.csv")
    p.add_argument("--context", type=float, default=1024.0, help="reference mean context in tokens (default 1024)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch size to cover (sequences)")
    p.add_argument("--max-gamma", type=int, default=8, help="largest speculation length considered")
    p.add_argument("--draft-sync", action="store_true",
                   help="γ = 0 still runs one draft step (vLLM keeps its drafter's KV cache in step so)")
    p.add_argument("--out", default="tune", help="folder for tune.json, vllm.json, sglang.json ('-': write none)")
    p.add_argument("--print", dest="show", choices=["ranges", "report", "json", "vllm", "sglang"], default="ranges",
                   help="what to print on stdout (report: the full quantitative model explanation)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .run import ConfigError, resolve_profile

    try:
        result, cost, acc = tune(str(resolve_profile(args.profile)), args.alpha, args.acceptance, args.context,
                                 args.max_batch, args.max_gamma, args.draft_sync)
    except (ConfigError, ProfileError, ValueError) as e:
        print(f"specbatch-tune: error: {e}", file=sys.stderr)
        return 2
    if args.out != "-":
        out = Path(args.out)
        atomic_write_text(out / "tune.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(out / "vllm.json", json.dumps(result["vllm"], indent=2) + "\n")
        atomic_write_text(out / "sglang.json", json.dumps(result["sglang"], indent=2) + "\n")
    if args.show == "ranges":
        print(format_ranges(result))
        if args.out != "-":
            print(f"wrote {Path(args.out) / 'tune.json'}, vllm.json, sglang.json")
    elif args.show == "report":
        print(report(cost, acc, args.context))
    else:
        print(json.dumps(result if args.show == "json" else result[args.show], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
