"""Toy bandits: CoPG recovers pi* from off-policy samples; off-policy PG and IPO do not (paper Fig. 1)."""

import dataclasses
import json

import numpy as np
import pytest

from copg_jax.experiments import bandit


def test_copg_reaches_optimum_offpolicy_pg_is_biased(tmp_path):
    out = bandit.main(
        [
            "--steps",
            "300",
            "--arms",
            "10",
            "--batch-size",
            "128",
            "--methods",
            "copg,offpolicy_pg",
            "--out",
            str(tmp_path),
        ]
    )
    results = out["results"]
    assert results["copg"]["kl_to_optimal"] < 1e-3
    assert results["offpolicy_pg"]["kl_to_optimal"] > 1e-2
    # pi* maximises J(pi) = E_pi[R] - beta KL(pi || pi_ref): CoPG reaches it, the biased PG falls short.
    best = results["pi* (closed form)"]["objective"]
    assert abs(results["copg"]["objective"] - best) < 1e-3
    assert results["offpolicy_pg"]["objective"] < best - 1e-3
    assert results["pi_ref (start)"]["kl_to_optimal"] > 1e-2  # the start is far from pi*
    assert out["curves"]["copg"].shape == (300,)
    assert (tmp_path / "kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert np.isclose(saved["results"]["copg"]["kl_to_optimal"], results["copg"]["kl_to_optimal"])
    assert "| copg |" in (tmp_path / "results.md").read_text()


def test_closed_form_optimum_maximises_regularised_objective():
    env = bandit.make_bandit(3, 6)
    beta = 0.7
    best = bandit.policy_stats(bandit.optimal_log_policy(env.log_ref, env.rewards, beta), env, beta)
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = bandit.optimal_log_policy(env.log_ref, env.rewards, beta) + rng.normal(0, 0.3, 6)
        stats = bandit.policy_stats(other, env, beta)
        # J(pi) = J(pi*) - beta KL(pi || pi*) exactly, so KL > 0 costs objective.
        np.testing.assert_allclose(
            stats["objective"], best["objective"] - beta * stats["kl_to_optimal"], rtol=1e-9
        )
        assert stats["kl_to_optimal"] > 0


def test_paper_fig1_copg_reaches_zero_regret_ipo_and_pg_are_biased(tmp_path):
    """Fig. 1: the fixed 10^4-pair dataset, Adam lr 1e-3, batch 512. Learning-rate constant and shuffles drawn
    epoch by epoch, so the first 100 epochs of a 300-epoch run are the paper's run exactly."""
    s = bandit.PaperSettings(epochs=300)
    out = bandit.run_paper(s)
    regret = {m: out["curves"][m] for m in bandit.PAPER_METHODS}
    at = {m: {e: float(c[e * s.steps_per_epoch - 1]) for e in (10, 100, 300)} for m, c in regret.items()}
    start = out["results"]["pi_ref (start)"]["regret"]
    # at the paper's 100 epochs CoPG is lowest (1.3e-2, still falling: Adam at lr 1e-3 moves a logit by at
    # most 1e-3 a step), then it goes to 0: 7e-4 at 150 epochs, 5e-6 at 200, 5e-12 at 300
    assert at["copg"][100] < 1.5e-2 and at["copg"][100] == min(a[100] for a in at.values())
    assert at["copg"][300] < 1e-4
    assert out["results"]["copg"]["regret"] == pytest.approx(at["copg"][300], rel=1e-3)
    # the others settle on biased solutions; PG without a baseline gets worse than where it started
    assert at["ipo"][100] > 0.1 and at["ipo"][300] > 0.1
    assert at["pg_value"][300] > 5e-3 and at["pg_value"][300] > 1e6 * at["copg"][300]
    # with the regularised value as its baseline (an oracle), off-policy PG reaches pi* as well: 2e-9 at 300
    assert at["pg_value_reg"][300] < 1e-7 and at["pg_value_reg"][300] < 1e-5 * at["pg_value"][300]
    assert at["pg"][10] > start and at["pg"][300] > at["pg"][10] > 0.3
    paper = bandit.main(["--paper", "--methods", "copg", "--out", str(tmp_path)])
    assert paper["settings"] == dataclasses.asdict(bandit.PaperSettings())  # the paper's settings
    assert paper["results"]["copg"]["regret"] == pytest.approx(at["copg"][100], rel=1e-6)
    assert (tmp_path / "regret.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| copg | 1.3" in (tmp_path / "results.md").read_text()


def test_paper_pairs_follow_the_two_behaviour_policies_and_bradley_terry():
    env = bandit.paper_bandit()
    data = bandit.make_pairs(env, 200_000, 3)
    arms = np.asarray(data.arms)
    for side, mu in ((0, bandit.PAPER_MU1), (1, bandit.PAPER_MU2)):
        np.testing.assert_allclose(np.bincount(arms[:, side], minlength=3) / len(arms), mu, atol=5e-3)
    first_better = (arms[:, 0] == 0) & (arms[:, 1] == 2)  # R = 2.5 vs 1
    np.testing.assert_allclose(
        np.mean(np.asarray(data.first_preferred)[first_better]), 1 / (1 + np.exp(-1.5)), atol=2e-2
    )
    np.testing.assert_allclose(np.exp(np.asarray(env.log_ref)), [1 / 3] * 3, rtol=1e-6)
