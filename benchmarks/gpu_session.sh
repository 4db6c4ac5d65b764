#!/usr/bin/env bash
# The device checks for a session with one CUDA GPU, in about 10 minutes, results under $OUT (default ./gpu-out):
#   1. benchmarks/engine_shapes.py — the engine's step with a repeated vs a fresh attention span, cuDNN
#      attention allowed vs disabled (is there a per-shape cost?);
#   2. specbatch-validate on CUDA — engine vs simulator, Llama-68M / Llama-2-7B (report.json, dashboard.html);
#   3. profiler/gpu_capture.sh for one pair with 3 passes (a profile that can pass the gate and ship).
# Needs the profile extra installed (torch with CUDA, transformers) and no internet.
#   OUT=/tmp/gpu benchmarks/gpu_session.sh
#   SKIP_CAPTURE=1 benchmarks/gpu_session.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== engine shapes (elapsed $((SECONDS - T0)) s)"
timeout 180 "$PY" benchmarks/engine_shapes.py --device cuda --target llama-2-7b --draft llama-68m | tee "$OUT/engine_shapes.txt"
echo "== validate (elapsed $((SECONDS - T0)) s)"
timeout 330 "$PY" -m profiler.validate --device cuda --pair llama-2-7b:llama-68m --requests 40 --out "$OUT/validate" \
  | tee "$OUT/validate.txt"
if [ -z "${SKIP_CAPTURE:-}" ]; then
  echo "== capture (elapsed $((SECONDS - T0)) s)"
  PAIRS="${PAIRS:-llama-68m__llama-2-7b}" OUT_DIR="$OUT/profiles" bash profiler/gpu_capture.sh progress=false
fi
echo "== done (elapsed $((SECONDS - T0)) s)"
