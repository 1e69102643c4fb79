"""Grouping one-completion rows (data.format=scored) by prompt: time and anonymous memory of `group_rows`.

Builds a synthetic Arrow dataset of N rows ({prompt, completion, reward}, ~1 KB a row, N/4 distinct prompts in
random order) in --dir, then groups it in a fresh process per size with data.max_completions=8. Memory is the
process's anonymous resident memory (RssAnon, sampled every 20 ms): the datasets are memory-mapped, and the
file pages they touch count in the peak RSS but are the kernel's page cache, not memory the grouping holds.

    python benchmarks/group_rows.py [--rows 300000 1000000] [--dir /tmp/group_rows]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time

import datasets

from copg_jax.data.config import DataConfig
from copg_jax.data.formats import group_rows


def anonymous_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon"))


def measure(rows: int, folder: str) -> dict:
    """Writes the dataset, then groups it, sampling anonymous memory meanwhile."""
    rng = random.Random(0)

    def gen():
        for _ in range(rows):
            prompt = f"prompt number {rng.randrange(rows // 4)} " + "x" * 400
            yield {"prompt": prompt, "completion": "completion text " * 40, "reward": rng.random()}

    data = datasets.Dataset.from_generator(gen, cache_dir=folder)
    peak, done = [0.0], threading.Event()

    def watch():
        while not done.wait(0.02):
            peak[0] = max(peak[0], anonymous_mb())

    before = anonymous_mb()
    threading.Thread(target=watch, daemon=True).start()
    start = time.perf_counter()
    grouped = group_rows(data, "scored", DataConfig(max_completions=8, cache_dir=folder))
    seconds = time.perf_counter() - start
    done.set()
    return {"rows": rows, "groups": len(grouped), "seconds": seconds, "before_mb": before, "peak_mb": peak[0]}


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--rows", type=int, nargs="+", default=[300_000, 1_000_000])
    parser.add_argument("--dir", default="/tmp/group_rows")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.dir)))
        return
    machine = platform.processor() or platform.machine()
    load = os.getloadavg()[0]
    print(f"{machine}, {os.cpu_count()} cores, load {load:.1f}, datasets {datasets.__version__}")
    print("| rows | groups | seconds | rows/s | anonymous MB before | peak | per row (bytes) |")
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        shutil.rmtree(args.dir, ignore_errors=True)
        cmd = [sys.executable, __file__, "--worker", str(rows), "--dir", args.dir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        grown = (r["peak_mb"] - r["before_mb"]) * 2**20 / rows
        print(
            f"| {rows:,} | {r['groups']:,} | {r['seconds']:.1f} | {rows / r['seconds']:,.0f} | "
            f"{r['before_mb']:.0f} | {r['peak_mb']:.0f} | {grown:.0f} |"
        )
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
