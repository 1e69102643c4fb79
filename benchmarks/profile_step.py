"""Profiles the jitted CoPG train step by model component, forward and backward, on this machine's devices.

Two measurements, both in one process:

1. A `jax.profiler` trace of the train step (`copg_jax.train.jit_train_step`, built as in `step.py`). Each
   XLA op of the compiled step carries the `jax.named_scope` of the code it came from (the model's parts:
   embed, mask, norm, qkv, rope, attention, o, mlp, head; the step's loss and optimizer) and, through JAX's
   autodiff names, whether it runs in the forward pass, the backward pass (`transpose(...)`) or recomputes a
   checkpointed forward (`rematted_computation`). The table sums the traced op times per component and phase.
   On CPU the ops of one step run on several threads at once, so the sum of op times exceeds the step's wall
   time: read the shares, not the absolute sums.
2. Timed ratios (interleaved calls, medians): the decoder alone (no head, no loss) forward + backward over its
   forward, and the same ratio for a plain JAX stack of the same gated-MLP widths on 2-D activations, the
   machine's reference for what a backward should cost.

    python benchmarks/profile_step.py                          # medium (40M) Llama, 4 x 2 x 128 tokens
    python benchmarks/profile_step.py --size small --shape 8x2x32 --set model.scan_layers=true
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from step import SIZES, make_config, padded_batch

from copg_jax import train as tr
from copg_jax.run_config import Config
from copg_jax.sharding import make_mesh

COMPONENTS = ("embed", "mask", "norm", "qkv", "rope", "attention", "o", "mlp", "head", "loss", "optimizer")
PHASES = ("forward", "backward", "recompute", "update")


def classify(op_name: str) -> tuple[str, str]:
    """(component, phase) of an XLA op from its `op_name` metadata; the innermost known scope wins."""
    scopes = [t for t in re.findall(r"[A-Za-z_]\w*", op_name) if t in COMPONENTS]
    component = scopes[-1] if scopes else "other"
    if component == "optimizer":
        return component, "update"
    if "rematted_computation" in op_name:
        return component, "recompute"
    return component, "backward" if "transpose(" in op_name else "forward"


INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*)")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> "op_name metadata | result shape" of each instruction of a compiled module.

    A fusion is named after the matmul it contains when it has one (XLA:CPU fuses a weight gradient's dot
    with the optimizer's first use of it, and the dot is the cost), else after its root. Control flow (while,
    conditional, call) is left out: its trace events span the ops it runs, which count.
    """
    computations: dict[str, list[tuple[str, str]]] = {}  # computation -> [(opcode, op_name)]
    instructions = []  # (computation, name, shape, opcode, op_name, called computation)
    current = ""
    for line in hlo_text.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        op_name = op_name.group(1) if op_name else ""
        computations.setdefault(current, []).append((opcode, op_name))
        instructions.append((name, shape, opcode, op_name, calls.group(1) if calls else None))
    names = {}
    for name, shape, opcode, op_name, called in instructions:
        if opcode in ("while", "conditional", "call") or not op_name:
            continue
        dots = [n for op, n in computations.get(called, []) if op in ("dot", "convolution") and n]
        names[name] = f"{dots[0] if dots else op_name} | {shape[:60]}"
    return names


def traced_op_times(run, hlo_text: str, repeats: int) -> dict[str, float]:
    """Seconds per call of the traced XLA ops of `hlo_text` (by op_name and shape), over `repeats` calls."""
    names = op_names(hlo_text)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(repeats):
                run()
        (path,) = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
        times: dict[str, float] = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in names:
                        times[names[event.name]] += event.duration_ns * 1e-9 / repeats
    return times


def component_table(times: dict[str, float]) -> dict[tuple[str, str], float]:
    table: dict[tuple[str, str], float] = collections.Counter()
    for op_name, seconds in times.items():
        table[classify(op_name)] += seconds
    return table


def print_table(table: dict[tuple[str, str], float], step: dict[str, float]) -> None:
    total = sum(table.values())
    print(
        f"\nstep: {step['wall'] * 1e3:.0f} ms wall, {step['cpu'] * 1e3:.0f} ms process CPU; traced op time "
        f"{total * 1e3:.0f} ms (summed over threads)"
    )
    print(f"{'component':>10} " + " ".join(f"{p:>10}" for p in PHASES) + f" {'total':>10} {'share':>6}")
    for component in (*COMPONENTS, "other"):
        row = [table.get((component, p), 0.0) for p in PHASES]
        if sum(row):
            cells = " ".join(f"{x * 1e3:>8.1f}ms" for x in row)
            print(f"{component:>10} {cells} {sum(row) * 1e3:>8.1f}ms {sum(row) / total:>6.1%}")
    by_phase = [sum(v for (_, p), v in table.items() if p == phase) for phase in PHASES]
    print(f"{'all':>10} " + " ".join(f"{x * 1e3:>8.1f}ms" for x in by_phase) + f" {total * 1e3:>8.1f}ms")


