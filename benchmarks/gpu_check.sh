#!/usr/bin/env bash
# The GPU check of apex, in ONE call on a GPU machine: the CUDA-marked tests, then
# benchmarks/bench_gpu.py (SD3.5-M architecture at 512 px: rollout/training MFU, peak memory,
# reward throughput, speed levers, host syncs), then benchmarks/bench_train.py on the real
# Trainer with SD3.5-M's real-shape fixture at full depth (24 blocks, published widths, random
# weights, bf16): the share of an iteration outside model compute and its peak memory beside
# memory_plan.py's plan; then the same for both FLUX presets on FLUX.1-dev's real-shape fixture
# at full depth (19 double- + 38 single-stream blocks, 12 B parameters, 24 GB in bf16; one
# prompt's group, one iteration): flux1-dev-1gpu (micro-batch 4, checkpointing) and flux1-dev
# (a GPU's share of the multi-GPU recipe: micro-batch 3, no checkpointing, 6 steps); then the
# torch.compile lever. Needs no internet.
#
# Time budget (one H100, under 10 minutes): every step has its own timeout and the timeouts add
# up to 580 s: wheels 25, environment 15, tests 80, bench 130, trainer 90, flux 80, flux_dev 80,
# compile 80.
# Each part prints its elapsed seconds; the summary has them all.
#
#   bash benchmarks/gpu_check.sh [--cpu] [--out DIR]
#
# --cpu: the same script on a CPU at toy sizes, so it cannot rot: the CUDA tests are collected
# and skip (reported as skipped, never as passed), bench_gpu.py --smoke, bench_train.py --smoke
# on both real-shape fixtures (depth 1: one SD3.5-M block; one FLUX.1-dev double- and two
# single-stream blocks; 64 px, float32), the compile lever on the smoke models. CUDA is hidden
# from it; carried wheels are used only when APEX_WHEELS names them. `make test-all` runs it
# (tests/test_gpu_check.py).
#
# Prepare HERE once (a machine with PyPI; ~26 MB of wheels the GPU image lacks or has in the
# wrong version: diffusers, transformers 4.57, tokenizers, huggingface_hub, peft, rapidfuzz,
# moocore, cffi, pycparser, platformdirs):
#
#   bash benchmarks/prepare_gpu_wheels.sh
#
# Then, on the GPU machine (for instance through the device tool's `run`):
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590)
#
# Logs and JSON land in --out DIR, else $OUT (returned by the tool; at most 8 files), else
# logs/gpu_check/: env.txt, pytest_cuda.log, bench_gpu.{log,json}, bench_train.log (both trainer
# parts, one after the other; each ends in its JSON line), bench_compile.{log,json}, summary.json
# (every part's rc and seconds, the CUDA tests' counts, bench_train's two JSON lines). The last
# lines printed are the summary.
set -uo pipefail
MODE=gpu
DEST=${OUT:-}
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) MODE=cpu ;;
    --out) DEST=${2:?--out needs a directory}; shift ;;
    --out=*) DEST=${1#--out=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (--cpu, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$DEST" ]; then mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd) || exit 2; fi
cd "$(dirname "$0")/.."
DEST=${DEST:-$PWD/logs/gpu_check}
mkdir -p "$DEST"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
T0=$(date +%s)
T_WHEELS=25 T_ENV=15 T_TESTS=80 T_BENCH=130 T_TRAIN=90 T_FLUX=80 T_FLUX_DEV=80 T_COMPILE=80
BUDGET_BENCH=105  # bench_gpu.py skips its remaining parts past this, inside its timeout
echo "gpu_check ($MODE): step timeouts add up to $((T_WHEELS + T_ENV + T_TESTS + T_BENCH + T_TRAIN + T_FLUX + T_FLUX_DEV + T_COMPILE)) s; output in $DEST"

if [ "$MODE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""  # the rehearsal runs on the CPU even where a GPU is present
  WHEELS=${APEX_WHEELS:-none}
  BENCH=(--smoke) TRAIN=(--smoke --warmup 0 --steps 1) FLUX=(--smoke --warmup 0 --steps 1)
  FLUX_DEV=(--smoke --warmup 0 --steps 1)
else
  WHEELS=${APEX_WHEELS:-.whl}  # APEX_WHEELS=none: use what is installed
  BENCH=() TRAIN=(--warmup 1 --steps 2 train.prompts_per_step=2) FLUX=(--warmup 0 --steps 1 train.prompts_per_step=1)
  # one GPU's share of flux1-dev: one group of 3 samples, one micro-batch of 3, no checkpointing
  FLUX_DEV=(--warmup 0 --steps 1 train.prompts_per_step=1 train.group_size=3)
fi
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # into a folder of this run, never into the environment
  timeout "$T_WHEELS" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}

{
  if [ "$MODE" = gpu ]; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; fi
  timeout "$T_ENV" "$PY" -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
} 2>&1 | tee "$DEST/env.txt"

PARTS=()
declare -A RC SECS LIMIT WRITTEN
# part NAME LIMIT LOG CMD...: CMD under its timeout, output to the screen and DEST/LOG (appended
# to when an earlier part wrote LOG: the tool brings back at most 8 files)
part() {
  local name=$1 limit=$2 log=$3 start append=()
  shift 3
  [ -n "${WRITTEN[$log]:-}" ] && append=(-a)
  WRITTEN[$log]=1
  start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "${append[@]}" "$DEST/$log"
  RC[$name]=${PIPESTATUS[0]}
  SECS[$name]=$(($(date +%s) - start))
  LIMIT[$name]=$limit
  PARTS+=("$name")
  echo "-- $name: rc=${RC[$name]} in ${SECS[$name]} s (limit $limit s)"
}

echo "== 1/6 pytest -m cuda tests/test_cuda.py"
part tests "$T_TESTS" pytest_cuda.log "$PY" -m pytest -m cuda tests/test_cuda.py -q -rs -p no:cacheprovider \
  --junitxml="$WORK/pytest_cuda.xml"

echo "== 2/6 bench_gpu.py${BENCH[*]:+ ${BENCH[*]}} (flops, rollout, train, rewards, levers)"
part bench "$T_BENCH" bench_gpu.log "$PY" benchmarks/bench_gpu.py "${BENCH[@]}" --budget-s "$BUDGET_BENCH" \
  --json-out "$DEST/bench_gpu.json"

echo "== 3/6 bench_train.py --arch sd35m ${TRAIN[*]} (the real Trainer on the real-shape fixture; toy rewards, so reward models are out of the count)"
part trainer "$T_TRAIN" bench_train.log "$PY" benchmarks/bench_train.py --arch sd35m --preset sd35m-1gpu "${TRAIN[@]}"

echo "== 4/6 bench_train.py --arch flux1-dev --preset flux1-dev-1gpu ${FLUX[*]} (the same on FLUX.1-dev's real-shape fixture)"
part flux "$T_FLUX" bench_train.log "$PY" benchmarks/bench_train.py --arch flux1-dev --preset flux1-dev-1gpu "${FLUX[@]}"

echo "== 5/6 bench_train.py --arch flux1-dev --preset flux1-dev ${FLUX_DEV[*]} (a GPU's share of the multi-GPU recipe)"
part flux_dev "$T_FLUX_DEV" bench_train.log "$PY" benchmarks/bench_train.py --arch flux1-dev --preset flux1-dev "${FLUX_DEV[@]}"

echo "== 6/6 bench_gpu.py${BENCH[*]:+ ${BENCH[*]}} --parts compile"
part compile "$T_COMPILE" bench_compile.log "$PY" benchmarks/bench_gpu.py "${BENCH[@]}" --parts compile \
  --json-out "$DEST/bench_compile.json"

PART_ROWS=$(for p in "${PARTS[@]}"; do printf '%s %s %s %s\n' "$p" "${RC[$p]}" "${SECS[$p]}" "${LIMIT[$p]}"; done)
"$PY" - "$MODE" "$DEST" "$WORK/pytest_cuda.xml" "$(($(date +%s) - T0))" "$PART_ROWS" <<'EOF'
"""Write DEST/summary.json and print the summary line (the CUDA tests' counts come from junit XML)."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

mode, dest, junit, total, rows = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
parts = {name: {"rc": int(rc), "seconds": int(s), "timeout_s": int(limit)}
         for name, rc, s, limit in (line.split() for line in rows.splitlines() if line.strip())}
tests = {"collected": 0, "passed": 0, "skipped": 0, "failed": 0}
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    tests = {"collected": n, "passed": n - skipped - failed, "skipped": skipped, "failed": failed}
trainers = {}  # bench_train's JSON line of each fixture; a part stopped before its line has none
log = dest / "bench_train.log"
if log.is_file():
    for text in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(text) if text.startswith("{") else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "preset" in row:
            trainers[row["preset"]] = row
rcs = " ".join(f"{name} rc={p['rc']} ({p['seconds']} s)" for name, p in parts.items())
line = (f"gpu_check ({mode}): {rcs}; cuda tests: {tests['collected']} collected, {tests['passed']} passed, "
        f"{tests['skipped']} skipped, {tests['failed']} failed (rc 124 = timed out) in {total} s")
summary = {"mode": mode, "line": line, "total_s": total, "parts": parts, "cuda_tests": tests,
           "trainer": trainers.get("sd35m-1gpu"), "flux_trainer": trainers.get("flux1-dev-1gpu"),
           "flux_dev_trainer": trainers.get("flux1-dev")}
(dest / "summary.json").write_text(json.dumps(summary) + "\n", encoding="utf-8")
print(line)
EOF
if [ "$MODE" = cpu ]; then  # a rehearsal: every part must go through
  for p in "${PARTS[@]}"; do [ "${RC[$p]}" = 0 ] || exit 1; done
  exit 0
fi
[ "${RC[tests]}" = 0 ] && [ "${RC[bench]}" = 0 ]
