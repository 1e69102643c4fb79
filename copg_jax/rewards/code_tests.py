"""Reward for code: run a completion against its prompt's tests in a sandbox; reward = pass rate.

A completion being trained on is untrusted code, and RL finds every loophole, so two things hold:

**The verdict is taken outside.** A test is either a *call test* -- call a function of the completion with
given arguments; the sandbox sends back what it returned, encoded by exact builtin type
(`sandbox_runner.encode_value`), and the scorer compares it with the expected value (`same_value`) -- or a
*stdin/stdout test* -- run the completion as a program on the given stdin; the scorer compares its stdout.
Expected values never enter the sandbox and there is no token to steal: code inside can only pass by
producing the value. Test forms (a row's `tests` list may mix them):

    "assert f(2) == 4"                                   call test; several assert lines = one test
    {"call": "f", "args": [2], "kwargs": {}, "expected": 4, "tolerance": 0.0}
    {"stdin": "3\\n", "stdout": "6\\n"}

An assert line must be `assert name(literal args) == literal` (either side): other asserts -- `assert
math.isclose(f(x), 0.5)`, `assert not g(1)` -- would be decided by code running beside the completion, which
can patch `math.isclose`, so they are refused with the row named. Equality is Python's `==` on the decoded
builtin values except that bools are not numbers (`True != 1`, as set members and dict keys too) and lists,
tuples and dicts must match in kind (a set equals a frozenset with the same members, as in Python);
`tolerance` compares floats, not set members or dict keys, with `math.isclose(rel_tol=abs_tol=tolerance)`.
Program output is compared line by line without trailing whitespace and trailing blank lines; the exit
status must be 0.

**The sandbox (`sandbox: bwrap`, the default)** is bubblewrap, one sandbox per test:
* unprivileged: new user, pid, mount, network, IPC, UTS and cgroup namespaces; uid/gid 65534 inside; no
  capabilities; no further user namespaces; a new session (no terminal). When the scorer runs as root,
  bwrap itself is started as uid/gid 65534, so the sandbox is not root outside either.
* a clean environment (PATH, LANG); a read-only view of /usr (and /bin, /lib... as on the host) and the
  Python installation only -- not the data, the run folder, /home, /root or /etc; where the scorer's
  working folder (when the sandbox is first made) or /usr/src, /usr/local/src lie in those (a container's
  WORKDIR /usr/src/app), an empty read-only tmpfs covers them; other data kept under /usr is visible, so
  keep it elsewhere. A private tmpfs /tmp of `tmp_mb` MiB is the only writable place; a private /proc
  shows only the test's processes; /dev is minimal.
* limits per process, hard and soft, set before the completion's code runs: address space `memory_mb`,
  CPU `cpu_seconds`, file size `file_mb` (stdout included), no core files, 64 open files, 64 queued
  signals and POSIX timers; and RLIMIT_NPROC `processes`, which the kernel (>= 5.14) counts per user
  namespace, so it caps the test's own processes and threads at once. The runner, its limits set, is the
  sandbox's pid 1 (bubblewrap's `--as-pid-1`: no init of bubblewrap's runs beside it, outside these limits):
  it runs the test in a child and reaps what is orphaned to it (`sandbox_runner._init`; counted as one).
  CPU time is cut per process at `cpu_seconds`, and everything is killed at `timeout_s` wall-clock.
* a seccomp filter (`seccomp_filter`, x86_64 and aarch64; a process of another architecture, i386 or
  arm32 code, is killed) that bubblewrap installs before the interpreter starts makes these calls fail with
  EPERM: the kernel keyrings (keyctl, add_key, request_key: the test inherits the scorer's session
  keyring); memory no limit above counts (memfd_create, memfd_secret, SysV shared memory, message queues
  and semaphores, POSIX message queues, vmsplice; growing a pipe (F_SETPIPE_SZ) or a socket buffer
  (SO_SNDBUF, SO_RCVBUF)); sockets other than Unix sockets; and kernel interfaces a test never needs
  (bpf, perf_event_open, userfaultfd, io_uring, ptrace, process_vm_readv/writev, pidfd_getfd,
  inotify, fanotify, mount and the new mount API, unshare, setns, kexec, kernel modules).
* memory of the whole test is therefore at most `processes x memory_mb` of address space, `tmp_mb` of
  files (/dev/shm is read-only), and the kernel buffers behind at most 64 open files per process -- a
  pipe keeps its default 64 KiB, a Unix socket its default send buffer (net.core.wmem_default, 208 KiB
  unless the host changed it) -- plus the at most 64 + 253 descriptors the kernel lets be in flight on Unix
  sockets: about `processes x (memory_mb + 16) + tmp_mb + 80` MiB. Not counted: kernel objects a test
  makes in numbers without holding memory, such as empty files and folders in /tmp (about 1.2 KiB of kernel
  memory each; tmpfs caps their number only at half the host's memory pages). They grow with the CPU time
  the test gets and are freed when it ends: 4 processes of 2.5 CPU-seconds made 780,000 folders holding
  970 MiB, so at the defaults (8 x 5 CPU-seconds) one test can hold several GiB while it runs, times
  `workers`; lower `processes` and `cpu_seconds` where host memory is tight. cgroups, which would count
  everything, are not used: not writable in every container. bubblewrap 0.8 sets no inode limit.
* every process of the test dies when the test ends: the runner's exit, or SIGKILL to it (pid 1) at the
  timeout, ends its pid namespace, and the kernel kills whatever is left (daemons and setsid children
  included) before `run_code_test` returns.
* the scorer and the sibling tests are unreachable: they are not in the sandbox's pid namespace (no pid to
  signal, no /proc to read), not in its network namespace (only Unix sockets can be made, and abstract
  ones are the sandbox's own), no socket path of theirs is mounted in, and no key of theirs is reachable.
When bubblewrap is missing or cannot create its namespaces here, building the reward fails with one line
(`SandboxUnavailable`); `sandbox: none` opts out explicitly: the same runner and outside verdicts, but as
the scorer's user with only the per-process limits above (no namespaces, no process cap, no syscall
filter) -- for trusted code only. A machine other than x86_64 or aarch64 has no filter: SandboxUnavailable.
"""

