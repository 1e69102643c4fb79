"""Does a run config's train step fit its accelerators? Checked on CPU, without accelerators or weights.

For each config the train step is built abstractly (`copg_jax.train`: abstract_model, state_shardings,
abstract_state, jit_train_step; ShapeDtypeStruct state and batch, nothing allocated) on a mesh of fake CPU
devices of the config's size (`--xla_force_host_platform_device_count`, one subprocess per config, since the
flag must be set before JAX starts), compiled ahead of time, and its per-device memory printed against the
target chip's HBM: parameter and optimizer-state shards (from the shardings), and XLA's memory analysis of the
compiled per-device program (arguments, outputs, donated aliases, temporaries = activations, gradients,
gathered weights). The batch is the worst case the data settings allow: every prompt and completion at its
maximum length, laid out by the trainer's own DataIterator.

The model comes from an HF config.json (`--hf-config`; the shipped large configs' `model.path` folders are
not here, so configs/hf/ holds their published config.json values), or from the config's `model.config`.

    python benchmarks/plan_check.py [--backend tpu]         # both shipped large configs
    python benchmarks/plan_check.py CONFIG [--hf-config X.json] [--chip NAME | --hbm-gib G]
        [--processes P] [--backend cpu|tpu|gpu] [--json OUT] [key=value ...]   # overrides as for `copg train`
    python benchmarks/plan_check.py --lora-figure [--backend gpu]   # a 7B model on one H200: full vs LoRA

Backends. `cpu` (default, no extra package): XLA:CPU on fake devices. Its memory analysis is of the
SPMD-partitioned program one device runs (per device: its arguments are exactly that device's shards, see
tests/test_plan_check.py), so the parameter / optimizer / batch figures are exact; but its temporaries are not
an estimate of accelerator memory: XLA:CPU does not keep remat's recomputation apart (a 2-layer Qwen2.5-7B
step had 127 GiB of temporaries with remat=full and 106 GiB with none). `tpu` (`pip install -e .[tpu]`, no TPU
needed): XLA:TPU compiles for a TPU slice described by libtpu (`jax.experimental.topologies`) with the same
device count: the target's own compiler for TPU targets, which refuses a program over its HBM
(RESOURCE_EXHAUSTED, reported with the amount it wanted); for a GPU target, a v5p slice (95 GiB per chip)
stands in as an accelerator compiler and the total is compared with the GPU's HBM. `gpu` (`pip install -e
.[gpu]`, no GPU needed; run with JAX_PLATFORMS=cpu): XLA:GPU compiles for the GPU target's own description
(benchmarks/gpu_targets.py: H100, H200), the right compiler for GPU targets. On the CPU backend the
verdict is "fits" only when even XLA:CPU's total fits, "does not fit" only when the exact state shards
(params, gradients, optimizer) do not, and "undecided" otherwise. Exit status 1 when a config does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gpu_targets import gpu_devices, tpu_devices

from copg_jax import train as tr
from copg_jax.batch import ScoredBatch, TokenBatch
from copg_jax.data.layout import bucket_length, item_lengths
from copg_jax.data.pipeline import DataIterator, batch_shards
from copg_jax.data.tokenize import DataReport, TokenizedData
from copg_jax.models import param_shardings
from copg_jax.run_config import Config, load_config
from copg_jax.sharding import logical_to_spec

GIB = 1024**3
REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Chip:
    """An accelerator: HBM per chip, chips one process drives (one process per host on TPU), and the TPU
    generation whose compiler `--backend tpu` uses (the chip's own, or for a GPU a TPU with more HBM)."""

    name: str
    hbm_bytes: int
    devices_per_process: int
    tpu: str = "v5p"
    gpu: str = ""  # the gpu_targets.GPUS entry `--backend gpu` compiles for


CHIPS = {
    "tpu-v5e": Chip("TPU v5e", 16 * GIB, 4, "v5e"),  # 16 GiB HBM2 per chip, 4 chips per v5litepod host
    # 80 GB HBM3: 81559 MiB per nvidia-smi, ~79 GiB free to CUDA; launch/slurm_gpu.sbatch: a process per GPU
    "h100": Chip("H100 80GB", 79 * GIB, 1, "v5p", "h100"),
    "h200": Chip("H200 141GB", 139 * GIB, 1, "v5p", "h200"),  # 141 GB HBM3e, ~139 GiB visible to CUDA
}

# The shipped large configs: (run config, HF config.json of the model it names, target chip).
SHIPPED = (
    ("configs/llama3_8b_tpu_v5e_256.yaml", "configs/hf/llama3_8b_instruct.json", "tpu-v5e"),
    ("configs/qwen2_5_7b_8xh100.yaml", "configs/hf/qwen2_5_7b_instruct.json", "h100"),
)

# `--lora-figure`: a 7B model on one GPU, full fine-tuning beside LoRA (the README's memory figure).
LORA_FIGURE = ("configs/qwen2_5_7b_lora_1xh200.yaml", "configs/hf/qwen2_5_7b_instruct.json", "h200")
LORA_VARIANTS = (
    ("full fine-tuning, f32 master weights", ["lora.rank=0", "model.param_dtype=float32"]),
    ("LoRA r16 all-linear, f32 base", ["model.param_dtype=float32"]),
    ("LoRA r16 all-linear, bf16 base", []),
    ("LoRA r16 q_proj+v_proj, bf16 base", ["lora.target_modules=[q_proj,v_proj]"]),
)


# ------------------------------------------------------------------------------------------- the config


def plan_config(path: str, hf_config: str = "", overrides: list[str] | None = None) -> Config:
    """The run Config of `path` (+ overrides), its model given inline by the HF config.json `hf_config`."""
    cfg = load_config(path, overrides)
    if hf_config:
        hf = json.loads(Path(hf_config).read_text())
        tokenizer = cfg.model.tokenizer or cfg.model.path
        cfg.model = dataclasses.replace(cfg.model, path="", config=hf, tokenizer=tokenizer)
    return cfg


def mesh_devices(cfg: Config) -> int:
    """Devices the config's mesh needs (data: -1 is not a size: give it explicitly for a plan check)."""
    if cfg.mesh.data == -1:
        raise ValueError("mesh.data=-1 depends on the machine: set mesh.data explicitly for a plan check")
    return cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.expert * cfg.mesh.tensor


# ------------------------------------------------------------------------------------------- the batch


def worst_case_shape(cfg: Config, mesh, num_processes: int) -> tuple[int, int]:
    """(global rows N, row length T) of the largest batch the data settings allow: every prompt and
    completion at its maximum length, shaped by the trainer's own DataIterator rule.

    Raises:
      ValueError: data.max_completions is 0, or a worst-case sequence / group does not fit data.row_length.
    """
    data_cfg = cfg.data
    k = data_cfg.max_completions
    if k == 0:
        raise ValueError("data.max_completions=0 (from the data): set K for a plan check")
    prompt, completion = data_cfg.max_prompt_length, data_cfg.max_completion_length
    rows = datasets.Dataset.from_dict(
        {
            "prompt_length": [prompt] * data_cfg.batch_size,
            "completion_lengths": [[completion] * k] * data_cfg.batch_size,
        }
    )
    data = TokenizedData(rows, DataReport(), k, ["worst case"], data_cfg.tokenization_settings(), "")
    example = (np.zeros(prompt, np.int32), [np.zeros(completion, np.int32)] * k)
    # completions of one length: a LongRoPE model's split (split_length) leaves the group whole
    longest = max(item_lengths([example], data_cfg.layout, split_length=None))
    # an automatic row length (0) fits the worst case
    if data_cfg.layout != "padded" and data_cfg.row_length and longest > data_cfg.row_length:
        raise ValueError(
            f"data.row_length={data_cfg.row_length} is shorter than a worst-case {data_cfg.layout} item "
            f"({prompt} prompt + {k} x {completion} completion tokens -> {longest} tokens), so such a batch "
            f"stops training: set data.row_length >= {longest} "
            f"({bucket_length(longest, (), data_cfg.pad_multiple)}, rounded to data.pad_multiple), "
            "or 0 (auto)"
        )
    it = DataIterator(
        data, data_cfg, ref=None, process_index=0, process_count=num_processes, mesh=mesh, split_length=None
    )
    groups = len(it.feed.groups)  # processes holding the same batch shards hold the same rows
    local_rows, length = it.shape_of([[example] * it.local_batch] * groups)
    return local_rows * groups, length


def abstract_batch(cfg: Config, rows: int, length: int, mesh) -> ScoredBatch:
    """ShapeDtypeStructs of a stacked [M, ...] ScoredBatch, with the trainer's batch shardings."""
    m, b, k = cfg.optim.grad_accum_steps, cfg.data.batch_size, cfg.data.max_completions
    tokens = jax.ShapeDtypeStruct((m, rows, length), jnp.int32)
    shapes = ScoredBatch(
        tokens=TokenBatch(*([tokens] * 6)),
        rewards=jax.ShapeDtypeStruct((m, b, k), jnp.float32),
        completion_mask=jax.ShapeDtypeStruct((m, b, k), jnp.bool_),
        ref_logps=jax.ShapeDtypeStruct((m, b, k), jnp.float32),
        completion_lengths=jax.ShapeDtypeStruct((m, b, k), jnp.int32),
    )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, tr.batch_shardings(mesh)
    )


