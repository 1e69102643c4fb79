"""The code-test sandbox against hostile completions: every attack of issue 14 is contained or fails.

Each test runs real completions in bubblewrap (installed by `.ci/run`); none may pass where it should not,
reach the scorer, a sibling test or the host, or outlive its test.
"""

import ctypes
import dataclasses
import errno
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from copg_jax.rewards import RewardConfig, build_reward, code_tests
from copg_jax.rewards.base import score_rows
from copg_jax.rewards.code_tests import (
    CodeTestReward,
    SandboxLimits,
    SandboxUnavailable,
    make_sandbox,
    parse_test,
    run_code_test,
    run_program,
)

FAST = SandboxLimits(timeout_s=10.0, cpu_seconds=3, memory_mb=512, processes=4, tmp_mb=8)
DOUBLE = parse_test("assert f(21) == 42")


def _inside(code: str, limits: SandboxLimits = FAST):
    """Runs `code` as a program in the sandbox; returns what it printed as JSON on its last line."""
    out = run_program(code, b"", limits)
    assert out.returncode == 0, out.stderr.decode()[-500:]
    return json.loads(out.stdout.decode().splitlines()[-1])


# --------------------------------------------------------------------------------- forged verdicts


FORGERIES = {
    "eq_always_true": "class Any:\n    def __eq__(self, other): return True\ndef f(x): return Any()",
    "int_subclass_eq": "class Liar(int):\n    def __eq__(self, other): return True\ndef f(x): return Liar(0)",
    "exit_0_early": "import os\nos._exit(0)",
    "exit_0_in_call": "import sys\ndef f(x): sys.exit(0)",
    "excepthook": "import sys\nsys.excepthook = lambda *a: None\ndef f(x): raise AssertionError",
    "patch_compile_and_asserts": (
        "import builtins\nbuiltins.compile = lambda *a, **k: None\n"
        "builtins.AssertionError = type('Nope', (Exception,), {})\ndef f(x): return 0"
    ),
    "steal_from_frames": (
        "import sys\ndef f(x):\n    frame, seen = sys._getframe(1), []\n    while frame:\n"
        "        seen += [v for v in frame.f_locals.values() if type(v) is int and v != x]\n"
        "        frame = frame.f_back\n    return seen[0] if seen else -1"
    ),
    "rewrite_test_files": (
        "import os\nfor d in ('.', '/tmp'):\n    for n in os.listdir(d) + ['test.py']:\n"
        "        try: open(os.path.join(d, n), 'w').write('pass')\n        except OSError: pass\n"
        "def f(x): return 0"
    ),
    "read_files_for_answers": (
        "import os, re\ndef f(x):\n    found = []\n"
        "    for d in ('.', '/tmp', '/proc/self/fd'):\n        for n in os.listdir(d):\n"
        "            try: found += re.findall(rb'\\d+', open(os.path.join(d, n), 'rb').read())\n"
        "            except OSError: pass\n"
        "    found += re.findall(rb'\\d+', open('/proc/self/cmdline', 'rb').read())\n"
        "    return max((int(v) for v in found if int(v) != x), default=-1)"
    ),
    "forge_result_channel": (
        'import os, sys\nfor fd in range(3, 64):\n    try: os.write(fd, b\'[["ok", ["bool", true]]]\')\n'
        "    except OSError: pass\nos._exit(0)"
    ),
    "print_fake_pass": 'print(\'PASS\\n[["ok", ["int", "42"]]]\')\ndef f(x): return None',
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_wrong_solution_cannot_forge_a_pass(name):
    assert run_code_test("def f(x):\n    return 2 * x", DOUBLE, FAST) == (True, "")
    passed, why = run_code_test(FORGERIES[name], DOUBLE, FAST)
    assert not passed and why


def test_expected_values_never_enter_the_sandbox(monkeypatch):
    """The job the sandbox reads holds the code and the call, never the expected value."""
    jobs, real = [], code_tests.run_sandboxed
    monkeypatch.setattr(code_tests, "run_sandboxed", lambda s, job, *a: jobs.append(job) or real(s, job, *a))
    run_code_test("def f(x): return x", parse_test("assert f(1234567) == 7654321"), FAST)
    run_code_test("print(1)", parse_test({"stdin": "", "stdout": "7654321"}), FAST)
    assert "1234567" in json.dumps(jobs[0]) and not any("7654321" in json.dumps(j) for j in jobs)


def test_strict_equality_and_test_forms():
    code = "def f(x):\n    return x\ndef g():\n    return (1, [2.0, True], {'a': None})"
    assert run_code_test(code, parse_test("assert g() == (1, [2.0, True], {'a': None})"), FAST)[0]
    assert not run_code_test(code, parse_test("assert g() == [1, [2.0, True], {'a': None}]"), FAST)[0]
    assert not run_code_test(code, parse_test("assert f(True) == 1"), FAST)[0]  # a bool is not a number
    assert run_code_test(code, parse_test("assert f(1) == 1\nassert f('a') == 'a'"), FAST)[0]
    near = {"call": "f", "args": [0.30000000000000004], "expected": 0.3}
    assert not run_code_test(code, parse_test(near), FAST)[0]
    assert run_code_test(code, parse_test({**near, "tolerance": 1e-9}), FAST)[0]
    program = "import sys\nprint(sum(map(int, sys.stdin.buffer.read().split())))"
    assert run_code_test(program, parse_test({"stdin": "1 2\n3\n", "stdout": "6  \n\n"}), FAST) == (True, "")
    wrong = run_code_test(program, parse_test({"stdin": "1 2", "stdout": "4"}), FAST)
    assert wrong == (False, "wrong output")
    crash = "print(6)\nraise SystemExit(3)"
    assert run_code_test(crash, parse_test({"stdout": "6"}), FAST) == (False, "exit code 3")


@pytest.mark.parametrize(
    "snippet",
    ["assert math.isclose(f(1), 0.5)", "assert not f(1)", "assert f(x) == 1", "assert f(1) < 2", "x = 1"],
)
def test_asserts_decided_inside_are_refused(snippet):
    with pytest.raises(ValueError, match=r"row 0: tests\[0\]: .*code tests are `assert name"):
        build_reward(RewardConfig(code_tests=True), [{"prompt": "p", "tests": [snippet]}])


def test_a_test_text_that_is_no_utf8_is_refused_naming_the_test():
    """A lone surrogate in a test's stdin was accepted, then failed every completion of its row at scoring
    with a UnicodeEncodeError naming no test (and the rows were dropped)."""
    tests = [{"stdin": "1\n", "stdout": "1\n"}, {"stdin": "\ud800", "stdout": "x"}]
    with pytest.raises(
        ValueError, match=r"row 0: tests\[1\]: stdin/stdout test .*'stdin' is no UTF-8 text \(\\ud800\)"
    ):
        build_reward(RewardConfig(code_tests=True), [{"prompt": "p", "tests": tests}])


# ------------------------------------------------------------------------------------ containment


def test_unprivileged_namespaces_clean_environment(monkeypatch):
    monkeypatch.setenv("COPG_TEST_SECRET", "s3cr3t-8817")
    code = (
        "import json, os\nstatus = open('/proc/self/status').read()\n"
        "environs = [open(f'/proc/{p}/environ', 'rb').read().decode(errors='replace')\n"
        "            for p in os.listdir('/proc') if p.isdigit()]\n"
        "ns = {n: os.readlink(f'/proc/self/ns/{n}') for n in ('user', 'pid', 'mnt', 'net', 'ipc')}\n"
        "print(json.dumps({'uid': os.getuid(), 'cap': status.split('CapEff:')[1].split()[0], 'ns': ns,\n"
        "                  'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),\n"
        "                  'env': environs + [repr(dict(os.environ))], 'root': sorted(os.listdir('/'))}))"
    )
    seen = _inside(code)
    assert seen["uid"] == 65534 and int(seen["cap"], 16) == 0
    assert all(os.readlink(f"/proc/self/ns/{n}") != link for n, link in seen["ns"].items())
    assert seen["pids"] == [1, 2]  # the runner (pid 1, reaping) and the test itself: nothing of the host
    assert not any("s3cr3t" in env for env in seen["env"])
    assert not {"home", "root", "etc", "work"} & set(seen["root"])  # no data, run folders or config


def test_files_outside_tmp_are_read_only_and_tmp_is_capped():
    code = (
        "import json\nwritten = 0\nfor i in range(90):\n    try:\n"
        "        with open(f'/tmp/f{i}', 'wb') as fh: fh.write(b'x' * (1 << 20))\n"
        "        written += 1\n    except OSError:\n        break\nescapes = []\n"
        "for path in ('/usr/evil', '/evil', '/proc/evil', '/dev/evil', '/dev/shm/evil',\n"
        "             '" + sys.executable + "'):\n"
        "    try:\n        open(path, 'a').close(); escapes.append(path)\n    except OSError:\n        pass\n"
        "print(json.dumps([written, escapes]))"
    )
    written, escapes = _inside(code)
    assert written <= FAST.tmp_mb and escapes == []  # 90 MiB asked, 8 MiB of /tmp


def test_processes_and_total_memory_are_capped():
    """Four forks of 300 MiB each (the issue's 4 x 800 MB): only processes-1 children ever exist."""
    code = (
        "import json, os\nkids = []\nfor _ in range(4):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        block = bytearray(300 << 20)\n"
        "        import time; time.sleep(0.3); os._exit(0)\n    kids.append(pid)\n"
        "print(json.dumps(sum(os.waitpid(p, 0)[1] == 0 for p in kids)))"
    )
    assert _inside(code, SandboxLimits(timeout_s=10.0, memory_mb=512, processes=2)) == 1
    assert _inside(code, SandboxLimits(timeout_s=10.0, memory_mb=512, processes=3)) == 2


def test_no_process_outlives_its_test():
    marker = "987.125"
    daemon = (
        "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\n"
    )
    assert run_code_test(daemon + "def f(x):\n    return 2 * x", DOUBLE, FAST) == (True, "")
    hang = daemon + "import time\ntime.sleep(60)"
    assert run_program(hang, b"", SandboxLimits(timeout_s=1.0)).timed_out
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout
    assert left == ""


def test_no_network_no_host_sockets_no_setns(tmp_path):
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "scorer.sock"))
    unix.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0copg-test-{os.getpid()}")
    abstract.listen()
    targets = [
        ("AF_INET", ["127.0.0.1", tcp.getsockname()[1]]),
        ("AF_INET", ["1.1.1.1", 53]),
        ("AF_UNIX", str(tmp_path / "scorer.sock")),
        ("AF_UNIX", f"\0copg-test-{os.getpid()}"),
    ]
    code = (
        "import ctypes, json, os, socket\nreached = []\n"
        f"for family, address in {targets!r}:\n"
        "    try:\n        s = socket.socket(getattr(socket, family))\n        s.settimeout(1)\n"
        "        s.connect(tuple(address) if family == 'AF_INET' else address)\n"
        "        reached.append(address)\n    except OSError:\n        pass\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "joined = [libc.setns(os.open(f'/proc/{p}/ns/net', os.O_RDONLY), 0) for p in (1, 'self')]\n"
        "print(json.dumps([reached, joined]))"
    )
    try:
        assert _inside(code) == [[], [-1, -1]]
    finally:
        for s in (tcp, unix, abstract):
            s.close()


