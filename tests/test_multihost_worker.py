"""Worker program of tests/test_multihost.py: one process of a multi-process CPU run (no tests in here).

    python tests/test_multihost_worker.py collectives OUT_DIR

launched N times by launch/local_multiprocess.sh; each process writes OUT_DIR/<phase>_<rank>.json.
"""

import json
import sys
from pathlib import Path


def collectives(out: Path) -> dict:
    """Cross-process psum and all-gather, and a jitted computation on an array sharded over all processes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from copg_jax.metrics import measure_matmul_flops
    from copg_jax.sharding import make_mesh

    rank, count = jax.process_index(), jax.process_count()
    mesh = make_mesh()  # all global devices on "data"
    rows = 4 * jax.device_count()
    full = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    share = rows // count
    local = full[rank * share : (rank + 1) * share]  # this process's rows only
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    x = jax.make_array_from_process_local_data(sharding, local, full.shape)

    @jax.jit
    def stats(x):
        w = jnp.arange(3, dtype=jnp.float32) + 1.0
        return jnp.sum(x**2), x @ w

    total, projected = stats(x)
    psum = jax.shard_map(
        lambda v: jax.lax.psum(jnp.sum(v), "data"),
        mesh=mesh,
        in_specs=PartitionSpec("data"),
        out_specs=PartitionSpec(),
    )(x)
    gathered = multihost_utils.process_allgather(jnp.asarray([rank, rank * 10], jnp.int32))
    return {
        **run_folder_lock(out),
        **main_process_outcome(),
        "rank": rank,
        "count": count,
        "devices": jax.device_count(),
        "sum_sq": float(total),
        "psum": float(psum),
        "projected": np.asarray(multihost_utils.process_allgather(projected, tiled=True)).tolist(),
        "gathered": np.asarray(gathered).tolist(),
        "matmul_flops": measure_matmul_flops(size=512, repeats=3),  # the MFU peak each process measures
    }


def main_process_outcome() -> dict:
    """`on_main_process`: process 0's result, then a failure there that every process raises."""
    from copg_jax.sharding import MainProcessError, on_main_process

    result = on_main_process("count", lambda: 42)

    def fail():
        raise OSError("No space left on device: 'config.yaml'\nsecond line")

    try:
        on_main_process("write config.yaml", fail)
        raised = ""
    except (OSError, MainProcessError) as e:
        raised = f"{type(e).__name__}: {e}"
    return {"main_result": result, "main_failure": raised}


def run_folder_lock(out: Path) -> dict:
    """Every process asks for the lock of a folder the test holds (all are refused), then of a free one
    (process 0 holds it for the run: the record names process 0's pid), then of one another host's run left
    behind when it was preempted."""
    import os
    import time

    import jax
    from jax.experimental import multihost_utils

    from copg_jax import runlock
    from copg_jax.runlock import RunFolderLocked, lock_run_folder

    try:
        lock_run_folder(out.parent / "locked")
        refused = ""
    except RunFolderLocked as e:
        refused = str(e)
    lock = lock_run_folder(out.parent / "free")
    record = json.loads((out.parent / "free" / "run.lock").read_text())
    multihost_utils.sync_global_devices("lock_record_read")  # before process 0 removes it
    lock.release()
    # a preempted run's lock on another host, its heartbeat just stopped: process 0 waits for it to go stale,
    # the other processes poll with it (one short collective a poll), and all take it over together
    runlock.STALE_AFTER_S, runlock.POLL_S = 1.0, 0.05
    requeued = out.parent / "requeued" / "run.lock"
    if jax.process_index() == 0:
        requeued.parent.mkdir()
        requeued.write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": "now"}))
    start = time.monotonic()
    lock = lock_run_folder(requeued.parent)
    waited = time.monotonic() - start
    taken_by = json.loads(requeued.read_text())["pid"]
    multihost_utils.sync_global_devices("requeued_record_read")
    lock.release()
    return {
        "pid": os.getpid(),
        "refused": refused,
        "lock_holder_pid": record["pid"],
        "requeued_holder_pid": taken_by,
        "requeued_wait": waited,
    }


