"""The program that runs one code test inside the sandbox, and the value format both sides share.

Runs as `python -I -S -c <this file's source> JOB_FD RESULT_FD` (standard library only, nothing of
copg_jax): it reads its job from JOB_FD (JSON: the completion's code, the calls to make or "program" mode,
and the limits), sets the limits, runs the code and, for call tests, writes the tagged values the calls
returned to RESULT_FD. It takes no
decision: the scorer compares what comes out with the expected values, which never enter the sandbox.

The scorer imports `encode_value` / `decode_value` from here, so the format has one definition. A value is
tagged with its exact builtin type -- `["int", "4"]`, `["tuple", [...]]` -- and an instance of any other
class (a subclass of int with its own `__eq__` included) cannot be encoded at all.
"""

import json
import os
import resource
import sys

MAX_DEPTH = 64
# RLIMIT_NOFILE of each process: kernel buffers held through descriptors (pipes, Unix sockets) count here
OPEN_FILES = 64
# RLIMIT_SIGPENDING: queued signals and POSIX timers, kernel memory counted per user namespace
PENDING_SIGNALS = 64
_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
# members of one decoded set (keys of one dict) that may share a hash: more is a crafted collision
MAX_SHARED_HASH = 8


def encode_value(value, depth=0):
    """A value of an exact builtin type (None, bool, int, float, str, bytes, list, tuple, set, frozenset,
    dict; nested at most MAX_DEPTH deep) -> its tagged JSON-able form. Anything else raises TypeError."""
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None:
        return ["none"]
    if kind is bool:
        return ["bool", value]
    if kind is int:
        return ["int", str(value)]
    if kind is float:
        return ["float", value.hex()]
    if kind is str:
        return ["str", value]
    if kind is bytes:
        return ["bytes", value.hex()]
    for tag, sequence in _SEQUENCES.items():
        if kind is sequence:
            return [tag, [encode_value(v, depth + 1) for v in value]]
    if kind is dict:
        return ["dict", [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"cannot serialise a value of type {kind.__name__}")


def decode_value(tagged, depth=0):
    """The value `encode_value` encoded; a malformed form raises ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH}")
    if not isinstance(tagged, list) or not tagged or not isinstance(tagged[0], str):
        raise ValueError("not a tagged value")
    tag, body = tagged[0], tagged[1:]
    if tag == "none" and not body:
        return None
    if len(body) != 1:
        raise ValueError(f"malformed {tag!r} value")
    (payload,) = body
    kinds = {"bool": bool, "int": str, "float": str, "str": str, "bytes": str, "dict": list}
    expected = kinds.get(tag, list if tag in _SEQUENCES else None)
    if expected is None or type(payload) is not expected:
        raise ValueError(f"malformed {tag!r} value")
    if tag in ("bool", "str"):
        return payload
    if tag == "int":
        return int(payload)
    if tag == "float":
        return float.fromhex(payload)
    if tag == "bytes":
        return bytes.fromhex(payload)
    if tag == "dict":
        if not all(type(item) is list and len(item) == 2 for item in payload):
            raise ValueError("malformed 'dict' value")
        keys = _hashable([decode_value(k, depth + 1) for k, _ in payload], tag)
        return dict(zip(keys, [decode_value(v, depth + 1) for _, v in payload], strict=True))
    members = [decode_value(v, depth + 1) for v in payload]
    return _SEQUENCES[tag](_hashable(members, tag) if tag in ("set", "frozenset") else members)


def _hashable(members, tag):
    """`members` (a set's, a dict's keys), checked: hashable, at most MAX_SHARED_HASH sharing a hash. Ints
    equal modulo 2^61 - 1 (and tuples of them) hash alike, so a result of n such members, which a completion
    can write, took n^2 / 2 comparisons to make a set of: an hour of the scorer's time for 500k of them."""
    counts = {}
    for member in members:
        try:
            key = hash(member)
        except TypeError as e:  # an unhashable member
            raise ValueError(f"malformed {tag!r} value: {e}") from None
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > MAX_SHARED_HASH:
            raise ValueError(f"malformed {tag!r} value: more than {MAX_SHARED_HASH} members share a hash")
    return members


def _set_limits(limits):
    """Hard and soft, before any completion code runs, so that code cannot raise them again."""
    mib = 1 << 20
    rules = [
        (resource.RLIMIT_AS, limits["memory_mb"] * mib),
        (resource.RLIMIT_FSIZE, limits["file_mb"] * mib),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, OPEN_FILES),
        (resource.RLIMIT_SIGPENDING, PENDING_SIGNALS),
    ]
    if limits["processes"]:  # counted per user namespace: only meaningful inside the sandbox
        rules.append((resource.RLIMIT_NPROC, limits["processes"]))
    for kind, value in rules:
        resource.setrlimit(kind, (value, value))
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first, SIGKILL a second later


def _init(child):
    """The sandbox's pid 1 (bwrap --as-pid-1), under the limits like every process of the test: reaps every
    process orphaned to it (a zombie still counts against the process limit) until the test's own process
    `child` exits, then exits as it did (128 + signal when a signal killed it), which ends the sandbox."""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def main():
    job_fd, result_fd = map(int, sys.argv[1:3])
    with os.fdopen(job_fd, "rb") as f:
        job = json.loads(f.read())
        # emptied, it tells the host that the sandbox started (closed before any code of the job runs, so no
        # completion can say so for a sandbox that failed)
        os.ftruncate(job_fd, 0)
    result = os.fdopen(result_fd, "w")
    _set_limits(job["limits"])
    if os.getpid() == 1:  # the test runs in a child: signals reach it as any process (pid 1 ignores them)
        child = os.fork()
        if child:
            _init(child)
    code = compile(job["code"], "<completion>", "exec")
    if job["mode"] == "program":  # stdin/stdout test: exit status and output are judged outside
        exec(code, {"__name__": "__main__"})
        return
    namespace = {"__name__": "__completion__"}
    exec(code, namespace)
    values = []
    for call in job["calls"]:
        try:
            name = call["name"]  # else LeetCode's form: a method of Solution() (as APPS' checker calls it)
            fn = namespace[name] if name in namespace else getattr(namespace["Solution"](), name)
            value = fn(*decode_value(call["args"]), **decode_value(call["kwargs"]))
            values.append(["ok", encode_value(value)])
        except BaseException as e:  # noqa: BLE001 - recorded as this call's failure
            values.append(["error", type(e).__name__])
    result.write(json.dumps(values))
    result.flush()


if __name__ == "__main__":
    sys.exit(main())
