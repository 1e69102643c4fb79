"""Building blocks shared by every decoder family: norms, RoPE, dense layers, GQA attention, MLPs.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (names from `sharding.LOGICAL_RULES`);
activations are constrained by logical names. Parameters live in `param_dtype`, compute runs in `dtype`.
Each part runs under a `jax.named_scope` ("norm", "qkv", "rope", "attention", "o", "mlp"; the decoder adds
"embed", "mask" and "head") that profiles use to charge every XLA op, forward or backward, to the part of the
model it comes from (`benchmarks/profile_step.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from copg_jax.models import mixed
from copg_jax.models.attention import AttentionPattern, attention, masked_attention, window_mask
from copg_jax.models.config import ROPE_TYPES, LayerKind, ModelConfig
from copg_jax.models.lora import LoRA, LoRASpec, site_key
from copg_jax.sharding import constrain


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match parameter shape {value.shape}")
    return nnx.Param(value, logical_axes=axes)


class Dense(nnx.Module):
    """y = x . kernel (+ bias) (+ a LoRA update), contracting x's last len(in_shape) axes; kernel is
    [*in_shape, *out_shape]. `lora`: the adapter's settings (None: no adapter)."""

    def __init__(
        self, in_shape, out_shape, axes, *, bias: bool, rngs: nnx.Rngs, dtype, param_dtype, lora=None
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        init = jax.random.normal(rngs.params(), in_shape + out_shape, param_dtype) * 0.02
        self.kernel = param(init, tuple(axes))
        self.bias = param(jnp.zeros(out_shape, param_dtype), tuple(axes[len(in_shape) :])) if bias else None
        self.num_in = len(in_shape)
        self.dtype = dtype
        in_axes, out_axes = tuple(axes[: self.num_in]), tuple(axes[self.num_in :])
        self.lora = (
            None
            if lora is None
            else LoRA(in_shape, out_shape, in_axes, out_axes, lora, rngs=rngs, dtype=dtype)
        )

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """[..., *in] -> [..., *out]; `dropout_key`: the adapter's dropout randomness (None: none)."""
        x = x.astype(self.dtype)
        y = self.matmul(x)
        out = self.add_bias(y)
        if self.lora is None:
            return out
        if self.lora.m is None:
            return out + self.lora(x, dropout_key)
        return out + dora_update(self.lora, self.kernel[...], x, y, dropout_key, self.matmul)

    def add_bias(self, y: jax.Array) -> jax.Array:
        return y if self.bias is None else mixed.shift(y, self.bias[...])

    def matmul(self, x: jax.Array) -> jax.Array:
        """x W [..., *out] without bias, x in the compute dtype."""
        # One 2-D matmul [rows, in] x [in, out]: the reshapes are free (contiguous axes), while a dot that
        # contracts several axes ([N, T] in the kernel gradient) made XLA:CPU transpose whole activations,
        # which doubled the cost of the backward pass (benchmarks/RESULTS.md, "Profile").
        kernel = self.kernel[...]
        in_shape, out_shape = kernel.shape[: self.num_in], kernel.shape[self.num_in :]
        rows = mixed.matmul(x.reshape(-1, math.prod(in_shape)), kernel.reshape(math.prod(in_shape), -1))
        return rows.reshape(x.shape[: x.ndim - self.num_in] + out_shape)


def dora_update(lora: LoRA, kernel: jax.Array, x: jax.Array, y: jax.Array, dropout_key, matmul) -> jax.Array:
    """What DoRA adds to a layer's output x W + b (`copg_jax.models.lora`): (m / n - 1) base + (m / n) s
    dropout(x) A B, base = dropout(x) W (`y` = x W when no dropout acts; `matmul` computes z W), n the norm of
    W + s A B per output feature for the adapted `kernel` [*in, *out]."""
    dropped = lora.dropped(x, dropout_key)  # the base also sees the dropped input, as PEFT
    base = matmul(dropped) if lora.drops(dropout_key) else y
    # PEFT's (m / n - 1) base + (m / n) update; m's gradient (a sum over the tokens) in its dtype (mixed)
    scale = lora.magnitude_scale(kernel)
    return mixed.scale(base, scale - 1) + mixed.scale(lora.update(dropped), scale)


class Fused(NamedTuple):
    """How the kernels of a fused adapter's site form one: `join` [their outputs or kernels] -> the fused
    one (along the output axis before the last), `split` inverts it."""

    join: Callable[[list[jax.Array]], jax.Array]
    split: Callable[[jax.Array], tuple[jax.Array, ...]]


def fused_outputs(denses: list[Dense], fused: Fused, lora: LoRA, x: jax.Array, dropout_key) -> list:
    """The outputs of `denses` (one input x, no adapters of their own) with the fused adapter `lora` across
    them: plain LoRA, or DoRA over the joined kernel (its norms per output feature are those of each part)."""
    x = x.astype(denses[0].dtype)
    ys = [d.matmul(x) for d in denses]
    outs = [d.add_bias(y) for d, y in zip(denses, ys, strict=True)]
    if lora.m is None:
        update = lora(x, dropout_key)
    else:
        kernel = fused.join([d.kernel[...] for d in denses])
        matmul = lambda z: fused.join([d.matmul(z) for d in denses])  # noqa: E731
        update = dora_update(lora, kernel, x, fused.join(ys), dropout_key, matmul)
    return [out + part for out, part in zip(outs, fused.split(update), strict=True)]


def qkv_fusion(kv_heads: int) -> Fused:
    """q | k | v along the heads axis: [..., H + 2 KV, Dh]."""
    return Fused(lambda xs: jnp.concatenate(xs, axis=-2), lambda z: split_heads(z, kv_heads))


GATE_UP = Fused(lambda xs: jnp.stack(xs, axis=-2), lambda z: (z[..., 0, :], z[..., 1, :]))
"""gate and up stacked: [..., 2, F]."""


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + w) over x's last axis (or, for a tuple `dim`, its last len(dim) axes together:
    OLMo's q / k norm across all heads), computed in float32. Llama casts x / rms(x) to the compute dtype
    before the scale; Gemma (offset 1) and OLMo (`scale_in_float32`) scale in float32 and cast the result."""

    def __init__(
        self,
        dim: int | tuple,
        *,
        eps: float,
        offset=0.0,
        scale_in_float32=False,
        param_dtype,
        dtype,
        axis_name="norm",
    ):
        shape, axes = (dim, axis_name) if isinstance(dim, tuple) else ((dim,), (axis_name,))
        self.scale = param(jnp.full(shape, 1.0 - offset, param_dtype), axes)
        self.eps, self.offset, self.dtype = eps, offset, dtype
        self.scale_in_float32 = bool(offset) or scale_in_float32

    @jax.named_scope("norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        over = tuple(range(-self.scale.ndim, 0))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=over, keepdims=True) + self.eps)
        if self.scale_in_float32:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)
        return mixed.scale(normed.astype(self.dtype), self.scale[...])


class LayerNorm(nnx.Module):
    """Standard LayerNorm with scale and bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype, dtype):
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((dim,), param_dtype), ("norm",))
        self.eps, self.dtype = eps, dtype

    @jax.named_scope("norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


def make_norm(cfg: ModelConfig, *, dtype, param_dtype) -> RMSNorm | LayerNorm:
    if cfg.norm == "layer":
        return LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=param_dtype, dtype=dtype)
    return RMSNorm(
        cfg.hidden_size,
        eps=cfg.norm_eps,
        offset=cfg.norm_offset,
        scale_in_float32=cfg.norm_scale_in_float32,
        param_dtype=param_dtype,
        dtype=dtype,
    )


