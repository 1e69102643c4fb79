"""End-to-end CPU demo: off-policy fine-tuning of a tiny LM on a verifiable task, CoPG vs IPO vs DPO.

Task: sort a list of 3-6 digits ("5 1 4 =" -> "1 4 5"); reward = fraction of positions that match the sorted
list (1.0 = exactly sorted), computed by code. No downloads: the tokenizer (word level: digits, "=", specials)
and the model (Llama-style, random init) are built here.

  (a) pre-train a reference policy by SFT on noisy demonstrations (only some are sorted correctly);
  (b) sample K completions per training prompt from it (the behaviour policy mu = pi_ref);
  (c) score them with the reward function;
  (d) fine-tune with CoPG and with IPO / DPO (all ordered preference pairs from the same scores), same data,
      steps and learning rate, through the real trainer (`copg_jax.train.train`), for a few beta values;
  (e) evaluate each policy on held-out prompts: mean reward of its own samples and KL(pi || pi_ref), a Monte
      Carlo estimate E_{y ~ pi}[log pi(y) - log pi_ref(y)];
  (f) write results.json, results.md and reward_vs_kl.png to the run folder and print the table.

    python -m copg_jax.experiments.demo [--out runs/demo] [--quick]     (or `copg demo ...`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from copg_jax.batch import TokenBatch
from copg_jax.config import MAX_SEED
from copg_jax.data.layout import padded_layout
from copg_jax.data.refcache import ReferenceModel, precompute_ref
from copg_jax.generate import SamplingConfig, sample_completions, tokenize_prompts
from copg_jax.generation_eval import evaluate_generations
from copg_jax.logprobs import sequence_logprobs
from copg_jax.models import ModelConfig, from_config, from_pretrained, save_pretrained
from copg_jax.rewards import score_rows
from copg_jax.run_config import load_config
from copg_jax.train import tokenize_for_model, train

log = logging.getLogger(__name__)
WIDTH = 24  # row length of the SFT batches: the longest prompt + answer + EOS fits
DIGITS = [str(d) for d in range(10)]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run (the defaults take a few minutes on 2 CPU cores; `quick` is for tests)."""

    train_prompts: int = 256
    eval_prompts: int = 128
    num_completions: int = 4
    sft_examples: int = 2048
    sft_steps: int = 300
    sft_correct_fraction: float = 0.35
    train_steps: int = 120
    batch_size: int = 16
    lr: float = 5e-4
    eval_samples: int = 4
    betas: dict[str, tuple[float, ...]] = dataclasses.field(
        default_factory=lambda: {"copg": (0.05, 0.2, 0.5), "ipo": (0.1, 0.3, 1.0), "dpo": (0.1, 0.3, 1.0)}
    )
    seed: int = 0


QUICK = DemoSettings(
    train_prompts=128,
    eval_prompts=64,
    sft_examples=1024,
    sft_steps=150,
    train_steps=40,
    batch_size=32,
    eval_samples=2,
    betas={"copg": (0.2,), "ipo": (0.3,)},
)


# ----------------------------------------------------------------------------------------------- the task


def make_prompt(digits: Sequence[int]) -> str:
    return " ".join(map(str, digits)) + " ="


def parse_prompt(prompt: str) -> list[int]:
    words = prompt.split()
    if not words or words[-1] != "=" or not all(w in DIGITS for w in words[:-1]):
        raise ValueError(f"not a sorting prompt: {prompt!r}")
    return [int(w) for w in words[:-1]]


def sort_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Fraction of positions holding the right digit of the sorted list (over the longer of the two)."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        target = sorted(parse_prompt(prompt))
        got = completion.split()
        hits = sum(g == str(t) for g, t in zip(got, target, strict=False))
        out.append(hits / max(len(target), len(got)))
    return out


def random_lists(rng: np.random.Generator, n: int) -> list[list[int]]:
    return [rng.integers(0, 10, size=int(rng.integers(3, 7))).tolist() for _ in range(n)]


