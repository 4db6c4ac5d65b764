"""Build the study dashboard: one self-contained HTML file (plotly.js embedded inline, opens with no
network) from the collected table (:mod:`specbatch.dashboards.collect`).

Layout: three dropdowns (workload, draft → target pair, profile) pick a *scenario*; each scenario's
section opens with its conclusion (``<div class="conclusion">``, :mod:`specbatch.dashboards.conclusions`: per
load the best policy and its gain over no speculation and over the best fixed γ, identical arms, the SLOs
goodput is scored at, the profile's device and units), then holds, in order (element ids ``s<k>-<name>``):

``profile``   profile explorer: step time over batch per γ and context, verify cost relative to decode
``gamma``     γ* over batch × acceptance and over batch × context (quantitative model)
``lt``        latency–throughput curves per policy over the load levels
``speedup``   speedup over no speculation per load level
``cdf``       latency CDFs per policy at each load level
``timeline``  one run's timeline: batch, γ, queue, KV use over time per replica
``table``     summary metrics of every run

:func:`export_static` writes each figure as PNG/SVG through kaleido (needs Chrome/Chromium).
"""
from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from specbatch.sim.profile import atomic_write_text, load_profile

from . import conclusions as C
from . import figures as F

FIGURES = ("profile", "gamma", "drafters", "lt", "speedup", "cdf", "timeline", "table")  # (drafters: when profiled)
_NOT_SETTINGS = ("sweep.policy", "sweep.workload.load", "sweep.workload.rate", "sweep.profile", "sweep.workload",
                 "sweep.print_summary", "sweep.save_iterations")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 24px 40px;color:#222;background:#fafbfc}
