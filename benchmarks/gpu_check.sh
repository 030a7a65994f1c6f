#!/usr/bin/env bash
# The GPU check of apex, in ONE call on a GPU machine: the CUDA-marked tests, then
# benchmarks/bench_gpu.py (SD3.5-M architecture at 512 px: rollout/training MFU, peak memory,
# reward throughput, speed levers, host syncs), then benchmarks/bench_train.py on the real
# Trainer with SD3.5-M's architecture (the share of an iteration outside model compute), then
# the torch.compile lever. Under 9 minutes in total: each part has its own timeout (tests 120 s,
# bench 180 s, trainer 110 s, compile 100 s). Needs no internet.
#
# Prepare HERE once (a machine with PyPI; ~26 MB of wheels the GPU image lacks or has in the
# wrong version: diffusers, transformers 4.57, tokenizers, huggingface_hub, peft, rapidfuzz,
# moocore, cffi, pycparser, platformdirs):
#
#   bash benchmarks/prepare_gpu_wheels.sh
#
# Then, from a session that has a GPU machine (the device tool's `run`):
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590)
#
# Logs and JSON land in $OUT (returned by the tool; at most 8 files) or logs/gpu_check/ when
# OUT is unset. The last lines printed are a summary; bench_gpu.json is the benchmark's JSON line.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-logs/gpu_check}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
T0=$(date +%s)

WHEELS=${APEX_WHEELS:-.whl}  # APEX_WHEELS=none: use what is installed
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
} 2>&1 | tee "$DEST/env.txt"

echo "== 1/4 pytest -m cuda tests/test_cuda.py"
timeout 120 "$PY" -m pytest -m cuda tests/test_cuda.py -q -rs -p no:cacheprovider 2>&1 | tee "$DEST/pytest_cuda.log"
RC_TESTS=${PIPESTATUS[0]}

echo "== 2/4 bench_gpu.py (flops, rollout, train, rewards, levers)"
timeout 180 "$PY" benchmarks/bench_gpu.py --budget-s 150 --json-out "$DEST/bench_gpu.json" 2>&1 | tee "$DEST/bench_gpu.log"
RC_BENCH=${PIPESTATUS[0]}

echo "== 3/4 bench_train.py --arch sd35m (the real Trainer; toy rewards, so reward models are out of the count)"
timeout 110 "$PY" benchmarks/bench_train.py --arch sd35m --preset sd35m-1gpu --warmup 1 --steps 2 \
  train.prompts_per_step=2 2>&1 | tee "$DEST/bench_train.log"
RC_TRAIN=${PIPESTATUS[0]}

echo "== 4/4 bench_gpu.py --parts compile"
timeout 100 "$PY" benchmarks/bench_gpu.py --parts compile --json-out "$DEST/bench_compile.json" 2>&1 | tee "$DEST/bench_compile.log"
RC_COMPILE=${PIPESTATUS[0]}

SUMMARY="gpu_check: tests rc=$RC_TESTS bench rc=$RC_BENCH trainer rc=$RC_TRAIN compile rc=$RC_COMPILE (124 = timed out) in $(( $(date +%s) - T0 )) s"
echo "$SUMMARY" | tee "$DEST/summary.txt"
tail -n 1 "$DEST/pytest_cuda.log"
[ "$RC_TESTS" = 0 ] && [ "$RC_BENCH" = 0 ]
