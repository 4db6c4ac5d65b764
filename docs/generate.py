"""Regenerate the result tables in README.md and docs/*.md from committed result files.

Every table of results in the documentation sits between two markers::

    <!-- table:NAME -->
    | ... |
    <!-- /table -->

and is produced by the function registered here under NAME, from files committed under ``docs/results/``,
``traces/profiles/`` or ``docs/measurements/`` — never typed by hand.

    python docs/generate.py             # rewrite every marked table from the result files
    python docs/generate.py --check     # exit 1 and name each marked table that differs (no rewrite)
    python docs/generate.py --results   # first rerun the studies into docs/results/ (about 4 minutes on
                                        # 2 cores), then rewrite the tables
    python docs/generate.py --results --study chunked   # one study only

``make docs`` runs the first form (``make docs DOCS_ARGS=--results`` the last). Rerun ``--results``
whenever the simulator's behaviour changes (cost model, capacity estimate, policies): the committed
result files are what the tables show.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PROFILE = "cpu-llama68m-tinyllama1.1b"
PROFILE_DIR = ROOT / "traces" / "profiles" / PROFILE
H100_REPORT = ROOT / "docs" / "measurements" / "h100-2026-11-27" / "validate-report.json"

#: The studies behind the tables: file stem -> (study name, extra overrides).
STUDIES = {
    "paper": ("paper", []),
    "policies": ("policies", []),
    "classes": ("classes", []),
    "policies-padded": ("policies", ["cluster.attention=padded"]),
    "chunked": ("chunked", []),
    "drafters": ("drafters", []),
}
#: Columns kept in docs/results/<study>.csv (besides the swept keys and the arm).
KEEP = ["arm", "policy_name", "gamma", "latency_mean", "latency_p50", "latency_p99", "ttft_mean", "tpot_mean",
        "throughput_tok_s", "goodput_req_s", "slo_attainment", "mean_batch", "mean_gamma", "preemptions",
        "completed", "rejected", "arrival_rate_req_s", "capacity_req_s"]
#: γ*(b) table: α, reference context (tokens), batches shown.
ALPHA, CONTEXT, BATCHES = 0.7, 1024.0, [1, 2, 4, 8, 16, 32]

MARKER = re.compile(r"(<!-- table:([a-z0-9-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


# --------------------------------------------------------------------------------------------- result files

def run_results(only: list[str] | None = None) -> None:
    """Rerun the studies of :data:`STUDIES` (``only`` those stems, when given) and the γ* table; write
    docs/results/."""
    import warnings

    import pandas as pd
    from omegaconf import OmegaConf

    from specbatch.sim.study import compose_run, expand, run_study, sweep_params

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_gamma_star()
    for stem, (name, overrides) in STUDIES.items():
        if only and stem not in only:
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = run_study(name, None, profile=PROFILE, overrides=overrides, jobs=2)
        swept = list(sweep_params(name))
        cols = ["study", "run"] + swept + [c for c in KEEP if c in table.columns]
        table[cols].to_csv(RESULTS / f"{stem}.csv", index=False, float_format="%.6g")
        first = compose_run(name, expand(sweep_params(name))[0], overrides + [f"profile={PROFILE}"])
        command = f"python -m specbatch.sim.study {name} --profile {PROFILE}" + "".join(
            f" --override {o}" for o in overrides)
        record = {"command": command, "sweep": sweep_params(name), "overrides": overrides,
                  "runs": len(table), "config_of_run_0": first}
        (RESULTS / f"{stem}.yaml").write_text(
            "# Written by docs/generate.py --results: the study behind docs/results/" + stem + ".csv\n"
            + OmegaConf.to_yaml(OmegaConf.create(record)))
        print(f"{stem}: {len(table)} runs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    del pd


def write_gamma_star() -> None:
    """docs/results/gamma-star.csv: per batch size, the verify cost ratio at γ = 4, γ*, its predicted speedup."""
    import warnings

    import pandas as pd

    from specbatch.sim.quant import point_curve, verify_cost_ratio
    from specbatch.sim.tune import tune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, cost, acc = tune(str(PROFILE_DIR), alpha=ALPHA, context=CONTEXT, max_batch=max(BATCHES))
    rows = []
    for b in range(1, max(BATCHES) + 1):
        g = result["table"][str(b)]
        e, t = point_curve(cost, acc, b, CONTEXT)
        plain = cost.target_verify(b, 0, CONTEXT)
        rows.append({"batch": b, "gamma_star": g, "verify4_over_decode": verify_cost_ratio(cost, b, 4, CONTEXT),
                     "speedup": (e[g] / t[g]) / (e[0] / plain), "alpha": ALPHA, "context": CONTEXT,
                     "profile": PROFILE})
    pd.DataFrame(rows).to_csv(RESULTS / "gamma-star.csv", index=False, float_format="%.6g")


# ------------------------------------------------------------------------------------------------- formatting

def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pct(x: float) -> str:
    s = f"{x:+.1f}"
    return "0.0" if s in ("+0.0", "-0.0") else s.replace("-", "−")


def read(stem: str):
    import pandas as pd

    path = RESULTS / f"{stem}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path.relative_to(ROOT)} is missing: run `python docs/generate.py --results`")
    return pd.read_csv(path)


def level_label(row, keys) -> str:
    wl = {"azure_conv": "conv", "azure_code": "code"}
    parts = [wl.get(str(row[k]), str(row[k])) if k == "workload" else f"{row[k]:.1f}" for k in keys]
    return " ".join(parts)


def gap_table(stem: str, arms: list[str]) -> str:
    """Gap to the per-load oracle in mean latency (%), one row per arm, one column per load level."""
    from specbatch.sim.study import compare

    t = read(stem)
    c = compare(t, "latency_mean")
    keys = [k for k in ("workload", "workload.load") if k in c.columns]
    levels = t.drop_duplicates(keys)[keys]  # in sweep order
    header = ["policy"] + [level_label(r, keys) for _, r in levels.iterrows()]
    rows = []
    for arm in arms:
        row = [arm]
        for _, lv in levels.iterrows():
            m = c[(c[keys] == lv[keys]).all(axis=1) & (c["arm"] == arm)]
            row.append(pct(float(m["gap_pct"].iloc[0])) if len(m) else "")
        rows.append(row)
    orc = [c[(c[keys] == lv[keys]).all(axis=1)]["oracle_arm"].iloc[0] for _, lv in levels.iterrows()]
    rows.append(["(oracle: best fixed γ)"] + orc)
    return md_table(header, rows)


# ---------------------------------------------------------------------------------------------------- tables

TABLES = {}


def table(name):
    def deco(fn):
        TABLES[name] = fn
        return fn
    return deco


@table("profile-steps")
def profile_steps() -> str:
    """The shipped CPU profile: target step time (median s) at context 1024 per batch and γ; draft decode."""
    import pandas as pd

    s = pd.read_csv(PROFILE_DIR / "steps.csv")
    s = s[(s["status"] == "ok") & (s["context"] == 1024)]
    tgt = s[s["model"] == "target"]
    drf = s[(s["model"] == "draft") & (s["phase"] == "decode")]
    gammas = sorted(int(t) - 1 for t in tgt[tgt["phase"] == "verify"]["tokens"].unique())
    header = ["batch", "decode (γ = 0)"] + [f"verify γ = {g}" for g in gammas] + ["draft decode"]
    rows = []
    for b in sorted(tgt["batch"].unique()):
        at = tgt[tgt["batch"] == b]
        row = [int(b), f"{at[at['phase'] == 'decode']['median_s'].iloc[0]:.3f}"]
        for g in gammas:
            v = at[(at["phase"] == "verify") & (at["tokens"] == g + 1)]["median_s"]
            row.append(f"{v.iloc[0]:.3f}" if len(v) else "")
        d = drf[drf["batch"] == b]["median_s"]
        row.append(f"{d.iloc[0]:.3f}" if len(d) else "")
        rows.append(row)
    return md_table(header, rows)


@table("gamma-star")
def gamma_star() -> str:
    """γ* against batch size (α = 0.7, context 1024) from docs/results/gamma-star.csv."""
    t = read("gamma-star").set_index("batch")
    header = ["batch"] + [str(b) for b in BATCHES]
    rows = [["T_verify(γ = 4) / T_decode"] + [f"{t.loc[b, 'verify4_over_decode']:.2f}" for b in BATCHES],
            ["γ*"] + [str(int(t.loc[b, "gamma_star"])) for b in BATCHES],
            ["predicted speedup"] + [f"{t.loc[b, 'speedup']:.2f}×" for b in BATCHES]]
    return md_table(header, rows)


@table("paper")
def paper() -> str:
    """`paper` study: per load, adaptive's mean batch, the oracle, and each arm's gap in mean latency."""
    from specbatch.sim.study import compare

    t = read("paper")
    c = compare(t, "latency_mean")
    arms = ["adaptive", "fixed-0", "fixed-1", "fixed-2", "fixed-4", "fixed-8"]
    header = ["load", "mean batch (adaptive)", "oracle", "oracle mean latency"] + arms + ["adaptive spread over seeds"]
    rows = []
    for load, g in c.groupby("workload.load"):
        ad = g[g["arm"] == "adaptive"].iloc[0]
        batch = t[(t["workload.load"] == load) & (t["arm"] == "adaptive")]["mean_batch"].median()
        spread = 100 * (ad["max"] - ad["min"]) / ad["median"]
        row = [f"{load:.1f}", f"{batch:.1f}", ad["oracle_arm"], f"{ad['oracle_latency_mean']:,.0f} s"]
        row += [pct(float(g[g["arm"] == a]["gap_pct"].iloc[0])) + " %" for a in arms]
        rows.append(row + [f"{spread:.1f} %"])
    return md_table(header, rows)


@table("readme-finding")
def readme_finding() -> str:
    """README's short version of the `paper` study."""
    from specbatch.sim.study import compare

    t = read("paper")
    c = compare(t, "latency_mean")
    header = ["load (of no-speculation capacity)", "mean batch", "best fixed γ", "adaptive vs best fixed γ",
              "no speculation vs best fixed γ"]
    rows = []
    for load, g in c.groupby("workload.load"):
        ad = g[g["arm"] == "adaptive"].iloc[0]
        batch = t[(t["workload.load"] == load) & (t["arm"] == "adaptive")]["mean_batch"].median()
        none = g[g["arm"] == "fixed-0"]["gap_pct"].iloc[0]
        rows.append([f"{load:.1f}", f"{batch:.1f}", ad["oracle_arm"].replace("fixed-", ""),
                     pct(float(ad["gap_pct"])) + " %", pct(float(none)) + " %"])
    return md_table(header, rows)


