"""One writer per run folder: `<output_dir>/run.lock`, held for the life of a training run.

The lock is an exclusive `flock` on the file, which the kernel drops when the holding process dies, plus a
JSON record of the holder (pid, host, start time) and a heartbeat (the file's mtime, touched every HEARTBEAT_S
seconds by a daemon thread) for filesystems whose locks do not reach across hosts. Taking it:

* the flock is held by a live process -> refused (`RunFolderLocked`, one line naming the holder); where the
  record names another host (a filesystem whose flock reaches across hosts, as NFS's does, holds a preempted
  holder's lock until its lease ends) it is waited for as below;
* the record names this host and a process that is gone (or no longer holds the flock) -> taken over;
* the record names another host -> taken over only once its heartbeat is older than STALE_AFTER_S (the
  holder is gone, or cannot reach the folder). Until then the taker waits, polling every POLL_S seconds, for
  up to WAIT_S (enough for a heartbeat that has stopped to go stale): a job requeued on another host after a
  preemption takes the lock its killed predecessor left, instead of failing and spending a restart of the
  scheduler's budget; a holder still alive after the wait is refused, naming it.

A run folder on a URL (an object store has no flock) is locked by generations instead: the lock is the newest
of the objects `<output_dir>/run.lock/<n>`, each a JSON record (pid, host, start, `released`) that its holder
rewrites every HEARTBEAT_S seconds. Taking it reads the newest generation n: held and fresh (written less than
STALE_AFTER_S ago by the store's clock; on this host: by a live process) -> refused, naming the holder (on
another host: waited for as above); otherwise generation n+1 is created with an exclusive create
(`paths.create_exclusive`), and of two runs that race for it exactly one gets it where the store makes that
create atomic (GCS, S3 with If-None-Match, the local filesystem), while on a store without preconditions both
can (paths module docstring). A holder stops its heartbeat when it finds a newer generation (its lock was
taken over as stale).

In a multi-process run, process 0 takes the lock and tells every other process whether it got it, is still
waiting (each poll is one short collective, so no process sits in a collective for minutes) or was refused, so
all of them stop together with the same line. A process that already holds a folder's lock cannot take it
again. Release removes the record and drops the flock (`release`, also at interpreter exit);
`released_on_error` releases the locks a function took when it raises. A child forked without exec holds none
of them (`_forget_in_child`): it neither keeps the flock alive nor releases it at its exit."""

from __future__ import annotations

import atexit
import fcntl
import functools
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from copg_jax import paths
from copg_jax.sharding import on_main_process, processes_where

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
WAIT_S = STALE_AFTER_S + HEARTBEAT_S  # from any moment, a stopped heartbeat is stale within this
POLL_S = 5.0
_HELD: dict[str, RunLock] = {}


class RunFolderLocked(ValueError):
    """Another run writes to this folder; the message names the holder and the lock file."""


class HeldElsewhere(RunFolderLocked):
    """The holder is on another host and its heartbeat, `age` seconds old, is fresh: it may be alive, or gone
    too recently to tell (`lock_run_folder` waits for it to go stale)."""

    def __init__(self, message: str, age: float):
        super().__init__(message)
        self.age = age


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(record: dict) -> str:
    return f"pid {record.get('pid')} on host {record.get('host')!r} since {record.get('started')}"


class RunLock:
    """The lock of one run folder held by this process (see the module docstring)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd
        self._stop = threading.Event()
        if fd is not None:
            threading.Thread(target=self._heartbeat, name="copg-run-lock", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)
            except OSError:
                return

    def release(self) -> None:
        """Removes the record and drops the lock (idempotent)."""
        self._stop.set()
        if self.fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    self.path.unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        _HELD.pop(str(self.path), None)


def exclusive_flock(path: str | Path) -> tuple[int, bool]:
    """(a descriptor of lock file `path`, made if missing, whether this process now holds its exclusive
    flock). False: another process holds it (the descriptor reads the holder's record; the caller closes
    it). A file its holder removed as it released it, between the open and the flock, is opened again."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fd, False
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, True
        os.close(fd)  # the holder removed the file between our open and flock: take the new one


