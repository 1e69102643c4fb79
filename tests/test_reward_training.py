"""`copg train-rm`: Bradley-Terry reward models with the policy's models, data, layouts and checkpoints,
exported as an HF sequence-classification folder that transformers and `copg score --reward-model` load."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from copg_jax import cli, losses
from copg_jax import train as tr
from copg_jax.config import apply_overrides, from_dict
from copg_jax.data.config import DataConfig
from copg_jax.data.layout import layout_tokens
from copg_jax.data.tokenize import tokenize_dataset
from copg_jax.jsonl import read_jsonl, write_jsonl
from copg_jax.models import ModelConfig, load_tokenizer
from copg_jax.rewards import score
from copg_jax.rewards.reward_model import RewardModel, new_score_model
from copg_jax.run_config import Config
from copg_jax.sharding import make_mesh

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())


def _words(rng, parity: int, n: int) -> str:
    """n random words w0..w199 whose number has the given parity."""
    return " ".join(f"w{2 * int(rng.integers(0, 100)) + parity}" for _ in range(n))


def _preference_rows(n: int, seed: int) -> list[dict]:
    """Chosen: words with even numbers; rejected: odd ones (a rule a tiny reward model learns quickly)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "prompt": " ".join(f"w{i}" for i in rng.integers(0, 200, size=3)),
            "chosen": _words(rng, 0, int(rng.integers(1, 5))),
            "rejected": _words(rng, 1, int(rng.integers(1, 5))),
        }
        for _ in range(n)
    ]


def test_bradley_terry_loss_in_closed_form():
    scores = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, 0.0]])
    rewards = jnp.array([[0.25, -0.25, 0.0], [1.0, 0.0, 1.0]])
    mask = jnp.array([[True, True, True], [True, True, False]])
    loss, metrics = losses.bradley_terry_loss(scores, rewards, mask)
    margins = np.array([2.0 - -1.0, 2.0 - 0.5, 0.5 - -1.0, 0.0 - 3.0])  # every (better, worse) valid pair
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-margins))), rtol=1e-6)
    assert float(metrics["rewards/accuracies"]) == 0.75


def test_a_reward_model_starts_from_the_policy_with_its_layers_scanned_or_not():
    """train.objective=reward_model initialises the backbone from the policy's weights: with
    model.scan_layers (its layers' parameters stacked) as without, the same weights (it raised a KeyError on
    the stacked names)."""
    base = {"model": {"config": TINY["model"]["config"], "tokenizer": "x", "dtype": "float32"}}
    base["data"] = {"path": "/x.jsonl"}
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    q = {}
    for scan in (False, True):
        overrides = ["train.objective=reward_model", f"model.scan_layers={str(scan).lower()}"]
        cfg = from_dict(Config, apply_overrides(base, overrides))
        params = tr.init_params(cfg, mesh)
        assert jax.tree.structure(params) == jax.tree.structure(tr.abstract_model(cfg)[1])
        layers = params["backbone"]["layers"]
        attn = layers["attn"] if scan else layers[0]["attn"]  # scanned: [layers, ...] stacked
        q[scan] = np.asarray(attn["q"]["kernel"][...])[0] if scan else np.asarray(attn["q"]["kernel"][...])
    np.testing.assert_array_equal(q[True], q[False])


