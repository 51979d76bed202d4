#!/usr/bin/env bash
# The GPU checks and measurements of the open issues, on a GPU machine that has no cargo: the
# binaries are built elsewhere and carried in gpu-bin/ (see docs/GPU.md).
#
#   scripts/gpu_check.sh [OUT_DIR] [PHASE...]     (OUT_DIR default: $OUT, else gpu-out/)
#
# Phases (default: all, in this order). A session's device time is short (15 minutes,
# machine start included): one call of `BUDGET_S=480 scripts/gpu_check.sh "$OUT" tests
# headline decode` (timeout_s 540) gets the correctness checks and the headline first.
#   tests      every op against its CPU reference + the NVRTC compile check; the whole model
#              on the GPU against the CPU (fixtures, MoE fixtures, tree attention, CUDA graphs;
#              SmolLM2 when ARBOR_CACHE holds its GGUF)                       [cuda, tree, moe]
#   decode     one stream and 64, SmolLM2-135M and Qwen2.5-0.5B shapes, beside HF   [cuda]
#   headline   Qwen2.5-0.5B, prompt 512, 256 tokens: best-of-16/64 and 8-beam, sharing on and
#              off, beside HF best-of-16/64 and 8-beam                              [bench]
#   attention  cascade vs paged attention on shared-prefix trees; torch SDPA per branch;
#              sparse page selection vs dense cascade at 8K-32K                           [tree]
#   moe        Qwen3-30B-A3B shape decode at batch 1/16/64 and best-of-16, beside HF  [moe]
#
# gpu-bin/ holds: arbor (release build), cuda-tests (arbor-kernels' `cuda` test binary) and
# models-tests (arbor-runtime's `models` test binary). Every GPU test runs with
# ARBOR_REQUIRE_GPU=1, so a GPU that cannot be opened fails instead of skipping.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-out}}
shift || true
PHASES=${*:-tests decode headline attention moe}
BIN=${BIN:-gpu-bin}
mkdir -p "$OUT"
# The device tool brings back at most 8 files from $OUT: every log, JSON line, CSV and plot is
# written under $LOGS (outside $OUT) and packed into $OUT/gpu-check.tar.gz after each command,
# so a call stopped midway still brings back what ran; $OUT/summary.txt lists each command's
# exit status.
LOGS=$(mktemp -d)/gpu-check
mkdir -p "$LOGS"
pack() {
  tar czf "$OUT/.gpu-check.tar.gz" -C "$(dirname "$LOGS")" gpu-check &&
    mv "$OUT/.gpu-check.tar.gz" "$OUT/gpu-check.tar.gz"
}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
export ARBOR_REQUIRE_GPU=1 ARBOR_REQUIRE_NVRTC=1
status=0
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  cat "$BIN/COMMIT" 2>/dev/null
} | tee -a "$LOGS/machine.txt" "$OUT/summary.txt"

# BUDGET_S (seconds, optional): the whole run's limit. Each command gets what is left and is
# stopped at the end of it; once under a minute is left, the remaining commands are skipped
# and listed, so a device call ends with every log written instead of being killed midway.
# No one command gets more than CMD_S (default 300) of it, so a hang costs only its phase.
START=$(date +%s)
run() { # name, command...
  local name=$1; shift
  local limit=()
  if [ -n "${BUDGET_S:-}" ]; then
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ $left -lt 60 ]; then
      echo "== $name: skipped, ${left}s of BUDGET_S left" | tee -a "$LOGS/commands.txt" "$OUT/summary.txt"
      status=1
      return
    fi
    [ $left -gt "${CMD_S:-300}" ] && left=${CMD_S:-300}
    limit=(timeout -k 5 "$left")
  fi
  echo "== $name: $*" | tee -a "$LOGS/commands.txt"
  local t0=$(date +%s)
  ${limit[@]+"${limit[@]}"} "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "(stopped: BUDGET_S or CMD_S ran out)" >>"$LOGS/$name.log"
  tail -n 25 "$LOGS/$name.log"
  echo "== $name: exit $rc ($(( $(date +%s) - t0 )) s)" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
  pack
}

