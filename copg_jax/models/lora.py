"""Low-rank adapters (LoRA, arXiv 2106.09685) on the decoder's dense layers, as PEFT defines them.

An adapted layer computes y = x W (+ b) + s * dropout(x) A B with A [*in, r], B [r, *out] and s = alpha / r
(rank-stabilised LoRA, arXiv 2312.03732, PEFT's use_rslora: s = alpha / sqrt(r)): A is
drawn as PEFT draws it (Kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and B starts at zero, so
a freshly adapted model computes exactly what its base computes. A and B are `nnx.LoRAParam`s (a subclass
of `nnx.Param`), always float32 whatever the base's storage dtype, so `nnx.split(model, nnx.LoRAParam, ...)`
separates the trainable adapters from the frozen base.

Sites (where an adapter sits, by our module names): "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate",
"mlp.up", "mlp.down", and "attn.qkv": ONE adapter on the fused q|k|v projection of GPT-2 (`c_attn`) and
GPT-NeoX (`query_key_value`) -- A shared by q, k and v, B spanning all three [r, 3, H, Dh] -- which is what
PEFT puts on those fused HF modules. `copg_jax.models.adapters` maps sites to PEFT's module names.

Dropout randomness is a key passed with each call (None: no dropout), so the train step derives it from its
seed and step number; each site folds its own number (`SITES`) into its layer's key.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

SITES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "mlp.gate", "mlp.up", "mlp.down")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which sites are adapted and how: static (hashable) metadata of the module graph.

    Attributes:
      rank: r >= 1.
      alpha: the update is scaled by alpha / r (with `rslora`, alpha / sqrt(r)).
      dropout: probability of zeroing an adapter input element during training.
      targets: sorted site names (`SITES`).
      rslora: rank-stabilised scaling (PEFT's use_rslora).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    rslora: bool = False

    def __post_init__(self):
        if unknown := sorted(set(self.targets) - set(SITES)):
            raise ValueError(f"unknown LoRA sites {unknown}; sites: {SITES}")
        if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA needs rank >= 1 and 0 <= dropout < 1, got {self.rank}, {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def on(self, site: str) -> bool:
        return site in self.targets


def site_key(key: jax.Array | None, site: str) -> jax.Array | None:
    """The dropout key of `site` within a layer's key (None stays None: no dropout)."""
    return None if key is None else jax.random.fold_in(key, SITES.index(site))


class LoRA(nnx.Module):
    """x [..., *in] -> s * dropout(x) A B [..., *out] (s = `spec.scale`), A and B float32 `nnx.LoRAParam`s.

    Args:
      in_shape, out_shape: the adapted layer's input and output feature shapes.
      in_axes, out_axes: their logical axis names; A is [*in_axes, "lora_rank"], B ["lora_rank", *out_axes].
      spec: rank, alpha and dropout.
      rngs: A is drawn from its `lora` stream (falling back to `default`), so adding adapters never shifts
        the base's `params` stream.
      dtype: compute dtype.
    """

    def __init__(self, in_shape, out_shape, in_axes, out_axes, spec: LoRASpec, *, rngs: nnx.Rngs, dtype):
        in_shape, out_shape, r = tuple(in_shape), tuple(out_shape), spec.rank
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.lora(), in_shape + (r,), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a, logical_axes=(*in_axes, "lora_rank"))
        self.b = nnx.LoRAParam(jnp.zeros((r, *out_shape), jnp.float32), logical_axes=("lora_rank", *out_axes))
        self.num_in, self.scale, self.dropout, self.dtype = len(in_shape), spec.scale, spec.dropout, dtype

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        a, b = self.a[...], self.b[...]
        in_shape, out_shape = a.shape[:-1], b.shape[1:]
        x = x.astype(self.dtype)
        if self.dropout and dropout_key is not None:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros((), x.dtype))
        rows = x.reshape(-1, math.prod(in_shape)) @ a.astype(self.dtype).reshape(-1, a.shape[-1])
        y = rows @ b.astype(self.dtype).reshape(b.shape[0], -1)
        return (y * jnp.asarray(self.scale, self.dtype)).reshape(x.shape[: x.ndim - self.num_in] + out_shape)

    def delta(self, dtype=jnp.float32) -> jax.Array:
        """s A B as a kernel [*lead, *in, *out] (lead: the "layers" axis of stacked blocks) in
        `dtype`: the update that merging adds to the adapted layer's kernel."""
        a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
        lead = a.shape[: a.ndim - self.num_in - 1]
        in_shape, out_shape = a.shape[len(lead) : -1], b.shape[len(lead) + 1 :]
        flat_a = a.reshape(*lead, math.prod(in_shape), a.shape[-1])
        flat_b = b.reshape(*lead, b.shape[len(lead)], math.prod(out_shape))
        product = jnp.matmul(flat_a, flat_b, precision=jax.lax.Precision.HIGHEST)
        return (self.scale * product).reshape(*lead, *in_shape, *out_shape)
