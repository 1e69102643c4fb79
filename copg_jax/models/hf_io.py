"""HF checkpoint I/O without torch: lazy memory-mapped safetensors reading, streamed writing, and the mapping
between HF tensor names and our parameter paths.

Reading maps each file and hands numpy views to `jax.make_array_from_callback`, so every device reads only its
own shard of each tensor; no host copy of the whole model is ever made. Writing streams one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}

Path_ = tuple[
    str | int, ...
]  # a parameter's path in the NNX state, e.g. ("layers", 0, "attn", "q", "kernel")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one or more of our parameters (several for fused qkv).

    `to_params` maps the HF array to our arrays (numpy views where possible, so slicing stays lazy);
    `to_hf` is its inverse.
    """

    name: str
    hf_shape: tuple[int, ...]
    paths: tuple[Path_, ...]
    to_params: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class LoRALayout:
    """Where PEFT puts LoRA adapters in a family's HF model, and the names they have there.

    Attributes:
      layers: the HF name of the block list; block i's modules are `{layers}.{i}.{module}`.
      modules: HF module name within a block -> our adapter site (`copg_jax.models.lora.SITES`).
      default_targets: PEFT's default `target_modules` for the family
        (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
      qkv_per_head: the fused qkv projection's outputs are laid out [H, 3, Dh] (GPT-NeoX), else [q | k | v].
      fan_in_fan_out: the adapted HF weights are stored [in, out] (GPT-2's Conv1D; PEFT's flag of that name).
      unadapted: model_type -> HF modules (or parameters) within a block that take no adapter here but PEFT
        adapts where a pattern names them (Qwen2-MoE's shared expert; Qwen3-MoE's and OLMoE's experts, as
        target_parameters on transformers 5).
      all_linear_adds: model_type -> those PEFT adapts under "all-linear" beside `modules` (the mixtures'
        experts and routers, and Qwen2-MoE's shared expert).
    """

    layers: str
    modules: dict[str, str]
    default_targets: tuple[str, ...]
    qkv_per_head: bool = False
    fan_in_fan_out: bool = False
    unadapted: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    all_linear_adds: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def linear(name: str, path: Path_, in_shape: tuple[int, ...], out_shape: tuple[int, ...], transpose=True):
    """A torch Linear weight [out, in] (or a Conv1D [in, out] when transpose=False) <-> kernel [*in, *out]."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if transpose:
        return TensorMap(
            name,
            (n_out, n_in),
            (path,),
            lambda w: (w.T.reshape(in_shape + out_shape),),
            lambda k: k.reshape(n_in, n_out).T,
        )
    return TensorMap(
        name,
        (n_in, n_out),
        (path,),
        lambda w: (w.reshape(in_shape + out_shape),),
        lambda k: k.reshape(n_in, n_out),
    )


def reshaped(
    name: str, path: Path_, shape: tuple[int, ...], hf_shape: tuple[int, ...] | None = None
) -> TensorMap:
    """An HF tensor of `hf_shape` (default `shape`; e.g. a flat [H*Dh] bias) <-> values in `shape`."""
    hf_shape = shape if hf_shape is None else hf_shape
    return TensorMap(name, hf_shape, (path,), lambda w: (w.reshape(shape),), lambda p: p.reshape(hf_shape))


def state_index(path: tuple, scan_layers: bool) -> tuple[tuple, tuple[int, ...]]:
    """(our state path, index into that parameter) of a family's parameter path: with scanned layers, layer i
    of every block parameter ("layers", i, ...) is slice i of one stacked ("layers", ...) parameter; a
    trailing int j (one expert's HF tensor) is slice j of an experts parameter."""
    index = ()
    if isinstance(path[-1], int):
        path, index = path[:-1], (path[-1],)
    if scan_layers and path[0] == "layers":
        return ("layers", *path[2:]), (path[1], *index)
    return path, index


def put_slice(values: dict, key: tuple, index: tuple[int, ...], value) -> None:
    """values[key] = value, or slice `index` of it in nested {i: value} dicts (the slices of a parameter
    stacked over layers or experts)."""
    if not index:
        values[key] = value
        return
    slot = values.setdefault(key, {})
    for i in index[:-1]:
        slot = slot.setdefault(i, {})
    slot[index[-1]] = value


def read_slices(value, idx: tuple = ()) -> np.ndarray:
    """Slice `idx` (a tuple of slices, as `jax.make_array_from_callback` asks) of a parameter's value: an
    array, or {i: value} slices along its leading axes (`put_slice`), stacked."""
    if not isinstance(value, dict):
        return np.asarray(value[idx])
    first, rest = (idx[0], idx[1:]) if idx else (slice(None), ())
    return np.stack([read_slices(value[i], rest) for i in range(len(value))[first]])


def _read_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(size) if 0 <= size <= 100 * 2**20 else b""
    try:
        if len(raw) != size:
            raise ValueError("header is cut short")
        return json.loads(raw), 8 + size
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def open_checkpoint(folder: str | Path) -> dict[str, tuple[np.ndarray, Path]]:
    """Memory-maps every tensor of an HF folder: {name: (lazy array, file)}.

    Reads `model.safetensors.index.json` when present, else every `*.safetensors` file.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors


def read_safetensors(file: Path) -> dict[str, tuple[np.ndarray, Path]]:
    """Memory-maps every tensor of one safetensors file: {name: (lazy array, file)}."""
    header, start = _read_header(file)
    data = np.memmap(file, dtype=np.uint8, mode="r")
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"tensor {name} in {file} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        if start + end > data.size:
            raise ValueError(
                f"{file} is truncated: tensor {name} needs bytes up to {start + end}, the file has "
                f"{data.size}"
            )
        array = data[start + begin : start + end].view(DTYPES[meta["dtype"]]).reshape(meta["shape"])
        tensors[name] = (array, file)
    return tensors


def write_safetensors(
    file: str | Path | None,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable]],
    prepare: Callable[[], object] | None = None,
) -> None:
    """Streams tensors into one safetensors file, fetching each array only when it is written.

    Every tensor is fetched even when writing fails (the folder cannot be prepared, the disk fills): a
    fetch may be a gather every process of a multi-process run joins, and process 0 leaving them for its
    error left the others waiting in the next one. The failure is raised once all are fetched.

    Args:
      file: where to write; None fetches every tensor and writes nothing (a process of a multi-process run
        that joins the gathers of sharded tensors while process 0 writes the file).
      tensors: (name, shape, dtype, fetch) with fetch() -> np.ndarray of that shape and dtype.
      prepare: called before the file is opened (when there is one to write): making its folder, removing
        what it replaces.
    """
    tensors = list(tensors)
    if file is None:
        for *_, fetch in tensors:
            fetch()
        return
    failure, f = None, None
    try:
        if prepare is not None:
            prepare()
        f = open(file, "wb")
        f.write(_header(tensors))
    except Exception as e:  # noqa: BLE001 - raised once every tensor is fetched
        failure = e
    try:
        for name, shape, dtype, fetch in tensors:
            array = fetch()  # whatever failed here: the other processes wait in this gather
            if failure is not None:
                continue
            try:
                array = np.ascontiguousarray(array, dtype=dtype)
                if array.shape != tuple(shape):
                    raise ValueError(f"tensor {name}: expected shape {tuple(shape)}, got {array.shape}")
                f.write(array.tobytes())
            except Exception as e:  # noqa: BLE001 - raised once every tensor is fetched
                failure = e
    finally:
        if f is not None:
            try:
                f.close()
            except Exception as e:  # noqa: BLE001 - a full disk may fail the last flush only
                failure = failure or e
    if failure is not None:
        raise failure


def _header(tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable]]) -> bytes:
    """A safetensors file's length prefix and JSON header for `tensors`, stored in order."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw
