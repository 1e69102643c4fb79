"""Per-token and per-completion log-probs of a TokenBatch, without materialising [N, T, V] logits.

The output head and its log-softmax run only where a target is wanted: each row's target positions are moved
to its front (a stable per-row permutation, so rows never mix and a data-parallel split stays local), the head
runs over T in chunks inside `lax.scan`, and chunks past the longest row's count of targets are skipped by
`lax.cond`, in the forward and the backward pass. Prompt tokens and padding (a quarter or more of a typical
batch) thus cost no head FLOPs beyond the last partial chunk. Peak logits memory is N x chunk x V float32.

The head has its own VJP (`_head_logprobs`): the backward pass needs softmax probabilities, which it either
keeps from the forward pass (N x T x V float32 held until the backward) or recomputes from the hidden states
(one more head matmul), as `head_remat` chooses. The kernel comes in the parameters' dtype and is cast to the
hidden states' (compute) dtype inside: its gradient accumulates in float32 across chunks and is returned in
the parameters' dtype, not rounded to the compute dtype on the way (`copg_jax.models.mixed`).
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp

from copg_jax.batch import TokenBatch, sequence_sums
from copg_jax.models.attention import cap_logits

HEAD_REMAT = ("auto", "none", "full")
KEEP_LOGITS_BYTES = 2**30  # head_remat="auto" keeps a call's probabilities up to this size, else recomputes
MIN_CHUNKS = 4  # T is cut into at least this many chunks: the granularity of skipping target-free tails


def head_chunk(length: int, chunk_size: int | None) -> int:
    """Positions per head chunk: `chunk_size`, or by default min(256, ceil(T / MIN_CHUNKS)), at most T."""
    chunk = chunk_size or min(256, math.ceil(length / MIN_CHUNKS))
    return max(1, min(chunk, length))


def keeps_logits(head_remat: str, num_logits: int) -> bool:
    """Whether the backward pass reuses the head's forward softmax (`num_logits` float32 values) or recomputes
    it: "none" keeps, "full" recomputes, "auto" keeps up to KEEP_LOGITS_BYTES."""
    if head_remat not in HEAD_REMAT:
        raise ValueError(f"unknown head_remat {head_remat!r}; choose one of {HEAD_REMAT}")
    return head_remat == "none" or (head_remat == "auto" and 4 * num_logits <= KEEP_LOGITS_BYTES)


@jax.custom_vjp
def _permute(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[n, order[n, t]] for x [N, T, ...]; the gradient gathers by `inverse` (no scatter)."""
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def _permute_fwd(x, order, inverse):
    return _permute(x, order, inverse), (order, inverse)


