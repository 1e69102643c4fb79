"""Parity of copg_jax decoders with transformers (PyTorch) both ways, KV-cache decode, load errors."""

import dataclasses
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tiny_configs import QWEN2

from copg_jax.models import (
    ModelConfig,
    from_config,
    from_pretrained,
    load_config,
    param_shardings,
    remove_old_weights,
    save_pretrained,
)
from copg_jax.models.hf_io import open_checkpoint
from copg_jax.models.layers import rope_attention_factor
from copg_jax.sharding import make_mesh
from copg_jax.train import ADAPTER_DIR, export_params

# initializer_range 0.2 (not 0.02) gives O(1) logits, so that a mis-mapped tensor cannot hide under atol
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    initializer_range=0.2,
)
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **TINY,
        num_key_value_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        rope_theta=500.0,
    ),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=5),
    # Ministral 8B: Mistral with `layer_types` (here a window on layer 1 only)
    "ministral": lambda: transformers.MinistralConfig(
        **TINY,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
    ),
    # YaRN (as Qwen2.5 enables it for long inputs), over a pretrained length of 4 so its ramp falls inside
    # the head's dimensions and the tests' lengths reach past it
    "qwen2": lambda: transformers.Qwen2Config(
        **TINY,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4},
    ),
    # a window on the second layer only (max_window_layers), so scanned layers switch between two kinds
    "qwen3": lambda: transformers.Qwen3Config(
        **TINY,
        num_key_value_heads=2,
        head_dim=16,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    ),
    "gemma": lambda: transformers.GemmaConfig(**TINY, num_key_value_heads=1, head_dim=16),
    # soft caps near the logits' scale (Gemma 2's own 50 / 30 would be linear here), a window on layer 0
    "gemma2": lambda: transformers.Gemma2Config(
        **TINY,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=12,
        sliding_window=4,
        attn_logit_softcapping=1.5,
        final_logit_softcapping=2.0,
    ),
    # windowed local layers with their own RoPE base, linear scaling on the global layer, (1 + w) q/k norms
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 3},
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        sliding_window_pattern=2,
        rope_theta=1e4,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    ),
    # NoPE on layer 1 (every second layer), which also gets the window
    "smollm3": lambda: transformers.SmolLM3Config(
        **TINY,
        num_key_value_heads=2,
        no_rope_layer_interval=2,
        use_sliding_window=True,
        sliding_window=4,
        **dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),  # in the tiny vocabulary
    ),
    "olmo2": lambda: transformers.Olmo2Config(**TINY, num_key_value_heads=2, rope_theta=1e4),
    # a window on layer 0 only, YaRN on the global layer 1 (OLMo 3's long-context setting)
    "olmo3": lambda: transformers.Olmo3Config(
        **TINY,
        num_key_value_heads=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4},
    ),
    # fused qkv (GQA) and gate_up, LongRoPE over a pretrained length of 4 (the tests' rows reach past it: long
    # factors; `test_longrope_*` take both), a partial rotary dimension (Phi-4-mini's), a window
    "phi3": lambda: transformers.Phi3Config(
        **TINY,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=4,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0]},
        partial_rotary_factor=0.5,
        sliding_window=5,
        **dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),  # in the tiny vocabulary
    ),
    # Granite's four scalars away from 1 (Granite 3: embeddings x 12, residuals x 0.22, logits / 8 or 16, and
    # attention scaled by 1 / head_dim, not its square root)
    "granite": lambda: transformers.GraniteConfig(
        **TINY,
        num_key_value_heads=2,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.3,
        logits_scaling=4.0,
        tie_word_embeddings=True,
    ),
    # GLM-4-0414: RoPE on half of each head in adjacent pairs, q/k/v biases, fused gate_up, four norms a block
    # Seed-OSS: q/k/v biases without an o bias, MLP biases
    "seed_oss": lambda: transformers.SeedOssConfig(
        **TINY, num_key_value_heads=2, head_dim=8, mlp_bias=True, pad_token_id=0, eos_token_id=2
    ),
    # EXAONE 4: OLMo 2's post norms, per-head q/k norms, a window on layer 0 and no RoPE on the global layer 1
    "exaone4": lambda: transformers.Exaone4Config(
        **TINY,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # GLM-4-9B-chat: the same without the output norms, partial rotary 3 / 4
    "glm": lambda: transformers.GlmConfig(
        **TINY, num_key_value_heads=2, head_dim=8, partial_rotary_factor=0.75, pad_token_id=0, eos_token_id=2
    ),
    "glm4": lambda: transformers.Glm4Config(
        **TINY, num_key_value_heads=2, head_dim=8, rope_theta=1e4, pad_token_id=0, eos_token_id=[1, 2]
    ),
    # mixtures of experts, 4 experts of which each token takes 2: Mixtral (renormalised, a window)
    "mixtral": lambda: transformers.MixtralConfig(
        **TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=5
    ),
    # Qwen2-MoE: q/k/v biases, a sigmoid-gated shared expert, a window on layer 0
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **TINY,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # Qwen3-MoE (30B-A3B: renormalised top-8 of 128, head_dim apart from hidden / heads), per-head q/k norms
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **TINY,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
    ),
    # OLMoE: q/k norms across all heads, top-k weights not renormalised
    "olmoe": lambda: transformers.OlmoeConfig(
        **TINY, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=2
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32, initializer_range=0.2
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **TINY,
        rotary_pct=0.5,
        use_parallel_residual=True,
        rope_parameters={
            "rope_type": "linear",
            "factor": 2.0,
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.5,
        },
    ),
    # YaRN on a partial rotary (its factor on cos and sin scales the rotated features only), with DeepSeek's
    # mscale / mscale_all_dim attention factor and no truncation of the ramp
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        **TINY,
        use_parallel_residual=False,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 4,
            "beta_fast": 4.0,
            "beta_slow": 0.5,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "truncate": False,
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.25,
        },
    ),
}
FAMILIES = sorted(HF_CONFIGS)


def hf_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        HF_CONFIGS[model_type](), attn_implementation="eager"
    )
    with torch.no_grad():  # random norms/biases so that every parameter's mapping is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def right_padded_tokens(vocab: int, lengths=(9, 5, 7), seed: int = 0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = rng.integers(0, vocab, (len(lengths), width)).astype(np.int32)
    mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return ids, mask


def jax_logits_fn(model, ids, mask):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model.logits(model(ids, positions, mask, jnp.zeros_like(mask)))