def test_signals_cannot_reach_the_scorer_or_a_sibling_test():
    """A saboteur SIGSTOPs and SIGKILLs every pid it can name while a correct sibling runs beside it."""
    saboteur = (
        "import os, signal\nfor pid in range(1, 1 << 15):\n    for sig in (signal.SIGSTOP, signal.SIGKILL):\n"
        "        try:\n            os.kill(pid, sig) if pid != os.getpid() else None\n"
        "        except OSError:\n            pass\nos.kill(-1, signal.SIGKILL)\ndef f(x):\n    return 0"
    )
    correct = "import time\ndef f(x):\n    time.sleep(1.0)\n    return 2 * x"
    reward = CodeTestReward({"p": ["assert f(21) == 42"]}, FAST, workers=2)
    assert reward(["p", "p"], [saboteur, correct]) == [0.0, 1.0]  # and this process is still here


def test_a_sandbox_that_fails_to_start_is_the_rows_error_not_a_failed_test():
    """bwrap failing to set a sandbox up (here a bind source that is gone; on a busy host a process or
    namespace limit) ran no code: the row gets an error, not the 0.0 of a failed test (a correct completion
    got 0.0). A completion that exits at once did run, and still fails."""
    reward = CodeTestReward({"p": ["assert f(21) == 42"]}, FAST)
    good, quitter = "def f(x):\n    return 2 * x", "import os\nos._exit(1)"
    assert score_rows(reward, ["p", "p"], [good, quitter]).scores.tolist() == [1.0, 0.0]
    argv = list(reward.sandbox.argv)
    at = argv.index("--ro-bind")
    argv[at:at] = ["--ro-bind", "/nonexistent-host-path", "/gone"]
    reward.sandbox = dataclasses.replace(reward.sandbox, argv=tuple(argv))
    result = score_rows(reward, ["p"], [good])
    assert np.isnan(result.scores).all() and "SandboxFailed: the sandbox did not start" in result.errors[0]
    assert "/nonexistent-host-path" in result.errors[0]  # bwrap's own words


