"""Mixtures of experts (`copg_jax.models.moe`) on Llama's attention: Mixtral (top-2 of 8, renormalised; an
optional window on every layer), Qwen2-MoE (q/k/v biases, a sigmoid-gated shared expert), Qwen3-MoE (per-head
q/k norms; Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder) and OLMoE (q/k norms across all heads).

Checkpoints hold one tensor per expert and projection (Mixtral's `block_sparse_moe.experts.{j}.w1/w2/w3`,
the others' `mlp.experts.{j}.gate_proj/up_proj/down_proj`), which is also what transformers 5 writes; they
are slices of our [E, ...] expert kernels. Every layer must be sparse: Qwen's `mlp_only_layers` and
`decoder_sparse_step` > 1 (dense layers between sparse ones) are refused by name.
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
    window_layers,
    with_defaults,
)
from copg_jax.models.hf_io import LoRALayout, TensorMap, linear

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
SHARED_EXPERT = ("mlp.shared_expert_gate", *(f"mlp.shared_expert.{n}_proj" for n in ("gate", "up", "down")))
LORA = LoRALayout(
    layers="model.layers",
    modules={f"self_attn.{n}_proj": f"attn.{n}" for n in "qkvo"},
    default_targets=("q_proj", "v_proj"),
    # PEFT 0.21 on transformers 5: "all-linear" adapts the fused experts' and the routers' weights as
    # target_parameters (and Qwen2-MoE's shared expert as modules); a pattern naming the experts' projections
    # adapts them too, except Mixtral's
    unadapted={
        "qwen2_moe": SHARED_EXPERT,
        "qwen3_moe": EXPERTS,
        "olmoe": EXPERTS,
    },
    all_linear_adds={
        "mixtral": ("mlp.gate", *EXPERTS),
        "qwen2_moe": ("mlp.gate", *EXPERTS, *SHARED_EXPERT),
        "qwen3_moe": ("mlp.gate", *EXPERTS),
        "olmoe": ("mlp.gate", *EXPERTS),
    },
)
# transformers' config defaults of the keys read here (Mixtral, Qwen2Moe, Qwen3Moe and Olmoe configs)
QWEN = dict(
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    norm_topk_prob=False,
    router_aux_loss_coef=0.001,
    use_sliding_window=False,
    sliding_window=4096,
    decoder_sparse_step=1,
)
DEFAULTS = {
    "mixtral": dict(
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096 * 32,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.001,
        router_jitter_noise=0.0,
    ),
    "qwen2_moe": dict(
        QWEN,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        qkv_bias=True,
        max_window_layers=28,
    ),
    "qwen3_moe": dict(QWEN, num_experts_per_tok=8, moe_intermediate_size=768),
    "olmoe": dict(
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        router_aux_loss_coef=0.01,
    ),
}
NUM_EXPERTS = {"mixtral": 8, "qwen2_moe": 60, "qwen3_moe": 128, "olmoe": 64}
EXPERT_NAMES = {  # HF names of the router and of an expert's gate, up and down projections
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{}.", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp.gate", "mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj")),
}
EXPERT_NAMES["qwen3_moe"] = EXPERT_NAMES["olmoe"] = EXPERT_NAMES["qwen2_moe"]


def _windows(hf: dict[str, Any]) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as each MoE config reads them: Mixtral's window on every layer (none by
    default); Qwen3-MoE's on every layer with `use_sliding_window`; Qwen2-MoE's, with it, on the layers
    `layer_types` names (default: even layers below `max_window_layers`)."""
    model_type, n = hf["model_type"], hf["num_hidden_layers"]
    if model_type == "mixtral":
        return hf.get("sliding_window"), ()
    if model_type == "olmoe" or not hf["use_sliding_window"]:
        return None, ()
    if model_type == "qwen3_moe":
        return hf["sliding_window"], ()
    first = hf["max_window_layers"]
    default = ["sliding_attention" if (i + 1) % 2 and i < first else "full_attention" for i in range(n)]
    return window_layers(hf["sliding_window"], hf.get("layer_types") or default)


def num_experts(hf: dict[str, Any]) -> int:
    """The experts per layer: `num_experts` or `num_local_experts`, which every MoE config takes as aliases
    (transformers 5 writes Qwen3-MoE's as the latter, the Hub's configs have the former)."""
    given = [hf[k] for k in ("num_experts", "num_local_experts") if hf.get(k) is not None]
    return given[0] if given else NUM_EXPERTS[hf["model_type"]]