@table("policies")
def policies() -> str:
    return gap_table("policies", ["adaptive", "adaptive_context", "goodput", "threshold", "ema_tiers", "none",
                                  "fixed-1", "fixed-4", "fixed-8"])


@table("policies-padded")
def policies_padded() -> str:
    return gap_table("policies-padded", ["adaptive", "adaptive_context", "goodput", "threshold", "ema_tiers", "none",
                                         "fixed-1", "fixed-4", "fixed-8"])


@table("classes")
def classes() -> str:
    return gap_table("classes", ["adaptive", "goodput", "ema_tiers", "none", "fixed-1", "fixed-4"])


@table("chunked")
def chunked() -> str:
    """Per trace, token budget and load: the best fixed γ by mean latency, the adaptive policies' and no
    speculation's gaps to it, and no speculation's TTFT and TPOT gaps to the best fixed γ by those metrics."""
    from specbatch.sim.study import compare

    t = read("chunked")
    lat, ttft, tpot = (compare(t, m) for m in ("latency_mean", "ttft_mean", "tpot_mean"))
    keys = ["workload", "cluster.max_num_batched_tokens", "workload.load"]
    header = ["trace", "budget (tokens)", "load", "best fixed γ (latency)", "adaptive", "goodput", "none",
              "none: TTFT", "best fixed γ (TPOT)", "none: TPOT"]
    rows = []
    for _, lv in t.drop_duplicates(keys)[keys].iterrows():
        def at(c, arm):
            return c[(c[keys] == lv[keys]).all(axis=1) & (c["arm"] == arm)].iloc[0]
        wl = {"azure_conv": "conv", "azure_code": "code"}.get(str(lv["workload"]), str(lv["workload"]))
        rows.append([wl, f"{int(lv['cluster.max_num_batched_tokens']):,}", f"{lv['workload.load']:.1f}",
                     at(lat, "none")["oracle_arm"]] + [pct(float(at(lat, a)["gap_pct"])) for a in
                                                       ("adaptive", "goodput", "none")] +
                    [pct(float(at(ttft, "none")["gap_pct"])), at(tpot, "none")["oracle_arm"],
                     pct(float(at(tpot, "none")["gap_pct"]))])
    return md_table(header, rows)


