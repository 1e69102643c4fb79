"""Batches of a tokenised dataset: deterministic per-epoch shuffle, per-host shares, resumable iteration.

Every host walks the same global order (seed, epoch) and takes, of each global batch of B prompts, the prompts
of the "batch" shards its devices hold (`Feed`: with one shard per host, host p takes [p*B/P, (p+1)*B/P);
hosts whose devices hold the same shards, a tensor axis across processes, take the same prompts). Shapes are
decided from the whole global batch (lengths only), so all hosts build arrays of the same shape and
`jax.make_array_from_process_local_data` can assemble them (see `to_device`). Slots are global: completion k
of global prompt b is slot b*K + k, wherever the mesh places prompt b's row.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from typing import Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from copg_jax.batch import PER_PROMPT_FIELDS, ScoredBatch, TokenBatch
from copg_jax.data.config import DataConfig
from copg_jax.data.layout import (
    bucket_length,
    item_lengths,
    layout_tokens,
    round_rows,
    rows_needed,
)
from copg_jax.data.tokenize import TokenizedData, arrow_column, flat_lists
from copg_jax.sharding import logical_sharding

log = logging.getLogger(__name__)


class RefLookup(Protocol):
    """Anything that returns cached reference log-probs for dataset rows (see refcache.RefCache)."""

    def lookup(self, rows: np.ndarray, num_completions: int, completion_lengths: np.ndarray) -> np.ndarray:
        """[B] row ids (-1 = padding) -> [B, K] float32 summed reference log-probs."""


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """[num_rows] row order of an epoch: a permutation drawn from (seed, epoch), or 0..n-1 unshuffled."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def order_changes(saved: dict, current: dict) -> list[str]:
    """'name saved -> current' for each order setting (`DataIterator.order`) that `saved` records and that
    differs in `current`; a setting `saved` lacks (a state from before it was recorded) is not checked."""
    changed = [k for k in current if k in saved and saved[k] != current[k]]
    if "num_rows" in changed:  # other rows, of course
        changed = [k for k in changed if k != "rows_digest"]
    how = "or other tokenisation settings)"
    said = {"rows_digest": f"the rows' content (another file, rows edited or reordered, {how}"}
    return [said.get(k, f"{k} {saved[k]!r} -> {current[k]!r}") for k in changed]


def batch_shards(mesh: Mesh) -> int:
    """Number of shards the logical "batch" axis is split into on `mesh`."""
    spec = logical_sharding(mesh, ("batch",)).spec[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[n] for n in names)


@dataclasses.dataclass(frozen=True)
class Feed:
    """Which prompts of every global batch one process loads: those of the batch shards its devices hold.

    A global batch of B prompts splits into `num_shards` equal shards along the mesh's "batch" axes; shard s
    holds prompts [s*B/S, (s+1)*B/S). A process loads the prompts of its `shards` (ascending, as
    `jax.make_array_from_process_local_data` places its rows). Processes whose devices hold the same shards
    (a tensor axis across processes) load the same prompts; `groups` lists every distinct set, so each
    process can size its arrays from all the others' prompts.
    """

    shards: tuple[int, ...]
    num_shards: int
    groups: tuple[tuple[int, ...], ...]

    def positions(self, batch_size: int, shards: tuple[int, ...] | None = None) -> np.ndarray:
        """[batch_size * len(shards) / num_shards] int64 global prompt indices of `shards` (default: this
        process's), ascending."""
        per = batch_size // self.num_shards
        chosen = self.shards if shards is None else shards
        return np.concatenate([np.arange(s * per, (s + 1) * per) for s in chosen])