def noisy_answer(rng: np.random.Generator, digits: list[int], correct_fraction: float) -> list[int]:
    """The sorted list, or (most of the time) a corrupted one: two entries swapped, or one digit replaced."""
    answer = sorted(digits)
    if rng.random() < correct_fraction:
        return answer
    if rng.random() < 0.5 and len(set(answer)) > 1:
        while True:
            i, j = rng.choice(len(answer), size=2, replace=False)
            if answer[i] != answer[j]:
                break
        answer[i], answer[j] = answer[j], answer[i]
    else:
        i = int(rng.integers(len(answer)))
        answer[i] = int((answer[i] + rng.integers(1, 10)) % 10)
    return answer


def make_tokenizer(out_dir: Path):
    """Word-level tokenizer over digits, "=" and specials (BOS before plain text), saved as an HF folder."""

    vocab = {t: i for i, t in enumerate(SPECIAL + DIGITS + ["="])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


# ------------------------------------------------------------------------------ sequences -> log-probs


def completion_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], width: int) -> TokenBatch:
    """Padded layout (one row per prompt+completion) whose slot n is completion n of `pairs`.

    Args:
      pairs: N (prompt_ids, completion_ids) pairs.
      width: row length T >= the longest prompt+completion.
    """

    return padded_layout([(np.asarray(p), [np.asarray(c)]) for p, c in pairs], 1, width)


@nnx.jit(static_argnames="num_slots")
def _sequence_logps(model, tokens: TokenBatch, num_slots: int) -> jax.Array:

    return sequence_logprobs(model, tokens, num_slots)[1]


def sequence_logps(model, pairs, width: int, batch_size: int = 256) -> np.ndarray:
    """[N] summed completion log-probs of (prompt_ids, completion_ids) pairs under `model`."""
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = list(pairs[s : s + batch_size])
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # fixed shapes: one compilation
        tokens = jax.tree.map(jnp.asarray, completion_batch(chunk, width))
        out.append(np.asarray(_sequence_logps(model, tokens, batch_size)))
    return np.concatenate(out)[: len(pairs)]


# ---------------------------------------------------------------------------------------- (a) SFT


def model_config(vocab_size: int, eos_id: int):
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64, eos_token_ids=(eos_id,),
        bos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def sft(model, pairs, steps: int, batch_size: int, lr: float, width: int, seed: int) -> list[float]:
    """Trains `model` in place on the mean token NLL of the completions of `pairs`; returns the loss curve."""

    graphdef, params = nnx.split(model)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, 20, steps, lr / 10))
    opt_state = tx.init(params)

    def loss_fn(params, tokens):
        token_logps = sequence_logprobs(nnx.merge(graphdef, params), tokens, batch_size)[0]
        return -jnp.sum(token_logps) / jnp.sum(tokens.target_slots >= 0)

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(pairs), size=batch_size, replace=False)
        tokens = jax.tree.map(jnp.asarray, completion_batch([pairs[i] for i in idx], width))
        params, opt_state, loss = step(params, opt_state, tokens)
        losses.append(float(loss))
    nnx.update(model, params)
    return losses


# ------------------------------------------------------------------------------- (b, c) data, (e) eval


def sample(model, tokenizer, prompts: list[str], k: int, seed: int, max_new_tokens: int = 10):

    ids = tokenize_prompts(tokenizer, prompts)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    return ids, sample_completions(model, tokenizer, ids, k, cfg, jax.random.key(seed), batch_size=256)


def build_offpolicy_data(
    tokenizer, reference, prompts: list[str], k: int, seed: int
) -> tuple[list[dict], dict]:
    """K-way {prompt, completions, rewards} rows sampled from the reference and scored; counts of what was
    left out (empty completions: the data pipeline rejects them; rows left with < 2 completions)."""

    _, samples = sample(reference, tokenizer, prompts, k, seed)
    rows, dropped = [], {"empty_completions": 0, "rows_with_fewer_than_2": 0, "reward_failures": 0}
    for prompt, comps in zip(prompts, samples, strict=True):
        texts = [c["text"].strip() for c in comps]
        dropped["empty_completions"] += sum(not t for t in texts)
        texts = [t for t in texts if t]
        result = score_rows(sort_reward, [prompt] * len(texts), texts)
        dropped["reward_failures"] += result.num_failed
        keep = [i for i, e in enumerate(result.errors) if e is None]
        if len(keep) < 2:
            dropped["rows_with_fewer_than_2"] += 1
            continue
        rows.append(
            {
                "prompt": prompt,
                "completions": [texts[i] for i in keep],
                "rewards": [float(result.scores[i]) for i in keep],
            }
        )
    return rows, dropped


