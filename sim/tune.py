"""``specbatch-tune``: export the batch → γ table of a profile and acceptance model for a serving engine.

    specbatch-tune --profile <folder|name|default> [--alpha 0.7 | --acceptance profile] [--context 1024]
                   [--drafter draft_model|eagle|ngram]
                   [--max-batch B] [--max-gamma G] [--draft-sync] [--out tune/] [--print json|vllm|sglang|report]

It computes γ*(b) = argmax_γ b·E(α, γ) / T(b, γ, c) for b = 1..max_batch at the given context (tokens)
with :mod:`specbatch.sim.quant`, compresses it into batch ranges with the predicted speedup (throughput at γ* over
throughput without speculation, from the profile) and writes three files into ``--out``. ``--max-batch`` and
``--max-gamma`` default to the profile's largest measured batch size and γ; beyond them (and beyond the
measured contexts) step times are extrapolated (:mod:`specbatch.sim.cost_model`), and every axis that is
gets one ``specbatch-tune: warning:`` line on stderr and an entry in ``tune.json``'s ``extrapolated``.

Files are written with the default ``--print ranges`` (into ``tune/`` unless ``--out`` says otherwise) and
with any ``--print`` when ``--out`` is given; ``--print json|vllm|sglang|report`` alone only prints. A line on
stderr names the files written. With
``--draft-sync`` a γ = 0 iteration still costs one draft decode (vLLM runs its drafter at K = 0 to keep
its KV cache in step), which makes γ = 0 dearer against γ ≥ 1:

``tune.json``
    ``{"profile", "device", "acceptance": {"source", "alpha_mean", "positions"}, "context_tokens",
    "max_batch", "max_gamma", "draft_sync", "extrapolated": [<one sentence per extrapolated axis>],
    "table": {"<b>": γ}, "ranges": [{"min_batch", "max_batch", "gamma", "speedup_min", "speedup_max",
    "speedup_mean"}], "vllm": <vllm.json>, "sglang": <sglang.json>}``
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
from .cost_model import CostModel, ExtrapolationWarning
from .policies import table_to_ranges
from .drafters import DRAFTER_KINDS, make_drafter
from .profile import ProfileError, atomic_write_text, load_profile
from .quant import budget_curve, optimal_gamma_budget, optimal_gamma_over_batches, point_curve, report


def ranges_with_speedup(cost: CostModel, acceptance: AcceptanceModel, context: float,
                        max_gamma: int | None = None, token_budget: int | None = None,
                        prefill_waiting: int = 0) -> tuple[np.ndarray, list[dict]]:
    """(γ*(b) for b = 1..max_batch, the ranges with predicted speedup min/max/mean over each range).
    The speedup is over serving without speculation (a plain target decode per iteration). With
    ``token_budget`` (chunked prefill, tokens per forward) γ*(b) and the speedups are :func:`budget_curve`'s,
    with ``prefill_waiting`` prompt tokens queued."""
    if token_budget is None:
        table = optimal_gamma_over_batches(cost, acceptance, context, max_gamma=max_gamma)
    else:
        table = np.array([optimal_gamma_budget(cost, acceptance, b, context, token_budget, prefill_waiting, max_gamma)
                          for b in range(1, cost.max_batch + 1)], dtype=np.int64)
    speed = []
    for b in range(1, cost.max_batch + 1):
        if token_budget is None:
            e, t = point_curve(cost, acceptance, b, context, max_gamma)
        else:
            e, t = budget_curve(cost, acceptance, b, context, token_budget, prefill_waiting, max_gamma)
        g = table[b - 1]
        plain = cost.target_verify(b, 0, context)  # no speculation at all (no draft step, even with draft_sync)
        if token_budget is not None:  # under the budget: γ = 0 at the same budget and queue
            plain = t[0]
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


def measured_range(profile, draft: str = "draft") -> tuple[int, int]:
    """(largest batch size, largest γ) the profile measures for both the target's steps and the drafter's decode
    (``draft``: the steps.csv model of the drafter, :attr:`Drafter.rows`)."""
    s = profile.ok_steps
    tgt = s[(s["model"] == "target") & s["phase"].isin(["decode", "verify"])]
    drf = s[(s["model"] == draft) & (s["phase"] == "decode")]
    if tgt.empty or drf.empty:
        raise ProfileError(f"{profile.path}/steps.csv: no ok target decode/verify or draft decode rows")
    return int(min(tgt["batch"].max(), drf["batch"].max())), int(tgt["tokens"].max()) - 1


def extrapolations(cost: CostModel, context: float) -> list[str]:
    """One sentence per axis (batch, γ, context) on which the tuned range leaves the profile's measured grid."""
    notes = []
    bmax = int(min(cost.verify_axes[1][-1], cost.draft_axes[0][-1]))
    gmax = int(cost.verify_axes[0][-1]) - 1
    if cost.max_batch > bmax:
        notes.append(f"batch {bmax + 1}–{cost.max_batch} is beyond the largest measured batch size {bmax}: step "
                     "times there are extrapolated linearly from the last two measured batch sizes")
    if cost.max_gamma > gmax:
        notes.append(f"γ {gmax + 1}–{cost.max_gamma} is beyond the largest measured γ {gmax} (verify of {gmax + 1} "
                     "tokens): verify times there are extrapolated linearly from the last two measured γ")
    lo = float(min(cost.verify_axes[2][0], cost.draft_axes[1][0]))
    hi = float(min(cost.verify_axes[2][-1], cost.draft_axes[1][-1]))
    if context > hi:
        notes.append(f"context {context:g} tokens is beyond the longest measured context {hi:g}: step times are "
                     "extrapolated linearly from the last two measured contexts")
    elif context < lo:
        notes.append(f"context {context:g} tokens is below the shortest measured context {lo:g}: step times are "
                     f"held at their values at {lo:g} tokens")
    return notes


