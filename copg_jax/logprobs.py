"""Per-token and per-completion log-probs of a TokenBatch, without materialising [N, T, V] logits.

The output head runs over T in chunks inside `lax.scan`; each chunk is `jax.checkpoint`ed so the backward pass
recomputes its [N, chunk, V] logits instead of storing them. Peak logits memory is N x chunk x V float32.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from copg_jax.batch import TokenBatch, sequence_sums


def chunked_target_logprobs(model, hidden: jax.Array, targets: jax.Array, chunk_size: int) -> jax.Array:
    """log softmax(model.logits(hidden))[targets], chunk by chunk along T.

    Args:
      model: anything with `logits([..., D]) -> [..., V] float32`.
      hidden: [N, T, D] hidden states.
      targets: [N, T] int32 token ids.
      chunk_size: tokens per chunk (T is padded up to a multiple of it).
    Returns:
      [N, T] float32 log-probs.
    """
    n, t, d = hidden.shape
    chunk = min(chunk_size, t)
    pad = -t % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden = hidden.reshape(n, -1, chunk, d).swapaxes(0, 1)  # [C, N, chunk, D]
    targets = targets.reshape(n, -1, chunk).swapaxes(0, 1)

    @jax.checkpoint
    @jax.named_scope("head")
    def one(h, tgt):
        logits = model.logits(h)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    _, logps = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None, (hidden, targets))
    return logps.swapaxes(0, 1).reshape(n, -1)[:, :t]


def sequence_logprobs(
    model, tokens: TokenBatch, num_slots: int, *, chunk_size: int = 256, remat_policy: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probs of every target token and their sums per completion slot.

    Args:
      model: a `copg_jax.models.Decoder`.
      tokens: the [N, T] TokenBatch (any layout of `copg_jax.batch`).
      num_slots: B * K completion slots.
      chunk_size: sequence chunk of the output head (memory N x chunk_size x V float32).
      remat_policy: overrides the model's decoder-layer remat ("none", "full", "dots_saveable", "minimal").
    Returns:
      token_logps: [N, T] float32, 0 where target_slots < 0.
      seq_logps: [num_slots] float32 summed completion log-probs.
      seq_lengths: [num_slots] int32 completion token counts.
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
        tokens.input_ids, tokens.positions, tokens.segment_ids, tokens.prefix_ids, remat=remat_policy
    )
    valid = tokens.target_slots >= 0
    targets = jnp.where(valid, tokens.targets, 0)  # targets outside any slot may hold any value, even -1
    token_logps = jnp.where(valid, chunked_target_logprobs(model, hidden, targets, chunk_size), 0.0)
    seq_logps = sequence_sums(token_logps, tokens.target_slots, num_slots)
    seq_lengths = sequence_sums(valid.astype(jnp.int32), tokens.target_slots, num_slots)
    return token_logps, seq_logps, seq_lengths
