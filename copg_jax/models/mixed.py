"""Parameter gradients in the parameters' dtype when a model computes in a narrower one.

A bfloat16-compute model with float32 parameters casts each parameter to bfloat16 where it is used. Left to
autodiff, a kernel's gradient x^T g then leaves its matmul in bfloat16 and is cast to float32 only after: on a
mesh, where the rows of x and g are split over the batch axes, XLA's partitioner sums the devices' partial
gradients (the reduce-scatter of FSDP, the all-reduce of data parallelism) at the matmul's output, in
bfloat16, rounding at every step of the ring. Bias and norm-scale gradients (sums over the tokens) likewise.
The ops here compute the forward pass exactly as the plain ones, and their custom VJPs give each parameter's
gradient in the parameter's dtype straight from the matmul (float32 accumulation, `preferred_element_type`)
or reduction, so that the cross-device sums are float32 ones (as PyTorch FSDP's `reduce_dtype=float32`).
The activations' gradients stay in the compute dtype. With the parameters in the compute dtype the plain ops
run: nothing changes for float32 models. An embedding lookup (`take`) likewise reads the table in the compute
dtype (on a mesh, gathering the table's bfloat16 rows) and scatter-adds its gradient in float32.

`jax.checkpoint` policies cannot see the dot inside a custom VJP: `matmul` names its output `PARAM_MATMUL`
(`jax.ad_checkpoint.checkpoint_name`), which the remat policies that keep weight matmuls keep by name
(`copg_jax.models.decoder.REMAT_POLICIES`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

PARAM_MATMUL = "param_matmul"


def _mixed(param: jax.Array, compute_dtype) -> bool:
    return jnp.dtype(param.dtype) != jnp.dtype(compute_dtype)


def _lead_sum(g: jax.Array, param: jax.Array) -> jax.Array:
    """g [..., *param.shape] summed over its leading axes, in the parameter's dtype."""
    return jnp.sum(g.astype(param.dtype), axis=tuple(range(g.ndim - param.ndim)))


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return x @ kernel.astype(x.dtype)


def _matmul_fwd(x, kernel):
    return _matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, g):
    x, kernel = residuals
    dx = g @ kernel.astype(x.dtype).T
    return dx, jnp.matmul(x.T, g, preferred_element_type=kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [M, K] (compute dtype) @ kernel [K, N] (a parameter) cast to x's dtype -> [M, N] in x's dtype; the
    kernel's gradient in its own dtype (module docstring)."""
    if not _mixed(kernel, x.dtype):
        return x @ kernel
    return checkpoint_name(_matmul(x, kernel), PARAM_MATMUL)


@jax.custom_vjp
def _scale(x: jax.Array, weight: jax.Array) -> jax.Array:
    return x * weight.astype(x.dtype)


def _scale_fwd(x, weight):
    return _scale(x, weight), (x, weight)


def _scale_bwd(residuals, g):
    x, weight = residuals
    return g * weight.astype(x.dtype), _lead_sum(g.astype(weight.dtype) * x.astype(weight.dtype), weight)


_scale.defvjp(_scale_fwd, _scale_bwd)


def scale(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x [..., *W] (compute dtype) times weight [*W] (a parameter: a norm's scale) cast to x's dtype; the
    weight's gradient, a sum over x's leading axes, in its own dtype."""
    return x * weight if not _mixed(weight, x.dtype) else _scale(x, weight)


@jax.custom_vjp
def _shift(x: jax.Array, bias: jax.Array) -> jax.Array:
    return x + bias.astype(x.dtype)


def _shift_fwd(x, bias):
    return _shift(x, bias), bias


def _shift_bwd(bias, g):
    return g, _lead_sum(g, bias)


_shift.defvjp(_shift_fwd, _shift_bwd)


def shift(x: jax.Array, bias: jax.Array) -> jax.Array:
    """x [..., *B] (compute dtype) plus bias [*B] (a parameter) cast to x's dtype; the bias's gradient, a sum
    over x's leading axes, in its own dtype."""
    return x + bias if not _mixed(bias, x.dtype) else _shift(x, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _take(table: jax.Array, ids: jax.Array, dtype, layout) -> jax.Array:
    return jnp.take(layout(table.astype(dtype)), ids, axis=0)


def _take_fwd(table, ids, dtype, layout):
    return _take(table, ids, dtype, layout), (table, ids)


def _take_bwd(dtype, layout, residuals, g):
    table, ids = residuals
    return layout(jnp.zeros_like(table)).at[ids].add(g.astype(table.dtype)), None


_take.defvjp(_take_fwd, _take_bwd)


def take(
    table: jax.Array, ids: jax.Array, dtype, layout: Callable[[jax.Array], jax.Array] = lambda t: t
) -> jax.Array:
    """Rows `ids` [...] (int) of `table` [V, D] (a parameter: an embedding) -> [..., D] in `dtype`. `layout`
    is applied to the table once it is in `dtype` (a sharding constraint: on a mesh the table is gathered in
    the compute dtype); the table's gradient, a scatter-add of the rows' gradients, is in its own dtype
    (module docstring)."""
    if not _mixed(table, dtype):
        return jnp.take(layout(table), ids, axis=0)
    return _take(table, ids, dtype, layout)
