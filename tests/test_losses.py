"""Losses vs explicit-loop float64 numpy references, exact identities and gradient closed forms."""

import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from copg_jax import losses
from copg_jax.data.config import DataConfig

# ---------------------------------------------------------------- numpy references (explicit loops, float64)


def _rho(pol, ref, lengths, b, i, length_average):
    r = pol[b, i] - ref[b, i]
    return r / lengths[b, i] if length_average else r


def ref_copg(pol, ref, rew, mask, beta, lengths=None, length_average=False):
    per_prompt = []
    for b in range(pol.shape[0]):
        idx = [i for i in range(pol.shape[1]) if mask[b, i]]
        if len(idx) < 2:
            continue
        rb = {i: rew[b, i] - beta * _rho(pol, ref, lengths, b, i, length_average) for i in idx}
        total = sum((rb[i] - rb[j]) ** 2 for i, j in itertools.combinations(idx, 2))
        per_prompt.append(total / (len(idx) - 1))
    return float(np.mean(per_prompt)) if per_prompt else 0.0


def ref_pairs(rew, mask):
    b_count, k = rew.shape
    return [
        (b, i, j)
        for b in range(b_count)
        for i in range(k)
        for j in range(k)
        if mask[b, i] and mask[b, j] and rew[b, i] > rew[b, j]
    ]


def ref_pairwise(kind, pol, ref, rew, mask, beta, lengths=None, length_average=False):
    vals = []
    for b, i, j in ref_pairs(rew, mask):
        h = _rho(pol, ref, lengths, b, i, length_average) - _rho(pol, ref, lengths, b, j, length_average)
        if kind == "ipo":
            vals.append((h - 1 / (2 * beta)) ** 2)
        else:
            vals.append(-math.log(1 / (1 + math.exp(-beta * h))))
    return float(np.mean(vals)) if vals else 0.0


def ref_pg(pol, ref, rew, mask, beta, baseline, lengths=None, length_average=False):
    terms = []
    for b in range(pol.shape[0]):
        idx = [i for i in range(pol.shape[1]) if mask[b, i]]
        rb = {i: rew[b, i] - beta * _rho(pol, ref, lengths, b, i, length_average) for i in idx}
        if baseline == "leave_one_out" and len(idx) < 2:
            continue
        for i in idx:
            adv = rb[i]
            if baseline == "leave_one_out":
                adv -= np.mean([rb[j] for j in idx if j != i])
            logp = pol[b, i] / lengths[b, i] if length_average else pol[b, i]
            terms.append(-adv * logp)
    return float(np.mean(terms)) if terms else 0.0


def ref_metrics(pol, ref, rew, mask, beta):
    """TRL's metrics: implicit rewards from the summed log-ratios, whatever the loss averages."""
    pairs = ref_pairs(rew, mask)
    imp = {
        (b, i): beta * (pol[b, i] - ref[b, i])
        for b in range(pol.shape[0])
        for i in range(pol.shape[1])
        if mask[b, i]
    }
    valid = [(b, i) for b in range(pol.shape[0]) for i in range(pol.shape[1]) if mask[b, i]]

    def tie(b, i, j):
        return 1e-5 * beta * (abs(pol[b, i]) + abs(ref[b, i]) + abs(pol[b, j]) + abs(ref[b, j]))

    def mean(v):
        return float(np.mean(v)) if v else 0.0

    return {
        "rewards/chosen": mean([imp[b, i] for b, i, _ in pairs]),
        "rewards/rejected": mean([imp[b, j] for b, _, j in pairs]),
        "rewards/margins": mean([imp[b, i] - imp[b, j] for b, i, j in pairs]),
        # TRL's >, a margin within float32 rounding of its log-probs (1e-5 of them) a tie (README)
        "rewards/accuracies": mean([float(imp[b, i] - imp[b, j] > tie(b, i, j)) for b, i, j in pairs]),
        "logps/policy": mean([pol[v] for v in valid]),
        "logps/ref": mean([ref[v] for v in valid]),
        "kl/seq": mean([pol[v] - ref[v] for v in valid]),
        "reward/mean": mean([rew[v] for v in valid]),
        "pairs/count": float(len(pairs)),
    }