def test_the_sandboxes_pid_1_is_the_limited_runner_not_an_init_outside_the_limits():
    """bwrap's own init was the sandbox's pid 1, of the test's uid and writable through /proc/1/mem, without
    its limits: a completion rewrote it and ran code past them (1.5 GiB and 40 processes under a 512 MiB, 4
    process limit). The runner is pid 1 now (bwrap --as-pid-1), its limits set before it starts the test
    in a child, and it reaps what is orphaned to it: double forks, whose zombies would count against the
    process limit, run again and again. A CPU-bound test still ends as over its CPU limit."""
    code = (
        "import json\nlimits = open('/proc/1/limits').read().splitlines()\n"
        "cmdline = open('/proc/1/cmdline', 'rb').read().split(b'\\0')\n"
        "print(json.dumps({'limits': [l for l in limits if 'address space' in l or 'processes' in l],\n"
        "                  'runner': b'-c' in cmdline}))"
    )
    seen = _inside(code)
    assert seen["runner"], seen
    assert [line.split()[-3:-1] for line in seen["limits"]] == [["5", "5"], [str(512 << 20)] * 2], seen
    double_forks = (
        "import os, time\nfor _ in range(6):\n    if os.fork() == 0:\n        if os.fork() == 0:\n"
        "            os._exit(0)\n        os._exit(0)\n    os.wait()\n    time.sleep(0.05)\n"
        "print('[6]')"
    )
    assert _inside(double_forks) == [6]  # with processes=4: the orphans' zombies are reaped
    ok, why = run_code_test("while True:\n    pass", DOUBLE, SandboxLimits(timeout_s=20.0, cpu_seconds=1))
    assert not ok and why == "killed by SIGXCPU (CPU limit)"


