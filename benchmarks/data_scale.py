"""The data pipeline's host-side cost at pod scale: what every host pays at a start, a resume and a step.

Builds a synthetic tokenised dataset of N rows (what `tokenize_dataset` returns: prompts of 3-40 tokens,
K = 2-8 completions of 3-60 tokens, memory-mapped from an Arrow file in --dir) and times, on host 0 of
--hosts simulated hosts (batches of --batch-size prompts, the packed layout):

* `DataIterator` construction (its row-length check over every row) and the rows' digest (a resume's check);
* a step's batch (`global_rows` + `batch`: the global batch's shape over every host's share, this host's
  rows laid out), as the median of 8;
* writing the reference cache (`precompute_ref` with a model that costs nothing: log-prob = -0.1 per token,
  so what is timed is the host's own work) and opening it (`open_ref_cache`: its checks and dense arrays).

Tokenising is not timed (it is the tokenizer's; `json_read.py` times reading). Each size runs in a fresh
process; peak RSS is the process's.

    python benchmarks/data_scale.py [--rows 100000 300000 1000000] [--hosts 64] [--dir /tmp/data_scale]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import datasets
import numpy as np
import pyarrow as pa
from flax import nnx

from copg_jax.data import refcache
from copg_jax.data.config import DataConfig
from copg_jax.data.pipeline import DataIterator
from copg_jax.data.tokenize import FEATURES, DataReport, TokenizedData
from copg_jax.models import ModelConfig, from_config

COLUMNS = ("prompt_ids", "completion_ids", "rewards", "prompt_length", "completion_lengths", "source",
           "source_row", "prompt_truncated", "completions_truncated")  # fmt: skip


def _lists(lengths: np.ndarray, values) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(offsets, values)


def synthetic(rows: int, folder: str) -> TokenizedData:
    """N tokenised rows (the columns training reads), written once to an Arrow file and memory-mapped."""
    path = os.path.join(folder, f"rows_{rows}.arrow")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng(0)
        k = rng.integers(2, 9, rows)
        prompt = rng.integers(3, 41, rows).astype(np.int32)
        completion = rng.integers(3, 61, int(k.sum())).astype(np.int32)
        table = pa.table({
            "prompt_ids": _lists(prompt, rng.integers(7, 200, int(prompt.sum()), dtype=np.int32)),
            "completion_ids": _lists(k, _lists(completion, rng.integers(7, 200, int(completion.sum())))),
            "rewards": _lists(k, rng.normal(size=int(k.sum())).astype(np.float32)),
            "prompt_length": prompt,
            "completion_lengths": _lists(k, completion),
            "source": pa.array(["synthetic.jsonl"] * rows),
            "source_row": np.arange(rows, dtype=np.int64),
            "prompt_truncated": np.zeros(rows, bool),
            "completions_truncated": np.zeros(rows, np.int32),
        })  # fmt: skip
        table = table.cast(datasets.Features({c: FEATURES[c] for c in COLUMNS}).arrow_schema)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=10_000):
                writer.write_batch(batch)
    report = DataReport(rows_read=rows, rows_kept=rows)
    return TokenizedData(datasets.Dataset.from_file(path), report, 8, [path], {"synthetic": 1}, "")


def _free_logprobs(model, slots, mesh=None, layout="any"):
    """`refcache._logprob_fn` of a model whose forward costs nothing: -0.1 per target token of each slot."""

    def fn(tokens):
        slot = np.asarray(tokens.target_slots).reshape(-1)
        counts = np.bincount(slot[slot >= 0], minlength=slots)[:slots]
        return -0.1 * counts.astype(np.float32), counts.astype(np.int32)

    return fn


def measure(rows: int, hosts: int, batch_size: int, folder: str) -> dict:
    data = synthetic(rows, folder)
    cfg = DataConfig(batch_size=batch_size, layout="packed", row_length=1024, max_prompt_length=64,
                     max_completion_length=64)  # fmt: skip
    out = {"rows": rows, "hosts": hosts}
    start = time.perf_counter()
    it = DataIterator(data, cfg, ref=None, process_index=0, process_count=hosts, split_length=None)
    out["iterator_s"] = time.perf_counter() - start
    start = time.perf_counter()
    it.rows_digest  # noqa: B018 - computed once, cached
    out["digest_s"] = time.perf_counter() - start
    times = []
    for index in range(8):
        start = time.perf_counter()
        it.batch(it.global_rows(0, index))
        times.append(time.perf_counter() - start)
    out["batch_ms"] = 1000 * statistics.median(times)
    refcache._logprob_fn = _free_logprobs  # the host's work alone: a tiny model, never run
    tiny = ModelConfig(model_type="llama", vocab_size=256, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=2, head_dim=8)  # fmt: skip
    model = from_config(tiny, rngs=nnx.Rngs(0))
    cache = os.path.join(folder, f"ref_{rows}.parquet")
    start = time.perf_counter()
    refcache.precompute_ref(model, data, cfg, cache)
    out["write_cache_s"] = time.perf_counter() - start
    start = time.perf_counter()
    refcache.open_ref_cache(cache, data)
    out["open_cache_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--hosts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--dir", default="/tmp/data_scale")
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # a size, in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.hosts, args.batch_size, args.dir)))
        return
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} cores, datasets {datasets.__version__}, {args.hosts} hosts")
    print(
        "| rows | DataIterator s | digest s | batch ms | write ref cache s | open ref cache s | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        cmd = [sys.executable, __file__, "--one", str(rows), "--hosts", str(args.hosts),
               "--batch-size", str(args.batch_size), "--dir", args.dir]  # fmt: skip
        r = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        cells = (f"{rows:,}", f"{r['iterator_s']:.2f}", f"{r['digest_s']:.2f}", f"{r['batch_ms']:.0f}",
                 f"{r['write_cache_s']:.1f}", f"{r['open_cache_s']:.2f}",
                 f"{r['peak_rss_mb']:.0f}")  # fmt: skip
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
