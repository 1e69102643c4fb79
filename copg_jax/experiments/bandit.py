"""The paper's toy bandits (arXiv 2406.19185, Sec. 5): learn a softmax policy from off-policy samples.

A single prompt with n arms ("completions"), fixed rewards R and a reference policy pi_ref; samples come from
behaviour policies with full support, never from pi. The target is the KL-regularised optimum, in closed form,
    pi* = argmax_pi J(pi),  J(pi) = E_pi[R] - beta KL(pi || pi_ref),  pi* = pi_ref exp(R / beta) / Z,
and J(pi*) - J(pi) = beta KL(pi || pi*) exactly (the regret).

Two presets:

* `--paper`: Fig. 1 of the paper. 3 arms, R = (2.5, 2, 1), pi_ref uniform; a fixed dataset of 10^4 pairs
  (y, y'), y ~ mu1 = (0.1, 0.2, 0.7) and y' ~ mu2 = (0.05, 0.05, 0.9); beta = 0.5; Adam lr 1e-3, batches of
  512 pairs, 100 epochs (20 steps each, the last batch of an epoch partial); metric the regret. Methods:
  CoPG; off-policy PG with b = 0 (`pg`), with the value baseline b = E_{y~pi}[R(y)] computed exactly
  (`pg_value`), and (not in the paper: an oracle no LLM run has) with the regularised value b = J(pi) computed
  exactly (`pg_value_reg`), all REINFORCE on the 2 * 10^4 samples without importance weights
  (-beta log pi/pi_ref included in the reward, as in R_b); IPO (tau = beta) on Bradley-Terry preferences
  drawn once with P(y > y') = sigmoid(R(y) - R(y')).
* default: 20 random arms (rewards ~ U(0, 1), pi_ref and mu softmaxes of N(0, 1) logits), fresh pairs from mu
  each step, Adam with cosine decay. Methods: CoPG; IPO and DPO on preferences (the higher-reward arm of each
  pair is chosen; IPO's tau = beta, the mapping under which CoPG with rewards +-1/4 is beta^2 * IPO); naive
  off-policy PG without importance sampling (no baseline); and the same PG with a leave-one-out baseline on
  R_b, whose gradient is CoPG's divided by 2 beta K.

    python -m copg_jax.experiments.bandit --paper [--epochs 100 --seed 0 --out runs/bandit_paper]
    python -m copg_jax.experiments.bandit [--steps 2000 --arms 20 --beta 0.5 --batch-size 256 --lr 0.05]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from copg_jax import losses
from copg_jax.config import MAX_SEED

# method name -> (registered loss name, the `beta` handed to that loss as a function of the bandit's beta)
METHODS = {
    "copg": ("copg", lambda beta: beta),
    "ipo": ("ipo", lambda beta: beta),
    "dpo": ("dpo", lambda beta: beta),
    "offpolicy_pg": ("offpolicy_pg", lambda beta: beta),
    "offpolicy_pg_loo": ("offpolicy_pg_loo", lambda beta: beta),
}


class Bandit(NamedTuple):
    """Arm rewards and the log-probs of the reference and behaviour policies, each [n]."""

    rewards: jax.Array
    log_ref: jax.Array
    log_mu: jax.Array


def make_bandit(seed: int, n_arms: int) -> Bandit:
    """Rewards ~ U(0, 1); pi_ref and mu softmaxes of independent N(0, 1) logits (full support)."""
    k_reward, k_ref, k_mu = jax.random.split(jax.random.PRNGKey(seed), 3)
    return Bandit(
        rewards=jax.random.uniform(k_reward, (n_arms,)),
        log_ref=jax.nn.log_softmax(jax.random.normal(k_ref, (n_arms,))),
        log_mu=jax.nn.log_softmax(jax.random.normal(k_mu, (n_arms,))),
    )


def optimal_log_policy(log_ref, rewards, beta: float):
    """log pi* with pi* proportional to pi_ref exp(R / beta); [n], float64 numpy."""
    logits = np.asarray(log_ref, np.float64) + np.asarray(rewards, np.float64) / beta
    return logits - _logsumexp(logits)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def policy_stats(log_pi, bandit: Bandit, beta: float) -> dict[str, float]:
    """KL(pi || pi*), the regret J(pi*) - J(pi), E_pi[R], KL(pi || pi_ref), J(pi) and pi itself, in float64.

    Args:
      log_pi: [n] log-probs (or logits) of the policy.
    """
    log_pi = np.asarray(log_pi, np.float64)
    log_pi = log_pi - _logsumexp(log_pi)
    pi, rewards = np.exp(log_pi), np.asarray(bandit.rewards, np.float64)
    expected_reward = pi @ rewards
    kl_to_ref = pi @ (log_pi - np.asarray(bandit.log_ref, np.float64))
    kl = float(kl_to_optimal(log_pi[None], bandit, beta)[0])
    return {
        "kl_to_optimal": kl,
        "regret": beta * kl,  # J(pi*) - J(pi), without the cancellation of subtracting the two
        "expected_reward": float(expected_reward),
        "kl_to_ref": float(kl_to_ref),
        "objective": float(expected_reward - beta * kl_to_ref),
        "probs": pi.tolist(),
    }


def kl_to_optimal(logits, bandit: Bandit, beta: float) -> np.ndarray:
    """KL(pi || pi*) in float64 (float32 would floor it near 1e-7) for [S, n] policy logits; returns [S]."""
    logits = np.asarray(logits, np.float64)
    log_pi = logits - _logsumexp(logits)
    return np.sum(
        np.exp(log_pi) * (log_pi - optimal_log_policy(bandit.log_ref, bandit.rewards, beta)), axis=-1
    )


def train(
    bandit: Bandit,
    loss_fn: losses.LossFn,
    loss_beta: float,
    *,
    steps: int,
    batch_size: int,
    k: int,
    lr: float,
    seed: int,
) -> jax.Array:
    """Trains softmax logits, initialised at log pi_ref, on fresh [batch_size, k] samples from mu each step.

    Args:
      loss_beta: the `beta` argument of `loss_fn` (IPO's tau for ipo_loss).
    Returns:
      [steps, n] float32 policy logits after every step.
    """
    # Adam with a cosine decay to 0: the decay averages out the sampling noise of the last steps.
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    mask = jnp.ones((batch_size, k), bool)
    lengths = jnp.ones((batch_size, k), jnp.int32)  # an arm is a one-token completion

    def batch_loss(theta, arms):
        log_pi = jax.nn.log_softmax(theta)
        rewards = bandit.rewards[arms]
        return loss_fn(log_pi[arms], bandit.log_ref[arms], rewards, mask, loss_beta, lengths=lengths)[0]

    def step(carry, key):
        theta, opt_state = carry
        arms = jax.random.categorical(key, bandit.log_mu, shape=(batch_size, k))
        grads = jax.grad(batch_loss)(theta, arms)
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, opt_state), theta

    @jax.jit
    def run(theta):
        keys = jax.random.split(jax.random.PRNGKey(seed), steps)
        _, trajectory = jax.lax.scan(step, (theta, optimizer.init(theta)), keys)
        return trajectory

    return run(bandit.log_ref)


# ---------------------------------------------------------------------------------- the paper's Fig. 1


PAPER_REWARDS = (2.5, 2.0, 1.0)
PAPER_MU1 = (0.1, 0.2, 0.7)  # behaviour policy of y, the first completion of each pair
PAPER_MU2 = (0.05, 0.05, 0.9)  # behaviour policy of y', the second
PAPER_METHODS = ("copg", "ipo", "pg", "pg_value", "pg_value_reg")


@dataclasses.dataclass(frozen=True)
class PaperSettings:
    """Fig. 1's settings (the defaults are the paper's)."""

    pairs: int = 10_000
    beta: float = 0.5
    lr: float = 1e-3
    batch_size: int = 512
    epochs: int = 100
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.pairs / self.batch_size)


class PairData(NamedTuple):
    """The fixed dataset: arms [n, 2] int32 (y ~ mu1, y' ~ mu2) and first_preferred [n] bool, the
    Bradley-Terry label P(y > y') = sigmoid(R(y) - R(y'))."""

    arms: jax.Array
    first_preferred: jax.Array


def paper_bandit() -> Bandit:
    """R = (2.5, 2, 1), uniform pi_ref; `log_mu` is the law of one sample of the data, (mu1 + mu2) / 2."""
    mixture = (np.asarray(PAPER_MU1) + np.asarray(PAPER_MU2)) / 2
    return Bandit(
        rewards=jnp.asarray(PAPER_REWARDS, jnp.float32),
        log_ref=jnp.full(3, -np.log(3.0), jnp.float32),
        log_mu=jnp.log(jnp.asarray(mixture, jnp.float32)),
    )


def make_pairs(bandit: Bandit, n: int, seed: int) -> PairData:
    """n pairs y ~ mu1, y' ~ mu2 with a Bradley-Terry preference label each, drawn once."""
    k_first, k_second, k_label = jax.random.split(jax.random.PRNGKey(seed), 3)
    first = jax.random.categorical(k_first, jnp.log(jnp.asarray(PAPER_MU1)), shape=(n,))
    second = jax.random.categorical(k_second, jnp.log(jnp.asarray(PAPER_MU2)), shape=(n,))
    margin = bandit.rewards[first] - bandit.rewards[second]
    return PairData(jnp.stack([first, second], axis=1), jax.random.bernoulli(k_label, jax.nn.sigmoid(margin)))


