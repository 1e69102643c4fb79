"""Gemma 1, 2 and 3 (text): Llama's layout with (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), GeGLU
(tanh GELU), head_dim from config (256 when absent) and tied embeddings.

Gemma 2 adds norms on the attention and MLP outputs (`post_norms`), logits scaled by
query_pre_attn_scalar^-1/2, soft-capped attention and output logits, and a sliding window on every other
layer (`layer_types`). Gemma 3 (`gemma3_text`, Gemma3ForCausalLM) drops the soft caps, adds (1 + w) q/k
norms, windows five layers in six and gives those local layers their own RoPE base (rope_local_base_freq).
A multimodal Gemma 3 folder (Gemma3ForConditionalGeneration: 4B and up) gives its language model.
"""

from __future__ import annotations

from typing import Any

from copg_jax.models import llama
from copg_jax.models.config import (
    ModelConfig,
    hf_fields,
    layer_type_rope_from_hf,
    layer_types_from_hf,
    numeric_fields,
    rope_from_hf,
    rope_to_hf,
    sizes_from_hf,
    special_tokens_from_hf,
)

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")  # gemma3: the language model of a multimodal one
ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
tensor_maps = llama.tensor_maps
LORA = llama.LORA
DEFAULT_HEAD_DIM = 256  # transformers' GemmaConfig / Gemma2Config / Gemma3TextConfig.head_dim
# transformers' defaults of the keys a config.json may lack
MAX_POSITIONS = {"gemma": 8192, "gemma2": 8192, "gemma3_text": 131072}
SOFTCAPS = {"gemma2": (50.0, 30.0), "gemma3_text": (None, None)}  # (attention, final) logit caps
WINDOW_EVERY = {"gemma2": 2, "gemma3_text": 6}  # layer i is global when (i + 1) % this == 0, else windowed
DEFAULT_WINDOW = 4096
GEMMA3_THETA = (1_000_000.0, 10_000.0)  # Gemma3TextConfig's RoPE bases: global, local
# Gemma3TextConfig's sizes, which the sparse text_config of a multimodal Gemma 3 config.json may leave out
GEMMA3_SIZES = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
)
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The gemma3_text config of a multimodal Gemma 3 config.json (Gemma3ForConditionalGeneration): its
    `text_config` over Gemma3TextConfig's sizes, with the top level's special tokens where it has none."""
    text = {**GEMMA3_SIZES, **numeric_fields(hf.get("text_config") or {}), "model_type": "gemma3_text"}
    for key in SPECIAL_TOKENS:
        if text.get(key) is None and hf.get(key) is not None:
            text[key] = hf[key]
    return text


def activation_from_hf(hf: dict[str, Any]) -> str:
    """Our activation for a Gemma config the way transformers 5 reads it. Gemma 1: `hidden_act` alone (the v4
    key `hidden_activation` is ignored), its legacy value "gelu" meaning tanh GELU (GemmaConfig rewrites it).
    Gemma 2/3: `hidden_activation` alone, read as written."""
    if hf["model_type"] != "gemma":
        return llama.activation_from_hf(hf.get("hidden_activation") or "gelu_pytorch_tanh", hf["model_type"])
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    return llama.activation_from_hf("gelu_pytorch_tanh" if act == "gelu" else act, "gemma")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig of a Gemma config.json; a multimodal Gemma 3's (model_type gemma3) is its language model's,
    a gemma3_text ModelConfig (loaded from the checkpoint's language_model.* tensors, exported as
    Gemma3ForCausalLM)."""
    if hf["model_type"] == "gemma3":
        hf = text_config(hf)
    model_type = hf["model_type"]
    bias = bool(hf.get("attention_bias", False))
    later = model_type != "gemma"
    if later and hf.get("use_bidirectional_attention"):
        raise ValueError(f"{model_type}: use_bidirectional_attention (an encoder) is not a causal LM")
    if model_type == "gemma3_text":
        rope = layer_type_rope_from_hf(hf, GEMMA3_THETA[0], hf.get("rope_local_base_freq", GEMMA3_THETA[1]))
    else:
        theta, scaling = rope_from_hf(hf)
        rope = dict(rope_theta=theta, rope_scaling=scaling)
    head_dim = hf.get("head_dim") or DEFAULT_HEAD_DIM
    extra = {}
    if later:
        attn_cap, final_cap = SOFTCAPS[model_type]
        extra = dict(
            # the period: Gemma 3's legacy `sliding_window_pattern`, else the family's
            layer_types=layer_types_from_hf(hf, hf.get("sliding_window_pattern") or WINDOW_EVERY[model_type]),
            sliding_window=hf.get("sliding_window", DEFAULT_WINDOW),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or DEFAULT_HEAD_DIM),
            # Gemma 3 keeps the key, but transformers' Gemma3Attention never applies it (QK-norm took over)
            attn_softcap=None if model_type == "gemma3_text" else hf.get("attn_logit_softcapping", attn_cap),
            final_softcap=hf.get("final_logit_softcapping", final_cap),
            post_norms=True,
            qk_norm=model_type == "gemma3_text",
        )
    return ModelConfig(
        **sizes_from_hf(hf),
        head_dim=head_dim,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_offset=1.0,
        activation=activation_from_hf(hf),
        qkv_bias=bias,
        out_bias=bias,
        max_position_embeddings=hf.get("max_position_embeddings", MAX_POSITIONS[model_type]),
        embed_scale=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **rope,
        **extra,
        **special_tokens_from_hf(hf),
    )


def _number(x: float) -> float | int:
    """x as an int when whole (transformers' strict configs type query_pre_attn_scalar as int)."""
    return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Gemma(2|3Text)Config's dict; ValueError for exact GELU in Gemma 1, which transformers would read as
    tanh GELU, and for a scaled local RoPE of Gemma 3 (the legacy keys cannot say it)."""
    if cfg.model_type == "gemma" and cfg.activation == "gelu":
        raise ValueError(
            'gemma: exact GELU cannot be exported (transformers reads hidden_act "gelu" as tanh)'
        )
    act = llama.activation_to_hf(cfg.activation)
    hf = {
        **hf_fields(cfg, ARCHITECTURES[cfg.model_type]),
        "head_dim": cfg.head_dim,
        "hidden_act": act,
        "hidden_activation": act,
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": cfg.qkv_bias,
        **rope_to_hf(cfg),
    }
    if cfg.model_type == "gemma":
        return hf
    hf.update(
        layer_types=list(cfg.layer_types),
        sliding_window=cfg.sliding_window,
        query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar or cfg.head_dim),
        attn_logit_softcapping=cfg.attn_softcap,
        final_logit_softcapping=cfg.final_softcap,
    )
    if cfg.model_type == "gemma3_text":
        if cfg.local_rope_scaling:
            raise ValueError(
                f"gemma3_text: a scaled RoPE on the local layers cannot be exported: {cfg.local_rope_scaling}"
            )
        hf["rope_local_base_freq"] = cfg.local_rope_theta
    return hf
