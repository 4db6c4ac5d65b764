"""``specbatch-dash``: collect one or more multirun folders (and single runs) into one tidy table
(Parquet, one row per run, swept overrides as ``sweep.*`` columns) and build the study's dashboard.

    specbatch-dash multirun/2026-01-01/12-00-00                 # → <folder>/dashboard.html, runs.parquet
    specbatch-dash multirun/a multirun/b outputs/x -o study.html --table study.parquet --static png,svg
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import build_dashboard
from .collect import collect, write_table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specbatch-dash", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="multirun folders, run folders, or folders holding them")
    p.add_argument("-o", "--output", help="dashboard HTML (default: <folder>/dashboard.html for one folder, "
                                          "else ./dashboard.html)")
    p.add_argument("--table", help="collected table, Parquet (default: beside the HTML, <name>.parquet)")
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--static", default="", help="also export every figure: comma list of png, svg, pdf, jpeg "
                                                 "(needs specbatch[export] and Chrome/Chromium)")
    p.add_argument("--static-dir", default=None, help="folder for the static figures (default: beside the HTML)")
    p.add_argument("--no-html", action="store_true", help="only write the table")
    p.add_argument("--slo-ttft", type=float, default=None,
                   help="score goodput at this TTFT SLO (s) with --slo-tpot; default: the runs' own if they set slo.*, "
                        "else derived from the profile (a multiple of the median prompt's prefill)")
    p.add_argument("--slo-tpot", type=float, default=None,
                   help="score goodput at this TPOT SLO (s) with --slo-ttft; default: the runs' own if they set "
                        "slo.*, else derived from the profile (a multiple of the no-speculation TPOT at batch 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if (a.slo_ttft is None) != (a.slo_tpot is None) or any(v is not None and not v > 0 for v in (a.slo_ttft, a.slo_tpot)):
        p.error("--slo-ttft and --slo-tpot go together, as positive seconds")
    try:
        table = collect(a.paths)
    except FileNotFoundError as e:
        print(f"specbatch-dash: error: {e}", file=sys.stderr)
        return 2
    if a.output:
        out = Path(a.output)
    elif len(a.paths) == 1 and Path(a.paths[0]).is_dir():
        out = Path(a.paths[0]) / "dashboard.html"
    else:
        out = Path("dashboard.html")
    tpath = write_table(table, a.table or out.with_name("runs.parquet" if not a.output else out.stem + ".parquet"))
    print(f"table: {tpath} ({len(table)} runs, {table.shape[1]} columns)")
    if not a.no_html:
        static = tuple(f.strip() for f in a.static.split(",") if f.strip())
        title = a.title or f"specbatch study: {', '.join(Path(p).name for p in a.paths)}"
        slo = (a.slo_ttft, a.slo_tpot) if a.slo_ttft is not None else None
        html = build_dashboard(table, out, title=title, static=static, static_dir=a.static_dir, slo=slo)
        print(f"dashboard: {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
