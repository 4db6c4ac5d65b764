"""What a scenario's runs conclude, shown at the top of its dashboard section:

- the profile in words: where it was measured and in what units (:func:`describe_profile`, from its
  ``meta.json``);
- the SLOs the goodput is scored against (:func:`scenario_slo`): the runs' own when a run overrode
  ``slo.*``, else defaults derived from the profile's own step times — :data:`SLO_TTFT_PREFILLS` × the
  prefill of the median prompt and :data:`SLO_TPOT_DECODES` × the no-speculation TPOT at batch 1 (one
  decode step at the median context) — because the config's fixed defaults (10 s / 0.5 s) mean nothing on
  a profile whose prefill alone takes longer (:func:`rescore` recomputes goodput from each run's requests);
- arms that gave identical runs at every load (:func:`identical_arms`; ``threshold`` ≡ ``adaptive`` with
  their default parameters), whose curves lie on top of each other;
- per load: the best policy by mean end-to-end latency, its gain over no speculation and over the best
  fixed γ (:func:`best_by_load`), in a sentence and a small table (:func:`conclusion_html`).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: the metric the best policy is chosen by (lower is better)
PRIMARY = "latency_mean"
#: profile-derived default SLOs: TTFT ≤ this many prefills of the median prompt (queueing included) ...
SLO_TTFT_PREFILLS = 5.0
#: ... and TPOT ≤ this many no-speculation decode steps at batch 1 and the median context
SLO_TPOT_DECODES = 3.0
#: arms within this relative margin of the best one's mean latency are named beside it
CLOSE = 0.01
#: what must match for two arms to count as identical runs (the same decisions give bit-identical results)
_SAME = ("latency_mean", "latency_p99", "ttft_mean", "throughput_tok_s", "mean_gamma", "iterations", "makespan_s")


def x_load(df: pd.DataFrame) -> pd.Series:
    """The load axis: the ``workload.load`` fraction, else the arrival rate (req/s)."""
    return df["load"].where(df["load"].notna(), df["arrival_rate_req_s"])


def load_words(load: float, rate: float | None, is_fraction: bool) -> str:
    """``load 0.8 (4.21 req/s)`` or ``4.21 req/s``."""
    if not is_fraction:
        return f"{load:.3g} req/s"
    return f"load {load:.3g}" + (f" ({rate:.3g} req/s)" if rate is not None and np.isfinite(rate) else "")


# --- the profile ----------------------------------------------------------------------------------------


def read_meta(profile_dir) -> dict:
    try:
        return json.loads((Path(profile_dir) / "meta.json").read_text())
    except (OSError, ValueError, TypeError):
        return {}


def describe_profile(meta: dict) -> str:
    """Where a profile's step times come from, and their units, in words: e.g. ``measured on a 2-core CPU
    (AMD EPYC, 2 threads): seconds per step (shown in ms)``."""
    dev = meta.get("device") or {}
    kind, name = str(dev.get("kind") or "").lower(), dev.get("name")
    if meta.get("source", "measured") != "measured":
        where = f"{meta.get('source')} (not measured)"
        if name:
            where += f", device '{name}'"
    elif kind == "cpu":
        cores = dev.get("cpu_count")
        extra = ", ".join(x for x in (name, f"{dev['threads']} threads" if dev.get("threads") else None) if x)
        where = f"measured on a {f'{cores}-core ' if cores else ''}CPU" + (f" ({extra})" if extra else "")
    elif kind:
        where = f"measured on {name or kind} ({kind})"
    else:
        where = "measured on an unrecorded device"
    dtype = meta.get("dtype")
    return where + ": seconds per step (shown in ms)" + (f", {dtype}" if dtype else "")


# --- SLOs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SLO:
    """Goodput's service-level objectives (seconds) and where they come from, in words."""

    ttft_s: float
    tpot_s: float
    source: str
    derived: bool


def _overrides_slo(overrides) -> bool:
    return any(str(o).lstrip("+~").startswith("slo.") for o in str(overrides or "").split())


