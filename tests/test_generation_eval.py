"""Evaluation by generation: the statistics in closed form, the Monte-Carlo KL against full forward passes,
the `eval_gen/*` metrics of a training run (metrics.jsonl, TensorBoard, progress bar) and of `copg eval`."""

import dataclasses
import json
import sys
import textwrap
import types
from pathlib import Path

import datasets
import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from copg_jax import generation_eval as ge
from copg_jax import train as tr
from copg_jax.config import ConfigError, apply_overrides, from_dict
from copg_jax.data.config import DataConfig
from copg_jax.data.refcache import ReferenceModel
from copg_jax.generate import SamplingConfig, prompt_token_ids
from copg_jax.jsonl import read_jsonl
from copg_jax.models import Decoder, ModelConfig, load_tokenizer
from copg_jax.run_config import Config

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 4, 2

REWARD = '''
def even_words(prompts, completions, weight):
    """Fraction of a completion's words that end in an even digit, times its prompt row's `weight`."""
    return [w * sum(x[-1] in "02468" for x in c.split()) / max(len(c.split()), 1)
            for c, w in zip(completions, weight, strict=True)]
'''


def test_summary_statistics_in_closed_form():
    scores = ge.GenerationScores(
        rewards=np.array([[1.0, 0.0], [0.9, np.nan], [0.25, 0.75]]),
        log_ratios=np.array([[0.1, 0.3], [0.2, 0.4], [-0.1, 0.5]]),
        lengths=np.array([[3, 5], [4, 4], [2, 6]]),
        finished=np.array([[True, False], [True, True], [True, True]]),
        texts=[["a", "b"]] * 3,
        token_ids=[[[1], [2]]] * 3,
        errors=[None, None, None, "ValueError: no", None, None],
    )
    got = scores.summary()
    per_prompt = np.array([0.5, 0.9, 0.5])  # a failed reward is left out of its prompt's mean, never made 0
    assert got["eval_gen/reward"] == pytest.approx(1.9 / 3)  # each prompt weighs the same (not 2.9 / 5)
    assert got["eval_gen/reward_stderr"] == pytest.approx(np.std(per_prompt, ddof=1) / np.sqrt(3))
    assert got["eval_gen/kl"] == pytest.approx(1.4 / 6)
    kl = np.array([0.2, 0.3, 0.2])  # per prompt: the samples of a prompt are not independent
    assert got["eval_gen/kl_stderr"] == pytest.approx(np.std(kl, ddof=1) / np.sqrt(3))
    assert got["eval_gen/length"] == 4.0 and got["eval_gen/finished"] == pytest.approx(5 / 6)
    assert got["eval_gen/failures"] == 1 and got["eval_gen/samples"] == 6
    assert not any(k.startswith("eval_gen/reward/") for k in got)
    # several reward functions: each one's reward as the sum's, over the samples it scored
    parts = {"fmt": np.array([[1.0, 1.0], [np.nan, np.nan], [0.0, 1.0]]), "acc": scores.rewards}
    got = dataclasses.replace(scores, parts=parts).summary()
    assert got["eval_gen/reward/fmt"] == pytest.approx(1.5 / 2) and got[
        "eval_gen/reward/acc"
    ] == pytest.approx(1.9 / 3)
    # samples not drawn from the policy (tempered, top-k, top-p): their mean log-ratio is no KL estimate
    tempered = dataclasses.replace(scores, policy_samples=False).summary()
    assert "eval_gen/kl" not in tempered and "eval_gen/kl_stderr" not in tempered
    assert tempered["eval_gen/log_ratio"] == pytest.approx(1.4 / 6)
    assert tempered["eval_gen/log_ratio_stderr"] == pytest.approx(np.std(kl, ddof=1) / np.sqrt(3))


@pytest.mark.parametrize(
    ("sampling", "own"),
    [({}, True), ({"temperature": 0.7}, False), ({"top_k": 5}, False), ({"top_p": 0.9}, False)],
)
def test_only_untempered_untruncated_samples_are_the_policys_own(sampling, own):
    assert ge.policy_sampling(SamplingConfig(**sampling)) is own


