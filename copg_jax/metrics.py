"""Run metrics: throughput and MFU arithmetic, peak FLOP/s per device, and the JSONL / TensorBoard writer.

Everything here runs outside jit, in the loop, on process 0 only where it writes.

In a local run folder each `write` appends one line to metrics.jsonl. An object store cannot append: in a run
folder on a URL the writer keeps metrics.jsonl and the TensorBoard event files in the local staging folder
(`paths.staging_dir`; an existing metrics.jsonl is fetched first, so a resumed run continues it) and uploads
each whole, replacing the objects, at most every FLUSH_S seconds, at every checkpoint (`flush`) and at
`close`. A reader of the URL sees a complete file at every moment; a run that dies loses at most the rows of
the last FLUSH_S seconds there, which its resume writes again from the checkpoint on.

A run resumes from its last checkpoint, so the rows a killed run logged after it (a hard kill, a lost node)
would be logged twice: the writer of a (re)started run drops the rows past its starting step from
metrics.jsonl and marks a restart at that step in the TensorBoard events (TensorBoard then discards the
orphaned points from it on, and the rows kept at that step are written to it again). Rows logged at the
starting step after its checkpoint was saved (the rollout for the next update; a fresh run's evaluation at
step 0) are dropped too, as the (re)started run logs them again (`MetricsWriter`'s `redone`), and so is a
row marked `"stopped": true` there: the row of a stop off the log grid, whose updates the checkpoint keeps
and the resumed run pools into its next row, as a straight run does.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from copg_jax import paths
from copg_jax.jsonl import write_jsonl

log = logging.getLogger(__name__)
FLUSH_S = 30.0
STOPPED = "stopped"  # a row's mark (JSON only): logged at a stop off the log grid (`MetricsWriter.write`)

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity). Keys are matched as whole words of
# `device.device_kind`, lower-cased, longest key first ("l4" is not found in "NVIDIA L40S").
PEAK_FLOPS = {
    "h100": 989e12,  # SXM; PCIe/NVL parts are lower, pass train.peak_flops for those
    "h200": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l4": 121e12,
    "l40": 181e12,
    "l40s": 362e12,
    "a10g": 125e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # Trillium (v6e)
    "tpu v6e": 918e12,
}


def table_peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of a known accelerator kind, or None."""
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", kind):
            return PEAK_FLOPS[key]
    return None


def measure_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 5, device=None) -> float:
    """Measured FLOP/s of a jitted [size, size] x [size, size] matmul on one device (median of `repeats`)."""
    # A local device: in a multi-process run jax.devices()[0] belongs to process 0, and on the other processes
    # the matmul then computes nothing here and times as near-instant.
    device = device or jax.local_devices()[0]
    # Random operands: zeros or constants can run faster than real data on some accelerators.
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / float(np.median(times))


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from): override > table > measured matmul rate."""
    if override > 0:
        return override, "config"
    device = jax.local_devices()[0]
    known = table_peak_flops(device.device_kind)
    if known is not None:
        return known, f"table ({device.device_kind})"
    return measure_matmul_flops(), f"measured float32 matmul ({device.platform})"


def throughput(tokens: float, seconds: float, flops: float, peak_flops: float, num_devices: int) -> dict:
    """tokens/s and model FLOPs utilisation of one step of `tokens` tokens and `flops` model FLOPs
    (`ModelConfig.step_flops`) taking `seconds` on `num_devices` devices of `peak_flops` each."""
    return {
        "perf/tokens_per_s": tokens / max(seconds, 1e-9),
        "perf/step_time_s": seconds,
        "perf/mfu": flops / max(seconds, 1e-9) / (peak_flops * num_devices),
    }


def _redone(row: dict, step: int, redone: tuple[str, ...]) -> bool:
    """Whether `row` is one a run starting at `step` logs again there: at that step, all its metrics under
    the prefixes `redone`."""
    keys = [k for k in row if k != "step"]
    return row.get("step") == step and bool(keys) and all(k.startswith(redone) for k in keys)


def drop_rows_after(path: Path, step: int, redone: tuple[str, ...] = ()) -> int:
    """Rewrites the JSONL metrics file `path` (if it exists) without the rows whose "step" exceeds `step`,
    those at `step` whose metrics are all under the prefixes `redone` (`_redone`: logged after the
    checkpoint of `step` was saved, as the rollout that follows it, and logged again by the resumed run) or
    that are marked STOPPED (the updates of a stop's row, pooled again into the resumed run's next row), and
    a last line cut short (no newline, not JSON: a write that the end of a killed run interrupted, to which
    the next row would be appended); other lines are kept as they are (a whole last row gets its newline).
    Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    raw = path.read_bytes()
    kept, dropped = [], 0
    for line in raw.splitlines(keepends=True):
        try:
            row = json.loads(line)
            row_step = row.get("step")
        except (ValueError, AttributeError):
            row, row_step = None, None
            if not line.endswith(b"\n"):  # the last line, half written
                dropped += 1
                continue
        again = row_step == step and row.get(STOPPED) is True
        if isinstance(row_step, int) and (row_step > step or again or _redone(row, step, redone)):
            dropped += 1
        else:
            kept.append(line)
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1] += b"\n"
    rewritten = b"".join(kept)
    if rewritten != raw:
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(rewritten)
        partial.replace(path)
    return dropped


