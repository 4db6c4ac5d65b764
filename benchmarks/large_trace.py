"""Benchmark: load a large request trace (default 2,000,000 rows) and report time and peak memory.

    python benchmarks/large_trace.py                 # 2M rows, arrival in seconds (CSV)
    python benchmarks/large_trace.py --rows 500000 --time-unit datetime
    python benchmarks/large_trace.py --format jsonl --rows 200000

The trace is generated in a temporary folder; each load runs in a fresh Python process whose peak resident
memory mark is reset after the imports (``/proc/self/clear_refs``), so ``rss_peak_mib - rss_before_mib`` is
what loading took. ``tracemalloc`` peak covers numpy/pandas buffers allocated
through Python's allocator (numpy arrays are tracked); RSS covers everything else (the CSV parser).
Exit status 1 when a limit given with ``--max-seconds`` / ``--max-rss-mib`` is exceeded.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_trace(path: Path, rows: int, time_unit: str = "s", fmt: str = "csv", seed: int = 0) -> None:
    """Write a synthetic trace with columns arrival, prompt, output (chunked, bounded memory)."""
    rng = np.random.default_rng(seed)
    chunk = 500_000
    t0 = 0.0
    with open(path, "w", encoding="utf-8") as f:
        if fmt == "csv":
            f.write("arrival,prompt,output\n")
        for lo in range(0, rows, chunk):
            n = min(chunk, rows - lo)
            t = t0 + np.cumsum(rng.exponential(0.01, n))
            t0 = float(t[-1])
            p = np.maximum(1, rng.lognormal(np.log(512), 1.0, n).astype(np.int64))
            o = np.maximum(1, rng.lognormal(np.log(128), 1.0, n).astype(np.int64))
            if time_unit == "datetime":
                ts = (np.datetime64("2024-01-01T00:00:00", "us") + (t * 1e6).astype("timedelta64[us]"))
                tcol = np.datetime_as_string(ts, unit="us")
                tcol = np.char.replace(tcol, "T", " ")
            elif time_unit == "ms":
                tcol = np.char.mod("%.3f", t * 1000)
            else:
                tcol = np.char.mod("%.6f", t)
            if fmt == "csv":
                f.write("\n".join(f"{a},{b},{c}" for a, b, c in zip(tcol.tolist(), p.tolist(), o.tolist())))
                f.write("\n")
            else:
                for a, b, c in zip(tcol.tolist(), p.tolist(), o.tolist()):
                    a = a if time_unit == "datetime" else float(a)
                    f.write(json.dumps({"arrival": a, "prompt": b, "output": c}) + "\n")


_CHILD = r"""
import json, sys, time, tracemalloc
from specbatch.sim.workload import load_trace
path, unit, trace = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")
try:  # reset the peak-RSS mark (Linux >= 4.0) so the peak below is the load's, not the imports'
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
rss0 = vm("VmRSS:")
if trace:
    tracemalloc.start()
t = time.perf_counter()
w = load_trace(path, time_unit=unit)
dt = time.perf_counter() - t
out = {"rows": len(w), "seconds": dt, "rss_before_mib": rss0, "rss_peak_mib": vm("VmHWM:"),
       "result_mib": (w.arrival_s.nbytes + w.prompt_tokens.nbytes + w.output_tokens.nbytes) / 2**20}
if trace:
    out = {"tracemalloc_peak_mib": tracemalloc.get_traced_memory()[1] / 2**20}
print(json.dumps(out))
"""


def measure(path: Path, time_unit: str) -> dict:
    """Load ``path`` in fresh interpreters: one timed (time, peak RSS), one under tracemalloc (its peak;
    tracemalloc slows allocation, so its run is not timed). Figures in seconds and MiB."""
    def child(trace: bool) -> dict:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), time_unit, "1" if trace else "0"], check=True,
                             capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    return {**child(False), **child(True)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--time-unit", default="s", choices=["s", "ms", "datetime"])
    ap.add_argument("--format", default="csv", choices=["csv", "jsonl"])
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--max-rss-mib", type=float, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"trace.{args.format}"
        t = time.perf_counter()
        write_trace(path, args.rows, args.time_unit, args.format)
        gen_s = time.perf_counter() - t
        size = path.stat().st_size / 2**20
        r = measure(path, args.time_unit)
    r.update({"file_mib": size, "generate_seconds": gen_s, "time_unit": args.time_unit, "format": args.format})
    print(json.dumps(r, indent=2))
    ok = (args.max_seconds is None or r["seconds"] <= args.max_seconds) and \
         (args.max_rss_mib is None or r["rss_peak_mib"] <= args.max_rss_mib)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
