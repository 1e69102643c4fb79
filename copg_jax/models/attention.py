"""Attention over a TokenBatch layout: one function, interchangeable backends, the XLA reference beside.

`attention(q, k, v, pattern, scale=...)` computes softmax(cap(scale * q k^T) + mask) v per head, query head h
reading key/value head h // (H / KV) (GQA), where cap(s) = c * tanh(s / c) is Gemma 2's logit soft-capping
with c = `pattern.softcap` (None: cap(s) = s), with the layout's mask (`copg_jax.batch`) given by ids, not as
an array:

    allowed(q, k) = k <= q and seg[k] != 0 and (seg[k] == seg[q] or seg[k] == prefix[q] != 0)
                    and pos[q] - pos[k] < window,          or k == q

(a padding query attends to itself alone, so no softmax row is empty). Backends, by `model.attention` name:

  xla         The reference: `batch.attention_mask` as an explicit [N, 1, T, T] mask into
              `jax.nn.dot_product_attention` (soft-capped: the same softmax written out in float32); XLA keeps
              the [N, H, T, T] probabilities for the backward pass.
  blockwise   Flash attention in plain JAX, for every platform: an online softmax over key blocks and a custom
              VJP that recomputes each block's probabilities from the saved output and log-sum-exp. Key blocks
              that no query of a block may see (the future, other segments) are skipped.
  pallas_gpu  The same algorithm as Pallas kernels (Triton on GPU; interpret mode on CPU, for tests): one
              program per (query block, row, head), query-side (segment, prefix, position) and key-side
              (segment, position) ids, so all three layouts take one pass, the shared prefix included.
  cudnn       cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`: causal,
              key lengths, left window) for the padded layout (every row one causal segment, then padding);
              other layouts, and soft-capped logits (cuDNN has no cap), go to pallas_gpu. bf16/fp16 only.
  splash      The Pallas TPU splash attention (causal or local mask with query/key segment ids, its own logit
              soft cap) for the padded and packed layouts; shared prefixes go to blockwise.
  auto        `resolve_backend`: CPU -> xla up to CPU_XLA_MAX_LENGTH tokens per row, blockwise beyond;
              GPU -> cudnn (bf16/fp16), else pallas_gpu; TPU -> splash; anything else -> blockwise.

For cudnn and splash the layout decides the kernel: the pattern's static `layout` when the caller knows it
(the trainer passes `data.layout`), else ("any") the batch's ids at run time, by `lax.cond` over both
kernels, whose program then holds both kernels' residuals (more step memory: benchmarks/RESULTS.md).

Rows are padded to a multiple of the block size inside (padding tokens are segment 0), so any T works.

Block skipping relies on what every layout of `copg_jax.data.layout` produces: each segment id occupies one
contiguous run of its row and ids lie in [0, T]. A row that breaks this visits every block up to the diagonal
instead, so the result stays exact for any ids.

The flash backends tag their output and log-sum-exp with `ATTENTION_OUT` / `ATTENTION_LSE`
(`jax.ad_checkpoint.checkpoint_name`), the names the "attention" remat policies of `copg_jax.models.decoder`
keep so that a rematerialised block does not run its attention forward again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from copg_jax.batch import attention_mask
from copg_jax.sharding import logical_to_spec

try:  # an experimental module of JAX that may move between versions: only the splash backend needs it
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
except ImportError:  # pragma: no cover
    splash = splash_mask = None

BACKENDS = ("auto", "xla", "blockwise", "pallas_gpu", "cudnn", "splash")
LAYOUTS = ("any", "padded", "packed", "shared_prefix")  # AttentionPattern.layout: what rows are known to be
ATTENTION_OUT = "attention_out"
ATTENTION_LSE = "attention_lse"
CPU_XLA_MAX_LENGTH = 256  # measured: benchmarks/RESULTS.md, "Attention backends on CPU"
MASKED = -1e30  # finite, so a fully masked block never produces inf - inf


@struct.dataclass
class AttentionPattern:
    """Who attends to whom in N rows of T tokens, as ids (a `TokenBatch` layout), plus the backend to use.

    Attributes:
      segment_ids, prefix_ids, positions: [N, T] int32, as in `copg_jax.batch.TokenBatch`.
      sliding_window: keys at positions <= query position - window are hidden (None: no window).
      backend: one of BACKENDS.
      layout: one of LAYOUTS: the `copg_jax.data.layout` layout that built every row (a promise: cudnn and
        splash then use their kernel or the general one without a run-time choice; rows that break it give
        NaN, not a wrong mask), or "any".
      softcap: logits s become softcap * tanh(s / softcap) before the mask (Gemma 2's
        `attn_logit_softcapping`; None: no capping).
    """

    segment_ids: jax.Array
    prefix_ids: jax.Array
    positions: jax.Array
    sliding_window: int | None = struct.field(pytree_node=False, default=None)
    backend: str = struct.field(pytree_node=False, default="auto")
    layout: str = struct.field(pytree_node=False, default="any")
    softcap: float | None = struct.field(pytree_node=False, default=None)


def window_mask(q_positions: jax.Array, k_positions: jax.Array, window: int) -> jax.Array:
    """[..., Tq, Tk] bool: the key's position is less than `window` before the query's."""
    return q_positions[..., :, None] - k_positions[..., None, :] < window


def allowed(q_index, q_segment, q_prefix, q_position, k_index, k_segment, k_position, window: int | None):
    """The layout's mask, elementwise over broadcasting query-side and key-side arrays (module docstring)."""
    same = (k_segment == q_segment) | ((k_segment == q_prefix) & (q_prefix != 0))
    ok = (k_index <= q_index) & (k_segment != 0) & same
    if window is not None:
        ok = ok & (q_position - k_position < window)
    return ok | (k_index == q_index)


