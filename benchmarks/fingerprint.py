"""Throughput of the reference-cache weight fingerprint: full xxh3-128 file hashing vs sampled blocks.

    python benchmarks/fingerprint.py [--size-mb 1024] [--dir /tmp]

Writes a file of random bytes (a stand-in for a safetensors shard), then times `file_hash` (first call reads
and hashes the whole file; the page cache is warm right after writing it), a second call (served by the
cached hash beside the file), and the sampled mode of `checkpoint_fingerprint`. Prints a table in GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import xxhash

from copg_jax.data.fingerprint import checkpoint_fingerprint, file_hash


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        weights = folder / "model.safetensors"
        with open(weights, "wb") as f:  # an 8-byte header length + a tiny header, then random "tensors"
            header = b'{"__metadata__":{}}'
            f.write(len(header).to_bytes(8, "little") + header)
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        size = weights.stat().st_size
        first = _time(lambda: file_hash(str(weights)))
        cached = _time(lambda: file_hash(str(weights)))
        sampled = _time(lambda: checkpoint_fingerprint(str(folder), "sampled"))
        data = os.urandom(256 << 20)
        in_memory = _time(lambda: xxhash.xxh3_128(data).hexdigest())
    rows = [
        ("full, first read (warm page cache)", first, size),
        ("full, cached hash (stat only)", cached, size),
        ("sampled blocks (16 x 64 KiB)", sampled, size),
        ("xxh3-128 in memory", in_memory, len(data)),
    ]
    print(
        f"# weight fingerprint, {args.size_mb} MiB file, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, xxhash {xxhash.VERSION}"
    )
    print("| mode | seconds | GB/s of weights covered |")
    print("|---|---|---|")
    for name, seconds, nbytes in rows:
        print(f"| {name} | {seconds:.4f} | {nbytes / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
