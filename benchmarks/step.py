"""Times the jitted CoPG train step and the reference forward for model sizes, token layouts and row lengths.

A configuration is P prompts x K completions laid out in rows of T tokens (every row full, prompts a quarter
of the tokens, random token ids):

    padded          a row per completion: prompt T/4 + completion 3T/4                     P*K rows
    packed          four sequences of T/4 per row: prompt T/16 + completion 3T/16           P*K/4 rows
    shared_prefix   a row per prompt: prompt T/4, then its K completions of ~3T/(4K) each   P rows

`--shapes PxKxT` fixes P, K, T; `--lengths T ... --tokens N` instead takes P so that every layout has N
tokens per step (K = --k). `--cases NAME=MODE,LAYOUT,PxKxT[,PROMPT+COMPLETION]` adds named cases with fixed
sequence lengths (the TRL comparison; T = 0: the smallest multiple of 128 holding one sequence, or one prompt
and its K completions for shared_prefix).

Columns: step time (median of --repeats after one warm-up), tokens/s (non-padding tokens), MFU against the
datasheet peak (copg_jax.metrics.PEAK_FLOPS) and against a measured matmul rate, and the compiled step's
memory (arguments + outputs + temporaries - donated, from XLA's memory_analysis, before anything runs). The
JSON rows also hold the compiled program's [T, T] buffers and custom-call kernels (benchmarks/hlo_checks.py).
Model FLOPs are `ModelConfig.step_flops` (per token, context = the tokens of its segment plus its shared
prefix, `batch.attention_context`: 6 x matmul params + 12 x H x Dh x context summed over layers, each capped
at its sliding window; a third of that for `--mode forward`, the `copg precompute-ref` pass: jitted
sequence_logprobs, no gradient), as training logs them in perf/mfu. Remat recomputation is not counted.

    python benchmarks/step.py                                   # CPU presets, float32
    python benchmarks/step.py --device-kind gpu                 # GPU presets: bf16 compute, f32 master
    python benchmarks/step.py --sizes 1b --lengths 2048 8192 --tokens 65536 --layouts packed shared_prefix \
        --remat minimal_attention --mode train forward --compile-threads 4 --json out.json
    python benchmarks/step.py --sizes medium --shapes 4x2x128 --set model.scan_layers=true
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hlo_checks import custom_calls, model_square_buffers

from copg_jax import train as tr
from copg_jax.batch import ScoredBatch, TokenBatch
from copg_jax.config import apply_overrides, from_dict
from copg_jax.data.layout import item_lengths, layout_tokens, rows_needed
from copg_jax.logprobs import sequence_logprobs
from copg_jax.metrics import measure_matmul_flops, table_peak_flops
from copg_jax.models.attention import BACKENDS
from copg_jax.models.decoder import REMAT_POLICIES
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
LAYOUTS = ("padded", "packed", "shared_prefix")


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed configuration."""

    size: str
    layout: str
    prompts: int
    k: int
    length: int
    mode: str  # "train" | "forward"
    prompt_len: int = 0  # 0: from the layout rule of the module docstring
    completion_len: int = 0
    name: str = ""

    @property
    def label(self) -> str:
        fixed = f" {self.prompt_len}+{self.completion_len}" if self.prompt_len else ""
        name = f"{self.name}: " if self.name else ""
        return f"{name}{self.size} {self.mode} {self.layout} {self.prompts}x{self.k}x{self.length}{fixed}"


def make_config(
    size: str,
    dtype: str,
    remat: str,
    mesh: tuple[int, int, int],
    attention: str = "auto",
    overrides: list[str] = (),
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
    model = {"config": hf, "tokenizer": "none", "dtype": dtype, "remat": remat, "attention": attention}
    base = {
        "model": model,
        "optim": {"lr": 1e-5, "warmup_steps": 10},
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)),
    }
    return from_dict(Config, apply_overrides(base, list(overrides)))


def unit_lengths(layout: str, length: int, k: int) -> tuple[int, int]:
    """(prompt, completion) token counts of the module docstring's rule for rows of `length`."""
    if layout == "padded":
        return length // 4, length - length // 4
    if layout == "packed":
        return length // 16, length // 4 - length // 16
    prompt = length // 4
    return prompt, (length - prompt + 1) // k - 1  # (prompt - 1) + K x (1 + completion) tokens fill the row


