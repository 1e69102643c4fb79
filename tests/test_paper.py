"""The Sec. 6 protocol (copg_jax.experiments.paper) at a reduced size: SFT -> labelled pairs -> reward
model -> re-scored pairs -> CoPG / IPO / DPO with reward-of-generations curves -> figures and table."""

import json

import numpy as np
import pytest

from copg_jax.experiments import demo, paper
from copg_jax.jsonl import read_jsonl


def test_annotator_is_bradley_terry_on_the_true_reward():
    pairs = [("3 1 2 =", "1 2 3", "3 2 1")] * 4000  # true rewards 1 and 1/3
    for temperature, want in ((0.01, 1.0), (1.0, 1 / (1 + np.exp(-2 / 3)))):
        rows = paper.label_pairs(pairs, temperature, np.random.default_rng(0))
        assert np.mean([r["chosen"] == "1 2 3" for r in rows]) == pytest.approx(want, abs=0.02)
    # labels against the truth, scored by the true reward itself
    rows = [{"prompt": "3 1 2 =", "chosen": "1 3 2", "rejected": "1 2 3"}] * 3
    got = paper.agreement(demo.sort_reward, rows)
    assert got == {"label_accuracy": 0.0, "true_order_accuracy": 1.0, "labels_true_order": 0.0}


@pytest.mark.slow
def test_quick_protocol_end_to_end(tmp_path):
    s = paper.QUICK
    results = paper.run(tmp_path, s)
    for name in ("results.md", "results.json", "curves.png", "reward_vs_beta.png", "best.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "results.json").read_text())["ordering"] == results["ordering"]
    assert sorted(results["ordering"]) == ["copg", "dpo", "ipo"]

    # the policies learn from pairs re-scored by the reward model (its scores, not the labels' +-1/4)
    rows = read_jsonl(tmp_path / "data" / "train.jsonl")
    assert len(rows) == results["data"]["pairs"] and all(len(r["rewards"]) == 2 for r in rows)
    assert len({round(x, 6) for r in rows for x in r["rewards"]}) > 10
    assert (tmp_path / "reward_model" / "export" / "config.json").is_file()

    # every run starts at pi_ref: the same step-0 measurement (same prompts, same draws), KL 0; then one
    # point every eval_every steps and one at the end
    steps = results["data"]["steps"]
    assert steps == s.epochs * (len(rows) // s.batch_size)
    starts = {json.dumps(r["curve"][0], sort_keys=True) for r in results["runs"]}
    assert len(starts) == 1 and abs(results["reference"]["kl"]) < 1e-4
    want_steps = sorted({0, *range(s.eval_every, steps + 1, s.eval_every), steps})
    for run in results["runs"]:
        assert [c["step"] for c in run["curve"]] == want_steps
        # trained away from pi_ref: the same draws give another measurement (a Monte-Carlo KL of a policy
        # that barely moved may come out just below 0)
        first, last = run["curve"][0], run["curve"][-1]
        assert abs(last["kl"] - first["kl"]) > 1e-5
        assert run["kl"] > -0.05 and 0 <= run["true_reward"] <= 1
    assert max(run["kl"] for run in results["runs"]) > 1e-3
    table = (tmp_path / "results.md").read_text()
    for method in ("reference (SFT)", "copg", "ipo", "dpo"):
        assert f"| {method}" in table
