"""Test setup: 8 virtual CPU devices, set before jax is imported; one XLA compilation cache per session."""

import os
import shutil
import tempfile

# LLVM at -O0: the optimised HLO (fusion, layouts, buffer assignment: what tests check of compiled programs)
# is the same, only the machine code is less optimised, which the tests' tiny models do not notice; compiling
# is what takes their time, and -O0 about halves it. The subprocess tests keep the flag.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Many tests compile the same tiny-model programs (a run's train, eval and reference steps; the same model
# forward in several files), each time from a fresh jit. JAX's persistent compilation cache, in a folder of
# this session only (subprocesses inherit it: the CLI and multi-process tests share it), turns the repeats
# into a read; a cached executable is the program XLA compiled, so results are unchanged.
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="copg-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)