def cap_logits(s: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(s / cap), elementwise: Gemma 2's logit soft-capping (cap None: s unchanged)."""
    return s if cap is None else cap * jnp.tanh(s / cap)


def cap_logits_backward(ds: jax.Array, capped: jax.Array, cap: float | None) -> jax.Array:
    """The cotangent of the uncapped logits from `ds`, that of the `capped` ones: d cap(s) / ds = 1 - tanh^2
    = 1 - (capped / cap)^2. Clipping makes masked entries (MASKED, not a capped value) get 0, not -inf."""
    return ds if cap is None else ds * (1.0 - jnp.square(jnp.clip(capped / cap, -1.0, 1.0)))


def resolve_backend(name: str, *, platform: str, length: int, dtype, head_dim: int) -> str:
    """The backend `name` stands for on `platform` ("cpu" | "gpu" | "tpu") for rows of `length` tokens."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name != "auto":
        return name
    if platform == "cpu":
        return "xla" if length <= CPU_XLA_MAX_LENGTH else "blockwise"
    if platform == "gpu":
        cudnn_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
        return "cudnn" if cudnn_ok else "pallas_gpu"
    if platform == "tpu":
        return "splash"
    return "blockwise"


def target_platform() -> str:
    """ "cpu" | "gpu" | "tpu" | ...: the platform of the mesh being traced for (`jax.set_mesh` /
    `sharding.on_mesh`), else of the default device. The mesh's decides, so that a step compiled ahead of time
    for devices this process does not have (deviceless GPU / TPU topologies) gets those devices' kernels."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else mesh.abstract_device
    platform = device.platform if device is not None else jax.devices()[0].platform
    return "gpu" if platform == "cuda" else platform


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, pattern: AttentionPattern, *, scale: float
) -> jax.Array:
    """softmax(cap(scale * q k^T) + layout mask) v with the backend `pattern.backend` names.

    Args:
      q: [N, T, H, Dh] queries; k, v: [N, T, KV, Dh] keys/values (H a multiple of KV), one dtype.
      pattern: the layout's ids, window, backend and logit soft cap.
      scale: logit scale (usually Dh ** -0.5).
    Returns:
      [N, T, H, Dh] in q's dtype.
    """
    platform = target_platform()
    backend = resolve_backend(
        pattern.backend, platform=platform, length=q.shape[1], dtype=q.dtype, head_dim=q.shape[-1]
    )
    if backend == "xla":
        return xla_attention(q, k, v, pattern, scale=scale)
    on_cpu = platform == "cpu"  # kernels run in Pallas interpret mode, cuDNN's arguments through XLA: tests
    fn = {
        "blockwise": functools.partial(blockwise_attention, scale=scale),
        "pallas_gpu": functools.partial(pallas_gpu_attention, scale=scale, interpret=on_cpu),
        "cudnn": functools.partial(
            cudnn_attention, scale=scale, interpret=on_cpu, implementation="xla" if on_cpu else "cudnn"
        ),
        "splash": functools.partial(splash_attention, scale=scale, interpret=on_cpu),
    }[backend]
    return fn(q, k, v, pattern) if backend == "blockwise" else _per_shard(fn, q, k, v, pattern)


# ------------------------------------------------------------------------------------------------- reference


def xla_attention(q, k, v, pattern: AttentionPattern, *, scale: float) -> jax.Array:
    """The reference: an explicit [N, 1, T, T] mask into `masked_attention` (`jax.nn.dot_product_attention`;
    with a logit soft cap, which that lacks, the same softmax written out in float32)."""
    mask = attention_mask(pattern.segment_ids, pattern.prefix_ids)
    if pattern.sliding_window is not None:
        mask = mask & window_mask(pattern.positions, pattern.positions, pattern.sliding_window)[:, None]
    return checkpoint_name(masked_attention(q, k, v, mask, scale, pattern.softcap), ATTENTION_OUT)


# ----------------------------------------------------------------------------------- layout ids and bounds


class _Ids(NamedTuple):
    """Query-side and key-side ids of padded rows, and the blocks each block must visit (`_block_bounds`)."""

    segment_ids: jax.Array  # [N, T]
    prefix_ids: jax.Array  # [N, T]
    positions: jax.Array  # [N, T]
    kv_lo: jax.Array  # [N, T / block_q]: first key block a query block visits
    kv_hi: jax.Array  # [N, T / block_q]: one past its last
    q_lo: jax.Array  # [N, T / block_k]: first query block that sees a key block
    q_hi: jax.Array  # [N, T / block_k]: one past its last


def _per_row(fn, *arrays):
    return jax.vmap(fn)(*arrays)


