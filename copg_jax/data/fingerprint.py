"""Content fingerprints (hex) of what reference log-probs depend on: model, tokenizer, data files.

They let a reference cache refuse to serve numbers computed for a different model, tokenizer, tokenisation
or data. Checkpoint folders are fingerprinted by config.json and every byte of every weight file
(`weights="full"`, the default): xxh3-128 runs at ~11 GB/s in memory, so reading the file is the cost, and the
hash of each file is cached beside it (`.<name>.copg-hash.json`, or under $COPG_CACHE_DIR /
~/.cache/copg_jax when the folder is read-only) keyed by size, mtime and inode, so a folder is read in full
once. `weights="sampled"` (16 blocks of 64 KiB per file, plus names, sizes and safetensors headers) is
the explicit opt-out for folders too large to read; every use of it is logged. An in-memory model is
fingerprinted by its config and every parameter's bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from flax import nnx

from copg_jax import paths
from copg_jax.sharding import to_host

log = logging.getLogger(__name__)

_BLOCK = 1 << 16
_SAMPLES = 16
_READ = 16 << 20
WEIGHT_HASHES = ("full", "sampled")


def hash_json(value) -> str:
    """sha256 of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def update_with_file(h, path: str) -> None:
    """Feeds the bytes of file `path`, as stored, to hash object `h`."""
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


def _source_path(name: str) -> str:
    """The local file or folder of a data source named `name`: the name itself, or for a split of a
    `save_to_disk` DatasetDict, "FOLDER[SPLIT]", FOLDER (its own name may hold brackets: "ds[v1][train]")."""
    if os.path.exists(name) or not name.endswith("]") or "[" not in name:
        return name
    folder = name[: name.rindex("[")]
    return folder if os.path.isfile(os.path.join(folder, "dataset_dict.json")) else name


def _own_files(folder: str, files: list[str]) -> list[str]:
    """The files of `folder` that hold its data: in a `save_to_disk` folder (state.json) the state, the info
    and the data files the state lists, not the cache files `datasets.map` writes beside them; else all."""
    if "state.json" not in files:
        return sorted(files)
    with open(os.path.join(folder, "state.json")) as f:
        listed = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
    own = {"state.json", "dataset_info.json", *listed}
    return sorted(f for f in files if f in own)


def data_fingerprint(sources: list[str], revisions: dict[str, str] | None = None) -> str:
    """Hash of the full content of each data file (or folder: its data files, see `_own_files`) in order;
    hub datasets by name and revision (`revisions`: name -> the revision its rows were loaded from).

    Raises:
      ValueError: a source that is neither a local file or folder nor a hub dataset with a revision (nothing
        to hash: its content could change unseen).
    """
    h = hashlib.sha256()
    revisions = revisions or {}
    for name in sources:
        path = _source_path(name)
        h.update(name.encode())
        h.update(revisions.get(name, "").encode())
        if os.path.isfile(path):
            update_with_file(h, path)
        elif os.path.isdir(path):
            for root, _, files in sorted(os.walk(path)):
                for f in _own_files(root, files):
                    h.update(os.path.relpath(os.path.join(root, f), path).encode())
                    update_with_file(h, os.path.join(root, f))
        elif not revisions.get(name):
            raise ValueError(f"data source {name!r}: no file or folder of that name to fingerprint")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of vocabulary, merges, normalisation and post-processing (the fast tokenizer's JSON), special
    tokens, chat template, and `split_special_tokens` (special-token text tokenised as plain text: other
    ids for the same text; in the hash only when set, so the hashes of other tokenizers stay as they were)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    if getattr(tokenizer, "split_special_tokens", False):
        parts["split_special_tokens"] = True
    return hash_json(parts)


def _hash_cache_paths(path: str) -> list[Path]:
    """Where the cached hash of weight file `path` may live: beside it, then in the user cache folder."""
    file = Path(path)
    user = Path(paths.cache_root()) / "weight_hashes"
    key = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:32]
    return [file.parent / f".{file.name}.copg-hash.json", user / f"{key}.json"]


