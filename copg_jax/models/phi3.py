"""Phi-3 / Phi-3.5 / Phi-4 (Microsoft; transformers' Phi3ForCausalLM): Llama's blocks with two fused
projections, qkv_proj ([q | k | v] outputs, GQA) and gate_up_proj ([gate | up]), split into our q / k / v
and gate / up kernels on load and fused again on export. The long-context checkpoints (Phi-3-*-128k,
Phi-3.5-mini, Phi-4-mini) use LongRoPE (`layers.rope_frequencies`), Phi-4-mini a partial rotary dimension.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from copg_jax.models import llama
from copg_jax.models.config import (
    ModelConfig,
    hf_fields,
    rope_from_hf,
    rope_to_hf,
    sizes_from_hf,
    special_tokens_from_hf,
    with_defaults,
)
from copg_jax.models.hf_io import LoRALayout, TensorMap

MODEL_TYPES = ("phi3",)
LORA = LoRALayout(
    layers="model.layers",
    modules={
        "self_attn.qkv_proj": "attn.qkv",
        "self_attn.o_proj": "attn.o",
        "mlp.gate_up_proj": "mlp.gate_up",
        "mlp.down_proj": "mlp.down",
    },
    default_targets=("qkv_proj",),  # PEFT has no default for Phi-3; the fused attention input, as GPT-2's
)
# Phi3Config's defaults for keys a config.json may lack
DEFAULTS = dict(max_position_embeddings=4096, original_max_position_embeddings=4096, rms_norm_eps=1e-5)
LEGACY_LONGROPE = ("su", "yarn")  # Phi3Config reads these older rope types as "longrope"
FUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # Llama's tensors that Phi-3 fuses


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = with_defaults(hf, DEFAULTS)
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key)
        if isinstance(params, dict) and params.get("rope_type", params.get("type")) in LEGACY_LONGROPE:
            hf[key] = {**{k: v for k, v in params.items() if k != "type"}, "rope_type": "longrope"}
    theta, scaling = rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    rotary = hf.get("partial_rotary_factor", 1.0)
    rotary = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", rotary)
    return ModelConfig(
        **sizes_from_hf(hf),
        head_dim=hf["hidden_size"] // heads,
        norm_eps=hf["rms_norm_eps"],
        activation=llama.activation_from_hf(hf.get("hidden_act", "silu"), "phi3"),
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_fraction=float(rotary),
        sliding_window=hf.get("sliding_window"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.layer_types or cfg.nope_layers or cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias or cfg.qk_norm:
        raise ValueError("phi3: per-layer windows or RoPE, biases and q/k norms cannot be exported")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError(f"phi3: head_dim must be hidden_size / heads, got {cfg.head_dim}")
    original = dict(cfg.rope_scaling).get("original_max_position_embeddings", cfg.max_position_embeddings)
    return {
        **hf_fields(cfg, "Phi3ForCausalLM"),
        "hidden_act": llama.activation_to_hf(cfg.activation),
        "rms_norm_eps": cfg.norm_eps,
        "original_max_position_embeddings": original,
        "partial_rotary_factor": cfg.rotary_fraction,
        "sliding_window": cfg.sliding_window,
        **rope_to_hf(cfg),
    }


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Phi3ForCausalLM's tensor names: Llama's, with q/k/v and gate/up fused into [out, in] weights whose
    outputs are [q (H x Dh) | k (KV x Dh) | v (KV x Dh)] and [gate (F) | up (F)]."""
    maps = [m for m in llama.tensor_maps(cfg) if m.name.split(".")[-2] not in FUSED]
    for i in range(cfg.num_layers):
        maps += [fused_qkv(cfg, i), fused_gate_up(cfg, i)]
    return maps


def fused_qkv(cfg: ModelConfig, layer: int) -> TensorMap:
    """Block `layer`'s self_attn.qkv_proj.weight [(H + 2 KV) Dh, D] <-> our q, k and v kernels."""
    d, h, kv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = ("layers", layer, "attn")
    return TensorMap(
        f"model.layers.{layer}.self_attn.qkv_proj.weight",
        ((h + 2 * kv) * dh, d),
        tuple(attn + (n, "kernel") for n in "qkv"),
        lambda w: tuple(part.T.reshape(d, -1, dh) for part in np.split(w, [h * dh, (h + kv) * dh], axis=0)),
        lambda q, k, v: np.concatenate([x.reshape(d, -1).T for x in (q, k, v)], axis=0),
    )


def fused_gate_up(cfg: ModelConfig, layer: int) -> TensorMap:
    """Block `layer`'s mlp.gate_up_proj.weight [2F, D] <-> our gate and up kernels."""
    f, mlp = cfg.intermediate_size, ("layers", layer, "mlp")
    return TensorMap(
        f"model.layers.{layer}.mlp.gate_up_proj.weight",
        (2 * f, cfg.hidden_size),
        (mlp + ("gate", "kernel"), mlp + ("up", "kernel")),
        lambda w: (w[:f].T, w[f:].T),
        lambda gate, up: np.concatenate([gate.T, up.T], axis=0),
    )
