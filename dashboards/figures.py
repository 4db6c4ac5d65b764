"""The dashboard's Plotly figures. Each builder takes the collected table (:mod:`specbatch.dashboards.collect`) or a
profile and returns a :class:`plotly.graph_objects.Figure`; :mod:`specbatch.dashboards.build` lays them out.

Times in figures are shown in milliseconds (step times) or seconds (request latencies), as labelled.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from specbatch.sim.acceptance import AcceptanceModel
from specbatch.sim.cost_model import CostModel
from specbatch.sim.profile import Profile

from .conclusions import describe_profile, x_load

TEMPLATE = "plotly_white"
ALPHAS = np.round(np.arange(0.30, 0.951, 0.05), 2)
#: y-metrics of the latency–throughput figure: (summary column, label).
LT_METRICS = [("latency_p50", "latency p50 (s)"), ("latency_p99", "latency p99 (s)"), ("ttft_p50", "TTFT p50 (s)"),
              ("tpot_mean", "TPOT mean (s/token)")]
#: metrics of the speedup figure: (summary column, label, lower_is_better).
SPEEDUP_METRICS = [("latency_mean", "mean latency", True), ("latency_p99", "p99 latency", True),
                   ("tpot_mean", "mean TPOT", True), ("throughput_tok_s", "throughput", False),
                   ("goodput_req_s", "goodput", False)]


def _dropdown(buttons: list[dict], x: float = 1.0, y: float = 1.2, label: str | None = None) -> dict:
    return dict(type="dropdown", buttons=buttons, x=x, y=y, xanchor="right", yanchor="top", showactive=True,
                pad={"r": 4, "t": 0}, **({"name": label} if label else {}))


def _visibility_buttons(groups: list[str], trace_group: list[str], prefix: str = "") -> list[dict]:
    return [dict(label=f"{prefix}{g}", method="restyle", args=[{"visible": [tg == g for tg in trace_group]}])
            for g in groups]


# --- profile ---------------------------------------------------------------------------------------------


def profile_explorer(profile: Profile) -> go.Figure:
    """Left: step time over batch for each γ (target verify of γ+1 tokens; γ=0 is plain decode) and the
    draft decode step, at one measured context (dropdown). Right: verify cost relative to decode,
    T_verify(b, γ, c) / T_decode(b, c)."""
    s = profile.ok_steps
    tgt = s[(s["model"] == "target") & s["phase"].isin(["decode", "verify"])]
    drf = s[(s["model"] == "draft") & (s["phase"] == "decode") & (s["tokens"] == 1)]
    contexts = sorted(tgt["context"].unique())
    fig = make_subplots(rows=1, cols=2, subplot_titles=("step time over batch", "verify cost relative to decode"),
                        horizontal_spacing=0.1)
    group: list[str] = []
    first = str(contexts[0]) if contexts else ""
    for c in contexts:
        tc = tgt[tgt["context"] == c]
        dec = tc[tc["tokens"] == 1].set_index("batch")["median_s"]
        for t in sorted(tc["tokens"].unique()):
            g = int(t) - 1
            r = tc[tc["tokens"] == t].sort_values("batch")
            color = f"hsl({int(250 - 250 * g / max(1, tc['tokens'].max() - 1))},70%,45%)"
            fig.add_trace(go.Scatter(x=r["batch"], y=r["median_s"] * 1e3, mode="lines+markers", name=f"γ={g}",
                                     legendgroup=f"g{g}", line=dict(color=color), visible=str(c) == first,
                                     hovertemplate="b=%{x}<br>%{y:.3f} ms"), row=1, col=1)
            group.append(str(c))
            ratio = r.set_index("batch")["median_s"] / dec.reindex(r["batch"]).to_numpy()
            fig.add_trace(go.Scatter(x=ratio.index, y=ratio.to_numpy(), mode="lines+markers", name=f"γ={g}",
                                     legendgroup=f"g{g}", showlegend=False, line=dict(color=color),
                                     visible=str(c) == first, hovertemplate="b=%{x}<br>×%{y:.2f}"), row=1, col=2)
            group.append(str(c))
        d = drf[drf["context"] == c].sort_values("batch")
        if len(d):
            fig.add_trace(go.Scatter(x=d["batch"], y=d["median_s"] * 1e3, mode="lines+markers", name="draft decode",
                                     line=dict(color="black", dash="dot"), visible=str(c) == first,
                                     hovertemplate="b=%{x}<br>%{y:.3f} ms"), row=1, col=1)
            group.append(str(c))
    fig.update_xaxes(type="log", title_text="batch (sequences)")
    fig.update_yaxes(type="log", title_text="step time (ms)", row=1, col=1)
    fig.update_yaxes(title_text="T_verify(b, γ) / T_decode(b)", row=1, col=2)
    fig.update_layout(template=TEMPLATE, height=460, margin=dict(t=90),
                      title=dict(text=f"Profile {profile.name}: step times (context dropdown, tokens)<br><sup>"
                                      f"{describe_profile(profile.meta)}</sup>"),
                      updatemenus=[_dropdown(_visibility_buttons([str(c) for c in contexts], group, "context "))])
    return fig


def _gamma_star(cost: CostModel, alphas, batches, contexts, max_gamma: int) -> pd.DataFrame:
    """γ* over batch × α × context: sim.quant (issue 4) when present, else sim.policies' tables."""
    try:
        from specbatch.sim.quant import gamma_star_grid
        return gamma_star_grid(cost, list(alphas), batches, contexts, max_gamma)[["batch", "context", "alpha", "gamma_star"]]
    except ImportError:
        from specbatch.sim.policies import optimal_gamma_table
        rows = []
        for a in alphas:
            acc = AcceptanceModel(alpha=float(a), max_gamma=max_gamma)
            for c in contexts:
                tab = optimal_gamma_table(cost, acc, float(c), max_gamma)
                rows += [(int(b), float(c), float(a), int(tab[b - 1])) for b in batches]
        return pd.DataFrame(rows, columns=["batch", "context", "alpha", "gamma_star"])