from __future__ import annotations

import ast
import base64
import binascii
import dataclasses
import errno
import functools
import inspect
import json
import logging
import math
import os
import pickletools
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from copg_jax.rewards import sandbox_runner
from copg_jax.rewards.base import FailedCall, describe_error
from copg_jax.rewards.sandbox_runner import decode_value, encode_value

log = logging.getLogger(__name__)

SANDBOX_UID = 65534  # "nobody" inside the sandbox, and outside it too when the scorer is root
SANDBOXES = ("bwrap", "none")
_RUNNER = inspect.getsource(sandbox_runner)
# possessive blanks: a fence followed by a long run of blanks and no newline backtracked quadratically
_FENCE = re.compile(r"```[ \t]*+(?:python3|python|py)?[ \t]*+\n(.*?)```", re.DOTALL | re.IGNORECASE)
MAX_COMPRESSED_TESTS = 1 << 30  # bytes a row's compressed tests may inflate to
_TEST_FORMS = (
    "`assert name(literal args) == literal` lines, {call, args, kwargs, expected[, tolerance]} or "
    "{stdin, stdout}"
)


class SandboxUnavailable(ValueError):
    """No sandbox can be made on this machine; the message says why and how to fix or opt out."""


class SandboxFailed(RuntimeError):
    """A run's sandbox failed to start (bwrap failing to set it up, a process or namespace limit of the
    host reached): the row's error, never its failed test (`score_rows` records it for the row)."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one test.

    Attributes:
      timeout_s: wall-clock seconds before every process of the test is killed.
      cpu_seconds: RLIMIT_CPU of each process.
      memory_mb: RLIMIT_AS of each process in MiB (leave room for the interpreter: >= 256).
      file_mb: RLIMIT_FSIZE in MiB (largest file the code may write, stdout included).
      processes: processes and threads the test may have at once (RLIMIT_NPROC in its user namespace).
      tmp_mb: size of the test's private /tmp in MiB.
    """

    timeout_s: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 1024
    file_mb: int = 16
    processes: int = 8
    tmp_mb: int = 64


# ------------------------------------------------------------------------------------------------ tests


@dataclasses.dataclass(frozen=True)
class CallTest:
    """Calls `name(*args, **kwargs)` in the completion's namespace (a name it does not define there: the
    method of `Solution()`, LeetCode's form), for each of `calls` in order; passes iff every call returns
    exactly its `expected` value (compared outside the sandbox). `unwrap`: APPS' and TACO's call-based
    tests, whose expected values some problems give wrapped in a list: a value equal to the list's first
    item passes too, and returned tuples compare as lists, as APPS' own checker accepts them; `as_list`:
    LiveCodeBench's checker's comparison."""

    calls: tuple[tuple[str, tuple, dict], ...]
    expected: tuple
    tolerance: float = 0.0
    unwrap: bool = False
    as_list: bool = False
    """LiveCodeBench's functional tests, judged as its checker judges them: a returned tuple as a list, then
    Python's == (a bool equals 1 or 0 there), not `same_value`."""


@dataclasses.dataclass(frozen=True)
class IOTest:
    """Runs the completion as `__main__` with `stdin`; passes iff it exits 0 and prints `stdout`."""

    stdin: str
    stdout: str


CodeTest = CallTest | IOTest


def _literal(node: ast.AST, what: str) -> Any:
    try:
        value = ast.literal_eval(node)
        encode_value(value)  # a plain value the sandbox can return (not complex, not nested too deeply)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"{what} is not a plain Python literal ({type(e).__name__})") from None
    return value


def _assert_call(stmt: ast.stmt) -> tuple[tuple[str, tuple, dict], Any]:
    """(call, expected) of one `assert name(literals) == literal` statement."""
    test = getattr(stmt, "test", None)
    if not (
        isinstance(stmt, ast.Assert)
        and isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
    ):
        raise ValueError("not an `assert ... == ...` line")
    call, other = test.left, test.comparators[0]
    if not isinstance(call, ast.Call):
        call, other = other, call
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        raise ValueError("neither side is a call of a plain function name")
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        raise ValueError("*args / **kwargs are not supported")
    args = tuple(_literal(a, f"argument {i}") for i, a in enumerate(call.args))
    kwargs = {k.arg: _literal(k.value, f"argument {k.arg!r}") for k in call.keywords}
    return (call.func.id, args, kwargs), _literal(other, "the expected value")


