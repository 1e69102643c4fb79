"""Orbax checkpoints of a training run: model/optimizer state, data-iterator position and metadata together.

Each step directory holds three items: `state` (any pytree of arrays, StandardSave), `data` (the data
iterator's position, a JSON dict of ints) and `meta` (JSON: step, metrics, checksums). Orbax writes a step
into a temporary directory and renames it only once every item is complete, so a half-written step is never
listed. Orbax does not notice garbled bytes inside an array chunk or an edited JSON item, so `meta` also
stores a wrapping uint32 sum of each state leaf's bits and a SHA-256 of the data position, checked on
restore; a caller's `verify` checks what it keeps beside a step (online mode: the rollout state). A step
that is listed but unreadable or fails a check is reported by name and skipped in favour of the previous
good one; when checkpoints exist but none can be read, restoring raises instead of silently starting from
scratch. Orbax also keeps a step's keep-best metrics beside it (`<step>/metrics/metrics`) and reads them
for every step while building a manager, where one damaged stopped it: a writable manager first rewrites
such an item from the step's checksummed metadata, which records the same metrics, or sets the step aside
where that is damaged too (`prepare_folder`), and a read-only one does not read them. The temporary
folder of a save whose process was killed stays until that step number is saved again: a writable manager
removes it first.

Where checkpoints go: orbax (its tensorstore layer, orbax-checkpoint 0.11-0.12) writes arrays only to local
(or mounted) paths and gs:// (tensorstore's GCS driver); a checkpoint folder there is orbax's own, written
collectively by every process. A checkpoint folder on any other URL (s3://, az://, memory://, ...) is
mirrored (`MirroredCheckpointManager`, one process only): orbax saves synchronously into a local staging
folder (`paths.staging_dir`), and each step is then uploaded file by file and marked done by the object
`<step>.mirrored`; a step without its mark is not a checkpoint. On start the staging folder is made equal to
the URL's marked steps (missing ones downloaded, others removed), and steps orbax's retention drops are
deleted there (mark first). A step counts once uploaded: a run that dies before that resumes from the step
before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from copg_jax import paths
from copg_jax.sharding import error_everywhere, gather_bytes, gather_ints, on_main_process, processes_where

log = logging.getLogger(__name__)
MIRRORED = ".mirrored"


class CheckpointError(ValueError):
    """No readable checkpoint where one was expected; the message names the directory and steps."""


def orbax_writes(directory: str | Path) -> bool:
    """Whether orbax writes checkpoint folder `directory` itself: a local (or mounted) path or gs://."""
    return paths.is_local(directory) or paths.normal(directory).startswith("gs://")


def _steps(folder: str, suffix: str = "") -> set[int]:
    """Step numbers named `<n><suffix>` in `folder` (none when it does not exist)."""
    if not paths.isdir(folder):
        return set()
    return {int(n.removesuffix(suffix)) for n in paths.listdir(folder) if n.removesuffix(suffix).isdigit()}