def jax_logits(model, ids, mask):
    return np.asarray(nnx.jit(jax_logits_fn)(model, jnp.asarray(ids), jnp.asarray(mask)))


def assert_equal(a, b):
    assert a == b, (a, b)


def torch_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask))
    return out.logits.float().numpy()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hf_to_jax_and_back(model_type, tmp_path):
    """Both ways, with the layers unrolled and scanned (stacked parameters read from and written to the same
    per-layer HF tensors)."""
    torch_model = hf_model(model_type)
    torch_model.save_pretrained(tmp_path / "hf")
    ids, mask = right_padded_tokens(torch_model.config.vocab_size)
    expected = torch_logits(torch_model, ids, mask)
    valid = mask.astype(bool)

    for scan_layers in (False, True):
        model = from_pretrained(tmp_path / "hf", dtype=jnp.float32, scan_layers=scan_layers)
        assert model.config.model_type == torch_model.config.model_type
        assert model.config.num_params() == sum(p.numel() for p in torch_model.parameters())
        logits = jax_logits(model, ids, mask)
        np.testing.assert_allclose(logits[valid], expected[valid], atol=1e-4, rtol=1e-4)

        save_pretrained(model, tmp_path / f"ours_{scan_layers}")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / f"ours_{scan_layers}", attn_implementation="eager"
        )
        np.testing.assert_allclose(
            torch_logits(reloaded, ids, mask)[valid], expected[valid], atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_gradients_equal_transformers_tensor_for_tensor(model_type, tmp_path):
    """The routing (top-k of the float32 softmax, renormalised or not) and the grouped expert matmuls
    differentiate as transformers' MoE blocks: the gradient of a weighted sum of the logits, written out as
    an HF folder (one tensor per expert and projection), equals torch's autograd for every tensor, the
    router's, every expert's and the shared expert's and its gate's included."""
    torch_model = hf_model(model_type)
    torch_model.save_pretrained(tmp_path / "hf")
    ids, mask = right_padded_tokens(torch_model.config.vocab_size)
    weights = np.random.default_rng(1).normal(size=(*ids.shape, 128)) * mask[..., None]
    logits = torch_model(
        input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)
    )
    (logits.logits * torch.as_tensor(weights, dtype=torch.float32)).sum().backward()
    with torch.no_grad():
        for p in torch_model.parameters():
            p.copy_(p.grad)
    torch_model.save_pretrained(tmp_path / "torch_grads")

    model = from_pretrained(tmp_path / "hf", dtype=jnp.float32)
    loss = lambda m: (jax_logits_fn(m, jnp.asarray(ids), jnp.asarray(mask)) * weights).sum()  # noqa: E731
    nnx.update(model, nnx.jit(nnx.grad(loss))(model))
    save_pretrained(model, tmp_path / "our_grads")
    theirs, ours = (open_checkpoint(tmp_path / d) for d in ("torch_grads", "our_grads"))
    assert theirs.keys() == ours.keys()
    assert any(".experts.3." in name for name in ours)
    for name, (want, _) in theirs.items():
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(ours[name][0], want, atol=2e-4 * scale, err_msg=name)
        assert np.abs(want).max() > 0, name  # every weight reaches the loss


def test_multimodal_gemma3_loads_its_language_model(tmp_path):
    """Gemma 3 from 4B up ships as Gemma3ForConditionalGeneration: its sparse text_config (sizes left to the
    defaults, special tokens at the top level) and language_model.* tensors give the text model, whose logits
    equal the multimodal model's on text; the export is a Gemma3ForCausalLM that transformers reads alike."""
    text = HF_CONFIGS["gemma3_text"]().to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    torch_model = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(
            text_config=text, vision_config=dict(vision, image_size=28, patch_size=14), eos_token_id=[1, 7]
        )
    ).eval()
    torch_model.save_pretrained(tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf["text_config"] = {k: v for k, v in hf["text_config"].items() if k != "query_pre_attn_scalar"}
    hf["text_config"]["eos_token_id"] = None  # the top level's [1, 7] holds
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    ids, mask = right_padded_tokens(text["vocab_size"])
    expected = torch_logits(torch_model, ids, mask)
    with pytest.warns(UserWarning, match="multimodal checkpoint: its language model is loaded"):
        model = from_pretrained(tmp_path / "hf", dtype=jnp.float32)
    assert (model.config.model_type, model.config.eos_token_ids) == ("gemma3_text", (1, 7))
    valid = mask.astype(bool)
    np.testing.assert_allclose(jax_logits(model, ids, mask)[valid], expected[valid], atol=1e-4, rtol=1e-4)
    save_pretrained(model, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    got = torch_logits(reloaded.eval(), ids, mask)
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=1e-4)
    # fine-tuned from the multimodal folder: exported as a multimodal folder with the trained language model
    # and the base's vision tower, projector, config and generation settings
    model.final_norm.scale[...] = model.final_norm.scale[...] + 0.5
    tuned = jax_logits(model, ids, mask)
    assert np.abs(tuned - expected)[valid].max() > 0.1
    save_pretrained(model, tmp_path / "multimodal", base=tmp_path / "hf")
    again = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "multimodal").eval()
    np.testing.assert_allclose(torch_logits(again, ids, mask)[valid], tuned[valid], atol=1e-4, rtol=1e-4)
    theirs = dict(torch_model.named_parameters())
    towers = [
        (n, p) for n, p in again.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n
    ]
    assert towers and all(torch.equal(p, theirs[n]) for n, p in towers)
    written, base = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("multimodal", "hf"))
    assert written == base | {"torch_dtype": "float32"}
    generation = [(tmp_path / d / "generation_config.json").read_text() for d in ("multimodal", "hf")]
    assert generation[0] == generation[1]
    with pytest.raises(ValueError, match="not the language model of the multimodal checkpoint"):
        other = from_config(dataclasses.replace(model.config, norm_eps=0.5), rngs=nnx.Rngs(0))
        save_pretrained(other, tmp_path / "bad", base=tmp_path / "hf")


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_flops_per_token_count_the_model_matmuls_and_the_keys_each_layer_sees(model_type):
    """6 x the model's own matmul weights (every Dense kernel, the head, not the embedding gather) + 12 x H x
    Dh x the keys a query sees, summed over layers: T, or the window on Gemma 2's windowed layer."""
    cfg = ModelConfig.from_hf(HF_CONFIGS[model_type]().to_dict())
    model = nnx.eval_shape(lambda: from_config(cfg, rngs=nnx.Rngs(0)))
    kernels = [v for path, v in nnx.to_flat_state(nnx.state(model)) if path[-1] == "kernel"]
    matmul = sum(int(np.prod(v.shape)) for v in kernels)
    matmul += cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0  # the head is the table
    keys = {"llama": [10, 10], "gemma2": [4, 10]}[model_type]  # Gemma 2: window 4 on layer 0
    want = 6 * matmul + 12 * cfg.num_heads * cfg.head_dim * sum(keys)
    assert cfg.flops_per_token(10) == want
    # a step's FLOPs over tokens of contexts 10, 3 and padding: each token's count, a third of it for the
    # forward pass; a frozen base (LoRA) skips its weights' gradients (2 x matmul), a reference forward adds
    # a forward pass, a reward model's head is d x 1
    context = np.array([[10, 3], [0, 10]])
    train = 2 * cfg.flops_per_token(10) + cfg.flops_per_token(3)
    np.testing.assert_allclose(cfg.step_flops(context), train, rtol=1e-6)
    np.testing.assert_allclose(cfg.step_flops(context, mode="forward"), train / 3, rtol=1e-6)
    frozen = cfg.step_flops(context, weights_trained=False, reference_forward=True)
    np.testing.assert_allclose(frozen, train - 3 * 2 * matmul + train / 3, rtol=1e-6)
    head = (cfg.vocab_size - 1) * cfg.hidden_size
    np.testing.assert_allclose(cfg.step_flops(context, output_head=False), train - 3 * 6 * head, rtol=1e-6)