# ------------------------------------------------------------------------------------ shards, replication


def shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs carrying shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def replication(abstract_params: nnx.State, mesh) -> dict:
    """How much of the model the mesh leaves replicated.

    Returns:
      {"fraction": share of parameter elements held whole by every device, "dropped": [names of parameters
      whose logical sharding was dropped on some axis because the mesh axis does not divide it]}.
    """
    shardings = dict(nnx.to_flat_state(param_shardings(abstract_params, mesh)))
    total = replicated = 0
    dropped = []
    for path, var in nnx.to_flat_state(abstract_params):
        size = math.prod(var.shape)
        sharding = shardings[path].get_value()
        total += size
        replicated += size if sharding.is_fully_replicated else 0
        wanted = tuple(logical_to_spec(var.get_metadata().get("logical_axes", (None,) * len(var.shape))))
        got = tuple(sharding.spec) + (None,) * (len(wanted) - len(sharding.spec))
        if wanted != got:
            dropped.append(".".join(map(str, path)))
    return {"fraction": replicated / total, "dropped": dropped}


# ------------------------------------------------------------------------------------------- the check


def advice(report: dict, cfg: Config) -> list[str]:
    """What to change when the per-device total does not fit (or leaves under 10% headroom)."""
    hbm, per = report["hbm_bytes"], report["per_device"]
    out = []
    if math.prod(report["mesh"].values()) > 1 and report["replicated"]["fraction"] > 0.01:  # one device: all
        out.append(
            f"{report['replicated']['fraction']:.1%} of the parameters are replicated on every device: "
            "choose mesh.fsdp / mesh.expert / mesh.tensor sizes that divide the model's dims (see `dropped`)"
        )
    if "compile_error" not in report and per["total"] <= 0.9 * hbm:
        return out
    if 3 * per["params"] + per["frozen"] + per["optimizer"] > 0.5 * hbm:  # params, grads, moments, base
        out.append(
            "parameter and optimizer shards alone fill the chip: more mesh.fsdp (or param_dtype bfloat16)"
        )
    if per.get("xla_temp", hbm) > 0.5 * hbm:
        rows = report["batch"]["rows_per_device"]
        if cfg.model.remat != "full":
            out.append("model.remat: full (recompute each block in the backward pass)")
        if rows > 1:
            out.append(
                f"smaller microbatch ({rows} rows of {report['batch']['row_length']} tokens per device "
                "now): raise optim.grad_accum_steps and lower data.batch_size by the same factor (same "
                "prompts per update)"
            )
        out.append(
            "XLA attention keeps [rows, heads, T, T] float32 scores per layer "
            f"({per['attention_scores'] / GIB:.1f} GiB per device): a shorter data.row_length cuts them "
            "quadratically"
        )
    return out