def _take(path: Path) -> RunLock:
    """Takes the lock file `path` for this process (process 0 of a run) or raises RunFolderLocked."""
    fd, held = exclusive_flock(path)
    if not held:
        record = _read_record(fd)
        age = time.time() - os.fstat(fd).st_mtime
        os.close(fd)
        if record.get("host") not in (None, socket.gethostname()):  # a flock that reaches across hosts
            # (NFS) outlives a preempted holder until its lease ends: waited for like a fresh record
            raise HeldElsewhere(
                f"run folder {path.parent} is in use by {_describe(record)}: its lock {path} is held "
                f"(heartbeat {age:.0f}s ago)",
                age,
            )
        raise RunFolderLocked(
            f"run folder {path.parent} is in use by {_describe(record)} (lock {path}); wait for that run "
            "to finish or set another train.output_dir"
        )
    record = _read_record(fd)
    if record:
        age = time.time() - os.fstat(fd).st_mtime
        here = record.get("host") == socket.gethostname()
        if not here and age < STALE_AFTER_S:
            os.close(fd)
            raise HeldElsewhere(
                f"run folder {path.parent} may be in use by {_describe(record)}: its lock {path} was alive "
                f"{age:.0f}s ago",
                age,
            )
        why = "gone" if not here or not _pid_alive(int(record.get("pid", 0))) else "not holding it"
        log.warning("taking over the stale lock %s of %s (%s)", path, _describe(record), why)
    data = _record()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data + b"\n", 0)
    return RunLock(path, fd)


def _record(started: str = "", **extra) -> bytes:
    """This process's lock record: pid, host, start time and (object locks) the heartbeat's time."""
    started = started or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": started, **extra}
    ).encode()


def _generations(lock_dir: str) -> list[int]:
    return sorted(int(n) for n in paths.listdir(lock_dir) if n.isdigit()) if paths.isdir(lock_dir) else []