def paper_loss(method: str, bandit: Bandit, beta: float) -> Callable:
    """(theta, arms [B, 2], first_preferred [B], mask [B, 2]) -> scalar loss of `method` (PAPER_METHODS)."""

    def loss(theta, arms, first_preferred, mask):
        log_pi = jax.nn.log_softmax(theta)
        policy, ref, rewards = log_pi[arms], bandit.log_ref[arms], bandit.rewards[arms]
        if method == "copg":
            return losses.copg_loss(policy, ref, rewards, mask, beta)[0]
        if method == "pg":
            return losses.offpolicy_pg_loss(policy, ref, rewards, mask, beta)[0]
        if method in ("pg_value", "pg_value_reg"):
            # Subtracting b from the rewards subtracts it from the advantages R_b - b: PG with baseline b, the
            # value of the reward (E_pi[R]) or of the regularised reward (J(pi) = E_pi[R_b]): at pi* every
            # arm's R_b is J(pi*), so only the latter leaves pi* a fixed point of off-policy PG
            probs = jnp.exp(log_pi)
            value = probs @ bandit.rewards
            if method == "pg_value_reg":
                value = value - beta * probs @ (log_pi - bandit.log_ref)
            value = jax.lax.stop_gradient(value)
            return losses.offpolicy_pg_loss(policy, ref, rewards - value, mask, beta)[0]
        if method == "ipo":  # only the labels: the preferred arm of each pair gets the higher reward
            order = jnp.where(first_preferred[:, None], jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
            return losses.ipo_loss(policy, ref, order, mask, beta, lengths=jnp.ones(arms.shape, jnp.int32))[0]
        raise ValueError(f"unknown method {method!r}; valid: {PAPER_METHODS}")

    return loss


def epoch_batches(n: int, s: PaperSettings) -> np.ndarray:
    """[epochs * steps_per_epoch, batch_size] pair indices, a fresh shuffle each epoch; -1 pads each
    epoch's last, partial batch."""
    rng = np.random.default_rng([s.seed, 1])
    padded = s.steps_per_epoch * s.batch_size
    order = [np.pad(rng.permutation(n), (0, padded - n), constant_values=-1) for _ in range(s.epochs)]
    return np.stack(order).reshape(-1, s.batch_size)


def train_on_pairs(loss: Callable, data: PairData, s: PaperSettings) -> jax.Array:
    """Adam (constant lr) from uniform logits over epochs of the fixed dataset; [steps, 3] logits per step."""
    optimizer = optax.adam(s.lr)

    def step(carry, rows):
        theta, opt_state = carry
        valid = rows >= 0
        safe = jnp.where(valid, rows, 0)
        mask = jnp.broadcast_to(valid[:, None], (rows.shape[0], 2))
        grads = jax.grad(loss)(theta, data.arms[safe], data.first_preferred[safe], mask)
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, opt_state), theta

    @jax.jit
    def run(theta, batches):
        return jax.lax.scan(step, (theta, optimizer.init(theta)), batches)[1]

    return run(jnp.zeros(3, jnp.float32), jnp.asarray(epoch_batches(len(data.arms), s)))