def evaluate_policy(
    policy, reference, tokenizer, prompts: list[str], samples: int, seed: int, reward_fn=None
) -> dict:
    """Mean reward (default: the sort reward), exact-sort rate and Monte-Carlo KL(pi || pi_ref) from
    `samples` draws of pi per prompt (`generation_eval`, the paper's measure).

    Args:
      reference: a `ReferenceModel` of pi_ref.
    """

    scores = evaluate_generations(
        policy, reference, tokenizer, prompts, tokenize_prompts(tokenizer, prompts), reward_fn or sort_reward,
        SamplingConfig(max_new_tokens=10, temperature=1.0), samples, jax.random.key(seed), batch_size=256,
    )  # fmt: skip
    summary = {k.removeprefix("eval_gen/"): v for k, v in scores.summary().items()}
    exact = np.asarray(sort_reward([p for p in prompts for _ in range(samples)], sum(scores.texts, [])))
    keys = ("reward", "reward_stderr", "kl", "kl_stderr", "length")
    return {**{k: summary[k] for k in keys}, "exact": float(np.mean(exact == 1.0))}


# --------------------------------------------------------------------------------------- (d) training


def train_config(
    run_dir: Path,
    method: str,
    beta: float,
    data_dir: Path,
    reference_dir: Path,
    *,
    batch_size: int,
    lr: float,
    steps: int,
    seed: int,
    extra: dict | None = None,
):
    """The run config of one method and beta on `data_dir/train.jsonl` from the reference policy, in
    `run_dir/runs/<method>_beta<beta>` (`extra`: more key -> value overrides, applied last)."""

    out = run_dir / "runs" / f"{method}_beta{beta:g}"
    overrides = {
        "model.path": str(reference_dir),
        "model.dtype": "float32",
        "data.path": str(data_dir / "train.jsonl"),
        "data.ref_cache": str(data_dir / "ref_logps.parquet"),
        "data.batch_size": batch_size,
        "data.max_prompt_length": 16,
        "data.max_completion_length": 12,
        "data.pad_multiple": 32,
        "data.seed": seed,
        "loss.name": method,
        "loss.beta": beta,
        "optim.lr": lr,
        "optim.schedule": "constant",
        "optim.warmup_steps": 5,
        "optim.max_grad_norm": 1.0,
        "train.steps": steps,
        "train.log_every": max(1, steps // 5),
        "train.output_dir": str(out),
        "train.export_on_finish": True,
        "train.progress": False,
        "train.seed": seed,
        "checkpoint.every_steps": 0,
        "checkpoint.async_save": False,
        "checkpoint.resume": False,
        **(extra or {}),
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


# ------------------------------------------------------------------------------------- (f) reporting


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| method | beta | reward (± s.e.) | exactly sorted | KL(pi‖pi_ref) (± s.e.) | length |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        beta = "-" if r["beta"] is None else f"{r['beta']:g}"
        lines.append(
            f"| {r['method']} | {beta} | {r['reward']:.3f} ± {r['reward_stderr']:.3f} | {r['exact']:.3f} "
            f"| {r['kl']:.3f} ± {r['kl_stderr']:.3f} | {r['length']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("copg", "o"), ("ipo", "s"), ("dpo", "^")):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["kl"])
        if rows:
            ax.errorbar(
                [r["kl"] for r in rows], [r["reward"] for r in rows], yerr=[r["reward_stderr"] for r in rows],
                marker=marker, label=method.upper(), capsize=3,
            )  # fmt: skip
            for r in rows:
                ax.annotate(
                    f"β={r['beta']:g}",
                    (r["kl"], r["reward"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ref = next(r for r in results if r["method"] == "reference")
    ax.axhline(ref["reward"], color="gray", linestyle="--", label="reference (SFT)")
    ax.set_xlabel("KL(π ‖ π_ref), nats per completion")
    ax.set_ylabel("mean reward (held-out prompts)")
    ax.set_title("Sorting task: reward vs KL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def sft_reference(out: Path, rng: np.random.Generator, examples: int, correct_fraction: float, steps: int,
                  seed: int):  # fmt: skip
    """(a) The reference policy: a tiny Llama trained by SFT on `examples` noisy demonstrations (a fraction
    `correct_fraction` sorted right), saved with the tokenizer to `out/reference` (demonstrations in
    `out/sft.jsonl`). Returns (tokenizer, model, its folder, the SFT loss curve)."""

    tokenizer = make_tokenizer(out / "tokenizer")
    eos = tokenizer.eos_token_id
    demos = [(make_prompt(d), noisy_answer(rng, d, correct_fraction)) for d in random_lists(rng, examples)]
    (out / "sft.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "completion": " ".join(map(str, a))}) + "\n" for p, a in demos)
    )
    sft_pairs = [
        (
            tokenizer(p)["input_ids"],
            tokenizer(" ".join(map(str, a)), add_special_tokens=False)["input_ids"] + [eos],
        )
        for p, a in demos
    ]
    reference = from_config(model_config(len(tokenizer), eos), rngs=nnx.Rngs(seed))
    losses = sft(reference, sft_pairs, steps, 64, 3e-3, WIDTH, seed)
    reference_dir = out / "reference"
    save_pretrained(reference, reference_dir)
    tokenizer.save_pretrained(str(reference_dir))
    return tokenizer, reference, reference_dir, losses


OUTPUT_MARK = ".copg-experiment"  # in a folder an experiment (demo, paper) writes: another run may replace it


def start_output_folder(out: Path, what: str) -> None:
    """Makes `out` the empty output folder of experiment `what`: an earlier experiment's (OUTPUT_MARK) is
    emptied, so that a re-run starts over (its training runs refused to, and its data had been rewritten
    under the earlier results by then). An experiment that finished listed what it wrote in the mark
    (`finish_output_folder`): anything else there (a user's notes) is refused, never removed; one that did
    not finish wrote no list, and what it left is removed, named.

    Raises:
      ValueError: `out` holds no earlier experiment, or files it did not write.
    """
    if out.is_dir() and any(out.iterdir()):
        if not (out / OUTPUT_MARK).is_file():
            raise ValueError(f"--out {out} is not empty and holds no earlier experiment: give a new folder")
        try:
            written = set(json.loads((out / OUTPUT_MARK).read_text())["entries"])
        except (ValueError, KeyError, TypeError):  # the mark of an experiment that did not finish
            written = None
        entries = sorted(e.name for e in out.iterdir() if e.name != OUTPUT_MARK)
        if written is not None and (others := [e for e in entries if e not in written]):
            raise ValueError(
                f"--out {out} holds {others[:5]}, which the earlier experiment did not write: move them, or "
                "give a new folder"
            )
        print(f"copg {what}: replacing the earlier results in {out}: {', '.join(entries)}")
        for entry in out.iterdir():  # its contents: `out` itself may be a link, or "."
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARK).write_text(f"written by copg {what}; a later run replaces this folder\n")


def finish_output_folder(out: Path, what: str) -> None:
    """Lists in `out`'s mark what experiment `what` wrote there, for a re-run to replace only that."""
    entries = sorted(e.name for e in out.iterdir() if e.name != OUTPUT_MARK)
    (out / OUTPUT_MARK).write_text(json.dumps({"written_by": f"copg {what}", "entries": entries}) + "\n")


def run(out: Path, s: DemoSettings) -> list[dict]:
    """Runs the whole demo into `out`; returns the result rows (also written as results.json / results.md)."""

    t0 = time.perf_counter()

    def elapsed() -> str:
        return f"{time.perf_counter() - t0:.0f}s"

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(s.seed)
    tokenizer, reference, reference_dir, sft_losses = sft_reference(
        out, rng, s.sft_examples, s.sft_correct_fraction, s.sft_steps, s.seed
    )
    print(f"(a) SFT reference: NLL {sft_losses[0]:.3f} -> {np.mean(sft_losses[-20:]):.3f} ({elapsed()})")

    # (b, c) off-policy data: K samples per training prompt from the reference, scored by code
    train_prompts = [make_prompt(d) for d in random_lists(rng, s.train_prompts)]
    eval_prompts = [make_prompt(d) for d in random_lists(rng, s.eval_prompts)]
    rows, dropped = build_offpolicy_data(tokenizer, reference, train_prompts, s.num_completions, s.seed + 1)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data_dir / "eval_prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in eval_prompts)
    )
    mean_reward = float(np.mean([r for row in rows for r in row["rewards"]]))
    print(
        f"(b, c) {len(rows)} prompts x <= {s.num_completions} completions, mean reward {mean_reward:.3f}; "
        f"left out: {dropped}"
    )

    # reference log-probs of the training data, once for every method
    sizes = dict(batch_size=s.batch_size, lr=s.lr, steps=s.train_steps, seed=s.seed)
    cfg0 = train_config(out, "copg", 1.0, data_dir, reference_dir, **sizes)
    data = tokenize_for_model(cfg0, tokenizer, cfg0.data.path, cfg0.data.split)  # as train() will
    precompute_ref(
        from_pretrained(reference_dir, dtype=jnp.float32),
        data,
        cfg0.data,
        cfg0.data.ref_cache,
        checkpoint=str(reference_dir),
    )

    # (d, e) train every method and beta, evaluate each policy
    reference = from_pretrained(reference_dir, dtype=jnp.float32)
    ev = dict(tokenizer=tokenizer, prompts=eval_prompts, samples=s.eval_samples, seed=s.seed + 2)
    ev["reference"] = ReferenceModel(reference)
    results = [{"method": "reference", "beta": None, **evaluate_policy(reference, **ev)}]
    print(f"(e) reference: reward {results[0]['reward']:.3f}")
    for method, betas in s.betas.items():
        for beta in betas:
            cfg = train_config(out, method, beta, data_dir, reference_dir, **sizes)
            result = train(cfg)
            policy = from_pretrained(Path(result.run_dir) / "export", dtype=jnp.float32)
            row = {"method": method, "beta": beta, **evaluate_policy(policy, **ev)}
            results.append(row)
            print(
                f"(d, e) {method} beta={beta:g}: reward {row['reward']:.3f}, KL {row['kl']:.3f} ({elapsed()})"
            )

    # (f) report
    table = markdown_table(results)
    meta = {
        "settings": dataclasses.asdict(s),
        "dropped": dropped,
        "offpolicy_mean_reward": mean_reward,
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps({"results": results, **meta}, indent=2))
    (out / "results.md").write_text(
        f"# CoPG demo: sorting digits\n\n{table}\n\nTraining data: {len(rows)} prompts, K <= "
        f"{s.num_completions} samples of the reference each (mean reward {mean_reward:.3f}); "
        f"{s.train_steps} steps of {s.batch_size} prompts, lr {s.lr}."
        " KL = Monte-Carlo E_pi[log pi - log pi_ref] per completion; IPO's beta is its tau.\n"
    )
    plot(results, out / "reward_vs_kl.png")
    print(table)
    print(f"wrote {out}/results.md, results.json, reward_vs_kl.png in {time.perf_counter() - t0:.0f}s")
    finish_output_folder(out, "demo")
    return results


def experiment_args(what: str, doc: str, quick_help: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of experiment `what` (demo, paper): --out (default runs/WHAT), --quick, --seed;
    the seed checked and the output folder started (`start_output_folder`), each refusal one usage line."""
    p = argparse.ArgumentParser(prog=f"copg {what}", description=doc)
    p.add_argument("--out", default=f"runs/{what}", help="run folder")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if not 0 <= args.seed < MAX_SEED - 2:  # seed + 2 seeds the evaluation: a JAX key, 32 bits
        p.error(f"--seed must be in [0, {MAX_SEED - 3}]")
    try:
        start_output_folder(Path(args.out), what)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """`copg demo`: the whole pipeline on a tiny sorting task, CoPG vs IPO/DPO (a few minutes on CPU)."""
    args = experiment_args("demo", main.__doc__, "reduced sizes (about a minute; for tests)", argv)
    logging.basicConfig(level=logging.WARNING)
    settings = dataclasses.replace(QUICK if args.quick else DemoSettings(), seed=args.seed)
    run(Path(args.out), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
