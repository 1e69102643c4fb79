"""The dtypes a train step sums its gradients in across devices: collective bytes by kind and element type.

A bfloat16-compute model with float32 parameters used to take each parameter's gradient out of its matmul (or
its sum over the tokens, for biases and norm scales) in bfloat16; on a mesh, XLA's partitioner sums the
devices' partial gradients right there, so FSDP's reduce-scatters and data parallelism's all-reduces ran in
bfloat16. `copg_jax.models.mixed` takes them in float32. This compiles the train step of an inline Llama
(`benchmarks/step.py` sizes; bf16 compute, float32 parameters, padded rows) on one mesh of n devices and
prints, from one device's optimised program, the bytes of the results of its all-gathers, reduce-scatters
and all-reduces per element type, and XLA's temporaries: the parameters should be gathered in bfloat16 and
their gradients reduced in float32.

    python benchmarks/grad_reduce.py                                 # 8 fake CPU devices (XLA:CPU)
    JAX_PLATFORMS=cpu python benchmarks/grad_reduce.py --aot h200    # 8 H200s on one host, no GPU needed

XLA:CPU keeps float32 where it likes (no bfloat16 collectives): only the `--aot` program shows what a GPU
runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__" and "--aot" not in sys.argv:  # fake CPU devices, before jax starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from gpu_aot import abstract_step_inputs
from gpu_targets import gpu_devices
from hlo_checks import collective_bytes_by_dtype
from step import Case, make_config, synthetic_batch

from copg_jax import train as tr
from copg_jax.sharding import make_mesh

GIB = 1024**3


def compile_step(size: str, mesh_shape: tuple[int, int, int], case: Case, remat: str, devices) -> dict:
    """The compiled train step's collective GiB per (kind, dtype) and temporaries, on one device."""
    cfg = make_config(size, "bfloat16", remat, mesh_shape, "auto", ["data.layout=padded"])
    mesh = make_mesh(*mesh_shape, devices=devices)
    host = synthetic_batch(case, tr.model_config(cfg).vocab_size)
    graphdef, tx, shardings, state, batch = abstract_step_inputs(cfg, mesh, host)
    compiled = (
        tr.jit_train_step(graphdef, tx, cfg, shardings, mesh).lower(state, batch, tr.NO_FROZEN).compile()
    )
    found = collective_bytes_by_dtype(compiled.as_text())
    return {
        "collective_gib": {
            f"{k} {t}": b / GIB for (k, t), b in sorted(found.items()) if t in ("bf16", "f32")
        },
        "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GIB,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--aot", choices=("h100", "h200"), help="compile for this GPU, 8 of them (no GPU needed)"
    )
    parser.add_argument("--size", default="1b")
    parser.add_argument("--mesh", nargs="+", default=["1x8x1", "8x1x1"], help="data x fsdp x tensor meshes")
    parser.add_argument("--shape", default="16x4x1024", help="PROMPTS x K x LENGTH of one step (padded)")
    parser.add_argument("--remat", default="minimal_attention")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    devices = gpu_devices(args.aot, 8) if args.aot else jax.devices()[:8]
    prompts, k, length = (int(v) for v in args.shape.split("x"))
    case = Case(args.size, "padded", prompts, k, length, "train")
    kind = devices[0].device_kind
    print(f"{args.size}, {args.shape} per step, remat {args.remat}, on 8 x {kind}; GiB per device")
    rows = []
    for spec in args.mesh:
        shape = tuple(int(v) for v in spec.split("x"))
        row = {"mesh": spec, **compile_step(args.size, shape, case, args.remat, devices)}
        rows.append(row)
        cells = ", ".join(f"{name} {gib:.3f}" for name, gib in row["collective_gib"].items())
        print(f"mesh {spec:<7} temp {row['temp_gib']:6.2f} | {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "device": devices[0].device_kind, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
