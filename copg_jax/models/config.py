"""ModelConfig: the one architecture description every supported family is translated into."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from copg_jax import paths

FAMILIES: dict[str, ModuleType] = {}
"""HF model_type -> the family module translating its config.json and tensors (`config_from_hf`,
`config_to_hf`, `tensor_maps`). The family modules import this one, so they are registered from above
(`copg_jax.models.hub`, imported by the package) rather than imported here."""


def register_family(module: ModuleType) -> None:
    """Makes `module` the translator of each of its `MODEL_TYPES`."""
    FAMILIES.update(dict.fromkeys(module.MODEL_TYPES, module))


def family(model_type: str | None) -> ModuleType:
    """The module translating configs and tensors of `model_type` (HF's config.json field)."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


LAYER_TYPES = ("full_attention", "sliding_attention")


class LayerKind(NamedTuple):
    """What may differ between the layers of one model: the attention window (None: none) and the RoPE
    (`rope` False: none at all, SmolLM3's NoPE layers)."""

    window: int | None
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...]
    rope: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: Llama, Mistral, Qwen2/3, SmolLM3, Seed-OSS, Gemma 1/2/3, OLMo 2/3,
    EXAONE 4, Phi-3, Granite, GLM-4, GPT-2, GPT-NeoX, and the mixtures of experts Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE.

    Hashable (tuples only) because it is static metadata of the NNX module graph. Layers may differ in
    their attention window and RoPE (`layer_types`: Gemma 2/3, OLMo 3, Qwen2/3 with windows on some layers);
    everything else is the same in every layer (`layer_kind`).
    """

    model_type: str  # HF model_type, used to pick the checkpoint layout and to write config.json
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma scales by (1 + w): offset 1, weights initialised at 0
    norm_scale_in_float32: bool = False  # OLMo 2/3 (and Gemma): RMSNorm scales in float32, then casts
    activation: str = "silu"  # "silu" | "gelu" (exact) | "gelu_tanh"
    gated_mlp: bool = True  # SwiGLU / GeGLU vs a plain 2-layer MLP
    mlp_bias: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    qk_norm_all_heads: bool = False  # OLMo 2/3: the q / k norm spans all heads ([H x Dh]), not each head
    position_embedding: str = "rope"  # "rope" | "learned"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # HF rope_parameters minus rope_theta, sorted items
    rotary_fraction: float = 1.0  # GPT-NeoX rotary_pct: rotate only the first fraction of head_dim
    rope_interleaved: bool = False  # GLM: RoPE rotates feature pairs (2i, 2i + 1), not (i, i + rot / 2)
    sliding_window: int | None = None  # keys with position <= query position - window are hidden
    # per layer "full_attention" | "sliding_attention" (HF's layer_types): the window then applies to the
    # sliding layers only; () = sliding_window (if any) on every layer
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # Gemma 3, OLMo 3: the sliding layers' RoPE base (None: rope_theta)
    local_rope_scaling: tuple[tuple[str, Any], ...] = ()  # and their scaling (with local_rope_theta only)
    nope_layers: tuple[int, ...] = ()  # SmolLM3: the layers without RoPE (no position encoding at all)
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: logits scaled by its -1/2 power, not head_dim's
    attention_multiplier: float | None = None  # Granite: the attention logits' scale itself (not 1/sqrt(Dh))
    embedding_multiplier: float = 1.0  # Granite: the embeddings are multiplied by it
    residual_multiplier: float = 1.0  # Granite: the attention and MLP outputs, before their residual add
    logits_scaling: float = 1.0  # Granite: the output logits are divided by it
    attn_softcap: float | None = None  # Gemma 2: attention logits -> cap * tanh(logits / cap)
    final_softcap: float | None = None  # Gemma 2: output logits -> cap * tanh(logits / cap)
    post_norms: bool = False  # Gemma 2/3: the attention and MLP outputs are normed before their residual add
    pre_norms: bool = True  # False (OLMo 2/3): no norm on the attention and MLP inputs, post_norms only
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    # mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; `copg_jax.models.moe`): every layer's MLP is
    # `num_experts` gated MLPs of width `expert_intermediate_size`, `experts_per_token` of them per token
    num_experts: int = 0  # 0: a dense MLP of width intermediate_size
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = False  # the top-k router probabilities renormalised to sum to 1 (Mixtral's always)
    shared_expert_size: int = 0  # Qwen2-MoE: an MLP every token goes through, gated by sigmoid(x . w)
    # the router's load-balancing loss coefficient that config.json asks training to add (its
    # router_aux_loss_coef with output_router_logits, else 0); training only, so no part of a reference's
    # fingerprint (`loss.router_aux_loss_coef` overrides it)
    router_aux_loss_coef: float = 0.0
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size)
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Translates an HF config dict; ValueError naming the model_type when it is not supported, a numeric
        field that is not a number, or a key the family needs that the dict lacks."""
        module = family(hf.get("model_type"))
        try:
            return module.config_from_hf(numeric_fields(hf))
        except KeyError as e:
            if e.args[0] in hf:  # not a key of the config: a fault of ours, with its traceback
                raise
            raise ValueError(
                f"{hf.get('model_type')}: the model config lacks {e.args[0]!r}, which this family needs"
            ) from None

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json dict transformers needs to load this model."""
        return family(self.model_type).config_to_hf(self)

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings")  # fmt: skip
        small = [f"{n}={getattr(self, n)}" for n in sizes if getattr(self, n) < 1]
        if small:
            raise ValueError(f"{self.model_type}: sizes must be >= 1, got {', '.join(small)}")
        rotary_dims = int(self.head_dim * self.rotary_fraction)
        if self.position_embedding == "rope" and rotary_dims % 2:  # a typo'd size failed deep in a trace
            raise ValueError(
                f"{self.model_type}: the rotary dimension, head_dim {self.head_dim} x partial_rotary_factor "
                f"{self.rotary_fraction:g}, is {rotary_dims}: it must be even (RoPE rotates pairs); check "
                "hidden_size / num_attention_heads / head_dim"
            )
        rotary = rotary_dims // 2
        for scaling in (dict(self.rope_scaling), dict(self.local_rope_scaling)):
            entries = sorted({len(scaling.get(k, ())) for k in ("short_factor", "long_factor")})
            if scaling.get("rope_type") == "longrope" and entries != [rotary]:
                raise ValueError(
                    f"{self.model_type}: longrope short_factor / long_factor have "
                    f"{' and '.join(map(str, entries))} entries; the rotary dimension (head_dim x "
                    f"partial_rotary_factor) needs {rotary}"
                )
        if self.num_experts and not (
            0 < self.experts_per_token <= self.num_experts and self.expert_intermediate_size > 0
        ):
            raise ValueError(
                f"{self.model_type}: {self.num_experts} experts need 1 <= experts_per_token <= num_experts "
                f"(got {self.experts_per_token}) and an expert_intermediate_size (got "
                f"{self.expert_intermediate_size})"
            )
        if not all(0 <= i < self.num_layers for i in self.nope_layers):
            raise ValueError(
                f"{self.model_type}: nope_layers {self.nope_layers} name no layer of {self.num_layers}"
            )
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(
                    f"{self.model_type}: layer_types must name {self.num_layers} layers, each one of "
                    f"{LAYER_TYPES}; got {list(self.layer_types)}"
                )

    def layer_kind(self, layer: int) -> LayerKind:
        """The window and RoPE of layer `layer`."""
        sliding = self.layer_types[layer] == "sliding_attention" if self.layer_types else True
        local = bool(self.layer_types) and sliding and self.local_rope_theta is not None
        return LayerKind(
            window=self.sliding_window if sliding else None,
            rope_theta=self.local_rope_theta if local else self.rope_theta,
            rope_scaling=self.local_rope_scaling if local else self.rope_scaling,
            rope=layer not in self.nope_layers,
        )

    @property
    def split_length(self) -> int | None:
        """LongRoPE's pretrained length (None without LongRoPE): sequences longer than it are rotated with
        other frequencies, so the shared-prefix layout never groups them with shorter ones
        (`copg_jax.data.layout.prefix_groups`)."""
        lengths = {
            dict(kind.rope_scaling)["original_max_position_embeddings"]
            for kind in self.layer_kinds()[0]
            if kind.rope and dict(kind.rope_scaling).get("rope_type") == "longrope"
        }
        if len(lengths) > 1:
            raise ValueError(f"{self.model_type}: LongRoPE layers with unequal pretrained lengths {lengths}")
        return int(lengths.pop()) if lengths else None

    def layer_kinds(self) -> tuple[tuple[LayerKind, ...], tuple[int, ...]]:
        """(the distinct LayerKinds in order of first use, each layer's index into them)."""
        per_layer = [self.layer_kind(i) for i in range(self.num_layers)]
        kinds = tuple(dict.fromkeys(per_layer))
        return kinds, tuple(kinds.index(k) for k in per_layer)

    def num_params(self) -> int:
        """Total parameter count (embeddings and an untied head included)."""
        d, f, h, kv, dh = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = (
            d * dh * (2 * h + 2 * kv)
            + (dh * (h + 2 * kv) if self.qkv_bias else 0)
            + (d if self.out_bias else 0)
        )
        attn += ((h + kv) * dh if self.qk_norm_all_heads else 2 * dh) if self.qk_norm else 0
        mlp = d * f * (3 if self.gated_mlp else 2) + (
            (f * (2 if self.gated_mlp else 1) + d) if self.mlp_bias else 0
        )
        if self.num_experts:
            mlp = self._moe_params(self.num_experts)
        norm = d * (2 if self.norm == "layer" else 1)
        layer = attn + mlp + (2 * self.pre_norms + 2 * self.post_norms) * norm
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        learned = self.max_position_embeddings * d if self.position_embedding == "learned" else 0
        return self.num_layers * layer + embed + learned + norm

    def _moe_params(self, experts: int) -> int:
        """A mixture-of-experts MLP's weights with `experts` experts (all of them: its size; the top k: those
        a token multiplies), the router and a shared expert with its gate included."""
        d, shared = self.hidden_size, self.shared_expert_size
        return (
            d * self.num_experts
            + 3 * d * self.expert_intermediate_size * experts
            + (3 * d * shared + d if shared else 0)
        )

    def _matmul_params(self, output_head: bool = True) -> int:
        """The weights a token multiplies: every Dense kernel (the experts it goes through) and the output
        head (`output_head`; a reward model's score head instead is d x 1); not the embedding gather."""
        d, f, h, kv, dh = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        mlp = (
            self._moe_params(self.experts_per_token)
            if self.num_experts
            else d * f * (3 if self.gated_mlp else 2)
        )
        per_layer = d * dh * (2 * h + 2 * kv) + mlp
        return self.num_layers * per_layer + (self.vocab_size * d if output_head else d)

    def attention_keys(self, context):
        """The keys a token with `context` keys before it sees, summed over layers (each capped at its
        layer's sliding window). `context`: an int or an int array (numpy or jax), any shape."""
        windows = [self.layer_kind(i).window for i in range(self.num_layers)]
        full = sum(w is None for w in windows)
        return full * context + sum(jnp.minimum(context, w) for w in windows if w is not None)

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token: 6 x matmul params + 12 x L x H x Dh x T attention,
        T capped at a layer's sliding window (the keys a query can see); a mixture of experts counts the
        experts a token goes through (`experts_per_token`), not all of them.

        Matmul params exclude the input embedding table (a gather) but include the output head.
        """
        return 6.0 * self._matmul_params() + 12.0 * self.num_heads * self.head_dim * int(
            self.attention_keys(seq_len)
        )

    def step_flops(
        self,
        context: jax.Array,
        *,
        mode: str = "train",
        weights_trained: bool = True,
        reference_forward: bool = False,
        output_head: bool = True,
    ) -> jax.Array:
        """Model FLOPs of a step over tokens whose attention contexts are `context` (any shape; 0 = padding,
        not counted: `batch.attention_context`), `flops_per_token`'s count per token: the forward pass is a
        third of training's (2 x matmul params + 4 x H x Dh x keys), the backward two thirds, of which the
        weights' gradients (2 x matmul params) are left out when they are not trained (`weights_trained`
        False: LoRA's frozen base; its adapters are not counted). `reference_forward` adds a forward pass (the
        reference computed in the step: LoRA's adapters off). mode "forward": the forward pass alone.
        Returns a float32 scalar."""
        context = jnp.asarray(context)
        matmul = 2.0 * self._matmul_params(output_head)
        attention = 4.0 * self.num_heads * self.head_dim * self.attention_keys(context).astype(jnp.float32)
        forward = matmul + attention
        if mode == "forward":
            per_token = forward
        elif mode == "train":
            per_token = (
                3 * forward - (0 if weights_trained else matmul) + (forward if reference_forward else 0)
            )
        else:
            raise ValueError(f"mode must be train or forward, got {mode!r}")
        return jnp.sum(jnp.where(context > 0, per_token, 0.0), dtype=jnp.float32)


# HF config fields (of every family, and of rope_parameters / rope_scaling) that must be numbers: an inline
# `model.config` from YAML 1.1 reads `1e-5` or `5e5` as a string
FLOAT_FIELDS = frozenset(
    {
        "rms_norm_eps",
        "layer_norm_eps",
        "layer_norm_epsilon",
        "rope_theta",
        "rotary_emb_base",
        "rotary_pct",
        "partial_rotary_factor",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "attention_factor",
        "short_factor",
        "long_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "rope_local_base_freq",
        "query_pre_attn_scalar",
        "attention_multiplier",
        "embedding_multiplier",
        "residual_multiplier",
        "logits_scaling",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "router_jitter_noise",
        "router_aux_loss_coef",
        "clip_qkv",
    }
)
INT_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "original_max_position_embeddings",
        "sliding_window",
        "max_window_layers",
        "sliding_window_pattern",
        "no_rope_layer_interval",
        "num_local_experts",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "decoder_sparse_step",
        "n_embd",
        "n_inner",
        "n_layer",
        "n_head",
        "n_positions",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    }
)
ROPE_DICTS = ("rope_parameters", "rope_scaling")
ROPE_TYPES = ("linear", "llama3", "yarn", "longrope")  # HF's rope types we compute (besides "default")


def _number(key: str, value: Any, kind: type) -> Any:
    """`value` as a `kind` (float or int): a number, or a string of one; None stays None, a list is cast item
    by item.

    Raises:
      ValueError: `value` is not a number (an int field: not a whole number), naming `key`.
    """
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return [_number(f"{key}[{i}]", v, kind) for i, v in enumerate(value)]
    if isinstance(value, int) and not isinstance(value, bool):
        return kind(value)
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or (kind is int and not number.is_integer()):
        raise ValueError(
            f"model config: {key}={value!r} is not {'an integer' if kind is int else 'a number'}"
        )
    return kind(number)


def _cast_fields(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of `fields` with those named in FLOAT_FIELDS / INT_FIELDS cast (`where` prefixes the names)."""
    out = dict(fields)
    for key, value in fields.items():
        if key in FLOAT_FIELDS or key in INT_FIELDS:
            out[key] = _number(where + key, value, float if key in FLOAT_FIELDS else int)
    return out


def numeric_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """A copy of an HF config dict with its numeric fields (`FLOAT_FIELDS`, `INT_FIELDS`, also inside
    rope_parameters / rope_scaling) cast to float or int.

    Raises:
      ValueError: a numeric field that is not a number, naming it.
    """
    out = _cast_fields(hf, "")
    for key in ROPE_DICTS:
        if isinstance(hf.get(key), dict):
            out[key] = _cast_fields(hf[key], key + ".")
            for kind, params in hf[key].items():  # per layer type (Gemma 3 in transformers 5)
                if isinstance(params, dict):
                    out[key][kind] = _cast_fields(params, f"{key}.{kind}.")
    return out


def rope_from_hf(
    hf: dict[str, Any], default_theta: float = 10_000.0
) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(rope_theta, sorted scaling items) from HF's `rope_parameters` (v5) or rope_theta/rope_scaling;
    `default_theta` where the config gives none (the family's config class default)."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", default_theta))))
    if "type" in params:  # v4 spelling
        params.setdefault("rope_type", params.pop("type"))
    params.pop("partial_rotary_factor", None)  # carried by ModelConfig.rotary_fraction
    kind = params.get("rope_type", "default")
    if kind == "default":
        params = {}
    elif kind not in ROPE_TYPES:
        raise ValueError(
            f"{hf.get('model_type')}: unsupported rope type {kind!r}; "
            f"supported: default, {', '.join(ROPE_TYPES)}"
        )
    if kind in ("llama3", "yarn", "longrope"):  # the pretrained length as transformers reads it (top first)
        if hf.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if kind in ("yarn", "longrope") and params.get("factor") is None:  # DeepSeek-V3's and Phi-3's convention
        params["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    if kind == "longrope":
        _check_longrope(hf.get("model_type"), params)
    return theta, tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items() if v is not None)
    )


def _check_longrope(model_type: str | None, params: dict[str, Any]) -> None:
    """ValueError naming the key unless LongRoPE's short_factor and long_factor are lists (their lengths are
    checked against the rotary dimension by ModelConfig)."""
    for key in ("short_factor", "long_factor"):
        value = params.get(key)
        if not isinstance(value, list | tuple) or not value:
            raise ValueError(
                f"{model_type}: longrope rope_parameters.{key} must be a list of numbers, got {value!r}"
            )


def layer_types_from_hf(hf: dict[str, Any], every: int) -> tuple[str, ...]:
    """Every layer's attention kind as transformers reads it: `layer_types`, else every layer windowed but
    each `every`-th (Gemma 2/3's and OLMo 3's default patterns)."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    return tuple(
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(hf["num_hidden_layers"])
    )


def window_layers(window: int | None, layer_types: list[str]) -> tuple[int | None, tuple[str, ...]]:
    """ModelConfig's (sliding_window, layer_types) of HF's: layer_types () when every layer is alike."""
    kinds = set(layer_types)
    if window is None or kinds == {"full_attention"}:
        return None, ()
    return window, () if kinds == {"sliding_attention"} else tuple(layer_types)


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """HF (v4 and v5 readable) rope keys. LongRoPE's factor is left out when it is the one transformers
    derives (max / original positions: Phi-3's configs have none)."""
    scaling = cfg.rope_params
    if scaling.get("rope_type") == "longrope" and scaling["factor"] == (
        cfg.max_position_embeddings / scaling["original_max_position_embeddings"]
    ):
        del scaling["factor"]
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling or None}


def layer_type_rope_from_hf(
    hf: dict[str, Any], default_theta: float, legacy_local_theta: float | None = None
) -> dict[str, Any]:
    """ModelConfig's RoPE fields (rope_theta, rope_scaling, local_rope_theta, local_rope_scaling) of a model
    whose RoPE differs by layer type (Gemma 3, OLMo 3): transformers 5's `rope_parameters` per layer type
    ("full_attention", "sliding_attention"), or the legacy keys: rope_theta (default `default_theta`) and
    rope_scaling for the global layers, `legacy_local_theta` (None: that rope_theta) for the local ones."""
    params = dict(hf.get("rope_parameters") or {})
    if any(isinstance(p, dict) for p in params.values()):
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full, local = {**params, **(hf.get("rope_scaling") or {})}, {}
    theta = hf.get("rope_theta", params.get("rope_theta", default_theta))
    full.setdefault("rope_theta", theta)
    local.setdefault("rope_theta", theta if legacy_local_theta is None else legacy_local_theta)
    lengths = {k: hf[k] for k in ("max_position_embeddings", "original_max_position_embeddings") if k in hf}
    (theta, scaling), (local_theta, local_scaling) = (
        rope_from_hf({"model_type": hf["model_type"], **lengths, "rope_parameters": p}) for p in (full, local)
    )
    return dict(
        rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta, local_rope_scaling=local_scaling
    )


def with_defaults(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`hf` with `defaults` for the keys it lacks or sets to null (a config class's defaults, as transformers
    fills them in)."""
    return {**defaults, **{k: v for k, v in hf.items() if v is not None}}


def sizes_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's model_type and sizes from the config.json keys Llama-like families share (the inverse of
    `hf_fields`' sizes); num_key_value_heads defaults to the heads."""
    heads = hf["num_attention_heads"]
    return dict(
        model_type=hf["model_type"],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
    )


def hf_fields(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    """The config.json keys every family's config shares (sizes, RoPE-free), special tokens included."""
    return {
        "architectures": [architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        **special_tokens_to_hf(cfg),
    }


def special_tokens_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's bos/eos/pad fields from an HF config (the inverse of `special_tokens_to_hf`)."""
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
    return {
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_ids": eos,
        "pad_token_id": hf.get("pad_token_id"),
    }


def special_tokens_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    eos = cfg.eos_token_ids
    eos = None if not eos else eos[0] if len(eos) == 1 else list(eos)
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}


def read_json(file: str) -> Any:
    """The parsed JSON file; ValueError naming it when it is not JSON."""
    try:
        return json.loads(paths.read_text(file))
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def generation_eos_ids(path: str | Path) -> tuple[int, ...]:
    """The end tokens of an HF folder's generation_config.json (what transformers' `generate` stops on, e.g.
    Llama-3-Instruct's <|eot_id|> or Gemma-it's <end_of_turn> besides config.json's EOS); () without one."""
    file = paths.join(path, "generation_config.json")
    if not paths.isfile(file):
        return ()
    eos = numeric_fields({"eos_token_id": read_json(file).get("eos_token_id")})["eos_token_id"]
    return () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The dict of an HF folder's config.json (a local path or a URL).

    Raises:
      FileNotFoundError: the folder has none. ValueError: it is not JSON (naming the file).
    """
    file = paths.join(path, "config.json")
    if not paths.isfile(file):
        raise FileNotFoundError(f"no config.json in {path}")
    return read_json(file)


def load_config(path: str | Path) -> ModelConfig:
    """ModelConfig from an HF folder's config.json (a local path or a URL); its eos_token_ids also hold the
    end tokens of a generation_config.json."""
    cfg = ModelConfig.from_hf(read_hf_config(path))
    extra = tuple(e for e in dict.fromkeys(generation_eos_ids(path)) if e not in cfg.eos_token_ids)
    return dataclasses.replace(cfg, eos_token_ids=cfg.eos_token_ids + extra) if extra else cfg