@table("drafters")
def drafters() -> str:
    """Per drafter kind and load: the best fixed γ by mean latency, its latency, and the gaps of `adaptive` and
    no speculation to it, with adaptive's mean γ."""
    from specbatch.sim.study import compare

    t = read("drafters")
    lat = compare(t, "latency_mean")
    keys = ["drafter", "workload.load"]
    header = ["drafter", "load", "best fixed γ", "its mean latency", "adaptive", "none", "adaptive's mean γ"]
    rows = []
    for _, lv in t.drop_duplicates(keys)[keys].iterrows():
        at = lat[(lat[keys] == lv[keys]).all(axis=1)]
        ad = at[at["arm"] == "adaptive"].iloc[0]
        gam = t[(t[keys] == lv[keys]).all(axis=1) & (t["arm"] == "adaptive")]["mean_gamma"].median()
        rows.append([str(lv["drafter"]), f"{lv['workload.load']:.1f}", ad["oracle_arm"],
                     f"{ad['oracle_latency_mean']:,.0f} s", pct(float(ad["gap_pct"])),
                     pct(float(at[at["arm"] == "none"]["gap_pct"].iloc[0])), f"{gam:.2f}"])
    return md_table(header, rows)


@table("h100-validation")
def h100_validation() -> str:
    """The H100 validation (one round): paired error per case, from the committed report.json."""
    r = json.loads(H100_REPORT.read_text())
    header = ["load", "policy", "mean latency", "p99 latency", "throughput", "model step ÷ engine step"]
    rows = []
    for c in r["cases"]:
        e = c["errors"]["paired"]
        rows.append([f"{c['load']:.1f}", c["policy"], pct(100 * e["latency_mean"]) + " %",
                     pct(100 * e["latency_p99"]) + " %", pct(100 * e["throughput_tok_s"]) + " %",
                     f"{c['model_over_engine']['steps']:.2f}"])
    return md_table(header, rows)


