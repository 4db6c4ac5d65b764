#!/usr/bin/env bash
# Profile standard pairs on one CUDA GPU with no internet:
#   OPT-125M/OPT-6.7B, Llama-68M/Llama-2-7B, Llama-3.2-1B/Llama-3-8B (GQA).
# Random weights with the exact shapes (no download), bf16, pre-allocated KV cache, grid conf/grid/gpu_capture.yaml.
# Each point is swept PASSES times and keeps the median of its pass medians (timing.passes): eager steps are
# bound by the host's kernel launches, and on a shared host their speed switches for seconds at a time, which
# one pass records as 2x jumps between neighbouring points (docs/measurements/h100-2026-11-26). On an H100
# one pass of the grid takes ~95 s per pair, so 3 passes of 3 pairs take ~15 minutes; pick pairs with PAIRS.
# Each pair gets a sweep deadline for all its passes (PAIR_DEADLINE s) and a hard kill (PAIR_TIMEOUT s); every
# finished point is already on disk, so a killed pair still leaves valid (incomplete) passes. OOM points are recorded.
#   profiler/gpu_capture.sh                 # writes traces/profiles/<gpu>-<draft>__<target>/
#   PASSES=1 OUT_DIR=/tmp/p PAIRS=llama-68m__llama-2-7b profiler/gpu_capture.sh timing.point_budget_s=0.2
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT_DIR:-$ROOT/traces/profiles}"
GRID="${GRID:-gpu_capture}"
PASSES="${PASSES:-3}"                   # sweeps of the grid per pair (median over passes)
PAIR_DEADLINE="${PAIR_DEADLINE:-$((100 * PASSES + 30))}"   # seconds of sweep per pair, all passes and repair
                                        # rounds of points the monotonicity gate disputes (model builds on top)
PAIR_TIMEOUT="${PAIR_TIMEOUT:-$((PAIR_DEADLINE + 30 + 20 * PASSES))}"   # hard limit per pair, seconds
PAIRS="${PAIRS:-opt-125m__opt-6.7b llama-68m__llama-2-7b llama-3.2-1b__llama-3-8b}"
PY="${PYTHON:-python3}"          # the interpreter that has torch (python3 on most GPU images)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_SDPA_FORCE_GQA=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
"$PY" - <<'PY' || { echo "gpu_capture: no CUDA device visible to torch" >&2; exit 1; }
import torch, sys
assert torch.cuda.is_available()
print("gpu_capture:", torch.cuda.get_device_name(), "torch", torch.__version__, file=sys.stderr)
PY
GPU="$("$PY" -c 'import torch; n=torch.cuda.get_device_name().lower(); print(next((k for k in ("h200","h100","a100","l40s","4090") if k in n), "gpu"))')"
START=$SECONDS
STATUS=0
for PAIR in $PAIRS; do
  echo "=== $PAIR (elapsed $((SECONDS - START)) s) ===" >&2
  timeout --signal=INT --kill-after=10 "$PAIR_TIMEOUT" \
    "$PY" -m specbatch.profiler.cli mode=profile device=cuda dtype=bfloat16 cache=prealloc "pair=$PAIR" "grid=$GRID" \
      "name=$GPU-$PAIR" "out_dir=$OUT_DIR" resume=true \
      timing.warmup=1 timing.min_samples=5 timing.max_samples=30 timing.floor_samples=3 \
      timing.rel_precision=0.02 timing.point_budget_s=0.25 "timing.deadline_s=$PAIR_DEADLINE" \
      "timing.passes=$PASSES" "note=\"gpu_capture.sh\"" "$@"
  rc=$?
  if [ $rc -ne 0 ]; then echo "gpu_capture: $PAIR exited with $rc (partial profile kept)" >&2; STATUS=$rc; fi
done
echo "gpu_capture: done in $((SECONDS - START)) s; profiles in $OUT_DIR/$GPU-*" >&2
"$PY" - "$OUT_DIR" "$GPU" <<'PY'
import sys, pathlib
from specbatch.sim.profile import load_profile
for p in sorted(pathlib.Path(sys.argv[1]).glob(sys.argv[2] + "-*")):
    try:
        prof = load_profile(p)
    except Exception as e:  # noqa: BLE001
        print(f"{p.name}: INVALID ({e})"); continue
    s = prof.steps
    print(f"{p.name}: {len(s)} points, {int((s.status == 'oom').sum())} oom, complete={prof.meta['timing'].get('complete')}, passes={prof.meta['timing'].get('passes', 1)}")
PY
exit $STATUS