def test_a_forged_result_of_colliding_hashes_is_refused_at_once():
    """A completion can write its own result (the result channel is its process's); a set of n ints equal
    modulo 2^61 - 1 hashes alike, and decoding one of 40k held a scoring batch 16 s (about an hour at the
    16 MiB result limit). Such a result is malformed now, read in linear time."""
    import time

    forged = (
        "import json, os, sys\nM = 2 ** 61 - 1\n"
        "value = ['set', [['int', str(k * M)] for k in range(200_000)]]\n"
        "os.write(int(sys.argv[2]), json.dumps([['ok', value]]).encode())\nos._exit(0)"
    )
    test = parse_test({"call": "f", "args": [], "expected": [1]})
    start = time.monotonic()
    assert run_code_test(forged, test, FAST) == (False, "malformed result")
    assert time.monotonic() - start < 10.0
    equal_hashes = {-1, -2, 2**61 - 1, 0}  # honest members that share hashes: -1 and -2, 0 and 2^61 - 1
    assert code_tests.decode_value(code_tests.encode_value(equal_hashes)) == equal_hashes


def test_a_failed_sandbox_start_fails_its_row_alone_and_all_or_nothing_stops_at_a_first_failure(monkeypatch):
    """A sandbox that failed to start (a host's process limit) raised for the whole batch, which was then
    scored again one row at a time (19.5 s instead of 3 s for 41 rows): now its row alone fails, naming why,
    and its other tests are not run. With all_or_nothing, a completion's tests after its first failure are
    not run (a sleeper cost one timeout per test)."""
    ran = []

    def fake(code, test, limits, sandbox):
        ran.append(code)
        if code == "unlucky":
            raise code_tests.SandboxFailed("the sandbox did not start (exit status 1: Resource busy)")
        return code == "good", ""

    monkeypatch.setattr(code_tests, "run_code_test", fake)
    tests = {"p": ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 6"]}
    reward = CodeTestReward(tests, FAST, workers=1)
    result = score_rows(reward, ["p"] * 3, ["good", "unlucky", "bad"])
    assert result.scores[0] == 1.0 and result.scores[2] == 0.0 and np.isnan(result.scores[1])
    assert result.errors[1].startswith("SandboxFailed: the sandbox did not start (exit status 1: Resource")
    assert ran == ["good"] * 3 + ["unlucky"] + ["bad"] * 3  # once per test, no batch scored again
    ran.clear()
    strict = CodeTestReward(tests, FAST, workers=1, all_or_nothing=True)
    assert strict(["p", "p"], ["bad", "good"]) == [0.0, 1.0] and ran == ["bad"] + ["good"] * 3


def test_limits_timeout_cpu_memory():
    ok, why = run_code_test("import time\ntime.sleep(30)", DOUBLE, SandboxLimits(timeout_s=1.0))
    assert not ok and why.startswith("timeout")
    ok, why = run_code_test("while True:\n    pass", DOUBLE, SandboxLimits(timeout_s=20.0, cpu_seconds=1))
    assert not ok and "CPU limit" in why
    ok, why = run_code_test("x = bytearray(1 << 31)", DOUBLE, FAST)  # 2 GiB > 512 MiB address space
    assert not ok and "MemoryError" in why


def test_missing_sandbox_is_one_clear_line_unless_opted_out(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    make_sandbox.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"^code tests need bubblewrap.*sandbox=none[^\n]*$"):
            build_reward(RewardConfig(code_tests=True), [{"prompt": "p", "tests": ["assert f(1) == 2"]}])
        reward = build_reward(
            RewardConfig(code_tests=True, sandbox="none", timeout_s=5.0),
            [{"prompt": "p", "tests": ["assert f(1) == 2"]}],
        )
        assert reward(["p", "p"], ["def f(x): return 2 * x", FORGERIES["eq_always_true"]]) == [1.0, 0.0]
    finally:
        make_sandbox.cache_clear()


# ---------------------------------------------------------------------------------------- syscall filter

# Independent of code_tests' own table: (add_key, request_key, keyctl) of each architecture.
KEY_SYSCALLS = {"x86_64": (248, 249, 250), "aarch64": (217, 218, 219)}
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_REVOKE, KEYCTL_DESCRIBE, KEYCTL_READ = 1, 3, 6, 11
KEY_SPEC_SESSION_KEYRING = -3
EPERM_RESULT, ALLOW, KILL_PROCESS = 0x00050000 | errno.EPERM, 0x7FFF0000, 0x80000000
X86_64, AARCH64, I386 = 0xC000003E, 0xC00000B7, 0x40000003
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
SYSCALL_HELPER = (  # errno_of(nr, *args) in the sandbox: 0, or the errno of a failed system call
    "import ctypes, json, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.syscall.restype = ctypes.c_long\n"
    "def errno_of(*args):\n"
    "    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]\n"
    "    return ctypes.get_errno() if libc.syscall(*args) < 0 else 0\n"
)


def _syscall(*args) -> int:
    """libc's syscall(), integers passed as C longs (varargs would pass a Python int as a C int)."""
    return LIBC.syscall(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def test_the_scorers_keyrings_are_out_of_reach():
    """The sandbox inherits the scorer's session keyring: a completion can neither read, describe, find nor
    revoke the scorer's key there, nor plant one, nor see it in /proc/keys; the key survives intact."""
    add_key, request_key, keyctl = KEY_SYSCALLS[os.uname().machine]
    secret = b"copg-scorer-secret-5150"
    seen = {}

    def scorer():  # in its own thread: a thread's session keyring is its own, the test process keeps its own
        if _syscall(keyctl, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
            return
        key = _syscall(add_key, b"user", b"copg:secret", secret, len(secret), KEY_SPEC_SESSION_KEYRING)
        if key < 0:
            return
        code = SYSCALL_HELPER + (
            "buf = ctypes.create_string_buffer(4096)\n"
            f"tries = [({keyctl}, {KEYCTL_READ}, {KEY_SPEC_SESSION_KEYRING}, buf, 4096),\n"
            f"         ({keyctl}, {KEYCTL_READ}, {key}, buf, 4096),\n"
            f"         ({keyctl}, {KEYCTL_DESCRIBE}, {KEY_SPEC_SESSION_KEYRING}, buf, 4096),\n"
            f"         ({request_key}, b'user', b'copg:secret', None, 0),\n"
            f"         ({add_key}, b'user', b'copg:planted', b'x', 1, {KEY_SPEC_SESSION_KEYRING}),\n"
            f"         ({keyctl}, {KEYCTL_REVOKE}, {key})]\n"
            "results = [errno_of(*t) for t in tries]\n"
            "print(buf.raw.rstrip(b'\\0').decode(errors='replace'))\n"
            "print(json.dumps([results, open('/proc/keys').read()]))"
        )
        seen["outcome"] = run_program(code, b"", FAST)
        buf = ctypes.create_string_buffer(64)
        size = _syscall(keyctl, KEYCTL_READ, key, buf, 64)
        seen["after"] = buf.raw[:size]
        _syscall(keyctl, KEYCTL_REVOKE, key)

    thread = threading.Thread(target=scorer)
    thread.start()
    thread.join()
    if "outcome" not in seen:
        pytest.skip("kernel keyrings are not available to this process (a container's seccomp profile?)")
    out = seen["outcome"]
    assert out.returncode == 0, out.stderr.decode()[-500:]
    results, proc_keys = json.loads(out.stdout.decode().splitlines()[-1])
    assert results == [errno.EPERM] * 6
    assert secret not in out.stdout and "copg:" not in proc_keys
    assert seen["after"] == secret


def test_every_filtered_syscall_fails_with_eperm():
    """Each call of code_tests' deny list, and each refused argument of its argument rules, fails with
    EPERM inside the sandbox; the allowed arguments of the same calls still work."""
    column = {"x86_64": 0, "aarch64": 1}[os.uname().machine]
    denied = {n: nr[column] for n, nr in code_tests.DENIED_SYSCALLS.items() if nr[column] is not None}
    rules = code_tests.ARGUMENT_RULES
    code = SYSCALL_HELPER + (
        "import fcntl, socket\n"
        f"out = {{name: errno_of(nr, 0, 0, 0, 0, 0, 0) for name, nr in {denied!r}.items()}}\n"
        "for family in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_UNIX):\n"
        f"    out[f'socket {{family}}'] = errno_of({rules['socket'][0][column]}, family, 1, 0)\n"
        "r, w = os.pipe()\nout['F_SETPIPE_SZ'] = errno_of("
        f"{rules['fcntl'][0][column]}, w, fcntl.F_SETPIPE_SZ, 1 << 20)\n"
        "out['F_GETPIPE_SZ'] = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)\n"
        "a, b = socket.socketpair()\n"
        "for name in ('SO_SNDBUF', 'SO_RCVBUF', 'SO_KEEPALIVE'):\n"
        "    try:\n        a.setsockopt(socket.SOL_SOCKET, getattr(socket, name), 1 << 22)\n"
        "        out[name] = 0\n    except OSError as e:\n        out[name] = e.errno\n"
        "print(json.dumps(out))"
    )
    seen = _inside(code)
    assert {name: seen[name] for name in denied} == dict.fromkeys(denied, errno.EPERM)
    refused = (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK)
    assert [seen[f"socket {family}"] for family in refused] == [errno.EPERM] * 3
    assert seen[f"socket {socket.AF_UNIX}"] == 0  # returned a descriptor: Unix sockets stay
    assert (seen["F_SETPIPE_SZ"], seen["F_GETPIPE_SZ"]) == (errno.EPERM, 65536)
    assert (seen["SO_SNDBUF"], seen["SO_RCVBUF"], seen["SO_KEEPALIVE"]) == (errno.EPERM, errno.EPERM, 0)


def test_memory_that_no_limit_counts_cannot_be_held():
    """The audit's 1 GiB of memfd under memory_mb=300 is refused at the first memfd; POSIX shared memory
    (/dev/shm read-only) too; pipes and sockets cannot grow their buffers, and a process opens <= 64 files."""
    code = (
        "import json, os\nfrom multiprocessing import shared_memory\nout = {}\n"
        "try:\n    fd = os.memfd_create('m')\n    os.write(fd, b'x' * (64 << 20))\n"
        "    out['memfd'] = 'held'\n"
        "except OSError as e:\n    out['memfd'] = e.errno\n"
        "try:\n    shared_memory.SharedMemory(create=True, size=64 << 20).buf[:] = b'x' * (64 << 20)\n"
        "    out['shm'] = 'held'\nexcept OSError as e:\n    out['shm'] = e.errno\n"
        "fds = []\ntry:\n    while len(fds) < 1000:\n        fds += os.pipe()\nexcept OSError:\n    pass\n"
        "out['open'] = len(fds)\nprint(json.dumps(out))"
    )
    seen = _inside(code, SandboxLimits(timeout_s=10.0, memory_mb=300, processes=1, tmp_mb=8))
    assert seen["memfd"] == errno.EPERM and seen["shm"] in (errno.EROFS, errno.EACCES)
    assert seen["open"] <= 64


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="i386 system calls from x86_64 code")
def test_a_system_call_of_another_architecture_kills_the_process():
    """`int 0x80` (the i386 ABI, with its own numbering the filter does not list) kills the process."""
    code = (
        "import ctypes, mmap\n"
        "page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "page.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20 (getpid); int 0x80; ret\n"
        "getpid = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))\n"
        "print(getpid())"
    )
    outcome = run_program(code, b"", FAST)
    assert outcome.returncode == 128 + signal.SIGSYS and outcome.stdout == b""


def _decide(program: bytes, arch: int, nr: int, *args: int) -> int:
    """What the classic-BPF seccomp `program` returns for one system call (the instructions it uses only)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    code = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    pc = acc = 0
    while True:
        op, jt, jf, k = code[pc]
        if op == 0x06:  # BPF_RET|K
            return k
        if op == 0x20:  # BPF_LD|W|ABS
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        else:
            assert op in (0x15, 0x35), f"unexpected instruction {op:#x}"  # JEQ, JGE
            pc += 1 + (jt if (acc == k if op == 0x15 else acc >= k) else jf)


@pytest.mark.parametrize(("arch", "column"), [(X86_64, 0), (AARCH64, 1)])
def test_the_filter_program_decides_per_architecture(arch, column):
    """The assembled program, run by a BPF interpreter: both architectures' numbers, without a kernel."""
    program = code_tests.seccomp_filter()
    assert len(program) % 8 == 0 and len(program) // 8 <= 4096
    for name, numbers in code_tests.DENIED_SYSCALLS.items():
        if numbers[column] is not None:
            assert _decide(program, arch, numbers[column]) == EPERM_RESULT, name
    read, getpid, socket_nr, fcntl_nr, setsockopt = [(0, 39, 41, 72, 54), (63, 172, 198, 25, 208)][column]
    assert _decide(program, arch, read) == _decide(program, arch, getpid) == ALLOW
    assert _decide(program, arch, socket_nr, socket.AF_UNIX) == ALLOW
    assert _decide(program, arch, socket_nr, socket.AF_INET) == EPERM_RESULT
    assert _decide(program, arch, fcntl_nr, 3, 1031) == EPERM_RESULT  # F_SETPIPE_SZ
    assert _decide(program, arch, fcntl_nr, 3, 3) == ALLOW  # F_GETFL
    assert _decide(program, arch, setsockopt, 3, 1, 7) == EPERM_RESULT  # SOL_SOCKET, SO_SNDBUF
    assert _decide(program, arch, setsockopt, 3, 1, 9) == ALLOW  # SO_KEEPALIVE
    assert _decide(program, I386, 20) == KILL_PROCESS
    if arch == X86_64:
        assert _decide(program, arch, 0x40000000 + 250) == EPERM_RESULT  # keyctl of the x32 ABI


def _header_numbers(path: str) -> dict[str, int]:
    text = open(path).read()
    return {name: int(nr) for name, nr in re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b", text)}


@pytest.mark.parametrize(
    ("column", "header"),
    [(0, "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"), (1, "/usr/include/asm-generic/unistd.h")],
)
def test_syscall_numbers_match_the_kernel_headers(column, header):
    if not os.path.exists(header):
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    known = _header_numbers(header)
    tables = {**code_tests.DENIED_SYSCALLS, **{n: rule[0] for n, rule in code_tests.ARGUMENT_RULES.items()}}
    ours = {name: numbers[column] for name, numbers in tables.items() if numbers[column] is not None}
    assert ours == {name: known.get(name) for name in ours}
    assert all(name not in known for name, numbers in tables.items() if numbers[column] is None)


def test_a_machine_without_a_filter_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "6", "#1", "riscv64")))
    make_sandbox.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"^code-test sandbox: its syscall filter .*riscv64"):
            make_sandbox("bwrap")
    finally:
        make_sandbox.cache_clear()


