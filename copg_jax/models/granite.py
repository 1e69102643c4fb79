"""IBM Granite (transformers' GraniteForCausalLM; Granite 3.x dense models): Llama's blocks and tensors with
four scalars: the embeddings multiplied by `embedding_multiplier`, the attention logits scaled by
`attention_multiplier` (in place of 1 / sqrt(head_dim)), the attention and MLP outputs multiplied by
`residual_multiplier` before their residual adds, and the output logits divided by `logits_scaling`.
"""

from __future__ import annotations

from typing import Any

from copg_jax.models import llama
from copg_jax.models.config import (
    ModelConfig,
    hf_fields,
    rope_from_hf,
    rope_to_hf,
    sizes_from_hf,
    special_tokens_from_hf,
)

MODEL_TYPES = ("granite",)
tensor_maps = llama.tensor_maps
LORA = llama.LORA
MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    theta, scaling = rope_from_hf(hf)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **sizes_from_hf(hf),
        head_dim=hf["hidden_size"] // hf["num_attention_heads"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=llama.activation_from_hf(hf.get("hidden_act", "silu"), "granite"),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qkv_bias=bias,
        out_bias=bias,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **{key: float(1.0 if hf.get(key) is None else hf[key]) for key in MULTIPLIERS},  # defaults: 1.0
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size or cfg.qkv_bias != cfg.out_bias:
        raise ValueError("granite: head_dim must be hidden_size / heads, and q/k/v/o biases all or none")
    return {
        **hf_fields(cfg, "GraniteForCausalLM"),
        "hidden_act": llama.activation_to_hf(cfg.activation),
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
        "embedding_multiplier": cfg.embedding_multiplier,
        "residual_multiplier": cfg.residual_multiplier,
        "attention_multiplier": cfg.attention_multiplier or cfg.head_dim**-0.5,
        "logits_scaling": cfg.logits_scaling,
        **rope_to_hf(cfg),
    }
