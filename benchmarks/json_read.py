"""Reading a large JSON-lines file: time and peak memory of our reader (`load_sources`, two passes a chunk
at a time) beside the `datasets` JSON builder, cold (parsed into the cache) and warm (the cache reused).

Writes a synthetic K-way file (chat-message prompts, 4 completions, rewards) of about --mb megabytes, then
reads it in a fresh process per measurement, so that each peak RSS (`ru_maxrss`) is that read's own; the
baseline column is the peak after the imports, before the read. --whole adds the reader of commit 938c963
(every row held as Python objects, one Arrow table; today's line parser) for comparison, cold only. The
load average is printed before and after: on a shared machine, times move with it; peak RSS does not.

    python benchmarks/json_read.py [--mb 200] [--dir /tmp/json_read] [--whole]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import pyarrow as pa

from copg_jax.data import formats
from copg_jax.data.formats import load_sources
from copg_jax.jsonl import read_jsonl_lines

WORDS = [f"w{i}" for i in range(500)] + ["the", "a", "of", "and", "to", "in", "is", "that", "for", "it"]
READERS = ("copg", "datasets", "whole")


def synthetic_row(rng: random.Random, k: int = 4) -> dict:
    """One K-way row: a system and a user message as the prompt, `k` completions of 40-120 words."""

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))

    return {
        "prompt": [
            {"role": "system", "content": text(5, 20)},
            {"role": "user", "content": text(20, 80)},
        ],
        "completions": [text(40, 120) for _ in range(k)],
        "rewards": [round(rng.uniform(-1, 1), 4) for _ in range(k)],
    }


def write_file(path: Path, megabytes: float, seed: int = 0) -> int:
    """Writes synthetic rows to `path` until it holds `megabytes` MB; returns the number of rows."""
    rng, size, rows = random.Random(seed), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            line = json.dumps(synthetic_row(rng), ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            rows += 1
    return rows


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_whole_file(file: str, cache: str) -> datasets.Dataset:
    """The reader of commit 938c963: every row parsed into one list, one Arrow table, written, mapped."""
    rows = [row for _, row in read_jsonl_lines(file)]
    path = Path(cache) / "whole.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    formats._write_arrow(formats._rows_table(rows), path)
    del rows
    return datasets.Dataset.from_file(str(path))


def read(reader: str, file: str, cache: str) -> datasets.Dataset:
    if reader == "copg":
        return load_sources(file, "train", cache)[0].rows
    if reader == "datasets":
        return datasets.load_dataset("json", data_files=file, split="train", cache_dir=cache)
    return read_whole_file(file, cache)


def measure(reader: str, file: str, cache: str) -> dict:
    """Reads `file` once in this process: {seconds, cpu_seconds, peak_mb, baseline_mb, rows}."""
    baseline = peak_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    rows = read(reader, file, cache)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = peak_rss_mb()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_mb": peak,
        "baseline_mb": baseline,
        "rows": len(rows),
    }


def run_child(reader: str, file: Path, cache: Path) -> dict:
    """`measure` in a fresh Python process (its own peak RSS)."""
    command = [sys.executable, __file__, "--child", reader, "--file", str(file), "--cache", str(cache)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="size of the synthetic file")
    parser.add_argument("--dir", default="", help="working folder (default: a temporary one, removed)")
    parser.add_argument("--whole", action="store_true", help="also the whole-file reader of 938c963")
    parser.add_argument("--child", choices=READERS, help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.file, args.cache)))
        return
    work = Path(args.dir or tempfile.mkdtemp(prefix="json_read_"))
    work.mkdir(parents=True, exist_ok=True)
    file = work / "kway.jsonl"
    start = time.perf_counter()
    count = write_file(file, args.mb)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Python "
        f"{platform.python_version()}, pyarrow {pa.__version__}, datasets {datasets.__version__}; "
        f"chunk {formats.JSON_CHUNK_LINES} lines / {formats.JSON_CHUNK_BYTES >> 20} MB; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"file: {file.stat().st_size / 1e6:.0f} MB, {count} K-way rows (chat prompts, 4 completions), "
        f"written in {time.perf_counter() - start:.0f} s\n"
    )
    print(
        f"{'reader':<28} {'read':<5} {'time s':>7} {'CPU s':>6} {'peak RSS MB':>12} {'after imports MB':>17}"
    )
    runs = [("copg", "cold"), ("copg", "warm"), ("datasets", "cold"), ("datasets", "warm")]
    runs += [("whole", "cold")] if args.whole else []
    names = {
        "copg": "load_sources (chunked)",
        "datasets": 'load_dataset("json")',
        "whole": "whole-file (938c963)",
    }
    for reader, when in runs:
        cache = work / f"cache_{reader}"
        if when == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        got = run_child(reader, file, cache)
        assert got["rows"] == count, (reader, got["rows"], count)
        print(
            f"{names[reader]:<28} {when:<5} {got['seconds']:>7.1f} {got['cpu_seconds']:>6.1f} "
            f"{got['peak_mb']:>12.0f} {got['baseline_mb']:>17.0f}"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
