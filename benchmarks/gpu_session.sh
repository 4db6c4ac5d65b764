#!/usr/bin/env bash
# The device checks for a session with one CUDA GPU, within BUDGET_S seconds (default 540), results under $OUT
# laid out as the repository is, so that a session copies them in as they are:
#   $OUT/traces/profiles/<gpu>-<draft>__<target>/   each pair's merged profile (meta.json, steps.csv)
#   $OUT/docs/measurements/<gpu>-<date>/            the logs, figures.txt, the per-pass folders and validate/
# Steps (issue #22 item 5, issue #23):
#   1. for each pair of PAIRS (draft:target; default the three standard pairs) specbatch-profile with CUDA
#      graphs and the engine attention (profiler/graphs.py, profiler/attention.py) on grid GRID (gpu_session),
#      PASSES passes (3), at most PROFILE_S seconds a pair (75; about 20 s more to build the models);
#   2. specbatch-validate --device cuda of VALIDATE_PAIR (the first pair), REPEATS rounds (2) of
#      VALIDATE_REQUESTS requests (24), in the time left: the engine replays its steps from CUDA graphs
#      (fidelity/graphs.py) and profiles the pair with graphs; if that leaves no report, once more eagerly;
#   3. AB=1 only: the first pair the old way (transformers sdpa, explicit masks, eager) on a few points;
#   4. the figures (benchmarks/gpu_figures.py): batch-1 decode against its HBM bound, verify(γ=4)/decode by
#      batch, γ*(b) from the simulator's model, roofline ratios, probed SDPA backends, validation errors.
# Every step runs under a timeout and the next one runs whatever the last one did. Needs the profile extra
# (torch with CUDA, transformers) and no internet.
#   OUT=/tmp/gpu benchmarks/gpu_session.sh
#   DEVICE=cpu PAIRS=tiny-llama-draft:tiny-llama GRID=tiny BUDGET_S=300 benchmarks/gpu_session.sh  # dry run
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
PAIRS="${PAIRS:-llama-68m:llama-2-7b llama-3.2-1b:llama-3-8b qwen2.5-0.5b:qwen2.5-7b}"
VALIDATE_PAIR="${VALIDATE_PAIR:-${PAIRS%% *}}"
GRID="${GRID:-gpu_session}"
BUDGET_S="${BUDGET_S:-540}"
PROFILE_S="${PROFILE_S:-75}"
PASSES="${PASSES:-3}"
REPEATS="${REPEATS:-2}"
VALIDATE_REQUESTS="${VALIDATE_REQUESTS:-24}"
AB="${AB:-}"
OLD_S="${OLD_S:-60}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
T0=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - T0))); }
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  DTYPE=bfloat16; BUDGET_PT=0.25
  THREAD_ARGS=()
else
  DTYPE=float32; BUDGET_PT=0.05
  THREAD_ARGS=(threads=1)  # one torch thread: timing.clock=auto takes the process's CPU time (steady on a busy machine)
