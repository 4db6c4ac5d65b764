#!/usr/bin/env bash
# The device checks for a session with one CUDA GPU, within BUDGET_S seconds (default 540), results under $OUT.
# Issue #22: profile the GPU the way a serving engine runs it (CUDA graphs for decode/verify, SDPA with implicit
# causal masks: profiler/graphs.py, profiler/attention.py), then print the figures the next issue checks.
#   1. specbatch-profile of DRAFT/TARGET (Llama-68M / Llama-2-7B) on grid GRID (gpu_capture) with graphs and the
#      engine attention, PASSES passes (default 1), deadline PROFILE_S s (default 240) -> $OUT/profiles/engine;
#   2. the same pair the old way (transformers sdpa, explicit masks, eager: attention=sdpa timing.graphs=false) on a
#      small grid (batches 1 and 64, γ 0 and 4, one context) for a before/after on the same GPU (OLD_S s, 90);
#   3. the figures: target batch-1 decode against its HBM bound (weights + KV bytes / bandwidth), verify(γ=4) /
#      decode at batch 1, γ*(b) per batch size for α = 0.6 / 0.8 (argmax over the measured γ of
#      E[tokens | α, γ] / (γ T_draft + T_verify)), the roofline_ratio block and the SDPA backends actually used;
#   4. benchmarks/engine_shapes.py and (RUN_VALIDATE=1) specbatch-validate, in whatever time is left.
# Needs the profile extra (torch with CUDA, transformers) and no internet.
#   OUT=/tmp/gpu benchmarks/gpu_session.sh
#   DEVICE=cpu TARGET=tiny-llama DRAFT=tiny-llama-draft GRID=tiny BUDGET_S=300 benchmarks/gpu_session.sh  # dry run
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
TARGET="${TARGET:-llama-2-7b}"
DRAFT="${DRAFT:-llama-68m}"
GRID="${GRID:-gpu_capture}"
BUDGET_S="${BUDGET_S:-540}"
PROFILE_S="${PROFILE_S:-240}"
PASSES="${PASSES:-1}"
OLD_S="${OLD_S:-90}"
VALIDATE_S="${VALIDATE_S:-450}"
REPEATS="${REPEATS:-1}"
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
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
PAIR_ARGS=("pair.target=$TARGET" "pair.draft=$DRAFT" "pair.name=${DRAFT}__${TARGET}" "device=$DEVICE" "dtype=$DTYPE"
           cache=prealloc progress=false resume=false "out_dir=$OUT/profiles" timing.warmup=1
           timing.min_samples=5 timing.max_samples=30 timing.floor_samples=3 timing.rel_precision=0.02
           "timing.point_budget_s=$BUDGET_PT" timing.repairs=1 "${THREAD_ARGS[@]}")

echo "== 1. engine-style profile: graphs + $("$PY" -c 'from specbatch.profiler.attention import NAME; print(NAME)') (elapsed $((SECONDS - T0)) s)"
timeout --signal=INT --kill-after=10 $((PROFILE_S + 60)) "$PY" -m specbatch.profiler.cli mode=profile "${PAIR_ARGS[@]}" \
  "grid=$GRID" name=engine "timing.passes=$PASSES" "timing.deadline_s=$PROFILE_S" \
  "note=\"gpu_session.sh: engine-style\"" 2>&1 | tee "$OUT/profile_engine.txt" | grep -v "^\s*$" | tail -25

if [ "$(left)" -ge $((OLD_S + 60)) ]; then
  echo "== 2. the old way for comparison: attention=sdpa (explicit masks), eager (elapsed $((SECONDS - T0)) s)"
  CTX=$("$PY" -c "from omegaconf import OmegaConf; g = OmegaConf.load('conf/grid/$GRID.yaml'); print(sorted(g.contexts)[len(g.contexts) // 2])")
  BIG=$("$PY" -c "from omegaconf import OmegaConf; g = OmegaConf.load('conf/grid/$GRID.yaml'); print(min(64, max(g.batches)))")
  for NAME_ATT in "old:attention=sdpa timing.graphs=false" "new:attention=specbatch_sdpa"; do
    NAME="${NAME_ATT%%:*}"; ARGS="${NAME_ATT#*:}"
    # shellcheck disable=SC2086
    timeout --signal=INT --kill-after=10 $((OLD_S / 2 + 30)) "$PY" -m specbatch.profiler.cli mode=profile "${PAIR_ARGS[@]}" \
      "grid=$GRID" "grid.batches=[1,$BIG]" "grid.gammas=[0,4]" "grid.contexts=[$CTX]" "grid.prefill_lengths=[512]" \
      "grid.prefill_batches=[1]" "name=ab-$NAME" "timing.deadline_s=$((OLD_S / 2))" $ARGS \
      > "$OUT/profile_ab_$NAME.txt" 2>&1 || echo "   ($NAME exited with $?; see $OUT/profile_ab_$NAME.txt)"
  done
else
  echo "== 2. skipped ($(left) s left)"
fi

echo "== 3. figures (elapsed $((SECONDS - T0)) s)"
"$PY" - "$OUT/profiles" <<'PY' | tee "$OUT/figures.txt"
import json, sys
from pathlib import Path

