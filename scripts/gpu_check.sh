#!/usr/bin/env bash
# Runs the GPU checks and the decode benchmarks of the [cuda] issue on a GPU machine that has
# no cargo: the binaries are built elsewhere and carried in gpu-bin/ (see docs/GPU.md).
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else gpu-out/)
#
# gpu-bin/ holds: arbor (release build), cuda-tests (arbor-kernels' `cuda` test binary) and
# models-tests (arbor-runtime's `models` test binary); ARBOR_CACHE may point at a cache
# holding the SmolLM2 GGUF. Every GPU test runs with ARBOR_REQUIRE_GPU=1, so a GPU that
# cannot be opened fails instead of skipping.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-out}}
BIN=${BIN:-gpu-bin}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
export ARBOR_REQUIRE_GPU=1 ARBOR_REQUIRE_NVRTC=1
status=0
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  cat "$BIN/COMMIT" 2>/dev/null
} | tee "$OUT/machine.txt"

run() { # name, command...
  local name=$1; shift
  echo "== $name"
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc"
  [ $rc -eq 0 ] || status=1
}

# Every op against its CPU reference, and the NVRTC compile check.
run cuda-tests "$BIN/cuda-tests" --test-threads=1 --nocapture
# The whole model on the GPU against the CPU (fixtures; SmolLM2 when ARBOR_CACHE has it).
run model-tests "$BIN/models-tests" gpu --test-threads=1 --nocapture

# Decode tokens/s: one stream and 64, SmolLM2-135M and the Qwen2.5-0.5B shape, beside HF.
for shape in smollm2-135m qwen2.5-0.5b; do
  run "bench-$shape" "$BIN/arbor" bench --device cuda --dummy-weights "$shape" \
    --strategy sampling --width 1,64 --prompt-len 128 --gen-len 128 --sharing on \
    --kv-cache-gb 8 --json --out "$OUT/bench-$shape"
  run "hf-$shape" python3 scripts/bench_peers.py --shape "$shape" --modes greedy,best-of-n \
    --width 1,64 --prompt-len 128 --gen-len 128 --device cuda
done
exit $status
