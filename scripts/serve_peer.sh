#!/usr/bin/env bash
# arbor serve beside llama.cpp's llama-server on the same GGUF, the same machine and the same
# load (scripts/load_test.py: streaming chat, C concurrent clients, 3C requests, 64 tokens).
#
#   scripts/serve_peer.sh ARBOR_BIN LLAMA_SERVER_BIN MODEL.gguf [CONCURRENCY...]
#
# Prints one JSON line per (server, concurrency). llama-server runs with as many parallel
# slots as the largest concurrency (continuous batching) and a context of 512 per slot.
set -euo pipefail
arbor=$1 llama=$2 model=$3
shift 3
levels=("$@")
[ ${#levels[@]} -gt 0 ] || levels=(1 8 32)
max=1
for c in "${levels[@]}"; do (( c > max )) && max=$c; done
here=$(cd "$(dirname "$0")" && pwd)
threads=$(nproc)

wait_up() {
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$1/health" > /dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server on port $1 did not come up" >&2
  return 1
}

run() {  # name port
  for c in "${levels[@]}"; do
    python3 "$here/load_test.py" --url "http://127.0.0.1:$2" --concurrency "$c" \
      --requests $((3 * c)) --max-tokens 64 --json \
      | python3 -c "import json,sys; d=json.load(sys.stdin); d['server']='$1'; d['concurrency']=$c; print(json.dumps(d))"
  done
}

"$arbor" serve -m "$model" --port 8141 --threads "$threads" > /tmp/serve_peer_arbor.log 2>&1 &
pid=$!
wait_up 8141 && run arbor 8141
kill -TERM $pid; wait $pid || true

"$llama" -m "$model" --port 8142 -t "$threads" -np "$max" -c $((512 * max)) \
  > /tmp/serve_peer_llama.log 2>&1 &
pid=$!
wait_up 8142 && run llama-server 8142
kill -TERM $pid; wait $pid || true
