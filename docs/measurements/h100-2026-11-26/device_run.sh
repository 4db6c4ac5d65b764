#!/usr/bin/env bash
# One device call: H100 cost profiles of two pairs, then the 1M x 64 simulator run on 16 cores.
set -uo pipefail
exec > >(tee "$OUT/log.txt") 2>&1
T0=$SECONDS
echo "== env"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
nproc; lscpu | grep -E "Model name|^CPU\(s\)"; free -g | head -2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
CHECK='import torch, transformers, simpy, hydra, sim, profiler, specbatch; from profiler.models import _cache_keyword; from transformers import LlamaForCausalLM as L; print("torch", torch.__version__, "transformers", transformers.__version__, "cache kw", _cache_keyword(L), "conf", specbatch.conf_dir())'
python3 -c "$CHECK" || { ln -s ../conf specbatch/conf; ln -s ../traces specbatch/traces; export PYTHONPATH=/tmp/site:$PWD; }
python3 -c "import torch, transformers, simpy, hydra, sim, profiler, specbatch; from profiler.models import _cache_keyword; from transformers import LlamaForCausalLM as L; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cache kw', _cache_keyword(L), 'conf', specbatch.conf_dir())" || exit 4
echo "== capture (elapsed $((SECONDS-T0)) s)"
PAIRS="llama-68m__llama-2-7b llama-3.2-1b__llama-3-8b" PAIR_DEADLINE=${PAIR_DEADLINE:-110} PAIR_TIMEOUT=${PAIR_TIMEOUT:-165} \
  OUT_DIR=/tmp/prof bash profiler/gpu_capture.sh progress=false
tar czf "$OUT/profiles.tgz" -C /tmp/prof .
echo "== 1M x 64, 16 workers (elapsed $((SECONDS-T0)) s)"
timeout 170 python3 benchmarks/sim_speed.py --child 1000000 --workers 16 | tee "$OUT/sim_1m.json"
echo "== done (elapsed $((SECONDS-T0)) s)"