def verdict(per: dict, hbm: int, on_cpu: bool) -> bool | None:
    """Whether the step fits `hbm` bytes per device; None when XLA:CPU cannot tell.

    An accelerator compiler's total decides. XLA:CPU's temporaries are not an accelerator's (it undoes remat),
    so on CPU only the clear cases are decided: everything fits even so, or the state alone (params, their
    gradients, optimizer state, a LoRA run's frozen base: exact shard sizes) does not.
    """
    if not on_cpu or per["total"] <= hbm:
        return per["total"] <= hbm
    return False if 2 * per["params"] + per.get("frozen", 0) + per["optimizer"] > hbm else None


def check(cfg: Config, chip: Chip, num_processes: int, devices: list | None = None) -> dict:
    """Compiles the config's train step on `devices` (default: this process's fake CPU devices) and reports
    per-device memory; an out-of-memory compile (XLA:TPU checks HBM) is reported, not raised."""
    mesh = tr.run_mesh(cfg, devices)
    mcfg = tr.model_config(cfg)
    report = {
        "model": f"{mcfg.model_type}, {mcfg.num_params() / 1e9:.2f}B params, {mcfg.num_layers} layers",
        "params": mcfg.num_params(),
        "mesh": dict(mesh.shape),
        "chip": chip.name,
        "hbm_bytes": chip.hbm_bytes,
        "processes": num_processes,
        "compiled_for": f"{mesh.devices.size} x {mesh.devices.flat[0].device_kind}",
    }
    rows, length = worst_case_shape(cfg, mesh, num_processes)
    rows_per_device = rows // batch_shards(mesh)
    heads_per_device = mcfg.num_heads // (cfg.mesh.tensor if mcfg.num_heads % cfg.mesh.tensor == 0 else 1)
    report["batch"] = {
        "microbatches": cfg.optim.grad_accum_steps,
        "prompts": cfg.data.batch_size,
        "completions": cfg.data.max_completions,
        "layout": cfg.data.layout,
        "rows": rows,
        "row_length": length,
        "rows_per_device": rows_per_device,
    }
    tx = tr.make_optimizer(cfg.optim, cfg.train.steps, tr.compensates(cfg))
    graphdef, abstract_params = tr.abstract_model(cfg)
    report["replicated"] = replication(abstract_params, mesh)
    trained, frozen = tr.split_trainable(abstract_params)  # (adapters, base) with LoRA, else (all, none)
    shardings = tr.state_shardings(trained, tx, mesh)
    state = tr.abstract_state(trained, tx, shardings)
    frozen = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), frozen, param_shardings(frozen, mesh)
    )
    batch = abstract_batch(cfg, rows, length, mesh)
    per = {
        "params": shard_bytes(state.params),
        "frozen": shard_bytes(frozen),
        "optimizer": shard_bytes(state.opt_state),
        "batch": shard_bytes(batch),
        "attention_scores": rows_per_device * heads_per_device * length * length * 4,
    }
    report["per_device"] = per
    start = time.perf_counter()
    try:
        step = tr.jit_train_step(graphdef, tx, cfg, shardings, mesh, frozen)
        compiled = step.lower(state, batch, frozen).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.update(fits=False, compile_error=str(e).strip()[:2000])
        report["advice"] = advice(report, cfg)
        return report
    finally:
        report["compile_s"] = time.perf_counter() - start
        report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = compiled.memory_analysis()
    per.update(
        {
            "xla_argument": mem.argument_size_in_bytes,
            "xla_output": mem.output_size_in_bytes,
            "xla_alias": mem.alias_size_in_bytes,
            "xla_temp": mem.temp_size_in_bytes,
        }
    )
    per["total"] = per["xla_argument"] + per["xla_output"] - per["xla_alias"] + per["xla_temp"]
    report["fits"] = verdict(per, chip.hbm_bytes, on_cpu=mesh.devices.flat[0].platform == "cpu")
    report["advice"] = advice(report, cfg)
    return report