def _block_bounds(segment_ids, prefix_ids, block_q: int, block_k: int):
    """Which blocks can hold an allowed (query, key) pair: the skipping of every flash backend.

    Exact under the contiguity contract (module docstring); a row breaking it gets [0, diagonal] bounds.

    Args:
      segment_ids, prefix_ids: [N, T] int32, T a multiple of block_q and block_k.
    Returns:
      kv_lo, kv_hi: [N, T / block_q] key-block range [lo, hi) of each query block.
      q_lo, q_hi: [N, T / block_k] query-block range [lo, hi) of each key block.
    """
    n, t = segment_ids.shape
    idx = jnp.arange(t, dtype=jnp.int32)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    edge = jnp.ones((n, 1), bool)
    starts = jnp.concatenate([edge, change], axis=1)
    ends = jnp.concatenate([change, edge], axis=1)
    run_start = lax.cummax(jnp.where(starts, idx, 0), axis=1)
    run_end = lax.cummin(jnp.where(ends, idx, t - 1), axis=1, reverse=True)
    in_range = ((segment_ids >= 0) & (segment_ids <= t) & (prefix_ids >= 0) & (prefix_ids <= t)).all(axis=1)
    seg, pre = jnp.clip(segment_ids, 0, t), jnp.clip(prefix_ids, 0, t)
    runs = _per_row(lambda r, s: jax.ops.segment_sum(r.astype(jnp.int32), s, t + 1), starts, seg)
    contiguous = in_range & (runs[:, 1:] <= 1).all(axis=1)
    first = _per_row(lambda s: jax.ops.segment_min(idx, s, t + 1), seg)  # first column of each id
    last_user = _per_row(lambda p: jax.ops.segment_max(idx, p, t + 1), pre)  # last query naming it as prefix
    prefix_start = jnp.where(pre != 0, jnp.take_along_axis(first, pre, axis=1), t)
    user_end = jnp.where(seg != 0, jnp.take_along_axis(last_user, seg, axis=1), -1)
    first_key = jnp.where(contiguous[:, None], jnp.minimum(run_start, prefix_start), 0)
    last_query = jnp.where(contiguous[:, None], jnp.maximum(run_end, user_end), t - 1)
    nq, nk = t // block_q, t // block_k
    kv_lo = first_key.reshape(n, nq, block_q).min(axis=2) // block_k
    kv_hi = ((jnp.arange(nq, dtype=jnp.int32) + 1) * block_q - 1) // block_k + 1
    q_lo = jnp.arange(nk, dtype=jnp.int32) * block_k // block_q
    q_hi = last_query.reshape(n, nk, block_k).max(axis=2) // block_q + 1
    return kv_lo, jnp.broadcast_to(kv_hi, (n, nq)), jnp.broadcast_to(q_lo, (n, nk)), q_hi


def _pad_rows(q, k, v, pattern: AttentionPattern, multiple: int, head_multiple: int = 1):
    """Pads T to a multiple of `multiple` (padding tokens: segment 0) and Dh to one of `head_multiple`."""
    t, d = q.shape[1], q.shape[-1]
    pad_t, pad_d = -t % multiple, -d % head_multiple
    qkv = [jnp.pad(x, ((0, 0), (0, pad_t), (0, 0), (0, pad_d))) for x in (q, k, v)]
    ids = [
        jnp.pad(x, ((0, 0), (0, pad_t))) for x in (pattern.segment_ids, pattern.prefix_ids, pattern.positions)
    ]
    return qkv, ids


def _layout_ids(segment_ids, prefix_ids, positions, block_q: int, block_k: int) -> _Ids:
    return _Ids(segment_ids, prefix_ids, positions, *_block_bounds(segment_ids, prefix_ids, block_q, block_k))


def _block_size(length: int, block: int) -> int:
    """`block`, or the smallest power of two >= 16 covering a shorter row."""
    return min(block, max(16, pl.next_power_of_2(length)))


# ------------------------------------------------------------------------------- flash attention, any kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(kernel, q, k, v, ids: _Ids):
    """(out [N, T, H, Dh], lse [N, H, T] float32) of `kernel` (a _Blockwise or _PallasGpu), with its VJP."""
    return _flash_forward(kernel, q, k, v, ids)


def _flash_forward(kernel, q, k, v, ids):
    out, lse = kernel.forward(q, k, v, ids)
    return checkpoint_name(out, ATTENTION_OUT), checkpoint_name(lse, ATTENTION_LSE)


def _flash_fwd(kernel, q, k, v, ids):
    out, lse = _flash_forward(kernel, q, k, v, ids)
    return (out, lse), (q, k, v, ids, out, lse)


def _flash_bwd(kernel, residuals, cotangents):
    q, k, v, ids, out, lse = residuals
    d_out, d_lse = cotangents
    # d lse_i / d s_ij = p_ij: the lse cotangent enters exactly like the -rowsum(dO * O) term of the softmax
    delta = jnp.einsum("nthd,nthd->nht", out.astype(jnp.float32), d_out.astype(jnp.float32)) - d_lse
    dq, dk, dv = kernel.backward(q, k, v, ids, lse, delta, d_out)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _flash_attention(kernel, q, k, v, pattern: AttentionPattern, head_multiple: int = 1):
    """Pads, runs `kernel` through `_flash`, unpads: the body of the blockwise and pallas_gpu backends."""
    t, d = q.shape[1], q.shape[-1]
    (qp, kp, vp), (seg, pre, pos) = _pad_rows(
        q, k, v, pattern, max(kernel.block_q, kernel.block_k), head_multiple
    )
    ids = _layout_ids(seg, pre, pos, kernel.block_q, kernel.block_k)
    out, _ = _flash(kernel, qp, kp, vp, ids)
    return out[:, :t, :, :d]