class MirroredCheckpointManager(ocp.CheckpointManager):
    """An orbax CheckpointManager over the local staging folder of `url`, whose finished steps are mirrored
    to `url` (module docstring). `url` is where messages say the checkpoints are."""

    def __init__(self, url: str, *, options: ocp.CheckpointManagerOptions, **kwargs):
        self.url, local = url, paths.staging_dir(url)
        remote = _steps(url, MIRRORED)
        for step in _steps(local) - remote:  # not (or no longer) a checkpoint at the URL
            paths.remove(paths.join(local, str(step)))
        for step in sorted(remote):
            paths.stage(paths.join(url, str(step)))
        if not options.read_only:
            paths.makedirs(local)
            prepare_folder(local, url)
        super().__init__(Path(local).absolute(), options=options, **kwargs)
        if not options.read_only:
            self.push()

    def push(self) -> None:
        """Uploads the finished steps the URL lacks and deletes there the steps orbax no longer keeps."""
        # saves are synchronous here, so every step folder is finished (orbax renames it into place last)
        finished, remote = _steps(str(self.directory)), _steps(self.url, MIRRORED)
        for step in sorted(finished - remote):
            target = paths.join(self.url, str(step))
            if paths.exists(target):  # the remains of an upload that did not finish
                paths.remove(target)
            paths.upload(Path(self.directory) / str(step), target)
            paths.write_bytes(target + MIRRORED, b"")
        for step in sorted(remote - finished):
            paths.remove(paths.join(self.url, str(step)) + MIRRORED)
            paths.remove(paths.join(self.url, str(step)))

    def save(self, step, *args, **kwargs) -> bool:
        saved = super().save(step, *args, **kwargs)
        self.push()
        return saved


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: its step, state pytree, data-iterator position and metadata."""

    step: int
    state: Any
    data: dict[str, Any]
    meta: dict[str, Any]


def rank_value(metrics: dict[str, Any], best_metric: str, best_mode: str) -> float:
    """`metrics[best_metric]` as a float for keep-best ranking; the worst value of `best_mode` (+inf for
    "min", -inf for "max") when it is missing or not finite."""
    value = float(metrics.get(best_metric, math.nan))
    if math.isfinite(value):
        return value
    return math.inf if best_mode == "min" else -math.inf


def check_folder(directory: str | Path) -> None:
    """Raises ValueError when checkpoint folder `directory` is a local file (orbax's save threads failed
    there and kept the process from ever exiting)."""
    if not paths.is_url(directory) and Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"checkpoint folder {str(directory)!r} is a file, not a folder (checkpoint.dir)")


# orbax's name for a step being written (`<step>.orbax-checkpoint-tmp[-<n>]`), renamed to `<step>` once every
# item is complete; only a save of the same step number again removes one left by a killed process
TMP_SUFFIX = getattr(ocp.utils, "TMP_DIR_SUFFIX", ".orbax-checkpoint-tmp")
# orbax's item of a step's keep-best metrics (`<step>/metrics/metrics`), read for every step by a manager's
# constructor: a damaged one stopped it with a JSON error naming no file
METRICS_ITEM = "metrics"
_LIGHTWEIGHT = "lightweight_initialize" in {f.name for f in dataclasses.fields(ocp.CheckpointManagerOptions)}


def unfinished_saves(directory: str) -> list[str]:
    """The temporary folders in checkpoint folder `directory` of step saves that never finished (their
    process was killed): orbax lists no step of them, and leaves them there."""
    if not paths.isdir(directory):
        return []
    return sorted(paths.join(directory, n) for n in paths.listdir(directory) if TMP_SUFFIX in n)


def metrics_damage(directory: str, step: int) -> str | None:
    """Why the metrics item of checkpoint `step` in `directory` does not read as orbax's manager and the
    keep-best ranking need it (a JSON object of numbers), or None when it does or there is none (a step
    saved without one: orbax reads it as no metrics)."""
    path = paths.join(directory, str(step), METRICS_ITEM, METRICS_ITEM)
    if not paths.isfile(path):
        return None
    try:
        metrics = json.loads(paths.read_bytes(path))
    except (OSError, ValueError) as e:
        return f"{path} does not read as JSON ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    numbers = isinstance(metrics, dict) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    )
    return None if numbers else f"{path} is not a JSON object of numbers"


def saved_metrics(directory: str, step: int) -> dict[str, float] | None:
    """The keep-best metrics checkpoint `step` in `directory` was saved with, as its metadata item records
    them ({} for a step saved without), or None when that item does not read, names another step or fails its
    checksum (`_meta_edited`; one saved before metadata had a checksum is not trusted either)."""
    try:
        meta = json.loads(paths.read_bytes(paths.join(directory, str(step), "meta", "metadata")))
    except (OSError, ValueError):
        return None
    trusted = isinstance(meta, dict) and "meta_checksum" in meta and not _meta_edited(meta)
    return dict(meta.get("metrics", {})) if trusted and meta.get("step") == step else None


def prepare_folder(directory: str, url: str | None = None) -> None:
    """Readies writable checkpoint folder `directory` (the staging folder of mirrored `url`) before orbax
    lists it: the temporary folders of saves that never finished are removed, and a step whose metrics item
    is damaged (`metrics_damage`) has it rewritten from its metadata item (`saved_metrics`; in `url` too),
    or where that is damaged too, is set aside as `<step>.corrupt` like other unreadable steps
    (`set_aside_newer`), each with a warning. Process 0 does it while the others wait, so none lists the
    folder halfway; every process calls it at the same point."""

    def prepare() -> None:
        for folder in unfinished_saves(directory):
            log.warning("removing %s: the remains of a checkpoint save that never finished", folder)
            paths.remove(folder)
        damaged = []
        for step in sorted(_steps(directory)):
            if (why := metrics_damage(directory, step)) is None:
                continue
            if (metrics := saved_metrics(directory, step)) is not None:
                for folder in (directory, url) if url else (directory,):
                    item = paths.join(folder, str(step), METRICS_ITEM, METRICS_ITEM)
                    paths.write_text(item, json.dumps(metrics))
                log.warning("checkpoint step %d: %s; rewrote it from the step's metadata", step, why)
                continue
            log.warning("checkpoint step %d in %s is corrupt: %s", step, url or directory, why)
            damaged.append(step)
        _rename_aside(directory, url, _aside_names(directory, url, damaged))

    on_main_process(f"prepare checkpoint folder {url or directory}", prepare)


class BlockingCheckpointManager(ocp.CheckpointManager):
    """checkpoint.async_save=false: `save` returns once the write has finished on every process. orbax's own
    synchronous save waits in barriers without a deadline, so a write failing on one process (a full disk
    there) hung every other one for good; this one writes as an async save does, whose waits end after
    async_timeout_s (`waiting_for_writes` then raises), and waits for it."""

    def save(self, *args, **kwargs) -> bool:
        saved = super().save(*args, **kwargs)
        self.wait_until_finished()
        return saved


def make_manager(
    directory: str | Path,
    *,
    keep_last: int | None = 3,
    keep_best: int = 0,
    best_metric: str = "eval/loss",
    best_mode: str = "min",
    async_save: bool = True,
    async_timeout_s: int = 1200,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager over `directory` keeping the latest `keep_last` steps plus the best
    `keep_best` steps by `best_metric` (`best_mode` "min" or "max"; steps saved without metrics do not
    compete for "best", and steps whose metrics lack a finite `best_metric` — a step where only generation
    eval ran, a NaN loss — rank below every step with one). A `directory` orbax cannot write
    (`orbax_writes`) is mirrored (module docstring). A background write may take `async_timeout_s` seconds
    before every process gives up on it (raised by the next `save` or `wait_until_finished`).

    Raises:
      ValueError: a mirrored `directory` in a multi-process run; a local `directory` that is a file (orbax's
        save threads failed there and kept the process from ever exiting).
    """
    check_folder(directory)
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    policies = [LatestN(n=keep_last)]
    rank = functools.partial(rank_value, best_metric=best_metric, best_mode=best_mode)
    if keep_best > 0:
        policies.append(
            BestN(
                # BestN keeps the last n of an ascending sort: reverse it when smaller is better.
                get_metric_fn=rank,
                reverse=best_mode == "min",
                n=keep_best,
                # every step saved here has a metrics item (`save`: {} without evaluation, ranked last); one
                # without is from before they were written (its metrics only in its meta item): kept, as the
                # best there may be
                keep_checkpoints_without_metrics=True,
            )
        )
    # a read-only manager (export, eval) deletes nothing, so it needs no ranking: it does not read the
    # metrics items, one of which, damaged, would stop it (`prepare_folder` mends them in training)
    lightweight = {"lightweight_initialize": True} if read_only and _LIGHTWEIGHT else {}
    options = ocp.CheckpointManagerOptions(
        preservation_policy=AnyPreservationPolicy(policies) if len(policies) > 1 else policies[0],
        # with a best_fn orbax writes a step's metrics beside it, and reads them back in the next run's
        # manager; without, a resumed run saw no metrics for the steps before it, and BestN let them go
        best_fn=rank if keep_best > 0 else None,
        best_mode=best_mode,
        # a synchronous save writes as an async one does, then waits (BlockingCheckpointManager); mirrored
        # folders' uploads follow saves
        enable_async_checkpointing=orbax_writes(directory) and not read_only,
        async_options=ocp.AsyncOptions(timeout_secs=async_timeout_s),
        create=not read_only,
        read_only=read_only,
        **lightweight,
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    if orbax_writes(directory):
        if not read_only:
            prepare_folder(paths.normal(directory))
        kind = ocp.CheckpointManager if async_save or read_only else BlockingCheckpointManager
        return kind(Path(paths.normal(directory)).absolute(), options=options, item_handlers=handlers)
    if jax.process_count() > 1:
        raise ValueError(
            f"checkpoint folder {directory}: orbax writes checkpoints only to local (or mounted) paths and "
            "gs://, and one of those is needed in a multi-process run (set checkpoint.dir)"
        )
    return MirroredCheckpointManager(paths.normal(directory), options=options, item_handlers=handlers)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Wrapping uint32 sum of the bit patterns of `x`: exact, independent of sharding and reduction order."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width)  # 8-byte items become [..., 2] uint32
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    """[_leaf_checksum(x) for x in leaves] as one program (leaves on one device set)."""
    return [_leaf_checksum(x) for x in leaves]


def state_checksums(state: Any) -> dict[str, int]:
    """Per-leaf checksums of a pytree of arrays, keyed by the leaf's path (JSON-friendly).

    One program per set of devices the leaves live on (a replicated scalar may sit beside sharded params),
    each fetched before the next starts. A program per leaf, all queued at once, deadlocked XLA:CPU with
    several devices in a process: a device takes only so many programs in flight (a semaphore), and a
    sharded leaf's all-reduce then waited for the device whose part of it could not be queued.
    """
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    groups: dict[Any, list[int]] = {}
    for i, (_, x) in enumerate(flat):
        sharding = getattr(x, "sharding", None)
        groups.setdefault(None if sharding is None else frozenset(sharding.device_set), []).append(i)
    sums: dict[int, int] = {}
    for members in groups.values():
        values = jax.device_get(_checksums([flat[i][1] for i in members]))
        sums.update((i, int(v)) for i, v in zip(members, values, strict=True))
    return {jax.tree_util.keystr(path): sums[i] for i, (path, _) in enumerate(flat)}


def data_checksum(data: dict[str, Any]) -> str:
    """SHA-256 of a JSON item (the data position), independent of key order."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def meta_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata item as it reads back (tuples as lists, keys as strings), key order aside."""
    return data_checksum(json.loads(json.dumps(meta)))


def _meta_edited(meta: dict[str, Any]) -> bool:
    """Whether metadata item `meta` (as read) no longer matches the checksum saved in it; False for one saved
    before metadata had a checksum."""
    saved = meta.get("meta_checksum")
    rest = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return saved is not None and meta_checksum(rest) != saved


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data: dict[str, Any],
    meta: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    force: bool = True,
) -> bool:
    """Saves `state` (pytree of arrays), the data-iterator position `data` and `meta` at `step` (async when
    the manager is). `metrics` (flat name -> float) rank the step for keep-best. Returns whether it saved.

    Raises:
      CheckpointError: the previous background write did not finish on every process in time
        (`waiting_for_writes`).
    """
    data = dict(data)
    meta = {
        **(meta or {}),
        "step": int(step),
        "checksums": state_checksums(state),
        "data_checksum": data_checksum(data),
    }
    metrics = {k: float(v) for k, v in (metrics or {}).items()}  # {} ranks last for keep-best
    if metrics:
        meta["metrics"] = metrics
    meta["meta_checksum"] = meta_checksum(meta)  # an edited setting or fingerprint falls back as damage
    with waiting_for_writes(manager):  # orbax first waits for the previous save
        return manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=metrics,
            force=force,
        )


