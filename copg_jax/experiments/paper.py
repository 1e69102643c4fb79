"""The paper's Sec. 6 protocol end to end at CPU scale (arXiv 2406.19185), on the demo's sorting task.

  (a) SFT: the demo's tiny Llama trained on noisy sorting demonstrations; it is pi_ref and the behaviour
      policy of the data.
  (b) preference pairs: two samples of pi_ref per training prompt, labelled by a noisy annotator,
      Bradley-Terry on the task's true reward R: P(a preferred to b) = sigmoid((R(a) - R(b)) / T).
  (c) reward model: `copg train-rm` (Bradley-Terry) from the SFT policy on those pairs. From here on it is
      the ground truth, as in the paper.
  (d) the pairs re-scored by the reward model: K = 2 rows with its scores (CoPG reads the scores; IPO and DPO
      their order, i.e. the preferences the reward model implies).
  (e) beta sweeps of CoPG, IPO and DPO with the paper's grids (CoPG / DPO {0.01, 0.03, 0.06, 0.1, 0.3, 1}, IPO
      {0.003, 0.01, 0.03, 0.06, 0.1, 0.3}; IPO's beta is its tau), Adam with 10% warm-up, 2 epochs, through
      the real trainer; the reward model's reward of the policy's generations on held-out prompts measured
      every `eval_every` steps during training (`eval_generation`), with its standard error and the
      Monte-Carlo KL to pi_ref.
  (f) curves of that reward over steps for every beta (Figs. 2-4), final reward against beta (Fig. 5), the
      best beta of each method with standard-error bands (Fig. 6), a table (with the true sort reward of the
      final policies beside the reward model's) and results.json.

    copg paper [--out runs/paper] [--quick]       (or python -m copg_jax.experiments.paper)

Deterministic for a seed (every sample, shuffle and initialisation is seeded; XLA on CPU is deterministic).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from copg_jax.data.refcache import ReferenceModel, precompute_ref
from copg_jax.experiments import demo
from copg_jax.jsonl import read_jsonl, write_jsonl
from copg_jax.models import from_pretrained
from copg_jax.rewards.reward_model import RewardModel
from copg_jax.run_config import load_config
from copg_jax.train import tokenize_for_model, train

PAPER_BETAS = {
    "copg": (0.01, 0.03, 0.06, 0.1, 0.3, 1.0),
    "ipo": (0.003, 0.01, 0.03, 0.06, 0.1, 0.3),
    "dpo": (0.01, 0.03, 0.06, 0.1, 0.3, 1.0),
}
MAX_NEW_TOKENS = 10  # the longest answer (6 digits) and EOS fit


@dataclasses.dataclass(frozen=True)
class PaperSettings:
    """Sizes of one run (the defaults take minutes on 2 CPU cores; QUICK is for tests)."""

    train_prompts: int = 1024
    eval_prompts: int = 128
    rm_eval_pairs: int = 256
    sft_examples: int = 2048
    sft_steps: int = 300
    sft_correct_fraction: float = 0.35
    label_temperature: float = 0.1
    rm_steps: int = 300
    rm_lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 2
    lr: float = 1e-4
    warmup_fraction: float = 0.1
    eval_every: int = 16
    eval_samples: int = 4
    betas: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=lambda: dict(PAPER_BETAS))
    seed: int = 0


QUICK = PaperSettings(
    train_prompts=96,
    eval_prompts=24,
    rm_eval_pairs=32,
    sft_examples=512,
    sft_steps=40,
    rm_steps=20,
    epochs=1,
    eval_every=3,
    eval_samples=1,
    betas={"copg": (0.1,), "ipo": (0.1,), "dpo": (0.1,)},
)


# ------------------------------------------------------------------------------- (b) preference pairs


def sample_pairs(tokenizer, reference, prompts: list[str], seed: int) -> tuple[list[tuple], dict]:
    """(prompt, a, b) with two samples of the reference each; pairs with an empty or two equal samples are
    left out (counted)."""
    _, samples = demo.sample(reference, tokenizer, prompts, 2, seed)
    pairs, dropped = [], {"empty": 0, "identical": 0}
    for prompt, (a, b) in zip(prompts, samples, strict=True):
        a, b = a["text"].strip(), b["text"].strip()
        if not a or not b:
            dropped["empty"] += 1
        elif a == b:
            dropped["identical"] += 1
        else:
            pairs.append((prompt, a, b))
    return pairs, dropped


def label_pairs(pairs: list[tuple], temperature: float, rng: np.random.Generator) -> list[dict]:
    """Preference rows {prompt, chosen, rejected, true_rewards} from a Bradley-Terry annotator on the true
    sort reward: a is chosen with probability sigmoid((R(a) - R(b)) / temperature)."""
    rows = []
    for prompt, a, b in pairs:
        r_a, r_b = demo.sort_reward([prompt, prompt], [a, b])
        a_first = rng.random() < 1 / (1 + np.exp(-(r_a - r_b) / temperature))
        chosen, rejected = (a, b) if a_first else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# ------------------------------------------------------------------------------------ (c) reward model


def reward_model_config(out: Path, s: PaperSettings, data_dir: Path, reference_dir: Path):
    """`copg train-rm` settings: from the SFT policy, on the labelled pairs, held-out pairs for accuracy."""
    overrides = {
        "model.path": reference_dir,
        "model.dtype": "float32",
        "data.path": data_dir / "prefs_train.jsonl",
        "data.eval_path": data_dir / "prefs_eval.jsonl",
        "data.batch_size": 32,
        "data.max_prompt_length": 16,
        "data.max_completion_length": 12,
        "data.pad_multiple": 32,
        "data.seed": s.seed,
        "optim.lr": s.rm_lr,
        "optim.schedule": "constant",
        "optim.warmup_steps": max(1, s.rm_steps // 10),
        "train.objective": "reward_model",
        "train.steps": s.rm_steps,
        "train.log_every": max(1, s.rm_steps // 5),
        "train.eval_every": s.rm_steps,
        "train.output_dir": out / "reward_model",
        "train.export_on_finish": True,
        "train.progress": False,
        "train.seed": s.seed,
        "checkpoint.every_steps": 0,
        "checkpoint.async_save": False,
        "checkpoint.resume": False,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def agreement(reward_fn, rows: list[dict]) -> dict[str, float]:
    """How often the reward orders a pair as its label does, and as the true sort reward does (pairs whose
    true rewards differ)."""
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    completions = [c for r in rows for c in (r["chosen"], r["rejected"])]
    scores = np.asarray(reward_fn(prompts, completions)).reshape(-1, 2)
    true = np.asarray(demo.sort_reward(prompts, completions)).reshape(-1, 2)
    differ = true[:, 0] != true[:, 1]
    same_order = (scores[:, 0] > scores[:, 1]) == (true[:, 0] > true[:, 1])
    return {
        "label_accuracy": float(np.mean(scores[:, 0] > scores[:, 1])),
        "true_order_accuracy": float(np.mean(same_order[differ])),
        "labels_true_order": float(np.mean((true[:, 0] > true[:, 1])[differ])),
    }


# ------------------------------------------------------------------------------------ (e) the sweeps


def curve(run_dir: Path) -> list[dict]:
    """The eval_gen rows of a run's metrics.jsonl: [{step, reward, reward_stderr, kl, length}]."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_gen/reward" in r]
    keys = ("reward", "reward_stderr", "kl", "length")
    return [{"step": r["step"], **{k: r[f"eval_gen/{k}"] for k in keys}} for r in rows]


