"""GPT-2: learned positions, LayerNorm, plain GELU (tanh) MLP, fused c_attn, Conv1D weights stored [in, out],
biases everywhere, tied lm_head."""

from __future__ import annotations

from typing import Any

import numpy as np

from copg_jax.models.config import ModelConfig, special_tokens_from_hf, special_tokens_to_hf
from copg_jax.models.hf_io import LoRALayout, TensorMap, linear, reshaped

MODEL_TYPES = ("gpt2",)
LORA = LoRALayout(
    layers="transformer.h",
    modules={
        "attn.c_attn": "attn.qkv",
        "attn.c_proj": "attn.o",
        "mlp.c_fc": "mlp.up",
        "mlp.c_proj": "mlp.down",
    },
    default_targets=("c_attn",),
    fan_in_fan_out=True,
)
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(flag, ok) != ok:
            raise ValueError(f"gpt2: {flag}={hf[flag]} is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise ValueError(
            f"gpt2: unsupported activation_function {act!r}; supported: {sorted(HF_ACTIVATIONS)}"
        )
    d, heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        model_type="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        intermediate_size=hf.get("n_inner") or 4 * d,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=HF_ACTIVATIONS[act],
        gated_mlp=False,
        mlp_bias=True,
        qkv_bias=True,
        out_bias=True,
        position_embedding="learned",
        max_position_embeddings=hf.get("n_positions", 1024),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **special_tokens_from_hf(hf),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_inner": cfg.intermediate_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_positions": cfg.max_position_embeddings,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation],
        "tie_word_embeddings": cfg.tie_embeddings,
        **special_tokens_to_hf(cfg),
    }


def layer_norm(name: str, path: tuple, d: int) -> list[TensorMap]:
    return [
        reshaped(f"{name}.weight", path + ("scale",), (d,)),
        reshaped(f"{name}.bias", path + ("bias",), (d,)),
    ]


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """HF GPT2LMHeadModel names; c_attn's [D, 3D] columns are q | k | v, each [H, Dh]."""
    d, h, dh, f, v = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    maps = [
        reshaped("transformer.wte.weight", ("embed",), (v, d)),
        reshaped("transformer.wpe.weight", ("pos_embed",), (cfg.max_position_embeddings, d)),
        *layer_norm("transformer.ln_f", ("final_norm",), d),
    ]
    if not cfg.tie_embeddings:
        maps.append(linear("lm_head.weight", ("lm_head", "kernel"), (d,), (v,)))
    for i in range(cfg.num_layers):
        hf, ours = f"transformer.h.{i}.", ("layers", i)
        attn, mlp = ours + ("attn",), ours + ("mlp",)
        qkv = tuple(attn + (n,) for n in "qkv")
        maps += [
            *layer_norm(hf + "ln_1", ours + ("attn_norm",), d),
            *layer_norm(hf + "ln_2", ours + ("mlp_norm",), d),
            TensorMap(
                hf + "attn.c_attn.weight",
                (d, 3 * d),
                tuple(p + ("kernel",) for p in qkv),
                lambda w: tuple(w.reshape(d, 3, h, dh)[:, j] for j in range(3)),
                lambda q, k, v_: np.stack([q, k, v_], axis=1).reshape(d, 3 * d),
            ),
            TensorMap(
                hf + "attn.c_attn.bias",
                (3 * d,),
                tuple(p + ("bias",) for p in qkv),
                lambda b: tuple(b.reshape(3, h, dh)),
                lambda q, k, v_: np.stack([q, k, v_]).reshape(3 * d),
            ),
            linear(hf + "attn.c_proj.weight", attn + ("o", "kernel"), (h, dh), (d,), transpose=False),
            reshaped(hf + "attn.c_proj.bias", attn + ("o", "bias"), (d,)),
            linear(hf + "mlp.c_fc.weight", mlp + ("up", "kernel"), (d,), (f,), transpose=False),
            reshaped(hf + "mlp.c_fc.bias", mlp + ("up", "bias"), (f,)),
            linear(hf + "mlp.c_proj.weight", mlp + ("down", "kernel"), (f,), (d,), transpose=False),
            reshaped(hf + "mlp.c_proj.bias", mlp + ("down", "bias"), (d,)),
        ]
    return maps