# ---------------------------------------------------------------------------------------- blockwise (JAX)


@dataclasses.dataclass(frozen=True)
class _Blockwise:
    """Flash attention in plain JAX: `lax.map` over query blocks, `fori_loop` over their key blocks."""

    scale: float
    window: int | None
    block_q: int
    block_k: int
    softcap: float | None = None

    def _scores(self, q_block, k_block, ids: _Ids, i, j):
        """Masked scaled (and soft-capped) logits [N, KV, G, bq, bk] of query block i ([N, bq, KV, G, D])
        and key block j."""
        bq, bk = self.block_q, self.block_k
        s = jnp.einsum("nqkgd,nskd->nkgqs", q_block, k_block, preferred_element_type=jnp.float32) * self.scale
        s = cap_logits(s, self.softcap)
        q_ids = [lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1)[:, :, None] for x in ids[:3]]
        k_ids = [lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1)[:, None, :] for x in (ids[0], ids[2])]
        q_index = (i * bq + jnp.arange(bq))[:, None]
        k_index = (j * bk + jnp.arange(bk))[None, :]
        ok = allowed(q_index, *q_ids, k_index, k_ids[0], k_ids[1], self.window)[:, None, None]
        return jnp.where(ok, s, MASKED), ok

    def _blocks(self, x, block):
        """[N, T, ...] -> [T / block, N, block, ...]."""
        n, t = x.shape[:2]
        return x.reshape(n, t // block, block, *x.shape[2:]).swapaxes(0, 1)

    def forward(self, q, k, v, ids: _Ids):
        n, t, h, d = q.shape
        kvh = k.shape[2]
        g = h // kvh
        q_blocks = self._blocks(q.reshape(n, t, kvh, g, d), self.block_q)
        lo, hi = ids.kv_lo.min(axis=0), ids.kv_hi.max(axis=0)  # one loop for all rows; the mask does the rest

        def one(xs):
            q_block, i, lo_i, hi_i = xs

            def body(j, carry):
                acc, m, row_sum = carry
                k_block = lax.dynamic_slice_in_dim(k, j * self.block_k, self.block_k, axis=1)
                v_block = lax.dynamic_slice_in_dim(v, j * self.block_k, self.block_k, axis=1)
                s, ok = self._scores(q_block, k_block, ids, i, j)
                m_new = jnp.maximum(m, s.max(axis=-1))
                p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "nkgqs,nskd->nkgqd", p.astype(v.dtype), v_block, preferred_element_type=jnp.float32
                )
                return acc * correction[..., None] + pv, m_new, row_sum * correction + p.sum(axis=-1)

            shape = (n, kvh, g, self.block_q)
            init = (
                jnp.zeros((*shape, d), jnp.float32),
                jnp.full(shape, MASKED),
                jnp.zeros(shape, jnp.float32),
            )
            acc, m, row_sum = lax.fori_loop(lo_i, hi_i, body, init)
            return (acc / row_sum[..., None]).astype(q.dtype), m + jnp.log(row_sum)

        out, lse = lax.map(one, (q_blocks, jnp.arange(t // self.block_q), lo, hi))
        out = out.transpose(1, 0, 4, 2, 3, 5).reshape(n, t, h, d)  # [nq, N, KV, G, bq, D] -> [N, T, H, D]
        return out, lse.transpose(1, 2, 3, 0, 4).reshape(n, h, t)

    def backward(self, q, k, v, ids: _Ids, lse, delta, d_out):
        """One pass over query blocks: dq per block, dk and dv accumulated in place (float32)."""
        n, t, h, d = q.shape
        kvh = k.shape[2]
        g = h // kvh
        bq, bk = self.block_q, self.block_k
        q_blocks = self._blocks(q.reshape(n, t, kvh, g, d), bq)
        do_blocks = self._blocks(d_out.reshape(n, t, kvh, g, d), bq)
        stats = [self._blocks(x.reshape(n, kvh, g, t).transpose(0, 3, 1, 2), bq) for x in (lse, delta)]
        lo, hi = ids.kv_lo.min(axis=0), ids.kv_hi.max(axis=0)

        def one(grads, xs):
            q_block, do_block, lse_block, delta_block, i, lo_i, hi_i = xs
            lse_block, delta_block = (x.transpose(0, 2, 3, 1)[..., None] for x in (lse_block, delta_block))

            def body(j, carry):
                dq, dk, dv = carry
                k_block = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
                v_block = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
                s, ok = self._scores(q_block, k_block, ids, i, j)
                p = jnp.where(ok, jnp.exp(s - lse_block), 0.0)  # [N, KV, G, bq, bk]
                dv_j = jnp.einsum(
                    "nkgqs,nqkgd->nskd", p.astype(d_out.dtype), do_block, preferred_element_type=jnp.float32
                )
                dp = jnp.einsum("nqkgd,nskd->nkgqs", do_block, v_block, preferred_element_type=jnp.float32)
                ds = cap_logits_backward(p * (dp - delta_block), s, self.softcap).astype(q.dtype)
                dq = dq + jnp.einsum("nkgqs,nskd->nqkgd", ds, k_block, preferred_element_type=jnp.float32)
                dk_j = jnp.einsum("nkgqs,nqkgd->nskd", ds, q_block, preferred_element_type=jnp.float32)
                dk = lax.dynamic_update_slice_in_dim(
                    dk, lax.dynamic_slice_in_dim(dk, j * bk, bk, 1) + dk_j, j * bk, 1
                )
                dv = lax.dynamic_update_slice_in_dim(
                    dv, lax.dynamic_slice_in_dim(dv, j * bk, bk, 1) + dv_j, j * bk, 1
                )
                return dq, dk, dv

            dq0 = jnp.zeros((n, bq, kvh, g, d), jnp.float32)
            dq, dk, dv = lax.fori_loop(lo_i, hi_i, body, (dq0, *grads))
            return (dk, dv), dq

        zeros = jnp.zeros(k.shape, jnp.float32)
        (dk, dv), dq = lax.scan(
            one, (zeros, zeros), (q_blocks, do_blocks, *stats, jnp.arange(t // bq), lo, hi)
        )
        dq = dq.swapaxes(0, 1).reshape(n, t, h, d) * self.scale
        return dq.astype(q.dtype), (dk * self.scale).astype(k.dtype), dv.astype(v.dtype)


def blockwise_attention(
    q, k, v, pattern: AttentionPattern, *, scale: float, block_q: int = 256, block_k: int = 256
) -> jax.Array:
    """Flash attention in plain JAX (shapes: `attention`); blocks shrink to short rows."""
    t = q.shape[1]
    kernel = _Blockwise(
        scale, pattern.sliding_window, _block_size(t, block_q), _block_size(t, block_k), pattern.softcap
    )
    return _flash_attention(kernel, q, k, v, pattern)


# ------------------------------------------------------------------------------------ pallas_gpu (Triton)


def _load_ids(refs, block_slice=None):
    """Loads id refs (whole block, or `block_slice` of it)."""
    return [r[...] if block_slice is None else r[block_slice] for r in refs]


def _fwd_kernel(
    q_ref, k_ref, v_ref, seg_q, pre_q, pos_q, seg_k, pos_k, lo_ref, hi_ref, o_ref, lse_ref, *, cfg
):
    i = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]
    q_seg, q_pre, q_pos = (x[:, None] for x in _load_ids((seg_q, pre_q, pos_q)))
    q_index = (i * bq + jnp.arange(bq))[:, None]

    def body(j, carry):
        acc, m, row_sum = carry
        keys = pl.ds(j * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        k_seg, k_pos = (x[None, :] for x in _load_ids((seg_k, pos_k), keys))
        ok = allowed(
            q_index, q_seg, q_pre, q_pos, (j * bk + jnp.arange(bk))[None, :], k_seg, k_pos, cfg.window
        )
        s = jnp.where(ok, cap_logits(plgpu.dot(q, k.T) * cfg.scale, cfg.softcap), MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, row_sum * correction + jnp.sum(p, axis=1)

    d = q.shape[-1]
    init = (
        jnp.zeros((bq, d), jnp.float32),
        jnp.full((bq,), MASKED, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, row_sum = lax.fori_loop(lo_ref[i], hi_ref[i], body, init)
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(row_sum)


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    seg_q,
    pre_q,
    pos_q,
    seg_k,
    pos_k,
    lo_ref,
    hi_ref,
    dq_ref,
    *,
    cfg,
):
    i = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_k
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg, q_pre, q_pos = (x[:, None] for x in _load_ids((seg_q, pre_q, pos_q)))
    q_index = (i * bq + jnp.arange(bq))[:, None]

    def body(j, dq):
        keys = pl.ds(j * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        k_seg, k_pos = (x[None, :] for x in _load_ids((seg_k, pos_k), keys))
        ok = allowed(
            q_index, q_seg, q_pre, q_pos, (j * bk + jnp.arange(bk))[None, :], k_seg, k_pos, cfg.window
        )
        s = cap_logits(plgpu.dot(q, k.T) * cfg.scale, cfg.softcap)
        p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
        ds = cap_logits_backward(p * (plgpu.dot(do, v.T) - delta[:, None]), s, cfg.softcap)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo_ref[i], hi_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q, pre_q, pos_q, seg_k, pos_k, lo_ref, hi_ref,
    dk_ref, dv_ref, *, cfg,
):  # fmt: skip
    j = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_k
    k, v = k_ref[...], v_ref[...]
    k_seg, k_pos = (x[None, :] for x in _load_ids((seg_k, pos_k)))
    k_index = (j * bk + jnp.arange(bk))[None, :]

    def body(i, carry):
        dk, dv = carry
        queries = pl.ds(i * bq, bq)
        q, do = q_ref[queries, :], do_ref[queries, :]
        lse, delta = lse_ref[queries], delta_ref[queries]
        q_seg, q_pre, q_pos = (x[:, None] for x in _load_ids((seg_q, pre_q, pos_q), queries))
        ok = allowed(
            (i * bq + jnp.arange(bq))[:, None], q_seg, q_pre, q_pos, k_index, k_seg, k_pos, cfg.window
        )
        s = cap_logits(plgpu.dot(q, k.T) * cfg.scale, cfg.softcap)
        p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
        dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
        ds = cap_logits_backward(p * (plgpu.dot(do, v.T) - delta[:, None]), s, cfg.softcap)
        return dk + plgpu.dot(ds.astype(q.dtype).T, q), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo_ref[j], hi_ref[j], body, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


@dataclasses.dataclass(frozen=True)
class _PallasGpu:
    """Pallas (Triton) flash attention kernels: grid (query or key block, row, head)."""

    scale: float
    window: int | None
    block_q: int
    block_k: int
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2
    softcap: float | None = None

    def _call(self, kernel, grid, in_specs, out_specs, out_shape, name, *args):
        return pl.pallas_call(
            functools.partial(kernel, cfg=self),
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages),
            interpret=self.interpret,
            name=name,
        )(*args)

    def _specs(self, t, d, g, nq, nk, query_blocked: bool):
        """BlockSpecs of (q, k, v, do, lse, delta, 3 query ids, 2 key ids, lo, hi) for a grid over query
        blocks (`query_blocked`) or over key blocks; grid axes are (block, row, head)."""
        bq, bk = self.block_q, self.block_k
        row = pl.BlockSpec((None, t), lambda b, n, h: (n, 0))
        if query_blocked:
            q_like = pl.BlockSpec((None, bq, None, d), lambda b, n, h: (n, b, h, 0))
            kv = pl.BlockSpec((None, t, None, d), lambda b, n, h: (n, 0, h // g, 0))
            stat = pl.BlockSpec((None, None, bq), lambda b, n, h: (n, h, b))
            q_ids = pl.BlockSpec((None, bq), lambda b, n, h: (n, b))
            bounds = pl.BlockSpec((None, nq), lambda b, n, h: (n, 0))
            return [q_like, kv, kv, q_like, stat, stat, q_ids, q_ids, q_ids, row, row, bounds, bounds]
        q_like = pl.BlockSpec((None, t, None, d), lambda b, n, h: (n, 0, h, 0))
        kv = pl.BlockSpec((None, bk, None, d), lambda b, n, h: (n, b, h // g, 0))
        stat = pl.BlockSpec((None, None, t), lambda b, n, h: (n, h, 0))
        k_ids = pl.BlockSpec((None, bk), lambda b, n, h: (n, b))
        bounds = pl.BlockSpec((None, nk), lambda b, n, h: (n, 0))
        return [q_like, kv, kv, q_like, stat, stat, row, row, row, k_ids, k_ids, bounds, bounds]

    def forward(self, q, k, v, ids: _Ids):
        n, t, h, d = q.shape
        g, nq, nk = h // k.shape[2], t // self.block_q, t // self.block_k
        specs = self._specs(t, d, g, nq, nk, query_blocked=True)
        in_specs = specs[:3] + specs[6:]
        out_specs = [specs[0], specs[4]]
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((n, h, t), jnp.float32)]
        id_args = (
            ids.segment_ids,
            ids.prefix_ids,
            ids.positions,
            ids.segment_ids,
            ids.positions,
            ids.kv_lo,
            ids.kv_hi,
        )
        out, lse = self._call(
            _fwd_kernel, (nq, n, h), in_specs, out_specs, out_shape, "flash_fwd", q, k, v, *id_args
        )
        return out, lse

    def backward(self, q, k, v, ids: _Ids, lse, delta, d_out):
        n, t, h, d = q.shape
        kvh = k.shape[2]
        g, nq, nk = h // kvh, t // self.block_q, t // self.block_k
        args = (
            q,
            k,
            v,
            d_out,
            lse,
            delta,
            ids.segment_ids,
            ids.prefix_ids,
            ids.positions,
            ids.segment_ids,
            ids.positions,
        )
        q_specs = self._specs(t, d, g, nq, nk, query_blocked=True)
        dq = self._call(
            _dq_kernel, (nq, n, h), q_specs, q_specs[0], jax.ShapeDtypeStruct(q.shape, q.dtype), "flash_dq",
            *args, ids.kv_lo, ids.kv_hi,
        )  # fmt: skip
        k_specs = self._specs(t, d, g, nq, nk, query_blocked=False)
        per_head = pl.BlockSpec((None, self.block_k, None, d), lambda b, n_, h_: (n_, b, h_, 0))
        grad_shape = jax.ShapeDtypeStruct((n, t, h, d), jnp.float32)  # per query head; groups summed below
        dk, dv = self._call(
            _dkv_kernel, (nk, n, h), k_specs, [per_head, per_head], [grad_shape, grad_shape], "flash_dkv",
            *args, ids.q_lo, ids.q_hi,
        )  # fmt: skip
        dk, dv = (x.reshape(n, t, kvh, g, d).sum(axis=3) for x in (dk, dv))
        return dq, dk.astype(k.dtype), dv.astype(v.dtype)


def pallas_gpu_attention(
    q, k, v, pattern: AttentionPattern, *, scale: float, interpret: bool = False, block_q: int = 64,
    block_k: int = 64, num_warps: int | None = None, num_stages: int = 2,
) -> jax.Array:  # fmt: skip
    """The Pallas (Triton) flash kernels (shapes: `attention`); head_dim is padded to a power of two."""
    t, d = q.shape[1], q.shape[-1]
    d_pad = max(16, pl.next_power_of_2(d))
    warps = num_warps or (4 if d_pad <= 64 else 8)
    kernel = _PallasGpu(
        scale,
        pattern.sliding_window,
        _block_size(t, block_q),
        _block_size(t, block_k),
        interpret,
        warps,
        num_stages,
        pattern.softcap,
    )
    return _flash_attention(kernel, q, k, v, pattern, head_multiple=d_pad)


# -------------------------------------------------------------------------------------------------- cudnn


def _self_value(v: jax.Array, num_heads: int) -> jax.Array:
    """[N, T, KV, Dh] values -> [N, T, H, Dh]: what a query attending to itself alone gets."""
    return jnp.repeat(v, num_heads // v.shape[2], axis=2)


def _padded_rows(pattern: AttentionPattern) -> tuple[jax.Array, jax.Array]:
    """(every row: one segment then padding, no prefix, consecutive positions; [N] segment lengths)."""
    seg, pos = pattern.segment_ids, pattern.positions
    length = (seg != 0).sum(axis=1).astype(jnp.int32)
    idx = jnp.arange(seg.shape[1])
    inside = idx[None, :] < length[:, None]
    single = jnp.where(inside, seg == seg[:, :1], seg == 0).all() & (pattern.prefix_ids == 0).all()
    consecutive = jnp.where(inside, pos == pos[:, :1] + idx[None, :], True).all()
    return single & (consecutive | (pattern.sliding_window is None)), length


def _cudnn_call(q, k, v, lengths, scale: float, window: int | None, implementation: str):
    """cuDNN's causal attention over rows of `lengths` [N] tokens (then padding), with a left window."""
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0), implementation=implementation,
    )  # fmt: skip


_cudnn_causal = jax.custom_vjp(_cudnn_call, nondiff_argnums=(4, 5, 6))


def _cudnn_causal_fwd(q, k, v, lengths, scale, window, implementation):
    out, backward = jax.vjp(
        lambda q, k, v: _cudnn_call(q, k, v, lengths, scale, window, implementation), q, k, v
    )
    # cuDNN's own residuals (its output and log-sum-exp, q, k, v) carry the name the remat policies keep
    named = jax.tree.map(
        lambda x: checkpoint_name(x, ATTENTION_OUT) if jnp.issubdtype(x.dtype, jnp.floating) else x, backward
    )
    return out, named


def _cudnn_causal_bwd(scale, window, implementation, backward, d_out):
    return (*backward(d_out), None)


_cudnn_causal.defvjp(_cudnn_causal_fwd, _cudnn_causal_bwd)


def cudnn_attention(
    q,
    k,
    v,
    pattern: AttentionPattern,
    *,
    scale: float,
    interpret: bool = False,
    implementation: str = "cudnn",
) -> jax.Array:
    """cuDNN flash attention for padded-layout batches, pallas_gpu for any other (shapes: `attention`), and
    pallas_gpu for every layout when `pattern.softcap` is set: cuDNN's fused attention has no logit soft cap.

    `implementation="xla"` runs the same causal/length/window arguments through XLA: how the tests check the
    mapping on CPU.
    """
    if pattern.softcap is not None:
        return pallas_gpu_attention(q, k, v, pattern, scale=scale, interpret=interpret)
    padded, length = _padded_rows(pattern)

    def fused(q, k, v, pattern):
        lengths = jnp.maximum(length, 1)  # an empty row's first token attends to itself, as in the reference
        out = _cudnn_causal(q, k, v, lengths, scale, pattern.sliding_window, implementation)
        inside = (jnp.arange(q.shape[1])[None, :] < lengths[:, None])[:, :, None, None]
        return checkpoint_name(jnp.where(inside, out, _self_value(v, q.shape[2])), ATTENTION_OUT)

    def general(q, k, v, pattern):
        return pallas_gpu_attention(q, k, v, pattern, scale=scale, interpret=interpret)

    return _by_layout(pattern, ("padded",), padded, fused, general, q, k, v)


def _by_layout(pattern: AttentionPattern, fused_layouts, fits_fused, fused, general, q, k, v):
    """`fused` for layouts in `fused_layouts`, `general` for the other known layouts, and for "any" the one
    the run-time predicate `fits_fused` (a traced bool) picks. Rows that break a known layout's promise give
    NaN from `fused` (the trainer stops at the non-finite loss), never attention over the wrong mask."""
    if pattern.layout not in LAYOUTS:
        raise ValueError(f"unknown attention layout {pattern.layout!r}; choose one of {LAYOUTS}")
    if pattern.layout == "any":
        return lax.cond(fits_fused, fused, general, q, k, v, pattern)
    if pattern.layout not in fused_layouts:
        return general(q, k, v, pattern)
    return jnp.where(fits_fused, fused(q, k, v, pattern), jnp.nan)


# ------------------------------------------------------------------------------------------- splash (TPU)


def _no_prefix(pattern: AttentionPattern) -> jax.Array:
    """No shared prefix, and (with a window) positions step by one inside each segment."""
    seg, pos = pattern.segment_ids, pattern.positions
    ok = (pattern.prefix_ids == 0).all()
    if pattern.sliding_window is None:
        return ok
    same = (seg[:, 1:] == seg[:, :-1]) & (
        seg[:, 1:] != 0
    )  # padding outputs are replaced: its positions are free
    return ok & jnp.where(same, pos[:, 1:] - pos[:, :-1] == 1, True).all()


def splash_attention(
    q, k, v, pattern: AttentionPattern, *, scale: float, interpret: bool = False
) -> jax.Array:
    """Pallas TPU splash attention with query/key segment ids (padded and packed layouts) and splash's own
    logit soft cap (it caps the q k^T of the pre-scaled q it is given: cap(scale * q k^T)); shared-prefix
    batches go to blockwise."""
    if splash is None:
        raise ImportError(
            f"attention backend 'splash' needs splash attention, absent from jax {jax.__version__}"
        )
    t, d = q.shape[1], q.shape[-1]
    (qp, kp, vp), (seg, pre, pos) = _pad_rows(q, k, v, pattern, 128)
    padded = dataclasses.replace(pattern, segment_ids=seg, prefix_ids=pre, positions=pos)

    def fused(q, k, v, pattern):
        n, tp, h, dh = q.shape
        kvh = k.shape[2]
        g = h // kvh
        block = next(b for b in (512, 256, 128) if tp % b == 0)
        window = pattern.sliding_window
        head_mask = (
            splash_mask.CausalMask((tp, tp))
            if window is None
            else splash_mask.LocalMask((tp, tp), window_size=(window - 1, 0), offset=0)
        )
        sizes = splash.BlockSizes(
            block_q=block,
            block_kv=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_q_dq=block,
            block_kv_dq=block,
        )
        kernel = splash.make_splash_mqa_single_device(
            splash_mask.MultiHeadMask([head_mask] * g), block_sizes=sizes, interpret=interpret,
            residual_checkpoint_name=ATTENTION_OUT, attn_logits_soft_cap=pattern.softcap,
        )  # fmt: skip
        seg = pattern.segment_ids
        per_kv_head = jax.vmap(
            lambda q1, k1, v1, s: kernel(q1, k1, v1, segment_ids=s), in_axes=(0, 0, 0, None)
        )
        out = jax.vmap(per_kv_head)(
            (q * scale).reshape(n, tp, kvh, g, dh).transpose(0, 2, 3, 1, 4),  # [N, KV, G, T, Dh]
            k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3),
            splash.SegmentIds(q=seg, kv=seg),
        )
        out = out.transpose(0, 3, 1, 2, 4).reshape(n, tp, h, dh)
        return jnp.where((seg != 0)[:, :, None, None], out, _self_value(v, h))  # padding attends to itself

    def general(q, k, v, pattern):
        return blockwise_attention(q, k, v, pattern, scale=scale)

    out = _by_layout(padded, ("padded", "packed"), _no_prefix(padded), fused, general, qp, kp, vp)
    return out[:, :t, :, :d]


# -------------------------------------------------------------------------------------------------- meshes


def _per_shard(fn, q, k, v, pattern: AttentionPattern) -> jax.Array:
    """Runs a kernel backend per device shard (rows over the batch axes, heads over the tensor axis).

    Custom calls (Triton, Mosaic, cuDNN) are opaque to XLA's partitioner, which would gather their inputs.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(q, k, v, pattern)
    heads = logical_to_spec(("batch", "length", "heads", "head_dim"))
    kv_heads = logical_to_spec(("batch", "length", "kv_heads", "head_dim"))
    ids = logical_to_spec(("batch", "length"))
    ids_spec = dataclasses.replace(pattern, segment_ids=ids, prefix_ids=ids, positions=ids)
    return jax.shard_map(
        fn, in_specs=(heads, kv_heads, kv_heads, ids_spec), out_specs=heads, check_vma=False
    )(q, k, v, pattern)


def masked_attention(q, k, v, mask: jax.Array, scale: float, softcap: float | None = None) -> jax.Array:
    """softmax(scale * q k^T, capped to softcap * tanh(. / softcap), masked) v with an explicit mask.

    Args:
      q: [N, T, H, Dh]; k, v: [N, S, KV, Dh] (H a multiple of KV).
      mask: [N, 1, T, S] bool (True: attend), no row empty.
      softcap: None, or the cap of the logits (Gemma 2).
    Returns:
      [N, T, H, Dh] in q's dtype.
    """
    if softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    n, t, h, dh = q.shape
    kvh = k.shape[2]
    qg = q.reshape(n, t, kvh, h // kvh, dh)
    s = jnp.einsum("ntkgd,nskd->nkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = cap_logits(s, softcap)
    s = jnp.where(mask[:, :, None], s, MASKED)  # [N, 1, 1, T, S] over [N, KV, G, T, S]
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("nkgts,nskd->ntkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(n, t, h, dh).astype(q.dtype)
