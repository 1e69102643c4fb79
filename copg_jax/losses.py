"""CoPG, IPO, DPO and off-policy PG losses over [B, K] sequence log-probs.

Every loss is a pure, jit-able function with the same signature

    loss_fn(policy_logps, ref_logps, rewards, mask, beta, *, lengths=None, length_average=None)
        -> (scalar loss, dict of scalar metrics)

over B prompts with K completion slots each; `mask[b, k]` says whether slot k of prompt b holds a completion,
so prompts may have any number of valid completions. Masked slots are never read: they may hold garbage, even
NaN or inf, without changing the value or the gradient (inputs are zeroed with `jnp.where` before use, whose
gradient does not multiply through the discarded branch).

Notation (arXiv 2406.19185): rho(y) = log pi(y) - log pi_ref(y) is the sequence log-ratio, divided by the
completion length when length-averaged (arXiv 2406.19188); R_b(y) = R(y) - beta * rho(y) is the regularised
reward.

Names and defaults. A loss name that TRL's DPOTrainer also has means what TRL means by default:
`ipo` = TRL `loss_type="ipo"`, which averages each log-ratio over its completion tokens, so `ipo` is
length-averaged unless `length_average=False`; `dpo` = TRL `loss_type="sigmoid"` (summed log-ratios; with
`length_average=True` it is TRL's "sigmoid_norm"). `length_average=None` takes the name's default
(DEFAULT_LENGTH_AVERAGE). The metrics are TRL's as well: rewards/chosen, rewards/rejected, rewards/margins and
rewards/accuracies are beta times the *summed* log-ratios whatever the loss averages (tests/test_trl.py
checks both against TRL's own loss code).

Relations that the tests check exactly:
* CoPG pair loss vs IPO (paper Property 3). With K = 2 and rewards R(y_w) = -R(y_l) = 1/4 on (chosen,
  rejected) -- what preference rows become (`data.preference_rewards`) --
  R_b(y_w) - R_b(y_l) = 1/2 - beta * h with h = rho(y_w) - rho(y_l), so
      copg = (1/2 - beta * h)^2 = beta^2 * (h - 1/(2 beta))^2 = beta^2 * ipo(tau = beta),
  since IPO's per-pair loss is (h - 1/(2 tau))^2: CoPG(beta) on preferences is IPO with tau = beta, in value
  (times beta^2) and gradient, summed or length-averaged alike:
      copg_loss(beta=b) == b**2 * ipo_loss(beta=b)    (same length_average for both).
  In the paper's ascent-direction form, the CoPG direction (R_b(y_w) - R_b(y_l)) (grad log pi(y_w) - grad
  log pi(y_l)) equals -(beta / 2) grad ipo, i.e. -beta (h - 1/(2 tau)) grad h, since
  (1/2 - beta h) = -beta (h - 1/(2 tau)). With a reward gap D instead of 1/2, tau = beta / (2 D).
* CoPG gradient. For one pair, d/dtheta (R_b(y) - R_b(y'))^2
      = -2 beta (R_b(y) - R_b(y')) (grad log pi(y) - grad log pi(y')),
  i.e. -2 beta times the paper's contrastive ascent direction.
* K > 2 completions. The loss is the all-pairs sum l = 1/(K - 1) sum_{i<j} (R_b(y_i) - R_b(y_j))^2. With
  a_i = R_b(y_i), sum_{i<j} (a_i - a_j)^2 = K sum_i (a_i - mean a)^2, whose derivative over K - 1 is
  2 K / (K - 1) (a_i - mean a) = 2 (a_i - mean_{j != i} a_j); so per prompt
      grad l = -2 beta * sum_i A_i grad log pi(y_i),   A_i = R_b(y_i) - mean_{j != i} R_b(y_j),
  the paper's leave-one-out (RLOO) form of the CoPG gradient with K samples (appendix, Eq. 65): each
  completion's baseline is the mean regularised reward of the others. It is 2 beta K times the gradient of
  the leave-one-out off-policy PG surrogate below. On-policy (mu = pi) its expectation is -2 K beta grad J(pi)
  with J(pi) = E_pi[R] - beta KL(pi || pi_ref) (-4 beta grad J for the pair loss).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]

# Whether each loss divides log-ratios by completion length when called with length_average=None: TRL's
# default for the names TRL has (its "ipo" averages, its "sigmoid" = our dpo sums), summed for the others.
DEFAULT_LENGTH_AVERAGE = {"copg": False, "ipo": True, "dpo": False, "offpolicy_pg": False}


def _averaged(name: str, length_average: bool | None) -> bool:
    return DEFAULT_LENGTH_AVERAGE[name] if length_average is None else length_average


class _Inputs(NamedTuple):
    """Sanitised [B, K] inputs: masked slots zeroed, dtype at least float32."""

    policy_logps: jax.Array  # raw sequence log-probs
    ref_logps: jax.Array
    rewards: jax.Array
    mask: jax.Array  # bool
    log_ratio: jax.Array  # rho, length-averaged if asked
    scaled_policy_logps: jax.Array  # log pi, divided by length if length-averaged


def _prepare(policy_logps, ref_logps, rewards, mask, lengths, length_average: bool) -> _Inputs:
    chex.assert_rank([policy_logps, ref_logps, rewards, mask], 2)
    chex.assert_equal_shape([policy_logps, ref_logps, rewards, mask])
    chex.assert_type(mask, bool)
    dtype = jnp.result_type(policy_logps.dtype, ref_logps.dtype, rewards.dtype, jnp.float32)

    def clean(x):
        return jnp.where(mask, x.astype(dtype), jnp.zeros((), dtype))

    policy, ref, rew = clean(policy_logps), clean(ref_logps), clean(rewards)
    log_ratio, scaled_policy = policy - ref, policy
    if length_average:
        if lengths is None:
            raise ValueError(
                "length-averaged log-ratios need `lengths` ([B, K] completion token counts), got None "
                "(ipo averages by default, as TRL's loss_type='ipo'; pass length_average=False to sum)"
            )
        chex.assert_equal_shape([lengths, mask])
        # Valid completions have >= 1 token (the data pipeline validates this); the clamp only keeps
        # masked slots, whose length is 0, away from 0/0.
        denom = jnp.where(mask, jnp.maximum(lengths, 1), 1).astype(dtype)
        log_ratio, scaled_policy = log_ratio / denom, policy / denom
    return _Inputs(policy, ref, rew, mask, log_ratio, scaled_policy)


def _masked_mean(values: jax.Array, where: jax.Array) -> jax.Array:
    """Mean of `values` over `where` (same shape); 0 when nothing is selected."""
    total = jnp.sum(jnp.where(where, values, 0))
    return total / jnp.maximum(jnp.sum(where), 1).astype(total.dtype)


def _preference_pairs(x: _Inputs) -> jax.Array:
    """[B, K, K] bool: (i, j) both valid with rewards[i] > rewards[j], i.e. i chosen over j (ties skipped)."""
    both = x.mask[:, :, None] & x.mask[:, None, :]
    return both & (x.rewards[:, :, None] > x.rewards[:, None, :])


# implicit-reward margins within this fraction of the log-probs they come from are float32 rounding: ties
TIE_RELATIVE = 1e-5


def _metrics(x: _Inputs, beta, loss: jax.Array, loss_count: jax.Array, pairs: jax.Array) -> Metrics:
    """TRL's metrics; pairwise ones over `pairs` [B, K, K] (i chosen, j rejected).

    The implicit rewards are beta times the summed log-ratios, as TRL logs them, also when the loss averages
    the log-ratios over completion length. A pair counts as ordered right (`rewards/accuracies`) when its
    margin exceeds the float32 rounding of the log-probs it comes from (`TIE_RELATIVE`): within it, a tie.

    Besides the means, the counts they average over (`loss/count`, `pairs/count`, `completions/count`), so
    that `combine_metrics` can merge microbatches, hosts and eval batches into the full-batch values.
    """
    implicit = beta * (x.policy_logps - x.ref_logps)  # [B, K] implicit reward, summed log-ratio
    chosen = jnp.broadcast_to(implicit[:, :, None], pairs.shape)
    rejected = jnp.broadcast_to(implicit[:, None, :], pairs.shape)
    # the rounding the implicit rewards carry: the reference log-probs come from another program (the
    # cache's layout, mesh), so a policy equal to it scores rewards of float32 noise, which ordered pairs
    # at random (an accuracy of 0.2-0.5 at step 0); a margin within it is a tie, not ordered right (TRL's >)
    scale = jnp.abs(x.policy_logps) + jnp.abs(x.ref_logps)
    noise = TIE_RELATIVE * jnp.abs(beta) * (scale[:, :, None] + scale[:, None, :])
    return {
        "loss": loss,
        "rewards/chosen": _masked_mean(chosen, pairs),
        "rewards/rejected": _masked_mean(rejected, pairs),
        "rewards/margins": _masked_mean(chosen - rejected, pairs),
        "rewards/accuracies": _masked_mean((chosen - rejected > noise).astype(implicit.dtype), pairs),
        "logps/policy": _masked_mean(x.policy_logps, x.mask),
        "logps/ref": _masked_mean(x.ref_logps, x.mask),
        "kl/seq": _masked_mean(x.policy_logps - x.ref_logps, x.mask),
        "reward/mean": _masked_mean(x.rewards, x.mask),
        "loss/count": loss_count.astype(implicit.dtype),
        "pairs/count": jnp.sum(pairs).astype(implicit.dtype),
        "completions/count": jnp.sum(x.mask).astype(implicit.dtype),
    }


def metric_count(name: str) -> str:
    """The count metric that the mean metric `name` averages over (losses' metric names)."""
    if name == "loss" or name.startswith("router/"):
        return "loss/count"
    if name.startswith("rewards/"):
        return "pairs/count"
    return "completions/count"


def combine_metrics(metrics: Metrics, axis: int = 0) -> Metrics:
    """Merges metrics stacked along `axis` (microbatches, eval batches) into those of the union.

    Counts (names ending in "/count") are summed; every mean is weighted by its own count (`metric_count`),
    so pair metrics weigh by pairs, per-completion metrics by completions and the loss by what it averages
    over: the result equals the metrics of the concatenated batch. Works on jax and numpy arrays.
    """
    out = {}
    for name, value in metrics.items():
        if name.endswith("/count"):
            out[name] = value.sum(axis)
            continue
        count = metrics[metric_count(name)]
        total = count.sum(axis)
        weighted = (value * count).sum(axis)
        # the where keeps 0/0 (no pair in any microbatch) at 0 rather than nan
        out[name] = weighted / (total + (total == 0))
    return out


def copg_loss(policy_logps, ref_logps, rewards, mask, beta, *, lengths=None, length_average=None):
    """Contrastive Policy Gradient loss, all pairs of each prompt's completions.

    Per prompt with K_b >= 2 valid completions, l_b = 1/(K_b - 1) * sum_{i<j} (R_b(y_i) - R_b(y_j))^2; the
    loss is the mean of l_b over prompts with K_b >= 2 (0 if none). K_b = 2 is the paper's pair loss.

    The all-pairs sum is computed as sum_{i<j} (a_i - a_j)^2 = K_b * sum_i (a_i - mean(a))^2: O(K) instead of
    O(K^2), and, unlike K * sum a^2 - (sum a)^2, free of cancellation when the R_b are large and close (the
    mean is subtracted before squaring).

    Args:
      policy_logps: [B, K] float summed log pi(y | x) per completion.
      ref_logps: [B, K] float summed log pi_ref(y | x).
      rewards: [B, K] float rewards R(x, y).
      mask: [B, K] bool, True where the completion exists.
      beta: scalar > 0, KL regularisation strength.
      lengths: [B, K] int completion token counts; required when length-averaging.
      length_average: divide each log-ratio by its completion length (None = False for copg).
    Returns:
      (scalar loss, metrics dict of scalars); pairwise metrics use the pairs with strictly different rewards.
    """
    x = _prepare(policy_logps, ref_logps, rewards, mask, lengths, _averaged("copg", length_average))
    regularised = jnp.where(x.mask, x.rewards - beta * x.log_ratio, 0)
    count = jnp.sum(x.mask, axis=-1).astype(regularised.dtype)  # [B]
    mean = jnp.sum(regularised, axis=-1) / jnp.maximum(count, 1)
    centred = jnp.where(x.mask, regularised - mean[:, None], 0)
    per_prompt = count / jnp.maximum(count - 1, 1) * jnp.sum(centred**2, axis=-1)
    loss = _masked_mean(per_prompt, count >= 2)
    return loss, _metrics(x, beta, loss, jnp.sum(count >= 2), _preference_pairs(x))


def _pairwise_loss(per_pair: Callable[[jax.Array], jax.Array], x: _Inputs, beta):
    pairs = _preference_pairs(x)
    margin = x.log_ratio[:, :, None] - x.log_ratio[:, None, :]  # h = rho(chosen) - rho(rejected)
    loss = _masked_mean(per_pair(margin), pairs)
    return loss, _metrics(x, beta, loss, jnp.sum(pairs), pairs)


def ipo_loss(policy_logps, ref_logps, rewards, mask, beta, *, lengths=None, length_average=None):
    """IPO loss (h - 1/(2 tau))^2 with tau = beta, over preference pairs formed from rewards.

    Every pair (i, j) of valid completions of a prompt with rewards[i] > rewards[j] is a (chosen, rejected)
    pair (ties are skipped); h = rho(y_i) - rho(y_j). The loss is the mean over all pairs of the batch (0 if
    none). Only the order of the rewards matters. By default (length_average=None) each rho is averaged over
    its completion tokens, as TRL's loss_type="ipo" does, so `lengths` is needed; length_average=False gives
    the summed form. copg_loss(beta=b) with rewards (+1/4, -1/4) equals b**2 * ipo_loss(beta=b) under the
    same length_average (paper Property 3, module docstring).

    Args: as copg_loss; `beta` is IPO's tau.
    Returns: (scalar loss, metrics dict).
    """
    x = _prepare(policy_logps, ref_logps, rewards, mask, lengths, _averaged("ipo", length_average))
    return _pairwise_loss(lambda h: (h - 1 / (2 * beta)) ** 2, x, beta)


def dpo_loss(policy_logps, ref_logps, rewards, mask, beta, *, lengths=None, length_average=None):
    """DPO (sigmoid) loss -log sigmoid(beta * h) over the preference pairs of ipo_loss.

    Summed log-ratios by default (TRL's loss_type="sigmoid"); length_average=True is TRL's "sigmoid_norm".

    Args: as copg_loss.
    Returns: (scalar loss, metrics dict).
    """
    x = _prepare(policy_logps, ref_logps, rewards, mask, lengths, _averaged("dpo", length_average))
    return _pairwise_loss(lambda h: jax.nn.softplus(-beta * h), x, beta)


def bradley_terry_loss(scores, rewards, mask):
    """Reward-model loss: -log sigmoid(s_i - s_j), mean over the preference pairs of ipo_loss (rewards[i] >
    rewards[j], ties skipped); `dpo_loss` with beta = 1 and the scores in place of the log-ratios.

    Args:
      scores: [B, K] float reward-model outputs per completion.
      rewards: [B, K] float; only their order within a prompt is used (preference rows: chosen > rejected).
      mask: [B, K] bool, True where the completion exists.
    Returns:
      (scalar loss, metrics dict: rewards/* are the scores of chosen and rejected completions, and
      rewards/accuracies the fraction of pairs the model orders right).
    """
    return dpo_loss(scores, jnp.zeros_like(scores), rewards, mask, 1.0, length_average=False)


def offpolicy_pg_loss(
    policy_logps,
    ref_logps,
    rewards,
    mask,
    beta,
    *,
    lengths=None,
    length_average=None,
    baseline: str = "none",
):
    """Naive off-policy policy gradient: REINFORCE on behaviour samples, without importance weights.

    Surrogate = -mean over valid samples of stop_grad(A_i) * log pi(y_i), whose gradient is the on-policy
    policy gradient of J(pi) = E_pi[R] - beta KL(pi || pi_ref) evaluated on samples from mu instead of pi.
    The KL term enters each sample's regularised reward R_b(y_i), held fixed (stop-gradient) in A_i.

    baseline="none" (default): A_i = R_b(y_i). Off-policy its expected gradient, for a softmax bandit
      mu * R_b - pi * E_mu[R_b], vanishes away from pi* = pi_ref exp(R / beta) / Z: the biased baseline that
      the paper contrasts CoPG with.
    baseline="leave_one_out": A_i = R_b(y_i) - mean_{j != i} R_b(y_j) over the prompt's other valid samples
      (prompts with < 2 valid samples are skipped). Its gradient equals copg_loss's divided by 2 beta K when
      every prompt has K valid samples, so it is CoPG in disguise and unbiased off-policy: the "right
      baseline" is the one that contains the policy-dependent -beta rho of the other samples.

    With length_average, both rho and the log pi in the surrogate are divided by the completion length.

    Args: as copg_loss, plus `baseline`.
    Returns: (scalar surrogate loss, metrics dict).
    """
    if baseline not in ("none", "leave_one_out"):
        raise ValueError(f"offpolicy_pg_loss: baseline must be 'none' or 'leave_one_out', got {baseline!r}")
    x = _prepare(policy_logps, ref_logps, rewards, mask, lengths, _averaged("offpolicy_pg", length_average))
    regularised = jax.lax.stop_gradient(jnp.where(x.mask, x.rewards - beta * x.log_ratio, 0))
    if baseline == "none":
        advantage, valid = regularised, x.mask
    else:
        count = jnp.sum(x.mask, axis=-1, keepdims=True).astype(regularised.dtype)  # [B, 1]
        others = (jnp.sum(regularised, axis=-1, keepdims=True) - regularised) / jnp.maximum(count - 1, 1)
        advantage, valid = regularised - others, x.mask & (count >= 2)
    loss = -_masked_mean(advantage * x.scaled_policy_logps, valid)
    return loss, _metrics(x, beta, loss, jnp.sum(valid), _preference_pairs(x))


LOSSES: dict[str, LossFn] = {
    "copg": copg_loss,
    "ipo": ipo_loss,
    "dpo": dpo_loss,
    "offpolicy_pg": offpolicy_pg_loss,
    "offpolicy_pg_loo": functools.partial(offpolicy_pg_loss, baseline="leave_one_out"),
}


def get_loss(name: str) -> LossFn:
    """The loss function registered under `name` (see LOSSES)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}") from None
