"""Low-rank adapters (LoRA, arXiv 2106.09685) on the decoder's dense layers, as PEFT defines them.

An adapted layer computes y = x W (+ b) + s * dropout(x) A B with A [*in, r], B [r, *out] and s = alpha / r
(rank-stabilised LoRA, arXiv 2312.03732, PEFT's use_rslora: s = alpha / sqrt(r)): A is
drawn as PEFT draws it (Kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and B starts at zero, so
a freshly adapted model computes exactly what its base computes. A and B are `nnx.LoRAParam`s (a subclass
of `nnx.Param`), always float32 whatever the base's storage dtype, so `nnx.split(model, nnx.LoRAParam, ...)`
separates the trainable adapters from the frozen base.

Sites (where an adapter sits, by our module names): "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate",
"mlp.up", "mlp.down", and two fused ones, which is what PEFT puts on fused HF modules: "attn.qkv", ONE
adapter on the q|k|v projection of GPT-2 (`c_attn`), GPT-NeoX (`query_key_value`) and Phi-3 (`qkv_proj`) --
A shared by q, k and v, B spanning all three [r, H + 2 KV, Dh] (q's heads, then k's, then v's) -- and
"mlp.gate_up" on Phi-3's `gate_up_proj` (B [r, 2, F]: gate, then up). `copg_jax.models.adapters` maps sites
to PEFT's module names.

DoRA (arXiv 2402.09353, PEFT's use_dora; on a fused site the magnitudes and norms span the fused kernel, its
parts joined as `layers.fused_outputs` joins them): the adapted layer computes
(m / ||W + s A B||) * (x W + s x A B) (+ b), the norm per output feature over the inputs and held constant in
the backward pass (the paper's Sec. 4.3, as PEFT does), m a trained float32 magnitude vector that starts at
||W||; with dropout, as PEFT, y = x W + b + (m / n - 1) * dropout(x) W + (m / n) * s dropout(x) A B.

Dropout randomness is a key passed with each call (None: no dropout), so the train step derives it from its
seed and step number; each site folds its own number (`SITES`) into its layer's key.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from copg_jax.models import mixed

# the order numbers each site's dropout randomness: append, never reorder
SITES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "mlp.gate", "mlp.up", "mlp.down", "mlp.gate_up")
FUSED_SITES = ("attn.qkv", "mlp.gate_up")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which sites are adapted and how: static (hashable) metadata of the module graph.

    Attributes:
      rank: r >= 1.
      alpha: the update is scaled by alpha / r (with `rslora`, alpha / sqrt(r)).
      dropout: probability of zeroing an adapter input element during training.
      targets: sorted site names (`SITES`).
      rslora: rank-stabilised scaling (PEFT's use_rslora).
      dora: weight-decomposed adaptation (PEFT's use_dora): a magnitude vector per adapted layer.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    rslora: bool = False
    dora: bool = False

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
        # DoRA's magnitude: ||W|| of the adapted kernel, set by `adapters.add_adapters` (ones until then)
        self.m = nnx.LoRAParam(jnp.ones(out_shape, jnp.float32), logical_axes=out_axes) if spec.dora else None
        self.num_in, self.scale, self.dropout, self.dtype = len(in_shape), spec.scale, spec.dropout, dtype

    def drops(self, dropout_key: jax.Array | None) -> bool:
        """Whether a call with this key applies dropout (training, and a rate above 0)."""
        return bool(self.dropout) and dropout_key is not None

    def dropped(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """x in the compute dtype, with dropout when `drops(dropout_key)`."""
        x = x.astype(self.dtype)
        if not self.drops(dropout_key):
            return x
        keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros((), x.dtype))

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        return self.update(self.dropped(x, dropout_key))

    def update(self, x: jax.Array) -> jax.Array:
        """s x A B of an (already dropped-out) input [..., *in] -> [..., *out]."""
        a, b = self.a[...], self.b[...]
        in_shape, out_shape = a.shape[:-1], b.shape[1:]
        rows = mixed.matmul(x.reshape(-1, math.prod(in_shape)), a.reshape(-1, a.shape[-1]))
        y = mixed.matmul(rows, b.reshape(b.shape[0], -1))
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

    def magnitude_scale(self, kernel: jax.Array) -> jax.Array:
        """DoRA's m / ||W + s A B|| [*lead, *out] (float32) for the adapted `kernel` [*lead, *in, *out], the
        norm over the input axes and without gradient."""
        merged = kernel.astype(jnp.float32) + self.delta(jnp.float32)
        lead = self.a.ndim - self.num_in - 1  # the "layers" axis of stacked blocks, if any
        norm = jax.lax.stop_gradient(weight_norm(merged, self.num_in, lead))
        return self.m[...] / norm


def weight_norm(kernel: jax.Array, num_in: int, lead: int = 0) -> jax.Array:
    """||kernel|| per output feature: [*lead, *in, *out] -> [*lead, *out], the 2-norm over the `num_in` input
    axes (DoRA's column norm)."""
    return jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=tuple(range(lead, lead + num_in))))