def gamma_star(profile: Profile, *, max_batch: int, max_gamma: int, context: float, alpha: float) -> go.Figure:
    """γ* (the throughput-optimal speculation length) over batch × acceptance α at the reference context,
    and over batch × context at the run's α, from the quantitative model on this profile."""
    cost = CostModel(profile, max_batch=max_batch, max_gamma=max_gamma)
    batches = list(range(1, max_batch + 1))
    measured = [float(c) for c in cost.contexts]
    contexts = sorted(set(np.geomspace(min(measured), max(measured), 8).round().tolist()) | set(measured))
    by_alpha = _gamma_star(cost, ALPHAS, batches, [context], max_gamma)
    by_ctx = _gamma_star(cost, [alpha], batches, contexts, max_gamma)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=(f"γ* over batch × α (context {context:.0f} tokens)",
                                        f"γ* over batch × context (α = {alpha:.2f})"))
    za = by_alpha.pivot_table(index="alpha", columns="batch", values="gamma_star")
    zc = by_ctx.pivot_table(index="context", columns="batch", values="gamma_star")
    common = dict(colorscale="Viridis", zmin=0, zmax=max_gamma, hovertemplate="b=%{x}<br>%{y}<br>γ*=%{z}")
    fig.add_trace(go.Heatmap(x=za.columns, y=za.index, z=za.to_numpy(), colorbar=dict(title="γ*", x=1.02), **common),
                  row=1, col=1)
    fig.add_trace(go.Heatmap(x=zc.columns, y=[f"{c:.0f}" for c in zc.index], z=zc.to_numpy(), showscale=False, **common),
                  row=1, col=2)
    fig.update_xaxes(title_text="batch (sequences)")
    fig.update_yaxes(title_text="acceptance α", row=1, col=1)
    fig.update_yaxes(title_text="context (tokens)", type="category", row=1, col=2)
    fig.update_layout(template=TEMPLATE, height=430, title=f"Optimal γ* from the quantitative model ({profile.name})")
    return fig


