"""Our train step against TRL's DPOTrainer on this machine's CPU: same model shape, same tokens, one run.

Both sides train a random-init Llama of a `step.py` size (default "medium", 40M: hidden 512, intermediate
2048, 8 layers, 8 heads, 4 KV heads, vocab 8192) in float32 on preference pairs of P prompt + C completion
tokens (default 32 + 96), reference log-probs precomputed, AdamW with global-norm clipping at 1.0:

* ours: `copg_jax.train.jit_train_step` (CoPG loss) on a padded batch of `pairs` prompts x 2 completions,
  timed by `step.py`'s `bench_padded` (warm, median of `--steps`), once per `--ours-devices` count
  (`JAX_NUM_CPU_DEVICES`, the batch split over the devices by the data mesh axis; one device already keeps
  every core busy through XLA:CPU's intra-op threads and concurrent ops, so more devices add an all-reduce
  rather than speed on 2 cores);
* TRL: `trl.DPOTrainer` (sigmoid loss) on a `transformers.LlamaForCausalLM` with SDPA attention, a word-level
  tokenizer built in memory (one word = one token) and rows of exactly P + C tokens, its optimizer steps timed
  by a callback after `--warmup` steps (the logic of the peer script `trl_dpo_bench.py`, fully offline).

Tokens per step are pairs x 2 x (P + C) on both sides. Each measurement runs in a fresh subprocess, the sides
alternating, `--rounds` times; the table gives the median tokens/s per side and their ratio. TRL and torch
come from the `bench` extra (`pip install -e ".[bench]"`). Each step's process CPU time (all threads) is
given too: on a machine shared with other jobs it is steadier than wall time, though it also counts the
threads' spin-waits (torch's OpenMP pool spins between parallel regions).

    python benchmarks/vs_trl_cpu.py                      # 4 and 8 pairs, 2 rounds, ~5 min on 2 cores
    python benchmarks/vs_trl_cpu.py --pairs 4 --rounds 1 --set model.scan_layers=true
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import jax
from step import SIZES, bench_padded

RESULT = "RESULT "


def versions(names: list[str]) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_ours(args) -> dict:
    """Median step time of our train step (`step.bench_padded`) at `args.pairs` x 2 x (P + C) tokens."""
    length = args.prompt_len + args.completion_len
    if length // 4 != args.prompt_len:
        raise SystemExit(
            f"step.py batches have prompts of length // 4 tokens; got P={args.prompt_len}, T={length}"
        )
    options = argparse.Namespace(
        dtype="float32", remat="none", data=-1, fsdp=1, tensor=1, repeats=args.steps, set=args.set,
        attention="auto", compile_only=False,
    )  # fmt: skip
    row = bench_padded(args.size, args.pairs, 2, length, options)
    return {
        "tokens_per_s": row["tokens_per_s"],
        "step_s": row["step_s"],
        "cpu_s": row["cpu_s"],
        "compile_s": row["compile_s"],
        "versions": versions(["jax", "jaxlib", "flax", "optax"]),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }


def run_trl(args) -> dict:
    """Median optimizer-step time of TRL's DPOTrainer on the same shape and tokens."""
    # imported here: the [bench] extra is only needed for this side, and HF reads the offline flags at import
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    d, f, layers, heads, kv, vocab = SIZES[args.size]
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {t: i for i, t in enumerate(special)} | {f"w{i}": 4 + i for i in range(vocab - 4)}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(special)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(n))

    rows = args.pairs * (args.warmup + args.steps)
    completion = args.completion_len - 1  # + the explicit EOS: C tokens, so TRL appends none
    data = datasets.Dataset.from_dict(
        {
            "prompt": [text(args.prompt_len) for _ in range(rows)],
            "chosen": [" " + text(completion) + " </s>" for _ in range(rows)],
            "rejected": [" " + text(completion) + " </s>" for _ in range(rows)],
        }
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM._from_config(
        config, attn_implementation="sdpa", dtype=torch.float32
    )
    times: list[float] = []
    cpu: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.start_cpu)

    dpo = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs_trl_"),
        bf16=False,
        per_device_train_batch_size=args.pairs,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        beta=0.1,
        loss_type="sigmoid",
        max_length=args.prompt_len + args.completion_len,
        precompute_ref_log_probs=True,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, args=dpo, train_dataset=data, processing_class=tokenizer, callbacks=[StepTimer()]
    )
    lengths = (
        {len(x) for x in trainer.train_dataset["prompt_ids"]},
        {len(x) for x in trainer.train_dataset["chosen_ids"]},
    )
    if lengths != ({args.prompt_len}, {args.completion_len}):
        raise SystemExit(
            f"TRL tokenised prompt / chosen lengths {lengths}, not {args.prompt_len} / {args.completion_len}"
        )
    trainer.train()
    step_s = statistics.median(times[args.warmup :])
    return {
        "tokens_per_s": args.pairs * 2 * (args.prompt_len + args.completion_len) / step_s,
        "step_s": step_s,
        "cpu_s": statistics.median(cpu[args.warmup :]),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(["torch", "transformers", "trl", "accelerate", "datasets"]),
    }