def test_monte_carlo_kl_is_the_log_ratio_of_full_forward_passes():
    """The policy's log-probs recorded while sampling (KV cache) minus the reference's over the same tokens,
    each sample matched to its prompt through the chunked, padded reference batches."""
    tokenizer = load_tokenizer(REPO / "examples/tiny/tokenizer")
    mcfg = ModelConfig.from_hf(
        yaml.safe_load((REPO / "configs/tiny_cpu.yaml").read_text())["model"]["config"]
    )
    policy, other = (Decoder(mcfg, rngs=nnx.Rngs(seed)) for seed in (1, 2))
    as_policy, as_other = ReferenceModel(policy), ReferenceModel(other)
    rows = [{"prompt": r["prompt"]} for r in read_jsonl(REPO / "examples/tiny/eval.jsonl")[:5]]
    ids, _ = prompt_token_ids(rows, tokenizer, DataConfig(max_prompt_length=8))

    def cut_plus_100(
        prompts, completions, finished, bonus
    ):  # told which samples were cut; each prompt's bonus
        return [len(x) + 100.0 * (not f) + b for x, f, b in zip(completions, finished, bonus, strict=True)]

    def run(reference: ReferenceModel, temperature: float = 1.0) -> ge.GenerationScores:
        return ge.evaluate_generations(
            policy, reference, tokenizer, [r["prompt"] for r in rows], ids,
            cut_plus_100, SamplingConfig(max_new_tokens=6, temperature=temperature), num_samples=3,
            key=jax.random.key(0), batch_size=6,  # 2 prompts per reference call: the last call is padded
            fields={"bonus": [1000.0 * i for i in range(5)]},
        )  # fmt: skip

    same = run(as_policy)  # the reference is the policy: every sample's log-ratio is 0
    np.testing.assert_allclose(same.log_ratios, 0.0, atol=2e-5)
    different = run(as_other)
    assert different.token_ids == same.token_ids  # the same key: the same draws
    examples = [(np.asarray(p), list(map(np.asarray, cs))) for p, cs in zip(ids, same.token_ids, strict=True)]
    want = as_policy.completion_logps(examples, 3, 32) - as_other.completion_logps(examples, 3, 32)
    np.testing.assert_allclose(different.log_ratios, want, rtol=1e-4, atol=1e-4)
    assert np.abs(different.log_ratios).mean() > 0.1
    want_rewards = [[len(t) + 100 * (not f) + 1000 * i for t, f in zip(ts, fs, strict=True)]
        for i, (ts, fs) in enumerate(zip(different.texts, different.finished, strict=True))]  # fmt: skip
    np.testing.assert_array_equal(different.rewards, want_rewards)
    assert different.lengths.shape == (5, 3) and different.summary()["eval_gen/samples"] == 15
    assert different.policy_samples and not run(as_other, temperature=0.5).policy_samples