def gamma_star_by_drafter(profile: Profile, *, max_batch: int, max_gamma: int, context: float) -> go.Figure | None:
    """γ*(b) side by side for each drafter kind the profile has rows for (draft model, EAGLE head, n-gram
    lookup), each with its own step costs and its documented acceptance defaults (conf/drafter/<kind>.yaml), at
    the reference context; ``None`` when the profile has rows for the draft model only."""
    from specbatch.sim.quant import gamma_star_by_drafter as table

    t = table(profile, context=context, batches=range(1, max_batch + 1), max_batch=max_batch, max_gamma=max_gamma)
    if t["drafter"].nunique() < 2:
        return None
    fig = go.Figure()
    for kind, g in t.groupby("drafter", sort=False):
        fig.add_trace(go.Scatter(x=g["batch"], y=g["gamma_star"], mode="lines+markers", name=kind, line_shape="hv",
                                 customdata=g[["speedup", "alpha"]].to_numpy(),
                                 hovertemplate="b=%{x}<br>γ*=%{y}<br>speedup %{customdata[0]:.2f}x"
                                               "<br>α(mean)=%{customdata[1]:.2f}"))
    fig.update_xaxes(title_text="batch (sequences)")
    fig.update_yaxes(title_text="γ*", range=[-0.3, max_gamma + 0.3])
    fig.update_layout(template=TEMPLATE, height=400,
                      title=f"Optimal γ* per drafter (context {context:.0f} tokens, {profile.name})")
    return fig


# --- study results ---------------------------------------------------------------------------------------


def series_of(df: pd.DataFrame, setting_cols: list[str]) -> pd.Series:
    """Curve name per run: the policy label, plus any other swept setting (e.g. replicas)."""
    if not setting_cols:
        return df["policy_label"]
    extra = df[setting_cols].astype(str).apply(
        lambda r: ", ".join(f"{c.removeprefix('sweep.')}={v}" for c, v in r.items()), axis=1)
    return df["policy_label"] + " · " + extra


def latency_throughput(df: pd.DataFrame, setting_cols: list[str]) -> go.Figure:
    """One curve per policy over the load levels: throughput (x) against a latency metric (dropdown)."""
    d = df.assign(series=series_of(df, setting_cols), x_load=x_load(df)).sort_values(["series", "x_load"])
    fig = go.Figure()
    names = list(dict.fromkeys(d["series"]))
    fraction = bool(df["load"].notna().all())
    # every policy runs the same load levels: one curve (none's, else the first) carries the load labels
    labelled = "none" if "none" in names else (names[0] if names else None)
    for s in names:
        r = d[d["series"] == s]
        twin = "(≡ " in s  # identical to another arm (build.py names it so): dotted, open markers, on top
        fig.add_trace(go.Scatter(x=r["throughput_tok_s"], y=r[LT_METRICS[0][0]],
                                 mode="lines+markers+text" if s == labelled else "lines+markers", name=s,
                                 text=[f"load {v:.3g}" if fraction else f"{v:.3g} req/s" for v in r["x_load"]],
                                 textposition="top left", textfont=dict(size=11),
                                 customdata=[f"load {v:.3g}" if fraction else f"{v:.3g} req/s" for v in r["x_load"]],
                                 line=dict(dash="dot") if twin else None,
                                 marker=dict(symbol="circle-open", size=11) if twin else None,
                                 hovertemplate="%{customdata}<br>%{x:.3g} tok/s<br>%{y:.3g}"))
    buttons = [dict(label=label, method="update",
                    args=[{"y": [d[d["series"] == s][col].tolist() for s in names]}, {"yaxis.title.text": label}])
               for col, label in LT_METRICS]
    fig.update_layout(template=TEMPLATE, height=450, margin=dict(t=90),
                      title=f"Latency–throughput per policy (the {labelled} curve's points labelled with their "
                            + ("load)" if fraction else "arrival rate)"),
                      xaxis_title="throughput (output tokens/s)", yaxis_title=LT_METRICS[0][1],
                      updatemenus=[_dropdown(buttons)])
    return fig


