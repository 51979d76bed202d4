#!/usr/bin/env python3
"""Checks an `arbor serve` server with the official `openai` Python client.

Completions, chat, streaming (with usage), n > 1, logprobs, and that bad requests raise the
SDK's own error types (BadRequestError, NotFoundError, AuthenticationError). Exits non-zero
with the first failure; prints one line per check.

    pip install openai
    python3 scripts/openai_client_check.py --base-url http://127.0.0.1:8000/v1 [--api-key KEY]
"""

import argparse
import sys

try:
    import openai
except ImportError:
    print("SKIPPED: the openai package is missing; install with pip install openai", file=sys.stderr)
    sys.exit(0)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL: {name} {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {name}")


def expect_error(name, kind, fn):
    try:
        fn()
    except kind as e:
        check(f"{name} raises {kind.__name__}", True)
        return e
    except Exception as e:  # noqa: BLE001 - any other type is the failure being reported
        check(f"{name} raises {kind.__name__}", False, f"got {type(e).__name__}: {e}")
    check(f"{name} raises {kind.__name__}", False, "no error raised")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default=None, help="default: the first listed model")
    a = ap.parse_args()

    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=60)
    models = [m.id for m in client.models.list().data]
    check("models.list", len(models) >= 1, models)
    model = a.model or models[0]
    check("served model listed", model in models, models)

    r = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
    check("completion text", isinstance(r.choices[0].text, str))
    check("completion finish_reason", r.choices[0].finish_reason in ("stop", "length"))
    check("completion usage", r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 0)

    r = client.completions.create(model=model, prompt="Hello", max_tokens=4, n=2, logprobs=2, seed=3)
    check("completion n=2", len(r.choices) == 2)
    lp = r.choices[0].logprobs
    check("completion logprobs", len(lp.tokens) == len(lp.token_logprobs) and len(lp.top_logprobs[0]) == 2)

    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=6)
    check("chat message", r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str))
    check("chat usage", r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens)

    r = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=4, n=3,
                                       logprobs=True, top_logprobs=2, seed=5)
    check("chat n=3", len(r.choices) == 3 and [c.index for c in r.choices] == [0, 1, 2])
    content = r.choices[0].logprobs.content
    check("chat logprobs", len(content) >= 1 and len(content[0].top_logprobs) == 2)

    text, usage, finish = "", None, None
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, seed=9)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    check("chat stream finishes", finish in ("stop", "length"), finish)
    check("chat stream usage", usage is not None and usage.completion_tokens >= 1)
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, seed=9)
    check("stream text equals the unstreamed text", text == full.choices[0].message.content,
          f"{text!r} != {full.choices[0].message.content!r}")

    pieces = [c.choices[0].text for c in client.completions.create(
        model=model, prompt="Once upon", max_tokens=6, stream=True, temperature=0) if c.choices]
    check("completion stream", len(pieces) >= 1)

    expect_error("temperature 5", openai.BadRequestError, lambda: client.chat.completions.create(
        model=model, messages=msgs, temperature=5))
    e = expect_error("empty messages", openai.BadRequestError, lambda: client.chat.completions.create(
        model=model, messages=[]))
    check("error names the field", getattr(e, "param", None) == "messages", getattr(e, "body", None))
    expect_error("unknown model", openai.NotFoundError, lambda: client.completions.create(
        model="no-such-model", prompt="x", max_tokens=1))
    expect_error("negative max_tokens", openai.BadRequestError, lambda: client.completions.create(
        model=model, prompt="x", max_tokens=-3))
    if a.api_key != "none":
        bad = openai.OpenAI(base_url=a.base_url, api_key="wrong-key", max_retries=0)
        expect_error("wrong API key", openai.AuthenticationError, lambda: bad.models.list())
    print("all openai client checks passed")


if __name__ == "__main__":
    main()
