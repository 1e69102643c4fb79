"""The 1B train step and reference forward compiled by XLA:GPU for an H200, on a machine without a GPU.

JAX describes GPUs it does not have (`jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=...)`, the GPU's `GpuTargetConfig`: SM count, shared memory, compute capability, ...) and
compiles for them ahead of time: the same XLA:GPU pipeline as on the machine (fusion, scheduling, buffer
assignment, Triton kernels to PTX and SASS), but no autotuning (default tile configs) and nothing run. From
each compiled program this reports, per case (attention backend x layout x row length T x mode):

    memory   XLA's memory analysis: arguments + outputs - donated + temporaries, against the chip's HBM
    [T,T]    buffers of the optimised HLO with a dimension T and another a multiple of T (masks, scores,
             probabilities; hlo_checks.square_buffers): a flash kernel leaves none; the `xla` reference
             has them, so the check can fail
    kernels  custom calls in the program: Triton (our Pallas kernels, compiled to SASS) and cuDNN fMHA
    compile  seconds of this CPU

    pip install -e ".[gpu]"     # jax[cuda12]: the CUDA plugin and libraries at jax's version
    JAX_PLATFORMS=cpu python benchmarks/gpu_aot.py [--lengths 2048 8192] [--tokens 65536]
        [--backends pallas_gpu cudnn blockwise xla] [--layouts packed shared_prefix padded]
        [--mode train forward] [--remat minimal_attention] [--json OUT]

The CUDA plugin and its libraries (cuDNN, ptxas) are needed, not a GPU; `JAX_PLATFORMS=cpu` keeps JAX from
looking for one. Speed is not measured here (benchmarks/gpu_run.sh on the device does that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from gpu_targets import GPUS, gpu_devices
from hlo_checks import custom_calls, describe, model_square_buffers
from step import (
    LAYOUTS,
    Case,
    compiled_bytes,
    make_config,
    model_flops,
    prompts_for_tokens,
    reference_forward,
    synthetic_batch,
)

from copg_jax import train as tr
from copg_jax.batch import ScoredBatch
from copg_jax.models.attention import BACKENDS
from copg_jax.models.decoder import REMAT_POLICIES
from copg_jax.sharding import logical_sharding, make_mesh, on_mesh

GIB = 1024**3


def abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_step_inputs(cfg, mesh, host: ScoredBatch):
    """What `tr.jit_train_step` of `cfg` on `mesh` is lowered with, nothing allocated: (graphdef, optimizer,
    state shardings, abstract TrainState, abstract batch of one microbatch: `host`'s leaves as [1, ...])."""
    tx = tr.make_optimizer(cfg.optim, 1000, tr.compensates(cfg))
    graphdef, params = tr.abstract_model(cfg)
    shardings = tr.state_shardings(params, tx, mesh)
    state = tr.abstract_state(params, tx, shardings)
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), host)
    return graphdef, tx, shardings, state, abstract(stacked, tr.batch_shardings(mesh))


def compile_case(case: Case, backend: str, args, devices) -> dict:
    """Compiles one case for the described GPU and reports the module docstring's columns."""
    overrides = [f"data.layout={case.layout}", *args.set]  # the attention kernels follow the data layout
    cfg = make_config(case.size, "bfloat16", args.remat, (1, 1, 1), backend, overrides)
    mesh = make_mesh(1, 1, 1, devices=devices)
    mcfg = tr.model_config(cfg)
    host = synthetic_batch(case, mcfg.vocab_size)
    graphdef, tx, shardings, state, batch = abstract_step_inputs(cfg, mesh, host)
    start = time.perf_counter()
    if case.mode == "train":
        lowered = tr.jit_train_step(graphdef, tx, cfg, shardings, mesh).lower(state, batch, tr.NO_FROZEN)
    else:
        run = reference_forward(graphdef, cfg.model.dtype, case.prompts * case.k, cfg.data.layout)
        forward = jax.jit(on_mesh(run, mesh))
        rows = logical_sharding(mesh, ("batch", "length"))
        tokens = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows), host.tokens)
        lowered = forward.lower(state.params, tokens)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    mem = compiled.memory_analysis()
    return {
        "backend": backend,
        "layout": case.layout,
        "length": case.length,
        "mode": case.mode,
        "shape": f"{case.prompts}x{case.k}x{case.length}",
        "rows": int(host.tokens.input_ids.shape[0]),
        "tokens": int((host.tokens.segment_ids > 0).sum()),
        "model_tflop": model_flops(cfg, mcfg, host.tokens, case.mode) / 1e12,
        "argument_gib": mem.argument_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "total_gib": compiled_bytes(compiled) / GIB,
        "square": model_square_buffers(hlo, case.length, mcfg),
        "custom_calls": custom_calls(hlo),
        "compile_s": seconds,
    }


def format_row(r: dict) -> str:
    kernels = ", ".join(f"{k} x{n}" for k, n in r["custom_calls"].items()) or "none"
    return (
        f"{r['backend']:<11} {r['mode']:<7} {r['layout']:<14} {r['shape']:<13} {r['total_gib']:>9.2f} "
        f"{r['temp_gib']:>9.2f} {r['compile_s']:>7.1f}s  {describe(r['square'])} / {kernels}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", choices=sorted(GPUS), default="h200")
    parser.add_argument("--size", default="1b")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per step")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["pallas_gpu", "cudnn", "xla"])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--mode", nargs="+", choices=("train", "forward"), default=["train"])
    parser.add_argument("--remat", default="minimal_attention", choices=("none", *REMAT_POLICIES))
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.head_remat=full")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    chip = GPUS[args.chip]
    devices = gpu_devices(args.chip)
    print(f"compiled for: {devices[0].device_kind} (deviceless, jax {jax.__version__}); remat {args.remat}; "
          f"HBM {chip['hbm_bytes'] / GIB:.1f} GiB")  # fmt: skip
    header = f"{'backend':<11} {'mode':<7} {'layout':<14} {'P x K x T':<13} {'total GiB':>9} {'temp GiB':>9}"
    print(f"{header} {'compile':>8}  [T,T] buffers / kernels", flush=True)
    rows = []
    for mode in args.mode:
        for length in args.lengths:
            for layout in args.layouts:
                prompts = prompts_for_tokens(layout, args.tokens, length, args.k)
                case = Case(args.size, layout, prompts, args.k, length, mode)
                for backend in args.backends:
                    try:
                        r = compile_case(case, backend, args, devices)
                    except Exception as e:  # one failing case must not lose the table
                        r = {"backend": backend, "layout": layout, "length": length, "mode": mode,
                             "error": f"{type(e).__name__}: {e}"[:400]}  # fmt: skip
                        print(f"{backend:<11} {mode:<7} {layout:<14} T={length}: {r['error']}", flush=True)
                        rows.append(r)
                        continue
                    rows.append(r)
                    print(format_row(r), flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump({"chip": chip["name"], "jax": jax.__version__, "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