def speedup(df: pd.DataFrame, setting_cols: list[str]) -> go.Figure:
    """Speedup over no speculation at each load level: none's metric / policy's (lower-is-better metrics)
    or policy's / none's (throughput, goodput), matched on load and any other swept setting."""
    d = df.assign(x_load=x_load(df))
    key = ["x_load", *setting_cols]
    base = d[d["policy"] == "none"].drop_duplicates(key).set_index(key)
    others = d[d["policy"] != "none"].copy()
    fig = go.Figure()
    if base.empty or others.empty:
        fig.add_annotation(text="needs runs of policy none and of another policy at the same load", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(template=TEMPLATE, height=300, title="Speedup over no speculation")
        return fig
    idx = pd.MultiIndex.from_frame(others[key]) if len(key) > 1 else pd.Index(others["x_load"])
    others["series"] = series_of(others, [])
    ratios = {}
    for col, _, lower in SPEEDUP_METRICS:
        b = base[col].reindex(idx).to_numpy(dtype=float)
        v = others[col].to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios[col] = np.where(np.isfinite(b), b / v if lower else v / b, np.nan)
    others["x_label"] = others[key].astype(str).apply(lambda r: " · ".join(r), axis=1) if setting_cols \
        else others["x_load"].map(lambda v: f"{v:.3g}")
    others = others.assign(**{f"r_{c}": ratios[c] for c in ratios}).sort_values(["series", "x_load"])
    names = list(dict.fromkeys(others["series"]))
    col0 = SPEEDUP_METRICS[0][0]
    for s in names:
        r = others[others["series"] == s]
        fig.add_trace(go.Bar(x=r["x_label"], y=r[f"r_{col0}"], name=s, hovertemplate="load %{x}<br>×%{y:.3f}"))
    fig.add_hline(y=1.0, line_dash="dash", line_color="gray")
    buttons = [dict(label=f"{label} speedup", method="update",
                    args=[{"y": [others[others["series"] == s][f"r_{col}"].tolist() for s in names]},
                          {"yaxis.title.text": f"{label}: speedup over none (×)"}])
               for col, label, _ in SPEEDUP_METRICS]
    fig.update_layout(template=TEMPLATE, height=450, margin=dict(t=90), barmode="group",
                      title="Speedup over no speculation per load level",
                      xaxis_title="load (fraction of no-speculation capacity)" if df["load"].notna().all() else "arrival rate (req/s)",
                      yaxis_title=f"{SPEEDUP_METRICS[0][1]}: speedup over none (×)", updatemenus=[_dropdown(buttons)])
    return fig


def _ecdf(x: np.ndarray, points: int = 300) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(x[np.isfinite(x)])
    if len(x) == 0:
        return x, x
    q = np.linspace(0, 1, min(points, len(x)))
    return np.quantile(x, q), q


def latency_cdf(df: pd.DataFrame, setting_cols: list[str], column: str = "latency_s") -> go.Figure:
    """Empirical CDF of per-request end-to-end latency per policy, one load level at a time (dropdown)."""
    d = df.assign(series=series_of(df, setting_cols), x_load=x_load(df)).sort_values(["x_load", "series"])
    loads = list(dict.fromkeys(d["x_load"]))
    fig = go.Figure()
    group = []
    for ld in loads:
        for _, r in d[d["x_load"] == ld].iterrows():
            req = pd.read_parquet(Path(r["run_dir"]) / "requests.parquet", columns=[column])
            x, q = _ecdf(req[column].to_numpy(dtype=float))
            fig.add_trace(go.Scatter(x=x, y=q, mode="lines", name=r["series"], visible=ld == loads[0],
                                     hovertemplate="%{x:.2f} s<br>%{y:.0%}"))
            group.append(str(ld))
    fig.update_layout(template=TEMPLATE, height=450, margin=dict(t=90), title="Latency CDF per policy (load dropdown)",
                      xaxis_title="end-to-end latency (s)", yaxis_title="fraction of requests",
                      updatemenus=[_dropdown(_visibility_buttons([str(x) for x in loads], group, "load "))])
    return fig


def _downsample(it: pd.DataFrame, max_points: int) -> pd.DataFrame:
    if len(it) <= max_points:
        return it
    step = int(np.ceil(len(it) / max_points))
    return it.iloc[::step]


def timeline(df: pd.DataFrame, setting_cols: list[str], max_points: int = 1500) -> go.Figure:
    """One run's timeline (dropdown over runs): batch size, γ, queue length and KV use over time, one line
    per replica. Long runs are thinned to ``max_points`` iterations per replica."""
    d = df.assign(series=series_of(df, setting_cols), x_load=x_load(df)).sort_values(["x_load", "series"])
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=("running batch (sequences)", "γ", "queue (requests)", "KV use (fraction)"))
    runs, group = [], []
    for i, (_, r) in enumerate(d.iterrows()):
        f = Path(r["run_dir"]) / "iterations.parquet"
        if not f.is_file():
            continue
        label = f"{r['series']} @ load {r['x_load']:.3g}"
        runs.append(label)
        it = pd.read_parquet(f)
        cap = r.get("kv_capacity_tokens")
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
        for rep, g in it.groupby("replica"):
            g = _downsample(g.sort_values("start_s"), max_points)
            kv = g["kv_tokens"] / float(cap) if cap and float(cap) > 0 else g["kv_tokens"]
            for row, y in enumerate((g["batch"], g["gamma"], g["queue"], kv), start=1):
                fig.add_trace(go.Scattergl(x=g["start_s"], y=y, mode="lines", name=f"replica {int(rep)}",
                                           legendgroup=f"r{int(rep)}", showlegend=row == 1, visible=len(runs) == 1,
                                           line=dict(shape="hv", width=1, color=palette[int(rep) % len(palette)])),
                              row=row, col=1)
                group.append(label)
    fig.update_xaxes(title_text="simulated time (s)", row=4, col=1)
    fig.update_layout(template=TEMPLATE, height=760, margin=dict(t=100), title="Run timeline (run dropdown)",
                      updatemenus=[_dropdown(_visibility_buttons(runs, group), y=1.12)])
    return fig


