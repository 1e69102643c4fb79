"""Content fingerprints (sha256 hex) of what reference log-probs depend on: model, tokenizer, data files.

They let a reference cache refuse to serve numbers computed for a different model, tokenizer, tokenisation
or data. Checkpoint folders are fingerprinted by config, file names, sizes, safetensors headers and sampled
content blocks (fast on multi-GB weights and equal on every copy of the same files); an in-memory model by
its config and every parameter's bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

_BLOCK = 1 << 16
_SAMPLES = 16


def hash_json(value) -> str:
    """sha256 of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _file_hash(path: str, h) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


def data_fingerprint(sources: list[str]) -> str:
    """Hash of the full content of each data file (or folder) in order; hub datasets by name only."""
    h = hashlib.sha256()
    for name in sources:
        path = name.split("[")[0] if name.endswith("]") and not os.path.exists(name) else name
        h.update(name.encode())
        if os.path.isfile(path):
            _file_hash(path, h)
        elif os.path.isdir(path):
            for root, _, files in sorted(os.walk(path)):
                for f in sorted(files):
                    h.update(os.path.relpath(os.path.join(root, f), path).encode())
                    _file_hash(os.path.join(root, f), h)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of vocabulary, merges, normalisation and post-processing (the fast tokenizer's JSON), special
    tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hash_json(parts)


def checkpoint_fingerprint(folder: str) -> str:
    """Hash of an HF checkpoint folder: config.json; per weight file its name, size, header, sampled blocks.

    Raises:
      FileNotFoundError: the folder has no config.json.
    """
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"reference checkpoint {folder!r} has no config.json")
    h = hashlib.sha256()
    with open(config) as f:
        h.update(hash_json(json.load(f)).encode())
    for name in sorted(os.listdir(folder)):
        if not name.endswith((".safetensors", ".bin", ".index.json")):
            continue
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            if name.endswith(".safetensors"):  # the header lists every tensor's name, dtype, shape and offset
                header_len = int.from_bytes(f.read(8), "little")
                h.update(f.read(header_len))
            for offset in np.linspace(0, max(size - _BLOCK, 0), _SAMPLES).astype(np.int64):
                f.seek(int(offset))
                h.update(f.read(_BLOCK))
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """Hash of an in-memory model: its `config` and the bytes of every parameter (gathered across hosts)."""
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(
        hash_json(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)).encode()
    )
    for path, value in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
        x = value.get_value() if hasattr(value, "get_value") else value
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        x = np.asarray(x)
        h.update(f"{path}:{x.dtype}:{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()
