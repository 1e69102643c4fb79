"""One writer per run folder: a live holder refuses a second run, a dead one's lock is taken over."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from copg_jax import runlock
from copg_jax.runlock import RunFolderLocked, lock_run_folder, released_on_error

REPO = Path(__file__).resolve().parents[1]
HOLDER = (
    "import sys, time\nfrom copg_jax.runlock import lock_run_folder\n"
    "lock_run_folder(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)"
)


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that takes `folder`'s lock and keeps it (until killed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"held\n"
    return proc


def test_a_live_holder_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    holder = hold_in_another_process(tmp_path / "run")
    try:
        with pytest.raises(RunFolderLocked, match=rf"in use by pid {holder.pid} on host .* since [^\n]*$"):
            lock_run_folder(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="copg_jax.runlock"):
        lock = lock_run_folder(tmp_path / "run")
    assert any(f"pid {holder.pid}" in r.message and "gone" in r.message for r in caplog.records)
    record = json.loads((tmp_path / "run" / "run.lock").read_text())
    assert record["pid"] == os.getpid() and record["host"] and record["started"]
    lock.release()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_another_hosts_lock_is_honoured_until_its_heartbeat_is_stale(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunFolderLocked, match="may be in use by pid 1 on host 'elsewhere-7'"):
        lock_run_folder(tmp_path)
    old = time.time() - runlock.STALE_AFTER_S - 1
    os.utime(path, (old, old))
    lock_run_folder(tmp_path).release()


def test_one_holder_per_process_and_released_when_setup_fails(tmp_path):
    lock = lock_run_folder(tmp_path)
    with pytest.raises(RunFolderLocked, match="already in use by this process"):
        lock_run_folder(tmp_path)
    lock.release()

    @released_on_error
    def failing_setup(folder):
        lock_run_folder(folder)
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        failing_setup(tmp_path)
    lock_run_folder(tmp_path).release()  # free again


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = lock_run_folder(tmp_path)
    try:
        os.utime(lock.path, (0, 0))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 5  # another host would not take it over
    finally:
        lock.release()
