"""Pure-numpy token layouts: B prompts x K completions -> the N x T arrays of a TokenBatch (copg_jax.batch).

An example is `(prompt_ids [P], [completion_ids [C_k] for its completions])`, or None for a padding prompt
(all its slots masked). Completion k of example b fills slot `positions[b]*K + k`: `positions` are the global
prompt indices of a host's share of the global batch (default 0..B-1), contiguous or not.

* padded: row b*K + k holds prompt + completion k, right-padded to T; N = B*K (empty slots: padding rows).
* packed: every prompt + completion sequence is a segment, first-fit packed into `num_rows` rows of T.
* shared_prefix: per prompt one group: segment prompt[:-1], then per completion a segment
  [prompt[-1]] + completion whose prefix_ids name the prompt segment; groups are first-fit packed. With a
  `split_length` (a LongRoPE model's pretrained length, `ModelConfig.split_length`) a prompt whose sequences
  fall on both sides of it gets two groups, one per side, so that a group never mixes sequences the model
  rotates differently (`models.layers.longrope_long` decides per group).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from copg_jax.batch import TokenBatch

Example = tuple[np.ndarray, list[np.ndarray]] | None


def prefix_groups(
    prompt: np.ndarray, completions: list[np.ndarray], split_length: int | None
) -> list[list[int]]:
    """The completions (indices) that share one prompt segment in the shared-prefix layout: all of them, or
    with `split_length` those whose prompt + completion has at most that many tokens and those longer."""
    if split_length is None:
        return [list(range(len(completions)))]
    long = [len(prompt) + len(c) > split_length for c in completions]
    groups = [[k for k, is_long in enumerate(long) if is_long == side] for side in (False, True)]
    return [g for g in groups if g]


def item_lengths(examples: list[Example], layout: str, *, split_length: int | None) -> list[int]:
    """Lengths of the units a layout places in rows: a sequence per completion, or a group per prompt (two
    for a prompt `split_length` splits: `prefix_groups`; the model's `ModelConfig.split_length`, required
    so that no caller leaves a LongRoPE model's groups unsplit)."""
    lengths = []
    for ex in examples:
        if ex is None:
            continue
        prompt, completions = ex
        if layout == "shared_prefix":
            lengths.extend(
                len(prompt) - 1 + sum(1 + len(completions[k]) for k in group)
                for group in prefix_groups(prompt, completions, split_length)
            )
        else:
            lengths.extend(len(prompt) + len(c) for c in completions)
    return lengths


def first_fit(lengths: list[int], row_length: int) -> list[int]:
    """Row index of each item under first-fit packing into rows of `row_length`.

    Raises:
      ValueError: an item is longer than a row.
    """
    free: list[int] = []
    rows = []
    for i, n in enumerate(lengths):
        if n > row_length:
            raise ValueError(f"a sequence of {n} tokens (item {i}) does not fit the row length {row_length}")
        for r, space in enumerate(free):
            if n <= space:
                free[r] -= n
                rows.append(r)
                break
        else:
            free.append(row_length - n)
            rows.append(len(free) - 1)
    return rows


def rows_needed(lengths: list[int], row_length: int) -> int:
    """Number of rows first-fit packing needs."""
    return max(first_fit(lengths, row_length), default=-1) + 1


def round_rows(n: int, multiple: int = 1) -> int:
    """Smallest `multiple * 2**i` >= n: a small fixed set of row counts, so jit compiles few shapes."""
    rows = multiple
    while rows < n:
        rows *= 2
    return rows


def bucket_length(n: int, buckets: tuple[int, ...] = (), multiple: int = 128) -> int:
    """Row length for sequences of n tokens: the smallest bucket that fits, else n rounded to `multiple`."""
    for b in buckets:
        if b >= n:
            return b
    if buckets:
        raise ValueError(f"a sequence of {n} tokens exceeds the largest bucket {buckets[-1]}")
    return -(-n // multiple) * multiple


class _Rows:
    """Mutable numpy arrays of a TokenBatch under construction, plus a write cursor per row."""

    def __init__(self, num_rows: int, length: int):
        shape = (num_rows, length)
        self.input_ids = np.zeros(shape, np.int32)
        self.positions = np.zeros(shape, np.int32)
        self.segment_ids = np.zeros(shape, np.int32)
        self.prefix_ids = np.zeros(shape, np.int32)
        self.targets = np.zeros(shape, np.int32)
        self.target_slots = np.full(shape, -1, np.int32)
        self.cursor = np.zeros(num_rows, np.int64)
        self.next_segment = np.ones(num_rows, np.int64)

    def put(
        self, row: int, tokens: np.ndarray, first_position: int, first_target: int, slot: int, prefix: int = 0
    ):
        """Appends one segment; tokens from index `first_target` on predict slot `slot`. Returns its id."""
        n, col, seg = len(tokens), int(self.cursor[row]), int(self.next_segment[row])
        span = slice(col, col + n)
        self.input_ids[row, span] = tokens
        self.positions[row, span] = np.arange(first_position, first_position + n)
        self.segment_ids[row, span] = seg
        self.prefix_ids[row, span] = prefix
        self.targets[row, col : col + n - 1] = tokens[1:]
        if slot >= 0:
            self.target_slots[row, col + first_target : col + n - 1] = slot
        self.cursor[row] += n
        self.next_segment[row] += 1
        return seg

    def batch(self) -> TokenBatch:
        return TokenBatch(
            input_ids=self.input_ids,
            positions=self.positions,
            segment_ids=self.segment_ids,
            prefix_ids=self.prefix_ids,
            targets=self.targets,
            target_slots=self.target_slots,
        )


def _prompt_positions(examples: list[Example], positions: Sequence[int] | None) -> np.ndarray:
    """[B] int64 global prompt index of each example (default 0..B-1)."""
    at = np.arange(len(examples)) if positions is None else np.asarray(positions, np.int64)
    if len(at) != len(examples):
        raise ValueError(f"{len(at)} prompt positions for {len(examples)} examples")
    return at


def padded_layout(
    examples: list[Example], num_completions: int, length: int, positions: Sequence[int] | None = None
) -> TokenBatch:
    """One row per slot: row b*K + k = prompt b + completion k, right-padded to `length`. N = B*K."""
    k_max, at = num_completions, _prompt_positions(examples, positions)
    rows = _Rows(len(examples) * k_max, length)
    for b, ex in enumerate(examples):
        if ex is None:
            continue
        prompt, completions = ex
        for k, c in enumerate(completions):
            seq = np.concatenate([prompt, c])
            if len(seq) > length:
                raise ValueError(f"prompt {b} + completion {k} has {len(seq)} tokens > row length {length}")
            rows.put(b * k_max + k, seq, 0, len(prompt) - 1, int(at[b]) * k_max + k)
    return rows.batch()


def packed_layout(
    examples: list[Example],
    num_completions: int,
    length: int,
    num_rows: int,
    positions: Sequence[int] | None = None,
) -> TokenBatch:
    """Each prompt + completion a segment, first-fit packed into `num_rows` rows of `length`."""
    items = [(b, k) for b, ex in enumerate(examples) if ex is not None for k in range(len(ex[1]))]
    where = first_fit(item_lengths(examples, "packed", split_length=None), length)
    _check_rows(where, num_rows, length)
    rows, at = _Rows(num_rows, length), _prompt_positions(examples, positions)
    for (b, k), r in zip(items, where, strict=True):
        prompt, completions = examples[b]
        rows.put(
            r,
            np.concatenate([prompt, completions[k]]),
            0,
            len(prompt) - 1,
            int(at[b]) * num_completions + k,
        )
    return rows.batch()


def shared_prefix_layout(
    examples: list[Example],
    num_completions: int,
    length: int,
    num_rows: int,
    positions: Sequence[int] | None = None,
    *,
    split_length: int | None,
) -> TokenBatch:
    """Per prompt a group [prompt[:-1]] [p[-1] + y_1] ... [p[-1] + y_K] (two with `split_length`:
    `prefix_groups`), groups first-fit packed into rows."""
    groups = [
        (b, group)
        for b, ex in enumerate(examples)
        if ex is not None
        for group in prefix_groups(ex[0], ex[1], split_length)
    ]
    where = first_fit(item_lengths(examples, "shared_prefix", split_length=split_length), length)
    _check_rows(where, num_rows, length)
    rows, at = _Rows(num_rows, length), _prompt_positions(examples, positions)
    for (b, group), r in zip(groups, where, strict=True):
        prompt, completions = examples[b]
        p = len(prompt)
        # a one-token prompt has no prefix segment: each completion segment then holds the whole prompt
        prefix = rows.put(r, prompt[:-1], 0, 0, -1) if p > 1 else 0
        for k in group:
            seq = np.concatenate([prompt[-1:], completions[k]])
            rows.put(r, seq, p - 1, 0, int(at[b]) * num_completions + k, prefix)
    return rows.batch()


def _check_rows(where: list[int], num_rows: int, length: int):
    needed = max(where, default=-1) + 1
    if needed > num_rows:
        raise ValueError(
            f"the batch needs {needed} rows of {length} tokens but the layout has {num_rows}; "
            "raise data.row_length or let the iterator choose the row count"
        )


def layout_tokens(
    layout: str,
    examples: list[Example],
    num_completions: int,
    length: int,
    num_rows: int | None = None,
    positions: Sequence[int] | None = None,
    *,
    split_length: int | None,
) -> TokenBatch:
    """Dispatches to the layout named by `layout` ("padded" ignores num_rows: it uses B*K; `split_length`
    splits shared-prefix groups, `prefix_groups`: the model's `ModelConfig.split_length`)."""
    if layout == "padded":
        return padded_layout(examples, num_completions, length, positions)
    if layout == "packed":
        return packed_layout(examples, num_completions, length, num_rows, positions)
    if layout == "shared_prefix":
        return shared_prefix_layout(
            examples, num_completions, length, num_rows, positions, split_length=split_length
        )
    raise ValueError(f"unknown layout {layout!r}")


def verify_layout(
    tokens: TokenBatch, examples: list[Example], num_completions: int, positions: Sequence[int] | None = None
):
    """Asserts the layout contract: every completion token is predicted exactly once, in its slot, from
    exactly its prompt and the completion tokens before it, at the right positions; nothing else is a target.

    Raises:
      AssertionError: naming the slot and what is wrong.
    """
    ids, pos, seg, pre = (
        np.asarray(a) for a in (tokens.input_ids, tokens.positions, tokens.segment_ids, tokens.prefix_ids)
    )
    tgt, slots = np.asarray(tokens.targets), np.asarray(tokens.target_slots)
    assert np.all(slots[seg == 0] == -1), "a padding token carries a target slot"
    expected_total, at = 0, _prompt_positions(examples, positions)
    for b, ex in enumerate(examples):
        for k in range(num_completions):
            slot = int(at[b]) * num_completions + k
            rr, cc = np.nonzero(slots == slot)
            if ex is None or k >= len(ex[1]):
                assert len(rr) == 0, f"masked slot {slot} has targets"
                continue
            prompt, c = np.asarray(ex[0]), np.asarray(ex[1][k])
            p = len(prompt)
            expected_total += len(c)
            assert len(rr) == len(c), f"slot {slot}: {len(rr)} target tokens, completion has {len(c)}"
            assert np.all(rr == rr[0]), f"slot {slot} spans several rows"
            row, cols = rr[0], cc
            assert np.all(np.diff(cols) == 1), f"slot {slot}: targets not contiguous"
            assert np.all(tgt[row, cols] == c), f"slot {slot}: targets differ from the completion"
            assert np.all(pos[row, cols] == np.arange(p - 1, p - 1 + len(c))), f"slot {slot}: wrong positions"
            assert len(set(seg[row, cols])) == 1 and seg[row, cols[0]] != 0, (
                f"slot {slot}: targets leave the segment"
            )
            # what the first prediction sees under attention_mask: exactly the prompt, in order
            t0, s, q = cols[0], seg[row, cols[0]], pre[row, cols[0]]
            keys = np.arange(t0 + 1)
            visible = keys[(seg[row, keys] == s) | ((seg[row, keys] == q) & (q != 0))]
            assert np.array_equal(ids[row, visible], prompt), f"slot {slot}: context is not the prompt"
            assert np.array_equal(pos[row, visible], np.arange(p)), f"slot {slot}: prompt positions wrong"
            assert np.array_equal(ids[row, cols[1:]], c[:-1]), f"slot {slot}: inputs are not the completion"
    total = int(np.sum(slots >= 0))
    assert total == expected_total, f"{total} target tokens in the batch, completions hold {expected_total}"