def file_hash(path: str) -> str:
    """xxh3-128 of a file's full content, cached beside it keyed by (size, mtime_ns, inode).

    A cache entry whose key differs from the file's current stat is ignored and rewritten, so an edited file
    is re-read: a write moves its mtime, a replacement (rsync, an atomic rename) its inode. Not the change
    time: chown / chmod / a hard link move it without touching the bytes (a Kubernetes volume's fsGroup does
    at every pod start), and would have a large checkpoint read in full on every run.
    """
    st = os.stat(path)
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "algorithm": "xxh3_128"}
    places = _hash_cache_paths(path)
    for place in places:
        try:
            cached = json.loads(place.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cached, dict) and {k: cached.get(k) for k in key} == key and "hash" in cached:
            return str(cached["hash"])
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(_READ):
            h.update(block)
    digest = h.hexdigest()
    for place in places:  # beside the file when its folder is writable, else the user cache
        try:
            paths.write_text(place, json.dumps({**key, "hash": digest}))
            break
        except OSError:
            continue
    return digest


def _sampled_hash(path: str, name: str, size: int, h) -> None:
    with open(path, "rb") as f:
        if name.endswith(".safetensors"):  # the header lists every tensor's name, dtype, shape and offset
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(header_len))
        for offset in np.linspace(0, max(size - _BLOCK, 0), _SAMPLES).astype(np.int64):
            f.seek(int(offset))
            h.update(f.read(_BLOCK))


def checkpoint_fingerprint(folder: str, weights: str = "full") -> str:
    """Hash of an HF checkpoint folder: config.json, and per weight file its name, size and content.

    Args:
      folder: the HF folder (config.json + *.safetensors / *.bin [+ index]).
      weights: "full" hashes every byte of every weight file (cached per file, see `file_hash`); "sampled"
        hashes safetensors headers and 16 blocks of 64 KiB per file, which misses changes elsewhere.
    Raises:
      FileNotFoundError: the folder has no config.json.
      ValueError: an unknown `weights` mode.
    """
    if weights not in WEIGHT_HASHES:
        raise ValueError(f"weights fingerprint must be one of {WEIGHT_HASHES}, got {weights!r}")
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"reference checkpoint {folder!r} has no config.json")
    h = hashlib.sha256()
    with open(config) as f:
        h.update(hash_json(json.load(f)).encode())
    if weights == "sampled":
        h.update(b"sampled")
        log.warning(
            "reference checkpoint %s fingerprinted by sampled blocks only (weights hash 'sampled'): "
            "weights changed outside those blocks go unnoticed",
            folder,
        )
    names = {n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin", ".index.json"))}
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):  # the shards the loader reads (`hf_io.open_checkpoint`), a subfolder's too
        with open(index) as f:
            names |= {os.path.normpath(n) for n in json.load(f).get("weight_map", {}).values()}
    for name in sorted(names):
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        if weights == "full":
            h.update(file_hash(path).encode())
        else:
            _sampled_hash(path, name, size, h)
    return h.hexdigest()


def _per_layer(path: tuple, x: np.ndarray, scanned: bool):
    """(path, array) of a parameter as an unrolled model holds it: a scanned model's stacked ("layers", ...)
    parameter is layer i's ("layers", i, ...) slice for each i."""
    if scanned and path[0] == "layers":
        return [(("layers", i, *path[1:]), x[i]) for i in range(x.shape[0])]
    return [(path, x)]


def model_fingerprint(model) -> str:
    """Hash of an in-memory model: its `config` and the bytes of every parameter (gathered across hosts),
    the same whether its layers are scanned (stacked parameters) or unrolled."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
    if isinstance(fields, dict):  # a training coefficient: no part of what the model computes
        fields.pop("router_aux_loss_coef", None)
    h.update(hash_json(fields).encode())
    scanned = bool(getattr(model, "scan_layers", False))
    params = [
        item
        for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))
        for item in _per_layer(
            path, to_host(value.get_value() if hasattr(value, "get_value") else value), scanned
        )
    ]
    for path, x in sorted(params, key=lambda kv: str(kv[0])):
        h.update(f"{path}:{x.dtype}:{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def update_with_column(h, column) -> None:
    """Feeds `h` an Arrow column's values exactly: for a list column the lengths of its lists, level by
    level, then the flat values (slicing and chunking leave it unchanged)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while pa.types.is_list(column.type):
        h.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
        column = pc.list_flatten(column)
    h.update(column.to_numpy(zero_copy_only=False).tobytes())