def profile_slo(profile, prompt_tokens: np.ndarray, output_tokens: np.ndarray, max_batch: int = 256) -> SLO:
    """The profile-derived default SLOs for a workload (its prompts' and outputs' token counts)."""
    import warnings

    from specbatch.sim.cost_model import CostModel

    cost = CostModel(profile, max_batch=max_batch)
    prompt = float(np.median(prompt_tokens))
    context = float(np.median(np.asarray(prompt_tokens) + np.asarray(output_tokens) / 2))
    with warnings.catch_warnings():  # a median beyond the grid: the cost model's own extrapolation is fine here
        warnings.simplefilter("ignore")
        prefill = cost.prefill(prompt)
        decode = cost.iteration(1, 0, context)
    return SLO(ttft_s=float(f"{SLO_TTFT_PREFILLS * prefill:.3g}"), tpot_s=float(f"{SLO_TPOT_DECODES * decode:.3g}"),
               derived=True,
               source=(f"derived from the profile: TTFT ≤ {SLO_TTFT_PREFILLS:g} × the prefill of the median prompt "
                       f"({prompt:.0f} tokens: {prefill:.3g} s), TPOT ≤ {SLO_TPOT_DECODES:g} × the no-speculation "
                       f"TPOT at batch 1 (one decode step at the median context, {context:.0f} tokens: "
                       f"{decode:.3g} s); the runs' config SLOs were its unchanged defaults — set slo.ttft_s / "
                       "slo.tpot_s in the runs, or --slo-ttft / --slo-tpot here, to choose others"))


def scenario_slo(df: pd.DataFrame, profile=None, explicit: tuple[float, float] | None = None) -> SLO | None:
    """The SLO a scenario's goodput is shown at: ``explicit`` (``(ttft_s, tpot_s)``) if given; the runs' own
    when any run set ``slo.*`` on its command line or sweep; else :func:`profile_slo` (None without a
    profile or requests to derive it from: the runs' own are kept)."""
    if explicit is not None:
        return SLO(float(explicit[0]), float(explicit[1]), "given to the dashboard (--slo-ttft / --slo-tpot)", False)
    own = df[df["overrides"].map(_overrides_slo)] if "overrides" in df else df.iloc[:0]
    if len(own) or profile is None:
        r = (own if len(own) else df).iloc[0]
        if "slo_ttft_s" not in r or pd.isna(r["slo_ttft_s"]):
            return None
        return SLO(float(r["slo_ttft_s"]), float(r["slo_tpot_s"]), "the runs' own (slo.* set in the runs)", False)
    try:
        req = pd.read_parquet(Path(df["run_dir"].iloc[0]) / "requests.parquet",
                              columns=["prompt_tokens", "output_tokens"])
    except (OSError, ValueError, KeyError):
        return None
    mb = df["cfg.cluster.max_batch"].iloc[0] if "cfg.cluster.max_batch" in df else None
    return profile_slo(profile, req["prompt_tokens"].to_numpy(), req["output_tokens"].to_numpy(),
                       int(mb) if mb is not None and pd.notna(mb) else 256)


def rescore(df: pd.DataFrame, slo: SLO | None) -> pd.DataFrame:
    """``df`` with ``goodput_req_s``, ``goodput_tok_s``, ``slo_attainment``, ``slo_ttft_s`` and ``slo_tpot_s``
    recomputed from each run's ``requests.parquet`` at ``slo`` (as :func:`specbatch.sim.metrics.summarize`
    scores them: a completed request meets the SLOs when TTFT ≤ ttft and TPOT ≤ tpot, a one-token request
    the TTFT alone; goodput is per second of the run's makespan). A run whose requests cannot be read keeps
    its own figures; so does every run when ``slo`` is None."""
    if slo is None:
        return df
    df = df.copy()
    for i, r in df.iterrows():
        try:
            req = pd.read_parquet(Path(r["run_dir"]) / "requests.parquet",
                                  columns=["rejected", "ttft_s", "tpot_s", "output_tokens"])
        except (OSError, ValueError, KeyError):
            continue
        done = req[~req["rejected"].astype(bool)]
        tpot = done["tpot_s"].to_numpy(dtype=float)
        ok = (done["ttft_s"].to_numpy(dtype=float) <= slo.ttft_s) & (np.isnan(tpot) | (tpot <= slo.tpot_s))
        span = float(r["makespan_s"]) if float(r["makespan_s"]) > 0 else float("nan")
        df.loc[i, ["goodput_req_s", "goodput_tok_s", "slo_attainment", "slo_ttft_s", "slo_tpot_s"]] = [
            float(ok.sum() / span), float(done["output_tokens"].to_numpy()[ok].sum() / span),
            float(ok.sum() / len(req)) if len(req) else float("nan"), slo.ttft_s, slo.tpot_s]
    return df


# --- identical arms and the best policy per load --------------------------------------------------------