# ------------------------------------------------------------------------- the red team's second round


def test_the_working_folder_and_source_folders_under_usr_are_hidden():
    """/usr is mounted for the interpreter; a container's WORKDIR under it (/usr/src/app: the data with its
    tests, the run) was readable by the completions, which printed the expected outputs. The working folder
    and /usr/src, /usr/local/src are covered by an empty read-only tmpfs there; what the interpreter needs,
    and folders outside the mounted trees, are not."""
    tops = ["/usr", "/lib"]
    hidden = code_tests._hidden_dirs
    sources = [d for d in code_tests.SOURCE_DIRS if os.path.isdir(d)]
    assert hidden("/usr/bin/python3", "/usr", tops, "/usr/share") == [*sources, "/usr/share"]
    for needed in ("/usr", "/usr/bin", "/usr/lib", "/usr/lib/python3", "/", "/tmp"):
        assert needed not in hidden("/usr/bin/python3", "/usr", tops, needed), needed
    pyenv = "/opt/py/versions/3.11"
    assert pyenv not in hidden(f"{pyenv}/bin/python3", pyenv, [*tops, pyenv], pyenv)
    # a working folder inside a source folder: the source folder alone is covered (bwrap could not make
    # the inner one's mount point in the read-only tmpfs over the outer)
    inner = [f"{d}/{n}" for d in sources for n in sorted(os.listdir(d)) if os.path.isdir(f"{d}/{n}")][:1]
    for cwd in inner:
        assert hidden("/usr/bin/python3", "/usr", tops, cwd) == sources
        argv = code_tests._bwrap_argv("bwrap", *code_tests._interpreter(os.geteuid() == 0), FAST.tmp_mb, cwd)
        sandbox = code_tests.Sandbox(
            "bwrap", tuple(argv), code_tests.SANDBOX_UID if os.geteuid() == 0 else None
        )
        assert run_program("print(1)", b"", FAST, sandbox).stdout == b"1\n"
    # a real sandbox made from /usr/share: it sees an empty, read-only folder there, and still runs
    python, prefix = code_tests._interpreter(os.geteuid() == 0)
    argv = code_tests._bwrap_argv("bwrap", python, prefix, FAST.tmp_mb, cwd="/usr/share")
    sandbox = code_tests.Sandbox("bwrap", tuple(argv), code_tests.SANDBOX_UID if os.geteuid() == 0 else None)
    code = (
        "import json, os\nseen = os.listdir('/usr/share')\ntry:\n    open('/usr/share/x', 'w').close()\n"
        "    wrote = True\nexcept OSError:\n    wrote = False\nprint(json.dumps([seen, wrote]))"
    )
    out = run_program(code, b"", FAST, sandbox)
    assert out.returncode == 0, out.stderr.decode()[-500:]
    assert json.loads(out.stdout.decode().splitlines()[-1]) == [[], False]
    assert os.listdir("/usr/share")  # the host's is not empty