def paper_table(rows: dict[str, dict]) -> str:
    """Markdown table: method | regret | E_pi[R] | KL(pi || pi_ref) | pi."""
    lines = ["| method | regret J(pi*) - J(pi) | E_pi[R] | KL(pi || pi_ref) | pi |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        probs = ", ".join(f"{p:.3f}" for p in row["probs"])
        lines.append(
            f"| {name} | {row['regret']:.2e} | {row['expected_reward']:.4f} | {row['kl_to_ref']:.4f} "
            f"| ({probs}) |"
        )
    return "\n".join(lines)


def run_paper(s: PaperSettings, methods=PAPER_METHODS, out: Path | None = None) -> dict:
    """Fig. 1: every method on one fixed dataset; returns settings, final rows and per-step regret curves;
    writes results.md, results.json and regret.png under `out` when given."""
    bandit = paper_bandit()
    data = make_pairs(bandit, s.pairs, s.seed)
    rows = {
        "pi_ref (start)": policy_stats(bandit.log_ref, bandit, s.beta),
        "mu1": policy_stats(np.log(PAPER_MU1), bandit, s.beta),
        "mu2": policy_stats(np.log(PAPER_MU2), bandit, s.beta),
    }
    curves = {}
    for method in methods:
        start = time.perf_counter()
        trajectory = train_on_pairs(paper_loss(method, bandit, s.beta), data, s)
        rows[method] = {
            **policy_stats(trajectory[-1], bandit, s.beta),
            "seconds": time.perf_counter() - start,
        }
        curves[method] = s.beta * kl_to_optimal(trajectory, bandit, s.beta)
    rows["pi* (closed form)"] = policy_stats(
        optimal_log_policy(bandit.log_ref, bandit.rewards, s.beta), bandit, s.beta
    )
    preferred = float(np.mean(np.asarray(data.first_preferred)))
    header = (
        f"Bandit (paper Fig. 1): 3 arms, R = {PAPER_REWARDS}, pi_ref uniform, {s.pairs} pairs y ~ mu1 = "
        f"{PAPER_MU1}, y' ~ mu2 = {PAPER_MU2} (y preferred in {preferred:.3f} of them), beta = {s.beta}, "
        f"Adam lr {s.lr}, batch {s.batch_size}, {s.epochs} epochs ({s.epochs * s.steps_per_epoch} steps), "
        f"seed {s.seed}."
    )
    result = {"settings": dataclasses.asdict(s), "results": rows, "curves": curves}
    if out is not None:
        write_results(out, header, paper_table(rows), result, "regret.png")
        plot_curves(
            curves, out / "regret.png", f"3-armed bandit (Fig. 1), beta={s.beta}, fixed off-policy pairs",
            ylabel="regret J(pi*) - J(pi)", steps_per_unit=s.steps_per_epoch, xlabel="epoch",
        )  # fmt: skip
    return result


def write_results(out: Path, header: str, table: str, result: dict, figure: str) -> None:
    """Prints header and table; writes results.md and results.json (without the curves) to `out`."""
    print(header)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(header + "\n\n" + table + "\n")
    saved = {k: v for k, v in result.items() if k != "curves"}
    (out / "results.json").write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / figure}")


