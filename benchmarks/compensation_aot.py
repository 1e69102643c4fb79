"""Whether the Kahan rounding of bfloat16 weights (`train.compensated_sum`) survives XLA:GPU (an H200).

XLA's GPU compiler removes a float32 -> bfloat16 -> float32 cast pair as a no-op (its SimplifyFPConversions
pass): rounding by such a pair leaves the residual 0 and the compensation silently off. This compiles the
update both ways for a described GPU (no GPU needed, as `gpu_aot.py`) and prints, for each, the
reduce-precision ops left in the optimised program and whether it computes the residual as x - x (the
rounding gone: the update is the unrounded sum, the residual 0); `--hlo` prints the optimised programs.

    pip install -e ".[gpu]"
    JAX_PLATFORMS=cpu python benchmarks/compensation_aot.py [--chip h200] [--hlo]
"""

from __future__ import annotations

import argparse
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from gpu_targets import GPUS, gpu_devices
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from copg_jax import train as tr


def cast_pair(u, r, p):
    """The rounding by a cast there and back (the first version of `compensated_sum`)."""
    exact = p.astype(jnp.float32) + (u.astype(jnp.float32) + r.astype(jnp.float32))
    rounded = exact.astype(p.dtype).astype(jnp.float32)
    return rounded - p.astype(jnp.float32), (exact - rounded).astype(r.dtype)


def shipped(u, r, p):
    """`compensated_sum` as it is."""
    out, state = tr.compensated_sum().update({"w": u}, tr.CompensationState({"w": r}), {"w": p})
    return out["w"], state.residual["w"]


def optimised(fn, devices) -> str:
    """The optimised HLO text of `fn` (update, residual of 4096 weights) compiled for `devices`."""
    sharding = NamedSharding(Mesh(np.asarray(devices), ("x",)), PartitionSpec())
    types = (jnp.float32, jnp.bfloat16, jnp.bfloat16)
    args = [jax.ShapeDtypeStruct((4096,), t, sharding=sharding) for t in types]
    return jax.jit(fn).lower(*args).compile().as_text()


def findings(text: str) -> tuple[int, bool]:
    """(reduce-precision ops in the optimised program, whether it computes a residual as x - x: the rounding
    removed, the residual 0)."""
    lines = text.splitlines()
    zero = any(re.search(r"subtract\((%[\w.\-]+), \1\)", line) for line in lines)
    return sum(" reduce-precision(" in line for line in lines), zero


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", default="h200", choices=sorted(GPUS))
    parser.add_argument("--hlo", action="store_true", help="print the optimised programs")
    args = parser.parse_args()
    devices = gpu_devices(args.chip, 1)
    print(f"| rounding ({args.chip}) | reduce-precision ops | residual |")
    print("|---|---|---|")
    for name, fn in (
        ("f32 -> bf16 -> f32 cast pair", cast_pair),
        ("lax.reduce_precision (shipped)", shipped),
    ):
        text = optimised(fn, devices)
        reduce, zero = findings(text)
        residual = "x - x: always 0, compensation off" if zero else "exact - rounded"
        print(f"| {name} | {reduce} | {residual} |")
        if args.hlo:
            print(text)


if __name__ == "__main__":
    main()