def measure(side: str, pairs: int, args, devices: int = 1) -> dict:
    """Runs one side in a fresh subprocess (ours on `devices` JAX CPU devices) and returns its RESULT."""
    command = [sys.executable, __file__, "--side", side, "--pairs", str(pairs), "--size", args.size]
    command += ["--prompt-len", str(args.prompt_len), "--completion-len", str(args.completion_len)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--set", *args.set]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith(RESULT)]
    if out.returncode or not lines:
        raise SystemExit(f"{side} ({pairs} pairs) failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [x.split(":", 1)[1].strip() for x in f if x.startswith("model name")]
        return f"{names[0]} ({len(names)} logical cores)"
    except (OSError, IndexError):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=96, help="tokens per completion, EOS included")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed TRL steps (ours: one compile call)")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per side and shape")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides of our side")
    cores = sorted({1, os.cpu_count() or 1})
    parser.add_argument("--ours-devices", type=int, nargs="+", default=cores, help="JAX CPU devices (ours)")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        args.pairs = args.pairs[0]
        print(RESULT + json.dumps((run_ours if args.side == "ours" else run_trl)(args)), flush=True)
        return
    load_before = os.getloadavg()
    sides = [(f"ours, {n} device{'s' * (n > 1)}", "ours", n) for n in args.ours_devices] + [("TRL", "trl", 1)]
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for pairs in args.pairs:
            for name, side, devices in sides:
                results.setdefault((name, pairs), []).append(measure(side, pairs, args, devices))
                r = results[name, pairs][-1]
                print(
                    f"  {name:>15} {pairs} pairs: {r['tokens_per_s']:.0f} tokens/s ({r['step_s']:.3f} s/step,"
                    f" {r['cpu_s']:.3f} CPU s/step, load {os.getloadavg()[0]:.1f})"
                )
    tokens = args.prompt_len + args.completion_len
    print(f"\n{cpu_name()}; load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(
        f"{args.size} Llama, float32, pairs of {args.prompt_len} + {args.completion_len} tokens "
        f"({2 * tokens} per pair); median of {args.rounds} runs x {args.steps} steps; our overrides: "
        f"{args.set or 'none'}"
    )
    print(f"ours: {results[sides[0][0], args.pairs[0]][0]['versions']}")
    print(f"TRL:  {results['TRL', args.pairs[0]][0]['versions']}")
    header = " | ".join(f"tokens/s ({p} pairs)" for p in args.pairs)
    header += " | " + " | ".join(f"CPU s/step ({p} pairs)" for p in args.pairs)
    print(f"\n| | {header} |\n|---|" + "---|" * 2 * len(args.pairs))
    speed = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r["cpu_s"] for r in v) for k, v in results.items()}
    for name, _, _ in sides:
        cells = [f"{speed[name, p]:.0f}" for p in args.pairs] + [f"{cpu[name, p]:.2f}" for p in args.pairs]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, side, _ in sides:
        if side == "ours":
            cells = [f"{speed[name, p] / speed['TRL', p]:.2f}x" for p in args.pairs]
            cells += [f"{cpu['TRL', p] / cpu[name, p]:.2f}x" for p in args.pairs]
            print(f"| {name} vs TRL | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
