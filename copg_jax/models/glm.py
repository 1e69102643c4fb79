"""GLM-4 (Zhipu / THUDM; transformers' GlmForCausalLM for GLM-4-9B-chat, Glm4ForCausalLM for GLM-4-0414 and
GLM-Z1): Llama's attention with q/k/v biases and RoPE on half of each head in adjacent feature pairs
(`rope_interleaved`), Phi-3's fused gate_up_proj, and for Glm4 norms on the attention and MLP outputs too.
"""

from __future__ import annotations

from typing import Any

from copg_jax.models import llama, phi3
from copg_jax.models.config import (
    ModelConfig,
    hf_fields,
    rope_from_hf,
    rope_to_hf,
    sizes_from_hf,
    special_tokens_from_hf,
    with_defaults,
)
from copg_jax.models.hf_io import LoRALayout, TensorMap, reshaped

MODEL_TYPES = ("glm", "glm4")
ARCHITECTURES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}
LORA = LoRALayout(  # Llama's modules with Phi-3's fused gate_up_proj; PEFT has no default for GLM: Llama's
    layers="model.layers",
    modules={
        **{m: site for m, site in llama.LORA.modules.items() if site not in ("mlp.gate", "mlp.up")},
        "mlp.gate_up_proj": "mlp.gate_up",
    },
    default_targets=llama.LORA.default_targets,
)
# GlmConfig / Glm4Config defaults for keys a config.json may lack
DEFAULTS = dict(
    head_dim=128,
    partial_rotary_factor=0.5,
    attention_bias=True,
    rms_norm_eps=1.5625e-07,
    max_position_embeddings=131072,
)
# our norms <- their names: Glm4's four norms per block (GLM's: the first and third)
NORMS = {
    "input_layernorm": "attn_norm",
    "post_self_attn_layernorm": "attn_post_norm",
    "post_attention_layernorm": "mlp_norm",
    "post_mlp_layernorm": "mlp_post_norm",
}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = with_defaults(hf, DEFAULTS)
    theta, scaling = rope_from_hf(hf)
    rotary = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf["partial_rotary_factor"])
    return ModelConfig(
        **sizes_from_hf(hf),
        head_dim=hf["head_dim"],
        norm_eps=hf["rms_norm_eps"],
        activation=llama.activation_from_hf(hf.get("hidden_act", "silu"), hf["model_type"]),
        qkv_bias=bool(hf["attention_bias"]),
        post_norms=hf["model_type"] == "glm4",
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_fraction=float(rotary),
        rope_interleaved=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.sliding_window is not None or cfg.out_bias or cfg.mlp_bias or cfg.qk_norm:
        raise ValueError(f"{cfg.model_type}: windows, o / MLP biases and q/k norms cannot be exported")
    return {
        **hf_fields(cfg, ARCHITECTURES[cfg.model_type]),
        "head_dim": cfg.head_dim,
        "hidden_act": llama.activation_to_hf(cfg.activation),
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": cfg.qkv_bias,
        "partial_rotary_factor": cfg.rotary_fraction,
        **rope_to_hf(cfg),
    }


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """GlmForCausalLM / Glm4ForCausalLM's tensor names: Llama's (q/k/v biases included) with Phi-3's fused
    gate_up_proj and GLM's norm names."""
    d = cfg.hidden_size
    unfused = ("gate_proj", "up_proj", *NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm")
    maps = [m for m in llama.tensor_maps(cfg) if m.name.split(".")[-2] not in unfused]
    for i in range(cfg.num_layers):
        maps.append(phi3.fused_gate_up(cfg, i))
        for name, norm in NORMS.items():
            if cfg.post_norms or not norm.endswith("post_norm"):
                maps.append(reshaped(f"model.layers.{i}.{name}.weight", ("layers", i, norm, "scale"), (d,)))
    return maps
