"""Compile time of the train step against depth, with the decoder's layers unrolled or scanned.

Lowers and compiles `copg_jax.train.jit_train_step` on abstract arguments (shapes and shardings only: nothing
is allocated, so 80 layers compile on a laptop) for the widths of a `step.py` size at several depths.

    python benchmarks/compile_step.py                         # medium widths, 16 / 32 / 80 layers
    python benchmarks/compile_step.py --size 1b --layers 16 80 --shape 8x4x512
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from step import SIZES, make_config, padded_batch

from copg_jax import train as tr
from copg_jax.run_config import Config
from copg_jax.sharding import make_mesh


def compile_seconds(cfg: Config, shape: str) -> tuple[float, float]:
    """(trace + lower seconds, XLA compile seconds) of the train step for PROMPTSxKxLENGTH batches."""
    prompts, k, length = (int(x) for x in shape.split("x"))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tx = tr.make_optimizer(cfg.optim, 1000, tr.compensates(cfg))
    graphdef, abstract = tr.abstract_model(cfg)
    trained, frozen = tr.split_trainable(abstract)  # (adapters, base) with LoRA
    shardings = tr.state_shardings(trained, tx, mesh)
    state = tr.abstract_state(trained, tx, shardings)
    batch = padded_batch(prompts, k, length, tr.model_config(cfg).vocab_size)
    batch = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct((1, *np.shape(x)), np.asarray(x).dtype, sharding=s),
        batch,
        tr.batch_shardings(mesh),
    )
    step = tr.jit_train_step(graphdef, tx, cfg, shardings, mesh, frozen)
    start = time.perf_counter()
    lowered = step.lower(state, batch, frozen)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return traced, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium", help="widths (layers overridden)")
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 32, 80])
    parser.add_argument("--shape", default="4x2x128", help="PROMPTSxKxLENGTH")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable", "minimal"))
    args = parser.parse_args()
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}; {args.size} widths, {args.shape}")
    print(f"{'layers':>6} {'scan':>5} {'trace+lower':>12} {'compile':>9} {'total':>9}")
    totals = {}
    for scan in (False, True):
        for layers in args.layers:
            overrides = [f"model.config.num_hidden_layers={layers}", f"model.scan_layers={scan}"]
            cfg = make_config(args.size, args.dtype, args.remat, (-1, 1, 1), overrides=overrides)
            traced, compiled = compile_seconds(cfg, args.shape)
            totals[scan, layers] = traced + compiled
            print(f"{layers:>6} {str(scan):>5} {traced:>11.1f}s {compiled:>8.1f}s {traced + compiled:>8.1f}s")
    low, high = min(args.layers), max(args.layers)
    for scan in (False, True):
        ratio = totals[scan, high] / totals[scan, low]
        print(f"scan_layers={scan}: {high} layers take {ratio:.2f}x the time of {low} layers")


if __name__ == "__main__":
    main()