@contextlib.contextmanager
def waiting_for_writes(manager: ocp.CheckpointManager) -> Iterator[None]:
    """Where orbax waits for a background write (the next save, `wait_until_finished`): its barrier timing
    out (`make_manager`'s async_timeout_s) becomes a CheckpointError saying why it most likely did -- a write
    that failed on one process, which the others waited for -- rather than a collective's deadline."""
    try:
        yield
    except (jax.errors.JaxRuntimeError, TimeoutError) as e:
        if isinstance(e, jax.errors.JaxRuntimeError):
            barrier = "DEADLINE_EXCEEDED" in str(e)
        else:  # orbax's own, not a socket's
            barrier = str(e).startswith("Timed out while waiting for async_")
        if not barrier:
            raise
        if jax.process_count() == 1:
            why = "the storage is slower than that, or the write hangs"
        else:
            why = "it failed on some process (its log says why), or the storage is slower than that"
        raise CheckpointError(
            f"{manager.directory}: a checkpoint write did not finish on every process within "
            f"checkpoint.async_timeout_s: {why}"
        ) from e


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """`manager.wait_until_finished()` (every process calls it at the same point).

    Raises:
      CheckpointError: as `waiting_for_writes`.
    """
    with waiting_for_writes(manager):
        manager.wait_until_finished()