def random_batch(seed, b, k, garbage=True, min_valid=0):
    """Random [B, K] inputs; masked slots hold NaN / inf / huge garbage when `garbage`."""
    rng = np.random.default_rng(seed)
    pol = rng.normal(-20, 5, (b, k))
    ref = pol + rng.normal(0, 1, (b, k))
    rew = rng.integers(-3, 4, (b, k)).astype(np.float64) / 2  # coarse values: ties happen
    mask = rng.random((b, k)) < 0.7
    mask[:, :min_valid] = True
    lengths = rng.integers(1, 30, (b, k))
    if garbage:
        junk = np.array([np.nan, np.inf, -np.inf, 1e30])
        for arr in (pol, ref, rew):
            arr[~mask] = junk[rng.integers(0, 4, (~mask).sum())]
        lengths[~mask] = 0
    return pol, ref, rew, mask, lengths


LOSS_REFS = {
    "copg": ref_copg,
    "ipo": lambda *a, **kw: ref_pairwise("ipo", *a, **kw),
    "dpo": lambda *a, **kw: ref_pairwise("dpo", *a, **kw),
    "offpolicy_pg": lambda *a, **kw: ref_pg(*a, baseline="none", **kw),
    "offpolicy_pg_loo": lambda *a, **kw: ref_pg(*a, baseline="leave_one_out", **kw),
}

# ---------------------------------------------------------------- value tests vs references


@functools.cache
def _jitted_loss(name):
    """One jitted program per loss (and length_average): the examples, padded to one shape, compile once
    instead of running every primitive of the loss op by op (beta is traced: one program for all betas)."""
    fn = losses.get_loss(name)
    return jax.jit(
        lambda p, r, w, m, beta, lengths, length_average: fn(
            p, r, w, m, beta, lengths=lengths, length_average=length_average
        ),
        static_argnums=6,
    )


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 5),
    k=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    beta=st.sampled_from([0.05, 0.5, 2.0]),
    length_average=st.booleans(),
)
def test_all_losses_match_numpy_reference(b, k, seed, beta, length_average):
    """Each [b, k] batch goes to the loss inside a [5, 6] one whose extra slots are masked NaNs, as a
    batch's padding slots are: the value is the reference's on [b, k], and one program per loss serves every
    example."""
    pol, ref, rew, mask, lengths = random_batch(seed, b, k)

    def padded(x, fill):
        return np.pad(x, ((0, 5 - b), (0, 6 - k)), constant_values=fill)

    with jax.enable_x64(True):
        args = [jnp.asarray(padded(a, np.nan)) for a in (pol, ref, rew)] + [jnp.asarray(padded(mask, False))]
        for name, reference in LOSS_REFS.items():
            loss, metrics = _jitted_loss(name)(*args, beta, jnp.asarray(padded(lengths, 0)), length_average)
            want = reference(pol, ref, rew, mask, beta, lengths=lengths, length_average=length_average)
            np.testing.assert_allclose(float(loss), want, rtol=1e-10, atol=1e-10, err_msg=name)
            assert float(metrics["loss"]) == float(loss)
            want_metrics = ref_metrics(pol, ref, rew, mask, beta)
            for key, value in want_metrics.items():
                np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-10, atol=1e-10, err_msg=key)


class LossVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_float32_matches_reference(self):
        pol, ref, rew, mask, lengths = random_batch(3, 6, 4, min_valid=2)
        for name, reference in LOSS_REFS.items():
            loss_fn = losses.get_loss(name)
            fn = self.variant(lambda p, r, w, m, f=loss_fn: f(p, r, w, m, 0.3, length_average=False)[0])
            got = fn(*(jnp.asarray(a, jnp.float32) for a in (pol, ref, rew)), jnp.asarray(mask))
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(
                float(got), reference(pol, ref, rew, mask, 0.3), rtol=2e-4, err_msg=name
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_garbage_in_masked_slots_changes_nothing(self):
        pol, ref, rew, mask, lengths = random_batch(7, 5, 5, garbage=False)
        mask[0, 1:] = False  # a prompt with one valid completion
        mask[1] = False  # a prompt with none
        g_pol, g_ref, g_rew, _, _ = (a.copy() for a in random_batch(7, 5, 5, garbage=False))
        junk = np.array([np.nan, np.inf, -np.inf])
        for arr in (g_pol, g_ref, g_rew):
            arr[~mask] = np.resize(junk, (~mask).sum())
        for name, loss_fn in losses.LOSSES.items():
            fn = self.variant(
                jax.value_and_grad(
                    lambda p, r, w, f=loss_fn: f(
                        p, r, w, jnp.asarray(mask), 0.7, lengths=jnp.asarray(lengths), length_average=True
                    )[0]
                )
            )
            clean_val, clean_grad = fn(*(jnp.asarray(a, jnp.float32) for a in (pol, ref, rew)))
            dirty_val, dirty_grad = fn(*(jnp.asarray(a, jnp.float32) for a in (g_pol, g_ref, g_rew)))
            assert np.isfinite(float(dirty_val)), name
            assert np.all(np.isfinite(dirty_grad)), name
            np.testing.assert_allclose(float(dirty_val), float(clean_val), rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(dirty_grad, clean_grad, rtol=1e-6, atol=1e-7, err_msg=name)
            assert np.all(np.asarray(dirty_grad)[~mask] == 0), name

    @chex.variants(with_jit=True, without_jit=True)
    def test_no_valid_prompt_gives_zero_not_nan(self):
        shape = (3, 4)
        mask = np.zeros(shape, bool)
        mask[:, 0] = True  # one completion per prompt: no pair anywhere
        pol = jnp.full(shape, jnp.nan).at[:, 0].set(-3.0)
        for name in ("copg", "ipo", "dpo", "offpolicy_pg_loo"):
            loss_fn = losses.get_loss(name)
            fn = self.variant(
                jax.value_and_grad(
                    lambda p, f=loss_fn: f(
                        p, jnp.zeros(shape), jnp.ones(shape), jnp.asarray(mask), 1.0, lengths=jnp.ones(shape)
                    )[0]
                )
            )
            val, grad = fn(pol)
            assert float(val) == 0.0, name
            np.testing.assert_array_equal(grad, np.zeros(shape), err_msg=name)
        _, metrics = losses.copg_loss(pol, jnp.zeros(shape), jnp.ones(shape), jnp.asarray(mask), 1.0)
        assert all(np.isfinite(float(v)) for v in metrics.values())


def test_copg_all_pairs_form_is_cancellation_free():
    # R_b around 1e4 with O(1) spread: K*sum(a^2) - (sum a)^2 in float32 would lose every digit.
    offset, spread = 1e4, np.array([[0.0, 1.0, 2.0]])
    rew = jnp.asarray(offset + spread, jnp.float32)
    zeros = jnp.zeros((1, 3), jnp.float32)
    loss, _ = losses.copg_loss(zeros, zeros, rew, jnp.ones((1, 3), bool), 1.0)
    np.testing.assert_allclose(float(loss), (1 + 4 + 1) / 2, rtol=1e-6)


def test_length_average_requires_lengths_and_get_loss_names_valid_losses():
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="lengths"):
        losses.copg_loss(x, x, x, jnp.ones((2, 2), bool), 1.0, length_average=True)
    with pytest.raises(ValueError, match=r"'cpog'.*copg, dpo, ipo, offpolicy_pg"):
        losses.get_loss("cpog")
    with pytest.raises(ValueError, match="baseline"):
        losses.offpolicy_pg_loss(x, x, x, jnp.ones((2, 2), bool), 1.0, baseline="mean")


def test_default_length_average_is_trls_per_name():
    """ipo averages log-ratios over completion length by default (TRL's "ipo"); every other loss sums them."""
    pol, ref, rew, mask, lengths = random_batch(4, 6, 3, garbage=False, min_valid=2)
    args = [jnp.asarray(a) for a in (pol, ref, rew)] + [jnp.asarray(mask), 0.3]
    with jax.enable_x64(True):
        for name in losses.LOSSES:
            fn = losses.get_loss(name)
            default = float(fn(*args, lengths=jnp.asarray(lengths))[0])
            averaged = float(fn(*args, lengths=jnp.asarray(lengths), length_average=True)[0])
            summed = float(fn(*args, lengths=jnp.asarray(lengths), length_average=False)[0])
            assert averaged != summed, name
            assert default == (averaged if name == "ipo" else summed), name
        with pytest.raises(ValueError, match="ipo averages by default.*length_average=False"):
            losses.ipo_loss(*args)


def test_shape_and_dtype_checks_at_the_boundary():
    x = jnp.zeros((2, 3))
    with pytest.raises(AssertionError):
        losses.copg_loss(x, x, jnp.zeros((2, 4)), jnp.ones((2, 3), bool), 1.0)
    with pytest.raises(AssertionError):
        losses.copg_loss(x[0], x[0], x[0], jnp.ones((3,), bool), 1.0)
    with pytest.raises(AssertionError):
        losses.copg_loss(x, x, x, jnp.ones((2, 3)), 1.0)  # float mask


# ---------------------------------------------------------------- exact identities


@pytest.mark.parametrize("beta", [0.1, 0.5, 3.0])
def test_copg_on_preference_rows_is_beta_squared_ipo_at_tau_beta(beta):
    """Paper Property 3: rewards (+1/4, -1/4), (1/2 - beta h)^2 = beta^2 (h - 1/(2 beta))^2 = beta^2 IPO(tau =
    beta), in value and gradient, summed or length-averaged; the rewards preference rows get by default."""
    pol, ref, _, _, lengths = random_batch(11, 8, 2, garbage=False)
    mask = np.ones((8, 2), bool)
    mask[3, 1] = False  # a prompt without a pair counts in neither loss
    chosen, rejected = DataConfig().preference_rewards
    rewards = jnp.asarray(np.tile([chosen, rejected], (8, 1)))
    with jax.enable_x64(True):
        for length_average in (False, True):
            kw = dict(lengths=jnp.asarray(lengths), length_average=length_average)

            def copg(p, kw=kw):
                return losses.copg_loss(p, jnp.asarray(ref), rewards, jnp.asarray(mask), beta, **kw)[0]

            def ipo(p, kw=kw):
                return (
                    beta**2 * losses.ipo_loss(p, jnp.asarray(ref), rewards, jnp.asarray(mask), beta, **kw)[0]
                )

            c_val, c_grad = jax.value_and_grad(copg)(jnp.asarray(pol))
            i_val, i_grad = jax.value_and_grad(ipo)(jnp.asarray(pol))
            np.testing.assert_allclose(float(c_val), float(i_val), rtol=1e-12)
            np.testing.assert_allclose(c_grad, i_grad, rtol=1e-12, atol=1e-15)
            assert float(c_val) > 0


def _softmax_bandit(n, seed):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=n)),  # policy logits theta
        jax.nn.log_softmax(jnp.asarray(rng.normal(size=n))),  # log pi_ref
        jnp.asarray(rng.uniform(-1, 1, size=n)),  # rewards per arm
    )