def _check_supported(hf: dict[str, Any]) -> None:
    """ValueError naming a config key whose setting copg_jax does not compute."""
    model_type = hf["model_type"]
    dense = hf.get("mlp_only_layers") or []
    if hf.get("decoder_sparse_step", 1) != 1 or dense:
        raise ValueError(
            f"{model_type}: dense MLP layers among the sparse ones (decoder_sparse_step="
            f"{hf.get('decoder_sparse_step')}, mlp_only_layers={dense}) are not supported"
        )
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"{model_type}: clip_qkv={hf['clip_qkv']} (clamped q/k/v) is not supported")
    if hf.get("router_jitter_noise"):
        raise ValueError(
            f"{model_type}: router_jitter_noise={hf['router_jitter_noise']} (random scaling of the router's "
            "input in training) is not supported; set it to 0"
        )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    hf = with_defaults(hf, DEFAULTS[model_type])
    _check_supported(hf)
    heads, mixtral, qwen = hf["num_attention_heads"], model_type == "mixtral", model_type.startswith("qwen")
    theta, scaling = rope_from_hf(hf)
    window, layer_types = _windows(hf)
    bias = bool(hf.get("attention_bias", False))  # Qwen3-MoE: on q, k, v and o
    return ModelConfig(
        **sizes_from_hf(hf),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        norm_eps=hf["rms_norm_eps"],
        activation=llama.activation_from_hf(hf.get("hidden_act", "silu"), model_type),
        qkv_bias=bool(hf["qkv_bias"]) if model_type == "qwen2_moe" else bias,
        out_bias=bias and model_type != "qwen2_moe",
        qk_norm=model_type in ("qwen3_moe", "olmoe"),
        qk_norm_all_heads=model_type == "olmoe",
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        layer_types=layer_types,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        num_experts=num_experts(hf),
        experts_per_token=hf["num_experts_per_tok"],
        expert_intermediate_size=hf["moe_intermediate_size" if qwen else "intermediate_size"],
        norm_topk_prob=mixtral or bool(hf["norm_topk_prob"]),
        shared_expert_size=hf["shared_expert_intermediate_size"] if model_type == "qwen2_moe" else 0,
        router_aux_loss_coef=hf["router_aux_loss_coef"] if hf.get("output_router_logits") else 0.0,
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    model_type = cfg.model_type
    mixtral, qwen2 = model_type == "mixtral", model_type == "qwen2_moe"
    if mixtral and not cfg.norm_topk_prob:
        raise ValueError("mixtral: its router's top-k weights are always renormalised")
    if model_type in ("mixtral", "olmoe") and cfg.expert_intermediate_size != cfg.intermediate_size:
        raise ValueError(f"{model_type}: its experts are intermediate_size wide")
    if bool(cfg.shared_expert_size) != qwen2:
        raise ValueError(f"{model_type}: a shared expert is Qwen2-MoE's alone")
    hf = {
        **hf_fields(cfg, ARCHITECTURES[model_type]),
        "head_dim": cfg.head_dim,
        "hidden_act": llama.activation_to_hf(cfg.activation),
        "rms_norm_eps": cfg.norm_eps,
        **rope_to_hf(cfg),
        "num_local_experts" if mixtral else "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "output_router_logits": cfg.router_aux_loss_coef > 0,
        "router_aux_loss_coef": cfg.router_aux_loss_coef or DEFAULTS[model_type]["router_aux_loss_coef"],
    }
    if mixtral:
        return {**hf, "sliding_window": cfg.sliding_window}
    hf["norm_topk_prob"] = cfg.norm_topk_prob
    if model_type == "olmoe":
        return {**hf, "attention_bias": cfg.qkv_bias}
    hf["moe_intermediate_size"] = cfg.expert_intermediate_size
    on = cfg.sliding_window is not None
    hf.update(
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=on,
        sliding_window=cfg.sliding_window,
        max_window_layers=cfg.num_layers,
    )
    if qwen2:
        kinds = [cfg.layer_kind(i).window for i in range(cfg.num_layers)]
        return {
            **hf,
            "qkv_bias": cfg.qkv_bias,
            "shared_expert_intermediate_size": cfg.shared_expert_size,
            "layer_types": ["full_attention" if w is None else "sliding_attention" for w in kinds],
        }
    if cfg.layer_types:
        raise ValueError("qwen3_moe: its window is on every layer or on none")
    return {**hf, "attention_bias": cfg.qkv_bias}


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Llama's tensors for everything but the MLP, then each layer's router and experts (one HF tensor per
    expert and projection, slice j of our [E, ...] kernels) and Qwen2-MoE's shared expert and its gate."""
    d, f, e = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts
    router, expert, (gate, up, down) = EXPERT_NAMES[cfg.model_type]
    maps = llama.tensor_maps(cfg)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i, "mlp")
        maps.append(linear(f"{hf}{router}.weight", (*ours, "router", "kernel"), (d,), (e,)))
        for j in range(e):
            name = hf + expert.format(j)
            maps += [
                linear(f"{name}{gate}.weight", (*ours, "w_gate", j), (d,), (f,)),
                linear(f"{name}{up}.weight", (*ours, "w_up", j), (d,), (f,)),
                linear(f"{name}{down}.weight", (*ours, "w_down", j), (f,), (d,)),
            ]
        if cfg.shared_expert_size:
            s, shared = cfg.shared_expert_size, (*ours, "shared")
            maps += [
                linear(f"{hf}mlp.shared_expert.gate_proj.weight", (*shared, "gate", "kernel"), (d,), (s,)),
                linear(f"{hf}mlp.shared_expert.up_proj.weight", (*shared, "up", "kernel"), (d,), (s,)),
                linear(f"{hf}mlp.shared_expert.down_proj.weight", (*shared, "down", "kernel"), (s,), (d,)),
                linear(f"{hf}mlp.shared_expert_gate.weight", (*ours, "shared_gate", "kernel"), (d,), (1,)),
            ]
    return maps
