"""Mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): a router picks each token's top-k
experts, each a SwiGLU MLP, whose outputs are summed with the router's weights; Qwen2-MoE adds a shared expert
that every token goes through, gated by a sigmoid.

Dropless, as transformers computes it: every token reaches all k experts it picks (no capacity, no token
dropped), so a sequence's log-probs never depend on its batch mates. The expert matmuls are grouped matmuls
over the token-expert assignments sorted by expert, k / E of the FLOPs of running every expert on every token:
`jax.lax.ragged_dot` (on TPU with megablox's kernel for the weights' gradient) and the Pallas kernels of
`grouped_matmul` on GPU (`grouped_impl`).

With `Decoder(..., router_aux=True)` each layer also reports its routing (`MoE.routed`, `router_stats`), from
which `load_balancing_loss` is transformers' auxiliary loss.

On a mesh the assignments are sorted per device shard (rows over the batch axes), and the expert weights
are gathered over the fsdp axis, as every kernel is. Each device runs tokens through its experts' slice of the
expert width (the tensor axis), and the down projection's partial sums are added over the tensor axis.

Expert parallelism (a mesh `expert` axis of size n > 1, which must divide the E experts): each device holds
E / n whole experts. The tokens of the n devices along the axis (their hidden states, experts and weights) are
all-gathered; each device runs, of all those assignments, only its own experts' ones (the others are sorted
past the groups, where the grouped matmuls give zeros without computing), and `psum_scatter` returns each
token's sum over the n devices to its own. So activations travel instead of the expert weights (most of a
large mixture's parameters), and it stays dropless: nothing depends on how the tokens happen to route. As a
device may get up to n times its own rows' assignments, it takes the n devices' tokens one device's at a
time (`lax.map`), each such chunk rematerialised: buffers for one device's rows instead of n devices', for
one more forward pass of the expert matmuls in the backward pass (benchmarks/expert_parallel.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from copg_jax.models.attention import target_platform
from copg_jax.models.config import ModelConfig
from copg_jax.models.grouped_matmul import (
    grouped_matmul,
    grouped_matmul_padded,
    megablox_supported,
    pad_rows,
    supported,
)
from copg_jax.models.layers import ACTIVATIONS, MLP, Dense, param
from copg_jax.models.lora import LoRASpec
from copg_jax.sharding import constrain, divisible_spec, logical_to_spec

MLP_SITES = ("mlp.gate", "mlp.up", "mlp.down", "mlp.gate_up")
# the expert matmuls' outputs: the remat policies that keep weight matmuls (`decoder.REMAT_POLICIES`) keep
# these by name, as grouped matmuls (ragged_dot, the Pallas kernels) are no dot_general for dot policies
EXPERT_MATMUL = "expert_matmul"


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing of router logits [..., E] -> (weights [..., k] float32, experts [..., k] int32, probs
    [..., E] float32): the k largest softmax probabilities (in float32) and their experts, the weights
    renormalised to sum 1 with `normalize`, and all the probabilities (for `router_stats`)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def expert_mlps(
    x, experts, weights, gate, up, down, activation: str, impl: str = "ragged_dot", interpret: bool = False
) -> jax.Array:
    """sum_j weights[m, j] * expert_{experts[m, j]}(x[m]) for SwiGLU experts down_e(act(gate_e x) * up_e x).

    Args:
      x: [M, D] tokens in the compute dtype.
      experts: [M, k] int32 expert of each assignment (E: none, as for another device's experts: it adds 0);
        weights: [M, k] its weight, in x's dtype.
      gate, up: [E, D, F]; down: [E, F, D] (F: the whole expert width, or this device's slice of it).
      impl: the grouped matmul, "ragged_dot", "megablox" or "pallas" (`grouped_matmul`; `interpret`: its
        Pallas kernels in interpret mode).
    Returns:
      [M, D] (with a slice of F: this slice's share, to be summed over the slices).
    """
    m, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # [M k, D]: each assignment's token
    dtype = x.dtype
    if impl in ("ragged_dot", "megablox"):
        matmul = functools.partial(grouped_matmul, group_sizes=sizes, impl=impl, interpret=interpret)
        back = jnp.argsort(order)  # sorted row of each assignment
    else:  # every expert's rows at a multiple of the kernels' row tile, zero rows between
        xs, layout, block = pad_rows(xs, sizes)
        matmul = functools.partial(grouped_matmul_padded, layout=layout, block=block, interpret=interpret)
        back = layout.dest[jnp.argsort(order)]  # padded row of each assignment

    def named(a, w):  # w in its own dtype: its gradient is summed in it (`grouped_matmul`)
        return checkpoint_name(matmul(a, w), EXPERT_MATMUL)

    h = ACTIVATIONS[activation](named(xs, gate)) * named(xs, up)
    y = named(h, down)  # [rows, D] in expert order
    y = jnp.take(y, back, axis=0).reshape(m, k, -1)  # back to token order
    return jnp.einsum("mkd,mk->md", y, weights.astype(dtype))


GROUPED_IMPLS = ("auto", "ragged_dot", "megablox", "pallas")


def _known(name: str) -> str:
    if name not in GROUPED_IMPLS:
        raise ValueError(f"unknown grouped matmul {name!r}; choose one of {GROUPED_IMPLS}")
    return name


def grouped_impl(name: str, d: int, f: int) -> str:
    """The grouped matmul `name` stands for with [D] -> [F] experts on the platform being traced for: "auto"
    is the Pallas kernels on GPU (XLA:GPU would run ragged_dot as one dense matmul over every expert) and
    megablox on TPU (XLA:TPU would compute the weights' gradient over every expert), when they tile the
    sizes, else ragged_dot (on CPU the reference)."""
    _known(name)
    platform = target_platform()
    if name == "auto":
        if platform == "gpu" and supported(d, f):
            return "pallas"
        return "megablox" if platform == "tpu" and megablox_supported(d, f) else "ragged_dot"
    kernel_platform = {"pallas": "gpu", "megablox": "tpu"}.get(name)
    if kernel_platform is not None and platform not in (kernel_platform, "cpu"):  # CPU: interpret mode
        raise ValueError(
            f"grouped matmul {name!r} is a {kernel_platform.upper()} kernel, and this step is traced for "
            f"{platform}: choose auto or ragged_dot"
        )
    if name == "pallas" and not supported(d, f):
        raise ValueError(f"the Pallas grouped matmul does not tile experts of {d} -> {f} features")
    if name == "megablox" and not megablox_supported(d, f):
        raise ValueError(f"megablox's tgmm does not tile experts of {d} -> {f} features")
    return name


def _local_experts(experts, weights, first: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """The assignments (experts [M, k] int32, weights [M, k]) as seen by a device holding experts [first,
    first + count): local expert ids, with `count` (past every group: the grouped matmuls give such rows
    zeros) and weight 0 for the assignments of other devices' experts."""
    local = experts - first
    here = (local >= 0) & (local < count)
    return jnp.where(here, local, count), jnp.where(here, weights, jnp.zeros_like(weights))


def _sharded_expert_mlps(x, experts, weights, gate, up, down, activation: str, grouped: str) -> jax.Array:
    """`expert_mlps` of [N, T, ...] rows, per device shard on a mesh (see the module docstring), with the
    grouped matmul `grouped` names (`grouped_impl`; the Pallas kernels in interpret mode on CPU)."""
    interpret = target_platform() == "cpu"
    e, d, f = gate.shape
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        impl = grouped_impl(grouped, d, f)
        y = expert_mlps(*_flat(x, experts, weights), gate, up, down, activation, impl, interpret)
        return y.reshape(x.shape)
    # rows that do not split evenly over the batch axes: every device routes all of them
    rows = divisible_spec(logical_to_spec(("batch",)), x.shape[:1], mesh)[0]
    row_axes = (rows,) if isinstance(rows, str) else tuple(rows or ())
    # the weights' experts stay split over the expert axis (`hub.param_shardings`) and their expert width over
    # the tensor axis; their width is gathered over fsdp
    held, _, axis = divisible_spec(logical_to_spec(("experts", "embed", "mlp")), (e, d, f), mesh)
    ep = held if held is not None and mesh.shape[held] > 1 else None
    # (`train.run_mesh` refuses an expert axis that does not divide the experts)
    impl = grouped_impl(grouped, d, f // (mesh.shape[axis] if axis else 1))
    tokens = P(rows, None, None)

    def run(x, experts, weights, gate, up, down):
        """The experts held here on tokens [M, ...]: those of all (with `ep`) -> [M, D] partial sums."""
        if ep is not None:
            first = jax.lax.axis_index(ep) * gate.shape[0]
            experts, weights = _local_experts(experts, weights, first, gate.shape[0])
        return expert_mlps(x, experts, weights, gate, up, down, activation, impl, interpret)

    def body(x, experts, weights, gate, up, down):
        flat = _flat(x, experts, weights)
        if ep is not None and ep in row_axes:
            # the tokens of the n devices along the expert axis [n, M, ...], through the experts held here
            # one device's tokens at a time, each recomputed in the backward pass: buffers for M rows, not n M
            gathered = [jax.lax.all_gather(a, ep, axis=0) for a in flat]
            chunk = jax.checkpoint(lambda c, gate, up, down: run(*c, gate, up, down))
            y = jax.lax.map(lambda c: chunk(c, gate, up, down), gathered)
            # each token's sum over the devices' experts, back on its own device
            y = jax.lax.psum_scatter(y, ep, scatter_dimension=0)
        else:
            y = run(*flat, gate, up, down)
            y = y if ep is None else jax.lax.psum(y, ep)
        if axis is not None:  # the down projection's partial sums over the slices of the expert width
            y = jax.lax.psum(y, axis)
        return y.reshape(x.shape)

    return jax.shard_map(
        body,
        in_specs=(tokens, tokens, tokens, P(held, None, axis), P(held, None, axis), P(held, axis, None)),
        out_specs=tokens,
        check_vma=False,
    )(x, experts, weights, gate, up, down)


def _flat(x, experts, weights) -> list[jax.Array]:
    """[N, T, ...] tokens, experts and weights -> [N T, ...] each."""
    return [a.reshape(-1, a.shape[-1]) for a in (x, experts, weights)]


class RouterStats(NamedTuple):
    """What the router's load-balancing loss needs of a layer's routing, summed over the tokens counted.

    Attributes:
      assigned: [E] float32 top-k picks of each expert.
      probs: [E] float32 router probabilities of each expert.
      tokens: [] float32 tokens counted.
    """

    assigned: jax.Array
    probs: jax.Array
    tokens: jax.Array


def router_stats(probs: jax.Array, experts: jax.Array, counted: jax.Array) -> RouterStats:
    """The `RouterStats` of a layer's routing (`route`: probs [N, T, E], experts [N, T, k]) over the tokens
    `counted` [N, T] marks (bool, or float weights: `batch.sequences_per_token`)."""
    weight = counted.astype(jnp.float32)
    picks = jax.nn.one_hot(experts, probs.shape[-1], dtype=jnp.float32).sum(axis=-2)  # [N, T, E]
    assigned, summed = jnp.einsum("nte,nt->e", picks, weight), jnp.einsum("nte,nt->e", probs, weight)
    return RouterStats(assigned, summed, weight.sum())


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """transformers' `load_balancing_loss_func` (the Switch Transformer's auxiliary loss) from `stats` summed
    over the layers: E x sum_e f_e P_e, with f_e the picks of expert e per counted token (transformers'
    tokens_per_expert summed over the k slots) and P_e its mean router probability, both over every layer's
    counted tokens (transformers' attention mask) together."""
    count = jnp.maximum(stats.tokens, 1.0)
    return stats.assigned.shape[0] * jnp.sum((stats.assigned / count) * (stats.probs / count))


class MoE(nnx.Module):
    """Routed SwiGLU experts (+ Qwen2-MoE's gated shared expert) in place of a layer's MLP.

    Parameters: `router` [D, E] (HF's `gate`), `w_gate`, `w_up` [E, D, F] and `w_down` [E, F, D] (F the
    expert width), `shared` (an MLP of width `shared_expert_size`) and `shared_gate` [D, 1].
    LoRA adapts attention only: an MLP site on a mixture of experts is a ValueError. `grouped`: the grouped
    matmul of the experts (`GROUPED_IMPLS`, `grouped_impl`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
        lora: LoRASpec | None = None,
        grouped: str = "auto",
    ):
        self.grouped = _known(grouped)  # the platform's choice is made where traced (`grouped_impl`)
        if lora is not None and (sites := [s for s in MLP_SITES if lora.on(s)]):
            raise ValueError(
                f"{cfg.model_type}: LoRA on the experts of a mixture of experts is not supported (sites "
                f"{sites}); adapt the attention projections (q_proj, k_proj, v_proj, o_proj)"
            )
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.router = Dense((d,), (e,), ("embed", "experts"), bias=False, **kw)

        def init(shape):
            return jax.random.normal(rngs.params(), shape, param_dtype) * 0.02

        self.w_gate = param(init((e, d, f)), ("experts", "embed", "mlp"))
        self.w_up = param(init((e, d, f)), ("experts", "embed", "mlp"))
        self.w_down = param(init((e, f, d)), ("experts", "mlp", "embed"))
        shared = cfg.shared_expert_size
        self.shared = MLP(cfg, size=shared, **kw) if shared else None
        self.shared_gate = Dense((d,), (1,), ("embed", None), bias=False, **kw) if shared else None
        self.k, self.normalize, self.activation = cfg.experts_per_token, cfg.norm_topk_prob, cfg.activation

    @jax.named_scope("mlp")
    def routed(self, x: jax.Array, counted: jax.Array | None) -> tuple[jax.Array, RouterStats | None]:
        """x [N, T, D] -> ([N, T, D], the `router_stats` of this routing over the tokens `counted` [N, T]
        weighs; None when `counted` is None)."""
        x = x.astype(self.router.dtype)
        weights, experts, probs = route(self.router(x), self.k, self.normalize)
        params = (self.w_gate[...], self.w_up[...], self.w_down[...])
        y = _sharded_expert_mlps(x, experts, weights.astype(x.dtype), *params, self.activation, self.grouped)
        if self.shared is not None:
            y = y + jax.nn.sigmoid(self.shared_gate(x)) * self.shared(x)
        stats = None if counted is None else router_stats(probs, experts, counted)
        return constrain(y, ("batch", "length", "act_embed")), stats

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """[N, T, D] -> [N, T, D] (`dropout_key`: unused, as for an MLP without LoRA)."""
        return self.routed(x, None)[0]