def train_resume(out: Path, config_json: str) -> dict:
    """The real trainer on a tiny model: stop after some steps (checkpoint), resume in a new `train` call."""
    import jax

    from copg_jax.config import apply_overrides, from_dict
    from copg_jax.run_config import Config
    from copg_jax.train import train

    spec = json.loads(Path(config_json).read_text())
    if spec.get("sys_path"):  # where a reward module of the run lives
        sys.path.insert(0, spec["sys_path"])
    overrides = [*spec["overrides"], f"data.cache_dir={out}/datasets_cache_{jax.process_index()}"]
    cfg = from_dict(Config, apply_overrides(spec["base"], overrides))
    first = train(cfg, stop_after=spec["stop_after"]) if spec["stop_after"] else None
    final = train(cfg)
    return {
        "first_step": None if first is None else first.step,
        "first_interrupted": None if first is None else first.interrupted,
        "step": final.step,
        "metrics": final.metrics,
    }


def train_signal(out: Path, config_json: str) -> dict:
    """The trainer with SIGINT sent to process 1 alone once process 0 has logged two updates (a Ctrl-C, which
    goes the way of a preemption notice, SIGTERM); process 1 looks for the reference cache on a disk of its
    own, where it is missing (process 0 finds it)."""
    import logging
    import os
    import signal
    import threading
    import time

    import jax

    from copg_jax.config import apply_overrides, from_dict
    from copg_jax.run_config import Config
    from copg_jax.train import train

    spec = json.loads(Path(config_json).read_text())
    overrides = [*spec["overrides"], f"data.cache_dir={out}/datasets_cache_{jax.process_index()}"]
    if jax.process_index() == 1:
        overrides.append(f"data.ref_cache={out}/host_1_disk/ref.parquet")
    cfg = from_dict(Config, apply_overrides(spec["base"], overrides))
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("copg_jax.train").addHandler(handler)
    signalled = {}

    def notice():  # a scheduler's preemption notice to one host
        metrics = Path(cfg.train.output_dir) / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        signalled["at"] = json.loads(metrics.read_text().splitlines()[-1])["step"]
        os.kill(os.getpid(), signal.SIGINT)

    if jax.process_index() == 1:
        threading.Thread(target=notice, daemon=True).start()
    result = train(cfg)
    return {
        "step": result.step,
        "interrupted": result.interrupted,
        "signalled_at": signalled.get("at", 0),
        "cache_computed": any("usable on process(es) [0] only" in w for w in warnings),
    }


def _sharded_state(value: float, columns: int = 4096) -> dict:
    """An [8, `columns`] float32 array split by rows over every device of every process."""
    import jax
    import numpy as np

    from copg_jax.sharding import logical_sharding, make_mesh

    sharding = logical_sharding(make_mesh(), ("batch", None))
    full = np.random.default_rng(int(value)).normal(size=(8, columns)).astype(np.float32) + value
    return {"w": jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])}


def checkpoint_fallback(out: Path, directory: str) -> dict:
    """Steps 1 and 2 of `_sharded_state` saved collectively; process 0 damages the largest chunk of step 2
    that process 1 wrote (and alone reads); `restore_latest` on every process: the steps saved, the step
    restored and whether its values are right. Through an asynchronous manager, as runs save by default: its
    restore's barrier is named otherwise, and a process failing to read joined the wrong one (hung)."""
    import os

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from copg_jax import checkpoint as ckpt

    manager = ckpt.make_manager(directory, keep_last=5, async_save=True)
    for step in (1, 2):
        ckpt.save(manager, step, _sharded_state(float(step)), {"epoch": 0, "index": step})
    manager.wait_until_finished()
    saved = manager.all_steps()
    if jax.process_index() == 0:
        chunks = sorted(
            (Path(directory) / "2" / "state" / "ocdbt.process_1" / "d").iterdir(), key=os.path.getsize
        )
        damaged = bytearray(chunks[-1].read_bytes())
        damaged[len(damaged) // 2 : len(damaged) // 2 + 400] = bytes(400)
        chunks[-1].write_bytes(bytes(damaged))
    multihost_utils.sync_global_devices("chunk_damaged")
    manager.reload()
    restored = ckpt.restore_latest(manager, _sharded_state(0.0))
    want = _sharded_state(float(restored.step))["w"]
    local = [np.array_equal(a.data, b.data) for a, b in zip(restored.state["w"].addressable_shards,
                                                          want.addressable_shards, strict=True)]  # fmt: skip
    manager.close()
    return {"saved": saved, "step": restored.step, "right": all(local)}


def _cap_writes_on_process_1() -> tuple[int, int]:
    """Caps process 1's files at 256 KiB (a write past it fails with EFBIG, as on a full disk there); returns
    the limit to put back with `resource.setrlimit(resource.RLIMIT_FSIZE, ...)`."""
    import resource
    import signal

    import jax

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if jax.process_index() == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, limit[1]))
    return limit


