"""One mixture-of-experts layer's experts, forward + backward: our grouped-matmul kernels against ragged_dot.

Shapes of released models' layers (hidden D, expert width F, experts E, top k) at M tokens, bf16 compute and
float32 weights, as `copg_jax.models.moe.expert_mlps` runs them on one device; the kernels are the platform's
(`moe.grouped_impl`): the Pallas pair on GPU, megablox's weight gradient on TPU.

    JAX_PLATFORMS=cpu python benchmarks/moe.py --aot h200 [--tokens 8192]   # compiled for an H200, no GPU
    JAX_PLATFORMS=cpu python benchmarks/moe.py --aot v5p                    # for a TPU v5p (libtpu), no TPU
    python benchmarks/moe.py [--tokens 8192] [--repeats 5]                  # on a GPU / TPU: timed, checked
    python benchmarks/moe.py --shape 64 32 4 2 --tokens 256 --repeats 1     # CPU smoke (kernels interpreted)

`--aot` compiles for a GPU described to XLA (benchmarks/gpu_targets.py; needs the CUDA plugin, not a GPU) or a
TPU chip described by libtpu (`gpu_targets.tpu_devices`), and reports XLA's memory analysis (temporaries, the
largest buffer) and XLA's FLOP count of the program against the useful work (6 x M x k x 3 x D x F: the
experts a token picks; 1.0 = no expert computed for tokens it does not hold). On a device each case also runs:
milliseconds per forward + backward, TFLOP/s of the useful work and the largest difference from ragged_dot's
gradients (f32 on 1024 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

if "--aot" in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from gpu_targets import TPUS, aot_devices
from hlo_checks import shape_bytes

from copg_jax.models.moe import expert_mlps

LAYERS = {  # D, F, E, k
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4),
}
GIB = 1024**3


def inputs(d, f, e, k, m, dtype, concrete: bool, sharding=None):
    """(x, experts, weights, gate, up, down): random routing of m tokens, or their abstract shapes."""
    shapes = [((m, d), dtype), ((m, k), jnp.int32), ((m, k), dtype)]
    shapes += [((e, d, f), jnp.float32), ((e, d, f), jnp.float32), ((e, f, d), jnp.float32)]
    if not concrete:
        return [jax.ShapeDtypeStruct(s, t, sharding=sharding) for s, t in shapes]
    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((m, e)), axis=1)[:, :k].astype(np.int32)  # k distinct experts a token
    weights = rng.dirichlet(np.ones(k), m)
    arrays = [rng.normal(size=(m, d)), experts, weights]
    arrays += [rng.normal(size=s) * s[1] ** -0.5 for s, _ in shapes[3:]]
    return [jnp.asarray(a, t) for a, (_, t) in zip(arrays, shapes, strict=True)]


def step(impl: str, interpret: bool = False):
    def loss(x, experts, weights, gate, up, down):
        y = expert_mlps(x, experts, weights, gate, up, down, "silu", impl, interpret)
        # squared, not summed: a sum's gradient needs no output, and XLA would drop the down projection's
        # forward matmul (1 of the 9 counted as useful)
        return jnp.square(y.astype(jnp.float32)).sum()

    return jax.jit(jax.grad(loss, (0, 3, 4, 5)))


def largest_buffer(hlo: str) -> int:
    found = re.findall(r"\b(bf16|f32|s32|f16)\[([\d,]+)\]", hlo)
    return max((shape_bytes(*shape) for shape in found), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--aot", choices=["h200", "h100", "v5e", "v5p"], help="compile for this GPU / TPU, without one"
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument(
        "--shape", nargs=4, type=int, metavar=("D", "F", "E", "K"), help="one layer of this shape instead"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    sharding, platform = None, jax.default_backend()
    if args.aot:  # one device of an 8-device host or slice (a v5p slice has at least 8 chips)
        sharding = jax.sharding.SingleDeviceSharding(aot_devices(args.aot, 8)[0])
        platform = "tpu" if args.aot in TPUS else "gpu"
    kernels = "megablox" if platform == "tpu" else "pallas"
    if args.shape:
        LAYERS["custom"] = tuple(args.shape)
        args.layers = ["custom"]
    interpret = not args.aot and jax.default_backend() == "cpu"  # the kernels interpreted: a smoke test
    rows = []
    print(
        f"{'layer':<20}{'impl':<12}{'temp GiB':>10}{'largest GiB':>13}{'FLOPs/useful':>14}{'ms':>9}"
        f"{'TFLOP/s':>9}{'max |d|':>10}"
    )
    for name in args.layers:
        d, f, e, k = LAYERS[name]
        useful = 6.0 * args.tokens * k * 3 * d * f
        grads = {}
        for impl in (kernels, "ragged_dot"):
            row = dict(layer=name, impl=impl, tokens=args.tokens, d=d, f=f, experts=e, k=k)
            fn = step(impl, interpret)
            start = time.perf_counter()
            abstract = inputs(d, f, e, k, args.tokens, jnp.bfloat16, False, sharding)
            compiled = fn.lower(*abstract).compile()
            row["compile_s"] = time.perf_counter() - start
            memory = compiled.memory_analysis()
            row["temp_gib"] = memory.temp_size_in_bytes / GIB
            row["largest_gib"] = largest_buffer(compiled.as_text()) / GIB
            cost = compiled.cost_analysis()  # None from XLA:GPU ahead of time
            cost = (cost[0] if isinstance(cost, list) else cost) or {}
            row["flops_per_useful"] = float(cost.get("flops", float("nan"))) / useful
            if not args.aot:
                concrete = inputs(d, f, e, k, args.tokens, jnp.bfloat16, True)
                jax.block_until_ready(compiled(*concrete))
                start = time.perf_counter()
                for _ in range(args.repeats):
                    out = compiled(*concrete)
                jax.block_until_ready(out)
                row["ms"] = (time.perf_counter() - start) / args.repeats * 1e3
                row["tflops"] = useful / row["ms"] / 1e9
                small = inputs(d, f, e, k, 1024, jnp.float32, True)
                grads[impl] = fn(*small)
            rows.append(row)
            ms, tf = row.get("ms", float("nan")), row.get("tflops", float("nan"))
            diff = ""
            if impl == "ragged_dot" and grads:
                diff = max(
                    float(jnp.abs(a - b).max()) for a, b in zip(grads[kernels], grads[impl], strict=True)
                )
                row["max_grad_diff"] = diff
                diff = f"{diff:.1e}"
            print(
                f"{name:<20}{impl:<12}{row['temp_gib']:>10.2f}{row['largest_gib']:>13.2f}"
                f"{row['flops_per_useful']:>14.2f}{ms:>9.2f}{tf:>9.1f}{diff:>10}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
