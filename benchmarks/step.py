"""Times the jitted CoPG train step (warm, median of repeats) for a few model sizes and batch shapes.

Prints a table of step time, tokens/s and MFU, against this machine's measured matmul FLOP/s (CPU) or the
vendor bf16 peak of a known accelerator (GPU/TPU, see copg_jax.metrics.PEAK_FLOPS).

    python benchmarks/step.py                                  # CPU presets, float32
    python benchmarks/step.py --device-kind gpu                # GPU presets, bf16 compute, f32 master weights
    python benchmarks/step.py --sizes 1b --shapes 8x4x1024 --remat full --fsdp 8
    python benchmarks/step.py --sizes medium --shapes 4x2x128 --set model.scan_layers=true
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from copg_jax import train as tr
from copg_jax.batch import ScoredBatch
from copg_jax.config import apply_overrides, from_dict
from copg_jax.data.layout import padded_layout
from copg_jax.metrics import measure_matmul_flops, table_peak_flops
from copg_jax.run_config import Config
from copg_jax.sharding import make_mesh

# Llama-style shapes: (hidden, intermediate, layers, heads, kv_heads, vocab)
SIZES = {
    "tiny": (64, 256, 2, 4, 2, 512),
    "small": (256, 1024, 4, 4, 2, 4096),
    "medium": (512, 2048, 8, 8, 4, 8192),
    "160m": (768, 3072, 12, 12, 4, 32000),
    "1b": (2048, 5632, 16, 16, 8, 32000),
    "3b": (3072, 8192, 28, 24, 8, 128256),
}
PRESETS = {
    "cpu": {"sizes": ["tiny", "small", "medium"], "shapes": ["4x2x128", "8x4x128"], "dtype": "float32"},
    "gpu": {"sizes": ["160m", "1b"], "shapes": ["8x4x512", "16x4x1024"], "dtype": "bfloat16"},
}


def make_config(
    size: str, dtype: str, remat: str, mesh: tuple[int, int, int], overrides: list[str] = ()
) -> Config:
    """The run Config of a benchmark: an inline Llama of `size`, then `key=value` config overrides."""
    d, f, layers, heads, kv, vocab = SIZES[size]
    hf = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 8192,
    }
    base = {
        "model": {"config": hf, "tokenizer": "none", "dtype": dtype, "remat": remat},
        "optim": {"lr": 1e-5, "warmup_steps": 10},
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)),
    }
    return from_dict(Config, apply_overrides(base, list(overrides)))


def synthetic_batch(prompts: int, k: int, length: int, vocab: int, seed: int = 0) -> ScoredBatch:
    """Padded layout, every row full: prompt of length/4 tokens + completion filling the rest."""
    rng = np.random.default_rng(seed)
    prompt_len = max(length // 4, 2)
    examples = [
        (
            rng.integers(1, vocab, prompt_len).astype(np.int32),
            [rng.integers(1, vocab, length - prompt_len).astype(np.int32) for _ in range(k)],
        )
        for _ in range(prompts)
    ]
    return ScoredBatch(
        tokens=padded_layout(examples, k, length),
        rewards=rng.normal(size=(prompts, k)).astype(np.float32),
        completion_mask=np.ones((prompts, k), bool),
        ref_logps=rng.normal(-2.0 * length, 1.0, size=(prompts, k)).astype(np.float32),
        completion_lengths=np.full((prompts, k), length - prompt_len, np.int32),
    )


def bench_one(size: str, shape: str, args, peak: float) -> dict:
    prompts, k, length = (int(x) for x in shape.split("x"))
    cfg = make_config(size, args.dtype, args.remat, (args.data, args.fsdp, args.tensor), args.set)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tx = tr.make_optimizer(cfg.optim, 1000)
    graphdef, abstract = tr.abstract_model(cfg)
    shardings = tr.state_shardings(abstract, tx, mesh)
    state = tr.init_state(tr.init_params(cfg, mesh), tx, shardings, 0)
    step = tr.jit_train_step(graphdef, tx, cfg, shardings, mesh)
    mcfg = tr.model_config(cfg)
    batch = tr.stack_to_device([synthetic_batch(prompts, k, length, mcfg.vocab_size)], mesh)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times, cpu = [], []  # wall and this process's CPU seconds (the steadier one on a shared machine)
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    seconds = float(np.median(times))
    tokens = prompts * k * length
    flops = mcfg.flops_per_token(length) * tokens
    return {
        "size": size,
        "params_m": mcfg.num_params() / 1e6,
        "shape": shape,
        "tokens": tokens,
        "compile_s": compile_s,
        "step_s": seconds,
        "cpu_s": float(np.median(cpu)),
        "tokens_per_s": tokens / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak * jax.device_count()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device-kind", choices=sorted(PRESETS), default="cpu", help="preset sizes/shapes/dtype"
    )
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="model sizes (default: preset)")
    parser.add_argument("--shapes", nargs="+", help="PROMPTSxKxLENGTH batch shapes (default: preset)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: preset)")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable", "minimal"))
    parser.add_argument("--data", type=int, default=-1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.head_remat=full")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s per device (0 = auto)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    preset = PRESETS[args.device_kind]
    args.dtype = args.dtype or preset["dtype"]
    device = jax.devices()[0]
    measured = measure_matmul_flops(8192 if device.platform != "cpu" else 1024, dtype=args.dtype)
    peak = args.peak_flops or table_peak_flops(device.device_kind) or measured
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); compute {args.dtype}")
    print(f"measured {args.dtype} matmul: {measured / 1e12:.3f} TFLOP/s/device; MFU vs {peak / 1e12:.3f}")
    rows = []
    print(f"{'size':>7} {'params':>8} {'BxKxT':>11} {'compile':>8} {'step':>9} {'tokens/s':>10} ", end="")
    print(f"{'TFLOP/s':>8} {'MFU':>6}")
    for size in args.sizes or preset["sizes"]:
        for shape in args.shapes or preset["shapes"]:
            try:
                r = bench_one(size, shape, args, peak)
            except jax.errors.JaxRuntimeError as e:  # one shape out of memory must not lose the table
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                print(f"{size:>7} {'':>8} {shape:>11}  out of device memory (try --remat full)")
                rows.append({"size": size, "shape": shape, "error": "out of memory"})
                continue
            rows.append(r)
            print(
                f"{r['size']:>7} {r['params_m']:>7.1f}M {r['shape']:>11} {r['compile_s']:>7.1f}s "
                f"{r['step_s'] * 1e3:>7.1f}ms {r['tokens_per_s']:>10.0f} "
                f"{r['tflops_per_s']:>8.3f} {r['mfu']:>6.1%}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device.device_kind, "peak_flops": peak, "measured": measured, "rows": rows}, f
            )


if __name__ == "__main__":
    main()
