"""Llama family: Llama 2/3 (llama3 / linear RoPE scaling), Mistral, Ministral (windows on the layers
`layer_types` names), Qwen2/2.5 (qkv bias), Qwen3 (q/k norm), SmolLM3 (no RoPE on every fourth layer),
Seed-OSS (q/k/v biases, an o bias apart).

RMSNorm, SwiGLU, GQA with RoPE; separate q/k/v/o and gate/up/down Linear weights stored [out, in].
"""

from __future__ import annotations

from typing import Any

from copg_jax.models.config import (
    ModelConfig,
    hf_fields,
    rope_from_hf,
    rope_to_hf,
    sizes_from_hf,
    special_tokens_from_hf,
    window_layers,
)
from copg_jax.models.hf_io import LoRALayout, TensorMap, linear, reshaped

MODEL_TYPES = ("llama", "mistral", "ministral", "qwen2", "qwen3", "smollm3", "seed_oss")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "ministral": "MinistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "seed_oss": "SeedOssForCausalLM",
}
LORA = LoRALayout(
    layers="model.layers",
    modules={
        "self_attn.q_proj": "attn.q",
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
        "self_attn.o_proj": "attn.o",
        "mlp.gate_proj": "mlp.gate",
        "mlp.up_proj": "mlp.up",
        "mlp.down_proj": "mlp.down",
    },
    default_targets=("q_proj", "v_proj"),
)
HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# transformers' defaults for keys a config.json may lack (Qwen3Config.head_dim is 128, not hidden / heads)
MAX_POSITIONS = {
    "llama": 2048,
    "mistral": 4096 * 32,
    "ministral": 4096 * 32,
    "qwen2": 32768,
    "qwen3": 32768,
    "smollm3": 32768,
    "seed_oss": 524288,
}
TIED = {"smollm3": True}  # tie_word_embeddings when absent (else False)
NOPE_EVERY = 4  # SmolLM3Config.no_rope_layer_interval: layer i has no RoPE when (i + 1) % 4 == 0
DEFAULT_HEAD_DIM = {"qwen3": 128, "seed_oss": 128}
DEFAULT_THETA = {"smollm3": 2_000_000.0}  # rope_theta absent: transformers' default (10000 for the others)
DEFAULT_WINDOW = 4096  # MistralConfig / Qwen2Config / Qwen3Config.sliding_window
QWEN_WINDOW_LAYERS = 28  # Qwen2Config / Qwen3Config.max_window_layers