def test_a_huge_int_for_a_float_test_fails_that_test_only():
    """math.isclose(10**400, 42.0) raised OverflowError out of the verdict: the whole batch failed, was
    rescored row by row, and the wrong completion was dropped as a row error instead of scoring 0."""
    test = parse_test({"call": "f", "args": [1], "expected": 42.0, "tolerance": 1e-6})
    assert run_code_test("def f(x):\n    return 10 ** 400", test, FAST) == (
        False,
        "f(...) returned a wrong value",
    )
    assert not code_tests.same_value(10**400, 42.0, 1e-6)
    assert code_tests.same_value(41.99999999, 42, 1e-6)


def test_exited_sandboxes_are_reaped_by_a_scorer_that_is_pid_1():
    """bwrap can exit before its sandbox's init, which the kernel then hands to the nearest subreaper: a
    trainer that is its container's pid 1 (no --init) kept a zombie per test until the pids ran out. A
    subreaper (standing in for pid 1) is left none."""
    script = (
        "import ctypes, json, os, sys\n"
        "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER\n"
        "from copg_jax.rewards.code_tests import SandboxLimits, parse_test, run_code_test\n"
        "limits = SandboxLimits(timeout_s=10.0, cpu_seconds=3, memory_mb=512, processes=4, tmp_mb=8)\n"
        "test = parse_test('assert f(21) == 42')\n"
        "passed = [run_code_test('def f(x):\\n    return 2 * x', test, limits)[0] for _ in range(5)]\n"
        "timed_out = run_code_test('import time\\ntime.sleep(60)', test, SandboxLimits(timeout_s=1.0))\n"
        "me, zombies = os.getpid(), 0\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n        stat = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()\n"
        "    except OSError:\n        continue\n"
        "    zombies += stat[0] == 'Z' and int(stat[1]) == me\n"
        "print(json.dumps([passed, timed_out[0], zombies]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == [[True] * 5, False, 0]


def test_a_fence_followed_by_blanks_is_read_in_linear_time():
    import time

    start = time.process_time()
    assert code_tests.extract_code("```" + " " * 200_000) == "```" + " " * 200_000
    assert time.process_time() - start < 1.0  # quadratic backtracking took ~40 s
    assert code_tests.extract_code("x\n```Python3 \t\nprint(1)\n```") == "print(1)\n"