TABLE_COLUMNS = [("policy_label", "policy", None), ("x_load", "load", ".3g"), ("arrival_rate_req_s", "rate (req/s)", ".3g"),
                 ("throughput_tok_s", "throughput (tok/s)", ".3g"), ("goodput_req_s", "goodput (req/s)", ".3g"),
                 ("slo_attainment", "SLO met", ".1%"), ("ttft_p50", "TTFT p50 (s)", ".2f"), ("ttft_p99", "TTFT p99 (s)", ".2f"),
                 ("tpot_p50", "TPOT p50 (ms)", None), ("latency_p50", "latency p50 (s)", ".2f"),
                 ("latency_p99", "latency p99 (s)", ".2f"), ("mean_batch", "mean batch", ".1f"),
                 ("mean_gamma", "mean γ", ".2f"), ("preemptions", "preemptions", None)]


def summary_table(df: pd.DataFrame, setting_cols: list[str]) -> go.Figure:
    """The summary metrics of every run of the scenario."""
    d = df.assign(x_load=x_load(df), policy_label=series_of(df, setting_cols)).sort_values(["x_load", "policy_label"])
    cols, header = [], []
    for col, label, fmt in TABLE_COLUMNS:
        if col not in d:
            continue
        v = d[col]
        if col == "tpot_p50":
            v = (v * 1e3).map(lambda x: f"{x:.1f}")
        elif fmt:
            v = v.map(lambda x, f=fmt: "" if pd.isna(x) else format(x, f))
        cols.append(v.astype(str).tolist())
        header.append(label)
    # the policy column as wide as its longest name needs (names are never cut off); the rest share the width
    longest = max([len(header[0]), *map(len, cols[0])]) if cols else 10
    widths = [max(1.0, longest / 9)] + [1.0] * (len(cols) - 1)
    fig = go.Figure(go.Table(header=dict(values=header, fill_color="#e8eef7", align="left"),
                             cells=dict(values=cols, align="left", height=24), columnwidth=widths))
    fig.update_layout(height=90 + 26 * max(1, len(d)), margin=dict(l=10, r=10, t=40, b=10), title="Summary metrics")
    return fig


def reference_point(df: pd.DataFrame) -> tuple[float, float]:
    """(reference context, α) for the γ* maps: the adaptive policy's context if recorded, else the mean
    prompt plus half the mean output of the first run; α from the config (0.7 if per-position)."""
    r = df.iloc[0]
    context = None
    for _, row in df.iterrows():
        pj = Path(row["run_dir"]) / "policy.json"
        if pj.is_file():
            c = json.loads(pj.read_text()).get("context")
            if c is not None:
                context = float(c)
                break
    if context is None:
        req = pd.read_parquet(Path(r["run_dir"]) / "requests.parquet", columns=["prompt_tokens", "output_tokens"])
        context = float(req["prompt_tokens"].mean() + req["output_tokens"].mean() / 2)
    alpha = r.get("cfg.acceptance.alpha")
    alpha = float(alpha) if alpha is not None and not pd.isna(alpha) else 0.7
    return context, alpha