def identical_arms(df: pd.DataFrame, series: pd.Series, settings: list[str]) -> dict[str, list[str]]:
    """Arms (``series`` labels) whose runs are identical at every load and setting (``settings``: the other
    swept columns) to an earlier arm (in label order): ``{first: [its twins]}``. Two arms count as identical
    when they ran the same load levels and every one of ``latency_mean, latency_p99, ttft_mean,
    throughput_tok_s, mean_gamma, iterations, makespan_s`` matches to 1e-9 (the same decisions replay the
    same simulation)."""
    cols = [c for c in _SAME if c in df]
    d = df.assign(_series=series.to_numpy(), _x=x_load(df).to_numpy())
    d["_cell"] = d[["_x", *settings]].astype(str).agg("|".join, axis=1)
    by = {s: g.drop_duplicates("_cell").set_index("_cell")[cols].astype(float).sort_index()
          for s, g in d.groupby("_series", sort=True)}
    out: dict[str, list[str]] = {}
    taken: set[str] = set()
    names = sorted(by)
    for i, a in enumerate(names):
        if a in taken:
            continue
        for b in names[i + 1:]:
            if b in taken or list(by[a].index) != list(by[b].index):
                continue
            if np.allclose(by[a].to_numpy(), by[b].to_numpy(), rtol=1e-9, atol=0.0, equal_nan=True):
                out.setdefault(a, []).append(b)
                taken.add(b)
    return out


def best_by_load(df: pd.DataFrame, series: pd.Series, settings: list[str], twins: dict[str, list[str]]) -> pd.DataFrame:
    """Per load level (and other swept setting): the best arm by mean latency (twins counted once, named
    with their first), its mean latency, no speculation's and the best fixed γ's, and the best arm's
    goodput and SLO attainment. Columns: ``x, rate, cell, best, best_s, none_s, fixed, fixed_s, vs_none,
    vs_fixed`` (relative change of mean latency: −0.31 = 31 % lower), ``close`` (the other arms within
    :data:`CLOSE` of the best), ``goodput_req_s, slo_attainment``."""
    dropped = {t for ts in twins.values() for t in ts}
    d = df.assign(_series=series.to_numpy(), _x=x_load(df).to_numpy())
    d = d[~d["_series"].isin(dropped)]
    keys = list(settings)
    rows = []
    for cell, g in d.groupby(["_x", *keys], sort=True, dropna=False):
        cell = cell if isinstance(cell, tuple) else (cell,)
        g = g[np.isfinite(g[PRIMARY].astype(float))]
        if g.empty:
            continue
        best = g.loc[g[PRIMARY].astype(float).idxmin()]
        none = g[g["policy"] == "none"]
        fixed = g[g["policy"] == "fixed"]
        fbest = fixed.loc[fixed[PRIMARY].astype(float).idxmin()] if len(fixed) else None
        none_s = float(none[PRIMARY].iloc[0]) if len(none) else float("nan")
        fixed_s = float(fbest[PRIMARY]) if fbest is not None else float("nan")
        best_s = float(best[PRIMARY])
        near = g[(g["_series"] != best["_series"]) & (g[PRIMARY].astype(float) <= best_s * (1 + CLOSE))]
        rows.append({"x": float(cell[0]), "rate": float(g["arrival_rate_req_s"].iloc[0]),
                     "cell": ", ".join(f"{k.removeprefix('sweep.')}={v}" for k, v in zip(keys, cell[1:])),
                     "best": best["_series"], "best_policy": best["policy"], "best_s": best_s,
                     "close": list(near.sort_values(PRIMARY)["_series"]),
                     "none_s": none_s, "fixed": fbest["_series"] if fbest is not None else None, "fixed_s": fixed_s,
                     "vs_none": best_s / none_s - 1 if none_s > 0 else float("nan"),
                     "vs_fixed": best_s / fixed_s - 1 if fixed_s > 0 else float("nan"),
                     "goodput_req_s": float(best.get("goodput_req_s", float("nan"))),
                     "slo_attainment": float(best.get("slo_attainment", float("nan")))})
    return pd.DataFrame(rows)