def function_name(value: Any) -> str | None:
    """The function a row's call tests call, from its metadata field (LiveCodeBench's `metadata`: JSON text
    or a record with `func_name`), None where it names none."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return None
    name = value.get("func_name") if isinstance(value, dict) else None
    return name if isinstance(name, str) and name.isidentifier() else None


# the opcodes of a pickle of one string (`pickle.dumps(text)`, any protocol): LiveCodeBench's private tests
_TEXT_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_FRAMING_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT", "STOP"})


def _pickled_text(raw: bytes) -> str:
    """The string a pickle of one string holds, read from its opcodes (`pickletools.genops`): no unpickler
    runs, so nothing the pickle names is called and nothing it would build (nested tuples hashed in a set,
    duplicated lists) is built.

    Raises:
      ValueError: any other opcode, or not exactly one string.
    """
    texts = []
    for op, arg, _ in pickletools.genops(raw):
        if op.name in _TEXT_OPS:
            texts.append(arg)
        elif op.name not in _FRAMING_OPS:
            raise ValueError(f"the pickle holds a {op.name}: only a pickled string is read")
    if len(texts) != 1:
        raise ValueError(f"the pickle holds {len(texts)} strings, not one")
    return texts[0]


def _compressed_tests(value: str) -> Any:
    """LiveCodeBench's `private_test_cases`: base64 of zlib of a pickled JSON text, read from the pickle's
    opcodes (`_pickled_text`); `value` itself where it is no such thing."""
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(base64.b64decode(value, validate=True), MAX_COMPRESSED_TESTS)
    except (binascii.Error, zlib.error, ValueError):
        return value
    if inflate.unconsumed_tail:  # a zip bomb, or tests past any a row should carry
        raise ValueError(f"compressed tests that inflate past {MAX_COMPRESSED_TESTS >> 20} MiB")
    try:
        return _pickled_text(raw)
    except Exception as e:  # noqa: BLE001 - any malformed pickle: a row error naming it
        raise ValueError(f"compressed tests (base64, zlib, pickle) that do not decode: {e}") from None


def _functional(spec: dict, function: str | None) -> dict:
    """A LiveCodeBench functional test {input, output, testtype: "functional"} as the call test its checker
    runs: each line of `input` one JSON argument, `output` the JSON of the expected value, the function named
    in the test's own `metadata` (DeepCoder's rows) or the row's (`function`)."""
    function = function_name(spec.get("metadata")) or function
    if function is None:
        raise ValueError(
            "a LiveCodeBench functional test needs the function it calls: neither the test nor the row's "
            "reward.function_field names one (func_name)"
        )
    if not (isinstance(spec["input"], str) and isinstance(spec["output"], str)):
        raise ValueError(f"functional test {str(spec)[:80]}: 'input' and 'output' must be JSON text")
    try:
        args = [json.loads(line) for line in spec["input"].split("\n")]
        expected = json.loads(spec["output"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"functional test {str(spec)[:80]}: not JSON lines ({type(e).__name__})") from None
    return {"call": function, "args": args, "expected": expected, "as_list": True}


def row_test_specs(value: Any, function: str | None = None) -> list:
    """A row's tests field as a list of test specs (`parse_test`), from the shapes code datasets ship:

    * a list of tests, or one test (an assert string, a call or stdin/stdout object);
    * a JSON string of any of these (APPS', TACO's and LiveCodeBench's columns are JSON text);
    * {"inputs": [...], "outputs": [...]} (APPS, TACO) or {"input": [...], "output": [...]} (CodeContests'
      public_tests): stdin/stdout pairs, an output given as a list of lines joined by newlines; with
      "fn_name" (APPS' and TACO's call-based problems) call tests of that function, each input the list of
      its arguments, read as APPS' checker reads them (`CallTest.unwrap`);
    * LiveCodeBench's {"input", "output", "testtype": "stdin"} items (`parse_test`), and its "functional"
      ones as call tests of `function` (`_functional`); its `private_test_cases`, compressed
      (`_compressed_tests`).

    Raises:
      ValueError: malformed JSON; pairs of unequal counts or not text (call-based: arguments not a list).
    """
    if isinstance(value, str) and value.lstrip()[:1] not in ("[", "{", '"'):
        value = _compressed_tests(value)
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{", '"'):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"a JSON text of tests that is not JSON ({type(e).__name__})") from None
    keys = set(value) if isinstance(value, dict) else set()
    if {"inputs", "outputs"} <= keys or ({"input", "output"} <= keys and "testtype" not in keys):
        plural = "inputs" in keys
        inputs, outputs = (value["inputs"], value["outputs"]) if plural else (value["input"], value["output"])
        if not (isinstance(inputs, list) and isinstance(outputs, list) and len(inputs) == len(outputs)):
            raise ValueError("stdin/stdout pairs need lists of inputs and outputs of one length")
        if name := value.get("fn_name"):  # APPS' / TACO's call-based problems
            for k, args in enumerate(inputs):
                if not isinstance(args, list):
                    raise ValueError(f"call-based test {k} of {name!r}: its input is not a list of arguments")
            return [
                {"call": name, "args": args, "expected": out, "unwrap": True}
                for args, out in zip(inputs, outputs, strict=True)
            ]
        lines = [
            "\n".join(o) + "\n" if isinstance(o, list) and all(isinstance(x, str) for x in o) else o
            for o in outputs
        ]
        for k, text in enumerate([*inputs, *lines]):
            if not isinstance(text, str):
                side = "input" if k < len(inputs) else "output"
                raise ValueError(f"stdin/stdout pair {k % len(inputs)}: its {side} is not text: {text!r:.60}")
        return [{"stdin": i, "stdout": o} for i, o in zip(inputs, lines, strict=True)]
    specs = value if isinstance(value, list) else [value] if isinstance(value, str | dict) else value
    if not isinstance(specs, list):
        return specs
    return [_functional(s, function) if isinstance(s, dict) and _is_functional(s) else s for s in specs]


def _is_functional(spec: dict) -> bool:
    return spec.get("testtype") == "functional" and {"input", "output"} <= set(spec)


def parse_test(spec: Any) -> CodeTest:
    """A test of a data row (an assert string, a call dict or a stdin/stdout dict) -> CallTest / IOTest.

    Raises:
      ValueError: an unsupported form or a malformed field, naming it.
    """
    if isinstance(spec, str):
        try:
            body = ast.parse(spec).body
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            raise ValueError(f"not valid Python ({type(e).__name__})") from None
        if not body:
            raise ValueError("empty test")
        try:
            pairs = [_assert_call(stmt) for stmt in body]
        except ValueError as e:
            raise ValueError(f"{e}: {spec[:80]!r}; code tests are {_TEST_FORMS}") from None
        return CallTest(tuple(c for c, _ in pairs), tuple(e for _, e in pairs))
    if not isinstance(spec, dict):
        raise ValueError(f"a test must be a string or an object, got {type(spec).__name__}")
    if "call" in spec:
        unknown = set(spec) - {"call", "args", "kwargs", "expected", "tolerance", "unwrap", "as_list"}
        name, args, kwargs = spec["call"], spec.get("args", []), spec.get("kwargs", {})
        tolerance = spec.get("tolerance", 0.0)
        problems = [
            (unknown, f"unknown key(s) {sorted(unknown)}"),
            ("expected" not in spec, "'expected' is missing"),
            (not (isinstance(name, str) and name.isidentifier()), "'call' must be a function name"),
            (not isinstance(args, list), "'args' must be a list"),
            (not (isinstance(kwargs, dict) and all(map(str.isidentifier, kwargs))), "'kwargs' bad"),
            (type(tolerance) not in (int, float) or not tolerance >= 0, "'tolerance' must be >= 0"),
            (not isinstance(spec.get("unwrap", False), bool), "'unwrap' must be true or false"),
            (not isinstance(spec.get("as_list", False), bool), "'as_list' must be true or false"),
        ]
        for bad, why in problems:
            if bad:
                raise ValueError(f"call test {str(spec)[:80]}: {why}")
        call = ((name, tuple(args), dict(kwargs)),)
        lenient = spec.get("unwrap", False), spec.get("as_list", False)
        return CallTest(call, (spec["expected"],), float(tolerance), *lenient)
    if "testtype" in spec and {"input", "output"} <= set(spec):  # LiveCodeBench's test cases
        if spec["testtype"] != "stdin":
            raise ValueError(
                f"test {str(spec)[:80]}: testtype {spec['testtype']!r} is not read (stdin, and functional "
                "with the function's name: `row_test_specs`)"
            )
        spec = {"stdin": spec["input"], "stdout": spec["output"]}
    if "stdout" in spec:
        unknown = set(spec) - {"stdin", "stdout"}
        text = [spec["stdout"], spec.get("stdin", "")]
        if unknown or not all(isinstance(t, str) for t in text):
            raise ValueError(f"stdin/stdout test {str(spec)[:80]}: 'stdin' and 'stdout' must be strings")
        for name, value in zip(("stdout", "stdin"), text, strict=True):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: every completion would fail on it
                bad = f"\\u{ord(value[e.start]):04x}"
                raise ValueError(
                    f"stdin/stdout test {str(spec)[:80]}: '{name}' is no UTF-8 text ({bad})"
                ) from None
        return IOTest(stdin=text[1], stdout=text[0])
    raise ValueError(f"test {str(spec)[:80]} has neither 'call' nor 'stdout'; code tests are {_TEST_FORMS}")


def same_value(actual: Any, expected: Any, tolerance: float = 0.0) -> bool:
    """Strict, type-aware equality of plain values: Python's `==`, except that a bool only equals a bool (at
    any depth: set members and dict keys included), lists / tuples / dicts only equal their own kind, and
    floats compare within `tolerance`. A set equals a frozenset with the same members, as in Python; set
    members and dict keys compare exactly (`tolerance` does not apply to them)."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    numbers = (int, float)
    if isinstance(actual, numbers) and isinstance(expected, numbers):
        if tolerance and (isinstance(actual, float) or isinstance(expected, float)):
            try:
                return math.isclose(actual, expected, rel_tol=tolerance, abs_tol=tolerance)
            except OverflowError:  # an int past the floats' range: within no tolerance of a float
                return False
        return actual == expected
    if isinstance(actual, (set, frozenset)) and isinstance(expected, (set, frozenset)):
        return set(map(_strict_key, actual)) == set(map(_strict_key, expected))
    if type(actual) is not type(expected):
        return False
    if isinstance(actual, (list, tuple)):
        return len(actual) == len(expected) and all(
            same_value(a, e, tolerance) for a, e in zip(actual, expected, strict=True)
        )
    if isinstance(actual, dict):
        actual_items = {_strict_key(k): v for k, v in actual.items()}
        expected_items = {_strict_key(k): v for k, v in expected.items()}
        return actual_items.keys() == expected_items.keys() and all(
            same_value(v, expected_items[k], tolerance) for k, v in actual_items.items()
        )
    return actual == expected


def _strict_key(value: Any) -> tuple:
    """A hashable stand-in for a set member or dict key that is `==` to another's iff `same_value` holds
    between them: bools are tagged apart from numbers, inside tuples and frozensets too (1 == 1.0 stays)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, tuple):
        return ("tuple", tuple(map(_strict_key, value)))
    if isinstance(value, frozenset):
        return ("frozenset", frozenset(map(_strict_key, value)))
    return ("value", value)


def _output_lines(text: bytes) -> list[bytes]:
    lines = [line.rstrip() for line in text.replace(b"\r\n", b"\n").split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


# ------------------------------------------------------------------------------------------- syscall filter

AUDIT_ARCH_X86_64, AUDIT_ARCH_AARCH64 = 0xC000003E, 0xC00000B7
_MACHINES = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}  # os.uname().machine
_X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: the same arch, another numbering
_RET_KILL_PROCESS, _RET_ALLOW = 0x80000000, 0x7FFF0000
_REFUSE = 0x00050000 | errno.EPERM  # SECCOMP_RET_ERRNO
_LOAD, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
_NR_AT, _ARCH_AT, _ARGS_AT = 0, 4, 16  # in struct seccomp_data (an argument's low word: little-endian)
AF_UNIX, F_SETPIPE_SZ = 1, 1031
SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 7, 8, 32, 33

# Refused with EPERM: name -> (x86_64 number, aarch64 number or None). Why, by group: the kernel keyrings (a
# test inherits the scorer's session keyring); memory no rlimit counts; kernel interfaces a test never needs.
DENIED_SYSCALLS = {
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "msgget": (68, 186),
    "semget": (64, 190), "mq_open": (240, 180), "vmsplice": (278, 75),
    "userfaultfd": (323, 282), "perf_event_open": (298, 241), "bpf": (321, 280), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "pidfd_getfd": (438, 438),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "inotify_init": (253, None), "inotify_init1": (294, 26), "fanotify_init": (300, 262),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "unshare": (272, 97),
    "setns": (308, 268), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106),
}  # fmt: skip
# Refused for some arguments only: name -> (numbers, argument index, values, refused when the argument is
# one of them (True) or when it is none of them (False)). Sockets are Unix sockets only (TCP buffers grow to
# megabytes); pipes and sockets keep their default buffer sizes (memory held by a file descriptor).
ARGUMENT_RULES = {
    "socket": ((41, 198), 0, (AF_UNIX,), False),
    "socketpair": ((53, 199), 0, (AF_UNIX,), False),
    "fcntl": ((72, 25), 1, (F_SETPIPE_SZ,), True),
    "setsockopt": ((54, 208), 2, (SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE), True),
}