from specbatch.profiler.roofline import Shape, bound_s, format_ratios, step_cost
from specbatch.sim.acceptance import expected_tokens
from specbatch.sim.profile import load_profile

root = Path(sys.argv[1])


def med(ok, model, phase, batch, tokens, context):
    r = ok[(ok.model == model) & (ok.phase == phase) & (ok.batch == batch) & (ok.tokens == tokens) & (ok.context == context)]
    return float(r.median_s.iloc[0]) if len(r) else None


def figures(path: Path, label: str) -> None:
    try:
        prof = load_profile(path)
    except Exception as e:  # noqa: BLE001
        print(f"{label}: no profile ({e})")
        return
    m, ok = prof.meta, prof.ok_steps
    t = m["timing"]
    att = t.get("attention") or {}
    print(f"--- {label}: {path.name}: {m['device']['name']}, {m['dtype']}, attention {att.get('implementation')}, "
          f"graphs {t.get('graphs')}, complete {t.get('complete')}, {len(ok)} ok points")
    print(f"    SDPA backend per phase (probed): {json.dumps(att.get('backend'))}")
    dev = m["device"].get("roofline") or {}
    tgt = Shape.from_config(m["models"]["target"]["config"])
    dbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[m["dtype"]]
    tg = ok[ok.model == "target"]
    for c in sorted(set(tg.context)):
        dec = med(ok, "target", "decode", 1, 1, c)
        if dec is None:
            continue
        line = f"    context {c:5d}: target decode batch 1 {dec * 1e3:8.3f} ms"
        if dev:
            _, nbytes = step_cost(tgt, 1, 1, c, 1, dbytes)
            hbm = nbytes / dev["bandwidth_bytes_per_s"]
            line += (f" | HBM bound {hbm * 1e3:.3f} ms ({nbytes / 1e6:.1f} MB at "
                     f"{dev['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s) -> {dec / hbm:.2f}x")
        ver = med(ok, "target", "verify", 1, 5, c)
        if ver is not None:
            line += f" | verify(γ=4)/decode at batch 1: {ver / dec:.2f}"
        print(line)
    # γ* per batch size at the middle context: argmax over measured γ of E[tokens|α,γ] / (γ T_draft + T_verify)
    ctxs = sorted(set(tg.context))
    if not ctxs:
        return
    c = ctxs[len(ctxs) // 2]
    gammas = sorted({int(x) - 1 for x in tg[tg.context == c].tokens})
    for alpha in (0.6, 0.8):
        cells = []
        for b in sorted(set(tg[tg.context == c].batch)):
            d = med(ok, "draft", "decode", b, 1, c)
            best = None
            for g in gammas:
                v = med(ok, "target", "decode" if g == 0 else "verify", b, g + 1, c)
                if v is None or (g and d is None):
                    continue
                rate = expected_tokens(alpha, g) / (g * (d or 0) + v)
                if best is None or rate > best[1] * (1 + 1e-9):
                    best = (g, rate)
            if best:
                cells.append(f"b{b}:γ*={best[0]}")
        print(f"    γ*(b) at context {c}, α={alpha} (measured γ {gammas}): " + "  ".join(cells))
    print("    " + format_ratios(m.get("roofline_ratio") or {}).replace("\n", "\n    "))


figures(root / "engine", "engine-style (graphs, implicit causal masks)")
old, new = root / "ab-old", root / "ab-new"
if old.is_dir() and new.is_dir():
    po, pn = load_profile(old).ok_steps, load_profile(new).ok_steps
    print("--- before/after on this device (median ms; old = transformers sdpa + explicit masks, eager; "
          "new = engine attention + graphs where on)")
    for r in pn.itertuples():
        o = med(po, r.model, r.phase, r.batch, r.tokens, r.context)
        if o is not None:
            print(f"    {r.model:6s} {r.phase:7s} batch {r.batch:4d} tokens {r.tokens:5d} context {r.context:5d}: "
                  f"old {o * 1e3:9.3f}  new {r.median_s * 1e3:9.3f}  old/new {o / r.median_s:6.2f}")
PY

REST=$(( $(left) - 10 ))
if [ "$REST" -ge 60 ]; then
  echo "== 4a. engine shapes, $REST s (elapsed $((SECONDS - T0)) s)"
  timeout "$(( REST < 120 ? REST : 120 ))" "$PY" benchmarks/engine_shapes.py --device "$DEVICE" --target "$TARGET" \
    --draft "$DRAFT" | tee "$OUT/engine_shapes.txt"
fi
REST=$(( $(left) - 10 ))
if [ -n "${RUN_VALIDATE:-}" ] && [ "$REST" -ge 120 ]; then
  echo "== 4b. validate, $REST s (elapsed $((SECONDS - T0)) s)"
  timeout "$(( REST < VALIDATE_S ? REST : VALIDATE_S ))" "$PY" -m specbatch.fidelity.validate --device "$DEVICE" \
    --pair "$TARGET:$DRAFT" --requests 40 --repeats "$REPEATS" --out "$OUT/validate" | tee "$OUT/validate.txt"
fi
echo "== done (elapsed $((SECONDS - T0)) s)"