h1{font-size:1.5em;margin:18px 0 4px} h2{font-size:1.15em;margin:26px 0 6px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em;margin:0 0 10px}
.controls{position:sticky;top:0;z-index:10;background:#fafbfc;padding:8px 0;border-bottom:1px solid #ddd}
.controls label{margin-right:18px;font-weight:600} .controls select{margin-left:6px;font-size:1em;max-width:420px}
.fig{background:#fff;border:1px solid #e3e3e3;border-radius:6px;margin:12px 0;padding:4px}
.note{color:#a33;padding:6px 0} .grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.conclusion{background:#fff;border:1px solid #cfd8e3;border-left:4px solid #3b6fb6;border-radius:6px;margin:12px 0;
 padding:4px 14px 8px} .conclusion h3{margin:8px 0 4px;font-size:1.05em} .conclusion li{margin:2px 0}
.conclusion table.best{border-collapse:collapse;margin:6px 0;font-size:.92em}
.conclusion table.best td,.conclusion table.best th{border:1px solid #dde3ea;padding:3px 8px;text-align:left}
.conclusion table.best th{background:#e8eef7} .conclusion p{margin:5px 0}
@media (max-width:1200px){.grid{grid-template-columns:1fr}}
"""

JS = """
(function(){
  var keys=['workload','pair','profile'];
  function sel(k){return document.getElementById('sel-'+k);}
  function show(){
    var want={}; keys.forEach(function(k){want[k]=sel(k).value;});
    var any=false;
    document.querySelectorAll('section.scenario').forEach(function(s){
      var on=keys.every(function(k){return s.dataset[k]===want[k];});
      s.style.display=on?'':'none';
      if(on){any=true; s.querySelectorAll('.js-plotly-plot').forEach(function(g){if(window.Plotly){Plotly.Plots.resize(g);}});}
    });
    document.getElementById('missing').style.display=any?'none':'';
  }
  keys.forEach(function(k){sel(k).addEventListener('change',show);});
  window.specbatchShow=show; show();
})();
"""


def scenario_settings(df: pd.DataFrame) -> list[str]:
    """Swept columns that vary inside one scenario besides policy and load (e.g. replicas, α)."""
    out = []
    for c in df.columns:
        if not c.startswith("sweep.") or c in _NOT_SETTINGS or c.startswith("sweep.policy."):
            continue
        if df[c].astype(str).nunique(dropna=False) > 1:
            out.append(c)
    return out


def _profile_of(df: pd.DataFrame):
    pdir = df["profile_dir"].dropna()
    return load_profile(pdir.iloc[0]) if len(pdir) else None


def mark_twins(df: pd.DataFrame, series: pd.Series, twins: dict[str, list[str]]) -> pd.DataFrame:
    """``df`` with each twin arm's ``policy_label`` naming the arm it is identical to: ``threshold (≡ adaptive)``."""
    first_label = {}
    for first, others in twins.items():
        label = df.loc[(series == first).to_numpy(), "policy_label"].iloc[0]
        first_label.update({o: label for o in others})
    if not first_label:
        return df
    df = df.copy()
    hit = series.isin(list(first_label)).to_numpy()
    df.loc[hit, "policy_label"] = [f"{p} (≡ {first_label[s]})" for p, s in zip(df.loc[hit, "policy_label"], series[hit])]
    return df


def scenario_figures(df: pd.DataFrame, profile=None) -> dict[str, go.Figure]:
    """Every figure of one scenario's section (a part of the table sharing workload, pair and profile)."""
    settings = scenario_settings(df)
    figs: dict[str, go.Figure] = {}
    profile = profile if profile is not None else _profile_of(df)
    if profile is not None:
        figs["profile"] = F.profile_explorer(profile)
        context, alpha = F.reference_point(df)
        r = df.iloc[0]
        figs["gamma"] = F.gamma_star(profile, max_batch=int(r.get("cfg.cluster.max_batch", 64)),
                                     max_gamma=int(r.get("cfg.max_gamma", 8)), context=context, alpha=alpha)
        drafters = F.gamma_star_by_drafter(profile, max_batch=int(r.get("cfg.cluster.max_batch", 64)),
                                           max_gamma=int(r.get("cfg.max_gamma", 8)), context=context)
        if drafters is not None:
            figs["drafters"] = drafters
    figs["lt"] = F.latency_throughput(df, settings)
    figs["speedup"] = F.speedup(df, settings)
    figs["cdf"] = F.latency_cdf(df, settings)
    figs["timeline"] = F.timeline(df, settings)
    figs["table"] = F.summary_table(df, settings)
    return figs


def _options(name: str, values: list[str]) -> str:
    opts = "".join(f'<option value="{html.escape(v, quote=True)}">{html.escape(v)}</option>' for v in values)
    return f'<label>{name}<select id="sel-{name}">{opts}</select></label>'


def scenario_section(part: pd.DataFrame, slo: tuple[float, float] | None = None):
    """One scenario's conclusion block (HTML) and figures: goodput rescored at the scenario's SLOs
    (:func:`specbatch.dashboards.conclusions.scenario_slo`), identical arms named after their first."""
    profile = _profile_of(part)
    settings = scenario_settings(part)
    chosen = C.scenario_slo(part, profile, slo)
    part = C.rescore(part, chosen)
    series = F.series_of(part, settings)
    twins = C.identical_arms(part, series, settings)
    words = f"{profile.name} {C.describe_profile(profile.meta)}" if profile is not None else None
    block = C.conclusion_html(part, series, settings, twins, chosen, words)
    return block, scenario_figures(mark_twins(part, series, twins), profile)


def build_dashboard(table: pd.DataFrame, out_html: str | os.PathLike, title: str = "specbatch study",
                    static: tuple[str, ...] = (), static_dir: str | os.PathLike | None = None,
                    slo: tuple[float, float] | None = None) -> Path:
    """Write the dashboard HTML for ``table`` to ``out_html`` and return its path. With ``static``
    (e.g. ``("png", "svg")``) also export every figure to ``static_dir`` (default: beside the HTML).
    ``slo``: ``(ttft_s, tpot_s)`` to score goodput at, instead of each scenario's default
    (:func:`specbatch.dashboards.conclusions.scenario_slo`)."""
    out_html = Path(out_html)
    counts = table["scenario"].value_counts()
    scenarios = sorted(dict.fromkeys(table["scenario"]), key=lambda sc: -counts[sc])  # the largest shows first
    ordered = table.set_index("scenario").loc[scenarios].reset_index()
    sections, all_figs = [], {}
    for k, sc in enumerate(scenarios):
        part = table[table["scenario"] == sc].reset_index(drop=True)
        block, figs = scenario_section(part, slo)
        r = part.iloc[0]
        attrs = " ".join(f'data-{a}="{html.escape(str(r[a]), quote=True)}"' for a in ("workload", "pair", "profile"))
        divs = []
        for name in FIGURES:
            if name not in figs:
                continue
            fid = f"s{k}-{name}"
            all_figs[fid] = figs[name]
            div = pio.to_html(figs[name], full_html=False, include_plotlyjs=False, div_id=fid,
                              config={"displaylogo": False, "responsive": True})
            divs.append(f'<div class="fig" data-figure="{name}">{div}</div>')
        studies = sorted(set(part["study"]))
        sections.append(
            f'<section class="scenario" id="scenario-{k}" {attrs}><h2>{html.escape(sc)}</h2>'
            f'<p class="meta">{len(part)} runs · policies: {html.escape(", ".join(dict.fromkeys(part["policy_label"])))}'
            f' · from {html.escape(", ".join(studies))}</p>{block}{"".join(divs)}</section>')
    controls = "".join(_options(n, list(dict.fromkeys(ordered[n].astype(str)))) for n in ("workload", "pair", "profile"))
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{CSS}</style><script type="text/javascript">{get_plotlyjs()}</script></head><body>'
            f'<h1>{html.escape(title)}</h1><p class="meta">{len(table)} runs · {len(scenarios)} scenario(s) · '
            f'studies: {html.escape(", ".join(sorted(set(table["study"]))))}</p>'
            f'<div class="controls">{controls}</div>'
            f'<p id="missing" class="note" style="display:none">No runs for this workload · pair · profile.</p>'
            f'{"".join(sections)}<script type="text/javascript">{JS}</script>'
            f'<script type="application/json" id="specbatch-figures">{json.dumps(sorted(all_figs))}</script>'
            f'</body></html>')
    atomic_write_text(out_html, page)
    if static:
        export_static(all_figs, Path(static_dir) if static_dir else out_html.with_suffix(""), static)
    return out_html


def find_chromium() -> str | None:
    """A Chrome/Chromium binary: $BROWSER_PATH, else chromium / google-chrome on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def export_static(figs: dict[str, go.Figure], folder: str | os.PathLike, formats=("png",),
                  width: int = 1200, height: int | None = None) -> list[Path]:
    """Write every figure as ``<folder>/<id>.<fmt>`` through kaleido (``pip install 'specbatch[export]'``).

    kaleido v1 drives a system Chrome/Chromium; it is found through ``$BROWSER_PATH`` (set here to the
    first of chromium / google-chrome on PATH when unset, e.g. Debian's ``/usr/bin/chromium``)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise RuntimeError("static export needs kaleido: pip install 'specbatch[export]'") from None
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("static export needs Chrome or Chromium (e.g. apt-get install chromium); "
                           "set BROWSER_PATH to its binary")
    os.environ.setdefault("BROWSER_PATH", browser)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figs_l, paths = [], []
    for fid, fig in figs.items():
        for fmt in formats:
            figs_l.append(fig)
            paths.append(folder / f"{fid}.{fmt}")
    pio.write_images(figs_l, paths, width=width, height=height)
    return paths