def _arch_block(arch: str, column: int) -> list[tuple]:
    """The filter's instructions for one architecture (`column` of the syscall tables); every path returns."""
    deny, allow = f"{arch}.deny", f"{arch}.allow"
    block: list[tuple] = [("label", arch), (_LOAD, _NR_AT, None, None)]
    if arch == "x86_64":
        block.append((_JGE, _X32_SYSCALL_BIT, deny, None))
    block += [(_JEQ, nr[column], deny, None) for nr in DENIED_SYSCALLS.values() if nr[column] is not None]
    block += [(_JEQ, rule[0][column], f"{arch}.{name}", None) for name, rule in ARGUMENT_RULES.items()]
    block += [("label", allow), (_RET, _RET_ALLOW, None, None)]
    block += [("label", deny), (_RET, _REFUSE, None, None)]
    for name, (_, argument, values, refused_if_in) in ARGUMENT_RULES.items():
        hit, miss = (_REFUSE, _RET_ALLOW) if refused_if_in else (_RET_ALLOW, _REFUSE)
        block += [("label", f"{arch}.{name}"), (_LOAD, _ARGS_AT + 8 * argument, None, None)]
        block += [(_JEQ, value, f"{arch}.{name}.hit", None) for value in values]
        block += [(_RET, miss, None, None), ("label", f"{arch}.{name}.hit"), (_RET, hit, None, None)]
    return block