fi
# the device's short name: the roofline table's key for a known GPU (h100-sxm, h200, ...), else "cpu" / a slug
GPU=$("$PY" - "$DEVICE" <<'PY'
import re, sys
import torch
from specbatch.profiler.roofline import gpu_spec_for
if not sys.argv[1].startswith("cuda"):
    print("cpu")
else:
    name = torch.cuda.get_device_name(0)
    print(gpu_spec_for(name) or re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
PY
)
MEAS="$OUT/docs/measurements/$GPU-$(date -u +%F)"
PROFILES="$OUT/traces/profiles"
mkdir -p "$MEAS" "$PROFILES"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
  | tee "$MEAS/versions.txt"
echo "device $GPU; pairs: $PAIRS; grid $GRID, $PASSES passes, $PROFILE_S s a pair; validate $VALIDATE_PAIR" \
  "($REPEATS rounds); results under $OUT"

profile() {  # draft target name deadline_s [extra overrides...]: one specbatch-profile run into $PROFILES/name
  local draft=$1 target=$2 name=$3 deadline=$4; shift 4
  timeout --signal=INT --kill-after=10 $((deadline + 60)) "$PY" -m specbatch.profiler.cli mode=profile \
    "pair.target=$target" "pair.draft=$draft" "pair.name=${draft}__${target}" "device=$DEVICE" "dtype=$DTYPE" \
    cache=prealloc progress=false resume=false "out_dir=$PROFILES" "name=$name" timing.warmup=1 \
    timing.min_samples=5 timing.max_samples=30 timing.floor_samples=3 timing.rel_precision=0.02 \
    "timing.point_budget_s=$BUDGET_PT" timing.repairs=1 "${THREAD_ARGS[@]}" "grid=$GRID" "$@"
}

NAMES=()
for PAIR in $PAIRS; do
  DRAFT="${PAIR%%:*}"; TARGET="${PAIR#*:}"; NAME="$GPU-${DRAFT}__${TARGET}"
  if [ "$(left)" -lt $((PROFILE_S / 2 + 30)) ]; then
    echo "== 1. $NAME skipped ($(left) s left)"; continue
  fi
  echo "== 1. $NAME: graphs + engine attention, $PASSES passes (elapsed $((SECONDS - T0)) s)"
  profile "$DRAFT" "$TARGET" "$NAME" "$PROFILE_S" "timing.passes=$PASSES" "timing.deadline_s=$PROFILE_S" \
    "note=\"gpu_session.sh: engine-style, $PASSES passes\"" > "$MEAS/profile_$NAME.txt" 2>&1 \
    || echo "   (exited with $?; see $MEAS/profile_$NAME.txt)"
  grep -v "^\s*$" "$MEAS/profile_$NAME.txt" | tail -8
  if [ -d "$PROFILES/$NAME" ]; then  # the passes are evidence, not part of the shipped profile
    mkdir -p "$MEAS/passes/$NAME"
    find "$PROFILES/$NAME" -mindepth 1 -maxdepth 1 -type d -exec mv {} "$MEAS/passes/$NAME/" \;
  fi
  NAMES+=("$PROFILES/$NAME")
done

RESERVE=20; [ -n "$AB" ] && RESERVE=$((RESERVE + OLD_S))  # the figures, and the A/B when asked
REST=$(( $(left) - RESERVE ))
if [ "$REST" -ge 120 ]; then
  VD="${VALIDATE_PAIR%%:*}"; VT="${VALIDATE_PAIR#*:}"
  echo "== 2. validate $VD / $VT, $REPEATS rounds, $REST s (elapsed $((SECONDS - T0)) s)"
  validate() {  # log [extra flags]: one validation into $MEAS/validate within the time left
    local log=$1; shift
    timeout --signal=INT --kill-after=10 "$(( $(left) - RESERVE ))" "$PY" -m specbatch.fidelity.validate \
      --device "$DEVICE" --pair "$VT:$VD" --requests "$VALIDATE_REQUESTS" --repeats "$REPEATS" \
      --out "$MEAS/validate" "$@" > "$log" 2>&1 || echo "   (exited with $?; see $log)"
    tail -5 "$log"
  }
  validate "$MEAS/validate.txt"  # on CUDA the engine replays graphs and the profile is taken with graphs
  if [ ! -f "$MEAS/validate/report.json" ] && [ "$DEVICE" = cuda ] && [ $(( $(left) - RESERVE )) -ge 120 ]; then
    echo "   no report: once more with both eager (--no-graphs), $(( $(left) - RESERVE )) s"
    validate "$MEAS/validate-eager.txt" --no-graphs
  fi
else
  echo "== 2. validate skipped ($REST s left)"
fi

AB_ARGS=()
if [ -n "$AB" ] && [ "$(left)" -ge $((OLD_S + 20)) ]; then
  echo "== 3. the old way for comparison: attention=sdpa (explicit masks), eager (elapsed $((SECONDS - T0)) s)"
  DRAFT="${PAIRS%%:*}"; TARGET="${PAIRS#*:}"; TARGET="${TARGET%% *}"
  CTX=$("$PY" -c "from omegaconf import OmegaConf; g = OmegaConf.load('conf/grid/$GRID.yaml'); print(sorted(g.contexts)[0])")
  BIG=$("$PY" -c "from omegaconf import OmegaConf; g = OmegaConf.load('conf/grid/$GRID.yaml'); print(min(64, max(g.batches)))")
  for NAME_ATT in "old:attention=sdpa timing.graphs=false" "new:attention=specbatch_sdpa"; do
    TAG="${NAME_ATT%%:*}"; ARGS="${NAME_ATT#*:}"
    # shellcheck disable=SC2086
    profile "$DRAFT" "$TARGET" "ab-$TAG" $((OLD_S / 2)) "grid.batches=[1,$BIG]" "grid.gammas=[0,4]" \
      "grid.contexts=[$CTX]" "grid.prefill_lengths=[512]" "grid.prefill_batches=[1]" \
      "timing.deadline_s=$((OLD_S / 2))" $ARGS > "$MEAS/profile_ab_$TAG.txt" 2>&1 \
      || echo "   ($TAG exited with $?; see $MEAS/profile_ab_$TAG.txt)"
    [ -d "$PROFILES/ab-$TAG" ] && mv "$PROFILES/ab-$TAG" "$MEAS/ab-$TAG"
  done
  AB_ARGS=(--ab "$MEAS/ab-old" "$MEAS/ab-new")
fi

echo "== 4. figures (elapsed $((SECONDS - T0)) s)"
"$PY" benchmarks/gpu_figures.py "${NAMES[@]}" "${AB_ARGS[@]}" --validation "$MEAS/validate/report.json" \
  | tee "$MEAS/figures.txt"
echo "== done (elapsed $((SECONDS - T0)) s)"
