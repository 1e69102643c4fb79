"""Grouped matmuls for a mixture of experts: rows sorted by group (expert), y[r] = x[r] . w[group of r].

`jax.lax.ragged_dot` is the reference and the CPU path. XLA:TPU lowers it (the forward pass and the rows'
gradient) to its own grouped-matmul kernel, but the weights' gradient, a ragged dot contracting over the
rows, to a masked dense product over every group: G times the FLOPs of the grouped one (benchmarks/RESULTS.md,
"Mixture of experts on TPU"). So on TPU the weights' gradient is megablox's `tgmm`, the Mosaic kernel jax
ships (`jax.experimental.pallas.ops.tpu.megablox`), on rows padded to its row tile (`ragged_matmul` with
grad_impl="megablox", `weight_grad`).

XLA:GPU (jax 0.10) rewrites all of ragged_dot to one dense matmul over every group, [R, G x D] . [G x D, F]:
G times the FLOPs and a G times larger operand (benchmarks/RESULTS.md, "Mixture of experts on GPU"). So on GPU
the grouped matmul is a Pallas (Triton) kernel pair of our own, in the layout of MegaBlocks / megablox:

- every group's rows are placed at a multiple of the row tile `block` (zero rows fill the gaps), so that each
  tile of rows belongs to one group: `tile_layout`, `pad_rows`;
- forward and input gradient: one program per (row tile, output column tile), dot products of the tile with
  its group's weights along the contraction, f32 accumulation (`gmm`); the tiles past the last group (the
  static bound's slack) write zeros without computing;
- weight gradient: one program per (group, weight tile), summing x_tile^T . dy_tile over the group's row tiles
  (`tgmm`); a group without rows gets zeros.

The kernels run in Pallas interpret mode on CPU, which is how the tests check them against ragged_dot.

Both paths take the weights in their own dtype (float32 master weights under bfloat16 compute) and cast them
to the rows' dtype inside: the weight gradient, a sum over each group's rows, leaves the matmul in the
weights' dtype (float32 accumulation, as `copg_jax.models.mixed.matmul` for dense kernels), not rounded to the
compute dtype first; the rows' gradient stays in their dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as megablox_tgmm

ROW_BLOCKS = (64, 32, 16)  # rows per tile (each group's rows are padded to a multiple of it), largest first
MAX_BLOCK = 128  # column / contraction tile cap
# megablox's tgmm on TPU: rows per tile (a tile straddling two groups is visited once per group, masked: a
# small tile wastes less with many small groups), and the [D, F] output tiles tried, largest first (a size up
# to the largest is one tile: a block spanning a whole dimension needs no alignment)
TGMM_ROWS = 128
TGMM_TILES = (512, 256, 128)


def row_block(rows: int, groups: int) -> int:
    """The row tile for `rows` rows in `groups` groups: the largest of ROW_BLOCKS whose padding (up to
    groups x (block - 1) zero rows) does not exceed the rows themselves, else the smallest (decoding steps:
    few rows, many experts)."""
    return next((b for b in ROW_BLOCKS if groups * b <= rows), ROW_BLOCKS[-1])


def block_size(n: int, cap: int = MAX_BLOCK) -> int | None:
    """The largest power of two <= cap that divides n and is >= 16 (Triton's smallest dot), or None."""
    b = cap
    while b >= 16:
        if n % b == 0:
            return b
        b //= 2
    return None


def supported(d: int, f: int) -> bool:
    """Whether the Pallas kernels tile a [D] -> [F] grouped matmul (and its transpose)."""
    return block_size(d) is not None and block_size(f) is not None


class TileLayout(NamedTuple):
    """Where group-sorted rows go when every group starts at a multiple of the row tile (`tile_layout`).

    Attributes:
      dest: [R] int32 the padded row of each sorted row.
      tile_group: [P / block] int32 the group of each row tile, -1 for the tiles past the last group (zero
        rows, which the kernels skip), P the static padded length (R + G (block - 1), rounded up to the tile).
      lo, hi: [G] int32 each group's first and end row tile.
    """

    dest: jax.Array
    tile_group: jax.Array
    lo: jax.Array
    hi: jax.Array


def tile_layout(group_sizes: jax.Array, rows: int, block: int) -> TileLayout:
    """The `TileLayout` of `rows` group-sorted rows, group_sizes [G] int32 of them (summing to at most `rows`;
    the rows past the groups, as in `lax.ragged_dot`, belong to none: they go to tiles past the last group,
    which the kernels fill with zeros), in row tiles of `block`."""
    g = group_sizes.shape[0]
    padded = (group_sizes + block - 1) // block * block
    ends, padded_ends = jnp.cumsum(group_sizes), jnp.cumsum(padded)
    start, padded_start = ends - group_sizes, padded_ends - padded
    row = jnp.arange(rows, dtype=jnp.int32)
    group = jnp.searchsorted(ends, row, side="right")
    grouped = group < g
    group = jnp.minimum(group, g - 1)
    # past the groups: after the last group's padded end (a tile boundary), at most R + G (block - 1) rows in
    dest = jnp.where(grouped, padded_start[group] + row - start[group], padded_ends[-1] + row - ends[-1])
    tiles = -(-(rows + g * (block - 1)) // block)
    tile_ends = padded_ends // block
    tile_group = jnp.searchsorted(tile_ends, jnp.arange(tiles), side="right")
    tile_group = jnp.where(tile_group < g, tile_group, -1)
    lo = (padded_start // block).astype(jnp.int32)
    return TileLayout(dest.astype(jnp.int32), tile_group.astype(jnp.int32), lo, tile_ends.astype(jnp.int32))


def pad_rows(x: jax.Array, group_sizes: jax.Array) -> tuple[jax.Array, TileLayout, int]:
    """x [R, D] rows sorted by group, group_sizes [G] (summing to at most R) -> (the rows in their padded
    places [P, D], zero rows between; their `TileLayout`; the row tile `row_block` picked for them)."""
    block = row_block(x.shape[0], group_sizes.shape[0])
    layout = tile_layout(group_sizes, x.shape[0], block)
    padded = jnp.zeros((layout.tile_group.shape[0] * block, x.shape[1]), x.dtype).at[layout.dest].set(x)
    return padded, layout, block


def _gmm_kernel(x_ref, w_ref, group_ref, o_ref, *, block_k: int):
    """o[tile, cols] = x[tile, :] . w[group of tile, :, cols], accumulated in float32; zeros without a group
    (a tile past the last group: no dot products)."""
    group = group_ref[pl.program_id(0)]

    @pl.when(group >= 0)
    def _():
        def body(k, acc):
            ks = pl.ds(k * block_k, block_k)
            return acc + plgpu.dot(x_ref[:, ks], w_ref[group, ks, :])

        acc = lax.fori_loop(0, x_ref.shape[1] // block_k, body, jnp.zeros(o_ref.shape, jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(group < 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _tgmm_kernel(x_ref, dy_ref, lo_ref, hi_ref, o_ref, *, block: int):
    """o[group, rows, cols] = sum over the group's row tiles of x[tile, rows]^T . dy[tile, cols]."""
    group = pl.program_id(0)

    def body(t, acc):
        ts = pl.ds(t * block, block)
        return acc + plgpu.dot(x_ref[ts, :], dy_ref[ts, :], trans_a=True)

    acc = lax.fori_loop(lo_ref[group], hi_ref[group], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _compiler_params():
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def gmm(x, w, tile_group, *, block: int, interpret: bool) -> jax.Array:
    """x [P, D] (group-padded rows) . w [G, D, F] by tile group -> [P, F] in x's dtype."""
    p, d = x.shape
    g, _, f = w.shape
    bf, bk = block_size(f), block_size(d)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, block_k=bk),
        grid=(p // block, f // bf),
        in_specs=[
            pl.BlockSpec((block, d), lambda i, j: (i, 0)),
            pl.BlockSpec((g, d, bf), lambda i, j: (0, 0, j)),
            pl.BlockSpec((tile_group.shape[0],), lambda i, j: (0,)),
        ],
        out_specs=pl.BlockSpec((block, bf), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((p, f), x.dtype),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="grouped_matmul",
    )(x, w.astype(x.dtype), tile_group)


def tgmm(x, dy, lo, hi, *, block: int, interpret: bool) -> jax.Array:
    """Per group, x[rows of g]^T . dy[rows of g]: x [P, D], dy [P, F] (group-padded rows) -> [G, D, F]."""
    p, d = x.shape
    f, g = dy.shape[1], lo.shape[0]
    bd, bf = block_size(d), block_size(f)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, block=block),
        grid=(g, d // bd, f // bf),
        in_specs=[
            pl.BlockSpec((p, bd), lambda e, a, b: (0, a)),
            pl.BlockSpec((p, bf), lambda e, a, b: (0, b)),
            pl.BlockSpec((g,), lambda e, a, b: (0,)),
            pl.BlockSpec((g,), lambda e, a, b: (0,)),
        ],
        out_specs=pl.BlockSpec((None, bd, bf), lambda e, a, b: (e, a, b)),
        out_shape=jax.ShapeDtypeStruct((g, d, f), jnp.float32),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="grouped_matmul_weight_grad",
    )(x, dy, lo, hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _padded_gmm(x, w, tile_group, lo, hi, block, interpret):
    return gmm(x, w, tile_group, block=block, interpret=interpret)


def _padded_gmm_fwd(x, w, tile_group, lo, hi, block, interpret):
    return gmm(x, w, tile_group, block=block, interpret=interpret), (x, w, tile_group, lo, hi)


def _padded_gmm_bwd(block, interpret, residuals, dy):
    x, w, tile_group, lo, hi = residuals
    dx = gmm(dy, jnp.swapaxes(w, 1, 2), tile_group, block=block, interpret=interpret)
    dw = tgmm(x, dy, lo, hi, block=block, interpret=interpret).astype(w.dtype)  # float32 sums, w's dtype
    return dx.astype(x.dtype), dw, None, None, None


# optimize_remat: under a remat policy that keeps the output (`moe.EXPERT_MATMUL`), the backward pass
# recomputes only the residuals (the inputs), not the forward kernel; without it the whole fwd rule re-runs
_padded_gmm.defvjp(_padded_gmm_fwd, _padded_gmm_bwd, optimize_remat=True)


def grouped_matmul_padded(x, w, layout: TileLayout, *, block: int, interpret: bool = False) -> jax.Array:
    """x [P, D] rows already padded (`pad_rows`) . w [G, D, F] cast to x's dtype -> [P, F] in x's dtype;
    differentiable in x and w, w's gradient in w's dtype (the Pallas kernels of the module docstring)."""
    return _padded_gmm(x, w, layout.tile_group, layout.lo, layout.hi, block, interpret)


# the weight gradient of a ragged dot: x [R, D] and dy [R, F] contracted over their rows, group by group
_WEIGHT_GRAD_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
)


def _tgmm_tile(n: int) -> int | None:
    return n if n <= TGMM_TILES[0] else next((t for t in TGMM_TILES if n % t == 0), None)


def megablox_supported(d: int, f: int) -> bool:
    """Whether megablox's tgmm tiles the weight gradient of a [D] -> [F] grouped matmul."""
    return _tgmm_tile(d) is not None and _tgmm_tile(f) is not None


def weight_grad(x, dy, group_sizes, dtype, *, impl: str = "xla", interpret: bool = False) -> jax.Array:
    """Per group g, x[rows of g]^T . dy[rows of g]: x [R, D], dy [R, F] (rows sorted by group, rows past
    sum(group_sizes) ignored) -> [G, D, F] in `dtype`, accumulated in float32.

    impl: "xla" (`jax.lax.ragged_dot_general`, what autodiff of ragged_dot computes) or "megablox" (the TPU
    kernel `tgmm`; `interpret`: in Pallas interpret mode), which needs `megablox_supported` sizes.
    """
    if impl == "xla":
        return lax.ragged_dot_general(x, dy, group_sizes, _WEIGHT_GRAD_DIMS, preferred_element_type=dtype)
    pad = -x.shape[0] % TGMM_ROWS  # zero rows past the groups: never read as any group's
    x, dy = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(dy, ((0, pad), (0, 0)))
    tiling = (TGMM_ROWS, _tgmm_tile(x.shape[1]), _tgmm_tile(dy.shape[1]))
    return megablox_tgmm(x.T, dy, group_sizes, dtype, tiling, interpret=interpret)


def _ragged_dot_zeros_past(x, w, group_sizes) -> jax.Array:
    """lax.ragged_dot(x [R, K], w [G, K, N] in x's dtype) -> [R, N] with zeros in the rows past the groups.
    XLA:TPU's kernel, like megablox's `gmm` whose group metadata it shares, runs only the row tiles of the
    groups and leaves the other rows of its output unwritten: expert parallelism sends another device's
    assignments there, and whatever they held (NaN included) would reach the tokens' values and gradients."""
    y = lax.ragged_dot(x, w, group_sizes)
    grouped = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(grouped[:, None], y, jnp.zeros((), y.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ragged(x, w, group_sizes, grad_impl, interpret):
    return _ragged_dot_zeros_past(x, w.astype(x.dtype), group_sizes)


def _ragged_fwd(x, w, group_sizes, grad_impl, interpret):
    return _ragged(x, w, group_sizes, grad_impl, interpret), (x, w, group_sizes)


def _ragged_bwd(grad_impl, interpret, residuals, dy):
    x, w, group_sizes = residuals
    dx = _ragged_dot_zeros_past(dy, jnp.swapaxes(w, 1, 2).astype(x.dtype), group_sizes)
    dw = weight_grad(x, dy, group_sizes, w.dtype, impl=grad_impl, interpret=interpret)
    return dx, dw, None


_ragged.defvjp(_ragged_fwd, _ragged_bwd, optimize_remat=True)


def ragged_matmul(x, w, group_sizes, *, grad_impl: str = "xla", interpret: bool = False) -> jax.Array:
    """`jax.lax.ragged_dot` of x [R, D] (rows sorted by group) with w [G, D, F] cast to x's dtype -> [R, F]
    in x's dtype, zeros in the rows past sum(group_sizes), and their input gradient zero too, whatever the
    kernel leaves there (`_ragged_dot_zeros_past`); w's gradient [G, D, F] in w's dtype, accumulated in
    float32 (the module docstring) by `weight_grad` (`grad_impl`)."""
    return _ragged(x, w, group_sizes, grad_impl, interpret)


def grouped_matmul(x, w, group_sizes, *, impl: str = "ragged_dot", interpret: bool = False) -> jax.Array:
    """x [R, D] rows sorted by group, group_sizes [G] (summing to R), w [G, D, F] -> [R, F] in x's dtype,
    w's gradient in w's dtype (module docstring).

    impl: "ragged_dot" (`ragged_matmul`), "megablox" (ragged_dot, the weights' gradient by megablox's TPU
    kernel) or "pallas" (the GPU kernels, on rows padded per group); `interpret`: the Pallas kernels in
    interpret mode.
    """
    if impl in ("ragged_dot", "megablox"):
        grad_impl = "xla" if impl == "ragged_dot" else "megablox"
        return ragged_matmul(x, w, group_sizes, grad_impl=grad_impl, interpret=interpret)
    padded, layout, block = pad_rows(x, group_sizes)
    y = grouped_matmul_padded(padded, w, layout, block=block, interpret=interpret)
    return jnp.take(y, layout.dest, axis=0)