def test_sharded_checkpoint_index(tmp_path):
    torch_model = hf_model("llama")
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids, mask = right_padded_tokens(torch_model.config.vocab_size)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        jax_logits(model, ids, mask)[valid], torch_logits(torch_model, ids, mask)[valid], atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "model_type, left_pad, scan_layers, prefill",
    [
        ("llama", True, False, None),
        ("mistral", False, False, None),
        ("qwen3", True, True, None),
        ("llama", True, False, "blockwise"),
        ("mistral", False, False, "pallas_gpu"),  # sliding window; Pallas in interpret mode on CPU
        ("qwen3", True, True, "blockwise"),
        ("gemma2", True, True, "blockwise"),  # soft caps, one window layer of two, scanned
        ("gemma3_text", False, False, None),
        ("olmo3", True, True, None),  # post norms only, q/k norms across heads, per-kind RoPE, scanned
        ("smollm3", False, True, "blockwise"),  # a NoPE windowed layer beside a RoPE one
    ],
)
def test_decode_matches_forward(model_type, left_pad, scan_layers, prefill):
    """Prefill of a padded prompt batch followed by 1-token steps gives the full forward's logits: prefill
    by `decode` (an explicit mask over the cache slots) or by `prefill` (the model's attention backend over
    the prompt alone)."""
    cfg = ModelConfig.from_hf(HF_CONFIGS[model_type]().to_dict())
    model = from_config(cfg, rngs=nnx.Rngs(1), scan_layers=scan_layers)
    stepper = model if prefill is None else from_config(cfg, rngs=nnx.Rngs(1), scan_layers=scan_layers,
                                                         attention=prefill)  # fmt: skip
    rng = np.random.default_rng(0)
    prompt_lengths, width, steps = np.array([5, 2, 4]), 5, 4
    real = np.arange(width)[None] < prompt_lengths[:, None]
    prompt_seg = (real[:, ::-1] if left_pad else real).astype(np.int32)
    prompt_pos = np.maximum(np.cumsum(prompt_seg, axis=1) - 1, 0).astype(np.int32)
    new_pos = prompt_lengths[:, None] + np.arange(steps)[None]
    ids = rng.integers(0, cfg.vocab_size, (3, width + steps)).astype(np.int32)
    segments = np.concatenate([prompt_seg, np.ones((3, steps), np.int32)], axis=1)
    positions = np.concatenate([prompt_pos, new_pos], axis=1).astype(np.int32)

    full = nnx.jit(lambda m, *a: m.logits(m(*a)))(model, ids, positions, segments, np.zeros_like(segments))
    decode = jax.jit(lambda m, *a: m.decode(*a))
    first = decode if prefill is None else jax.jit(lambda m, *a: m.prefill(*a))
    cache = stepper.init_cache(3, width + steps + 2)
    hidden, cache = first(stepper, ids[:, :width], positions[:, :width], segments[:, :width], cache)
    chunks = [hidden]
    for t in range(width, width + steps):
        hidden, cache = decode(
            stepper, ids[:, t : t + 1], positions[:, t : t + 1], segments[:, t : t + 1], cache
        )
        chunks.append(hidden)
    stepped = stepper.logits(jnp.concatenate(chunks, axis=1))
    valid = segments.astype(bool)
    np.testing.assert_allclose(np.asarray(stepped)[valid], np.asarray(full)[valid], atol=1e-5, rtol=1e-5)


