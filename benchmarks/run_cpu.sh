#!/usr/bin/env bash
# Run the CPU benchmark suite RUNS times (default 3), each run with its raw log and JSON, the
# machine's load before and after each run, then summarise across runs (medians with min-max).
#
#   bash benchmarks/run_cpu.sh                       # -> benchmarks/results/<date>-cpu-<N>core-<commit>/
#   RUNS=5 DEST=/tmp/b bash benchmarks/run_cpu.sh -k cutmix_step   # extra args go to pytest
#
# Expected on the 2-core development VM when idle (estimated from its parts): about 3 minutes a
# run; the first run also compiles DeiT-S three times (about 40 s each; later runs hit
# inductor's cache). Under load the compiled steps slow down far more than the eager ones.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
PY=${PYTHON:-python}
DEST=${DEST:-benchmarks/results/$(date -u +%F)-cpu-$(nproc)core-$(git rev-parse --short HEAD)}
mkdir -p "$DEST"

load() {
  echo "== $1 ($(date -u +%FT%TZ))"
  uptime
  vmstat 1 2 | sed -n '1,2p;4p'          # the second sample: CPU use over the last second
  top -bn1 | sed -n '7,14p'
}

{
  echo "commit: $(git rev-parse HEAD)"
  echo "uncommitted changes (package, extension, benchmarks):"
  git status --porcelain -- transmix_kernels csrc benchmarks setup.py | grep -v '^?? benchmarks/results' || echo "  none"
  lscpu | grep -E 'Model name|^CPU\(s\)'
  free -g | head -2
  $PY -c 'import torch, timm, transmix_kernels as tk; print("torch", torch.__version__, "threads", torch.get_num_threads(), "timm", timm.__version__)'
  $PY -m transmix_kernels.info
  echo "command: BENCH_DEVICES=cpu $PY -m pytest benchmarks -p no:cacheprovider --benchmark-only --benchmark-json=runN.json $*"
} >"$DEST/machine.txt" 2>&1

for run in $(seq 1 "$RUNS"); do
  load "before run $run" >>"$DEST/load.txt"
  BENCH_DEVICES=cpu $PY -m pytest benchmarks -p no:cacheprovider --benchmark-only \
    --benchmark-json="$DEST/run$run.json" "$@" >"$DEST/run$run.log" 2>&1
  echo "run $run: pytest rc=$?" | tee -a "$DEST/load.txt"
  load "after run $run" >>"$DEST/load.txt"
done
$PY benchmarks/summarize.py "$DEST"/run*.json >"$DEST/summary.md"
echo "wrote $DEST"