def test_copg_gradient_is_minus_two_beta_times_contrastive_estimator():
    n, beta = 6, 0.7
    pairs = np.array([[0, 3], [5, 1], [2, 2], [4, 0]])  # one pair per prompt
    with jax.enable_x64(True):
        theta, log_ref, arm_rewards = _softmax_bandit(n, 0)

        def loss(th):
            logp = jax.nn.log_softmax(th)
            return losses.copg_loss(
                logp[pairs], log_ref[pairs], arm_rewards[pairs], jnp.ones(pairs.shape, bool), beta
            )[0]

        got = jax.grad(loss)(theta)
        logp = jax.nn.log_softmax(theta)
        score = jax.jacobian(jax.nn.log_softmax)(theta)  # [n, n]: grad log pi(y) in row y
        rb = arm_rewards - beta * (logp - log_ref)
        estimator = sum((rb[y] - rb[z]) * (score[y] - score[z]) for y, z in pairs) / len(pairs)
        np.testing.assert_allclose(got, -2 * beta * estimator, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k", [2, 3])
def test_on_policy_expected_copg_gradient_is_minus_2k_beta_policy_gradient(k):
    """E_{y_1..y_K ~ pi}[grad copg] = -2 K beta grad J, J = E_pi[R] - beta KL(pi || pi_ref), enumerated."""
    n, beta = 4, 0.6
    tuples = np.array(list(itertools.product(range(n), repeat=k)))  # [n^K, K] every ordered sample
    with jax.enable_x64(True):
        theta, log_ref, arm_rewards = _softmax_bandit(n, 1)

        def expected_loss(th):
            logp = jax.nn.log_softmax(th)
            weights = jax.lax.stop_gradient(jnp.exp(logp[tuples].sum(-1)))  # sampler prob, not differentiated
            per_tuple = jax.vmap(
                lambda t: losses.copg_loss(
                    logp[t][None], log_ref[t][None], arm_rewards[t][None], jnp.ones((1, k), bool), beta
                )[0]
            )(jnp.asarray(tuples))
            return jnp.sum(weights * per_tuple)

        def objective(th):
            logp = jax.nn.log_softmax(th)
            pi = jnp.exp(logp)
            return pi @ arm_rewards - beta * pi @ (logp - log_ref)

        got = jax.grad(expected_loss)(theta)
        want = -2 * k * beta * jax.grad(objective)(theta)
        assert np.linalg.norm(want) > 1e-3
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_leave_one_out_pg_gradient_is_copg_gradient_over_2_beta_k():
    pol, ref, rew, _, _ = random_batch(5, 4, 3, garbage=False)
    mask = jnp.ones((4, 3), bool)
    beta = 0.4
    with jax.enable_x64(True):
        args = (jnp.asarray(ref), jnp.asarray(rew), mask, beta)
        g_copg = jax.grad(lambda p: losses.copg_loss(p, *args)[0])(jnp.asarray(pol))
        g_loo = jax.grad(lambda p: losses.get_loss("offpolicy_pg_loo")(p, *args)[0])(jnp.asarray(pol))
        g_none = jax.grad(lambda p: losses.offpolicy_pg_loss(p, *args)[0])(jnp.asarray(pol))
        np.testing.assert_allclose(g_copg, 2 * beta * 3 * g_loo, rtol=1e-10)
        assert not np.allclose(g_copg, 2 * beta * 3 * g_none)


def test_offpolicy_pg_gradient_is_minus_advantage_times_score():
    pol, ref, rew, mask, _ = random_batch(9, 3, 4, garbage=False, min_valid=1)
    beta = 0.8
    with jax.enable_x64(True):
        grad = jax.grad(
            lambda p: losses.offpolicy_pg_loss(
                p, jnp.asarray(ref), jnp.asarray(rew), jnp.asarray(mask), beta
            )[0]
        )(jnp.asarray(pol))
        rb = rew - beta * (pol - ref)
        want = np.where(mask, -rb / mask.sum(), 0)  # d/dlogpi of -mean A * logpi with A held fixed
        np.testing.assert_allclose(grad, want, rtol=1e-12)


def test_margins_within_float32_rounding_are_ties_not_ordered_pairs():
    """A policy equal to its reference has implicit rewards of float32 noise (its log-probs and the cache's
    come from different programs): they ordered pairs at random, an accuracy of 0.2-0.5 at step 0. Within the
    log-probs' rounding a margin is a tie, counted as not ordered right (TRL's strict >); a margin past it
    counts."""
    rng = np.random.default_rng(0)
    ref = rng.normal(-190, 20, (64, 2)).astype(np.float32)
    policy = ref * (1 + rng.normal(0, 3e-7, ref.shape)).astype(np.float32)  # the same values, rounded apart
    rewards = np.tile(np.float32([1.0, 0.0]), (64, 1))
    mask = np.ones((64, 2), bool)
    _, noisy = losses.copg_loss(
        jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(rewards), jnp.asarray(mask), 0.1
    )
    assert float(noisy["rewards/accuracies"]) == 0.0 and 0 < abs(float(noisy["rewards/margins"])) < 1e-4
    apart = policy + np.float32([[0.05, 0.0]])  # 0.05 nats: well past float32 rounding at |log p| ~ 190
    _, moved = losses.copg_loss(
        jnp.asarray(apart), jnp.asarray(ref), jnp.asarray(rewards), jnp.asarray(mask), 0.1
    )
    assert float(moved["rewards/accuracies"]) == 1.0