def _yarn_inv_freq(rot_dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """YaRN's blend of interpolated (/factor) and original frequencies, ramped between the dimensions that
    turn beta_fast and beta_slow times over original_max_position_embeddings (transformers' formula)."""
    factor, old_len = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times
        return rot_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(rot_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (np.arange(0, rot_dim, 2, dtype=np.float32) / rot_dim)
    keep = 1 - ramp  # the share of the original (extrapolated) frequency
    return (1 / (factor * pos_freqs) * (1 - keep) + 1 / pos_freqs * keep).astype(np.float32)


def rope_attention_factor(scaling: dict[str, Any]) -> float:
    """The factor on RoPE's cos and sin, as transformers applies it: YaRN's attention scaling (0.1 ln(factor)
    + 1 unless given), LongRoPE's (sqrt(1 + ln(factor) / ln(original length)) unless given), 1.0 for the other
    scalings."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    if kind == "longrope":
        old_len = float(scaling["original_max_position_embeddings"])
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(float(scaling["mscale"])) / mscale(float(scaling["mscale_all_dim"]))
    return mscale()


def rope_inv_freq(rot_dim: int, theta: float, scaling: dict[str, Any], long: bool = False) -> np.ndarray:
    """[rot_dim / 2] float32 inverse frequencies, with HF's "linear", "llama3", "yarn" and "longrope"
    scalings (their factor on cos and sin: `rope_attention_factor`). LongRoPE divides the frequencies by its
    short_factor, or its long_factor with `long` (sequences past the pretrained length: `longrope_long`)."""
    wavelengths = theta ** (np.arange(0, rot_dim, 2, dtype=np.float32) / rot_dim)
    inv_freq = 1.0 / wavelengths
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.astype(np.float32)
    if kind == "longrope":
        ext = np.asarray(scaling["long_factor" if long else "short_factor"], np.float32)  # [rot_dim / 2]
        return (1.0 / (ext * wavelengths)).astype(np.float32)
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    if kind == "yarn":
        return _yarn_inv_freq(rot_dim, theta, scaling)
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, {', '.join(ROPE_TYPES)}")


def longrope_long(positions: jax.Array, mask, original: int) -> jax.Array:
    """[N, T] bool: whether LongRoPE rotates each token with its long factors, as transformers does for the
    token's sequence alone: when the sequence reaches past `original` (the pretrained length) tokens.

    A sequence is a token's segment, or for the shared-prefix layout its prompt with every completion that
    shares it (the prompt's keys serve them all; `data.layout.prefix_groups` given `ModelConfig.split_length`
    never groups sequences from both sides of `original`). transformers decides by the longest sequence of
    the whole batch; this decides per sequence, so a sequence's log-probs never depend on its batch mates. In
    KV-cache decoding (`mask` a CacheMask) the new tokens decide by the longest position among them, as
    transformers' forward with a cache does (keys already cached keep their rotation: Llama's generation).
    Phi-3's generation instead re-encodes a sequence whole when it first reaches past `original`, and so does
    ours for Phi-3 (`Decoder.reencode_position`, `copg_jax.generate`).

    Args:
      positions: [N, T] int32; mask: the layout's AttentionPattern (segment ids < T + 1, as every layout
        builds them) or a CacheMask.
    """
    if not isinstance(mask, AttentionPattern):
        return jnp.broadcast_to(jnp.max(positions, axis=1, keepdims=True) >= original, positions.shape)
    groups = jnp.where(mask.prefix_ids != 0, mask.prefix_ids, mask.segment_ids)
    width = positions.shape[1] + 1

    def row(pos, group):
        return jax.ops.segment_max(pos, group, num_segments=width)[group]

    return jax.vmap(row)(positions, jnp.clip(groups, 0, width - 1)) >= original


def rope_frequencies(rot_dim: int, kind: LayerKind, positions: jax.Array, mask) -> jax.Array | np.ndarray:
    """A layer's inverse frequencies: [rot_dim / 2] (numpy, constant), or [N, T, rot_dim / 2] for LongRoPE,
    whose frequencies depend on the length of each token's sequence (`longrope_long`)."""
    scaling = dict(kind.rope_scaling)
    short = rope_inv_freq(rot_dim, kind.rope_theta, scaling)
    if scaling.get("rope_type") != "longrope":
        return short
    long = longrope_long(positions, mask, int(scaling["original_max_position_embeddings"]))
    long_freq = rope_inv_freq(rot_dim, kind.rope_theta, scaling, long=True)
    return jnp.where(long[..., None], jnp.asarray(long_freq), jnp.asarray(short))


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq, factor: float = 1.0, interleaved: bool = False
) -> jax.Array:
    """Rotates the first 2 * inv_freq.shape[-1] features of each head: feature pairs (i, i + rot / 2) by
    frequency i (HF's rotate-half convention), or with `interleaved` pairs (2i, 2i + 1) (GLM's).

    Args:
      x: [N, T, H, Dh].
      positions: [N, T] int32.
      inv_freq: [rot / 2], or [N, T, rot / 2] (per token: LongRoPE).
      factor: multiplies cos and sin (YaRN's and LongRoPE's attention scaling), so the rotated features only.
    """
    rot = 2 * inv_freq.shape[-1]
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [N, T, rot/2]
    if interleaved:
        emb = jnp.repeat(freqs, 2, axis=-1)[:, :, None, :]
    else:
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = (jnp.cos(emb) * factor).astype(x.dtype), (jnp.sin(emb) * factor).astype(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:  # (x0, x1) -> (-x1, x0) in each adjacent pair
        rotated = jnp.stack([-x_rot[..., 1::2], x_rot[..., 0::2]], axis=-1).reshape(x_rot.shape)
    else:
        half = rot // 2
        rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


@struct.dataclass
class CacheMask:
    """Who attends to whom in KV-cache decoding of S new tokens over L cache slots, before the window.

    Attributes:
      allowed: [N, 1, S, L] bool, earlier-or-same slots of the query's segment (padding never).
      own_slot: [1, 1, S, L] bool, each query's own slot (a padding query attends to itself alone).
      q_positions: [N, S] int32; k_positions: [N, L] int32 (of every slot).
    """

    allowed: jax.Array
    own_slot: jax.Array
    q_positions: jax.Array
    k_positions: jax.Array

    def for_window(self, window: int | None) -> jax.Array:
        """The [N, 1, S, L] bool mask of a layer with this window (None: none)."""
        allowed = self.allowed
        if window is not None:
            allowed = allowed & window_mask(self.q_positions, self.k_positions, window)[:, None]
        return allowed | self.own_slot


def split_heads(fused: jax.Array, kv_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[..., H + 2 KV, Dh] (q's heads, k's, v's) -> ([..., H, Dh], [..., KV, Dh], [..., KV, Dh])."""
    h = fused.shape[-2] - 2 * kv_heads
    return fused[..., :h, :], fused[..., h : h + kv_heads, :], fused[..., h + kv_heads :, :]


def _adapted(lora: LoRASpec | None):
    """site -> the spec when `lora` adapts that site, else None."""
    return lambda site: lora if lora is not None and lora.on(site) else None


class Attention(nnx.Module):
    """Grouped-query attention with optional qkv/out bias, q/k RMSNorm, (partial) RoPE and LoRA adapters
    (on q, k, v, o separately, or one on the fused qkv projection: `copg_jax.models.lora`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype, lora: LoRASpec | None = None):
        d, h, kv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        on = _adapted(lora)
        self.q = Dense(
            (d,), (h, dh), ("embed", "heads", "head_dim"), bias=cfg.qkv_bias, lora=on("attn.q"), **kw
        )
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.k = Dense((d,), (kv, dh), kv_axes, bias=cfg.qkv_bias, lora=on("attn.k"), **kw)
        self.v = Dense((d,), (kv, dh), kv_axes, bias=cfg.qkv_bias, lora=on("attn.v"), **kw)
        self.o = Dense(
            (h, dh), (d,), ("heads", "head_dim", "embed"), bias=cfg.out_bias, lora=on("attn.o"), **kw
        )
        # GPT-2 / GPT-NeoX / Phi-3: one adapter on the fused projection, B [r, H + 2 KV, Dh]
        fused = on("attn.qkv")
        self.qkv_lora = (
            None
            if fused is None
            else LoRA((d,), (h + 2 * kv, dh), ("embed",), (None, "head_dim"), fused, rngs=rngs, dtype=dtype)
        )
        self.kv_heads = kv
        norm_kw = dict(
            eps=cfg.norm_eps,
            offset=cfg.norm_offset,
            scale_in_float32=cfg.norm_scale_in_float32,
            param_dtype=param_dtype,
            dtype=dtype,
        )
        if cfg.qk_norm_all_heads:  # OLMo: over [H, Dh] (and [KV, Dh]) together
            q_dims, k_dims = ((h, dh), ("heads", "head_dim")), ((kv, dh), ("kv_heads", "head_dim"))
        else:
            q_dims = k_dims = (dh, "head_dim")
        self.q_norm = RMSNorm(q_dims[0], axis_name=q_dims[1], **norm_kw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_dims[0], axis_name=k_dims[1], **norm_kw) if cfg.qk_norm else None
        # static RoPE settings; the theta and scaling of a layer come with its LayerKind, inv_freq is rebuilt
        # with numpy at trace time
        self.rot_dim = int(dh * cfg.rotary_fraction) if cfg.position_embedding == "rope" else 0
        self.rope_interleaved = cfg.rope_interleaved
        self.scale = cfg.attention_multiplier or (cfg.query_pre_attn_scalar or dh) ** -0.5
        self.softcap = cfg.attn_softcap

    def fused(self) -> tuple[list[Dense], Fused]:
        """The kernels the fused qkv adapter spans (q, k, v) and how they join: [..., H + 2 KV, Dh]."""
        return [self.q, self.k, self.v], qkv_fusion(self.kv_heads)

    def __call__(self, x, positions, mask, kind: LayerKind, cache=None, dropout_key=None):
        """Attention of x's queries to x's keys, or to a KV cache that x's keys are first written into.

        Args:
          x: [N, T, D]; positions: [N, T] int32.
          mask: the layout's AttentionPattern (`copg_jax.models.attention`: ids and backend; the window is the
            layer's), or a CacheMask over the cache slots (KV-cache decoding: plain XLA attention).
          kind: this layer's window and RoPE (`ModelConfig.layer_kind`).
          cache: None, or (k [N, S, KV, Dh], v [N, S, KV, Dh], index) with x written at slots index..index+T;
            with an AttentionPattern (prefill of an empty cache) x attends to its own keys, not the cache.
          dropout_key: the layer's LoRA dropout randomness (None: no dropout).
        Returns:
          ([N, T, D], updated (k, v) cache or None).
        """
        with jax.named_scope("qkv"):
            if self.qkv_lora is None:
                q = self.q(x, site_key(dropout_key, "attn.q"))
                k = self.k(x, site_key(dropout_key, "attn.k"))
                v = self.v(x, site_key(dropout_key, "attn.v"))
            else:
                q, k, v = fused_outputs(*self.fused(), self.qkv_lora, x, site_key(dropout_key, "attn.qkv"))
            q = constrain(q, ("batch", "length", "heads", "head_dim"))
            k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
            v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rot_dim and kind.rope:
            factor = rope_attention_factor(dict(kind.rope_scaling))
            with jax.named_scope("rope"):
                inv_freq = rope_frequencies(self.rot_dim, kind, positions, mask)
                pair = self.rope_interleaved
                q, k = (apply_rope(x, positions, inv_freq, factor, pair) for x in (q, k))
        new_cache = None
        if cache is not None:
            k_cache, v_cache, index = cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            new_cache = (k_cache, v_cache)
            if not isinstance(mask, AttentionPattern):  # decoding: attend over the cache slots
                k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
        with jax.named_scope("attention"):
            if isinstance(mask, AttentionPattern):
                pattern = mask.replace(sliding_window=kind.window, softcap=self.softcap)
                out = attention(q, k, v, pattern, scale=self.scale)
            else:
                out = masked_attention(q, k, v, mask.for_window(kind.window), self.scale, self.softcap)
        with jax.named_scope("o"):
            return self.o(out, site_key(dropout_key, "attn.o")), new_cache


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class MLP(nnx.Module):
    """Gated (SwiGLU / GeGLU: down(act(gate(x)) * up(x))) or plain (down(act(up(x)))) feed-forward of width
    `size` (default the config's intermediate_size), with LoRA adapters on gate, up and down, or one on the
    fused gate|up projection (Phi-3)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
        lora: LoRASpec | None = None,
        size: int | None = None,
    ):
        d, f = cfg.hidden_size, size or cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        on = _adapted(lora)
        self.gate = Dense((d,), (f,), ("embed", "mlp"), lora=on("mlp.gate"), **kw) if cfg.gated_mlp else None
        self.up = Dense((d,), (f,), ("embed", "mlp"), lora=on("mlp.up"), **kw)
        self.down = Dense((f,), (d,), ("mlp", "embed"), lora=on("mlp.down"), **kw)
        fused = on("mlp.gate_up")
        if fused is not None and not cfg.gated_mlp:
            raise ValueError(f"{cfg.model_type}: a fused gate_up adapter needs a gated MLP")
        self.gate_up_lora = (
            None
            if fused is None
            else LoRA((d,), (2, f), ("embed",), (None, "mlp"), fused, rngs=rngs, dtype=dtype)
        )
        self.activation = cfg.activation

    def fused(self) -> tuple[list[Dense], Fused]:
        """The kernels the fused gate_up adapter spans (gate, up) and how they join: [..., 2, F]."""
        return [self.gate, self.up], GATE_UP

    @jax.named_scope("mlp")
    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        if self.gate_up_lora is not None:
            key = site_key(dropout_key, "mlp.gate_up")
            gate, up = fused_outputs(*self.fused(), self.gate_up_lora, x, key)
            h = act(gate) * up
        else:
            up = self.up(x, site_key(dropout_key, "mlp.up"))
            h = act(up) if self.gate is None else act(self.gate(x, site_key(dropout_key, "mlp.gate"))) * up
        return self.down(constrain(h, ("batch", "length", "mlp")), site_key(dropout_key, "mlp.down"))
