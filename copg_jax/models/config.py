"""ModelConfig: the one architecture description every supported family is translated into."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A pre-norm decoder-only transformer, covering Llama, Mistral, Qwen2/3, Gemma, GPT-2, GPT-NeoX.

    Hashable (tuples only) because it is static metadata of the NNX module graph.
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
    activation: str = "silu"  # "silu" | "gelu" (exact) | "gelu_tanh"
    gated_mlp: bool = True  # SwiGLU / GeGLU vs a plain 2-layer MLP
    mlp_bias: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    position_embedding: str = "rope"  # "rope" | "learned"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # HF rope_parameters minus rope_theta, sorted items
    rotary_fraction: float = 1.0  # GPT-NeoX rotary_pct: rotate only the first fraction of head_dim
    sliding_window: int | None = None  # keys with position <= query position - window are hidden
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size)
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Translates an HF config dict; ValueError naming the model_type when it is not supported."""
        return family(hf.get("model_type")).config_from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json dict transformers needs to load this model."""
        return family(self.model_type).config_to_hf(self)

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

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
        attn += 2 * dh if self.qk_norm else 0
        mlp = d * f * (3 if self.gated_mlp else 2) + (
            (f * (2 if self.gated_mlp else 1) + d) if self.mlp_bias else 0
        )
        norm = d * (2 if self.norm == "layer" else 1)
        layer = attn + mlp + 2 * norm
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        learned = self.max_position_embeddings * d if self.position_embedding == "learned" else 0
        return self.num_layers * layer + embed + learned + norm

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token: 6 x matmul params + 12 x L x H x Dh x T attention.

        Matmul params exclude the input embedding table (a gather) but include the output head.
        """
        d, f, h, kv, dh = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        per_layer = d * dh * (2 * h + 2 * kv) + d * f * (3 if self.gated_mlp else 2)
        matmul = self.num_layers * per_layer + self.vocab_size * d
        return 6.0 * matmul + 12.0 * self.num_layers * h * dh * seq_len


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(rope_theta, sorted scaling items) from HF's `rope_parameters` (v5) or rope_theta/rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))))
    if "type" in params:  # v4 spelling
        params.setdefault("rope_type", params.pop("type"))
    params.pop("partial_rotary_factor", None)  # carried by ModelConfig.rotary_fraction
    kind = params.get("rope_type", "default")
    if kind == "default":
        params = {}
    elif kind not in ("linear", "llama3"):
        raise ValueError(
            f"{hf.get('model_type')}: unsupported rope type {kind!r}; supported: default, linear, llama3"
        )
    return theta, tuple(sorted((k, v) for k, v in params.items() if v is not None))


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """HF (v4 and v5 readable) rope keys."""
    scaling = cfg.rope_params
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling or None}


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


def load_config(path: str | Path) -> ModelConfig:
    """ModelConfig from an HF folder's config.json (a local path or a URL)."""
    file = paths.join(path, "config.json")
    if not paths.isfile(file):
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        hf = json.loads(paths.read_text(file))
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(hf)