def tune(profile_dir: str, alpha: float | None = 0.7, acceptance_source: str = "scalar", context: float = 1024.0,
         max_batch: int | None = None, max_gamma: int | None = None,
         draft_sync: bool = False, token_budget: int | None = None,
         prefill_waiting: int = 0, drafter: str = "draft_model") -> tuple[dict, CostModel, AcceptanceModel]:
    """Build the export (the ``tune.json`` dict) for a profile folder; see the module docstring.
    ``drafter``: the drafter kind (its costs, KV-free or not, and its documented acceptance defaults when
    ``alpha`` is ``None``; :func:`tune_acceptance`).
    ``max_batch``/``max_gamma`` ``None``: the profile's largest measured batch size / γ."""
    if not context > 0:
        raise ValueError(f"--context is {context}; expected a positive number of tokens")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"--max-batch is {max_batch}; expected an integer ≥ 1")
    if max_gamma is not None and max_gamma < 0:
        raise ValueError(f"--max-gamma is {max_gamma}; expected an integer ≥ 0")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"--max-num-batched-tokens is {token_budget}; expected an integer ≥ 1 (tokens per forward)")
    if prefill_waiting < 0:
        raise ValueError(f"--prefill-waiting is {prefill_waiting}; expected an integer ≥ 0 (prompt tokens)")
    profile = load_profile(profile_dir)
    d = make_drafter(drafter)
    d.check_profile(profile)
    measured_batch, measured_gamma = measured_range(profile, d.rows)
    max_batch = measured_batch if max_batch is None else max_batch
    max_gamma = measured_gamma if max_gamma is None else max_gamma
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cost = CostModel(profile, max_batch=max_batch, max_gamma=max_gamma, drafter=d)
    if draft_sync and d.per_token:  # (an ngram proposer keeps no KV in step)
        cost = cost.with_draft_sync()
    acc = tune_acceptance(profile, d, alpha, acceptance_source, max_gamma)
    with warnings.catch_warnings():  # said once per axis in "extrapolated", not once per cost model
        warnings.simplefilter("ignore", ExtrapolationWarning)
        table, ranges = ranges_with_speedup(cost, acc, context, token_budget=token_budget,
                                            prefill_waiting=prefill_waiting)
    out = {
        "profile": profile.name, "device": profile.meta.get("device", {}).get("name"), "drafter": d.describe(),
        "acceptance": {"source": acceptance_source, "alpha_mean": acc.mean_alpha,
                       "positions": [float(x) for x in acc.rates(max(1, max_gamma))]},
        "context_tokens": float(context), **({} if token_budget is None else
                                             {"max_num_batched_tokens": token_budget,
                                              "prefill_waiting_tokens": prefill_waiting}),
        "max_batch": max_batch, "max_gamma": max_gamma, "draft_sync": draft_sync,
        "extrapolated": extrapolations(cost, context), "table": {str(b + 1): int(g) for b, g in enumerate(table)},
        "ranges": ranges, "vllm": vllm_config(ranges), "sglang": sglang_config(ranges),
    }
    return out, cost, acc