def interleaved(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds per call of each `fn()` (each warmed up once), calls interleaved to
    share the noise. On a machine shared with other jobs the CPU time of this process is the steadier one."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return {name: {k: float(np.median(v)) for k, v in t.items()} for name, t in times.items()}


def decoder_ratio(cfg: Config, rows: int, length: int, repeats: int) -> dict[str, dict[str, float]]:
    """Medians of the decoder's forward and forward + backward (d sum(hidden) / d params); no head or loss."""
    graphdef, _ = tr.abstract_model(cfg)
    params = tr.init_params(cfg, make_mesh(1, 1, 1, jax.devices()[:1]))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, tr.model_config(cfg).vocab_size, (rows, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
    ones, zeros = jnp.ones_like(ids), jnp.zeros_like(ids)

    def forward(p):
        return jnp.sum(nnx.merge(graphdef, p)(ids, positions, ones, zeros))

    fwd, grad = jax.jit(forward), jax.jit(jax.grad(forward))
    return interleaved({"forward": lambda: fwd(params), "forward+backward": lambda: grad(params)}, repeats)


def reference_ratio(size: str, tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """The same medians for a plain stack x += down(silu(norm(x) gate) * norm(x) up) on [tokens, D] arrays,
    differentiating sum(x²)."""
    d, f, layers = SIZES[size][:3]
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(d, f), (d, f), (f, d)]
    weights = [jax.random.normal(key, (layers, *s)) * 0.02 for key, s in zip(keys, shapes, strict=False)]
    x = jax.random.normal(keys[3], (tokens, d))

    def forward(w, x):
        for gate, up, down in zip(*w, strict=True):
            h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
            x = x + (jax.nn.silu(h @ gate) * (h @ up)) @ down
        # squared: the gradient of sum(x) needs no x, and XLA would drop the last layer's down projection
        return jnp.sum(jnp.square(x))

    fwd, grad = jax.jit(forward), jax.jit(jax.grad(forward))
    calls = {"forward": lambda: fwd(weights, x), "forward+backward": lambda: grad(weights, x)}
    return interleaved(calls, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--shape", default="4x2x128", help="PROMPTSxKxLENGTH of the train step")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.scan_layers=true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=0, help="also list the N costliest ops")
    parser.add_argument("--ratio-shapes", nargs="*", default=["8x128", "32x32"], help="ROWSxLENGTH of part 2")
    args = parser.parse_args()
    prompts, k, length = (int(x) for x in args.shape.split("x"))
    cfg = make_config(args.size, args.dtype, "none", (1, 1, 1), overrides=args.set)
    mesh = make_mesh(1, 1, 1, jax.devices()[:1])
    tx = tr.make_optimizer(cfg.optim, 1000, tr.compensates(cfg))
    graphdef, abstract = tr.abstract_model(cfg)
    abstract_trained, abstract_frozen = tr.split_trainable(abstract)  # (adapters, base) with LoRA
    shardings = tr.state_shardings(abstract_trained, tx, mesh)
    trained, frozen = tr.split_trainable(tr.init_params(cfg, mesh))
    state = tr.init_state(trained, tx, shardings)
    step = tr.jit_train_step(graphdef, tx, cfg, shardings, mesh, abstract_frozen)
    batch = tr.stack_to_device([padded_batch(prompts, k, length, tr.model_config(cfg).vocab_size)], mesh)
    compiled = step.lower(state, batch, frozen).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, frozen)
        jax.block_until_ready(metrics)

    step_times = interleaved({"step": run}, args.repeats)["step"]
    print(
        f"{args.size} Llama ({tr.model_config(cfg).num_params() / 1e6:.1f}M), {args.shape}, {args.dtype}, "
        f"{jax.devices()[0].device_kind}; overrides {args.set or 'none'}"
    )
    times = traced_op_times(run, compiled.as_text(), args.repeats)
    print_table(component_table(times), step_times)
    if args.top:
        print(f"\nthe {args.top} costliest ops (op_name | result shape), summed over identical names:")
        for op_name, seconds in collections.Counter(times).most_common(args.top):
            print(f"{seconds * 1e3:8.1f} ms  {op_name[-140:]}")
    print("\ntimed medians (interleaved), wall / process CPU:")
    for shape in args.ratio_shapes:
        rows, cols = (int(x) for x in shape.split("x"))
        ours = decoder_ratio(cfg, rows, cols, args.repeats)
        ref = reference_ratio(args.size, rows * cols, args.repeats)
        for name, r in (("decoder", ours), ("plain MLP stack", ref)):
            fwd, both = r["forward"], r["forward+backward"]
            print(
                f"  {name:>15} {rows}x{cols}: forward {fwd['wall'] * 1e3:.0f} / {fwd['cpu'] * 1e3:.0f} ms, "
                f"forward+backward {both['wall'] * 1e3:.0f} / {both['cpu'] * 1e3:.0f} ms, ratio "
                f"{both['wall'] / fwd['wall']:.2f} / {both['cpu'] / fwd['cpu']:.2f}"
            )
    print(f"load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
