"""The paper's toy bandit (arXiv 2406.19185, Sec. 5.1): learn a softmax policy from off-policy samples.

A single prompt with n arms ("completions"), fixed rewards R, a reference policy pi_ref and a behaviour
policy mu != pi_ref with full support. Each step draws a fresh batch of B prompts x K arms from mu and takes
one optax step on a loss from copg_jax.losses. The target is the KL-regularised optimum, in closed form,
    pi* = argmax_pi E_pi[R] - beta KL(pi || pi_ref) = pi_ref exp(R / beta) / Z.

Methods: CoPG (rewards as is); IPO and DPO on preferences (the higher-reward arm of each pair is chosen;
IPO's tau = beta, the mapping under which CoPG with rewards +-1/4 is beta^2 * IPO); naive off-policy PG
without importance sampling (no baseline); and the same PG with a leave-one-out baseline on R_b, whose
gradient is CoPG's divided by 2 beta K.

    python -m copg_jax.experiments.bandit [--steps 2000 --arms 20 --beta 0.5 --batch-size 256 --lr 0.05]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from copg_jax import losses

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
    """KL(pi || pi*), E_pi[R] and J(pi) = E_pi[R] - beta KL(pi || pi_ref), in float64.

    Args:
      log_pi: [n] log-probs (or logits) of the policy.
    """
    log_pi = np.asarray(log_pi, np.float64)
    log_pi = log_pi - _logsumexp(log_pi)
    pi, rewards = np.exp(log_pi), np.asarray(bandit.rewards, np.float64)
    expected_reward = pi @ rewards
    return {
        "kl_to_optimal": float(kl_to_optimal(log_pi[None], bandit, beta)[0]),
        "expected_reward": float(expected_reward),
        "objective": float(expected_reward - beta * pi @ (log_pi - np.asarray(bandit.log_ref, np.float64))),
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


def plot_curves(curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Saves KL(pi || pi*) against steps, log scale, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        # offpolicy_pg_loo has CoPG's gradient up to a constant and lies on top of it: dash it to see both.
        style = {"linestyle": "--", "linewidth": 2.5} if name == "offpolicy_pg_loo" else {"linewidth": 1.5}
        ax.plot(np.arange(1, len(curve) + 1), np.maximum(curve, 1e-16), label=name, **style)
    ax.axhline(1e-3, color="gray", linestyle=":", linewidth=1, label="1e-3")
    ax.set(xlabel="step", ylabel="KL(pi || pi*)", yscale="log", title=title)
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
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", type=int, default=20)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=256, help="prompts (groups of K arms) per step")
    parser.add_argument("--k", type=int, default=2, help="completions (arms) sampled per prompt, >= 2")
    parser.add_argument("--lr", type=float, default=0.05, help="peak Adam learning rate (cosine decay to 0)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bandit"))
    args = parser.parse_args(argv)
    for name in ("steps", "arms", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.k < 2:
        parser.error(f"--k must be >= 2 (the contrastive losses need pairs), got {args.k}")
    if args.beta <= 0 or args.lr <= 0:
        parser.error(f"--beta and --lr must be > 0, got beta={args.beta}, lr={args.lr}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; valid: {list(METHODS)}")
    return args


def main(argv=None) -> dict:
    """Runs every method, prints the table, writes results.md, results.json and kl.png under --out."""
    args = parse_args(argv)
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
    table = results_table(rows)
    print(header)
    print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(header + "\n\n" + table + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"settings": settings, "results": rows}, indent=2) + "\n"
    )
    plot_curves(
        curves, args.out / "kl.png", f"Softmax bandit, {args.arms} arms, beta={args.beta}, off-policy data"
    )
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'}, {args.out / 'kl.png'}")
    return {"settings": settings, "results": rows, "curves": curves}


if __name__ == "__main__":
    main()