def _device_processes(mesh: Mesh, process_count: int) -> dict:
    """Device -> the process that feeds it: its own process, or with a simulated `process_count` (one real
    process standing for several, as tests do) the devices split in id order into equal blocks."""
    devices = sorted(mesh.devices.flat, key=lambda d: d.id)
    if process_count == jax.process_count():
        return {d: d.process_index for d in devices}
    if jax.process_count() > 1 or len(devices) % process_count:
        raise ValueError(f"cannot stand for {process_count} processes with the {len(devices)} mesh devices")
    per = len(devices) // process_count
    return {d: i // per for i, d in enumerate(devices)}


@functools.lru_cache(maxsize=64)
def process_feed(mesh: Mesh | None, process_index: int, process_count: int) -> Feed:
    """The Feed of process `process_index` of `process_count`: from the batch shards of its devices on
    `mesh`, or without a mesh one shard per process.

    Raises:
      ValueError: two processes hold overlapping but different sets of batch shards, or sets of different
        sizes (no per-process rows could assemble the global batch).
    """
    if mesh is None:
        return Feed((process_index,), process_count, tuple((p,) for p in range(process_count)))
    num = batch_shards(mesh)
    held: dict[int, set[int]] = collections.defaultdict(set)
    owner = _device_processes(mesh, process_count)
    for device, index in logical_sharding(mesh, ("batch",)).devices_indices_map((num,)).items():
        held[owner[device]].add(index[0].start or 0)
    groups = tuple(sorted({tuple(sorted(s)) for s in held.values()}))
    flat = [s for g in groups for s in g]
    if len(flat) != len(set(flat)) or len({len(g) for g in groups}) != 1:
        sets = "; ".join(f"process {p}: {sorted(held[p])}" for p in sorted(held)[:4])
        raise ValueError(
            f"the mesh gives processes overlapping or unequal sets of its {num} batch shards ({sets}): "
            "order the mesh devices so that every process holds whole shards of mesh.data x mesh.fsdp that "
            "no other process holds, or the very same shards as others"
        )
    return Feed(tuple(sorted(held[process_index])), num, groups)


def host_examples(data: TokenizedData, rows: np.ndarray):
    """Examples (prompt_ids, [completion_ids]) of dataset rows; None where the row id is -1 (padding)."""
    real = [int(r) for r in rows if r >= 0]
    got = data.rows.select(real) if real else None
    it = (
        iter(zip(got["prompt_ids"], got["completion_ids"], got["rewards"], strict=True)) if real else iter(())
    )
    out = []
    for r in rows:
        if r < 0:
            out.append(None)
            continue
        p, cs, rw = next(it)
        out.append(
            (np.asarray(p, np.int32), [np.asarray(c, np.int32) for c in cs], np.asarray(rw, np.float32))
        )
    return out


class BatchLayout:
    """How a global batch of `cfg.batch_size` prompts, K completion slots each, is split over the processes
    and laid out in rows (`shape_of`, `layout`): what the data iterator and online mode's fresh prompts share.

    Args:
      cfg: data settings (layout, batch_size, buckets, row_length, pad_multiple, length limits).
      num_completions: K, the completion slots per prompt.
      process_index, process_count, mesh, split_length: as `DataIterator`'s.
    """

    def __init__(
        self,
        cfg: DataConfig,
        num_completions: int,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        mesh: Mesh | None = None,
        split_length: int | None,
    ):
        self.cfg, self.num_completions, self.split_length = cfg, num_completions, split_length
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.feed = process_feed(mesh, self.process_index, self.process_count)
        shards = self.feed.num_shards
        if cfg.batch_size % shards:
            where = f"{shards} processes" if mesh is None else f"the {shards} batch shards of the mesh"
            raise ValueError(f"data.batch_size={cfg.batch_size} does not divide over {where}")
        self.local_batch = cfg.batch_size // shards * len(self.feed.shards)
        self.row_multiple = len(self.feed.shards) if mesh is not None else 1
        self.row_length = cfg.row_length or self._auto_row_length()

    def _auto_row_length(self) -> int:
        cfg = self.cfg
        longest = cfg.max_prompt_length + cfg.max_completion_length
        if cfg.layout == "shared_prefix":
            longest = cfg.max_prompt_length - 1 + self.num_completions * (1 + cfg.max_completion_length)
        return bucket_length(longest, (), cfg.pad_multiple)

    def shares(self, items: list) -> list[list]:
        """Per distinct process share (`feed.groups`), its items of a global batch's `items` (one per
        prompt)."""
        return [[items[i] for i in self.feed.positions(len(items), g)] for g in self.feed.groups]

    def shape_of(self, shares: list[list]) -> tuple[int, int]:
        """(num_rows, row_length) that fits each host's share of examples (the same on every host).

        Args:
          shares: per distinct share, its `local_batch` examples (None = padding prompt).
        """
        layout, k = self.cfg.layout, self.num_completions
        if layout == "padded":
            longest = max(
                (n for share in shares for n in item_lengths(share, "padded", split_length=None)), default=1
            )
            return self.local_batch * k, bucket_length(longest, self.cfg.buckets, self.cfg.pad_multiple)
        needed = max(
            rows_needed(item_lengths(share, layout, split_length=self.split_length), self.row_length)
            for share in shares
        )
        return round_rows(max(needed, 1), self.row_multiple), self.row_length

    def layout(self, examples: list, length: int, num_rows: int, positions: np.ndarray) -> TokenBatch:
        """The TokenBatch of this host's `examples` ((prompt, completions) or None, global prompt indices
        `positions`) in the configured layout, `num_rows` x `length` (`shape_of`)."""
        k = self.num_completions
        return layout_tokens(
            self.cfg.layout, examples, k, length, num_rows, positions, split_length=self.split_length
        )


class DataIterator(BatchLayout):
    """Host-local ScoredBatches (numpy) over a tokenised dataset, resumable from a small state dict.

    Args:
      data: the tokenised dataset.
      cfg: data settings (layout, batch_size, seed, shuffle, drop_last, buckets, row_length).
      ref: cached reference log-probs (refcache.RefCache), or None: then `ref_logps` is NaN on every real
        slot, so training on missing reference values fails loudly (fill them with refcache.OnTheFlyRef).
      process_index, process_count: this host and the number of hosts (default: from jax; a different
        count simulates that many hosts, splitting the mesh's devices among them in id order).
      mesh: when given, each host loads the prompts of the "batch" shards its devices hold (`Feed`: hosts
        holding the same shards load the same prompts) and row counts divide over them; without a mesh,
        host p loads the p-th of `process_count` equal shares.
      repeat: iterate forever over epochs (True) or stop after one (False).
      drop_last, shuffle: override cfg.drop_last / cfg.shuffle (e.g. for evaluation).
      split_length: the model's `ModelConfig.split_length` (LongRoPE's pretrained length, or None;
        required, so that no caller leaves a LongRoPE model's groups unsplit): the shared-prefix layout
        never groups a prompt's sequences of at most that many tokens with its
        longer ones (`layout.prefix_groups`), so that every log-prob is the sequence's own.
    """

    def __init__(
        self,
        data: TokenizedData,
        cfg: DataConfig,
        *,
        ref: RefLookup | None,
        process_index: int | None = None,
        process_count: int | None = None,
        mesh: Mesh | None = None,
        repeat: bool = True,
        drop_last: bool | None = None,
        shuffle: bool | None = None,
        split_length: int | None,
    ):
        super().__init__(
            cfg,
            data.num_completions,
            process_index=process_index,
            process_count=process_count,
            mesh=mesh,
            split_length=split_length,
        )
        self.data, self.ref, self.repeat = data, ref, repeat
        self.drop_last = cfg.drop_last if drop_last is None else drop_last
        self.shuffle = cfg.shuffle if shuffle is None else shuffle
        n = len(data)
        self.batches_per_epoch = n // cfg.batch_size if self.drop_last else -(-n // cfg.batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} rows make no full batch of data.batch_size={cfg.batch_size} (drop_last)")
        if self.drop_last and n % cfg.batch_size:  # said, not silent: shuffled, each epoch leaves out others
            log.warning(
                "data: %d of %d rows are left out of each epoch, its last batch being incomplete "
                "(data.drop_last; data.batch_size=%d)%s",
                n % cfg.batch_size,
                n,
                cfg.batch_size,
                "" if self.shuffle else ": the same rows every epoch, as data.shuffle is false",
            )
        # per row its prompt's length, and its completions' lengths flat (row r's: [starts[r], starts[r + 1]))
        self._prompt_length = arrow_column(data.rows, "prompt_length").to_numpy().astype(np.int64)
        counts, flat = flat_lists(arrow_column(data.rows, "completion_lengths"))
        self._counts, self._flat_lengths = counts.astype(np.int64), flat.astype(np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)])
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its row order): drawn once an epoch
        if cfg.row_length and cfg.layout != "padded":  # the automatic length fits every row
            self._check_row_length()
        self.epoch, self.index = 0, 0

    def _completion_lengths(self, r: int) -> np.ndarray:
        """[K_r] the completion lengths of dataset row `r`."""
        return self._flat_lengths[self._starts[r] : self._starts[r + 1]]

    def _longest_items(self) -> np.ndarray:  # `item_lengths` and `prefix_groups`, vectorised: keep in step
        """[num_rows] each dataset row's longest unit in the layout (`item_lengths`, of every row at once):
        a sequence (packed), or a prompt group (shared prefix: prompt - 1 + sum(1 + completion) over the
        completions `prefix_groups` groups, split by `split_length`)."""
        n, row_of = len(self._prompt_length), np.repeat(np.arange(len(self._prompt_length)), self._counts)
        sequences = self._prompt_length[row_of] + self._flat_lengths
        if self.cfg.layout != "shared_prefix":
            longest = np.zeros(n, np.int64)
            np.maximum.at(longest, row_of, sequences)
            return longest
        long = sequences > self.split_length if self.split_length is not None else np.zeros_like(row_of, bool)
        group = 2 * row_of + long  # a row's short group, then its long one
        sizes = np.bincount(group, weights=1 + self._flat_lengths, minlength=2 * n).reshape(n, 2)
        members = np.bincount(group, minlength=2 * n).reshape(n, 2)
        groups = np.where(members > 0, self._prompt_length[:, None] - 1 + sizes, 0)
        return groups.max(axis=1).astype(np.int64)

    def _check_row_length(self) -> None:
        """Raises ValueError naming the first dataset row with a sequence (packed) or prompt group (shared
        prefix) longer than `row_length`: its first batch would fail, hours into a run."""
        longest = self._longest_items()
        over = np.flatnonzero(longest > self.row_length)
        if len(over):
            row = self.data.rows[int(over[0])]
            raise ValueError(
                f"{row['source']} row {row['source_row']}: its {self.cfg.layout} layout needs "
                f"{int(longest[over[0]])} tokens in a row, more than data.row_length={self.row_length}: "
                "raise data.row_length (or leave it 0 to fit the longest rows data.max_prompt_length and "
                "data.max_completion_length allow)"
            )

    @functools.cached_property
    def rows_digest(self) -> str:
        """The rows' `TokenizedData.digest` in hex: a position counts in the rows it was saved over."""
        return self.data.digest().hex()

    def order(self) -> dict[str, int | bool | str]:
        """What the row order of every epoch depends on besides the epoch number (see `global_rows`), and
        the rows it orders (`rows_digest`)."""
        return {
            "num_rows": len(self.data),
            "rows_digest": self.rows_digest,
            "seed": int(self.cfg.seed),
            "batch_size": int(self.cfg.batch_size),
            "shuffle": bool(self.shuffle),
            "drop_last": bool(self.drop_last),
        }

    def position(self) -> dict[str, int]:
        """The iterator position {epoch, index}: the next batch is batch `index` of epoch `epoch`."""
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def get_state(self) -> dict[str, int | bool]:
        """The iterator `position` and the `order` it counts in: save it with the checkpoint."""
        return {**self.position(), **self.order()}

    def describe_next(self) -> str:
        """The next batch, for messages about it."""
        return f"the batch at data position {self.position()} (epoch, batch index)"

    def set_state(self, state: dict) -> None:
        """Restores a position from `get_state`; the next batch is the one an uninterrupted run would see.

        Raises:
          ValueError: `state` was saved over another order (row count, seed, batch size, shuffle, drop_last)
            or other rows: its position would repeat and skip rows of the epoch. Keys `state` lacks are not
            checked.
        """
        changed = order_changes(state, self.order())
        if changed and state.get("num_rows") == 0:  # `rollout.FreshOnly`'s
            raise ValueError(
                "the checkpoint was trained from prompts alone (no data.path): resume it with data.path "
                "empty, or start a new train.output_dir"
            )
        if changed:
            raise ValueError(
                f"the data position (epoch {state['epoch']}, batch {state['index']}) was saved for another"
                f" row order ({', '.join(changed)}): resuming would repeat and skip rows; resume with the"
                " data and data.seed/batch_size/shuffle/drop_last it was saved with, or start a new"
                " train.output_dir"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def global_rows(self, epoch: int, index: int) -> np.ndarray:
        """[batch_size] dataset row ids of global batch `index` of `epoch` (-1 pads an incomplete batch)."""
        b = self.cfg.batch_size
        if self._order is None or self._order[0] != epoch:  # a permutation of every row: once an epoch
            self._order = (epoch, epoch_order(len(self.data), self.cfg.seed, epoch, self.shuffle))
        rows = self._order[1][index * b : (index + 1) * b]
        return np.concatenate([rows, np.full(b - len(rows), -1, rows.dtype)])

    def _lengths(self, rows: np.ndarray):
        """Stand-ins of `rows`' (prompt, completions) of their lengths (`item_lengths` takes len() alone)."""
        return [
            None
            if r < 0
            else (range(self._prompt_length[r]), [range(c) for c in self._completion_lengths(r)])
            for r in rows
        ]

    def _shape(self, rows: np.ndarray) -> tuple[int, int]:
        """(num_rows, row_length) of every host's share of this global batch."""
        return self.shape_of(self.shares(self._lengths(rows)))

    def batch(self, rows: np.ndarray) -> tuple[ScoredBatch, np.ndarray]:
        """This host's ScoredBatch (numpy) of a global batch given by its [batch_size] row ids.

        Returns:
          (batch, local_rows): local_rows [B_local] are the row ids of this host's prompts (-1 = padding).
        """
        k = self.num_completions
        num_rows, length = self._shape(rows)
        positions = self.feed.positions(len(rows))
        local = rows[positions]
        examples = host_examples(self.data, local)
        # slot b*K + k of global prompt b
        tokens = self.layout([None if e is None else e[:2] for e in examples], length, num_rows, positions)
        shape = (self.local_batch, k)
        rewards, lengths, mask = np.zeros(shape, np.float32), np.zeros(shape, np.int32), np.zeros(shape, bool)
        for b, ex in enumerate(examples):
            if ex is not None:
                n = len(ex[1])
                rewards[b, :n], lengths[b, :n], mask[b, :n] = ex[2], [len(c) for c in ex[1]], True
        if self.ref is None:
            ref_logps = np.where(mask, np.float32(np.nan), np.float32(0))
        else:
            ref_logps = np.asarray(self.ref.lookup(local, k, lengths), np.float32)
        batch = ScoredBatch(
            tokens=tokens,
            rewards=rewards,
            completion_mask=mask,
            ref_logps=ref_logps,
            completion_lengths=lengths,
        )
        return batch, local

    def __iter__(self):
        return self

    def __next__(self) -> ScoredBatch:
        if self.index >= self.batches_per_epoch:
            if not self.repeat:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
        batch, _ = self.batch(self.global_rows(self.epoch, self.index))
        self.index += 1
        return batch


def _put(x: np.ndarray, mesh: Mesh, axes: tuple, name: str) -> jax.Array:
    shards = process_feed(mesh, jax.process_index(), jax.process_count()).shards
    if x.shape[0] % len(shards):
        raise ValueError(
            f"{name}: {x.shape[0]} rows do not divide over this process's {len(shards)} batch shards"
        )
    return jax.make_array_from_process_local_data(logical_sharding(mesh, axes), np.asarray(x))


def tokens_to_device(tokens: TokenBatch, mesh: Mesh) -> TokenBatch:
    """Places a host TokenBatch on `mesh`: rows split over the logical "batch" axis, length replicated."""
    return jax.tree.map(lambda x: _put(x, mesh, ("batch", "length"), "tokens"), tokens)


def to_device(batch: ScoredBatch, mesh: Mesh) -> ScoredBatch:
    """Places a host-local ScoredBatch on `mesh` as global arrays (single- and multi-process).

    Token arrays [N, T] and per-prompt arrays [B, K] are sharded along the logical "batch" axis; each host
    contributes its share (hosts in process order), so global slot b*K + k matches global prompt b.
    """
    per_prompt = {f: _put(getattr(batch, f), mesh, ("batch", None), f) for f in PER_PROMPT_FIELDS}
    return ScoredBatch(tokens=tokens_to_device(batch.tokens, mesh), **per_prompt)