def checkpoint_async_failure(out: Path, directory: str) -> None:
    """An async save whose write fails on process 1 alone (its files capped at 256 KiB, its share of the
    state 1 MiB, as a full disk there; its log stays below the cap): the next save raises on both processes
    once checkpoint.async_timeout_s (10 s here) has passed, where both waited in orbax's barrier. Writes
    its result and leaves at once (the failed save's threads still wait there)."""
    import os
    import resource
    import time

    import jax
    from jax.experimental import multihost_utils

    from copg_jax import checkpoint as ckpt

    manager = ckpt.make_manager(directory, keep_last=5, async_save=True, async_timeout_s=10)
    limit = _cap_writes_on_process_1()
    start = time.monotonic()
    ckpt.save(manager, 1, _sharded_state(1.0, columns=65536), {"epoch": 0, "index": 1})
    if jax.process_index() == 1:
        time.sleep(2)  # its background write fails meanwhile
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    try:
        ckpt.save(manager, 2, _sharded_state(2.0, columns=65536), {"epoch": 0, "index": 2})
        raised = ""
    except ckpt.CheckpointError as e:
        raised = str(e)
    result = {"raised": raised, "seconds": time.monotonic() - start}
    (out / f"checkpoint_async_failure_{jax.process_index()}.json").write_text(json.dumps(result))
    multihost_utils.sync_global_devices("written")
    os._exit(0)


def disagreements(out: Path, directory: str) -> dict:
    """What one process sees otherwise than the others, refused on both: the checkpoint steps it lists (a
    lagging listing: each restored its own latest), its --stop-after (the one stopping hung in the save's
    barrier), and a synchronous save whose write fails on process 1 alone (orbax's synchronous save waited
    in barriers without a deadline: both hung for good; now both raise once checkpoint.async_timeout_s, 10 s
    here, has passed). Writes its result and leaves at once (the failed save's threads still wait)."""
    import os
    import resource
    import time

    import jax
    from jax.experimental import multihost_utils

    from copg_jax import checkpoint as ckpt
    from copg_jax import train as tr

    said = {}
    try:
        ckpt.agree_on_steps(directory, [4, 2] if jax.process_index() == 0 else [2])
    except ckpt.CheckpointError as e:
        said["steps"] = str(e)
    try:
        tr.agree_on_stop(3 if jax.process_index() == 1 else None)
    except ValueError as e:
        said["stop"] = str(e)
    manager = ckpt.make_manager(directory, keep_last=5, async_save=False, async_timeout_s=10)
    limit = _cap_writes_on_process_1()
    start = time.monotonic()
    try:
        ckpt.save(manager, 1, _sharded_state(1.0, columns=65536), {"epoch": 0, "index": 1})
    except ckpt.CheckpointError as e:
        said["save"] = str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    said["seconds"] = time.monotonic() - start
    (out / f"disagreements_{jax.process_index()}.json").write_text(json.dumps(said))
    multihost_utils.sync_global_devices("written")
    os._exit(0)


PHASES = {
    "collectives": collectives,
    "disagreements": disagreements,
    "checkpoint_async_failure": checkpoint_async_failure,
    "train_resume": train_resume,
    "train_signal": train_signal,
    "checkpoint_fallback": checkpoint_fallback,
}


def main(argv: list[str]) -> None:
    phase, out = argv[0], Path(argv[1])
    from copg_jax.distributed import maybe_initialize_distributed

    info = maybe_initialize_distributed()
    result = PHASES[phase](out, *argv[2:])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{phase}_{info.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
