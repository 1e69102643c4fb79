"""Token layouts: hand-checked arrays, invariants on random batches, and equal log-probs through a model."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from copg_jax.batch import attention_context, sequence_sums
from copg_jax.data.layout import (
    bucket_length,
    first_fit,
    item_lengths,
    layout_tokens,
    packed_layout,
    padded_layout,
    round_rows,
    rows_needed,
    shared_prefix_layout,
    verify_layout,
)
from copg_jax.data.pipeline import DataIterator

LAYOUTS = ["padded", "packed", "shared_prefix"]


def ex(prompt, *completions):
    return np.asarray(prompt, np.int32), [np.asarray(c, np.int32) for c in completions]


def random_examples(rng, num_prompts, k, vocab=50, none_every=4):
    out = []
    for b in range(num_prompts):
        if b % none_every == none_every - 1:
            out.append(None)
            continue
        prompt = rng.integers(1, vocab, size=int(rng.integers(1, 7)))
        comps = [
            rng.integers(1, vocab, size=int(rng.integers(1, 6))) for _ in range(int(rng.integers(1, k + 1)))
        ]
        out.append((prompt.astype(np.int32), [c.astype(np.int32) for c in comps]))
    return out


def build(layout, examples, k, positions=None, length=None, split_length=None):
    lengths = item_lengths(examples, layout, split_length=split_length)
    length = length or bucket_length(max(lengths), (), 8)
    rows = rows_needed(lengths, length) if layout != "padded" else None
    return layout_tokens(layout, examples, k, length, rows, positions, split_length=split_length)


def test_padded_by_hand():
    t = padded_layout([ex([5, 6], [7, 8], [9]), None], 2, 4, positions=[2, 3])
    np.testing.assert_array_equal(t.input_ids, [[5, 6, 7, 8], [5, 6, 9, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(t.segment_ids, [[1, 1, 1, 1], [1, 1, 1, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(t.positions, [[0, 1, 2, 3], [0, 1, 2, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(t.target_slots, [[-1, 4, 4, -1], [-1, 5, -1, -1], [-1] * 4, [-1] * 4])
    np.testing.assert_array_equal(t.targets[0, :3], [6, 7, 8])
    assert not t.prefix_ids.any()


def test_shared_prefix_by_hand():
    t = shared_prefix_layout(
        [ex([5, 6, 7], [8, 9], [10]), ex([11], [12])], 2, 10, num_rows=1, split_length=None
    )
    np.testing.assert_array_equal(t.input_ids, [[5, 6, 7, 8, 9, 7, 10, 11, 12, 0]])
    np.testing.assert_array_equal(t.segment_ids, [[1, 1, 2, 2, 2, 3, 3, 4, 4, 0]])
    np.testing.assert_array_equal(t.prefix_ids, [[0, 0, 1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(t.positions, [[0, 1, 2, 3, 4, 2, 3, 0, 1, 0]])
    np.testing.assert_array_equal(t.target_slots, [[-1, -1, 0, 0, -1, 1, -1, 2, -1, -1]])
    np.testing.assert_array_equal(t.targets[0, [2, 3, 5, 7]], [8, 9, 10, 12])


def test_shared_prefix_split_by_hand():
    """With a split length of 4, prompt [5, 6, 7] groups its 4-token sequence apart from its 5-token one
    (two prompt segments); a prompt whose sequences all lie on one side keeps one group."""
    examples = [ex([5, 6, 7], [8, 9], [10]), ex([11], [12], [13])]
    assert item_lengths(examples, "shared_prefix", split_length=4) == [
        4,
        5,
        4,
    ]  # the short group, then the long one
    t = shared_prefix_layout(examples, 2, 16, num_rows=1, split_length=4)
    np.testing.assert_array_equal(t.input_ids[0, :13], [5, 6, 7, 10, 5, 6, 7, 8, 9, 11, 12, 11, 13])
    np.testing.assert_array_equal(t.segment_ids[0, :13], [1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6])
    np.testing.assert_array_equal(t.prefix_ids[0, :13], [0, 0, 1, 1, 0, 0, 3, 3, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(t.target_slots[0, :13], [-1, -1, 1, -1, -1, -1, 0, 0, -1, 2, -1, 3, -1])
    verify_layout(t, examples, 2)
    for seed in range(3):  # the invariants hold for split groups too
        examples = random_examples(np.random.default_rng(seed), 8, 3)
        verify_layout(build("shared_prefix", examples, 3, split_length=6), examples, 3)


def test_packed_by_hand():
    t = packed_layout([ex([5, 6], [7, 8], [9]), ex([1], [2, 3])], 2, 6, num_rows=2)
    # [1, 2, 3] needs 3 tokens and row 0 has 2 left: first fit puts it after [5, 6, 9] in row 1
    np.testing.assert_array_equal(t.input_ids, [[5, 6, 7, 8, 0, 0], [5, 6, 9, 1, 2, 3]])
    np.testing.assert_array_equal(t.segment_ids, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(t.positions, [[0, 1, 2, 3, 0, 0], [0, 1, 2, 0, 1, 2]])
    np.testing.assert_array_equal(t.target_slots, [[-1, 0, 0, -1, -1, -1], [-1, 1, -1, 2, 2, -1]])
    assert first_fit([4, 3, 2, 3], 6) == [0, 1, 0, 1]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layout_invariants_random(layout, seed):
    rng = np.random.default_rng(seed)
    k = 3
    examples = random_examples(rng, 8, k)
    positions = np.sort(rng.choice(3 * 8, 8, replace=False))  # a host's share: prompts of the global batch
    tokens = build(layout, examples, k, positions=positions)
    verify_layout(tokens, examples, k, positions=positions)  # packing loses no token, every slot is right
    assert tokens.input_ids.dtype == np.int32 and tokens.target_slots.dtype == np.int32
    real = sum(len(e[0]) + len(c) for e in examples if e is not None for c in e[1])
    if layout != "shared_prefix":
        assert int((tokens.segment_ids > 0).sum()) == real  # every prompt+completion token sits in a row


def test_attention_context_counts_a_tokens_segment_and_its_prefix():
    """The keys a token's attention is counted over in model FLOPs (perf/mfu): its whole segment plus its
    shared prefix, 0 at padding; a sequence of L tokens alone in a row counts L for each token."""
    t = shared_prefix_layout(
        [ex([5, 6, 7], [8, 9], [10]), ex([11], [12])], 2, 10, num_rows=1, split_length=None
    )
    np.testing.assert_array_equal(
        attention_context(t.segment_ids, t.prefix_ids), [[2, 2, 5, 5, 5, 4, 4, 2, 2, 0]]
    )
    t = packed_layout([ex([5, 6], [7, 8], [9]), ex([1], [2, 3])], 2, 6, num_rows=2)
    np.testing.assert_array_equal(
        attention_context(t.segment_ids, t.prefix_ids), [[4, 4, 4, 4, 0, 0], [3] * 6]
    )
    examples = random_examples(np.random.default_rng(0), 8, 3)
    squares = sum((len(e[0]) + len(c)) ** 2 for e in examples if e is not None for c in e[1])
    for layout in ("padded", "packed"):
        t = build(layout, examples, 3)
        stacked = np.stack([t.segment_ids, t.segment_ids]), np.stack([t.prefix_ids, t.prefix_ids])
        assert int(attention_context(*stacked).sum()) == 2 * squares  # [microbatch, N, T] too


@pytest.mark.parametrize("layout", LAYOUTS)
def test_verify_layout_catches_corruption(layout):
    examples = random_examples(np.random.default_rng(5), 4, 2, none_every=10)
    tokens = build(layout, examples, 2)
    slots = tokens.target_slots.copy()
    r, c = np.argwhere(slots >= 0)[0]
    broken = tokens.replace(
        target_slots=np.where(
            (np.arange(slots.shape[1]) == c)[None] & (np.arange(len(slots)) == r)[:, None], -1, slots
        )
    )
    with pytest.raises(AssertionError, match="target tokens"):
        verify_layout(broken, examples, 2)
    moved = tokens.replace(positions=tokens.positions + 1)
    with pytest.raises(AssertionError, match="positions"):
        verify_layout(moved, examples, 2)


def test_packing_errors_and_shapes():
    with pytest.raises(ValueError, match="sequence of 9 tokens .* row length 8"):
        first_fit([3, 9], 8)
    with pytest.raises(ValueError, match="needs 2 rows of 8 tokens but the layout has 1"):
        packed_layout([ex([1, 2, 3], [4, 5], [6, 7, 8])], 2, 8, num_rows=1)
    assert [round_rows(n, 2) for n in (1, 2, 3, 5, 9)] == [2, 2, 4, 8, 16]
    assert bucket_length(5, (8, 16)) == 8 and bucket_length(9, (), 8) == 16
    with pytest.raises(ValueError, match="largest bucket 16"):
        bucket_length(17, (8, 16))


def tiny_model():
    from flax import nnx

    from copg_jax.models import ModelConfig, from_config

    cfg = ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    return from_config(cfg, rngs=nnx.Rngs(3))


def slot_logps(model, tokens, num_slots):
    """Independent of copg_jax.logprobs: full log-softmax, gather the targets, sum by slot."""
    from flax import nnx

    @nnx.jit(static_argnums=2)
    def run(model, tokens, num_slots):
        hidden = model(tokens.input_ids, tokens.positions, tokens.segment_ids, tokens.prefix_ids)
        logp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
        picked = jnp.take_along_axis(logp, tokens.targets[..., None], axis=-1)[..., 0]
        return sequence_sums(picked, tokens.target_slots, num_slots)

    return np.asarray(run(model, jax.tree.map(jnp.asarray, tokens), num_slots))


def test_layouts_give_equal_sequence_logprobs():
    model = tiny_model()
    k = 3
    examples = random_examples(np.random.default_rng(11), 6, k, vocab=64)
    got = {layout: slot_logps(model, build(layout, examples, k), 6 * k) for layout in LAYOUTS}
    np.testing.assert_allclose(got["packed"], got["padded"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got["shared_prefix"], got["padded"], rtol=2e-5, atol=2e-5)
    masked = [b * k + j for b, e in enumerate(examples) for j in range(k) if e is None or j >= len(e[1])]
    assert (
        masked
        and np.all(got["padded"][masked] == 0)
        and np.all(got["padded"][np.setdiff1d(range(18), masked)] < 0)
    )


def test_longrope_layouts_give_equal_sequence_logprobs_with_the_models_split_length():
    """A LongRoPE model (pretrained length 6) rotates sequences longer than 6 tokens with its long factors:
    every layout gives each sequence its own log-probs once the shared-prefix layout splits the prompts
    whose sequences lie on both sides of 6; sharing one prompt segment across both sides would not."""
    from flax import nnx

    from copg_jax.models import ModelConfig, from_config

    factors = {"short_factor": [1.0, 1.5, 1.2, 1.1], "long_factor": [4.0, 8.0, 3.0, 2.0]}
    cfg = ModelConfig.from_hf(dict(
        model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        original_max_position_embeddings=6, rope_scaling={"type": "longrope", **factors},
    ))  # fmt: skip
    assert cfg.split_length == 6
    model, k = from_config(cfg, rngs=nnx.Rngs(3)), 3
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: 6 * x, params))  # sharp attention, which rotations change
    examples = random_examples(np.random.default_rng(11), 6, k, vocab=64)
    lengths = [len(e[0]) + len(c) for e in examples if e is not None for c in e[1]]
    assert min(lengths) <= 6 < max(lengths)
    padded = slot_logps(model, build("padded", examples, k), 6 * k)
    for layout in LAYOUTS:
        tokens = build(layout, examples, k, split_length=cfg.split_length)
        np.testing.assert_allclose(slot_logps(model, tokens, 6 * k), padded, rtol=2e-5, atol=2e-5)
    unsplit = slot_logps(model, build("shared_prefix", examples, k), 6 * k)
    assert np.max(np.abs(unsplit - padded)) > 0.05
    # so the model's split_length has no default to forget, in the layouts or the data iterator
    for fn in (layout_tokens, shared_prefix_layout, item_lengths, DataIterator):
        assert inspect.signature(fn).parameters["split_length"].default is inspect.Parameter.empty, fn


@pytest.mark.parametrize("split_length", [None, 8])
def test_sequences_per_token_counts_each_token_once_per_sequence_it_is_part_of(split_length):
    """A shared prefix's tokens count once per completion sharing it (two prefix segments for a prompt
    split by LongRoPE's length: each counted for its own group), so per-token statistics weighted by it (a
    mixture of experts' load-balancing loss) total the padded layout's tokens."""
    from copg_jax.batch import sequences_per_token

    examples = random_examples(np.random.default_rng(4), 6, 3, vocab=64)
    tokens = layout_tokens("shared_prefix", examples, 3, 64, 8, split_length=split_length)
    weights = np.asarray(sequences_per_token(jnp.asarray(tokens.segment_ids), jnp.asarray(tokens.prefix_ids)))
    real = [e for e in examples if e is not None]
    assert weights.sum() == sum(len(p) + len(c) for p, cs in real for c in cs)
    assert set(np.unique(weights[tokens.segment_ids == 0])) <= {0.0}
    if split_length is not None:  # some prompt was split, so some prefix counts less than its K
        prefixes = np.unique(tokens.prefix_ids[tokens.prefix_ids > 0])
        assert len(prefixes) > sum(len(p) > 1 for p, _ in real)