def plot_curves(
    curves: dict[str, np.ndarray],
    path: Path,
    title: str,
    ylabel: str = "KL(pi || pi*)",
    steps_per_unit: int = 1,
    xlabel: str = "step",
) -> None:
    """Saves curves (one value per step) against steps / steps_per_unit, log scale, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        # offpolicy_pg_loo has CoPG's gradient up to a constant and lies on top of it: dash it to see both.
        style = {"linestyle": "--", "linewidth": 2.5} if name == "offpolicy_pg_loo" else {"linewidth": 1.5}
        x = np.arange(1, len(curve) + 1) / steps_per_unit
        ax.plot(x, np.maximum(curve, 1e-16), label=name, **style)
    ax.axhline(1e-3, color="gray", linestyle=":", linewidth=1, label="1e-3")
    ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: method | KL(pi || pi*) | E_pi[R] | E_pi[R] - beta KL(pi || pi_ref)."""
    lines = [
        "| method | KL(pi || pi*) | E_pi[R] | E_pi[R] - beta KL(pi || pi_ref) |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['kl_to_optimal']:.3e} | {row['expected_reward']:.4f} | {row['objective']:.4f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m copg_jax.experiments.bandit", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--paper", action="store_true", help="the paper's Fig. 1 (3 arms, fixed pairs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3 --paper, 0.05 else)")
    parser.add_argument("--batch-size", type=int, help="pairs per step (default 512 --paper, 256 else)")
    parser.add_argument("--methods", help=f"comma-separated subset of {list(PAPER_METHODS)} (--paper) or "
                        f"{list(METHODS)}")  # fmt: skip
    parser.add_argument("--out", type=Path, help="results folder (default runs/bandit_paper or runs/bandit)")
    parser.add_argument("--epochs", type=int, default=100, help="--paper: passes over the fixed dataset")
    parser.add_argument("--pairs", type=int, default=10_000, help="--paper: size of the fixed dataset")
    parser.add_argument("--steps", type=int, default=2000, help="random preset: steps (fresh pairs each)")
    parser.add_argument("--arms", type=int, default=20, help="random preset: arms")
    parser.add_argument("--k", type=int, default=2, help="random preset: arms sampled per prompt, >= 2")
    args = parser.parse_args(argv)
    if not 0 <= args.seed < MAX_SEED - 1:  # seed + 1 seeds the evaluation: a JAX key, 32 bits
        parser.error(f"--seed must be in [0, {MAX_SEED - 2}]")
    paper = args.paper
    args.lr = args.lr if args.lr is not None else (1e-3 if paper else 0.05)
    args.batch_size = args.batch_size if args.batch_size is not None else (512 if paper else 256)
    args.out = args.out or Path("runs/bandit_paper" if paper else "runs/bandit")
    valid = PAPER_METHODS if paper else tuple(METHODS)
    for name in ("steps", "arms", "batch_size", "epochs", "pairs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.k < 2:
        parser.error(f"--k must be >= 2 (the contrastive losses need pairs), got {args.k}")
    if args.beta <= 0 or args.lr <= 0:
        parser.error(f"--beta and --lr must be > 0, got beta={args.beta}, lr={args.lr}")
    args.methods = [m.strip() for m in (args.methods or ",".join(valid)).split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in valid]
    if unknown:
        parser.error(f"unknown --methods {unknown}; valid{' with --paper' * paper}: {list(valid)}")
    return args


def run_random(args: argparse.Namespace) -> dict:
    """The 20-arm preset: every method on fresh samples from mu; writes results and kl.png under args.out."""
    bandit = make_bandit(args.seed, args.arms)
    rows = {
        "pi_ref (start)": policy_stats(bandit.log_ref, bandit, args.beta),
        "mu (behaviour)": policy_stats(bandit.log_mu, bandit, args.beta),
    }
    curves = {}
    for method in args.methods:
        loss_name, loss_beta = METHODS[method]
        start = time.perf_counter()
        trajectory = train(
            bandit,
            losses.get_loss(loss_name),
            loss_beta(args.beta),
            steps=args.steps,
            batch_size=args.batch_size,
            k=args.k,
            lr=args.lr,
            seed=args.seed + 1,
        )
        rows[method] = policy_stats(trajectory[-1], bandit, args.beta)
        rows[method]["seconds"] = time.perf_counter() - start
        curves[method] = kl_to_optimal(trajectory, bandit, args.beta)
    rows["pi* (closed form)"] = policy_stats(
        optimal_log_policy(bandit.log_ref, bandit.rewards, args.beta), bandit, args.beta
    )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    header = (
        f"Bandit: {args.arms} arms, beta={args.beta}, K={args.k}, batch={args.batch_size}, "
        f"steps={args.steps}, Adam lr={args.lr} (cosine decay), seed={args.seed}; samples from mu != pi_ref."
    )
    result = {"settings": settings, "results": rows, "curves": curves}
    write_results(args.out, header, results_table(rows), result, "kl.png")
    plot_curves(
        curves, args.out / "kl.png", f"Softmax bandit, {args.arms} arms, beta={args.beta}, off-policy data"
    )
    return result


def main(argv=None) -> dict:
    """Runs every method of the preset, prints the table, writes results.md, results.json and a figure."""
    args = parse_args(argv)
    if args.paper:
        settings = PaperSettings(args.pairs, args.beta, args.lr, args.batch_size, args.epochs, args.seed)
        return run_paper(settings, args.methods, args.out)
    return run_random(args)


if __name__ == "__main__":
    main()