def _permute_bwd(residuals, grad):
    order, inverse = residuals
    return _permute(grad, inverse, order), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _logits(h: jax.Array, kernel: jax.Array, cap: float | None) -> jax.Array:
    """[M, V] float32 logits of [M, D] hidden states, soft-capped by `cap` (None: not capped)."""
    return cap_logits(jnp.dot(h, kernel, preferred_element_type=jnp.float32), cap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_logprobs(kernel, hidden, targets, active, keep: bool, cap: float | None) -> jax.Array:
    """[C, M] log softmax(hidden @ kernel)[targets] per chunk, 0 in chunks that are not `active`.

    Args:
      kernel: [D, V] output head in the parameters' dtype (cast to hidden's dtype for the matmuls; its
        gradient, summed in float32, is returned in its own dtype).
      hidden: [C, M, D] C chunks of M hidden states.
      targets: [C, M] int32 token ids.
      active: [C] bool, chunks to compute (the others are skipped, forward and backward).
      keep: hold the [C, M, V] float32 softmax (with a cap: the capped logits) for the backward pass instead
        of recomputing it there.
      cap: the logits' soft cap, cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping), or None.
    """
    return _head_fwd(kernel, hidden, targets, active, False, cap)[0]  # no backward pass: nothing to keep


def _head_fwd(kernel, hidden, targets, active, keep, cap):
    m = hidden.shape[1]
    weights = kernel.astype(hidden.dtype)  # once, outside the chunk loop

    def run(h, tgt):
        logits = _logits(h, weights, cap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
        kept = jnp.zeros((m, 0), jnp.float32)
        if keep:
            kept = logits if cap is not None else jnp.exp(logits - lse[:, None])
        return picked - lse, lse, kept

    def skip(h, tgt):  # run's zeros, of its dtypes (float32 under jax_enable_x64 too)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, h, tgt))

    def step(carry, xs):
        h, tgt, on = xs
        return carry, jax.lax.cond(on, run, skip, h, tgt)

    _, (logps, lse, kept) = jax.lax.scan(step, None, (hidden, targets, active))
    return logps, (kernel, hidden, targets, active, lse, kept)


def _head_bwd(keep, cap, residuals, grad):
    kernel, hidden, targets, active, lse, kept = residuals
    v = kernel.shape[1]
    weights = kernel.astype(hidden.dtype)

    def run(dkernel, h, tgt, lse, kept, g):
        logits = kept if keep else _logits(h, weights, cap)
        probs = kept if keep and cap is None else jnp.exp(logits - lse[:, None])
        dlogits = g[:, None] * (jax.nn.one_hot(tgt, v, dtype=jnp.float32) - probs)
        if cap is not None:  # d(cap tanh(z / cap)) / dz = 1 - tanh^2
            dlogits = dlogits * (1 - jnp.square(logits / cap))
        dlogits = dlogits.astype(h.dtype)
        dh = jnp.dot(dlogits, weights.T, preferred_element_type=jnp.float32).astype(h.dtype)
        return dkernel + jnp.dot(h.T, dlogits, preferred_element_type=jnp.float32), dh

    def skip(dkernel, h, *_):
        return dkernel, jnp.zeros_like(h)

    def step(dkernel, xs):
        on, *rest = xs
        return jax.lax.cond(on, run, skip, dkernel, *rest)

    dkernel = jnp.zeros(kernel.shape, jnp.float32)
    dkernel, dhidden = jax.lax.scan(step, dkernel, (active, hidden, targets, lse, kept, grad))
    return dkernel.astype(kernel.dtype), dhidden, None, None  # float32 sums: no rounding for float32 kernels


_head_logprobs.defvjp(_head_fwd, _head_bwd)


@jax.named_scope("head")
def chunked_target_logprobs(
    model,
    hidden: jax.Array,
    targets: jax.Array,
    valid: jax.Array,
    *,
    chunk_size: int | None = None,
    head_remat: str = "auto",
) -> jax.Array:
    """log softmax(model.logits(hidden))[targets] where `valid`, 0 elsewhere, chunk by chunk along T.

    Args:
      model: a `copg_jax.models.Decoder` (its `head_kernel()`, [D, V] in the parameters' dtype).
      hidden: [N, T, D] hidden states.
      targets: [N, T] int32 token ids (any value in [0, V) where not valid).
      valid: [N, T] bool, the positions whose log-prob is wanted; the others may be skipped.
      chunk_size: positions per chunk (default `head_chunk`); T is padded up to a multiple of it.
      head_remat: "auto" | "none" | "full", see `keeps_logits`.
    Returns:
      [N, T] float32 log-probs, 0 where not valid.
    """
    n, t, d = hidden.shape
    chunk = head_chunk(t, chunk_size)
    order = jnp.argsort(~valid, axis=1, stable=True)  # each row's targets first, in their order
    inverse = jnp.argsort(order, axis=1)
    hidden, targets = _permute(hidden, order, inverse), jnp.take_along_axis(targets, order, axis=1)
    pad = -t % chunk
    num_chunks = (t + pad) // chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(n, num_chunks, chunk, d).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(n, num_chunks, chunk).swapaxes(0, 1)
    active = jnp.arange(num_chunks) * chunk < jnp.max(jnp.sum(valid, axis=1))
    kernel = model.head_kernel()
    keep = keeps_logits(head_remat, n * (t + pad) * kernel.shape[1])
    logps = _head_logprobs(
        kernel,
        hidden.reshape(num_chunks, n * chunk, d),
        targets.reshape(num_chunks, -1),
        active,
        keep,
        model.config.final_softcap,
    )
    logps = logps.reshape(num_chunks, n, chunk).swapaxes(0, 1).reshape(n, -1)[:, :t]
    return jnp.where(valid, jnp.take_along_axis(logps, inverse, axis=1), 0.0)


def sequence_logprobs(
    model,
    tokens: TokenBatch,
    num_slots: int,
    *,
    chunk_size: int | None = None,
    remat_policy: str | None = None,
    head_remat: str = "auto",
    dropout_key: jax.Array | None = None,
    layout: str = "any",
    router_aux: bool = False,
) -> tuple[jax.Array, ...]:
    """Log-probs of every target token and their sums per completion slot.

    Args:
      model: a `copg_jax.models.Decoder`.
      tokens: the [N, T] TokenBatch (any layout of `copg_jax.batch`).
      num_slots: B * K completion slots.
      chunk_size: positions per output-head chunk (memory N x chunk_size x V float32; default `head_chunk`).
      remat_policy: overrides the model's decoder-layer remat ("none", "full", "dots_saveable", "minimal").
      head_remat: the output head's logits in the backward pass: "none" keeps them, "full" recomputes them,
        "auto" keeps them when they take at most `KEEP_LOGITS_BYTES`.
      dropout_key: randomness of the model's LoRA dropout (training); None = no dropout.
      layout: the layout that built every row of `tokens` ("padded" | "packed" | "shared_prefix"), when known:
        attention kernels serving only some layouts are then picked statically; "any": by the ids at run time.
      router_aux: also return a mixture of experts' load-balancing loss over the rows' tokens (the model's).
    Returns:
      token_logps: [N, T] float32, 0 where target_slots < 0.
      seq_logps: [num_slots] float32 summed completion log-probs.
      seq_lengths: [num_slots] int32 completion token counts.
      (with `router_aux`) the load-balancing loss, [] float32.
    """
    chex.assert_rank(tokens.input_ids, 2)
    chex.assert_equal_shape(
        [
            tokens.input_ids,
            tokens.positions,
            tokens.segment_ids,
            tokens.prefix_ids,
            tokens.targets,
            tokens.target_slots,
        ]
    )
    hidden = model(
        tokens.input_ids,
        tokens.positions,
        tokens.segment_ids,
        tokens.prefix_ids,
        remat=remat_policy,
        dropout_key=dropout_key,
        layout=layout,
        **({"router_aux": True} if router_aux else {}),
    )
    hidden, aux = hidden if router_aux else (hidden, None)
    valid = tokens.target_slots >= 0
    targets = jnp.where(valid, tokens.targets, 0)  # targets outside any slot may hold any value, even -1
    token_logps = chunked_target_logprobs(
        model, hidden, targets, valid, chunk_size=chunk_size, head_remat=head_remat
    )
    seq_logps = sequence_sums(token_logps, tokens.target_slots, num_slots)
    seq_lengths = sequence_sums(valid.astype(jnp.int32), tokens.target_slots, num_slots)
    return (token_logps, seq_logps, seq_lengths) + ((aux,) if router_aux else ())
