"""Expert parallelism against FSDP for one mixture-of-experts layer: forward + backward on n devices.

The same layer (`copg_jax.models.moe.MoE`, bf16 compute, float32 weights, `--tokens` per device, random
routing) on two meshes of n devices: `fsdp=n` (every device gathers every expert's weights over fsdp, runs its
own tokens) and `expert=n` (each device holds E / n whole experts; the tokens are all-gathered over the expert
axis and the outputs reduce-scattered back). For each, from the compiled program of one device:

- collective GiB: the bytes of the results of its all-gather / reduce-scatter / all-reduce / all-to-all ops
  (what arrives at a device, up to the (n - 1) / n each collective keeps local);
- temp GiB: XLA's memory analysis of the temporaries (the dropless expert-parallel buffers hold all n
  devices' assignments: n times the rows of one device).

On CPU, XLA runs ragged_dot as a dense matmul over every expert, so only the collectives mean anything there;
`--aot` compiles the GPU program, with the Pallas grouped matmul, or the TPU one (a v5p slice described by
libtpu), with megablox's weight gradient.

    python benchmarks/expert_parallel.py                       # 8 fake CPU devices (XLA:CPU's compiler)
    JAX_PLATFORMS=cpu python benchmarks/expert_parallel.py --aot h200   # 8 H200s on one host, no GPU needed
    JAX_PLATFORMS=cpu python benchmarks/expert_parallel.py --aot v5p    # 8 v5p chips (2 hosts), no TPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__" and "--aot" not in sys.argv:  # fake CPU devices, before jax starts
    count = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "8"
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    )
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from flax import nnx
from gpu_targets import aot_devices
from hlo_checks import collective_bytes
from moe import GIB
from moe import LAYERS as ONE_DEVICE_LAYERS

from copg_jax.models import ModelConfig
from copg_jax.models.hub import param_shardings
from copg_jax.models.moe import MoE
from copg_jax.sharding import logical_sharding, make_mesh

# D, F, E, k: benchmarks/moe.py's layers whose experts 8 devices divide, and Qwen3-235B-A22B's
LAYERS = {
    **{name: ONE_DEVICE_LAYERS[name] for name in ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b")},
    "qwen3-235b-a22b": (4096, 1536, 128, 8),
}


def layer_config(d: int, f: int, e: int, k: int) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3_moe", vocab_size=256, hidden_size=d, intermediate_size=f, num_layers=1,
        num_heads=8, num_kv_heads=8, head_dim=d // 8, num_experts=e, experts_per_token=k,
        expert_intermediate_size=f, norm_topk_prob=True,
    )  # fmt: skip


def compile_layer(cfg: ModelConfig, mesh, tokens: int, seq: int = 1024):
    """The compiled forward + backward (weights and input gradients) of one MoE layer on `mesh`, `tokens` per
    device in rows of `seq`."""
    layer = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32))
    graphdef, state = nnx.split(layer)
    shardings = param_shardings(state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    seq = min(seq, tokens)
    rows = tokens * mesh.size // seq
    x = jax.ShapeDtypeStruct(
        (rows, seq, cfg.hidden_size), jnp.bfloat16, sharding=logical_sharding(mesh, ("batch", "length", None))
    )

    def loss(state, x):
        # squared, not summed: the gradient of a sum needs no forward output, and XLA then drops the
        # forward's combine of the experts' outputs (the psum_scatter a following layer reads)
        return jnp.square(nnx.merge(graphdef, state)(x).astype(jnp.float32)).sum()

    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss, (0, 1))).lower(state, x).compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--aot", choices=["h200", "h100", "v5p"], help="compile for GPUs / TPUs of this kind, without one"
    )
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per device")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--json")
    parser.add_argument("--hlo", help="also write each compiled program's text to HLO.<layer>.<axis>.txt")
    args = parser.parse_args()
    n = args.devices
    devices = aot_devices(args.aot, n) if args.aot else jax.devices()[:n]
    rows = []
    print(f"{n} x {devices[0].device_kind}, {args.tokens} tokens per device, one layer forward + backward")
    print(f"{'layer':<18}{'mesh':<11}{'all-gather':>11}{'red-scat':>10}{'all-red':>9}{'temp GiB':>10}")
    for name in args.layers:
        d, f, e, k = LAYERS[name]
        for axis in ("fsdp", "expert"):
            mesh = make_mesh(1, n if axis == "fsdp" else 1, 1, devices, expert=n if axis == "expert" else 1)
            compiled = compile_layer(layer_config(d, f, e, k), mesh, args.tokens)
            moved = {key: v / GIB for key, v in collective_bytes(compiled.as_text()).items()}
            row = dict(
                layer=name, mesh=f"{axis}={n}", devices=n, device_kind=devices[0].device_kind,
                tokens_per_device=args.tokens, d=d, f=f, experts=e, k=k,
                temp_gib=compiled.memory_analysis().temp_size_in_bytes / GIB,
                **{f"{key}_gib": v for key, v in moved.items()},
            )  # fmt: skip
            rows.append(row)
            if args.hlo:
                with open(f"{args.hlo}.{name}.{axis}.txt", "w") as out:
                    out.write(compiled.as_text())
            print(
                f"{name:<18}{row['mesh']:<11}{moved.get('all-gather', 0):>11.2f}"
                f"{moved.get('reduce-scatter', 0):>10.2f}{moved.get('all-reduce', 0):>9.2f}"
                f"{row['temp_gib']:>10.2f}"
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