def _phi3_longrope(original: int, folder) -> transformers.PreTrainedModel:
    """The "phi3" test model with LongRoPE over a pretrained length of `original` and no window, saved to
    `folder`."""
    config = HF_CONFIGS["phi3"]()
    config.sliding_window = None
    config.original_max_position_embeddings = config.rope_parameters["original_max_position_embeddings"] = (
        original
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    return model


def test_longrope_decides_per_sequence_as_transformers_does_for_it_alone(tmp_path):
    """LongRoPE's long factors apply to a sequence past the pretrained length (6 here), whatever it is
    batched with: padded rows, and packed rows mixing short and long sequences, each give transformers'
    logits of the sequence alone; in a shared-prefix row the prompt and its completions decide together."""
    torch_model = _phi3_longrope(6, tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 128, n).astype(np.int32) for n in (4, 6, 7, 10)]  # short, short, long, long
    alone = [torch_logits(torch_model, s[None], np.ones((1, len(s)), np.int32))[0] for s in seqs]
    ids, mask = right_padded_tokens(128, (4, 6, 7, 10))
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    padded = jax_logits(model, ids, mask)
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(padded[i, : len(s)], alone[i], atol=1e-5, rtol=1e-5)
    # one packed row: the long sequences beside the short ones, positions restarting per segment
    packed_ids = np.concatenate(seqs)[None]
    segments = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(seqs)])[None].astype(np.int32)
    positions = np.concatenate([np.arange(len(s)) for s in seqs])[None].astype(np.int32)
    packed = nnx.jit(lambda m, *a: m.logits(m(*a)))(model, packed_ids, positions, segments, 0 * segments)
    np.testing.assert_allclose(np.asarray(packed)[0], np.concatenate(alone), atol=1e-5, rtol=1e-5)
    # shared prefix: a 3-token prompt with completions of 2 and 5 tokens (sequences of 5 and 8): the group
    # reaches past 6, so both are rotated long, as transformers rotates the two in one batch
    prompt, short, long = seqs[3][:3], seqs[0][:2], seqs[2][:5]
    row = np.concatenate([prompt[:-1], prompt[-1:], short, prompt[-1:], long])[None]
    segments = np.array([[1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3]], np.int32)
    prefixes = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    positions = np.array([[0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]], np.int32)
    shared = np.asarray(nnx.jit(lambda m, *a: m.logits(m(*a)))(model, row, positions, segments, prefixes))[0]
    both = np.zeros((2, 8), np.int32)
    both[0, :5], both[1] = np.concatenate([prompt, short]), np.concatenate([prompt, long])
    batch = torch_logits(torch_model, both, np.array([[1] * 5 + [0] * 3, [1] * 8], np.int32))
    np.testing.assert_allclose(shared[2:5], batch[0, 2:5], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(shared[5:], batch[1, 2:], atol=1e-5, rtol=1e-5)
    solo = torch_logits(torch_model, both[:1, :5], np.ones((1, 5), np.int32))[0]
    assert not np.allclose(shared[2:5], solo[2:5], atol=1e-3)  # alone, the 5-token one would be short


@pytest.mark.parametrize("first, prompt", [("prefill", 4), ("decode", 7)])
def test_longrope_kv_cache_steps_rotate_as_transformers_cached_forward_does(first, prompt, tmp_path):
    """Decoding past the pretrained length (6): the prompt decides for its tokens by its own length (4:
    short; 7: long, whether written by `prefill` or by `decode`), each new token by its position, and the
    cached keys keep their rotation -- transformers' forward steps with a cache, logit for logit (Llama's
    generation; Phi-3's re-encodes the sequence when it crosses, and so does `generate` for Phi-3:
    test_generate's test_phi3_longrope_greedy_generation_equals_transformers_generate)."""
    torch_model = _phi3_longrope(6, tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    ids = np.random.default_rng(1).integers(0, 128, (1, 10)).astype(np.int32)
    chunks = [(0, prompt)] + [(t, t + 1) for t in range(prompt, 10)]
    want, cache = [], None
    with torch.no_grad():
        for a, b in chunks:
            out = torch_model(
                input_ids=torch.as_tensor(ids[:, a:b], dtype=torch.long),
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            want.append(out.logits.numpy()[0])
    positions, segments = np.arange(10, dtype=np.int32)[None], np.ones((1, 10), np.int32)
    steps = {"prefill": jax.jit(lambda m, *a: m.prefill(*a)), "decode": jax.jit(lambda m, *a: m.decode(*a))}
    cache, got = model.init_cache(1, 12), []
    for i, (a, b) in enumerate(chunks):
        step = steps[first if i == 0 else "decode"]
        hidden, cache = step(model, ids[:, a:b], positions[:, a:b], segments[:, a:b], cache)
        got.append(model.logits(hidden)[0])
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-5, rtol=1e-5)
    full = jax_logits(model, ids, segments)[0]  # the whole sequence at once is long from its first token
    assert np.allclose(full[:prompt], want[0], atol=1e-5) == (prompt > 6)


def test_unsupported_model_type_and_rope():
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert'.*gpt2.*llama"):
        ModelConfig.from_hf({"model_type": "bert"})
    hf = HF_CONFIGS["llama"]().to_dict()
    hf["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="llama: unsupported rope type 'dynamic'"):
        ModelConfig.from_hf(hf)
    odd = {**HF_CONFIGS["llama"]().to_dict(), "hidden_size": 30, "num_attention_heads": 4, "head_dim": None}
    with pytest.raises(
        ValueError, match="llama: the rotary dimension, head_dim 7 x partial_rotary_factor 1, is 7"
    ):
        ModelConfig.from_hf(odd)  # a traceback from inside the first trace, once


def test_missing_and_misshaped_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_model("qwen2").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.bias"
    save_file({k: v for k, v in tensors.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=rf"{name}.*\(16,\)"):
        from_pretrained(tmp_path)
    save_file({**tensors, name: np.zeros(15, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=rf"{name} in .*model.safetensors: expected shape \(16,\), got \(15,\)"
    ):
        from_pretrained(tmp_path)


def test_truncated_safetensors_and_broken_config_name_the_file(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])  # an interrupted copy
    with pytest.raises(ValueError, match=rf"{weights} is truncated: tensor \S+ needs bytes up to"):
        from_pretrained(tmp_path)
    weights.write_bytes(raw[:20])  # cut inside the header
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file"):
        from_pretrained(tmp_path)
    weights.write_bytes(raw)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not valid JSON"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_config_round_trip(model_type, tmp_path):
    """Our config.json reads back to the same ModelConfig, and transformers reads from it the architecture
    and RoPE (llama3 scaling in llama, linear in gpt_neox) it read from the original."""
    hf = HF_CONFIGS[model_type]()
    cfg = ModelConfig.from_hf(hf.to_dict())
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    assert load_config(tmp_path) == cfg
    names = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    assert cfg.to_hf()["architectures"] == [names[hf.model_type]]
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(again) is type(hf)
    assert getattr(again, "rope_parameters", None) == getattr(hf, "rope_parameters", None)


def test_generation_config_end_tokens_join_eos_token_ids(tmp_path):
    """generation_config.json's eos ids (Llama-3-Instruct's <|eot_id|>) end generation in transformers."""
    HF_CONFIGS["llama"]().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9, 2], "top_p": 0.9}))
    assert load_config(tmp_path).eos_token_ids == (2, 9)
    # a model fine-tuned from the folder is written with its generation settings
    save_pretrained(from_config(load_config(tmp_path), rngs=nnx.Rngs(0)), tmp_path / "out", base=tmp_path)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["top_p"] == 0.9
    assert load_config(tmp_path / "out").eos_token_ids == (2, 9)


# config.json dicts lacking keys, or with legacy values, that transformers fills in or rewrites
SMALL_HF = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4
)
DEFAULTS = {
    "mistral without sliding_window": dict(model_type="mistral"),  # 4096
    "mistral null sliding_window": dict(model_type="mistral", sliding_window=None),
    "qwen3 without head_dim": dict(model_type="qwen3"),  # 128
    "gemma without head_dim": dict(model_type="gemma"),  # 256
    "gemma legacy gelu": dict(model_type="gemma", hidden_act="gelu", head_dim=8),  # tanh GELU
    "gemma v4 hidden_activation": dict(model_type="gemma", hidden_activation="silu", head_dim=8),  # ignored
    "qwen2 window on every layer": dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=0
    ),
    "qwen2 window on no layer": dict(model_type="qwen2", use_sliding_window=True, sliding_window=5),
    "qwen3 window off": dict(model_type="qwen3", sliding_window=5, layer_types=["sliding_attention"] * 3),
    "qwen3 default window": dict(model_type="qwen3", use_sliding_window=True, max_window_layers=0),
    "qwen2 window on some layers": dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1
    ),
    "qwen3 layer_types": dict(
        model_type="qwen3",
        use_sliding_window=True,
        sliding_window=5,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    ),
    "gemma2 without window keys": dict(model_type="gemma2"),  # every other layer, 4096; head_dim 256
    "gemma2 null sliding_window": dict(model_type="gemma2", sliding_window=None, head_dim=8),
    "gemma3 legacy sliding_window_pattern": dict(
        model_type="gemma3_text", sliding_window=5, sliding_window_pattern=3, head_dim=8
    ),
    "gemma3 without window keys": dict(model_type="gemma3_text", head_dim=8, max_position_embeddings=64),
    "olmo3 without window keys": dict(model_type="olmo3", num_hidden_layers=4),  # 3 windowed of 4
    "ministral without layer_types": dict(model_type="ministral", sliding_window=5),  # every layer
    "ministral null sliding_window": dict(model_type="ministral", sliding_window=None),
    "phi3 without optional keys": dict(model_type="phi3"),  # 4096 positions, no window
    "granite without multipliers": dict(model_type="granite"),  # 1.0 each, attention's too
    "glm without head_dim": dict(model_type="glm"),  # 128, not hidden / heads
    "exaone4 without window keys": dict(model_type="exaone4", num_hidden_layers=4),  # 3 windowed of 4
    "seed_oss without head_dim": dict(model_type="seed_oss"),  # 128
    "exaone4 null sliding_window": dict(
        model_type="exaone4", sliding_window=None, layer_types=["full_attention"] * 3
    ),
    "phi3-mini-4k window": dict(model_type="phi3", sliding_window=2047),
    "smollm3 window on its NoPE layers": dict(
        model_type="smollm3", num_hidden_layers=4, use_sliding_window=True, sliding_window=5
    ),
    "smollm3 without rope_theta": dict(model_type="smollm3"),  # 2e6, not 1e4
}