def print_report(name: str, report: dict) -> None:
    if "error" in report:
        print(f"\n{name}: NOT CHECKED: {report['error']}")
        return
    per, b, hbm = report["per_device"], report["batch"], report["hbm_bytes"]
    mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
    print(f"\n{name}: {report['model']}")
    print(f"  mesh {mesh}, compiled for {report['compiled_for']}, {report['processes']} processes")
    print(
        f"  batch per update: {b['microbatches']} x {b['prompts']} prompts x K={b['completions']} -> "
        f"{b['microbatches']} x {b['rows']} {b['layout']} rows of T={b['row_length']} (worst case), "
        f"{b['rows_per_device']} rows per device"
    )
    print(f"  per device, against {report['chip']} ({hbm / GIB:.1f} GiB):")
    lines = (
        ("trained parameters (shards)", "params"),
        ("frozen LoRA base (shards)", "frozen"),
        ("optimizer state (shards)", "optimizer"),
        ("batch (shards)", "batch"),
        ("XLA arguments (state + batch)", "xla_argument"),
        ("XLA outputs", "xla_output"),
        ("XLA donated aliases (-)", "xla_alias"),
        ("XLA temporaries (activations, grads, gathers)", "xla_temp"),
        ("total = arguments + outputs - aliases + temps", "total"),
        ("one layer's f32 attention scores (estimate)", "attention_scores"),
    )
    for label, key in lines:
        if key in per and (key != "frozen" or per[key]):
            print(f"    {label:<48} {per[key] / GIB:>9.3f} GiB")
    if "compile_error" in report:
        print(f"  => DOES NOT FIT: the compiler ran out of memory: {report['compile_error'][:600]}")
    else:
        gpu = any(c.gpu for c in CHIPS.values() if c.name == report["chip"])
        undecided = f"UNDECIDED on XLA:CPU (run --backend {'gpu' if gpu else 'tpu'})"
        said = {True: "fits", False: "DOES NOT FIT", None: undecided}
        share = f"{per['total'] / GIB:.2f} of {hbm / GIB:.1f} GiB ({per['total'] / hbm:.0%})"
        print(f"  => {said[report['fits']]}: {share}")
    rep = report["replicated"]
    dropped = ", ".join(rep["dropped"][:6]) + (" ..." if len(rep["dropped"]) > 6 else "") or "none"
    print(f"  replicated on every device: {rep['fraction']:.4%} of parameter elements")
    print(f"  shardings dropped (a mesh axis does not divide the dim): {dropped}")
    for line in report["advice"]:
        print(f"  change: {line}")
    print(f"  compile {report['compile_s']:.1f} s, peak RSS {report['peak_rss_bytes'] / GIB:.1f} GiB")


