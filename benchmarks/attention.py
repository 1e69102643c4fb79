"""Checks each attention backend against the xla reference, then times it alone, per layout and row length.

Layouts are those of benchmarks/step.py (padded, packed, shared_prefix; K completions, prompts a quarter of
the tokens). `--check-length T` first compares every backend's output and (q, k, v) gradients with the
reference on rows of T tokens (relative error; "ok" under --tolerance). Timings: jitted forward, and forward
+ backward (the vjp of a random cotangent), median of --repeats after a warm-up. FLOPs count the (query,
key) pairs the layout allows (causal, per segment + shared prefix): 4 x pairs x H x Dh forward, 2.5 times
that backward.

    python benchmarks/attention.py                               # CPU: xla vs blockwise, T 256..4096
    python benchmarks/attention.py --backends xla blockwise pallas_gpu cudnn --lengths 2048 8192 \
        --heads 16 --kv-heads 8 --head-dim 128 --dtype bfloat16 --tokens 16384 --check-length 512
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from step import LAYOUTS, Case, prompts_for_tokens, synthetic_batch

from copg_jax.models import attention as attn


def backend_fn(name: str, scale: float, platform: str):
    """(q, k, v, pattern) -> out of a backend; `blockwise:BQxBK` / `pallas_gpu:BQxBK` set block sizes."""
    if ":" in name:
        base, blocks = name.split(":")
        bq, bk = (int(x) for x in blocks.split("x"))
        if base == "blockwise":
            return functools.partial(attn.blockwise_attention, scale=scale, block_q=bq, block_k=bk)
        return functools.partial(
            attn.pallas_gpu_attention, scale=scale, interpret=platform == "cpu", block_q=bq, block_k=bk
        )
    return lambda q, k, v, p: attn.attention(q, k, v, p.replace(backend=name), scale=scale)


def make_inputs(layout: str, length: int, args):
    case = Case("-", layout, prompts_for_tokens(layout, args.tokens, length, args.k), args.k, length, "train")
    tokens = synthetic_batch(case, 100).tokens
    n = tokens.input_ids.shape[0]
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(length), 4)
    q = jax.random.normal(keys[0], (n, length, args.heads, args.head_dim), dtype)
    k = jax.random.normal(keys[1], (n, length, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(keys[2], (n, length, args.kv_heads, args.head_dim), dtype)
    cotangent = jax.random.normal(keys[3], q.shape, dtype)
    ids = (jnp.asarray(x) for x in (tokens.segment_ids, tokens.prefix_ids, tokens.positions))
    pattern = attn.AttentionPattern(*ids, args.window, "auto", layout)  # the trainer passes data.layout too
    pairs = allowed_pairs(tokens)
    return (q, k, v, cotangent, pattern), pairs


def allowed_pairs(tokens) -> int:
    """(query, key) pairs the layout allows: causal inside a segment, plus the whole shared prefix."""
    total = 0
    for seg, pre in zip(tokens.segment_ids, tokens.prefix_ids, strict=True):
        sizes = np.bincount(seg)
        for s in np.unique(seg[seg > 0]):
            n = sizes[s]
            prefixes = pre[seg == s]
            total += int(n) * (int(n) + 1) // 2 + int(n) * int(sizes[prefixes[0]] if prefixes[0] > 0 else 0)
    return total


def forward_and_backward(fn):
    def run(q, k, v, cotangent, pattern):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, pattern), q, k, v)
        return out, *vjp(cotangent)

    return run


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check(names, args, platform, softcap: float | None = None) -> list[dict]:
    """Each backend against xla, outputs and gradients, on every layout (with `softcap`: logits soft-capped,
    Gemma 2's attention)."""
    rows = []
    for layout in args.layouts:
        inputs, _ = make_inputs(layout, args.check_length, args)
        inputs = (*inputs[:4], inputs[4].replace(softcap=softcap))
        scale = args.head_dim**-0.5
        want = jax.jit(forward_and_backward(backend_fn("xla", scale, platform)))(*inputs)
        for name in names:
            try:
                got = jax.jit(forward_and_backward(backend_fn(name, scale, platform)))(*inputs)
                errors = {
                    label: float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                    / (float(jnp.max(jnp.abs(w.astype(jnp.float32)))) + 1e-6)
                    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True)
                }
                ok = all(e < args.tolerance for e in errors.values())
                row = {"backend": name, "layout": layout, "length": args.check_length, "ok": ok, **errors}
                row["softcap"] = softcap
            except Exception as e:  # noqa: BLE001  a backend that fails must not lose the others
                row = {
                    "backend": name,
                    "layout": layout,
                    "length": args.check_length,
                    "softcap": softcap,
                    "ok": False,
                    "error": str(e)[:400],
                }
            rows.append(row)
            detail = row.get("error") or " ".join(f"{k} {row[k]:.1e}" for k in ("out", "dq", "dk", "dv"))
            capped = "" if softcap is None else f" cap {softcap:g}"
            print(
                f"check {name:<22} {layout:<14} T={args.check_length:<6}{capped} "
                f"{'ok ' if row['ok'] else 'BAD'} {detail}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends", nargs="+", help="backend names or pallas_gpu:BQxBK (default: by platform)"
    )
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per call (N x T)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-length", type=int, default=0, help="compare with xla on rows of T first")
    parser.add_argument(
        "--check-softcap", type=float, default=None, help="check again, logits soft-capped at this"
    )
    parser.add_argument("--tolerance", type=float, default=2e-2, help="max relative error of a passing check")
    parser.add_argument("--skip-xla-above", type=int, default=1 << 30, help="time xla only up to this T")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = jax.devices()[0]
    platform = device.platform
    names = args.backends or {
        "cpu": ["xla", "blockwise"],
        "gpu": ["xla", "blockwise", "pallas_gpu", "cudnn"],
    }.get(platform, ["xla", "blockwise", "splash"])
    print(f"device: {device.device_kind} ({platform}); {args.dtype}; H {args.heads} KV {args.kv_heads} "
          f"Dh {args.head_dim}; {args.tokens} tokens per call")  # fmt: skip
    result = {"device": device.device_kind, "args": vars(args), "checks": [], "rows": []}

    def write():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)

    if args.check_length:
        result["checks"] = check([n for n in names if n != "xla"], args, platform)
        if args.check_softcap is not None:
            result["checks"] += check([n for n in names if n != "xla"], args, platform, args.check_softcap)
        write()
    print(
        f"{'backend':<22} {'layout':<14} {'T':>6} {'fwd':>9} {'fwd+bwd':>9} {'TFLOP/s':>8}  (fwd+bwd)",
        flush=True,
    )
    for length in args.lengths:
        for layout in args.layouts:
            inputs, pairs = make_inputs(layout, length, args)
            flops = 4.0 * pairs * args.heads * args.head_dim * 3.5
            for name in names:
                if name == "xla" and length > args.skip_xla_above:
                    continue
                fn = backend_fn(name, args.head_dim**-0.5, platform)
                row = {"backend": name, "layout": layout, "length": length, "pairs": pairs}
                try:
                    q, k, v, cotangent, pattern = inputs
                    forward = jax.jit(fn)
                    row["forward_s"] = timed(forward, q, k, v, pattern, repeats=args.repeats)
                    row["train_s"] = timed(jax.jit(forward_and_backward(fn)), *inputs, repeats=args.repeats)
                    row["tflops_per_s"] = flops / row["train_s"] / 1e12
                    line = f"{row['forward_s'] * 1e3:>7.2f}ms {row['train_s'] * 1e3:>7.2f}ms "
                    line += f"{row['tflops_per_s']:>8.2f}"
                except Exception as e:  # noqa: BLE001  out of memory or a kernel that fails must not lose the table
                    row["error"] = str(e)[:300]
                    line = f"failed: {row['error'][:100]}"
                result["rows"].append(row)
                print(f"{name:<22} {layout:<14} {length:>6} {line}", flush=True)
                write()


if __name__ == "__main__":
    main()