def read_by_transformers(hf: dict) -> tuple:
    """(head_dim, every layer's window, activation, max positions, Granite's multipliers, RoPE theta) of an HF
    config dict as transformers reads it (Qwen2 modeling: head_dim defaults to hidden / heads; Gemma 2/3 read
    `hidden_activation`)."""
    config = transformers.AutoConfig.for_model(**hf)
    kinds = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    windows = tuple(window if kind == "sliding_attention" else None for kind in kinds)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    act = config.hidden_activation if hf["model_type"] in ("gemma2", "gemma3_text") else config.hidden_act
    activation = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}[act]
    granite = tuple(
        getattr(config, k, 1.0) for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling")
    )
    scale = getattr(config, "attention_multiplier", None)  # Granite's, else the family's 1 / sqrt(.)
    rope = config.rope_parameters
    theta = rope.get("full_attention", rope)["rope_theta"]  # per layer type (Gemma 3, OLMo 3): global layers'
    return head_dim, windows, activation, config.max_position_embeddings, granite, scale, theta


def ours(cfg: ModelConfig) -> tuple:
    """`read_by_transformers`' tuple of a ModelConfig."""
    windows = tuple(cfg.layer_kind(i).window for i in range(cfg.num_layers))
    granite = (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling)
    return (
        cfg.head_dim,
        windows,
        cfg.activation,
        cfg.max_position_embeddings,
        granite,
        cfg.attention_multiplier,
        cfg.rope_theta,
    )


