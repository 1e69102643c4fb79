"""EXAONE 4.0 (LG AI Research; transformers' Exaone4ForCausalLM): OLMo 2's block (norms on the attention and
MLP outputs only) with per-head q / k RMSNorm (Qwen3's), Llama's norm rounding, and with a window (3 local
layers to 1 global by default) RoPE on the local layers alone: the global layers have no position encoding.
"""

from __future__ import annotations

from typing import Any

from copg_jax.models import llama
from copg_jax.models.config import (
    ModelConfig,
    hf_fields,
    layer_types_from_hf,
    rope_from_hf,
    rope_to_hf,
    sizes_from_hf,
    special_tokens_from_hf,
    window_layers,
)

MODEL_TYPES = ("exaone4",)
tensor_maps = llama.tensor_maps
LORA = llama.LORA
DEFAULT_WINDOW, DEFAULT_PATTERN = 4096, 4  # Exaone4Config.sliding_window / sliding_window_pattern


def exaone_layer_types(hf: dict[str, Any]) -> tuple[str, ...]:
    """Every layer's attention kind as Exaone4Config reads it: `layer_types`, else with a window its
    `sliding_window_pattern` (an int n: every n-th layer global; a string such as "LLLG", repeated)."""
    n, pattern = hf["num_hidden_layers"], hf.get("sliding_window_pattern", DEFAULT_PATTERN)
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    if hf.get("sliding_window", DEFAULT_WINDOW) is None or not pattern:
        return ("full_attention",) * n
    if isinstance(pattern, str):
        kinds = {"L": "sliding_attention", "G": "full_attention"}
        return tuple(kinds[pattern[i % len(pattern)]] for i in range(n))
    return layer_types_from_hf(hf, int(pattern))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    theta, scaling = rope_from_hf(hf)
    window = hf.get("sliding_window", DEFAULT_WINDOW)
    types = exaone_layer_types(hf)
    nope = () if window is None else tuple(i for i, t in enumerate(types) if t == "full_attention")
    window, layer_types = window_layers(window, types)
    return ModelConfig(
        **sizes_from_hf(hf),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        activation=llama.activation_from_hf(hf.get("hidden_act", "silu"), "exaone4"),
        qk_norm=True,
        pre_norms=False,
        post_norms=True,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        layer_types=layer_types,
        nope_layers=nope,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    kinds = [cfg.layer_kind(i) for i in range(cfg.num_layers)]
    global_layers = tuple(i for i, k in enumerate(kinds) if k.window is None)
    if cfg.nope_layers != (global_layers if cfg.sliding_window is not None else ()):
        raise ValueError("exaone4: only the global layers of a windowed model go without RoPE")
    return {
        **hf_fields(cfg, "Exaone4ForCausalLM"),
        "head_dim": cfg.head_dim,
        "hidden_act": llama.activation_to_hf(cfg.activation),
        "rms_norm_eps": cfg.norm_eps,
        "sliding_window": cfg.sliding_window,
        "layer_types": ["full_attention" if k.window is None else "sliding_attention" for k in kinds],
        **rope_to_hf(cfg),
    }
