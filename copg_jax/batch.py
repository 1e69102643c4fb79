"""The token layout every part of copg_jax agrees on: how B prompts x K completions sit in N rows of T tokens.

One layout serves padding (a row per prompt+completion), packing (several sequences per row) and the
shared-prefix layout (a prompt once, followed by its K completions, in one row):

* `segment_ids[n, t]` names the sequence token t belongs to inside row n (0 = padding). Tokens attend
  causally (by column order) to earlier tokens of the same segment.
* `prefix_ids[n, t]` names one more segment that token t may also attend to: the shared prompt of a completion
  segment in the shared-prefix layout (0 = none). Prefix segments always precede the segments that use them.
* `positions[n, t]` are the rotary/learned position ids, restarting per sequence (a completion in the
  shared-prefix layout continues from its prompt's length).
* `targets[n, t]` is the token predicted by the hidden state at (n, t); `target_slots[n, t]` is the flat
  completion index b*K + k whose log-likelihood that prediction belongs to, or -1 when it belongs to none
  (prompt tokens, padding).
* Shared-prefix layout: the prompt segment holds prompt[:-1] (positions 0..P-2) and each completion
  segment starts with its own copy of the last prompt token (position P-1) followed by the completion
  (positions P...), with `prefix_ids` naming the prompt segment. Every completion token is thus predicted
  from inside its own segment, and no key is seen twice, so the log-probs equal those of the padded layout.

Summing token log-probs by `target_slots` then gives the [B, K] sequence log-probs the losses consume,
whatever the layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TokenBatch:
    """Tokens of a batch, laid out in N rows of T tokens (see the module docstring).

    Attributes:
      input_ids: [N, T] int32 token ids.
      positions: [N, T] int32 position ids.
      segment_ids: [N, T] int32, 0 = padding.
      prefix_ids: [N, T] int32, 0 = no shared prefix.
      targets: [N, T] int32 next-token targets (any value where `target_slots` is -1).
      target_slots: [N, T] int32 flat completion index b*K + k, or -1.
    """

    input_ids: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    prefix_ids: jax.Array
    targets: jax.Array
    target_slots: jax.Array


@struct.dataclass
class ScoredBatch:
    """A training batch: B prompts with up to K completions each, rewards and cached reference log-probs.

    Attributes:
      tokens: the TokenBatch holding every completion of this batch.
      rewards: [B, K] float32 sequence-level rewards.
      completion_mask: [B, K] bool, True where completion k of prompt b exists.
      ref_logps: [B, K] float32 summed reference log-probs of each completion (ignored where masked).
      completion_lengths: [B, K] int32 completion token counts (0 where masked).
    """

    tokens: TokenBatch
    rewards: jax.Array
    completion_mask: jax.Array
    ref_logps: jax.Array
    completion_lengths: jax.Array


REWARD_MAX = 1e12
"""The largest reward magnitude. Rewards train in float32 (`ScoredBatch.rewards`): CoPG's loss squares reward
differences, and the gradient's global norm sums the squares of gradients that scale with them, so rewards of
1e20 (still finite in float32) stopped the first update as a non-finite loss blamed on its batch, and past
about 1e15 a large model's gradient norm overflows. No score means anything at 1e12: rescale it."""
REWARD_RANGE = (
    "is beyond ±1e12: CoPG squares reward differences in float32, which overflow; rescale the rewards"
)

PER_PROMPT_FIELDS = ("rewards", "completion_mask", "ref_logps", "completion_lengths")
"""The ScoredBatch fields shaped [B, K] (per prompt and completion slot), as opposed to its token rows."""


def attention_mask(segment_ids: jax.Array, prefix_ids: jax.Array) -> jax.Array:
    """Boolean attention mask of the layout.

    Query q may attend to key k iff k is at or before q in the row, k is not padding, and k's segment is q's
    segment or q's prefix. Padding queries attend to themselves only, so no softmax row is empty.

    Args:
      segment_ids: [N, T] int32.
      prefix_ids: [N, T] int32.
    Returns:
      [N, 1, T, T] bool (broadcasts over heads), indexed [row, head, query, key].
    """
    t = segment_ids.shape[-1]
    idx = jnp.arange(t)
    causal = idx[None, :] <= idx[:, None]  # [Tq, Tk]
    q_seg = segment_ids[:, :, None]
    q_prefix = prefix_ids[:, :, None]
    k_seg = segment_ids[:, None, :]
    same = (k_seg == q_seg) | ((k_seg == q_prefix) & (q_prefix != 0))
    allowed = causal[None] & same & (k_seg != 0)
    allowed = allowed | jnp.eye(t, dtype=bool)[None]
    return allowed[:, None, :, :]