@pytest.mark.parametrize("case", sorted(DEFAULTS))
def test_missing_and_legacy_config_keys_read_as_transformers_reads_them(case):
    """Read as transformers reads them, and written so that transformers reads the same again."""
    hf = {**SMALL_HF, **DEFAULTS[case]}
    want = read_by_transformers(hf)
    cfg = ModelConfig.from_hf(hf)
    assert ours(cfg) == want
    assert read_by_transformers(cfg.to_hf()) == want
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_gemma_caps_scale_and_legacy_rope_keys_read_as_transformers_reads_them():
    """Gemma 2's soft caps and query_pre_attn_scalar when absent; Gemma 3's legacy rope_theta / rope_scaling
    / rope_local_base_freq (as on the Hub) read as transformers 5's per-layer-type rope_parameters."""
    gemma2 = ModelConfig.from_hf({**SMALL_HF, "model_type": "gemma2"})
    hf2 = transformers.Gemma2Config(**SMALL_HF)
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.query_pre_attn_scalar) == (
        hf2.attn_logit_softcapping,
        hf2.final_logit_softcapping,
        hf2.query_pre_attn_scalar,
    )
    legacy = {
        **SMALL_HF,
        "model_type": "gemma3_text",
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        **dict(bos_token_id=2, eos_token_id=1, pad_token_id=0),  # transformers' defaults (we keep None)
    }
    cfg = ModelConfig.from_hf(legacy)
    assert cfg == ModelConfig.from_hf(transformers.AutoConfig.for_model(**legacy).to_dict())
    assert (cfg.rope_theta, cfg.rope_params, cfg.local_rope_theta, cfg.local_rope_scaling) == (
        1e6,
        {"rope_type": "linear", "factor": 8.0},
        1e4,
        (),
    )
    assert [cfg.layer_kind(i).rope_theta for i in range(3)] == [1e4, 1e4, 1e4]  # pattern 6: all local
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.qk_norm) == (None, None, True)
    # Gemma3Attention stores attn_logit_softcapping and never applies it: neither do we (we capped)
    assert ModelConfig.from_hf({**legacy, "attn_logit_softcapping": 1.5}).attn_softcap is None
    tokens = dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    sparse = ModelConfig.from_hf({"model_type": "gemma3", "text_config": {}, **tokens})  # a multimodal one's
    assert sparse == ModelConfig.from_hf(transformers.Gemma3TextConfig(**tokens).to_dict())
    with pytest.raises(ValueError, match="gemma3_text: use_bidirectional_attention"):
        ModelConfig.from_hf({**legacy, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="layer_types must name 3 layers"):
        ModelConfig.from_hf({**legacy, "layer_types": ["full_attention"]})


@pytest.mark.parametrize("legacy", ["su", "yarn", "longrope"])
def test_phi3_longrope_keys_read_as_transformers_reads_them(legacy):
    """Phi-3-*-128k's config.json: rope_scaling without a factor, the pretrained length at the top level,
    of type "longrope", or "su" / "yarn" as Phi3Config once wrote it (transformers 5 reads "yarn" in a phi3
    config as "longrope"; "su" it fails to read, we read it as "longrope" too); the attention factor on cos
    and sin is transformers' own."""
    factors = {"short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.0, 2.0, 4.0, 8.0]}
    hf = {
        **SMALL_HF,
        "model_type": "phi3",
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": legacy, **factors},
        **dict(bos_token_id=1, eos_token_id=2, pad_token_id=0),  # transformers' defaults (we keep None)
    }
    cfg = ModelConfig.from_hf(hf)
    theirs = transformers.AutoConfig.for_model(**{**hf, "rope_scaling": {"type": "longrope", **factors}})
    if legacy != "su":
        assert ModelConfig.from_hf(transformers.AutoConfig.for_model(**hf).to_dict()) == cfg
    ignored = ("rope_theta", "partial_rotary_factor", "type")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in theirs.rope_parameters.items()}
    assert cfg.rope_params == {**{k: v for k, v in params.items() if k not in ignored}, "factor": 32.0}
    assert ModelConfig.from_hf(theirs.to_dict()) == ModelConfig.from_hf(cfg.to_hf()) == cfg
    _, attention_factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](theirs)
    assert rope_attention_factor(cfg.rope_params) == pytest.approx(attention_factor, rel=1e-12)
    assert attention_factor > 1.1
    with pytest.raises(ValueError, match=r"phi3: longrope rope_parameters.long_factor must be a list"):
        ModelConfig.from_hf({**hf, "rope_scaling": {"type": legacy, "short_factor": [1.0] * 4}})
    with pytest.raises(
        ValueError, match=r"phi3: longrope short_factor / long_factor have 4 entries; .* needs 2"
    ):
        ModelConfig.from_hf({**hf, "partial_rotary_factor": 0.5})


def test_olmo3_legacy_rope_theta_applies_to_every_layer():
    """transformers 4 ran OLMo 3 with one rope_theta on every layer. transformers 5 reads a legacy config's
    rope_theta for the global layers only, and gives the local ones its default (500000). We read it as the
    model was trained. Every released OLMo 3 has rope_theta 500000, so for those both readings agree."""
    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}
    legacy = {
        **SMALL_HF,
        "model_type": "olmo3",
        "num_hidden_layers": 4,
        "rope_theta": 1e4,
        "rope_scaling": yarn,
    }
    cfg = ModelConfig.from_hf(legacy)
    kinds = [cfg.layer_kind(i) for i in range(4)]
    assert [(k.window, k.rope_theta) for k in kinds] == [(4096, 1e4)] * 3 + [(None, 1e4)]
    assert [dict(k.rope_scaling).get("rope_type") for k in kinds] == [None, None, None, "yarn"]
    released = {**legacy, "rope_theta": 5e5, **dict(eos_token_id=50279, pad_token_id=1)}
    assert ModelConfig.from_hf(released) == ModelConfig.from_hf(
        transformers.AutoConfig.for_model(**released).to_dict()
    )


@pytest.mark.parametrize("model_type", ["llama", "olmo2", "gemma2"])
def test_rms_norms_round_in_bfloat16_as_transformers_does(model_type):
    """In bf16 the order of RMSNorm's scale and cast matters: Llama casts x / rms(x) and then scales, OLMo
    scales in float32 and casts, Gemma scales by (1 + w) in float32. Every RMSNorm of our model (q / k norms
    included) equals its family's transformers norm bit for bit."""
    hf_config = HF_CONFIGS[model_type]()
    cfg = ModelConfig.from_hf(hf_config.to_dict())
    model = from_config(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    torch_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    torch_norm = type(torch_model.model.norm)
    rng = np.random.default_rng(0)
    norms = [m for _, m in model.iter_modules() if type(m).__name__ == "RMSNorm"]
    assert len(norms) >= 2 * cfg.num_layers + 1
    for norm in norms:
        width = norm.scale.shape
        weight = rng.normal(size=width).astype(np.float32)
        norm.scale[...] = jnp.asarray(weight, jnp.bfloat16)
        x = rng.normal(size=(3, *width)).astype(np.float32) * 3
        theirs = torch_norm(int(np.prod(width)), eps=cfg.norm_eps).to(torch.bfloat16)
        with torch.no_grad():
            theirs.weight.copy_(torch.as_tensor(weight.reshape(-1)))
            want = theirs(torch.as_tensor(x.reshape(3, -1)).to(torch.bfloat16)).float().numpy()
        got = np.asarray(norm(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32)).reshape(3, -1)
        np.testing.assert_array_equal(got, want)


def test_numeric_fields_given_as_strings_are_cast():
    """An inline YAML model.config reads 1e-5 as a string (YAML 1.1); a non-number is named."""
    for model_type in FAMILIES:
        hf = HF_CONFIGS[model_type]().to_dict()
        textual = {k: str(v) if type(v) in (int, float) else v for k, v in hf.items()}
        for key in ("rope_parameters", "rope_scaling"):
            if isinstance(hf.get(key), dict):
                textual[key] = {k: str(v) if type(v) in (int, float) else v for k, v in hf[key].items()}
        assert ModelConfig.from_hf(textual) == ModelConfig.from_hf(hf), model_type
    llama = HF_CONFIGS["llama"]().to_dict()
    with pytest.raises(ValueError, match=r"rms_norm_eps='1e-5x' is not a number"):
        ModelConfig.from_hf({**llama, "rms_norm_eps": "1e-5x"})
    with pytest.raises(ValueError, match=r"num_hidden_layers=2.5 is not an integer"):
        ModelConfig.from_hf({**llama, "num_hidden_layers": 2.5})


def test_bare_base_model_names(tmp_path):
    """GPT-2 hub checkpoints store GPT2Model tensors without the `transformer.` prefix."""
    from safetensors.numpy import load_file, save_file

    torch_model = hf_model("gpt2")
    torch_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    ids, mask = right_padded_tokens(128)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        jax_logits(from_pretrained(tmp_path, dtype=jnp.float32), ids, mask)[valid],
        torch_logits(torch_model, ids, mask)[valid],
        atol=1e-4,
        rtol=1e-4,
    )


