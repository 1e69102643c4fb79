"""OLMo 2 and OLMo 3 (AllenAI): Llama's modules with norms on the attention and MLP outputs only (none on
their inputs), q / k RMSNorm across all heads ([H x Dh], before RoPE), untied embeddings. OLMo 3 adds a
sliding window on three layers of four (`layer_types`); RoPE scaling (YaRN in the long-context models)
applies to its global layers only.
"""

from __future__ import annotations

from typing import Any

from copg_jax.models import llama
from copg_jax.models.config import (
    ModelConfig,
    hf_fields,
    layer_type_rope_from_hf,
    layer_types_from_hf,
    rope_from_hf,
    rope_to_hf,
    sizes_from_hf,
    special_tokens_from_hf,
)

MODEL_TYPES = ("olmo2", "olmo3")
ARCHITECTURES = {"olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM"}
tensor_maps = llama.tensor_maps
LORA = llama.LORA
DEFAULT_THETA = {"olmo2": 10_000.0, "olmo3": 500_000.0}  # transformers' defaults
DEFAULT_WINDOW = 4096  # Olmo3Config.sliding_window
WINDOW_EVERY = 4  # Olmo3Config: layer i is global when (i + 1) % 4 == 0, else windowed


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    heads = hf["num_attention_heads"]
    if model_type == "olmo3":
        rope = layer_type_rope_from_hf(hf, DEFAULT_THETA["olmo3"])  # legacy: rope_theta on every layer
        windows = dict(
            sliding_window=hf.get("sliding_window", DEFAULT_WINDOW),
            layer_types=layer_types_from_hf(hf, WINDOW_EVERY),
        )
    else:
        theta, scaling = rope_from_hf(hf, DEFAULT_THETA["olmo2"])
        rope, windows = dict(rope_theta=theta, rope_scaling=scaling), {}
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **sizes_from_hf(hf),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        norm_scale_in_float32=True,
        activation=llama.activation_from_hf(hf.get("hidden_act", "silu"), model_type),
        qkv_bias=bias,
        out_bias=bias,
        qk_norm=True,
        qk_norm_all_heads=True,
        pre_norms=False,
        post_norms=True,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **rope,
        **windows,
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Olmo2Config / Olmo3Config's dict (OLMo 3's RoPE per layer type, transformers 5's `rope_parameters`)."""
    hf = {
        **hf_fields(cfg, ARCHITECTURES[cfg.model_type]),
        "hidden_act": llama.activation_to_hf(cfg.activation),
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": cfg.qkv_bias,
    }
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        raise ValueError(f"{cfg.model_type}: head_dim must be hidden_size / num_attention_heads")
    if cfg.model_type == "olmo2":
        return {**hf, **rope_to_hf(cfg)}
    per_type = {
        "full_attention": {"rope_type": "default", **cfg.rope_params, "rope_theta": cfg.rope_theta},
        "sliding_attention": {
            "rope_type": "default",
            **dict(cfg.local_rope_scaling),
            "rope_theta": cfg.local_rope_theta or cfg.rope_theta,
        },
    }
    return {
        **hf,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "rope_parameters": per_type,
    }
