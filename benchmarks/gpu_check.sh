#!/usr/bin/env bash
# GPU check for a lent CUDA machine (H100/H200): build the extension for sm_90, run the test
# suite on CUDA (Triton compiled, no interpreter), run the op and mixing benchmarks, then the
# DeiT-S training step (B=256, bf16; eager, then torch.compile), and write every log, JSON and
# a short table to $OUT. Every stage has its own time limit; STAGES picks stages.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh                              # all stages
#   STAGES="build tests bench" bash benchmarks/gpu_check.sh; STAGES="train" bash benchmarks/gpu_check.sh
#
# The device image brings its own torch/triton; timm 1.0.31 travels as a wheel in .whl/ when
# present (the image's timm may be older than the probe needs). Prepare it here, then run with
# the device tool, carrying .whl (ignored by git), e.g. command `bash benchmarks/gpu_check.sh`,
# carry [".whl"], timeout_s 540:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl timm==1.0.31
# Expected on an H200 (seen in pieces on 2026-11-26): build ~40 s, tests ~90 s, benchmarks ~2 min;
# not yet run there: training step eager < 1 min, compiled ~3 min (three compilations). All
# stages may not fit one 600 s call: split them into two calls (the build stays on a warm machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
SITE=/tmp/transmix_site
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH="$SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stage() { echo "== $1 ($(date +%T))" | tee -a "$OUT/summary.md"; }
# A stage that runs out of time gets SIGINT first: pytest-benchmark still writes what it measured.
summarize() { [ -f "$1" ] && $PY benchmarks/summarize.py "$1" 2>&1 | tee -a "$OUT/summary.md"; }

stage "device"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  git rev-parse HEAD 2>/dev/null || true; date -u; } | tee -a "$OUT/summary.md"

want() { [[ " ${STAGES:-build tests bench train} " == *" $1 "* ]]; }

if want build; then
  stage "build extension (sm_90)"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout 300 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  echo "build rc=$?" | tee -a "$OUT/summary.md"
fi
$PY -m transmix_kernels.info 2>&1 | tee -a "$OUT/summary.md"

if want tests; then
  stage "tests on CUDA"
  timeout ${TEST_TIMEOUT:-240} $PY -m pytest tests -q -rfEs -p no:cacheprovider -m "not slow" \
    --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
  echo "tests rc=$?" | tee -a "$OUT/summary.md"
  tail -n 25 "$OUT/tests.log" | tee -a "$OUT/summary.md"
fi

if want bench; then
  stage "benchmarks (ops and mixing)"
  # CUDA rows only: the CPU rows are measured on the 2-core development machine (RESULTS.md).
  BENCH_DEVICES=${BENCH_DEVICES:-cuda} timeout -s INT -k 30 ${BENCH_TIMEOUT:-240} $PY -m pytest benchmarks -q -p no:cacheprovider \
    --benchmark-only --ignore=benchmarks/bench_train_step.py --benchmark-json="$OUT/bench.json" >"$OUT/bench.log" 2>&1
  echo "benchmarks rc=$?" | tee -a "$OUT/summary.md"
  summarize "$OUT/bench.json"
fi

if want train; then
  # DeiT-S training step, B=256 bf16 autocast: eager first, then torch.compile (about a minute
  # of compilation per provider), each with its own JSON so a timeout keeps the other.
  for mode in eager compiled; do
    stage "training step ($mode)"
    BENCH_DEVICES=${BENCH_DEVICES:-cuda} timeout -s INT -k 30 ${TRAIN_TIMEOUT:-240} $PY -m pytest benchmarks/bench_train_step.py -q -rs \
      -p no:cacheprovider --benchmark-only -k "$mode" --benchmark-json="$OUT/train-$mode.json" >"$OUT/train-$mode.log" 2>&1
    echo "training step ($mode) rc=$?" | tee -a "$OUT/summary.md"
    grep -E "^SKIPPED|train-step" "$OUT/train-$mode.log" | tee -a "$OUT/summary.md"
    summarize "$OUT/train-$mode.json"
  done
fi