def test_scores_read_the_last_token_in_every_layout():
    model = new_score_model(ModelConfig.from_hf(TINY["model"]["config"]), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    examples = [
        (rng.integers(4, 200, size=int(rng.integers(2, 6))).astype(np.int32),
         [rng.integers(4, 200, size=n).astype(np.int32) for n in ns])
        for ns in ([3, 1, 4], [2, 5], [1, 1, 2])
    ]  # fmt: skip
    # each sequence alone in a right-padded row: the head on the hidden state of its last token
    sequences = [np.concatenate([p, c]) for p, cs in examples for c in cs]
    ids, segments = np.zeros((len(sequences), 16), np.int32), np.zeros((len(sequences), 16), np.int32)
    for i, x in enumerate(sequences):
        ids[i, : len(x)], segments[i, : len(x)] = x, 1
    positions = np.broadcast_to(np.arange(16, dtype=np.int32), ids.shape)
    hidden = nnx.jit(lambda m, *a: m.backbone(*a))(model, ids, positions, segments, np.zeros_like(ids))
    last = np.asarray(hidden)[np.arange(len(sequences)), [len(x) - 1 for x in sequences]]
    want = last @ np.asarray(model.score[...])[0]
    mask = np.array([[True] * 3, [True, True, False], [True] * 3])
    score = nnx.jit(lambda m, t: m(t, 9)[:, 0])
    for layout in ("padded", "packed", "shared_prefix"):
        tokens = layout_tokens(layout, examples, 3, 32, num_rows=4, split_length=None)
        got = np.asarray(score(model, jax.tree.map(jnp.asarray, tokens))).reshape(3, 3)
        np.testing.assert_allclose(got[mask], want, rtol=2e-5, atol=2e-5, err_msg=layout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`copg train-rm` on 64 preference pairs, 30 steps, in the shared-prefix layout."""
    root = tmp_path_factory.mktemp("rm")
    write_jsonl(root / "train.jsonl", _preference_rows(64, 0))
    write_jsonl(root / "eval.jsonl", _preference_rows(32, 1))
    cfg = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    cfg["model"]["tokenizer"] = str(REPO / cfg["model"]["tokenizer"])
    cfg["data"].update(
        path=str(root / "train.jsonl"), eval_path=str(root / "eval.jsonl"), layout="shared_prefix"
    )
    cfg["optim"].update(lr=3e-3, warmup_steps=3)
    cfg["train"].update(steps=30, log_every=1, eval_every=15, output_dir=str(root / "run"), progress=False)
    cfg["checkpoint"].update(every_steps=15, keep_best=0, best_metric="eval/loss", async_save=False)
    for key in ("ref_cache", "eval_ref_cache"):
        del cfg["data"][key]
    config = root / "rm.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train-rm", "--config", str(config)]) == 0
    return {"root": root, "config": config, "run": root / "run", "export": root / "run" / "export"}


def test_training_learns_the_preferences(trained):
    rows = read_jsonl(trained["run"] / "metrics.jsonl")
    train_rows = [r for r in rows if "grad_norm" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert np.mean([r["loss"] for r in train_rows[-5:]]) < 0.5 * np.mean([r["loss"] for r in train_rows[:3]])
    assert evals[-1]["eval/rewards/accuracies"] > 0.9  # held-out pairs ordered right
    assert "eval/kl/seq" not in evals[-1] and not (trained["run"] / "ref_cache").exists()  # no reference
    exported = json.loads((trained["export"] / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForSequenceClassification"]
    assert exported["copg_reward_input"]["chat_template"] is False


def test_export_matches_transformers_and_the_training_sequences(trained):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rm = RewardModel(trained["export"], batch_size=4)
    pairs = _preference_rows(6, 2)
    prompts = [r["prompt"] for r in pairs for _ in range(2)]
    completions = [c for r in pairs for c in (r["chosen"], r["rejected"])]
    ours = np.asarray(rm(prompts, completions))
    assert np.mean(ours[0::2] > ours[1::2]) > 0.8

    # the sequences scored are those training laid out: prompt as tokenised for training, completion, EOS
    tokenizer = load_tokenizer(trained["export"])
    data = tokenize_dataset(DataConfig(path=str(trained["root"] / "train.jsonl")), tokenizer)
    first = read_jsonl(trained["root"] / "train.jsonl")[0]
    row = data.rows[0]
    assert rm.encode(first["prompt"], first["chosen"]) == row["prompt_ids"] + row["completion_ids"][0]
    # a completion that did not finish is laid out without EOS in training, and scored so
    cut_kway = {
        "prompt": first["prompt"],
        "completions": [first["chosen"], first["rejected"]],
        "rewards": [1, 0],
    }
    write_jsonl(trained["root"] / "cut.jsonl", [{**cut_kway, "finished": [False, True]}])
    cut = tokenize_dataset(DataConfig(path=str(trained["root"] / "cut.jsonl")), tokenizer)
    cut_row = cut.rows[0]
    want = cut_row["prompt_ids"] + cut_row["completion_ids"][0]
    assert rm.encode(first["prompt"], first["chosen"], finished=False) == want
    assert want == row["prompt_ids"] + row["completion_ids"][0][:-1]

    # transformers' LlamaForSequenceClassification on the folder, the same ids, right-padded
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(trained["export"]).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    ids = [rm.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), tokenizer.pad_token_id)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
    with torch.no_grad():
        want = hf(input_ids=batch, attention_mask=(batch != tokenizer.pad_token_id).long()).logits[:, 0]
    np.testing.assert_allclose(ours, want.numpy(), rtol=1e-4, atol=1e-4)


def test_checkpoint_exports_and_scores_like_the_finished_run(trained, tmp_path):
    # `copg export` of the run's checkpoint is the folder written at the end, byte for byte
    assert cli.main(["export", "--run", str(trained["run"]), "--out", str(tmp_path / "again")]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (trained["export"] / name).read_bytes(), name
    # the training graph (restored checkpoint) scores a batch like the exported folder does
    cfg = tr.load_run_config(trained["run"] / "config.yaml")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params, _ = tr.restore_params(cfg, trained["run"] / "checkpoints", mesh)
    model = nnx.merge(graphdef, params)
    rows = read_jsonl(trained["root"] / "eval.jsonl")[:4]
    data = tokenize_dataset(cfg.data, load_tokenizer(cfg.tokenizer_path), cfg.data.eval_path)
    examples = [(np.asarray(r["prompt_ids"]), list(map(np.asarray, r["completion_ids"]))) for r in data.rows]
    tokens = layout_tokens("padded", examples[:4], 2, 32, split_length=None)
    in_training = np.asarray(model(jax.tree.map(jnp.asarray, tokens), 8)[:, 0])
    exported = RewardModel(trained["export"])(
        [r["prompt"] for r in rows for _ in range(2)], [c for r in rows for c in (r["chosen"], r["rejected"])]
    )
    np.testing.assert_allclose(in_training, exported, rtol=1e-5, atol=1e-5)
    # and `copg score --reward-model` writes those scores
    write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]]} for r in rows],
    )
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert score.main([*argv, "--reward-model", str(trained["export"])]) == 0
    scored = [x for r in read_jsonl(tmp_path / "out.jsonl") for x in r["rewards"]]
    np.testing.assert_allclose(scored, exported, rtol=1e-6)


def test_reward_model_settings_are_checked():
    from copg_jax.config import ConfigError
    from copg_jax.run_config import load_config

    base = ["model.config={model_type: llama}", "model.tokenizer=t", "train.objective=reward_model"]
    with pytest.raises(ConfigError, match="rollout.every_n_steps: not for a reward model"):
        load_config(None, [*base, "rollout.every_n_steps=2", "rollout.reward.fn=a:b"])
    with pytest.raises(
        ConfigError, match=r"train.objective: 'rm' is not one of \['policy', 'reward_model'\]"
    ):
        load_config(None, ["model.config={model_type: llama}", "model.tokenizer=t", "train.objective=rm"])