def activation_from_hf(name: str, model_type: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(
            f"{model_type}: unsupported activation {name!r}; supported: {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[name]


def activation_to_hf(name: str) -> str:
    return {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[name]


def sliding_window_from_hf(hf: dict[str, Any]) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) of ModelConfig as transformers reads the config (window None: none;
    layer_types () when every layer is alike).

    Mistral: `sliding_window` on every layer (4096 when absent, an explicit null none); Ministral: on the
    layers `layer_types` names "sliding_attention" (default: every layer). Qwen2/3 and SmolLM3:
    `sliding_window` only with `use_sliding_window`, on the layers `layer_types` names "sliding_attention"
    (default: Qwen's from `max_window_layers` on, SmolLM3's NoPE layers).
    """
    model_type = hf["model_type"]
    window = hf.get("sliding_window", None if model_type == "smollm3" else DEFAULT_WINDOW)
    if model_type == "mistral" or window is None:
        return window, ()
    if model_type == "ministral":
        return window_layers(window, hf.get("layer_types") or ["sliding_attention"] * hf["num_hidden_layers"])
    if model_type not in ("qwen2", "qwen3", "smollm3") or not hf.get("use_sliding_window", False):
        return None, ()
    n = hf["num_hidden_layers"]
    if model_type == "smollm3":
        nope = nope_layers_from_hf(hf)
        default = ["sliding_attention" if i in nope else "full_attention" for i in range(n)]
    else:
        first = hf.get("max_window_layers", QWEN_WINDOW_LAYERS)
        default = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return window_layers(window, hf.get("layer_types") or default)


def nope_layers_from_hf(hf: dict[str, Any]) -> tuple[int, ...]:
    """SmolLM3's layers without RoPE: those its `no_rope_layers` flags 0 (1 = RoPE; default every fourth)."""
    if hf["model_type"] != "smollm3":
        return ()
    n = hf["num_hidden_layers"]
    flags = hf.get("no_rope_layers") or [
        int((i + 1) % hf.get("no_rope_layer_interval", NOPE_EVERY) != 0) for i in range(n)
    ]
    return tuple(i for i, rope in enumerate(flags) if not rope)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", model_type == "seed_oss"))  # SeedOssConfig: q/k/v biases by default
    theta, scaling = rope_from_hf(hf, DEFAULT_THETA.get(model_type, 10_000.0))
    window, layer_types = sliding_window_from_hf(hf)
    return ModelConfig(
        **sizes_from_hf(hf),
        head_dim=hf.get("head_dim") or DEFAULT_HEAD_DIM.get(model_type, hf["hidden_size"] // heads),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=activation_from_hf(hf.get("hidden_act", "silu"), model_type),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qkv_bias=bias or model_type == "qwen2",  # Qwen2 always has q/k/v biases and no o bias
        out_bias=bool(hf.get("attention_out_bias"))
        if model_type == "seed_oss"
        else bias and model_type != "qwen2",
        qk_norm=model_type == "qwen3",
        max_position_embeddings=hf.get("max_position_embeddings", MAX_POSITIONS[model_type]),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        layer_types=layer_types,
        nope_layers=nope_layers_from_hf(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", TIED.get(model_type, False))),
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = {
        **hf_fields(cfg, ARCHITECTURES[cfg.model_type]),
        "head_dim": cfg.head_dim,
        "hidden_act": activation_to_hf(cfg.activation),
        "rms_norm_eps": cfg.norm_eps,
        **rope_to_hf(cfg),
    }
    if cfg.model_type in ("llama", "qwen3", "smollm3"):
        hf["attention_bias"] = cfg.out_bias
    if cfg.model_type in ("llama", "smollm3", "seed_oss"):
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "seed_oss":  # q/k/v and o biases apart
        hf.update(attention_bias=cfg.qkv_bias, attention_out_bias=cfg.out_bias)
    if cfg.nope_layers and cfg.model_type != "smollm3":
        raise ValueError(
            f"{cfg.model_type}: layers without RoPE cannot be exported (config.json has no such key)"
        )
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    elif cfg.model_type == "ministral":  # every layer's attention kind, explicitly
        kinds = [cfg.layer_kind(i).window for i in range(cfg.num_layers)]
        hf.update(
            sliding_window=cfg.sliding_window,
            layer_types=["full_attention" if w is None else "sliding_attention" for w in kinds],
        )
    elif cfg.model_type in ("qwen2", "qwen3"):  # a window on the layers layer_types names, else every layer
        on = cfg.sliding_window is not None
        hf.update(use_sliding_window=on, sliding_window=cfg.sliding_window, max_window_layers=0)
        if cfg.layer_types:
            hf["layer_types"] = list(cfg.layer_types)
    elif cfg.model_type == "smollm3":  # every layer's RoPE flag and attention kind, explicitly
        kinds = [cfg.layer_kind(i) for i in range(cfg.num_layers)]
        hf.update(
            no_rope_layers=[int(k.rope) for k in kinds],
            use_sliding_window=cfg.sliding_window is not None,
            sliding_window=cfg.sliding_window,
            layer_types=["full_attention" if k.window is None else "sliding_attention" for k in kinds],
        )
    elif cfg.sliding_window is not None or cfg.layer_types:
        raise ValueError(
            f"{cfg.model_type}: a sliding window cannot be exported (config.json has no such key)"
        )
    return hf


def tensor_maps(cfg: ModelConfig, prefix: str = "model.") -> list[TensorMap]:
    """HF tensor names of LlamaForCausalLM (shared by Mistral, Qwen, Gemma 1/2/3) <-> our parameter paths."""
    d, h, kv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    f, v = cfg.intermediate_size, cfg.vocab_size
    maps = [
        reshaped(prefix + "embed_tokens.weight", ("embed",), (v, d)),
        reshaped(prefix + "norm.weight", ("final_norm", "scale"), (d,)),
    ]
    if not cfg.tie_embeddings:
        maps.append(linear("lm_head.weight", ("lm_head", "kernel"), (d,), (v,)))
    for i in range(cfg.num_layers):
        hf, ours = f"{prefix}layers.{i}.", ("layers", i)
        attn, mlp = ours + ("attn",), ours + ("mlp",)
        maps += [
            linear(hf + "self_attn.q_proj.weight", attn + ("q", "kernel"), (d,), (h, dh)),
            linear(hf + "self_attn.k_proj.weight", attn + ("k", "kernel"), (d,), (kv, dh)),
            linear(hf + "self_attn.v_proj.weight", attn + ("v", "kernel"), (d,), (kv, dh)),
            linear(hf + "self_attn.o_proj.weight", attn + ("o", "kernel"), (h, dh), (d,)),
        ]
        if not cfg.num_experts:  # a mixture of experts' tensors are its family's (`moe_families`)
            maps += [
                linear(hf + "mlp.gate_proj.weight", mlp + ("gate", "kernel"), (d,), (f,)),
                linear(hf + "mlp.up_proj.weight", mlp + ("up", "kernel"), (d,), (f,)),
                linear(hf + "mlp.down_proj.weight", mlp + ("down", "kernel"), (f,), (d,)),
            ]
        norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}  # Llama's
        if cfg.post_norms:  # Gemma 2/3: the MLP's input norm is pre_feedforward_layernorm
            norms = {
                "input_layernorm": "attn_norm",
                "post_attention_layernorm": "attn_post_norm",
                "pre_feedforward_layernorm": "mlp_norm",
                "post_feedforward_layernorm": "mlp_post_norm",
            }
        if not cfg.pre_norms:  # OLMo 2/3: the post norms alone
            norms = {k: v for k, v in norms.items() if v not in ("attn_norm", "mlp_norm")}
        maps += [reshaped(hf + f"{n}.weight", ours + (norm, "scale"), (d,)) for n, norm in norms.items()]
        if cfg.qkv_bias:
            maps += [
                reshaped(hf + f"self_attn.{n}_proj.bias", attn + (n, "bias"), (heads, dh), (heads * dh,))
                for n, heads in (("q", h), ("k", kv), ("v", kv))
            ]
        if cfg.out_bias:
            maps.append(reshaped(hf + "self_attn.o_proj.bias", attn + ("o", "bias"), (d,)))
        if cfg.qk_norm and cfg.qk_norm_all_heads:  # OLMo: one [heads x Dh] weight
            maps += [
                reshaped(hf + f"self_attn.{n}_norm.weight", attn + (f"{n}_norm", "scale"), (w, dh), (w * dh,))
                for n, w in (("q", h), ("k", kv))
            ]
        elif cfg.qk_norm:
            maps += [
                reshaped(hf + f"self_attn.{n}_norm.weight", attn + (f"{n}_norm", "scale"), (dh,))
                for n in "qk"
            ]
        if cfg.mlp_bias:
            maps += [reshaped(hf + f"mlp.{n}_proj.bias", mlp + (n, "bias"), (f,)) for n in ("gate", "up")]
            maps.append(reshaped(hf + "mlp.down_proj.bias", mlp + ("down", "bias"), (d,)))
    return maps
