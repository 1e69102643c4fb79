"""Test setup: 8 virtual CPU devices, set before jax is imported; one XLA compilation cache per session,
shared by its worker processes (pytest-xdist: how many, `pytest_xdist_auto_num_workers`)."""

import os
import shutil
import tempfile

# LLVM at -O0: the optimised HLO (fusion, layouts, buffer assignment: what tests check of compiled programs)
# is the same, only the machine code is less optimised, which the tests' tiny models do not notice; compiling
# is what takes their time, and -O0 about halves it. The subprocess tests keep the flag.
FAST_COMPILE = "--xla_backend_optimization_level=0"
# XLA's own limits on a collective stay (a warning at 20 s, an abort at 40 s, with every thread's stack): the
# two aborts seen in these tests were a deadlock of XLA:CPU, not a slow device (state_checksums' docstring).
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Many tests compile the same tiny-model programs (a run's train, eval and reference steps; the same model
# forward in several files), each time from a fresh jit. JAX's persistent compilation cache, in a folder of
# this session only (subprocesses inherit it: the xdist workers, the CLI and multi-process tests share it),
# turns the repeats into a read; a cached executable is the program XLA compiled, so results are unchanged.
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="copg-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


GIB_PER_WORKER = 6  # a worker peaks at ~3.5 GiB; the multi-process and CLI tests start processes of their own


def _memory_bytes() -> int:
    """Physical memory, or this container's cgroup limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): a worker per core this process may run on, at most one per
    GIB_PER_WORKER of memory and 8 (tests spend most of their time compiling, on one core each); 0, i.e. no
    worker processes, where that is one. PYTEST_XDIST_AUTO_NUM_WORKERS overrides the count."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    workers = min(len(os.sched_getaffinity(0)), _memory_bytes() // (GIB_PER_WORKER * 1024**3), 8)
    return workers if workers > 1 else 0


def pytest_sessionfinish(session, exitstatus):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)
