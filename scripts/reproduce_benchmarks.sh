#!/usr/bin/env bash
# Runs arbor bench, arbor profile-kv and the transformers peer (scripts/bench_peers.py) on the
# same shapes, writing everything under one output directory. Meant for a GPU machine; runs
# on a CPU too (then keep the grid small).
#
#   scripts/reproduce_benchmarks.sh [OUT_DIR]
#
# Environment (all optional):
#   ARBOR      arbor binary (default: target/release/arbor, built if missing)
#   PYTHON     python with torch + transformers (default: python3)
#   SHAPES     dummy shapes, space-separated (default: "qwen2.5-0.5b")
#   STRATEGY   (default: best-of-n,beam)   WIDTH (default: 1,4,16,64)
#   PROMPT_LEN (default: 128,1024)         GEN_LEN (default: 64)
#   DEVICE     arbor --device (default: cpu)   KV_GB: arbor --kv-cache-gb (default: 4)
#   PEER_DEVICE torch device (default: cuda if available)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out/$(date +%Y%m%d-%H%M%S)}
ARBOR=${ARBOR:-target/release/arbor}
PYTHON=${PYTHON:-python3}
SHAPES=${SHAPES:-qwen2.5-0.5b}
STRATEGY=${STRATEGY:-best-of-n,beam}
WIDTH=${WIDTH:-1,4,16,64}
PROMPT_LEN=${PROMPT_LEN:-128,1024}
GEN_LEN=${GEN_LEN:-64}
DEVICE=${DEVICE:-cpu}
KV_GB=${KV_GB:-4}
mkdir -p "$OUT"
if [ ! -x "$ARBOR" ]; then
  cargo build --release
  ARBOR=target/release/arbor
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' + uncommitted')"
  echo "host: $(uname -a)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "gpu: none"
  "$ARBOR" --version
} | tee "$OUT/machine.txt"

for shape in $SHAPES; do
  d="$OUT/$shape"
  mkdir -p "$d"
  cmd=("$ARBOR" bench --dummy-weights "$shape" --device "$DEVICE" --kv-cache-gb "$KV_GB"
       --strategy "$STRATEGY" --width "$WIDTH" --prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN"
       --sharing on,off --json --out "$d")
  echo "${cmd[*]}" | tee "$d/commands.txt"
  "${cmd[@]}" | tee "$d/arbor.jsonl"

  cmd=("$ARBOR" profile-kv --dummy-weights "$shape" --device "$DEVICE" --kv-cache-gb "$KV_GB"
       --strategy best-of-n --width 16 --prompt-tokens 1024 --gen-tokens 256 --out "$d")
  echo "${cmd[*]}" | tee -a "$d/commands.txt"
  "${cmd[@]}" | tee "$d/profile_kv.txt"

  peer=("$PYTHON" scripts/bench_peers.py --shape "$shape" --width "$WIDTH"
        --prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN")
  if [ -n "${PEER_DEVICE:-}" ]; then peer+=(--device "$PEER_DEVICE"); fi
  echo "${peer[*]}" | tee -a "$d/commands.txt"
  "${peer[@]}" | tee "$d/peers.jsonl"
done
echo "results in $OUT"