def seconds(x: float) -> str:
    """``196``, ``1,972``, ``0.443``: seconds to three significant digits, never in e-notation."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _with_twins(name: str, twins: dict[str, list[str]]) -> str:
    return name + (f" (≡ {', '.join(twins[name])})" if name in twins else "")


def _pct(rel: float) -> str:
    return f"{abs(100 * rel):.0f} % {'lower' if rel < 0 else 'higher'}" if abs(rel) >= 0.005 else "the same"


def sentence(row: dict, twins: dict[str, list[str]], is_fraction: bool) -> str:
    """One load level's conclusion in words."""
    where = load_words(row["x"], row["rate"], is_fraction) + (f", {row['cell']}" if row["cell"] else "")
    best = _with_twins(row["best"], twins)
    if row.get("close"):
        best += f" (within {100 * CLOSE:g} %: {', '.join(_with_twins(c, twins) for c in row['close'])})"
    s = f"At {where}, {best} is best: mean latency {seconds(row['best_s'])} s"
    parts = []
    if row["best_policy"] == "none":
        s = f"At {where}, no speculation is best: mean latency {seconds(row['best_s'])} s"
        if np.isfinite(row["fixed_s"]):
            parts.append(f"the best fixed γ ({row['fixed']}) is {_pct(row['fixed_s'] / row['best_s'] - 1)}")
    else:
        if np.isfinite(row["none_s"]):
            parts.append(f"{_pct(row['vs_none'])} than no speculation ({seconds(row['none_s'])} s)")
        if row["best_policy"] == "fixed":
            parts.append("it is the best fixed γ")
        elif np.isfinite(row["fixed_s"]):
            parts.append(f"{_pct(row['vs_fixed'])} than the best fixed γ ({row['fixed']}, {seconds(row['fixed_s'])} s)")
    return s + (", " + " and ".join(parts) if parts else "") + "."


def conclusion_html(df: pd.DataFrame, series: pd.Series, settings: list[str], twins: dict[str, list[str]],
                    slo: SLO | None, profile_words: str | None) -> str:
    """The conclusion block of one scenario (``<div class="conclusion">``): sentences, a table, identical
    arms, the SLOs and the profile's device and units."""
    is_fraction = bool(df["load"].notna().all())
    best = best_by_load(df, series, settings, twins)
    out = ['<div class="conclusion" data-conclusion="1"><h3>Conclusion</h3>']
    if best.empty:
        out.append("<p>No run with a finite mean latency: nothing to compare.</p>")
    else:
        out.append("<ul>" + "".join(f"<li>{html.escape(sentence(r, twins, is_fraction))}</li>"
                                    for r in best.to_dict("records")) + "</ul>")
        head = ["load", "best policy (by mean latency)", "mean latency (s)", "vs no speculation",
                "vs best fixed γ", "goodput (req/s)", "SLO met"]
        body = []
        for r in best.to_dict("records"):
            cells = [load_words(r["x"], r["rate"], is_fraction) + (f", {r['cell']}" if r["cell"] else ""),
                     _with_twins(r["best"], twins), seconds(r["best_s"]),
                     f"{100 * r['vs_none']:+.1f} %" if np.isfinite(r["vs_none"]) else "—",
                     (f"{100 * r['vs_fixed']:+.1f} % ({r['fixed']})" if np.isfinite(r["vs_fixed"]) else "—"),
                     f"{r['goodput_req_s']:.3g}", f"{100 * r['slo_attainment']:.0f} %"]
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        out.append('<table class="best"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                   + "".join(body) + "</table>")
        runs = df.groupby([x_load(df), *settings], dropna=False).size() if settings else x_load(df).value_counts()
        per = int(runs.max() / max(1, series.nunique())) if len(runs) else 0
        n = int(df["requests"].iloc[0]) if "requests" in df and pd.notna(df["requests"].iloc[0]) else None
        out.append("<p class='meta'>vs: relative change of the best policy's mean latency (negative: lower). "
                   + (f"One simulated run per policy and load ({n} requests, one seed): a difference of a few % "
                      "may not hold for another sample of requests." if per <= 1 and n else "") + "</p>")
    for first, others in twins.items():
        out.append(f"<p class='twins'>{html.escape(' and '.join([*others, first]))} gave identical runs at every "
                   f"load (the same decisions): their curves lie on top of each other; they are listed as "
                   f"“{html.escape(others[0])} (≡ {html.escape(first)})”.</p>")
    if slo is not None:
        out.append(f"<p class='slo'>Goodput and SLO met: TTFT ≤ {slo.ttft_s:.3g} s and TPOT ≤ {slo.tpot_s:.3g} s, "
                   f"{html.escape(slo.source)}.</p>")
    if profile_words:
        out.append(f"<p class='device'>Profile {html.escape(profile_words)}.</p>")
    out.append("</div>")
    return "".join(out)