def rows_at(path: Path, step: int) -> list[dict]:
    """The rows of JSONL metrics file `path` logged at `step` (lines that are not JSON objects skipped)."""
    rows = []
    for line in path.read_bytes().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step") == step:
            rows.append(row)
    return rows


def _after_existing_event_files(logdir: Path) -> None:
    """Waits, when needed, for the clock's next second: TensorBoard reads a folder's event files in name
    order, and a name holds the second it was made in and then a per-process counter that is not zero-padded,
    so a file made in the same second as an existing one may sort before it (".10" < ".9"), and then the
    points a restarted run replaced (`_TensorBoard.restart`) come back."""
    stamps = [file.name.split(".")[3] for file in Path(logdir).glob("events.out.tfevents.*")]
    newest = max((int(s) for s in stamps if s.isdigit()), default=None)
    if newest is not None and newest >= int(time.time()):
        time.sleep(max(0.0, newest + 1 - time.time()))


class _TensorBoard:
    """Scalar events written with the `tensorboard` package alone (no TensorFlow or torch needed)."""

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary, self._session_log = Event, Summary, SessionLog
        _after_existing_event_files(logdir)
        self._writer = EventFileWriter(str(logdir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        values = [self._summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        self._writer.add_event(
            self._event(wall_time=time.time(), step=step, summary=self._summary(value=values))
        )

    def restart(self, step: int) -> None:
        """A SessionLog START at `step`: TensorBoard discards the points at `step` and after it that earlier
        event files hold (the future of a killed run this one replaces)."""
        log_start = self._session_log(status=self._session_log.START)
        self._writer.add_event(self._event(wall_time=time.time(), step=step, session_log=log_start))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _scalar(value) -> float:
    """A metrics.jsonl value as a TensorBoard scalar (null, a non-finite value written, as NaN)."""
    return float("nan") if value is None else float(value)


class MetricsWriter:
    """Appends metrics to `<run>/metrics.jsonl` (always) and TensorBoard events under `<run>/tensorboard`
    (when the `tensorboard` package imports); a run folder on a URL is written as the module docstring says.
    Writes only on process 0.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool | None = None,
        start_step: int | None = None,
        redone: tuple[str, ...] = (),
    ):
        """`start_step`: the step a run starts from (0 fresh, else its checkpoint's); rows logged past it by
        an earlier, killed run are dropped (module docstring), and so are its rows at `start_step` whose
        metrics are all under the prefixes `redone` (what the run logs again at that step: the rollout that
        follows a checkpoint, a fresh run's evaluation at step 0). None keeps everything (append only)."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.run_dir = paths.normal(run_dir)
        local = paths.staging_dir(self.run_dir)  # the run folder itself when it is local
        self.path = Path(local) / "metrics.jsonl"
        self._tb, self._flushed = None, time.monotonic()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if paths.is_url(self.run_dir):
            remote = paths.join(self.run_dir, "metrics.jsonl")
            self.path.write_bytes(paths.read_bytes(remote) if paths.isfile(remote) else b"")
        if start_step is not None:
            dropped = drop_rows_after(self.path, start_step, redone)
            if dropped:
                log.warning(
                    "%s: dropped %d rows logged at or past step %d, the checkpoint this run starts from "
                    "(logged again from here)",
                    self.path,
                    dropped,
                    start_step,
                )
        try:
            self._tb = _TensorBoard(Path(local) / "tensorboard")
        except ImportError:
            log.info("tensorboard is not installed; metrics go to %s only", self.path)
        else:
            if start_step is not None:  # the points from start_step on go; the rows kept there come back
                self._tb.restart(start_step)
                for row in rows_at(self.path, start_step):
                    self._tb.write(start_step, {k: _scalar(v) for k, v in row.items() if k != "step"})

    def write(self, step: int, metrics: dict[str, Any], stopped: bool = False) -> None:
        """One JSON line {"step": step, **metrics}; non-finite values are written as null. `stopped`: the row
        of a stop off the log grid, marked `"stopped": true` (not a TensorBoard scalar), which a run resumed
        from its step drops (module docstring)."""
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        row = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in scalars.items()}}
        if stopped:
            row[STOPPED] = True
        try:
            write_jsonl(self.path, [row], append=True)
        except OSError as e:  # a full disk's error names no file
            raise type(e)(e.errno, e.strerror, str(self.path)) from None
        if self._tb is not None:
            self._tb.write(step, scalars)
        if time.monotonic() - self._flushed >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Uploads metrics.jsonl and the event files to a run folder on a URL (nothing to do locally)."""
        if not self.enabled or not paths.is_url(self.run_dir):
            return
        paths.upload(self.path, paths.join(self.run_dir, "metrics.jsonl"))
        if self._tb is not None:
            self._tb.flush()
            paths.upload(self.path.parent / "tensorboard", paths.join(self.run_dir, "tensorboard"))
        self._flushed = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
