"""Reward for code: run a completion's code against test snippets in a limited subprocess; reward = pass rate.

Each test runs in its own fresh interpreter (`python -I`), so one hanging or crashing test fails only itself:
the completion's code is executed, then the test snippet (e.g. `assert f(2) == 4`) in the same namespace. A
test passes iff the process exits 0 *and* prints a per-run random token after the test, so code that calls
`os._exit(0)` or `sys.exit(0)` early does not pass.

Isolation (honest list of what it does and does not do):
* limits set by the runner before any candidate code runs, hard and soft, so the code cannot raise them:
  address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), file size (RLIMIT_FSIZE), no core files; plus a
  wall-clock timeout that kills the whole process group. (The limits are set inside the child rather than in
  `preexec_fn`, which is unsafe with the worker threads used here.)
* a fresh temporary working directory per test, deleted afterwards; stdin closed; a minimal environment with
  no proxy variables, no PYTHON* variables and isolated mode (no user site-packages).
* no network: the process runs under `unshare -n` (a new, empty network namespace) when that works on this
  machine (as root, or with unprivileged user namespaces via `unshare -rn`). When neither works, the child
  still runs without proxies but CAN reach the network; `network_isolation()` reports which case holds and a
  warning is logged once.
* NOT a security boundary against adversarial code: the code runs as the same user, can read files the user
  can read and could find the pass token in its own process. Use a container/VM for untrusted models.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

_RUNNER = r"""
import resource, sys
def _limit(kind, soft, hard=None):
    resource.setrlimit(kind, (soft, soft if hard is None else hard))
_limit(resource.RLIMIT_AS, {memory_bytes})
_limit(resource.RLIMIT_CPU, {cpu_seconds}, {cpu_seconds} + 1)  # SIGXCPU first, SIGKILL a second later
_limit(resource.RLIMIT_FSIZE, {file_bytes})
_limit(resource.RLIMIT_CORE, 0)
def _run(token):
    namespace = {{"__name__": "__candidate__"}}
    exec(compile(open("candidate.py").read(), "candidate.py", "exec"), namespace)
    exec(compile(open("test.py").read(), "test.py", "exec"), namespace)
    sys.stdout.flush()
    sys.stdout.write("\n" + token + "\n")
    sys.stdout.flush()
_run(sys.stdin.readline().strip())
"""

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-test limits.

    Attributes:
      timeout_s: wall-clock seconds before the test's process group is killed.
      cpu_seconds: RLIMIT_CPU.
      memory_mb: RLIMIT_AS in MiB (address space, so leave room for the interpreter: >= 256).
      file_mb: RLIMIT_FSIZE in MiB (largest file, stdout included, the code may write).
    """

    timeout_s: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 1024
    file_mb: int = 16


@functools.cache
def network_isolation() -> list[str]:
    """The command prefix that runs a process without network (`unshare -n`), or [] when none works here."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return prefix
    log.warning("code-test reward: `unshare -n` is unavailable; tests run WITHOUT network isolation")
    return []


def extract_code(completion: str) -> str:
    """The code in a completion: the fenced ```python blocks joined, or the whole text when there are none."""
    blocks = _FENCE.findall(completion)
    return "\n\n".join(blocks) if blocks else completion


def _child_env() -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/nonexistent",
    }


def run_test(code: str, test: str, limits: SandboxLimits = SandboxLimits()) -> tuple[bool, str]:
    """Runs `code` then `test` in a limited, networkless subprocess.

    Returns:
      (passed, detail): detail is "" on a pass, else a short reason ("timeout", the last stderr line, ...).
    """
    token = secrets.token_hex(16)
    runner = _RUNNER.format(
        memory_bytes=limits.memory_mb << 20, cpu_seconds=limits.cpu_seconds, file_bytes=limits.file_mb << 20
    )
    with tempfile.TemporaryDirectory(prefix="copg-codetest-") as tmp:
        work = Path(tmp)
        (work / "candidate.py").write_text(code)
        (work / "test.py").write_text(test)
        (work / "runner.py").write_text(runner)
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [*network_isolation(), sys.executable, "-I", "-B", "runner.py"],
                cwd=work,
                env=_child_env(),
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group: the timeout kills grandchildren too
            )
            try:
                proc.communicate(input=(token + "\n").encode(), timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if timed_out:
            return False, f"timeout after {limits.timeout_s:g}s"
        stdout = (work / "stdout").read_bytes()[-4096:].decode(errors="replace")
        stderr = (work / "stderr").read_bytes()[-4096:].decode(errors="replace").strip()
    if proc.returncode == 0 and stdout.rstrip().endswith(token):
        return True, ""
    if proc.returncode == 0:
        return False, "exited before the test finished"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return False, f"killed by {name}" + (" (CPU limit)" if name in ("SIGXCPU", "SIGKILL") else "")
    last = stderr.splitlines()[-1] if stderr else f"exit code {proc.returncode}"
    return False, last[:200]


def prompt_key(prompt) -> str:
    """A hashable key of a prompt (a string, or a list of chat messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


class CodeTestReward:
    """Batched reward `fn(prompts, completions)`: the pass rate of each completion on its prompt's tests.

    Args:
      tests_by_prompt: prompt string -> list of test snippets (each a few lines of Python, usually asserts).
      limits: per-test sandbox limits.
      workers: tests run in parallel (threads, each waiting on its own subprocess).
      all_or_nothing: reward 1 only when every test passes, else 0 (instead of the pass fraction).
    """

    def __init__(
        self,
        tests_by_prompt: dict[str, list[str]],
        limits: SandboxLimits = SandboxLimits(),
        workers: int = 2,
        all_or_nothing: bool = False,
    ):
        self.tests_by_prompt = tests_by_prompt
        self.limits = limits
        self.workers = workers
        self.all_or_nothing = all_or_nothing

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        jobs = []
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            tests = self.tests_by_prompt.get(prompt_key(prompt))
            if not tests:
                raise KeyError(f"row {row}: no tests for prompt {prompt_key(prompt)[:60]!r}")
            jobs += [(row, extract_code(completion), t) for t in tests]
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            outcomes = list(pool.map(lambda job: run_test(job[1], job[2], self.limits)[0], jobs))
        passed = [0] * len(prompts)
        total = [0] * len(prompts)
        for (row, _, _), ok in zip(jobs, outcomes, strict=True):
            passed[row] += ok
            total[row] += 1
        if self.all_or_nothing:
            return [float(p == t) for p, t in zip(passed, total, strict=True)]
        return [p / t for p, t in zip(passed, total, strict=True)]