def test_from_pretrained_on_mesh(tmp_path):
    """Parameters land in their logical shardings; dims the mesh cannot divide (1 KV head) are replicated."""
    hf_model("gemma").save_pretrained(tmp_path)
    single = from_pretrained(tmp_path, dtype=jnp.float32)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(tmp_path, dtype=jnp.float32, mesh=mesh)
    layer = sharded.layers[0].attn
    assert layer.q.kernel[...].sharding.spec == jax.P(("fsdp", "expert"), "tensor", None)
    assert layer.k.kernel[...].sharding.spec == jax.P(("fsdp", "expert"), None, None)
    shardings = param_shardings(sharded, mesh)
    jax.tree.map(lambda s, x: assert_equal(s, x.sharding), shardings, nnx.state(sharded))
    ids, mask = right_padded_tokens(128)
    with jax.set_mesh(mesh):
        logits = nnx.jit(jax_logits_fn)(sharded, ids, mask)
    np.testing.assert_allclose(logits, jax_logits(single, ids, mask), atol=1e-5)

    scanned = from_pretrained(tmp_path, dtype=jnp.float32, mesh=mesh, scan_layers=True)
    assert scanned.layers.attn.q.kernel[...].sharding.spec == jax.P(None, ("fsdp", "expert"), "tensor", None)
    jax.tree.map(lambda s, x: assert_equal(s, x.sharding), param_shardings(scanned, mesh), nnx.state(scanned))
    with jax.set_mesh(mesh):
        logits = nnx.jit(jax_logits_fn)(scanned, ids, mask)
    np.testing.assert_allclose(logits, jax_logits(single, ids, mask), atol=1e-5)


def test_a_model_written_over_an_earlier_one_leaves_no_old_weights(tmp_path):
    """An export into a folder that held a sharded model: its index, read before model.safetensors, served
    the old weights. The old weight files are removed; the base's own folder is refused."""
    model = from_config(QWEN2, rngs=nnx.Rngs(0))
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (folder / "tokenizer.json").write_text("{}")
    save_pretrained(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    again = from_pretrained(folder, dtype=jnp.float32)
    np.testing.assert_array_equal(again.embed[...], model.embed[...])
    with pytest.raises(ValueError, match="is the base model's folder"):
        save_pretrained(model, folder, base=str(folder))
    assert (folder / "model.safetensors").is_file()  # a refused save removes nothing
    url = "memory://bucket/export"  # an export to a URL: the earlier model's files there too
    fs = fsspec.filesystem("memory")
    for name in ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "config.json"):
        fs.pipe(f"/bucket/export/{name}", b"old")
    assert remove_old_weights(url) == ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("/bucket/export", detail=False)] == ["config.json"]


def test_an_export_without_lora_removes_an_earlier_exports_adapter(tmp_path):
    """A PEFT loader would apply an adapter left in the folder by an earlier LoRA export to the new model."""
    model = from_config(QWEN2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    folder = tmp_path / "export"
    (folder / ADAPTER_DIR).mkdir(parents=True)
    (folder / ADAPTER_DIR / "adapter_model.safetensors").write_bytes(b"old")
    export_params(graphdef, params, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    fs = fsspec.filesystem("memory")
    fs.pipe(f"/bucket/lora_export/{ADAPTER_DIR}/adapter_model.safetensors", b"old")
    export_params(graphdef, params, "memory://bucket/lora_export")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/bucket/lora_export", detail=False))
    assert names == ["config.json", "model.safetensors"]


def test_an_export_replaces_an_earlier_model_whole_and_keeps_other_files(tmp_path, caplog, monkeypatch):
    """An export into a folder an earlier model was written in: every file of that model goes (its tokenizer
    was read with the new weights, its chat template and generation settings applied, an adapter_config.json
    made transformers look for adapter weights that were removed), other files stay. The base's training
    settings (GPT-2's dropout of 0) are kept in config.json. Run folders, files and the base are refused."""
    from copg_jax import train as tr

    hf = HF_CONFIGS["gpt2"]()
    hf.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    model = from_config(ModelConfig.from_hf(hf.to_dict()), rngs=nnx.Rngs(0))
    base = tmp_path / "base"
    save_pretrained(model, base)
    (base / "config.json").write_text(hf.to_json_string())
    (base / "generation_config.json").write_text('{"eos_token_id": 2, "do_sample": false}')
    out = tmp_path / "export"
    (out / "notes").mkdir(parents=True)
    earlier = ("model-00001-of-00002.safetensors", "tokenizer.json", "special_tokens_map.json",
               "chat_template.jinja", "generation_config.json", "adapter_config.json")  # fmt: skip
    for name in (*earlier, "README.md", "notes/run.txt"):
        (out / name).write_text("earlier")
    with caplog.at_level(logging.WARNING):
        tr.export_params(*nnx.split(model), out, base_model=str(base))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors", "notes"]
    assert (out / "README.md").read_text() == "earlier" and (out / "notes" / "run.txt").is_file()
    assert json.loads((out / "generation_config.json").read_text())["do_sample"] is False  # the base's
    again = transformers.AutoConfig.from_pretrained(out)
    assert (again.resid_pdrop, again.embd_pdrop, again.attn_pdrop) == (0.0, 0.0, 0.0)  # not the 0.1 default
    replaced = "replaced the files of an earlier model: ['adapter_config.json', 'chat_template.jinja'"
    assert replaced in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "export"]  # nothing left beside them
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a_file").write_text("")
    refused = (("run", "is a run folder"), ("a_file", "is a file"), ("base", "is the base model's"))
    for folder, error in refused:
        with pytest.raises((ValueError, OSError), match=error):
            tr.export_params(*nnx.split(model), tmp_path / folder, base_model=str(base))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
    tr._check_export_folder(str(out), "meta-llama/Llama-3.1-8B")  # a hub id, no folder here: not compared
    # a link to the folder: the folder it names is written, the link stays
    (tmp_path / "link").symlink_to(out)
    (out / "tokenizer.json").write_text("earlier")
    tr.export_params(*nnx.split(model), tmp_path / "link", base_model=str(base))
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in out.iterdir()) == names
    # the working directory (or one inside it): replaced in place, the process keeps its working directory
    (out / "tokenizer.json").write_text("earlier")
    monkeypatch.chdir(out / "notes")
    tr.export_params(*nnx.split(model), out, base_model=str(base))
    assert Path.cwd() == out / "notes" and sorted(p.name for p in out.iterdir()) == names
    # a mount point (a rename across devices fails): staged inside it, then moved in
    (out / "tokenizer.json").write_text("earlier")
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out or real(path))
    rename = os.rename

    def across(src, dst):
        if Path(src).parent != Path(dst).parent and out not in (Path(src).parent.parent, Path(dst).parent):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", across)
    tr.export_params(*nnx.split(model), out, base_model=str(base))
    assert sorted(p.name for p in out.iterdir()) == names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "base", "export", "link", "run"]


