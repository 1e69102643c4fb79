"""Short toy-bandit run: CoPG recovers pi* from off-policy samples, naive off-policy PG does not."""

import json

import numpy as np

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
