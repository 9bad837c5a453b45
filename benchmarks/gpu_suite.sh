#!/usr/bin/env bash
# One-GPU suite (under ~8 minutes on one H100/H200-class GPU). First the CUDA-only tests (tests/test_cuda.py: the
# flash varlen kernel of the packed encoder against float64, packed vs padded under bf16 autocast, a bf16 pretraining
# run), then issue 16's benchmark: bf16 encoder step time, achieved FLOP/s and MFU of the base preset at 16k and 64k
# tokens, padded vs packed (and HF PerceiverModel), via benchmarks/backbone.py (each point in a fresh process, MFU
# against a measured bf16 matmul peak). Writes a JUnit XML and JSON under $OUT (default
# benchmarks/results/gpu_suite/). CI never runs it.
#
#   benchmarks/gpu_suite.sh              # on a GPU machine
#   benchmarks/gpu_suite.sh --dry-run    # print the commands; no GPU needed
#   benchmarks/gpu_suite.sh --cpu-smoke  # the same commands on CPU at tiny sizes (checks the plumbing, not speed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu_suite}
MODE=${1:-run}
DEVICE=cuda DTYPE=bf16 PRESET=bioperceiver_base TOKENS="16384 65536" BATCH=4 ITERS=5 REPEATS=1
case "$MODE" in
  run) "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_suite.sh: no CUDA device (use --dry-run or --cpu-smoke)')" ;;
  --dry-run) ;;
  --cpu-smoke) DEVICE=cpu DTYPE=fp32 PRESET=bioperceiver_debug TOKENS="512" BATCH=2 ITERS=1 REPEATS=1 OUT="$OUT/cpu_smoke" ;;
  *) echo "usage: $0 [--dry-run|--cpu-smoke]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
run() {
  echo "+ $*"
  if [ "$MODE" != "--dry-run" ]; then "$@"; fi
}
start=$(date +%s)
tests_rc=0
if [ "$MODE" != "--cpu-smoke" ]; then  # (on CPU every test in the file skips)
  run timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py --junitxml "$OUT/test_cuda.xml" || tests_rc=$?
fi
run timeout 420 "$PY" benchmarks/backbone.py --device "$DEVICE" --dtype "$DTYPE" --preset "$PRESET" \
  --tokens $TOKENS --batch "$BATCH" --iters "$ITERS" --repeats "$REPEATS" \
  --impls bioperceiver bioperceiver_packed hf_perceiver --output "$OUT/backbone_${PRESET}_${DEVICE}_${DTYPE}.json"
echo "gpu_suite: done in $(( $(date +%s) - start )) s; results in $OUT"
exit "$tests_rc"  # the benchmark ran either way; a failed CUDA test still fails the suite