def print_lora_figure(reports: list[dict]) -> None:
    """One row per `LORA_VARIANTS` report: its per-device memory in GiB against the chip's HBM."""
    print(f"\n{'variant':<38} {'trained':>8} {'base':>8} {'optim':>8} {'temps':>8} {'total':>8}  verdict")
    for (name, _), report in zip(LORA_VARIANTS, reports, strict=True):
        per = report.get("per_device", {})
        cells = [per.get(k) for k in ("params", "frozen", "optimizer", "xla_temp", "total")]
        row = " ".join(f"{'-' if c is None else f'{c / GIB:.2f}':>8}" for c in cells)
        if "error" in report:
            said = f"not checked: {report['error'][:80]}"
        elif "compile_error" in report:
            said = f"does not fit the compiler's chip: {report['compile_error'][:120]}"
        else:
            said = f"{per['total'] / report['hbm_bytes']:.0%} of {report['chip']}"
        print(f"{name:<38} {row}  {said}")


# ------------------------------------------------------------------------------------------- the driver


def worker(args) -> int:
    """Runs in the subprocess whose fake device count matches the mesh: checks one config."""
    chip = CHIPS[args.chip] if args.chip else Chip("given HBM", int(args.hbm_gib * GIB), 1)
    try:
        cfg = plan_config(args.config, args.hf_config, args.overrides)
        processes = args.processes or max(1, mesh_devices(cfg) // chip.devices_per_process)
        if args.backend == "gpu" and not chip.gpu:
            raise ValueError(f"{chip.name} is not a GPU: --backend gpu compiles for GPU targets only")
        devices = None  # cpu: this process's fake CPU devices
        if args.backend == "tpu":
            devices = tpu_devices(chip.tpu, mesh_devices(cfg))
        elif args.backend == "gpu":
            devices = gpu_devices(chip.gpu, mesh_devices(cfg))
        report = check(cfg, chip, processes, devices)
    except ValueError as e:
        report = {"error": str(e), "fits": False}
    report = {"config": args.config, "overrides": args.overrides, **report}
    print_report(Path(args.config).name + (f" {' '.join(args.overrides)}" if args.overrides else ""), report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if report["fits"] is False else 0


def run_one(config: str, hf_config: str, chip: str, args, json_path: Path, overrides: list[str]) -> int:
    """Runs the worker for one config in a subprocess with the mesh's number of fake CPU devices."""
    devices = mesh_devices(plan_config(config, hf_config, overrides))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}
    cmd = [sys.executable, __file__, "--worker", config, "--processes", str(args.processes)]
    cmd += ["--hf-config", hf_config] if hf_config else []
    cmd += ["--backend", args.backend]
    cmd += ["--chip", chip] if chip else ["--hbm-gib", str(args.hbm_gib)]
    cmd += ["--json", str(json_path), *overrides]
    return subprocess.run(cmd, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="run config YAML (default: the shipped large configs)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--hf-config", default="", help="HF config.json of the model (instead of model.path)")
    parser.add_argument("--chip", choices=sorted(CHIPS), help="target accelerator")
    parser.add_argument("--hbm-gib", type=float, default=16.0, help="HBM per device when no --chip is given")
    parser.add_argument(
        "--processes", type=int, default=0, help="JAX processes (0 = devices / chip's per host)"
    )
    parser.add_argument("--json", default="", help="write the reports (a JSON list) here")
    parser.add_argument(
        "--backend",
        choices=("cpu", "tpu", "gpu"),
        default="cpu",
        help="compiler: XLA:CPU on fake devices, or XLA:TPU / XLA:GPU for chips described without them",
    )
    parser.add_argument(
        "--lora-figure",
        action="store_true",
        help=f"{LORA_FIGURE[0]} on one {LORA_FIGURE[2]}: full fine-tuning beside LoRA variants, one table",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    if args.worker:
        return worker(args)
    if args.lora_figure:
        config, hf_config, chip = LORA_FIGURE
        targets = [(str(REPO / config), str(REPO / hf_config), chip, [*args.overrides, *extra])
                   for _, extra in LORA_VARIANTS]  # fmt: skip
    elif args.config:
        targets = [(args.config, args.hf_config, args.chip, args.overrides)]
    else:
        targets = [(str(REPO / c), str(REPO / h), chip, args.overrides) for c, h, chip in SHIPPED]
    status, reports = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (config, hf_config, chip, overrides) in enumerate(targets):
            out = Path(tmp) / f"{i}.json"
            status |= run_one(config, hf_config, chip, args, out, overrides)
            reports.append(
                json.loads(out.read_text()) if out.is_file() else {"config": config, "error": "crashed"}
            )
    if args.lora_figure:
        print_lora_figure(reports)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
