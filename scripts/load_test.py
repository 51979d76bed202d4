#!/usr/bin/env python3
"""Load test for `arbor serve`: concurrent streaming chat requests over plain asyncio sockets
(no third-party packages). Reports throughput (requests/s, generated tokens/s), time to first
token and inter-token latency percentiles, and the status of every request.

    python3 scripts/load_test.py --url http://127.0.0.1:8000 --concurrency 32 --requests 64 \
        --max-tokens 64

Each stream's tokens are counted from its content chunks (one per sampled token unless
a chunk was held back by a stop string or an incomplete character) and its usage chunk.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlparse


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


async def one(host, port, body, api_key):
    """Sends one streaming request; returns (status, ttft_s, token gaps, tokens, total_s)."""
    data = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n")
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head.encode() + b"\r\n" + data)
    await writer.drain()
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    ttft, last, gaps, tokens, usage = None, None, [], 0, None
    buf = b""
    done = False
    while not done:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buf += chunk
        # Chunked framing lines are not `data:` lines, so scanning lines is enough.
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                done = True
                break
            ev = json.loads(payload)
            if ev.get("usage"):
                usage = ev["usage"]
            for c in ev.get("choices", []):
                if c.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
                    tokens += 1
    writer.close()
    total = time.perf_counter() - t0
    if usage:
        tokens = usage["completion_tokens"]
    return status, ttft, gaps, tokens, total, done


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args()
    u = urlparse(a.url)
    host, port = u.hostname, u.port or 80

    sem = asyncio.Semaphore(a.concurrency)

    async def run(i):
        async with sem:
            body = {
                "messages": [{"role": "user", "content": f"Write a short story about tree number {i}."}],
                "max_tokens": a.max_tokens, "temperature": 0.8, "seed": i, "stream": True,
                "stream_options": {"include_usage": True},
            }
            return await one(host, port, body, a.api_key)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(run(i) for i in range(a.requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0] == 200 and r[5]]
    statuses = {}
    for r in results:
        statuses[r[0]] = statuses.get(r[0], 0) + 1
    tokens = sum(r[3] for r in ok)
    ttfts = [r[1] for r in ok if r[1] is not None]
    gaps = [g for r in ok for g in r[2]]
    summary = {
        "requests": a.requests, "concurrency": a.concurrency, "max_tokens": a.max_tokens,
        "statuses": statuses, "complete": len(ok), "wall_s": round(wall, 2),
        "req_per_s": round(len(ok) / wall, 2), "gen_tok_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(pct(ttfts, 50) * 1e3, 1), "ttft_p99_ms": round(pct(ttfts, 99) * 1e3, 1),
        "itl_p50_ms": round(pct(gaps, 50) * 1e3, 1), "itl_p99_ms": round(pct(gaps, 99) * 1e3, 1),
        "itl_mean_ms": round(statistics.mean(gaps) * 1e3, 1) if gaps else None,
    }
    if a.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>14}: {v}")
    if len(ok) != a.requests:
        print(f"{a.requests - len(ok)} requests did not complete", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
