"""Device mesh construction and the one table of logical-axis rules.

Modules name their parameter and activation axes logically ("embed", "mlp", "batch", ...); this module alone
decides which mesh axis (`data`, `fsdp`, `expert`, `tensor`) each logical name maps to.

The `expert` axis is expert parallelism for a mixture of experts: each device along it holds E / n whole
experts and runs only their assignments (`models.moe`). Everything else treats it like `fsdp`: the batch is
split over it and dense parameters are sharded along it. Its default size 1 leaves every layout as without it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # examples / rows of a batch
    ("length", None),  # sequence positions
    ("embed", ("fsdp", "expert")),  # model width: parameters are FSDP-sharded along it
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),  # a mixture of experts' expert axis: whole experts per device (expert parallelism)
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("lora_rank", None),  # LoRA adapters: A [*in, r] and B [r, *out] shard like their layer's kernel
    ("norm", None),
    ("act_embed", None),  # activations keep the width replicated; the batch carries the data split
)


def device_grid(shape: tuple[int, int, int, int], devices: Sequence) -> np.ndarray:
    """[data, fsdp, expert, tensor] (`shape`) array of `devices` laid out for the interconnect, the tensor
    axis (most traffic) innermost, then the expert axis (all-gathered activations): on TPU by the chips'
    torus coordinates (`mesh_utils.create_device_mesh`), over several slices with `data` split across them
    and everything else inside a slice (`create_hybrid_device_mesh`: only data-parallel gradients cross the
    slow data-centre network); on GPU by device id; on CPU as given. A layout JAX cannot make (a shape the
    torus does not split into, `data` not a multiple of the slices) falls back to the devices' own order,
    with a warning."""
    data = shape[0]
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    try:
        if len(slices) > 1:
            if data % len(slices):
                raise ValueError(f"mesh.data={data} is not a multiple of the {len(slices)} slices")
            return mesh_utils.create_hybrid_device_mesh(
                (data // len(slices), *shape[1:]),
                (len(slices), 1, 1, 1),
                devices,
                allow_split_physical_axes=True,
            )
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
        log.warning(
            "mesh %s: devices in their listed order, not laid out for the interconnect (%s)", shape, e
        )
        return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    expert: int = 1,
) -> Mesh:
    """Builds a (data, fsdp, expert, tensor) mesh; `-1` for `data` takes all remaining devices. All devices
    are laid out for the interconnect (`device_grid`); given `devices` keep their order.

    Raises:
      ValueError: when the axis sizes do not multiply to the number of devices.
    """
    laid_out = devices is None
    devices = list(jax.devices() if devices is None else devices)
    inner = fsdp * expert * tensor
    sizes = (
        f"fsdp={fsdp} x expert={expert} x tensor={tensor}" if expert > 1 else f"fsdp={fsdp} x tensor={tensor}"
    )
    if data == -1:
        if len(devices) % inner:
            raise ValueError(f"mesh {sizes} does not divide {len(devices)} devices")
        data = len(devices) // inner
    if data * inner != len(devices):
        raise ValueError(
            f"mesh data={data} x {sizes} = {data * inner} does not match the {len(devices)} available devices"
        )
    shape = (data, fsdp, expert, tensor)
    grid = device_grid(shape, devices) if laid_out else np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], rules=LOGICAL_RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules=LOGICAL_RULES) -> NamedSharding:
    """NamedSharding on `mesh` for an array whose axes have the given logical names."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=LOGICAL_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical names, leaving whole the dimensions their mesh axes do not divide
    (`divisible_spec`: XLA would pad them, and its padded rows reach an embedding's gradient scatter); a
    no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = divisible_spec(logical_to_spec(logical_axes, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def on_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
    """`fn` traced with `mesh` as the abstract mesh, so that the `constrain` calls inside it take effect.

    Wrap a function before `jax.jit`: without a mesh context XLA's propagation alone lays out activations, and
    on a wide FSDP mesh it may keep the batch whole, e.g. full-batch output-head logits on every device.
    """
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def processes_where(flag: bool) -> list[int]:
    """The indices of the processes where `flag` holds (every process calls it at the same point and gets
    the same list): a decision one process takes from what it sees alone -- a file there, a shard it read --
    made the same on all before the collectives that follow it."""
    if jax.process_count() == 1:
        return [0] if flag else []
    flags = np.asarray(multihost_utils.process_allgather(np.int32(flag)))
    return np.flatnonzero(flags).tolist()


def error_everywhere(
    error: Exception | None, elsewhere: Callable[[list[int]], Exception]
) -> Exception | None:
    """This process's `error` where it has one, else `elsewhere(the processes that have one)` where any has,
    else None: a check each process makes from its own reads, failed on all together before the collective
    work that all or none must do. Every process calls it at the same point."""
    failed = processes_where(error is not None)
    if error is None and failed:
        return elsewhere(failed)
    return error


def gather_bytes(value: bytes) -> list[bytes]:
    """Every process's `value` (all of one length), by process index; every process calls it at the same
    point."""
    if jax.process_count() == 1:
        return [value]
    gathered = np.asarray(multihost_utils.process_allgather(np.frombuffer(value, np.uint8)))
    return [bytes(row) for row in gathered.reshape(jax.process_count(), len(value))]


def gather_ints(value: int) -> list[int]:
    """Every process's `value` (an int64), by process index; every process calls it at the same point."""
    gathered = gather_bytes(value.to_bytes(8, "little", signed=True))
    return [int.from_bytes(b, "little", signed=True) for b in gathered]


def same_everywhere(what: str, digest: bytes, count: int) -> None:
    """Refuses, on every process together, when the processes read different `what`: `digest` (of what each
    read) and `count` (how many rows) differ from process 0's. Every process calls it at the same point.

    Raises:
      ValueError: naming the processes that differ and their counts.
    """
    if jax.process_count() == 1:
        return
    everyone = gather_bytes(count.to_bytes(8, "little") + digest)
    differ = [i for i, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differ:
        counts = ", ".join(f"process {i}: {int.from_bytes(everyone[i][:8], 'little')}" for i in [0, *differ])
        raise ValueError(
            f"the processes read different {what} (rows: {counts}; or the same count with other contents): "
            "every host needs the same files, tokenizer and settings"
        )


class MainProcessError(RuntimeError):
    """What process 0 did for the whole run failed there; the other processes raise this, with its message."""


MESSAGE_BYTES = 1024


def on_main_process(what: str, fn: Callable[[], Any]) -> Any:
    """Runs `fn` on process 0 only (a write every process relies on: the run's config, a cache file, a
    rename) and makes its outcome every process's: process 0 returns its result (the others None), or all
    raise together when it failed -- rather than the others walking into the next collective alone and
    hanging until the coordinator gives up. Every process calls it at the same point.

    Raises:
      Exception: process 0 re-raises what `fn` raised.
      MainProcessError: on the other processes when `fn` failed on process 0: "process 0 failed to
        <what>: <error type>: <first line of its message>".
    """
    result, error, message = None, None, ""
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # the other processes must hear of it before this one raises
            first = str(e).splitlines()[0] if str(e) else ""
            error, message = e, f"process 0 failed to {what}: {type(e).__name__}: {first}"
    if jax.process_count() > 1:
        buffer = np.zeros(MESSAGE_BYTES, np.uint8)
        encoded = message.encode()[:MESSAGE_BYTES]
        buffer[: len(encoded)] = np.frombuffer(encoded, np.uint8)
        shared = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
        message = bytes(shared).rstrip(b"\0").decode(errors="replace")
    if error is not None:
        raise error
    if message:
        raise MainProcessError(message)
    return result


def to_host(x) -> np.ndarray:
    """The whole value of `x` as a numpy array on this host: a jax.Array whose shards live on other
    processes too is all-gathered (a collective: every process must call it), anything else converted."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array laid out by `sharding` from the full `value`, which every process holds (each
    process places only the shards of its own devices)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def divisible_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` with every dimension its mesh axes do not divide replicated (e.g. 2 KV heads on a tensor axis
    of 4): the sharding an array of `shape` can actually take."""
    parts = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        parts.append(axes if dim % math.prod(mesh.shape[n] for n in names) == 0 else None)
    return PartitionSpec(*parts)


def shard_count(spec: PartitionSpec, mesh: Mesh) -> int:
    """Number of distinct shards an array laid out by `spec` is split into on `mesh`."""
    names = [n for axes in spec for n in ((axes,) if isinstance(axes, str) else tuple(axes or ()))]
    return math.prod(mesh.shape[n] for n in names)


def unsharded_dims(
    logical_axes: Sequence[str | None], shape: tuple[int, ...], mesh: Mesh, rules=LOGICAL_RULES
) -> list[tuple[int, int, tuple[str, ...]]]:
    """Dimensions the logical rules shard over mesh axes of size > 1 but that those axes do not divide,
    so `divisible_spec` replicates them: (dim index, dim size, mesh axes) each."""
    spec = logical_to_spec(logical_axes, rules)
    out = []
    for i, (dim, axes) in enumerate(
        zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True)
    ):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[n] for n in names)
        if size > 1 and dim % size:
            out.append((i, dim, names))
    return out