def _assemble(program: list[tuple]) -> bytes:
    """Classic BPF (struct sock_filter, native byte order) of (code, k, jump-if-true label, jump-if-false
    label) instructions and ("label", name) markers; a jump backwards or over 255 raises struct.error."""
    at, index = {}, 0
    for item in program:
        if item[0] == "label":
            at[item[1]] = index
        else:
            index += 1
    code = []
    for item in program:
        if item[0] != "label":
            jumps = [0 if label is None else at[label] - len(code) - 1 for label in item[2:]]
            code.append(struct.pack("=HBBI", item[0], *jumps, item[1]))
    return b"".join(code)


def seccomp_filter() -> bytes:
    """The sandbox's seccomp program (bwrap --seccomp): `DENIED_SYSCALLS` and `ARGUMENT_RULES` fail with
    EPERM on x86_64 (x32 numbers too) and aarch64, any other call is allowed; a process of another
    architecture (i386 code on x86_64, arm32 on aarch64) is killed at its first system call."""
    program = [(_LOAD, _ARCH_AT, None, None)]
    program += [(_JEQ, arch, name, None) for name, arch in _MACHINES.items()]
    program.append((_RET, _RET_KILL_PROCESS, None, None))
    for column, name in enumerate(_MACHINES):
        program += _arch_block(name, column)
    return _assemble(program)


SECCOMP_FILTER = seccomp_filter()


# ----------------------------------------------------------------------------------------------- sandbox


def _world_reachable(path: str) -> bool:
    """Whether a process of another user can reach `path`: it and every folder above it are executable
    (searchable) by others. (The probe run in `make_sandbox` checks the rest.)"""
    parts = Path(path).parts
    return all(os.stat(Path(*parts[:i])).st_mode & stat.S_IXOTH for i in range(1, len(parts) + 1))


def _interpreter(drop_to_nobody: bool) -> tuple[str, str]:
    """(python executable, installation prefix) for the sandbox: this interpreter, unless the sandbox user
    could not read it (root's pyenv under a private /root), then the system's /usr/bin/python3."""
    exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefix = os.path.realpath(sys.base_prefix)
    if not drop_to_nobody or (_world_reachable(exe) and _world_reachable(prefix)):
        return exe, prefix
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        raise SandboxUnavailable(
            f"code-test sandbox: {exe} is not readable by uid {SANDBOX_UID} and there is no /usr/bin/python3"
        )
    log.info("code-test sandbox: %s is private to root; tests run with %s", exe, system)
    return os.path.realpath(system), "/usr"


# folders under /usr that hold sources and data, never what the interpreter needs
SOURCE_DIRS = ("/usr/src", "/usr/local/src")


def _hidden_dirs(python: str, prefix: str, tops: list[str], cwd: str) -> list[str]:
    """The folders to cover with an empty tmpfs in a sandbox that mounts `tops` (read-only): SOURCE_DIRS and
    the scorer's working folder `cwd` (a container's WORKDIR /usr/src/app holds the data, tests included,
    and the run) where they lie inside a mounted tree, unless the interpreter needs them: its own folder, its
    libraries (`prefix`/lib*, /usr/lib*), or a folder above one of those."""
    needed = [os.path.dirname(python)]
    needed += [f"{root}/{lib}" for root in (prefix, "/usr") for lib in ("lib", "lib32", "lib64", "libx32")]

    def within(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder.rstrip("/") + "/")

    # a folder inside one covered is covered already: bwrap cannot make its mount point in the read-only
    # tmpfs over the outer one (/usr/src/app in /usr/src)
    hidden: list[str] = []
    for folder in (*SOURCE_DIRS, cwd):
        folder = os.path.realpath(folder)
        if (
            os.path.isdir(folder)
            and any(within(folder, top) for top in tops)
            and not any(within(need, folder) or within(folder, need) for need in needed)
            and not any(within(folder, outer) for outer in hidden)
        ):
            hidden = [f for f in hidden if not within(f, folder)] + [folder]
    return hidden


