#!/usr/bin/env bash
# Regenerate the shipped CPU profile (traces/profiles/cpu-llama68m-tinyllama1.1b): llama-68m draft +
# tinyllama-1.1b target (random weights, exact shapes), fp32, grid conf/grid/cpu.yaml, all cores.
# About 15 minutes on a quiet 2-core AVX2 machine; run it when nothing else is running (load is recorded).
#   profiler/cpu_capture.sh                       # the full capture
#   GRID=cpu_short profiler/cpu_capture.sh        # the short interim capture (a few minutes)
#   PAIR=tiny GRID=tiny NAME=x OUT_DIR=/tmp profiler/cpu_capture.sh   # smoke test
# Extra hydra overrides may follow (keys other than those set through the variables below).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PAIR="${PAIR:-llama-68m__tinyllama-1.1b}"
GRID="${GRID:-cpu}"
NAME="${NAME:-cpu-llama68m-tinyllama1.1b}"
OUT_DIR="${OUT_DIR:-$ROOT/traces/profiles}"
THREADS="${THREADS:-$(nproc)}"
DEADLINE="${DEADLINE:-1500}"   # seconds; a safety net, points not reached are left out (meta: complete=false)
NOTE="${NOTE:-cpu_capture.sh; check loadavg_start/loadavg_end: a busy machine inflates the times}"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec python -m specbatch.profiler.cli mode=profile device=cpu dtype=float32 cache=prealloc \
  "pair=$PAIR" "grid=$GRID" "name=$NAME" "out_dir=$OUT_DIR" "threads=$THREADS" resume=false \
  timing.warmup=1 timing.min_samples=5 timing.floor_samples=2 timing.point_budget_s=1.0 \
  "timing.deadline_s=$DEADLINE" "note=\"$NOTE\"" "$@"