def sequence_sums(token_values: jax.Array, target_slots: jax.Array, num_slots: int) -> jax.Array:
    """Sums per-token values into their completion slots.

    Args:
      token_values: [N, T] float, e.g. token log-probs.
      target_slots: [N, T] int32 slot per token, -1 for none.
      num_slots: B*K.
    Returns:
      [num_slots] float sums (0 for slots without tokens).
    """
    valid = target_slots >= 0
    slots = jnp.where(valid, target_slots, num_slots)  # out-of-range bucket dropped below
    sums = jax.ops.segment_sum(jnp.where(valid, token_values, 0).ravel(), slots.ravel(), num_slots + 1)
    return sums[:num_slots]


def last_token_index(target_slots: jax.Array, num_slots: int) -> jax.Array:
    """The flat index n * T + t of each completion slot's last token (a sequence-level head reads it).

    The hidden state at (n, t) predicts the token at (n, t + 1) of the same sequence, so a completion's last
    token sits one column after its last target slot, in every layout.

    Args:
      target_slots: [N, T] int32 slot per token, -1 for none.
      num_slots: B*K.
    Returns:
      [num_slots] int32 indices into the [N * T] flattened row-major tokens (0 for slots without tokens).
    """
    n, t = target_slots.shape
    valid = target_slots >= 0
    following = jnp.arange(n * t, dtype=jnp.int32).reshape(n, t) + 1
    slots = jnp.where(valid, target_slots, num_slots)
    last = jax.ops.segment_max(jnp.where(valid, following, 0).ravel(), slots.ravel(), num_slots + 1)
    return jnp.maximum(last[:num_slots], 0)


def attention_context(segment_ids: jax.Array, prefix_ids: jax.Array) -> jax.Array:
    """[..., T] int32: the keys each token's attention is counted over in model FLOPs, its whole segment plus
    its shared prefix (the convention of `ModelConfig.flops_per_token`, T for a row of one sequence); 0 at
    padding. Row by row, O(T) (a segment's size by a scatter-add of its ids); numpy or jax in, jax out.

    Args:
      segment_ids: [..., T] int segment ids (0 = padding).
      prefix_ids: [..., T] int prefix segment ids (0 = none).
    """
    shape, t = segment_ids.shape, segment_ids.shape[-1]
    seg = jnp.asarray(segment_ids, jnp.int32).reshape(-1, t)
    pre = jnp.asarray(prefix_ids, jnp.int32).reshape(-1, t)
    sizes = jax.vmap(lambda s: jnp.zeros(t + 1, jnp.int32).at[s].add(1, mode="drop"))(seg)
    own = jnp.take_along_axis(sizes, jnp.clip(seg, 0, t), axis=1)
    prefix = jnp.where(pre > 0, jnp.take_along_axis(sizes, jnp.clip(pre, 0, t), axis=1), 0)
    return jnp.where(seg > 0, own + prefix, 0).reshape(shape)


def sequences_per_token(segment_ids: jax.Array, prefix_ids: jax.Array) -> jax.Array:
    """[N, T] float32: the sequences each token is part of -- 1 for a token of its own segment, K for a token
    of a prefix segment K completion segments share (the shared-prefix layout's prompt, which the padded
    and packed layouts hold once per completion), 0 at padding. Per-token statistics weighted by it (a
    mixture of experts' load-balancing loss) are the same in every layout. Row by row, O(T).

    Args:
      segment_ids, prefix_ids: [N, T] int segment ids (0 = padding) and prefix segment ids (0 = none).
    """
    t = segment_ids.shape[-1]
    first = jnp.concatenate(  # each segment's first token (a row's segments are contiguous)
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    starts = (first & (prefix_ids != 0)).astype(jnp.float32)

    def row(starts, prefix, segment):
        sharing = jnp.zeros(t + 1, jnp.float32).at[jnp.clip(prefix, 0, t)].add(starts, mode="drop")
        return jnp.where(segment != 0, jnp.maximum(sharing[jnp.clip(segment, 0, t)], 1.0), 0.0)

    return jax.vmap(row)(starts, prefix_ids, segment_ids)
