"""One writer per run folder: a live holder refuses a second run, a dead one's lock is taken over."""

import json
import logging
import os
import subprocess
import sys
import threading
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


# The run takes its lock and forks a child; the child's code runs after the fork handlers (it tells the parent
# through a pipe), then it sleeps ("lingers") or runs the exit handlers and ends ("exit").
FORKER = (
    "import atexit, os, sys, time\nfrom copg_jax.runlock import lock_run_folder\n"
    "lock_run_folder(sys.argv[1])\nready, told = os.pipe()\npid = os.fork()\n"
    "if pid == 0:\n    os.write(told, b'x')\n"
    "    time.sleep(120) if sys.argv[2] == 'lingers' else atexit._run_exitfuncs()\n"
    "    os._exit(0)\n"
    "os.read(ready, 1)\n"
    "if sys.argv[2] == 'exit':\n    os.waitpid(pid, 0)\n"
    "print('held', pid, flush=True)\ntime.sleep(120)"
)


@pytest.mark.parametrize("child", ["lingers", "exit"])
def test_a_forked_child_neither_keeps_nor_removes_the_lock(tmp_path, child):
    """A child forked by the run (multiprocessing, a reward's pool) kept a copy of the flock: with the run
    dead and the child alive, the next run was refused. And a child that exits normally ran the inherited
    exit handler, removing the live run's lock file: a second run was let in. (The child runs the exit
    handlers, then `os._exit`: past them, a child forked from a process with a JAX backend hangs in JAX's
    native teardown.)"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKER, str(tmp_path / "run"), child], stdout=subprocess.PIPE, env=env
    )
    word, child_pid = proc.stdout.readline().split()
    assert word == b"held"
    try:
        if child == "exit":  # the run lives on: its lock file is there and refuses a second run
            assert (tmp_path / "run" / "run.lock").exists()
            with pytest.raises(RunFolderLocked, match=f"in use by pid {proc.pid} "):
                lock_run_folder(tmp_path / "run")
        else:  # the run dies, its child lives on: the lock is taken over
            proc.kill()
            proc.wait()
            lock_run_folder(tmp_path / "run").release()
    finally:
        proc.kill()
        proc.wait()
        if child == "lingers":
            os.kill(int(child_pid), 9)


def test_another_hosts_lock_is_honoured_until_its_heartbeat_is_stale(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunFolderLocked, match="may be in use by pid 1 on host 'elsewhere-7'.*wait 1[12]"):
        lock_run_folder(tmp_path, wait_s=0)
    old = time.time() - runlock.STALE_AFTER_S - 1
    os.utime(path, (old, old))
    lock_run_folder(tmp_path, wait_s=0).release()


@pytest.fixture
def short_stale(monkeypatch):
    """A heartbeat stale after 1 s, polled every 0.05 s."""
    monkeypatch.setattr(runlock, "STALE_AFTER_S", 1.0)
    monkeypatch.setattr(runlock, "POLL_S", 0.05)
    monkeypatch.setattr(runlock, "WAIT_S", 1.0 + runlock.HEARTBEAT_S)


def test_a_requeued_run_waits_for_a_gone_hosts_lock_to_go_stale(tmp_path, short_stale, caplog):
    """A preempted run's lock on another host, its heartbeat just stopped: the next run (requeued elsewhere)
    waits until it is stale and takes it over, rather than failing at once."""
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": "2026-01-01T00:00:00"}))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="copg_jax.runlock"):
        lock = lock_run_folder(tmp_path)
    assert time.monotonic() - start >= 0.9  # it waited for the heartbeat to be 1 s old
    assert "waiting up to 31s for it to be released or go stale" in caplog.text
    assert "taking over the stale lock" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_flock_held_for_another_host_is_waited_for(tmp_path, short_stale):
    """On NFS a flock reaches across hosts, and a preempted holder's outlives it until the server's lease
    ends: the requeued run waits for it to drop, then takes the stale lock over."""
    path = tmp_path / "run.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, json, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, json.dumps({'pid': 1, 'host': 'elsewhere-7', 'started': 'then'}).encode())\n"
            "print('held', flush=True)\ntime.sleep(1.0)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        lock = lock_run_folder(tmp_path)
        assert time.monotonic() - start >= 0.5  # until the holder's flock dropped
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_live_holder_on_another_host_is_refused_after_the_wait(tmp_path, short_stale, monkeypatch):
    monkeypatch.setattr(runlock, "WAIT_S", 0.6)
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": "2026-01-01T00:00:00"}))
    alive = threading.Event()

    def heartbeat():  # the other host's run, alive throughout
        while not alive.wait(0.05):
            os.utime(path)

    threading.Thread(target=heartbeat, daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(RunFolderLocked, match="'elsewhere-7'.* still was after 1s of waiting"):
            lock_run_folder(tmp_path)
    finally:
        alive.set()
    assert time.monotonic() - start >= 0.5
    assert json.loads(path.read_text())["host"] == "elsewhere-7"  # untouched


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