def tune_acceptance(profile, drafter, alpha: float | None, source: str, max_gamma: int) -> AcceptanceModel:
    """The acceptance model ``specbatch-tune`` prices γ with: ``source="profile"`` the draft model's
    acceptance.csv (draft_model only); ``"scalar"`` ``alpha``, or when ``alpha`` is ``None`` the drafter's
    documented per-position rates (``conf/drafter/<kind>.yaml``; 0.7 for draft_model); with the drafter's
    match rate."""
    if source == "profile":
        if drafter.kind != "draft_model":
            raise ValueError(f"--acceptance profile reads the draft model's acceptance.csv, not the {drafter.kind} "
                             "drafter's; pass --alpha, or leave it out for the drafter's documented rates")
        pos = profile.per_position_alpha
        if pos is None:
            raise ValueError(f"--acceptance profile: {profile.path} has no acceptance.csv; pass --alpha instead")
        return AcceptanceModel(positions=pos, max_gamma=max_gamma)
    if source != "scalar":
        raise ValueError(f"--acceptance is {source!r}; expected 'scalar' or 'profile'")
    if alpha is None and drafter.positions is not None:
        return AcceptanceModel(positions=list(drafter.positions), max_gamma=max_gamma, match_rate=drafter.match_rate)
    alpha = 0.7 if alpha is None else alpha
    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha is {alpha}; expected a probability in [0, 1]")
    return AcceptanceModel(alpha=alpha, max_gamma=max_gamma, match_rate=drafter.match_rate)


def format_ranges(result: dict) -> str:
    d = result.get("drafter") or {"kind": "draft_model"}
    lines = [f"profile {result['profile']}  α(mean) = {result['acceptance']['alpha_mean']:.3f}  "
             f"context {result['context_tokens']:.0f} tokens"
             + ("" if d["kind"] == "draft_model" else f"  drafter {d['kind']}"),
             f"{'batch':>11} {'γ':>3} {'predicted speedup (min / mean / max)':>38}"]
    for r in result["ranges"]:
        lines.append(f"{r['min_batch']:>5}–{r['max_batch']:<5} {r['gamma']:>3} "
                     f"{r['speedup_min']:>14.2f}x / {r['speedup_mean']:.2f}x / {r['speedup_max']:.2f}x")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specbatch-tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="default", help="profile folder, shipped profile name, or 'default'")
    p.add_argument("--alpha", type=float, default=None,
                   help="scalar acceptance rate (with --acceptance scalar; default: the drafter's documented rates, "
                        "conf/drafter/<kind>.yaml, 0.7 for draft_model)")
    p.add_argument("--drafter", choices=list(DRAFTER_KINDS), default="draft_model",
                   help="what drafts: draft_model (model=draft rows), eagle (model=eagle rows) or ngram (prompt "
                        "lookup, model=ngram rows); see sim/drafters.py")
    p.add_argument("--acceptance", choices=["scalar", "profile"], default="scalar",
                   help="scalar: --alpha; profile: per-position rates from the profile's acceptance.csv")
    p.add_argument("--context", type=float, default=1024.0, help="reference mean context in tokens (default 1024)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest batch size to cover (sequences; default: the profile's largest measured one)")
    p.add_argument("--max-gamma", type=int, default=None,
                   help="largest speculation length considered (default: the profile's largest measured γ)")
    p.add_argument("--draft-sync", action="store_true",
                   help="γ = 0 still runs one draft step (vLLM keeps its drafter's KV cache in step so)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="chunked prefill's token budget per forward (vLLM's name): γ*(b) ≤ budget/b − 1, and with "
                        "--prefill-waiting each γ pays for the prompt tokens it displaces (default: no budget)")
    p.add_argument("--prefill-waiting", type=int, default=0,
                   help="prompt tokens queued when pricing γ under --max-num-batched-tokens (default 0)")
    p.add_argument("--out", default=None,
                   help="folder to write tune.json, vllm.json, sglang.json into ('-': none). Default: tune/ with "
                        "--print ranges; with another --print, nothing is written unless --out is given. A line "
                        "on stderr names the files written")
    p.add_argument("--print", dest="show", choices=["ranges", "report", "json", "vllm", "sglang"], default="ranges",
                   help="what to print on stdout (report: the full quantitative model explanation)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .run import ConfigError, resolve_profile

    try:
        result, cost, acc = tune(str(resolve_profile(args.profile)), args.alpha, args.acceptance, args.context,
                                 args.max_batch, args.max_gamma, args.draft_sync,
                                 args.max_num_batched_tokens, args.prefill_waiting, drafter=args.drafter)
    except (ConfigError, ProfileError, ValueError) as e:
        print(f"specbatch-tune: error: {e}", file=sys.stderr)
        return 2
    for note in result["extrapolated"]:
        print(f"specbatch-tune: warning: extrapolating beyond profile {result['profile']}'s measured grid: {note}",
              file=sys.stderr)
    out_dir = args.out if args.out is not None else ("tune" if args.show == "ranges" else "-")
    if out_dir != "-":
        out = Path(out_dir)
        names = [out / n for n in ("tune.json", "vllm.json", "sglang.json")]
        for path, obj in zip(names, (result, result["vllm"], result["sglang"])):
            atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
        print(f"specbatch-tune: wrote {', '.join(str(n) for n in names)}", file=sys.stderr)
    if args.show == "ranges":
        print(format_ranges(result))
    elif args.show == "report":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExtrapolationWarning)
            print(report(cost, acc, args.context))
    else:
        print(json.dumps(result if args.show == "json" else result[args.show], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