def prompts_for_tokens(layout: str, tokens: int, length: int, k: int) -> int:
    """P such that `layout` holds `tokens` tokens in rows of `length` (module docstring)."""
    rows = max(tokens // length, 1)
    return {"padded": max(rows // k, 1), "packed": max(4 * rows // k, 1), "shared_prefix": rows}[layout]


def fitting_length(layout: str, prompt_len: int, completion_len: int, k: int) -> int:
    """Smallest multiple of 128 holding one sequence (one prompt + its K completions for shared_prefix)."""
    unit = item_lengths([(np.ones(prompt_len), [np.ones(completion_len)] * k)], layout, split_length=None)
    return -(-max(unit) // 128) * 128


def synthetic_batch(case: Case, vocab: int, seed: int = 0) -> ScoredBatch:
    """The case's prompts and completions (random ids in [1, vocab)) in its layout."""
    rng = np.random.default_rng(seed)
    p, c = (
        (case.prompt_len, case.completion_len)
        if case.prompt_len
        else unit_lengths(case.layout, case.length, case.k)
    )
    examples = [
        (
            rng.integers(1, vocab, p).astype(np.int32),
            [rng.integers(1, vocab, c).astype(np.int32) for _ in range(case.k)],
        )
        for _ in range(case.prompts)
    ]
    # the Llama shape: no LongRoPE split (split_length)
    lengths = item_lengths(examples, case.layout, split_length=None)
    rows = None if case.layout == "padded" else rows_needed(lengths, case.length)
    tokens = layout_tokens(case.layout, examples, case.k, case.length, rows, split_length=None)
    shape = (case.prompts, case.k)
    return ScoredBatch(
        tokens=tokens,
        rewards=rng.normal(size=shape).astype(np.float32),
        completion_mask=np.ones(shape, bool),
        ref_logps=rng.normal(-2.0 * c, 1.0, size=shape).astype(np.float32),
        completion_lengths=np.full(shape, c, np.int32),
    )


def padded_batch(prompts: int, k: int, length: int, vocab: int) -> ScoredBatch:
    """P prompts x K completions, a row each: prompt length // 4 + completion (`synthetic_batch`, padded)."""
    return synthetic_batch(Case("", "padded", prompts, k, length, "train"), vocab)


def model_flops(cfg, mcfg, tokens: TokenBatch, mode: str) -> float:
    """Model FLOPs of a train step or a forward pass over `tokens` (`train.model_flops`: the count training
    logs as perf/mfu, LoRA's included)."""
    return float(tr.model_flops(cfg, mcfg, tokens, mode))


def compiled_bytes(compiled) -> int:
    """Arguments + outputs + temporaries - donated (aliased) bytes of a compiled executable."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def reference_forward(graphdef, dtype: str, num_slots: int, layout: str):
    """The `copg precompute-ref` pass as (params, tokens) -> [num_slots] summed completion log-probs: params
    cast to the compute `dtype`, rows laid out as `layout`, no gradient."""
    dtype = jnp.dtype(dtype)

    def run(params, tokens):
        params = jax.tree.map(
            lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
        )
        return sequence_logprobs(nnx.merge(graphdef, params), tokens, num_slots, layout=layout)[1]

    return run


class Bench:
    """Model state of one size, kept across its cases (the donated train step hands it back each time)."""

    def __init__(self, size: str, args):
        self.size, self.args = size, args
        self.cfg = make_config(
            size, args.dtype, args.remat, (args.data, args.fsdp, args.tensor), args.attention, args.set
        )
        self.mesh = make_mesh(self.cfg.mesh.data, self.cfg.mesh.fsdp, self.cfg.mesh.tensor)
        self.mcfg = tr.model_config(self.cfg)
        self.tx = tr.make_optimizer(self.cfg.optim, 1000, tr.compensates(self.cfg))
        self.graphdef, abstract = tr.abstract_model(self.cfg)
        abstract_trained, abstract_frozen = tr.split_trainable(abstract)  # (adapters, base) with LoRA
        self.shardings = tr.state_shardings(abstract_trained, self.tx, self.mesh)
        trained, self.frozen = tr.split_trainable(tr.init_params(self.cfg, self.mesh))
        self.state = tr.init_state(trained, self.tx, self.shardings)
        self.abstract_frozen = abstract_frozen
        self.train_steps = {}

    def train_step(self, layout: str):
        """The jitted train step of a run whose data.layout is `layout` (the attention kernels follow it)."""
        if layout not in self.train_steps:
            cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, layout=layout))
            self.train_steps[layout] = tr.jit_train_step(
                self.graphdef, self.tx, cfg, self.shardings, self.mesh, self.abstract_frozen
            )
        return self.train_steps[layout]

    def forward_fn(self, num_slots: int, layout: str):
        """The `copg precompute-ref` pass, jitted (`reference_forward`)."""
        return jax.jit(reference_forward(self.graphdef, self.cfg.model.dtype, num_slots, layout))

    def compile(self, case: Case):
        """(compiled executable, its device arguments, the host batch)."""
        host = synthetic_batch(case, self.mcfg.vocab_size)
        batch = tr.stack_to_device([host], self.mesh)
        with jax.set_mesh(self.mesh):
            if case.mode == "train":
                step = self.train_step(case.layout)
                return step.lower(self.state, batch, self.frozen).compile(), batch, host
            tokens = jax.tree.map(lambda x: x[0], batch.tokens)
            fn = self.forward_fn(case.prompts * case.k, case.layout)
            return fn.lower(self.params(), tokens).compile(), tokens, host

    def params(self) -> nnx.State:
        """The whole model's params: the state's and (LoRA) the frozen base."""
        return nnx.merge_state(self.frozen, self.state.params)

    def run(self, case: Case, compiled, device_args, host, peaks: tuple[float, float]) -> dict:
        limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
        needed = compiled_bytes(compiled)
        row = {
            "name": case.name,
            "size": self.size,
            "layout": case.layout,
            "mode": case.mode,
            "shape": f"{case.prompts}x{case.k}x{case.length}",
        }
        row.update(prompt_len=case.prompt_len, completion_len=case.completion_len, remat=self.args.remat)
        row.update(
            attention=self.args.attention, rows=int(host.tokens.input_ids.shape[0]), memory_gib=needed / 2**30
        )
        hlo = compiled.as_text() or ""
        row["square"] = model_square_buffers(hlo, case.length, self.mcfg)  # [T, T] buffers
        row["kernels"] = custom_calls(hlo)
        if limit and needed > limit:
            return {**row, "error": f"out of memory: needs {needed / 2**30:.1f} GiB of {limit / 2**30:.1f}"}
        if self.args.compile_only:
            return row

        def once():
            start, start_cpu = time.perf_counter(), time.process_time()
            if case.mode == "train":
                self.state, metrics = compiled(self.state, device_args, self.frozen)
            else:
                metrics = compiled(self.params(), device_args)
            jax.block_until_ready(metrics)
            return time.perf_counter() - start, time.process_time() - start_cpu

        once()  # warm-up
        # wall time, and this process's CPU seconds (the steadier figure on a shared CPU machine)
        seconds, cpu_seconds = np.median([once() for _ in range(self.args.repeats)], axis=0).tolist()
        tokens = int((host.tokens.segment_ids > 0).sum())
        flops = model_flops(self.cfg, self.mcfg, host.tokens, case.mode)
        devices = jax.device_count()
        return {
            **row,
            "params_m": self.mcfg.num_params() / 1e6,
            "tokens": tokens,
            "step_s": seconds,
            "cpu_s": cpu_seconds,
            "tokens_per_s": tokens / seconds,
            "prompts_per_s": case.prompts / seconds,
            "tflops_per_s": flops / seconds / 1e12,
            "mfu": flops / seconds / (peaks[0] * devices),
            "mfu_measured": flops / seconds / (peaks[1] * devices),
        }


def bench_padded(size: str, prompts: int, k: int, length: int, args) -> dict:
    """One padded train case (P x K x T) through `Bench`: its row plus `compile_s`. `args` as `main`'s."""
    bench, case = Bench(size, args), Case(size, "padded", prompts, k, length, "train")
    start = time.perf_counter()
    compiled, device_args, host = bench.compile(case)
    compile_s = time.perf_counter() - start
    return {**bench.run(case, compiled, device_args, host, (1.0, 1.0)), "compile_s": compile_s}


def named_case(spec: str, size: str) -> Case:
    """A case from "NAME=MODE,LAYOUT,PxKxT[,PROMPT+COMPLETION]"."""
    name, _, rest = spec.partition("=")
    mode, layout, shape, *fixed = rest.split(",")
    p, k, t = (int(x) for x in shape.split("x"))
    prompt_len, completion_len = (int(x) for x in fixed[0].split("+")) if fixed else (0, 0)
    if prompt_len and not t:
        t = fitting_length(layout, prompt_len, completion_len, k)
    return Case(size, layout, p, k, t, mode, prompt_len, completion_len, name)


def cases_of(args, size: str) -> list[Case]:
    """The named --cases first, then --mode x --layouts x (--lengths or --shapes, default the preset's)."""
    cases = [named_case(spec, size) for spec in args.cases]
    if args.cases and not (args.lengths or args.shapes):
        return cases
    for mode in args.mode:
        for layout in args.layouts:
            if args.lengths:
                for t in args.lengths:
                    p = prompts_for_tokens(layout, args.tokens, t, args.k)
                    cases.append(Case(size, layout, p, args.k, t, mode))
            else:
                for shape in args.shapes or PRESETS[args.device_kind]["shapes"]:
                    p, k, t = (int(x) for x in shape.split("x"))
                    cases.append(Case(size, layout, p, k, t, mode))
    return cases


def compiled_in_chunks(bench: Bench, cases: list[Case], threads: int):
    """Yields (case, compiled, device args, host batch, compile seconds) in order, compiling `threads` cases
    at a time (Python lowers one at a time, XLA compiles them in parallel) and running nothing meanwhile, so
    that compilation never shares the device with a timed step, and results stream out chunk by chunk."""

    def one(case):
        start = time.perf_counter()
        try:
            return case, *bench.compile(case), time.perf_counter() - start
        except Exception as e:  # noqa: BLE001  a case that cannot compile must not lose the table
            return case, e, None, None, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
        for i in range(0, len(cases), max(threads, 1)):
            yield from list(pool.map(one, cases[i : i + max(threads, 1)]))


HEADER = (
    f"{'case':<44} {'compile':>7} {'step':>9} {'tokens/s':>10} {'prompts/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
)
HEADER += f"{'MFU(m)':>6} {'memory':>9}"


def format_row(label: str, r: dict) -> str:
    if "error" in r:
        return f"{label:<44} {r.get('compile_s', 0):>6.1f}s  {r['error']}"
    if "step_s" not in r:  # --compile-only
        return f"{label:<44} {r['compile_s']:>6.1f}s {'':>58} {r['memory_gib']:>7.3f}Gi"
    return (
        f"{label:<44} {r['compile_s']:>6.1f}s {r['step_s'] * 1e3:>7.1f}ms {r['tokens_per_s']:>10.0f} "
        f"{r['prompts_per_s']:>9.2f} {r['tflops_per_s']:>8.2f} {r['mfu']:>6.1%} {r['mfu_measured']:>6.1%} "
        f"{r['memory_gib']:>7.2f}Gi"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device-kind", choices=sorted(PRESETS), default="cpu", help="preset sizes/shapes/dtype"
    )
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="model sizes (default: preset)")
    parser.add_argument("--shapes", nargs="+", help="PROMPTSxKxLENGTH batch shapes (default: preset)")
    parser.add_argument("--lengths", nargs="+", type=int, help="row lengths T; P from --tokens per step")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per step with --lengths")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt with --lengths")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=[],
        help="named cases NAME=MODE,LAYOUT,PxKxT[,PROMPT+COMPLETION], run first",
    )
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["padded"])
    parser.add_argument("--mode", nargs="+", choices=("train", "forward"), default=["train"])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: preset)")
    parser.add_argument("--remat", default="none", choices=("none", *REMAT_POLICIES))
    parser.add_argument("--attention", default="auto", choices=BACKENDS)
    parser.add_argument("--data", type=int, default=-1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.head_remat=full")
    parser.add_argument("--compile-threads", type=int, default=1, help="compile this many cases at a time")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s per device (0 = auto)")
    parser.add_argument("--compile-only", action="store_true", help="report compiled memory, run nothing")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    preset = PRESETS[args.device_kind]
    args.dtype = args.dtype or preset["dtype"]
    device = jax.devices()[0]
    measured = measure_matmul_flops(8192 if device.platform != "cpu" else 1024, dtype=args.dtype)
    peak = args.peak_flops or table_peak_flops(device.device_kind) or measured
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); compute {args.dtype}; "
          f"remat {args.remat}; attention {args.attention}")  # fmt: skip
    print(
        f"measured {args.dtype} matmul: {measured / 1e12:.3f} TFLOP/s/device; MFU vs {peak / 1e12:.3f} "
        "and vs measured"
    )
    print(HEADER, flush=True)
    rows = []

    def write():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"device": device.device_kind, "peak_flops": peak, "measured": measured, "rows": rows}, f
                )

    for size in args.sizes or preset["sizes"]:
        bench = Bench(size, args)
        cases = cases_of(args, size)
        for case, compiled, device_args, host, compile_s in compiled_in_chunks(
            bench, cases, args.compile_threads
        ):
            if isinstance(compiled, Exception):
                r = {
                    "name": case.name,
                    "size": size,
                    "layout": case.layout,
                    "mode": case.mode,
                    "error": f"{type(compiled).__name__}: {compiled}"[:300],
                }
            else:
                try:
                    r = bench.run(case, compiled, device_args, host, (peak, measured))
                except jax.errors.JaxRuntimeError as e:  # one case out of memory must not lose the table
                    if "RESOURCE_EXHAUSTED" not in str(e):
                        raise
                    r = {
                        "size": size,
                        "layout": case.layout,
                        "mode": case.mode,
                        "error": "out of device memory",
                    }
                    bench = Bench(size, args)  # the donated state is gone
            r["compile_s"] = compile_s
            rows.append(r)
            print(format_row(case.label, r), flush=True)
            write()
        del bench
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"process peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    write()


if __name__ == "__main__":
    main()