class ObjectLock(RunLock):
    """The lock of a run folder on a URL: generation `generation` under `path` (the module docstring)."""

    def __init__(self, path: str, generation: int, record: bytes):
        self.generation, self.started = generation, json.loads(record)["started"]
        self.object = paths.join(path, str(generation))
        super().__init__(path, None)
        threading.Thread(target=self._heartbeat, name="copg-run-lock", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                newer = [g for g in _generations(self.path) if g > self.generation]
                if newer:
                    log.error("the lock %s of this run was taken over (generation %d)", self.path, newer[-1])
                    return
                paths.write_bytes(self.object, _record(self.started, heartbeat=time.time()))
            except OSError:
                return

    def release(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            try:
                if _generations(self.path)[-1:] == [self.generation]:
                    paths.write_bytes(self.object, _record(self.started, released=True))
            except OSError:
                pass
        _HELD.pop(str(self.path), None)


def _take_url(lock_dir: str) -> ObjectLock:
    """Takes the lock of a run folder on a URL (process 0 of a run) or raises RunFolderLocked."""
    folder = paths.parent(lock_dir)
    generations = _generations(lock_dir)
    newest = generations[-1] if generations else 0
    if newest:
        current = paths.join(lock_dir, str(newest))
        try:
            record = json.loads(paths.read_bytes(current) or b"{}")
        except ValueError:
            record = {"pid": "?", "host": "?", "started": "? (unreadable record)"}
        if not record.get("released"):
            # the store's clock where it says; else the holder's (clocks of hosts may differ)
            age = time.time() - (paths.modified(current) or record.get("heartbeat", 0.0))
            here = record.get("host") == socket.gethostname()
            gone = here and not _pid_alive(int(record.get("pid", 0) or 0))
            if age < STALE_AFTER_S and not gone:
                held = f"run folder {folder} is in use by {_describe(record)}: its lock {current} was alive"
                if not here:
                    raise HeldElsewhere(f"{held} {age:.0f}s ago", age)
                raise RunFolderLocked(f"{held} {age:.0f}s ago; wait for it to finish or delete the lock")
            why = "gone" if gone else f"its heartbeat is {age:.0f}s old"
            log.warning("taking over the stale lock %s of %s (%s)", current, _describe(record), why)
    record = _record(heartbeat=time.time())
    if not paths.create_exclusive(paths.join(lock_dir, str(newest + 1)), record):
        raise RunFolderLocked(
            f"run folder {folder} was just locked by another run (lock {lock_dir}/{newest + 1}); wait for "
            "that run to finish or set another train.output_dir"
        )
    for old in generations:  # older generations are history
        try:
            paths.remove(paths.join(lock_dir, str(old)))
        except OSError:
            pass
    return ObjectLock(lock_dir, newest + 1, record)


def _read_record(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {"pid": "?", "host": "?", "started": "? (unreadable record)"}
    return record if isinstance(record, dict) else {}


def lock_run_folder(output_dir: str | Path, wait_s: float | None = None) -> RunLock:
    """Takes the lock of run folder `output_dir`, a local path or a URL (process 0; the others learn the
    outcome from it). A lock another host holds with a fresh heartbeat is waited for, up to `wait_s` seconds
    (default WAIT_S), and taken over once stale (the module docstring).

    Raises:
      RunFolderLocked: another run holds it (one line naming the holder), or this process already does.
    """
    url = paths.is_url(output_dir)
    path = paths.join(output_dir, LOCK_NAME) if url else Path(paths.normal(output_dir)).absolute() / LOCK_NAME
    if str(path) in _HELD:
        raise RunFolderLocked(f"run folder {paths.parent(path)} is already in use by this process")
    wait_s = WAIT_S if wait_s is None else wait_s
    deadline, waited = time.monotonic() + wait_s, False
    lock = RunLock(path, None)
    while True:  # process 0 tries; every process learns: taken (0), wait and try again (1), refused (2)
        error, outcome = "", 0
        if jax.process_index() == 0:
            try:
                lock = _take_url(path) if url else _take(path)
            except HeldElsewhere as e:
                outcome, held = (1 if time.monotonic() + POLL_S < deadline else 2), str(e)
                error = held + (
                    f" and still was after {wait_s:.0f}s of waiting: wait for that run to finish or set "
                    "another train.output_dir"
                    if waited
                    else f"; if that run is gone, wait {max(STALE_AFTER_S - e.age, 0):.0f}s or delete the "
                    "lock"
                )
            except RunFolderLocked as e:
                error, outcome = str(e), 2
        if jax.process_count() > 1:
            outcome = int(multihost_utils.broadcast_one_to_all(np.int32(outcome)))
        if outcome != 1:
            break
        if not waited and jax.process_index() == 0:
            log.warning("%s; waiting up to %.0fs for it to be released or go stale", held, wait_s)
        waited = True
        time.sleep(POLL_S)
    if outcome == 2 and not error:
        error = f"run folder {paths.parent(path)} is in use by another run (process 0 says which)"
    if error:
        lock.release()
        raise RunFolderLocked(error)
    _HELD[str(path)] = lock
    return lock


def check_shared(folder: str | Path, what: str) -> None:
    """Refuses, on every process together, a run or checkpoint folder the processes do not share: process 0
    writes a file of a fresh name in it and every process looks for it. (Each host's own disk under one
    path trained and then hung in the first collective save, each folder holding a part of the
    checkpoint; resuming where one host alone saw the checkpoints paired collectives of different steps.)
    Every process calls it at the same point, once process 0 has made the folder (`lock_run_folder`).

    Raises:
      ValueError: naming the folder and the processes that do not see what process 0 wrote there.
    """
    if jax.process_count() == 1:
        return
    token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(16), np.uint8))
    name = paths.join(folder, f".copg-shared-{bytes(np.asarray(token)).hex()}")
    on_main_process(f"write {name}", lambda: paths.write_bytes(name, b""))
    unseen = processes_where(not paths.exists(name))
    on_main_process(f"remove {name}", lambda: paths.remove(name))
    if unseen:
        raise ValueError(
            f"{what} {folder} is not shared by the run's processes: process(es) {unseen} do not see the file "
            "process 0 wrote there; every host needs the same folder (a shared file system or a bucket URL)"
        )


def released_on_error(fn):
    """Decorator: the run-folder locks `fn` takes are released when it raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_HELD)
        try:
            return fn(*args, **kwargs)
        except BaseException:
            for path in set(_HELD) - before:
                _HELD[path].release()
            raise

    return wrapper


def _forget_in_child() -> None:
    """In a child forked without exec (multiprocessing, a reward's worker pool): close its copies of the
    lock descriptors and forget the locks. A copy would keep the flock alive after the run died (the next
    run refused), and the inherited exit handler would remove the running parent's lock file (a second run
    let in; on a URL, it would mark the parent's generation released). The parent's lock is untouched: a
    flock lasts while any descriptor of it is open."""
    for lock in _HELD.values():
        lock._stop.set()
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
    _HELD.clear()


atexit.register(lambda: [lock.release() for lock in list(_HELD.values())])
os.register_at_fork(after_in_child=_forget_in_child)