def latest_items(manager: ocp.CheckpointManager) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, metadata item, data position) of the latest step, read from its files without orbax (no
    collective, no state read): to refuse a resume before the work that precedes restoring. None when there
    is no step or its items do not read (restoring it then says why, or falls back)."""
    for step in sorted(manager.all_steps(), reverse=True):
        if (items := _intact_items(manager, step)) is not None:
            return (step, *items)
    return None


def _intact_items(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict] | None:
    """(metadata, data position) of `step` where both read and match their checksums, else None: a step
    whose items are damaged is set aside as restoring it finds (`_check_step`), and the resume's checks read
    the step it falls back to (an edited setting or row digest was refused as a change of the run's)."""
    try:
        meta, data = (
            json.loads((manager.directory / str(step) / item / "metadata").read_text())
            for item in ("meta", "data")
        )
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(data, dict):
        return None
    if _meta_edited(meta):
        return None
    return (meta, data) if data_checksum(data) == meta.get("data_checksum", data_checksum(data)) else None


# The barrier orbax's Checkpointer.restore ends with, after reading (orbax-checkpoint 0.12): a process whose
# read fails before it joins the barrier alone (tests/test_multihost.py holds this to the installed orbax).
# An AsyncCheckpointer (every writing manager here) prefixes it with its own prefix, "" by default:
# "_Checkpointer:restore"; joining the unprefixed one left the processes' barriers paired wrongly, and a step
# only one process could read hung the resume of every run saving asynchronously (the default).
RESTORE_BARRIER = "Checkpointer:restore"


def _restore_barrier(manager: ocp.CheckpointManager) -> str:
    """The name of the barrier `manager`'s restore ends with (`RESTORE_BARRIER`, under its checkpointer's
    prefix)."""
    prefix = getattr(getattr(manager, "_checkpointer", None), "_barrier_sync_key_prefix", None)
    return ocp.multihost.unique_barrier_key(RESTORE_BARRIER, prefix=prefix)


def _read_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """What orbax reads of `step` on this process (its own shards: one process can fail where others read).
    A process whose read fails still joins the barrier the others reach, so the next collective pairs up."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
        return manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except Exception:
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(_restore_barrier(manager))
        raise


# Waits before re-reading a step after a transient I/O error (a storage or network hiccup): falling back past
# a good step would set it aside and retrain from an older one.
RETRY_AFTER_S = (2.0, 10.0)
_LASTING = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _transient(error: Exception | None) -> bool:
    """An I/O error a second read may not meet (EIO, a timeout, a dropped connection), unlike a missing or
    damaged file."""
    return isinstance(error, OSError) and not isinstance(error, _LASTING)


def _read_agreed(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, Exception | None]:
    """(what this process read of `step`, the error every process agrees on: None when all read it). After
    a transient I/O error on any process, all read again together (RETRY_AFTER_S)."""
    for wait in (*RETRY_AFTER_S, None):
        out, error = None, None
        try:
            out = _read_step(manager, step, abstract_state)
        except Exception as e:  # noqa: BLE001 — any read failure means this step is unusable
            error = e
        hit = processes_where(_transient(error)) if wait is not None else []
        if not hit:
            return out, _everywhere(error)
        log.warning(
            "reading checkpoint step %d hit an I/O error on process(es) %s (%s); reading it again in %.0fs",
            step,
            hit,
            error if error is not None else "elsewhere",
            wait,
        )
        time.sleep(wait)
    raise AssertionError("unreachable")


def _check_step(step: int, out: Any) -> Restored:
    """The step's metadata, state checksums (computed collectively over the global arrays) and data position
    checked; CheckpointError naming what does not match."""
    meta = dict(out["meta"] or {})
    if _meta_edited(meta):
        raise CheckpointError(f"the metadata of step {step} does not match its checksum (edited)")
    meta.pop("meta_checksum", None)
    if meta.get("step") != step:
        raise CheckpointError(f"metadata of step {step} names step {meta.get('step')!r}")
    expected = meta.pop("checksums", None)
    if expected is None:
        raise CheckpointError(f"metadata of step {step} has no state checksums")
    actual = state_checksums(out["state"])
    bad = [k for k in expected if actual.get(k) != expected[k]] + [k for k in actual if k not in expected]
    if bad:
        raise CheckpointError(f"state leaves {bad[:5]} do not match their saved checksums (garbled data)")
    data = out["data"]
    if not isinstance(data, dict) or data_checksum(data) != meta.pop("data_checksum", None):
        raise CheckpointError(
            f"the data position of step {step} does not match its checksum (edited or empty)"
        )
    return Restored(step=step, state=out["state"], data=data, meta=meta)


class _ElsewhereUnusable(CheckpointError):
    """A step this process read and checked, found unusable by another process."""


def _everywhere(error: Exception | None) -> Exception | None:
    """This process's error (None: fine), or, where this process had none, one saying another process failed:
    every process of a run gets an error from the same steps, so all fall back together (one process reading
    a damaged shard of its own while the others go on would pair the collectives of different steps)."""
    return error_everywhere(error, lambda failed: _ElsewhereUnusable(f"unusable on process(es) {failed}"))


def _unusable(errors: list[str], directory, step: int, error: Exception) -> None:
    """Records (and logs) why checkpoint `step` cannot be resumed from."""
    cause, seen = error, {id(error)}  # orbax wraps tensorstore's error (naming the array and the file) in
    # one naming neither: the innermost reads; our own errors say it themselves
    while not isinstance(error, CheckpointError):
        inner = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
        if inner is None or id(inner) in seen:
            break
        cause = inner
        seen.add(id(inner))
    first = str(cause).splitlines()[0] if str(cause) else ""
    detail = f"{type(cause).__name__}: {first[:300]}{' ...' if len(first) > 300 else ''}"
    where = paths.join(directory, str(step))
    errors.append(f"step {step} ({where}): {detail}")
    log.warning(
        "checkpoint step %d in %s is corrupt or unreadable (%s); trying the previous one", step, where, detail
    )


class StateMismatchError(CheckpointError):
    """A checkpoint whose state has other leaves, shapes or dtypes than the run's config makes (the config
    changed since it was saved): refused, not fallen back past as a damaged step."""


def state_mismatch(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> str | None:
    """How checkpoint `step`'s state (its array metadata, nothing else read) differs from `abstract_state`:
    'name: saved dtype[shape], now dtype[shape]' for the first leaves that differ, and the counts of leaves
    only one has; None when they agree, or when the metadata does not read (restoring then says why)."""
    try:
        saved = {
            m.name: f"{m.dtype}{list(m.shape)}"
            for m in jax.tree.leaves(manager.item_metadata(step)["state"])
            if hasattr(m, "name") and hasattr(m, "shape")
        }
    except Exception:  # noqa: BLE001 — unreadable metadata is the restore's to report
        return None
    names = jax.tree.leaves(ocp.tree.get_param_names(abstract_state, include_empty_nodes=False))
    now = {
        n: f"{x.dtype}{list(x.shape)}" for n, x in zip(names, jax.tree.leaves(abstract_state), strict=True)
    }
    if not saved or saved == now:
        return None
    changed = [
        f"{n}: saved {saved[n]}, now {now[n]}"
        for n in sorted(saved, key=lambda n: (not n.startswith("params"), n))
        if n in now and saved[n] != now[n]
    ]
    missing, extra = len(set(saved) - set(now)), len(set(now) - set(saved))
    parts = changed[:3] + ([f"{len(changed) - 3} more changed"] if len(changed) > 3 else [])
    parts += [f"{missing} saved leaves this config lacks"] * bool(missing)
    parts += [f"{extra} leaves of this config not saved"] * bool(extra)
    return "; ".join(parts)


def agree_on_steps(directory: Any, steps: list[int]) -> None:
    """Refuses, on every process together, a folder whose steps the processes list differently: each
    restored its own latest (a shared filesystem's listing lagging on one host, gcsfuse's list cache), the
    run trained on a state and data position mixed from two steps, and hung at its next save. Every process
    calls it at the same point.

    Raises:
      CheckpointError: naming each process's latest step.
    """
    if jax.process_count() == 1:
        return
    listed = gather_bytes(hashlib.sha256(json.dumps(sorted(steps)).encode()).digest())
    if all(theirs == listed[0] for theirs in listed):
        return
    latest = gather_ints(max(steps) if steps else -1)
    shown = ", ".join(f"process {i}: {s if s >= 0 else 'none'}" for i, s in enumerate(latest))
    raise CheckpointError(
        f"{directory}: the processes list different checkpoint steps (the latest: {shown}, or other steps "
        "before it): every process must see the same folder; a shared filesystem's listing may lag (a list "
        "cache): resume once it agrees"
    )


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    step: int | None = None,
    verify: Callable[[Restored], None] | None = None,
) -> Restored | None:
    """Restores the newest readable checkpoint (or exactly `step`), or None when the directory has none.

    Args:
      abstract_state: a pytree like the saved state whose leaves carry shape, dtype and the sharding to
        restore onto (arrays or `jax.ShapeDtypeStruct`s).
      step: restore this step only (raises if it is unreadable).
      verify: called on each readable step; a CheckpointError from it (what the caller keeps beside the step
        is damaged) moves on to the previous step like an unreadable one, other errors propagate.
    Raises:
      CheckpointError: checkpoints exist but none (or not `step`) can be read.
    """
    directory = getattr(manager, "url", manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    agree_on_steps(directory, steps)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {directory}; steps: {sorted(steps)}")
        steps = [step]
    if steps:  # a config changed since the save is no damage to fall back past: every step has its state
        mismatch = state_mismatch(manager, steps[0], abstract_state)
        if processes_where(mismatch is not None):
            raise StateMismatchError(
                f"checkpoint step {steps[0]} in {directory} holds another state than this config makes "
                f"({mismatch or 'on another process'}): resume with the model, lora and optim settings it "
                "was saved with (model.param_dtype and optim.bf16_compensation included), or train in a new "
                "train.output_dir"
            )
    errors: list[str] = []
    for candidate in steps:
        # each phase ends with the processes agreeing (`_everywhere`) before the next, collective, one
        out, error = _read_agreed(manager, candidate, abstract_state)
        restored = None
        if error is None:
            try:
                restored = _check_step(candidate, out)
                if verify is not None:
                    verify(restored)
            except CheckpointError as e:
                error = e
            error = _everywhere(error)
        if error is not None:
            _unusable(errors, directory, candidate, error)
            continue
        return restored
    if errors:
        raise CheckpointError(f"no readable checkpoint in {directory}: " + "; ".join(errors))  # one line
    return None


def _aside_names(directory: str, url: str | None, steps: list[int]) -> list[tuple[int, str]]:
    """(step, the name it is set aside as) for `steps` of checkpoint folder `directory` (and `url`):
    `<n>.corrupt`, or `<n>.corrupt<k>` when an earlier resume already set aside a step of that number."""
    moved = []
    for step in sorted(steps):
        names, n = [f"{step}.corrupt"], 1
        while any(paths.exists(paths.join(d, names[-1])) for d in (directory, url) if d):
            names.append(f"{step}.corrupt{n}")
            n += 1
        moved.append((step, names[-1]))
    return moved


def _rename_aside(directory: str, url: str | None, moved: list[tuple[int, str]]) -> None:
    """Renames each step of `moved` (`_aside_names`) in `directory`, and at mirrored `url` (its mark first),
    with a warning naming where it went. Process 0 only."""
    for step, name in moved:
        paths.rename(paths.join(directory, str(step)), paths.join(directory, name))
        if url is not None:
            paths.remove(paths.join(url, str(step)) + MIRRORED)
            paths.rename(paths.join(url, str(step)), paths.join(url, name))
        log.warning("set aside unreadable checkpoint step %d as %s", step, paths.join(url or directory, name))


def set_aside_newer(manager: ocp.CheckpointManager, step: int) -> list[str]:
    """Renames the steps newer than `step` (the unreadable ones a resume fell back past) to `<n>.corrupt`.

    Training on from `step` saves those step numbers again, which orbax refuses while they exist; renaming
    (rather than deleting) keeps the damaged bytes for inspection and out of `all_steps()`. Returns the new
    paths (process 0 renames, at the URL too for a mirrored manager; every process reloads the step list).
    """
    directory = str(manager.directory)
    url = getattr(manager, "url", None)
    moved = _aside_names(directory, url, [s for s in manager.all_steps() if s > step])
    if moved:
        on_main_process(
            f"set aside the unreadable checkpoint steps of {url or directory}",
            lambda: _rename_aside(directory, url, moved),
        )
        manager.reload()
    return [paths.join(url or directory, name) for _, name in moved]
