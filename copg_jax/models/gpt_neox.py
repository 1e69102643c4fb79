"""GPT-NeoX / Pythia: LayerNorm, fused query_key_value in HF's per-head [H, 3, Dh] interleaving, partial
rotary (rotary_pct), optional parallel residual, plain GELU MLP, untied embed_out."""

from __future__ import annotations

from typing import Any

import numpy as np

from copg_jax.models.config import (
    ModelConfig,
    rope_from_hf,
    rope_to_hf,
    special_tokens_from_hf,
    special_tokens_to_hf,
)
from copg_jax.models.gpt2 import layer_norm
from copg_jax.models.hf_io import LoRALayout, TensorMap, linear, reshaped
from copg_jax.models.llama import activation_from_hf

MODEL_TYPES = ("gpt_neox",)
LORA = LoRALayout(
    layers="gpt_neox.layers",
    modules={
        "attention.query_key_value": "attn.qkv",
        "attention.dense": "attn.o",
        "mlp.dense_h_to_4h": "mlp.up",
        "mlp.dense_4h_to_h": "mlp.down",
    },
    default_targets=("query_key_value",),
    qkv_per_head=True,
)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    heads = hf["num_attention_heads"]
    theta, scaling = rope_from_hf(hf)
    rotary = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(
        model_type="gpt_neox",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hf["hidden_size"] // heads,
        norm="layer",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        activation=activation_from_hf(hf.get("hidden_act", "gelu"), "gpt_neox"),
        gated_mlp=False,
        mlp_bias=True,
        qkv_bias=bias,
        out_bias=bias,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_fraction=float(rotary),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """GPTNeoXConfig's dict: RoPE keys as the other families write them, the base and the rotary fraction
    also under GPT-NeoX's own names (`rotary_emb_base`, `rotary_pct`: what transformers reads)."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}[cfg.activation],
        "layer_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rotary_pct": cfg.rotary_fraction,
        "rotary_emb_base": cfg.rope_theta,
        "use_parallel_residual": cfg.parallel_residual,
        "attention_bias": cfg.qkv_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_to_hf(cfg),
        **special_tokens_to_hf(cfg),
    }


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """HF GPTNeoXForCausalLM names; query_key_value's 3D outputs are laid out [H, (q | k | v), Dh]."""
    d, h, dh, f, v = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    maps = [
        reshaped("gpt_neox.embed_in.weight", ("embed",), (v, d)),
        *layer_norm("gpt_neox.final_layer_norm", ("final_norm",), d),
    ]
    if not cfg.tie_embeddings:
        maps.append(linear("embed_out.weight", ("lm_head", "kernel"), (d,), (v,)))
    for i in range(cfg.num_layers):
        hf, ours = f"gpt_neox.layers.{i}.", ("layers", i)
        attn, mlp = ours + ("attn",), ours + ("mlp",)
        qkv = tuple(attn + (n,) for n in "qkv")
        maps += [
            *layer_norm(hf + "input_layernorm", ours + ("attn_norm",), d),
            *layer_norm(hf + "post_attention_layernorm", ours + ("mlp_norm",), d),
            TensorMap(
                hf + "attention.query_key_value.weight",
                (3 * d, d),
                tuple(p + ("kernel",) for p in qkv),
                lambda w: tuple(w.reshape(h, 3, dh, d)[:, j].transpose(2, 0, 1) for j in range(3)),
                lambda q, k, v_: np.stack([q, k, v_], axis=2).transpose(1, 2, 3, 0).reshape(3 * d, d),
            ),
            linear(hf + "attention.dense.weight", attn + ("o", "kernel"), (h, dh), (d,)),
            linear(hf + "mlp.dense_h_to_4h.weight", mlp + ("up", "kernel"), (d,), (f,)),
            reshaped(hf + "mlp.dense_h_to_4h.bias", mlp + ("up", "bias"), (f,)),
            linear(hf + "mlp.dense_4h_to_h.weight", mlp + ("down", "kernel"), (f,), (d,)),
            reshaped(hf + "mlp.dense_4h_to_h.bias", mlp + ("down", "bias"), (d,)),
        ]
        if cfg.qkv_bias:
            maps += [
                TensorMap(
                    hf + "attention.query_key_value.bias",
                    (3 * d,),
                    tuple(p + ("bias",) for p in qkv),
                    lambda b: tuple(b.reshape(h, 3, dh)[:, j] for j in range(3)),
                    lambda q, k, v_: np.stack([q, k, v_], axis=1).reshape(3 * d),
                ),
                reshaped(hf + "attention.dense.bias", attn + ("o", "bias"), (d,)),
            ]
    return maps