def _bwrap_argv(bwrap: str, python: str, prefix: str, tmp_mb: int, cwd: str = "/") -> list[str]:
    """The bubblewrap command line (up to the interpreter's own arguments); see the module docstring."""
    # --as-pid-1: the runner, its limits set, is the sandbox's pid 1 (and its reaper); bwrap's own init,
    # without them and of the test's uid, could be rewritten through /proc/1/mem by the completion and run
    # code past every limit
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--as-pid-1"]
    argv += ["--new-session", "--cap-drop", "ALL", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    argv += ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8"]
    argv += ["--ro-bind", "/usr", "/usr"]
    tops = ["/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
            tops.append(top)
    if not prefix.startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
        tops.append(prefix)
    for folder in _hidden_dirs(python, prefix, tops, cwd):
        argv += ["--tmpfs", folder, "--remount-ro", folder]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmp_mb << 20), "--tmpfs", "/tmp"]
    # bwrap's own root and /dev are tmpfs without a size: read-only, so /tmp is the only writable place
    argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
    return [*argv, "--chdir", "/tmp", python]


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """How a test's interpreter is started: `argv` up to the interpreter's arguments; `user` the uid/gid
    to start it as (None: as the scorer)."""

    mechanism: str
    argv: tuple[str, ...]
    user: int | None


@functools.cache
def make_sandbox(mechanism: str = "bwrap", tmp_mb: int = 64) -> Sandbox:
    """The sandbox of this machine, checked once by running `pass` in it.

    Raises:
      SandboxUnavailable: bubblewrap is missing or cannot create its namespaces here (one line: why, and
        `sandbox: none` to opt out).
    """
    if mechanism == "none":
        log.warning("code-test reward: sandbox=none: completions run UNSANDBOXED as %s", os.getuid())
        return Sandbox("none", (sys.executable,), None)
    if mechanism != "bwrap":
        raise ValueError(f"code-test sandbox {mechanism!r}; expected one of {SANDBOXES}")
    opt_out = "or set reward.sandbox=none (score: --sandbox none) to run completions unsandboxed"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            f"code tests need bubblewrap: `apt-get install bubblewrap` (bwrap not on PATH), {opt_out}"
        )
    machine = os.uname().machine
    if machine not in _MACHINES:
        raise SandboxUnavailable(
            f"code-test sandbox: its syscall filter knows {sorted(_MACHINES)}, not {machine}; {opt_out}"
        )
    user = SANDBOX_UID if os.geteuid() == 0 else None
    python, prefix = _interpreter(user is not None)
    sandbox = Sandbox("bwrap", tuple(_bwrap_argv(bwrap, python, prefix, tmp_mb, os.getcwd())), user)
    limits = SandboxLimits(timeout_s=60.0, tmp_mb=tmp_mb)
    try:  # as every test runs (its init reaped, every process gone at the end)
        probe = run_sandboxed(sandbox, _job("pass", limits, sandbox, mode="program"), b"", limits)
        said = probe.stderr.decode(errors="replace").strip().splitlines()
        failed = probe.returncode != 0 or probe.timed_out
        why = (said or [f"exit status {probe.returncode}"])[-1] if failed else None
    except SandboxFailed as e:
        why = str(e).split(": the completion")[0]
    if why is not None:
        raise SandboxUnavailable(f"code-test sandbox: bubblewrap failed here ({why[:200]}); {opt_out}")
    return sandbox


def _with_seccomp(argv: tuple[str, ...] | list[str], fd: int) -> list[str]:
    """bwrap's `argv` with the syscall filter (`SECCOMP_FILTER`) read from file descriptor `fd`."""
    return [argv[0], "--seccomp", str(fd), *argv[1:]]


