#!/usr/bin/env bash
# The device checks for a session with one CUDA GPU, within BUDGET_S seconds (default 540), results under $OUT:
#   1. benchmarks/engine_shapes.py — the engine's step with a repeated vs a fresh attention span, cuDNN
#      attention allowed vs disabled (is there a per-shape cost?);
#   2. specbatch-validate on CUDA — engine vs simulator, Llama-68M / Llama-2-7B, REPEATS rounds (default 1;
#      on an H100 a profile pass takes about 70 s and a round about 170 s, so 3 passes and 1 round take
#      about 6.5 minutes and 2 rounds about 9.5) (report.json, dashboard.html);
#   3. profiler/gpu_capture.sh for one pair with 3 passes, in whatever time is left (skipped under 150 s).
# Needs the profile extra installed (torch with CUDA, transformers) and no internet.
#   OUT=/tmp/gpu benchmarks/gpu_session.sh
#   SKIP_CAPTURE=1 benchmarks/gpu_session.sh
#   DEVICE=cpu TARGET=tiny-llama DRAFT=tiny-llama-draft BUDGET_S=200 benchmarks/gpu_session.sh   # a dry run
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
TARGET="${TARGET:-llama-2-7b}"
DRAFT="${DRAFT:-llama-68m}"
BUDGET_S="${BUDGET_S:-540}"
VALIDATE_S="${VALIDATE_S:-450}"
REPEATS="${REPEATS:-1}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - T0))); }
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
echo "== engine shapes (elapsed $((SECONDS - T0)) s)"
timeout 120 "$PY" benchmarks/engine_shapes.py --device "$DEVICE" --target "$TARGET" --draft "$DRAFT" \
  | tee "$OUT/engine_shapes.txt"
echo "== validate (elapsed $((SECONDS - T0)) s)"
timeout "$VALIDATE_S" "$PY" -m specbatch.fidelity.validate --device "$DEVICE" --pair "$TARGET:$DRAFT" --requests 40 \
  --repeats "$REPEATS" --out "$OUT/validate" | tee "$OUT/validate.txt"
CAPTURE_S=$(( $(left) - 20 ))
if [ -z "${SKIP_CAPTURE:-}" ] && [ "$DEVICE" = cuda ] && [ "$CAPTURE_S" -ge 150 ]; then
  echo "== capture, $CAPTURE_S s (elapsed $((SECONDS - T0)) s)"
  PAIRS="${PAIRS:-${DRAFT}__${TARGET}}" OUT_DIR="$OUT/profiles" PAIR_DEADLINE=$((CAPTURE_S - 50)) \
    PAIR_TIMEOUT="$CAPTURE_S" bash profiler/gpu_capture.sh progress=false
else
  echo "== capture skipped ($CAPTURE_S s left, device $DEVICE)"
fi
echo "== done (elapsed $((SECONDS - T0)) s)"
