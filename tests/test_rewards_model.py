"""Reward model parity: our backbone + score head vs transformers' LlamaForSequenceClassification."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from copg_jax.data.testing import make_tiny_tokenizer

    path = tmp_path_factory.mktemp("rm")
    tok = make_tiny_tokenizer(str(path))
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a larger head than the default init so the scores are well away from 0
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    return path, model, tok


def test_scores_match_transformers(rm_dir):
    from copg_jax.rewards.reward_model import RewardModel

    path, hf_model, tok = rm_dir
    rm = RewardModel(path, batch_size=3, max_length=64)
    prompts = ["w1 w2 w3", "w10", [{"role": "user", "content": "w5 w6"}], "w7 w8"]
    completions = ["w4 w5", "w11 w12 w13 w14 w15 w16", "w7", "w9"]
    ours = rm(prompts, completions)
    ids = [rm.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
    assert ids[0][:1] == [tok.convert_tokens_to_ids("<|user|>")]  # the chat template was applied
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    with torch.no_grad():
        want = hf_model(input_ids=batch, attention_mask=mask).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
    assert np.std(want) > 0.1  # the rows really differ


def test_a_cut_completion_leaves_the_assistant_turn_open(rm_dir):
    """With a template that closes each turn with EOS, a finished completion is scored with it and a cut one
    without it (`continue_final_message`); either score is transformers' on those ids."""
    from copg_jax.rewards.reward_model import RewardModel

    path, hf_model, tok = rm_dir
    rm = RewardModel(path, max_length=64)
    rm.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} {% endfor %}"
    )
    done = rm.encode("w1 w2", "w4 w5")
    cut = rm.encode("w1 w2", "w4 w5", finished=False)
    assert done == [*cut, tok.eos_token_id] and tok.decode(cut).split()[-2:] == ["w4", "w5"]
    with torch.no_grad():
        want = [hf_model(input_ids=torch.tensor([x])).logits[0, 0].item() for x in (cut, done)]
    np.testing.assert_allclose(
        rm(["w1 w2"] * 2, ["w4 w5"] * 2, finished=[False, True]), want, rtol=1e-4, atol=1e-4
    )
    assert abs(want[0] - want[1]) > 1e-3


def test_missing_score_head_is_named(rm_dir, tmp_path):
    from flax import nnx

    from copg_jax.models import from_config, save_pretrained
    from copg_jax.models.config import ModelConfig
    from copg_jax.rewards.reward_model import load_backbone_and_head

    cfg = ModelConfig.from_hf(transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2).to_dict())  # fmt: skip
    save_pretrained(from_config(cfg, rngs=nnx.Rngs(0)), tmp_path)
    with pytest.raises(KeyError, match="no 'score.weight' tensor"):
        load_backbone_and_head(tmp_path)