def test_two_exports_to_one_folder_at_once_are_refused(tmp_path):
    """Two exports to one folder at once wrote in one staging folder, each removing the other's files (the
    second's start) or renaming a folder the other still wrote in: a model mixing both. The second is refused,
    naming the first's process; the first's staging folder and the earlier export are left alone. A lock file
    left by a killed export (its flock gone with its process) does not block the next."""
    from copg_jax import train as tr

    model = from_config(QWEN2, rngs=nnx.Rngs(0))
    out = tmp_path / "export"
    tr.export_params(*nnx.split(model), out)
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    staging = tr._export_staging(str(out))
    held = tr._lock_export(staging, str(out))  # the first export, midway
    Path(staging).mkdir()
    (Path(staging) / "model.safetensors").write_bytes(b"half written")
    other = from_config(QWEN2, rngs=nnx.Rngs(1))
    with pytest.raises(
        tr.ExportBusy, match=f"another export to .*export is being written \\(pid {os.getpid()} on"
    ):
        tr.export_params(*nnx.split(other), out)
    assert (Path(staging) / "model.safetensors").read_bytes() == b"half written"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    shutil.rmtree(staging)
    tr._unlock_export(staging, held)
    Path(staging + ".lock").write_text("pid 1 on a host that died")  # no flock held
    tr.export_params(*nnx.split(other), out)
    again = from_pretrained(out, dtype=jnp.float32)
    np.testing.assert_array_equal(again.embed[...], other.embed[...])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no lock or staging folder left


def test_only_process_0_writes_an_export(tmp_path, monkeypatch):
    """Every process gathers the parameters; process 0 alone writes: on a shared file system each process's
    export removed the weights another had just written (plain, LoRA and reward-model exports; a URL's
    staging folder likewise)."""
    from copg_jax import train as tr
    from copg_jax.models.adapters import add_adapters
    from copg_jax.models.lora import LoRASpec
    from copg_jax.rewards.reward_model import new_score_model

    fetched = []
    real = np.asarray

    def to_host(x):
        fetched.append(1)
        return real(x)

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    for module in ("copg_jax.models.hub", "copg_jax.models.adapters"):
        monkeypatch.setattr(f"{module}.to_host", to_host)
    plain = from_config(QWEN2, rngs=nnx.Rngs(0))
    lora = add_adapters(plain, LoRASpec(2, 4.0, targets=("attn.q",)), jax.random.key(1))
    score = new_score_model(QWEN2, rngs=nnx.Rngs(0))
    for name, model in (("plain", plain), ("lora", lora), ("score", score)):
        graphdef, params = nnx.split(model)
        fetched.clear()
        tr.export_params(graphdef, params, tmp_path / name)
        assert fetched and not (tmp_path / name).exists(), name
    fs = fsspec.filesystem("memory")
    tr.export_params(*nnx.split(plain), "memory://bucket/process_1")
    assert not fs.exists("/bucket/process_1")
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    (tmp_path / "a_file").write_text("")
    fetched.clear()
    with pytest.raises(OSError):  # the folder is checked before any gather: no process waits in one
        tr.export_params(*nnx.split(plain), tmp_path / "a_file" / "export")
    assert not fetched
    tr.export_params(*nnx.split(plain), tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["config.json", "model.safetensors"]


def test_a_write_failing_on_process_0_still_joins_every_gather(tmp_path, monkeypatch):
    """Process 0's disk filling while it writes (model.safetensors on /dev/full), or its folder failing to be
    prepared, fails its export only after it has joined every gather the other processes make, the LoRA
    adapter's included: leaving them for its error left the others waiting in the next gather. It writes no
    more (no adapter, no config) and raises the write's error."""
    from copg_jax import train as tr
    from copg_jax.models.adapters import add_adapters
    from copg_jax.models.lora import LoRASpec

    fetched = []
    real = np.asarray

    def to_host(x):
        fetched.append(1)
        return real(x)

    for module in ("copg_jax.models.hub", "copg_jax.models.adapters"):
        monkeypatch.setattr(f"{module}.to_host", to_host)
    plain = from_config(QWEN2, rngs=nnx.Rngs(0))
    lora = add_adapters(plain, LoRASpec(2, 4.0, targets=("attn.q",)), jax.random.key(1))
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    tr.export_params(*nnx.split(lora), tmp_path / "process_1")
    gathers = len(fetched)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("the earlier export's")
    fresh = tr._fresh_folder

    def filling(folder):  # the disk fills as the weights are written
        fresh(folder)
        (Path(folder) / "model.safetensors").symlink_to("/dev/full")

    monkeypatch.setattr(tr, "_fresh_folder", filling)
    fetched.clear()
    with pytest.raises(OSError, match=f"exporting to {full} failed: .*No space left on device"):
        tr.export_params(*nnx.split(lora), full)
    assert len(fetched) == gathers
    # the earlier export stays whole (it was left holding the new config.json beside a cut model.safetensors)
    assert [p.name for p in full.iterdir()] == ["config.json"]
    assert (full / "config.json").read_text() == "the earlier export's"
    assert [p.name for p in tmp_path.iterdir()] == ["full"]  # no staging folder left
    monkeypatch.setattr(tr, "_fresh_folder", fresh)

    def refused(folder):
        raise PermissionError(f"{folder}: read-only file system")

    monkeypatch.setattr("copg_jax.models.hub.remove_old_weights", refused)
    fetched.clear()
    with pytest.raises(PermissionError, match="read-only file system"):
        tr.export_params(*nnx.split(lora), tmp_path / "read_only")
    assert len(fetched) == gathers