def sweep_overrides(s: PaperSettings, steps: int, rm_dir: Path, data_dir: Path) -> dict:
    """What the sweeps add to the demo's run config: the paper's warm-up and evaluation by generation."""
    return {
        "optim.warmup_steps": max(1, round(s.warmup_fraction * steps)),
        "eval_generation.reward.model": rm_dir,
        "eval_generation.prompts_path": data_dir / "eval_prompts.jsonl",
        "eval_generation.num_prompts": 0,
        "eval_generation.num_samples": s.eval_samples,
        "eval_generation.every_steps": s.eval_every,
        "eval_generation.max_new_tokens": MAX_NEW_TOKENS,
        "eval_generation.batch_size": 256,
        "eval_generation.seed": s.seed + 2,
    }


# ----------------------------------------------------------------------------------------- (f) report

METHOD_STYLE = {"copg": ("CoPG", "o"), "ipo": ("IPO", "s"), "dpo": ("DPO", "^")}


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """The run of each method with the highest final reward-model reward."""
    best = {}
    for run in runs:
        if run["method"] not in best or run["reward"] > best[run["method"]]["reward"]:
            best[run["method"]] = run
    return best


def markdown_table(reference: dict, runs: list[dict]) -> str:
    lines = [
        "| method | β | reward (RM) ± s.e. | KL(π‖π_ref) | true sort reward | exactly sorted | length |",
        "|---|---|---|---|---|---|---|",
    ]
    best = best_runs(runs)
    for r in [reference, *runs]:
        beta = "–" if r["beta"] is None else f"{r['beta']:g}"
        mark = " **(best)**" if best.get(r["method"]) is r else ""
        lines.append(
            f"| {r['method']}{mark} | {beta} | {r['reward']:.3f} ± {r['reward_stderr']:.3f} | {r['kl']:.3f} "
            f"| {r['true_reward']:.3f} | {r['exact']:.3f} | {r['length']:.2f} |"
        )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[dict], reference: dict, path: Path) -> None:
    """Figs. 2-4: the reward model's reward of generations over steps, a panel per method, a line per beta."""
    plt = _pyplot()
    methods = [m for m in METHOD_STYLE if any(r["method"] == m for r in runs)]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for r in (r for r in runs if r["method"] == method):
            ax.plot(
                [c["step"] for c in r["curve"]], [c["reward"] for c in r["curve"]], label=f"β={r['beta']:g}"
            )
        ax.axhline(reference["reward"], color="gray", linestyle="--", linewidth=1)
        ax.set(title=METHOD_STYLE[method][0], xlabel="step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("reward of generations (RM)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reward_vs_beta(runs: list[dict], reference: dict, path: Path) -> None:
    """Fig. 5: final reward against beta (log scale), error bars = standard error."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, (name, marker) in METHOD_STYLE.items():
        rows = sorted((r for r in runs if r["method"] == method), key=lambda r: r["beta"])
        if rows:
            ax.errorbar(
                [r["beta"] for r in rows], [r["reward"] for r in rows],
                yerr=[r["reward_stderr"] for r in rows], marker=marker, capsize=3, label=name,
            )  # fmt: skip
    ax.axhline(reference["reward"], color="gray", linestyle="--", linewidth=1, label="π_ref (SFT)")
    ax.set(xscale="log", xlabel="β (IPO: τ)", ylabel="final reward (RM)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_best(runs: list[dict], path: Path) -> None:
    """Fig. 6: the best beta of each method over steps, with +- one standard error bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, run in best_runs(runs).items():
        steps = np.asarray([c["step"] for c in run["curve"]])
        mean = np.asarray([c["reward"] for c in run["curve"]])
        se = np.asarray([c["reward_stderr"] for c in run["curve"]])
        line = ax.plot(steps, mean, marker=METHOD_STYLE[method][1], markersize=3,
                       label=f"{METHOD_STYLE[method][0]} (β={run['beta']:g})")[0]  # fmt: skip
        ax.fill_between(steps, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel="reward of generations (RM)", title="best β of each method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ run


def run(out: Path, s: PaperSettings) -> dict:
    """The whole protocol into `out`; returns what results.json holds."""
    t0 = time.perf_counter()

    def say(text: str) -> None:
        print(f"{text} ({time.perf_counter() - t0:.0f}s)", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(s.seed)
    tokenizer, reference, reference_dir, sft_losses = demo.sft_reference(
        out, rng, s.sft_examples, s.sft_correct_fraction, s.sft_steps, s.seed
    )
    say(f"(a) SFT policy = pi_ref: NLL {sft_losses[0]:.3f} -> {np.mean(sft_losses[-20:]):.3f}")

    # (b) noisy preference pairs on the SFT policy's samples
    train_prompts = [demo.make_prompt(d) for d in demo.random_lists(rng, s.train_prompts + s.rm_eval_pairs)]
    eval_prompts = [demo.make_prompt(d) for d in demo.random_lists(rng, s.eval_prompts)]
    pairs, dropped = sample_pairs(tokenizer, reference, train_prompts, s.seed + 1)
    labelled = label_pairs(pairs, s.label_temperature, rng)
    prefs_train, prefs_eval = labelled[: -s.rm_eval_pairs], labelled[-s.rm_eval_pairs :]
    data_dir = out / "data"
    write_jsonl(data_dir / "prefs_train.jsonl", prefs_train)
    write_jsonl(data_dir / "prefs_eval.jsonl", prefs_eval)
    write_jsonl(data_dir / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    say(f"(b) {len(prefs_train)} + {len(prefs_eval)} labelled pairs (left out: {dropped})")

    # (c) the reward model, the ground truth from here on
    rm_result = train(reward_model_config(out, s, data_dir, reference_dir))
    rm_dir = Path(rm_result.run_dir) / "export"
    reward_model = RewardModel(rm_dir, batch_size=256, max_length=64)
    rm_quality = {**agreement(reward_model, prefs_eval), "eval_loss": rm_result.metrics["eval/loss"]}
    say(f"(c) reward model: {rm_quality}")

    # (d) the pairs re-scored by it; reference log-probs once for every run
    scores = np.asarray(
        reward_model([r["prompt"] for r in prefs_train for _ in range(2)],
                     [c for r in prefs_train for c in (r["chosen"], r["rejected"])])
    ).reshape(-1, 2)  # fmt: skip
    rows = [
        {"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "rewards": score.tolist()}
        for r, score in zip(prefs_train, scores, strict=True)
    ]
    write_jsonl(data_dir / "train.jsonl", rows)
    steps = s.epochs * (len(rows) // s.batch_size)
    sizes = dict(batch_size=s.batch_size, lr=s.lr, steps=steps, seed=s.seed)
    extra = sweep_overrides(s, steps, rm_dir, data_dir)
    cfg0 = demo.train_config(out, "copg", 1.0, data_dir, reference_dir, **sizes, extra=extra)
    data = tokenize_for_model(cfg0, tokenizer, cfg0.data.path, cfg0.data.split)  # as train() will
    precompute_ref(reference, data, cfg0.data, cfg0.data.ref_cache,
                   checkpoint=str(reference_dir))  # fmt: skip
    say(f"(d) {len(rows)} pairs re-scored by the reward model; {steps} steps per run")

    # (e) the sweeps; the true sort reward of every final policy beside the reward model's
    pi_ref = ReferenceModel(from_pretrained(reference_dir, dtype=jnp.float32))
    true = dict(tokenizer=tokenizer, prompts=eval_prompts, samples=s.eval_samples, seed=s.seed + 2,
                reference=pi_ref)  # fmt: skip
    runs = []
    for method, betas in s.betas.items():
        for beta in betas:
            cfg = demo.train_config(out, method, beta, data_dir, reference_dir, **sizes, extra=extra)
            result = train(cfg)
            policy = from_pretrained(Path(result.run_dir) / "export", dtype=jnp.float32)
            measured = demo.evaluate_policy(policy, **true)
            points = curve(Path(result.run_dir))
            runs.append({
                "method": method, "beta": beta, **points[-1], "curve": points,
                "true_reward": measured["reward"], "exact": measured["exact"],
            })  # fmt: skip
            say(f"(e) {method} beta={beta:g}: reward {points[-1]['reward']:.3f}, KL {points[-1]['kl']:.3f}")
    start = runs[0]["curve"][0]  # step 0: pi_ref, the same for every run
    measured = demo.evaluate_policy(reference, **true)
    ref_row = {"method": "reference (SFT)", "beta": None, **start, "curve": [start],
               "true_reward": measured["reward"], "exact": measured["exact"]}  # fmt: skip

    # (f) report
    table = markdown_table(ref_row, runs)
    best = best_runs(runs)
    order = sorted(best, key=lambda m: -best[m]["reward"])
    summary = " > ".join(
        f"{METHOD_STYLE[m][0]} ({best[m]['reward']:.3f}, β={best[m]['beta']:g})" for m in order
    )
    results = {
        "settings": dataclasses.asdict(s),
        "reference": ref_row,
        "runs": runs,
        "reward_model": rm_quality,
        "data": {"pairs": len(rows), "dropped": dropped, "steps": steps},
        "ordering": order,
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    header = (
        f"# Sec. 6 protocol at CPU scale: sorting digits\n\n{len(rows)} preference pairs of the SFT policy, "
        f"labelled Bradley-Terry on the true reward (T = {s.label_temperature}); reward model (train-rm) "
        f"held-out accuracy {rm_quality['label_accuracy']:.3f} on the labels, "
        f"{rm_quality['true_order_accuracy']:.3f} on the true order. {s.epochs} epochs = {steps} steps of "
        f"{s.batch_size} pairs, Adam lr {s.lr}, {s.warmup_fraction:.0%} warm-up; reward of generations on "
        f"{s.eval_prompts} held-out prompts x {s.eval_samples} samples every {s.eval_every} steps. IPO's β "
        f"is its τ.\n\nBest final reward: {summary}.\n"
    )
    (out / "results.md").write_text(f"{header}\n{table}\n")
    plot_curves(runs, ref_row, out / "curves.png")
    plot_reward_vs_beta(runs, ref_row, out / "reward_vs_beta.png")
    plot_best(runs, out / "best.png")
    print(header)
    print(table)
    say(f"wrote {out}/results.md, results.json, curves.png, reward_vs_beta.png, best.png")
    demo.finish_output_folder(out, "paper")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """`copg paper` (`python -m copg_jax.experiments.paper`): the paper's Sec. 6 protocol on CPU."""
    args = demo.experiment_args(
        "paper", main.__doc__, "reduced sizes and one beta per method (for tests)", argv
    )
    settings = dataclasses.replace(QUICK if args.quick else PaperSettings(), seed=args.seed)
    run(Path(args.out), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