# ---------------------------------------------------------------------------------------------------- driver

def doc_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def render(text: str, path: Path, cache: dict) -> str:
    def sub(m):
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"{path.relative_to(ROOT)}: unknown table {name!r}; known: {sorted(TABLES)}")
        if name not in cache:
            cache[name] = TABLES[name]()
        return m.group(1) + cache[name] + m.group(4)
    return MARKER.sub(sub, text)


def stale_tables() -> list[str]:
    """'<file>: <table>' for every marked table whose text differs from what the generator produces now."""
    out, cache = [], {}
    for path in doc_files():
        text = path.read_text()
        for m in MARKER.finditer(text):
            name = m.group(2)
            if name not in cache:
                cache[name] = TABLES[name]() if name in TABLES else None
            if cache[name] != m.group(3):
                out.append(f"{path.relative_to(ROOT)}: {name}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python docs/generate.py", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if a marked table differs; rewrite nothing")
    g.add_argument("--results", action="store_true", help="rerun the studies into docs/results/ first")
    p.add_argument("--study", action="append", choices=sorted(STUDIES), help="with --results: only this study "
                   "(repeatable)")
    args = p.parse_args(argv)
    if args.check:
        stale = stale_tables()
        for s in stale:
            print(f"stale table: {s}", file=sys.stderr)
        if stale:
            print("regenerate with: python docs/generate.py  (make docs)", file=sys.stderr)
        return 1 if stale else 0
    if args.results:
        run_results(args.study)
    cache: dict = {}
    for path in doc_files():
        text = path.read_text()
        new = render(text, path, cache)
        if new != text:
            path.write_text(new)
            print(f"updated {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