def test_kl_of_a_policy_to_itself_is_zero_where_its_decoding_differs_from_a_forward_pass():
    """Phi-3 with LongRoPE re-encodes a row when it first reaches the pretrained length while sampling (as
    transformers' generate() does), so the log-probs recorded while sampling differ from a forward pass over
    the whole row; the KL took the policy's from sampling and the reference's from a forward pass: 5 nats at
    policy == reference. Both come from forward passes now (of one compiled program, where the policy has the
    reference's structure)."""
    hf = {
        "model_type": "phi3", "vocab_size": 207, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.2,
        "max_position_embeddings": 64, "original_max_position_embeddings": 8, "partial_rotary_factor": 0.5,
        "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0]},
    }  # fmt: skip
    policy = Decoder(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    assert policy.reencode_position == 8
    rng = np.random.default_rng(0)
    ids = [[2, *rng.integers(7, 207, n).tolist()] for n in (3, 6, 9)]  # rows cross position 8 while sampled
    reference, tokenizer = ReferenceModel(policy), load_tokenizer(REPO / "examples/tiny/tokenizer")
    for _ in range(2):
        scores = ge.evaluate_generations(
            policy, reference, tokenizer, ["p"] * 3, ids, lambda p, c: [0.0] * len(c),
            SamplingConfig(max_new_tokens=10), num_samples=2, key=jax.random.key(0), batch_size=6,
        )  # fmt: skip
        np.testing.assert_allclose(scores.log_ratios, 0.0, atol=2e-5)
    assert len(reference._fns) == 1  # the policy, of the reference's structure, ran the reference's program


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step CoPG run on the tiny setup with evaluation by generation every 2 steps."""
    root = tmp_path_factory.mktemp("evalgen")
    (root / "evalgen_reward.py").write_text(textwrap.dedent(REWARD))
    sys.path.insert(0, str(root))
    base = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    base["model"]["tokenizer"] = str(REPO / base["model"]["tokenizer"])
    # held-out prompts as the hub ships them: Parquet, the prompt in a column of another name, a field the
    # reward takes beside it
    prompts = root / "held_out.parquet"
    held_out = read_jsonl(REPO / "examples/tiny/eval.jsonl")
    rows = [{"question": r["prompt"], "weight": 1.0} for r in held_out]
    datasets.Dataset.from_list(rows).to_parquet(str(prompts))
    base["data"].update(
        path=str(REPO / "examples/tiny/train.jsonl"), eval_path="", ref_cache=str(root / "ref.parquet")
    )
    base["train"].update(steps=STEPS, log_every=1, eval_every=0, output_dir=str(root / "run"), progress=False)
    base["checkpoint"].update(every_steps=0, keep_best=0, async_save=False)
    base["eval_generation"] = dict(
        every_steps=EVERY, prompts_path=str(prompts), prompt_col="question", num_prompts=6, num_samples=2,
        max_new_tokens=6, batch_size=12, reward={"fn": "evalgen_reward:even_words"},
    )  # fmt: skip
    cfg = from_dict(Config, base)
    result = tr.train(cfg)
    yield cfg, result
    sys.path.remove(str(root))


def test_training_logs_generation_metrics(run):
    cfg, result = run
    rows = {
        r["step"]: r for r in read_jsonl(Path(cfg.train.output_dir) / "metrics.jsonl") if "eval_gen/kl" in r
    }
    assert sorted(rows) == [0, 2, 4]  # the initial policy, then every 2 updates
    assert abs(rows[0]["eval_gen/kl"]) < 1e-4  # step 0: the policy is the reference
    assert abs(rows[4]["eval_gen/kl"]) > 1e-3  # trained away from it (a 12-sample estimate: either sign)
    for row in rows.values():
        assert 0 <= row["eval_gen/reward"] <= 1 and row["eval_gen/reward_stderr"] > 0
        assert row["eval_gen/samples"] == 12 and row["eval_gen/failures"] == 0
        assert 1 <= row["eval_gen/length"] <= 6
    assert result.metrics["eval_gen/reward"] == rows[4]["eval_gen/reward"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cfg.train.output_dir) / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_gen/reward")] == [0, 2, 4]


def test_copg_eval_of_the_checkpoint_gives_the_same_generation_metrics(run):
    cfg, _ = run
    last = [r for r in read_jsonl(Path(cfg.train.output_dir) / "metrics.jsonl") if "eval_gen/kl" in r][-1]
    got = tr.evaluate_checkpoint(cfg, cfg.train.output_dir)
    assert got["step"] == STEPS
    for key in ("eval_gen/reward", "eval_gen/kl", "eval_gen/length"):
        assert got[key] == pytest.approx(last[key], rel=1e-5, abs=1e-6), key


def test_progress_bar_shows_the_reward():
    class Bar:
        def set_postfix(self, values):
            self.values = values

    bar = Bar()
    tr.show(bar, {"loss": 0.5, "lr": 1e-3, "eval_gen/reward": 0.75, "eval_gen/kl": 0.2, "grad_norm": 1.0})
    assert bar.values == {"loss": "0.5", "lr": "1.00e-03", "reward": "0.75", "kl": "0.2"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["eval_generation.reward.fn=m:f"], "eval_generation: a reward is set but no held-out prompts"),
        (["eval_generation.num_samples=0"], "eval_generation.num_samples: must be >= 1"),
        (["eval_generation.every_step=3"], "did you mean 'every_steps'"),
        (  # tempered samples log eval_gen/log_ratio, not eval_gen/kl: ranking by it failed at the first save
            [
                "eval_generation.temperature=0.7",
                "checkpoint.keep_best=2",
                "checkpoint.best_metric=eval_gen/kl",
            ],
            r"checkpoint.best_metric: eval_gen/kl is not logged .* rank by eval_gen/log_ratio, or sample",
        ),
    ],
)
def test_bad_eval_generation_settings_are_named(overrides, expected):
    base = {"model": {"config": {"model_type": "llama"}, "tokenizer": "t"}}
    with pytest.raises(ConfigError, match=expected):
        from_dict(Config, apply_overrides(base, overrides))


def test_a_reward_that_fails_is_warned_and_its_metric_printed_as_null(caplog):
    """Rollouts warned of failing rewards, evaluation by generation did not: eval_gen/reward was NaN at every
    step, unsaid, and `copg eval` printed it as NaN, which is not JSON."""
    from copg_jax.cli import metrics_json

    failed = ge.GenerationScores(
        rewards=np.full((2, 2), np.nan), log_ratios=np.zeros((2, 2)), lengths=np.ones((2, 2), int),
        finished=np.ones((2, 2), bool), texts=[["a", "b"], ["c", "d"]], token_ids=[[[1], [2]], [[3], [4]]],
        errors=["RuntimeError: no judge", "RuntimeError: no judge", None, "RuntimeError: no judge"],
    )  # fmt: skip
    failed.rewards[1, 0] = 0.5
    stub = types.SimpleNamespace(scores=lambda policy: failed, scored=False)
    with caplog.at_level("WARNING", logger="copg_jax.generation_eval"):
        metrics = ge.GenerationEval.__call__(stub, None)
    assert "the reward failed on 3 of 4 samples (e.g. RuntimeError: no judge)" in caplog.text
    assert metrics["eval_gen/reward"] == 0.5 and metrics["eval_gen/failures"] == 3
    assert json.loads(metrics_json({**metrics, "eval_gen/reward": np.nan}))["eval_gen/reward"] is None
    # failing on every sample of the first evaluation (step 0 by default) is a broken reward: the run stops;
    # on a later one (a judge's outage), which runs before its step's checkpoint is saved, it is warned of
    failed.errors[2], failed.rewards[1, 0] = "RuntimeError: no judge", np.nan
    assert np.isnan(ge.GenerationEval.__call__(stub, None)["eval_gen/reward"])
    stub.scored = False
    with pytest.raises(ValueError, match=r"evaluation by generation: the reward failed on all 4 completions"):
        ge.GenerationEval.__call__(stub, None)


def test_asking_for_more_prompts_than_the_file_holds_is_warned(tmp_path, caplog):
    """eval_generation.num_prompts=128 on a file of 16 prompts evaluated 16, silently."""
    from copg_jax.rewards import RewardConfig
    from copg_jax.run_config import EvalGenerationSection

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i}"}) + "\n" for i in range(3)))
    section = EvalGenerationSection(
        every_steps=1,
        prompts_path=str(prompts),
        num_prompts=128,
        reward=RewardConfig(fn="tests.test_rewards:length_reward"),
    )
    tok = load_tokenizer(str(Path(__file__).resolve().parents[1] / "examples/tiny/tokenizer"))
    with caplog.at_level("WARNING"):
        pool = ge.eval_pool(section, DataConfig(), tok)
    assert len(pool.rows) == 3
    assert f"eval_generation.num_prompts=128: {prompts} holds 3 distinct prompts" in caplog.text


def test_held_out_prompts_past_the_models_vocabulary_or_missing_stop_the_run_at_its_start(tmp_path):
    """Prompts tokenised past the model's vocabulary (a tokenizer that is not the model's) gave NaN logits
    at the first evaluation, hours in, sampled as token 0 and scored: the run now stops before the data is
    read, naming the prompt. A missing prompts file names its setting."""
    from copg_jax import train as tr
    from copg_jax.run_config import load_config

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "w1 w2"}) + "\n" + json.dumps({"prompt": "w150"}) + "\n")
    tokenizer = str(Path(__file__).resolve().parents[1] / "examples/tiny/tokenizer")
    settings = [
        f"model.tokenizer={tokenizer}",
        "model.config={model_type: llama, vocab_size: 100, hidden_size: 16, num_hidden_layers: 1, "
        "num_attention_heads: 2, intermediate_size: 32}",
        "eval_generation.every_steps=1",
        "eval_generation.reward.fn=tests.test_rewards:length_reward",
    ]
    cfg = load_config(None, [*settings, f"eval_generation.prompts_path={prompts}"])
    tok = load_tokenizer(tokenizer)
    match = r"evaluation-by-generation prompts: prompt 1: token id \d+ is outside the model's vocab_size 100"
    with pytest.raises(ValueError, match=match):
        tr.reward_pools(cfg, tok, online=False)
    cfg = load_config(None, [*settings, f"eval_generation.prompts_path={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(FileNotFoundError, match=r"^eval_generation.prompts_path: prompts file .*missing"):
        tr.reward_pools(cfg, tok, online=False)
