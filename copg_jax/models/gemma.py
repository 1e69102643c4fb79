"""Gemma (1): Llama's layout with (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), GeGLU (tanh GELU),
head_dim from config (256 when absent) and tied embeddings."""

from __future__ import annotations

from typing import Any

from copg_jax.models import llama
from copg_jax.models.config import (
    ModelConfig,
    rope_from_hf,
    rope_to_hf,
    special_tokens_from_hf,
    special_tokens_to_hf,
)

MODEL_TYPES = ("gemma",)
tensor_maps = llama.tensor_maps
LORA = llama.LORA
DEFAULT_HEAD_DIM = 256  # transformers' GemmaConfig.head_dim


def activation_from_hf(hf: dict[str, Any]) -> str:
    """Our activation for a Gemma config the way transformers 5 reads it: `hidden_act` alone (the v4 key
    `hidden_activation` is ignored), its legacy value "gelu" meaning tanh GELU (GemmaConfig rewrites it)."""
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    return llama.activation_from_hf("gelu_pytorch_tanh" if act == "gelu" else act, "gemma")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    theta, scaling = rope_from_hf(hf)
    return ModelConfig(
        model_type="gemma",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or DEFAULT_HEAD_DIM,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_offset=1.0,
        activation=activation_from_hf(hf),
        qkv_bias=bias,
        out_bias=bias,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        rope_theta=theta,
        rope_scaling=scaling,
        embed_scale=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """GemmaConfig's dict; ValueError for exact GELU, which transformers would read as tanh GELU."""
    if cfg.activation == "gelu":
        raise ValueError(
            'gemma: exact GELU cannot be exported (transformers reads hidden_act "gelu" as tanh)'
        )
    act = llama.activation_to_hf(cfg.activation)
    return {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": act,
        "hidden_activation": act,
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": cfg.qkv_bias,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_to_hf(cfg),
        **special_tokens_to_hf(cfg),
    }