def _as_user(uid: int | None) -> dict:
    return {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What came out of one sandboxed run: exit status (negative: killed by that signal), whether the
    timeout killed it, and the first bytes of its stdout, stderr and result channel."""

    returncode: int
    timed_out: bool
    stdout: bytes
    stderr: bytes
    result: bytes


def _temp_file(data: bytes = b""):
    f = tempfile.TemporaryFile()
    f.write(data)
    f.seek(0)
    return f


def _init_pidfd(info_fd: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's init, read from bwrap's --info-fd (None when bwrap exited before)."""
    data = b""
    while time.monotonic() < deadline and select.select([info_fd], [], [], deadline - time.monotonic())[0]:
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        return os.pidfd_open(int(json.loads(data)["child-pid"]))
    except (ValueError, KeyError, OSError):
        return None


def run_sandboxed(sandbox: Sandbox, job: dict, stdin: bytes, limits: SandboxLimits) -> Outcome:
    """Runs `sandbox_runner` on `job` in a fresh sandbox and collects what it left (read back at most
    `file_mb` each). Every process of the run is dead when this returns."""
    read_limit = limits.file_mb << 20
    info_r, info_w = os.pipe() if sandbox.mechanism == "bwrap" else (None, None)
    job_file, result_file = _temp_file(json.dumps(job).encode()), _temp_file()
    fds = (job_file.fileno(), result_file.fileno())  # the runner reads its job, writes its results there
    seccomp = _temp_file(SECCOMP_FILTER)
    argv, bwrap_fds = list(sandbox.argv), []
    if info_w is not None:
        argv, bwrap_fds = _with_seccomp(argv, seccomp.fileno()), [info_w, seccomp.fileno()]
        argv[1:1] = ["--info-fd", str(info_w)]
    deadline = time.monotonic() + limits.timeout_s
    with job_file, result_file, seccomp, _temp_file(stdin) as inp, _temp_file() as out, _temp_file() as err:
        with tempfile.TemporaryDirectory(prefix="copg-codetest-") as cwd:
            try:
                proc = subprocess.Popen(
                    [*argv, "-I", "-S", "-B", "-c", _RUNNER, *map(str, fds)],
                    stdin=inp,
                    stdout=out,
                    stderr=err,
                    cwd="/" if sandbox.mechanism == "bwrap" else cwd,
                    env={"LANG": "C.UTF-8"},
                    pass_fds=(*fds, *bwrap_fds),
                    start_new_session=True,
                    **_as_user(sandbox.user),
                )
            except BaseException:
                if info_r is not None:
                    os.close(info_r)
                raise
            finally:
                if info_w is not None:
                    os.close(info_w)
            timed_out = _wait(proc, info_r, deadline)
        outputs = [f.seek(0) or f.read(read_limit) for f in (out, err, result_file)]
        started = os.fstat(job_file.fileno()).st_size == 0  # the runner empties its job before any code runs
    if not started:  # the sandbox failed before the completion ran: no verdict on it
        said = outputs[1][-4096:].decode(errors="replace").strip().splitlines()
        raise SandboxFailed(
            f"the sandbox did not start (exit status {proc.returncode}"
            + (f": {said[-1][:200]}" if said else "")
            + "): the completion was not run, so it gets no reward, not a failing one"
        )
    return Outcome(proc.returncode, timed_out, *outputs)


def _wait(proc: subprocess.Popen, info_fd: int | None, deadline: float) -> bool:
    """Waits for the run until `deadline`, then kills whatever is left of it; True when it timed out.

    With bwrap, SIGKILL to the sandbox's init (through a pidfd: never another process) ends its pid
    namespace; waiting for init's exit means the kernel has killed every process that was in it.
    """
    pidfd = None
    try:
        if info_fd is not None:
            pidfd = _init_pidfd(info_fd, deadline)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return False
        except subprocess.TimeoutExpired:
            return True
    finally:
        if pidfd is not None:
            _signal_quietly(lambda: signal.pidfd_send_signal(pidfd, signal.SIGKILL))
        _signal_quietly(lambda: os.killpg(proc.pid, signal.SIGKILL))
        proc.wait()
        if pidfd is not None:
            if select.select([pidfd], [], [], 10.0)[0]:
                _reap(pidfd)
            os.close(pidfd)
        if info_fd is not None:
            os.close(info_fd)


def _reap(pidfd: int) -> None:
    """Reaps the exited sandbox init of `pidfd` where it became this process's child: bwrap can exit before
    its init has, which the kernel then hands to the nearest subreaper -- this process when it is a
    container's pid 1 (no --init), which left a zombie per test until the pids ran out. Elsewhere its new
    parent reaps it."""
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    except ChildProcessError:
        pass


def _signal_quietly(send) -> None:
    try:
        send()
    except (ProcessLookupError, PermissionError, OSError):
        pass


# ---------------------------------------------------------------------------------------------- verdicts


def _failure(outcome: Outcome, limits: SandboxLimits, sandbox_exit_codes: bool) -> str | None:
    """Why the run failed as a process (timeout, signal, exit status), or None when it exited 0."""
    if outcome.timed_out:
        return f"timeout after {limits.timeout_s:g}s"
    # a process killed by a signal: -signal from Popen, 128 + signal from the sandbox's pid 1 (`_init`)
    signum = -outcome.returncode if outcome.returncode < 0 else outcome.returncode - 128
    if outcome.returncode < 0 or (sandbox_exit_codes and 128 < outcome.returncode < 128 + 65):
        name = signal.Signals(signum).name if signum in signal.valid_signals() else f"signal {signum}"
        why = {"SIGXCPU": " (CPU limit)", "SIGKILL": " (the hard CPU limit, or a kill from the test itself)"}
        return f"killed by {name}" + why.get(name, "")
    if outcome.returncode != 0:
        stderr = outcome.stderr[-4096:].decode(errors="replace").strip()
        return (stderr.splitlines()[-1] if stderr else f"exit code {outcome.returncode}")[:200]
    return None


def _call_verdict(test: CallTest, outcome: Outcome) -> str | None:
    """None when every call returned its expected value, else why not."""
    try:
        results = json.loads(outcome.result) if outcome.result else None
    except (ValueError, RecursionError):
        return "malformed result"
    if results is None:
        return "exited before the test finished"
    if not (isinstance(results, list) and len(results) == len(test.calls)):
        return "malformed result"
    for (name, _, _), expected, item in zip(test.calls, test.expected, results, strict=True):
        if not (isinstance(item, list) and len(item) == 2 and item[0] in ("ok", "error")):
            return "malformed result"
        if item[0] == "error":
            return f"{name}(...) raised {str(item[1])[:80]}"
        try:
            value = decode_value(item[1])
        except (ValueError, TypeError, RecursionError, OverflowError):
            return "malformed result"
        try:
            if test.as_list:  # LiveCodeBench's checker: a tuple as a list, then Python's == (True == 1)
                same = (list(value) if isinstance(value, tuple) else value) == expected
            else:
                same = same_value(value, expected, test.tolerance) or (
                    test.unwrap and _unwrapped_same(value, expected, test.tolerance)
                )
        except Exception:  # noqa: BLE001 - whatever a returned value makes a comparison raise fails its test
            same = False
        if not same:
            return f"{name}(...) returned a wrong value"
    return None


def _unwrapped_same(value: Any, expected: Any, tolerance: float) -> bool:
    """APPS' checker's leniency: `value` with its tuples as lists equals `expected`, or the first item of
    a non-empty `expected` list."""
    value = _as_lists(value)
    return same_value(value, expected, tolerance) or (
        isinstance(expected, list) and bool(expected) and same_value(value, expected[0], tolerance)
    )


def _as_lists(value: Any) -> Any:
    """`value` with every tuple in it (in lists and tuples) a list."""
    if isinstance(value, list | tuple):
        return [_as_lists(v) for v in value]
    return value


def _job(code: str, limits: SandboxLimits, sandbox: Sandbox, **mode) -> dict:
    processes = limits.processes + 1 if sandbox.mechanism == "bwrap" else 0  # + the runner, pid 1 (`_init`)
    job_limits = {"memory_mb": limits.memory_mb, "cpu_seconds": limits.cpu_seconds, "file_mb": limits.file_mb}
    return {"code": code, "limits": {**job_limits, "processes": processes}, **mode}


def run_program(
    code: str, stdin: bytes = b"", limits: SandboxLimits = SandboxLimits(), sandbox: Sandbox | None = None
) -> Outcome:
    """Runs `code` as `__main__` on `stdin` in a fresh sandbox (`make_sandbox()` by default)."""
    sandbox = make_sandbox("bwrap", limits.tmp_mb) if sandbox is None else sandbox
    return run_sandboxed(sandbox, _job(code, limits, sandbox, mode="program"), stdin, limits)


def run_code_test(
    code: str, test: CodeTest, limits: SandboxLimits = SandboxLimits(), sandbox: Sandbox | None = None
) -> tuple[bool, str]:
    """Runs one test of `code` in a fresh sandbox (`make_sandbox()` by default) and judges it here.

    Returns:
      (passed, detail): detail is "" on a pass, else a short reason ("timeout after 5s", "wrong output", the
      last line of stderr, ...).
    """
    sandbox = make_sandbox("bwrap", limits.tmp_mb) if sandbox is None else sandbox
    if isinstance(test, IOTest):
        outcome = run_program(code, test.stdin.encode(), limits, sandbox)
        failure = _failure(outcome, limits, sandbox.mechanism == "bwrap")
        if failure is None and _output_lines(outcome.stdout) != _output_lines(test.stdout.encode()):
            failure = "wrong output"
    else:
        calls = [{"name": n, "args": encode_value(a), "kwargs": encode_value(k)} for n, a, k in test.calls]
        job = _job(code, limits, sandbox, mode="call", calls=calls)
        outcome = run_sandboxed(sandbox, job, b"", limits)
        failure = _failure(outcome, limits, sandbox.mechanism == "bwrap") or _call_verdict(test, outcome)
    return failure is None, failure or ""


def extract_code(completion: str) -> str:
    """The code in a completion: the fenced ```python blocks joined, or the whole text when there are none."""
    blocks = _FENCE.findall(completion)
    return "\n\n".join(blocks) if blocks else completion


def prompt_key(prompt) -> str:
    """A hashable key of a prompt (a string, or a list of chat messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


class CodeTestReward:
    """Batched reward `fn(prompts, completions)`: the pass rate of each completion on its prompt's tests.

    Args:
      tests_by_prompt: prompt key (`prompt_key`) -> its tests (CodeTest, or the row forms `parse_test`
        reads).
      limits: per-test limits.
      workers: tests run in parallel (threads, each waiting on its own sandbox).
      all_or_nothing: reward 1 only when every test passes, else 0 (instead of the pass fraction); a
        completion's tests not yet started when one of them fails are not run (its reward is 0 either way:
        a completion that sleeps costs one `timeout_s`, not one per test).
      sandbox: "bwrap" or "none" (explicit opt-out; see the module docstring).
    A row one of whose tests' sandbox failed to start (`SandboxFailed`: the host's process limit reached)
    scores a FailedCall naming why (its row's error; its other tests are not run), the other rows their pass
    rates: raising for the batch had every row scored again one at a time.
    Raises:
      SandboxUnavailable: sandbox="bwrap" and bubblewrap does not work here.
    """

    def __init__(
        self,
        tests_by_prompt: dict[str, list],
        limits: SandboxLimits = SandboxLimits(),
        workers: int = 2,
        all_or_nothing: bool = False,
        sandbox: str = "bwrap",
    ):
        self.tests_by_prompt = {
            key: [t if isinstance(t, CallTest | IOTest) else parse_test(t) for t in tests]
            for key, tests in tests_by_prompt.items()
        }
        self.limits = limits
        self.workers = workers
        self.all_or_nothing = all_or_nothing
        self.sandbox = make_sandbox(sandbox, limits.tmp_mb)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float | FailedCall]:
        jobs = []
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            tests = self.tests_by_prompt.get(prompt_key(prompt))
            if not tests:
                raise KeyError(f"row {row}: no tests for prompt {prompt_key(prompt)[:60]!r}")
            jobs += [(row, extract_code(completion), t) for t in tests]
        unstarted: dict[int, str] = {}  # row -> why a sandbox of its failed to start
        lost: set[int] = set()  # all_or_nothing: rows with a failed test

        def run(job) -> bool:
            row, code, test = job
            if row in unstarted or row in lost:
                return False
            try:
                ok = run_code_test(code, test, self.limits, self.sandbox)[0]
            except SandboxFailed as e:
                unstarted.setdefault(row, describe_error(e))
                return False
            if not ok and self.all_or_nothing:
                lost.add(row)
            return ok

        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            outcomes = list(pool.map(run, jobs))
        passed = [0] * len(prompts)
        total = [0] * len(prompts)
        for (row, _, _), ok in zip(jobs, outcomes, strict=True):
            passed[row] += ok
            total[row] += 1
        scores = [float(p == t) if self.all_or_nothing else p / t for p, t in zip(passed, total, strict=True)]
        return [FailedCall(unstarted[i]) if i in unstarted else s for i, s in enumerate(scores)]