peer() { # name, bench_peers.py arguments...
  local name=$1; shift
  run "$name" python3 scripts/bench_peers.py --device cuda "$@"
}

for phase in $PHASES; do
  case $phase in
  tests)
    run cuda-tests "$BIN/cuda-tests" --test-threads=1 --nocapture
    run model-tests "$BIN/models-tests" gpu --test-threads=1 --nocapture
    ;;
  decode)
    for shape in smollm2-135m qwen2.5-0.5b; do
      run "bench-$shape" "$BIN/arbor" bench --device cuda --dummy-weights "$shape" \
        --strategy sampling --width 1,64 --prompt-len 128 --gen-len 128 --sharing on \
        --kv-cache-gb 8 --json --out "$LOGS/bench-$shape"
      peer "hf-$shape" --shape "$shape" --modes greedy,best-of-n --width 64 \
        --prompt-len 128 --gen-len 128
    done
    ;;
  headline)
    run bench-headline "$BIN/arbor" bench --device cuda --dummy-weights qwen2.5-0.5b \
      --strategy best-of-n --width 16,64 --prompt-len 512 --gen-len 256 --sharing on,off \
      --kv-cache-gb 16 --json --out "$LOGS/bench-headline"
    run bench-headline-beam "$BIN/arbor" bench --device cuda --dummy-weights qwen2.5-0.5b \
      --strategy beam --width 8 --prompt-len 512 --gen-len 256 --sharing on,off \
      --kv-cache-gb 16 --json --out "$LOGS/bench-headline-beam"
    # What CUDA graphs of tree steps buy: the best-of-64 and 8-beam cells, graphs off.
    run bench-headline-nographs env ARBOR_CUDA_GRAPHS=0 "$BIN/arbor" bench --device cuda \
      --dummy-weights qwen2.5-0.5b --strategy best-of-n,beam --width 8,64 --prompt-len 512 \
      --gen-len 256 --sharing on --kv-cache-gb 16 --json --out "$LOGS/bench-headline-nographs"
    peer hf-headline --shape qwen2.5-0.5b --modes best-of-n --width 16,64 \
      --prompt-len 512 --gen-len 256 --no-sdpa
    peer hf-headline-beam --shape qwen2.5-0.5b --modes beam --width 8 \
      --prompt-len 512 --gen-len 256 --no-sdpa
    ;;
  attention)
    run bench-attention "$BIN/arbor" bench attention --device cuda --branches 16,64,256 \
      --prefix 1024,4096,32768 --suffix 64,256,1024 --levels 2,4 \
      --heads 32 --kv-heads 8 --head-dim 128
    peer sdpa-tree --heads 32 --kv-heads 8 --head-dim 128 \
      --sdpa-tree 16/64/256,1024/4096/32768,64/256/1024,2/4
    # Sparse (Quest-style) page selection at long context: 64 pages per row vs dense cascade.
    run bench-attention-sparse "$BIN/arbor" bench attention --device cuda --branches 1,16,64 \
      --prefix 8192,32768 --suffix 256 --levels 2 --heads 32 --kv-heads 8 --head-dim 128 \
      --sparse-budget 64
    ;;
  moe)
    run bench-moe "$BIN/arbor" bench --device cuda --dummy-weights qwen3-30b-a3b \
      --strategy sampling --width 1,16,64 --prompt-len 128 --gen-len 64 --sharing on \
      --kv-cache-gb 8 --json --out "$LOGS/bench-moe"
    run bench-moe-bon "$BIN/arbor" bench --device cuda --dummy-weights qwen3-30b-a3b \
      --strategy best-of-n --width 16 --prompt-len 512 --gen-len 128 --sharing on \
      --kv-cache-gb 8 --json --out "$LOGS/bench-moe-bon"
    peer hf-moe --shape qwen3-30b-a3b --modes greedy,best-of-n --width 16,64 \
      --prompt-len 128 --gen-len 64 --no-sdpa
    ;;
  *)
    echo "unknown phase '$phase' (tests, decode, headline, attention, moe)" >&2
    status=2
    ;;
  esac
done
pack
cat "$OUT/summary.txt"
exit $status
