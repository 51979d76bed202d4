# arbor's code-verifier harness: runs one candidate program on example calls under resource
# limits and prints one JSON object. Input (stdin, JSON): program, examples [[call, expected]],
# mem_bytes, cpu_s, example_s. Output: {"compiled": bool, "error": str|null,
# "examples": [[passed, repr_of_result_or_error], ...]}.
import json, math, os, resource, signal, sys

cfg = json.loads(sys.stdin.read())
out = sys.stdout
for lim, val in ((resource.RLIMIT_AS, cfg["mem_bytes"]), (resource.RLIMIT_CPU, cfg["cpu_s"]),
                 (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(lim, (val, val))
    except (ValueError, OSError):
        pass
# The candidate's own prints must not corrupt the report.
sys.stdout = open(os.devnull, "w")
sys.stdin = open(os.devnull)


class ExampleTimeout(BaseException):
    pass


def on_alarm(signum, frame):
    raise ExampleTimeout()


signal.signal(signal.SIGALRM, on_alarm)


def same(got, want):
    if isinstance(got, float) or isinstance(want, float):
        try:
            return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
        except TypeError:
            return False
    try:
        return bool(got == want)
    except BaseException:
        return False


def expected_value(text, ns):
    for t in (text, text.rstrip(".")):
        try:
            return True, eval(t, ns)
        except BaseException:
            pass
    return False, None


report = {"compiled": False, "error": None, "examples": []}
ns = {"__name__": "__candidate__"}
try:
    signal.setitimer(signal.ITIMER_REAL, cfg["example_s"])
    exec(compile(cfg["program"], "<candidate>", "exec"), ns)
    signal.setitimer(signal.ITIMER_REAL, 0)
    report["compiled"] = True
except BaseException as e:
    signal.setitimer(signal.ITIMER_REAL, 0)
    report["error"] = (type(e).__name__ + ": " + str(e))[:300]
if report["compiled"]:
    for call, expected in cfg["examples"]:
        try:
            signal.setitimer(signal.ITIMER_REAL, cfg["example_s"])
            got = eval(call, ns)
            signal.setitimer(signal.ITIMER_REAL, 0)
            shown = repr(got)[:300]
            ok, want = expected_value(expected, ns)
            passed = same(got, want) if ok else shown.strip() == expected.strip()
        except BaseException as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            shown, passed = "!" + type(e).__name__, False
        report["examples"].append([passed, shown])
out.write(json.dumps(report))
out.flush()
