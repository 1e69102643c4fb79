"""Reference log-probs: computed once by pi_ref over a tokenised dataset, cached in Parquet, checked on load.

Training never holds the reference model: batches carry `ref_logps` looked up from the cache by dataset row.
The cache's fingerprint has five parts -- reference model (config and every weight byte, see
`fingerprint.checkpoint_fingerprint`), the reference's numerics (compute and parameter dtypes), tokenizer,
tokenisation settings, data content -- and a cache whose parts differ from the current ones is refused with a
message naming what changed.

Reference values come only from (a) a cache (`open_ref_cache`) or (b) an explicitly constructed
`ReferenceModel`, which snapshots the parameters it is given, so later policy updates cannot leak into it.

Cache file (Parquet): one row per dataset row with columns `row`, `source`, `source_row`,
`ref_logps: list<float32>` (summed over completion tokens) and `lengths: list<int32>` (completion tokens);
the schema metadata key `copg_ref_cache` holds the JSON fingerprint and settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from copg_jax import paths
from copg_jax.batch import PER_PROMPT_FIELDS, ScoredBatch, TokenBatch
from copg_jax.data.config import DataConfig
from copg_jax.data.fingerprint import (
    checkpoint_fingerprint,
    data_fingerprint,
    hash_json,
    model_fingerprint,
    update_with_column,
)
from copg_jax.data.layout import Example, padded_layout
from copg_jax.data.pipeline import DataIterator, batch_shards, tokens_to_device
from copg_jax.data.tokenize import TokenizedData, arrow_column, flat_lists
from copg_jax.logprobs import sequence_logprobs
from copg_jax.models.adapters import without_adapters
from copg_jax.sharding import global_array, logical_sharding, on_main_process, on_mesh, to_host

log = logging.getLogger(__name__)
META_KEY = b"copg_ref_cache"
VERSION = 3  # 3: the metadata holds a checksum of the log-probs, lengths and rows ("content")


def reference_fingerprint(reference, weights: str = "full") -> str:
    """Fingerprint of the reference policy: a checkpoint folder (str / PathLike) or an in-memory model.

    `weights` ("full" | "sampled"): how a folder's weight files are hashed (checkpoint_fingerprint).
    """
    if isinstance(reference, str | os.PathLike):
        return f"checkpoint:{weights}:" + checkpoint_fingerprint(paths.stage(reference), weights)
    return "weights:" + model_fingerprint(reference)


def model_numerics(model) -> dict[str, str]:
    """{"dtype", "param_dtype"} of a Decoder: the compute and storage dtypes of its log-probs."""
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {"dtype": jnp.dtype(model.dtype).name, "param_dtype": jnp.dtype(params[0].dtype).name}


def _fingerprint(data: TokenizedData, reference=None, numerics=None, weights: str = "full") -> dict:
    parts = {
        "tokenizer": data.tokenizer_hash,
        "tokenization": hash_json(data.settings),
        "data": data_fingerprint(data.sources, data.revisions),
        # the ids themselves: what any tokenisation the parts above do not name (a decode setting such as
        # clean_up_tokenization_spaces, rows read from a stale `datasets` cache) changed in them
        "tokens": data.token_digest().hex(),
    }
    if reference is not None:
        parts["model"] = reference_fingerprint(reference, weights)
    if numerics is not None:
        parts["numerics"] = hash_json(numerics)
    return parts


PARQUET_MAGIC = b"PAR1"


# what a stale cache's error tells a user of `open_ref_cache` to do (training does it: it drops the hint)
RECOMPUTE_HINT = " Recompute it with `copg precompute-ref`."


class StaleCacheError(ValueError):
    """A reference cache computed for other inputs (the message names what changed): recompute it."""


class DamagedCacheError(StaleCacheError):
    """A Parquet file at the cache's path that Parquet cannot read (cut short, a flipped bit in its footer or
    a compressed page): recomputed and replaced like a stale one; a file that is no Parquet is never."""


class RefCache:
    """Cached summed reference log-probs per dataset row (a `DataIterator` ref source).

    Attributes:
      logps: [R, K] float32 per dataset row and completion (NaN where the row has fewer completions).
      lengths: [R, K] int32 completion token counts the values were computed over (0 where absent).
      meta: the cache's metadata (fingerprint, settings, sources, model info).
    """

    def __init__(self, logps: np.ndarray, lengths: np.ndarray, meta: dict, path: str = ""):
        self.logps, self.lengths, self.meta, self.path = logps, lengths, meta, path

    def lookup(self, rows: np.ndarray, num_completions: int, completion_lengths: np.ndarray) -> np.ndarray:
        """[B] dataset row ids (-1 = padding prompt) -> [B, K] ref log-probs (0 where there is no completion).

        Raises:
          ValueError: the cached token counts differ from the batch's (the data or tokenisation changed).
        """
        out = np.zeros((len(rows), num_completions), np.float32)
        for b, r in enumerate(rows):
            if r < 0:
                continue
            n = int(np.sum(completion_lengths[b] > 0))
            cached = self.lengths[r]  # all of the row's: a cached completion the batch lacks is a change too
            same = n <= len(cached) and np.array_equal(cached[:n], completion_lengths[b, :n])
            if not same or cached[n:].any():
                raise ValueError(
                    f"reference cache {self.path!r}: row {r} has completion lengths "
                    f"{completion_lengths[b, :n]} but the cache was computed over {self.lengths[r]}; "
                    "recompute it (copg precompute-ref)"
                )
            out[b, :n] = self.logps[r, :n]
        return out


def _dict_diff(old: dict, new: dict, show) -> str:
    """'key: old -> new' for every key whose value differs, '; '-joined."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {show(old.get(k))} -> {show(new.get(k))}" for k in keys)


def _describe_change(
    parts: dict, stored: dict, stored_settings: dict, settings: dict, stored_numerics: dict, numerics: dict
) -> list[str]:
    what = {
        "model": "the reference model (weights or config)",
        "tokenizer": "the tokenizer (vocabulary, special tokens or chat template)",
        "tokenization": "the tokenisation settings",
        "data": "the data files' content",
        "numerics": "the reference's numerics",
        "tokens": "the rows' token ids (a tokenizer setting or rows read otherwise)",
    }
    changed = []
    for key, new in parts.items():
        if key == "tokens" and key not in stored:  # a cache written before its ids were fingerprinted
            continue
        if stored.get(key) != new:
            text = what[key]
            if key == "tokenization":
                text += f" ({_dict_diff(stored_settings, settings, repr)})"
            if key == "numerics":
                diff = _dict_diff(stored_numerics, numerics, str)
                text += f" ({diff}; the cache must be computed in the run's model dtypes)"
            old_kind, new_kind = stored.get(key, "?").split(":")[0], new.split(":")[0]
            if key == "model" and old_kind != new_kind:
                text += f" (cached from a {old_kind}, checked against a {new_kind})"
            elif (  # a checkpoint's fingerprint names its weights hash mode second ("weights:" its hash)
                key == "model"
                and new_kind == "checkpoint"
                and stored.get(key, "").split(":")[1:2] != new.split(":")[1:2]
            ):
                text += (
                    f" (weights hashed {stored.get(key, '?:?').split(':')[1]} in the cache, "
                    f"{new.split(':')[1]} now: set data.ref_weights_hash to match or recompute)"
                )
            changed.append(text)
    return changed


def open_ref_cache(
    path: str, data: TokenizedData, reference=None, numerics: dict | None = None, weights: str = "full"
) -> RefCache:
    """Loads a reference cache for `data`, refusing it when anything it depends on changed.

    Args:
      path: the Parquet cache written by `precompute_ref`.
      data: the tokenised dataset the batches come from (its tokenizer, settings and files are checked).
      reference: the reference policy to check the cache against: its HF checkpoint folder (what
        `precompute_ref` records for `checkpoint=`) or the in-memory model. None skips the model check
        (logged as a warning).
      numerics: {"dtype", "param_dtype"} names the run computes the policy in; the cache must have been
        computed in the same ones (None skips the check, logged as a warning).
      weights: how a checkpoint folder's weights are hashed ("full" or "sampled").
    Raises:
      FileNotFoundError: no cache at `path`.
      StaleCacheError: a fingerprint or version mismatch (naming what changed), or rows unlike `data`.
      ValueError: the file is not a copg reference cache.
    """
    if not paths.exists(path):
        raise FileNotFoundError(f"reference cache {path!r} does not exist: run `copg precompute-ref` first")
    table, meta = _read_cache(path)
    if meta.get("version") != VERSION:
        raise StaleCacheError(
            f"reference cache {path!r} has version {meta.get('version')}, expected {VERSION}: recompute it"
        )
    if reference is None:
        log.warning("reference cache %s: the reference model is not checked (no reference given)", path)
    if numerics is None:
        log.warning("reference cache %s: the reference dtypes are not checked (no numerics given)", path)
    parts = _fingerprint(data, reference, numerics, weights)
    changed = _describe_change(
        parts, meta["fingerprint"], meta["settings"], data.settings, meta.get("numerics", {}), numerics or {}
    )
    if changed:
        raise StaleCacheError(
            f"reference cache {path!r} was computed for different inputs; changed: {'; '.join(changed)}."
            + RECOMPUTE_HINT
        )
    if table.num_rows != len(data):
        raise StaleCacheError(f"reference cache {path!r} has {table.num_rows} rows, the data has {len(data)}")
    if meta.get("content") != _content_hash(table):
        raise StaleCacheError(
            f"reference cache {path!r} is damaged: its rows, lengths or log-probs are not the ones written "
            "(their checksum differs)"
        )
    rows = table.column("row").to_numpy()
    if not np.array_equal(rows, np.arange(len(data))):
        raise StaleCacheError(f"reference cache {path!r}: rows are not 0..{len(data) - 1} in order")
    source_rows = arrow_column(data.rows, "source_row").to_numpy()
    if not np.array_equal(table.column("source_row").to_numpy(), source_rows):
        raise StaleCacheError(f"reference cache {path!r}: its rows are other source rows than the data's")
    # every row at once, from Arrow (row by row in Python took 24 s at 1M rows, on every host)
    counts, wanted = flat_lists(arrow_column(data.rows, "completion_lengths"))
    lp_counts, logps = flat_lists(table.column("ref_logps"))
    ln_counts, lengths = flat_lists(table.column("lengths"))
    bad = (lp_counts != counts) | (ln_counts != counts)
    if not bad.any():  # the flat values line up: compare them
        row_of = np.repeat(np.arange(len(data)), counts)
        differ = (lengths != wanted) | ~np.isfinite(logps)
        bad[row_of[differ]] = True
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        lp, ln = table.column("ref_logps")[r].as_py(), table.column("lengths")[r].as_py()
        want = arrow_column(data.rows, "completion_lengths")[r].as_py()
        raise StaleCacheError(
            f"reference cache {path!r} row {r}: {len(lp)} log-probs over lengths {ln} for completions of "
            f"{want} tokens, or not all finite"
        )
    k = max(data.num_completions, int(counts.max(initial=0)))
    slots = np.arange(k)[None, :] < counts[:, None]  # row-major: the flat values' order
    logps_arr = np.full((len(data), k), np.nan, np.float32)
    lengths_arr = np.zeros((len(data), k), np.int32)
    logps_arr[slots], lengths_arr[slots] = logps, lengths
    return RefCache(logps_arr, lengths_arr, meta, path)


CACHE_COLUMNS = ("row", "source", "source_row", "ref_logps", "lengths")


def _read_cache(path: str) -> tuple[pa.Table, dict]:
    """(table, metadata) of the reference cache at `path`.

    Raises:
      ValueError: naming `path`, when it is no copg reference cache or cannot be read as one.
    """
    try:
        with paths.open(path, "rb") as f:
            table = pq.read_table(f)
    except (OSError, pa.ArrowException) as e:
        try:
            with paths.open(path, "rb") as f:
                magic = f.read(len(PARQUET_MAGIC))
        except OSError:  # a folder, no permission: no cache
            magic = b""
        if magic == PARQUET_MAGIC:  # a Parquet file, damaged (cut short, a flipped bit): recomputed, replaced
            raise DamagedCacheError(f"reference cache {path!r} is damaged: {e}") from None
        raise ValueError(f"reference cache {path!r} cannot be read as Parquet: {e}") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path!r} is not a copg reference cache (no {META_KEY.decode()} metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"reference cache {path!r}: its metadata is not JSON ({e})") from None
    missing = [c for c in CACHE_COLUMNS if c not in table.column_names]
    if not isinstance(meta, dict) or missing or not {"fingerprint", "settings"} <= set(meta):
        raise ValueError(
            f"reference cache {path!r} is not a copg reference cache of this version (columns missing: "
            f"{missing}; metadata keys: {sorted(meta) if isinstance(meta, dict) else type(meta).__name__})"
        )
    return table, meta


def _content_hash(table: pa.Table) -> str:
    """xxh3-128 of a cache table's rows, source rows, lengths and log-probs (list lengths, then values)."""
    h = xxhash.xxh3_128()
    for name in ("row", "source_row", "lengths", "ref_logps"):
        update_with_column(h, table.column(name))
    return h.hexdigest()


def check_cache_target(out_path: str, data: TokenizedData) -> None:
    """Refuses to write a reference cache over a file that is not one (a data file given as data.ref_cache
    by mistake was overwritten with the cache), before any log-prob is computed.

    Raises:
      ValueError: `out_path` is one of `data`'s files, or an existing file that is no copg reference cache.
    """
    if not paths.exists(out_path):
        return
    if not paths.is_url(out_path) and any(
        os.path.exists(s) and os.path.samefile(s, out_path) for s in data.sources
    ):
        raise ValueError(
            f"data.ref_cache {out_path!r} is a data file of the run: the cache would overwrite it"
        )
    try:
        _read_cache(out_path)
    except DamagedCacheError:  # a damaged cache is replaced
        return
    except ValueError:
        raise ValueError(
            f"data.ref_cache {out_path!r} exists and is not a copg reference cache: the cache would "
            "overwrite it (give another path, or remove it)"
        ) from None


def _jitted_logprobs(graphdef: nnx.GraphDef, num_slots: int, mesh: Mesh | None = None, layout: str = "any"):
    """A jitted (state, tokens) -> ([num_slots] seq log-probs, [num_slots] token counts) of the models of
    `graphdef`, traced on `mesh` when given (the model's activation constraints apply), for rows of `layout`
    (sequence_logprobs)."""

    def run(state, tokens: TokenBatch):
        model = nnx.merge(graphdef, state)
        _, seq_logps, seq_lengths = sequence_logprobs(model, tokens, num_slots, layout=layout)
        return seq_logps, seq_lengths

    return jax.jit(on_mesh(run, mesh))


def _logprob_fn(model, num_slots: int, mesh: Mesh | None = None, layout: str = "any"):
    """`_jitted_logprobs` of a frozen `model`: tokens -> (seq log-probs, token counts)."""
    graphdef, state = nnx.split(model)
    jitted = _jitted_logprobs(graphdef, num_slots, mesh, layout)
    return lambda tokens: jitted(state, tokens)


def precompute_ref(
    model,
    data: TokenizedData,
    data_cfg: DataConfig,
    out_path: str,
    *,
    checkpoint: str | None = None,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
    weights: str = "full",
    progress: bool = False,
) -> RefCache:
    """Runs the reference model once over every row of `data` and writes the Parquet cache.

    Args:
      model: the reference policy (a copg_jax.models Decoder), sharded on `mesh` when given.
      data: tokenised dataset (tokenize_dataset with the same settings training will use).
      data_cfg: data settings (layout, row lengths, buckets; `batch_size` prompts per forward pass).
      out_path: Parquet file to write (process 0 writes; every process returns the cache).
      checkpoint: the HF folder `model` was loaded from; the cache is then fingerprinted by the folder (cheap
        to re-check at training time). None fingerprints the in-memory weights instead.
      mesh: shard the batch rows over the mesh's "batch" axis (needed on several hosts).
      batch_size: prompts per forward pass (default data_cfg.batch_size).
      weights: how `checkpoint`'s weight files are fingerprinted ("full" or "sampled").
      progress: show a progress bar (process 0).
    Returns:
      the RefCache of what was written.
    """
    check_cache_target(out_path, data)
    if batch_size is not None:
        data_cfg = dataclasses.replace(data_cfg, batch_size=batch_size)
    it = DataIterator(  # every row exactly once, in order
        data,
        data_cfg,
        ref=None,
        mesh=mesh,
        repeat=False,
        drop_last=False,
        shuffle=False,
        split_length=model.config.split_length,
    )
    k, b = it.num_completions, data_cfg.batch_size
    logprobs = _logprob_fn(model, b * k, mesh, data_cfg.layout)
    logps = np.full((len(data), k), np.nan, np.float32)
    lengths = np.zeros((len(data), k), np.int32)
    counts, expected = flat_lists(arrow_column(data.rows, "completion_lengths"))
    slots = np.arange(k)[None, :] < counts[:, None]  # row-major: the flat lengths' order
    bar = range(it.batches_per_epoch)
    if progress and jax.process_index() == 0:
        bar = tqdm(bar, desc=f"reference log-probs -> {out_path}", dynamic_ncols=True)
    for index in bar:
        rows = it.global_rows(0, index)
        host, _ = it.batch(rows)
        tokens = (
            tokens_to_device(host.tokens, mesh)
            if mesh is not None
            else jax.tree.map(jnp.asarray, host.tokens)
        )
        seq_logps, seq_lengths = (to_host(x).reshape(b, k) for x in logprobs(tokens))
        real = rows >= 0
        logps[rows[real]], lengths[rows[real]] = seq_logps[real], seq_lengths[real]
    logps, lengths = np.where(slots, logps, np.nan).astype(np.float32), np.where(slots, lengths, 0)
    if not np.isfinite(logps[slots]).all():  # a cache of them would train a NaN loss, blamed on a batch
        rows = np.flatnonzero(~np.isfinite(np.where(slots, logps, 0.0)).all(axis=1))
        raise ValueError(
            f"the reference model's log-probs are not finite on {len(rows)} row(s) of the data (e.g. rows "
            f"{rows[:5].tolist()}): nothing is cached"
        )
    if (differ := np.flatnonzero(lengths[slots] != expected)).size:  # the model's target counts: the data's
        r = int(np.repeat(np.arange(len(data)), counts)[differ[0]])
        want = expected[int(np.cumsum(counts)[r] - counts[r]) :][: counts[r]].tolist()
        raise AssertionError(f"row {r}: log-probs summed over {lengths[r]} tokens, completions have {want}")
    numerics = model_numerics(model)
    meta = {
        "version": VERSION,
        "fingerprint": _fingerprint(data, checkpoint if checkpoint is not None else model, numerics, weights),
        "numerics": numerics,
        "settings": data.settings,
        "sources": data.sources,
        "num_completions": k,
        "model": {"checkpoint": checkpoint, "weights_hash": weights},
    }

    def write() -> None:
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
        columns = pa.table(
            {
                "row": pa.array(np.arange(len(data)), pa.int64()),
                "source": arrow_column(data.rows, "source").cast(pa.string()),
                "source_row": arrow_column(data.rows, "source_row").cast(pa.int64()),
                "ref_logps": pa.ListArray.from_arrays(offsets, pa.array(logps[slots], pa.float32())),
                "lengths": pa.ListArray.from_arrays(offsets, pa.array(expected, pa.int32())),
            }
        )
        table = columns.replace_schema_metadata(
            {META_KEY: json.dumps({**meta, "content": _content_hash(columns)})}
        )
        with paths.atomic_writer(out_path) as f:  # a crash never leaves a half-written cache behind
            pq.write_table(table, f)
        log.info("wrote reference log-probs of %d rows to %s", len(data), out_path)

    on_main_process(f"write the reference cache {out_path}", write)  # the others wait for it, or raise too
    return RefCache(logps, lengths, meta, out_path)


class ReferenceModel:
    """In-process reference log-probs from an explicitly given reference policy, for data without a cache.

    The parameters are snapshotted at construction, so updating a policy that shares them later does not
    change the reference. Construct it from the reference checkpoint (`from_pretrained`) or before training.
    """

    def __init__(self, model):
        graphdef, state = nnx.split(model)
        self._graphdef, self._state = graphdef, jax.tree.map(lambda x: x, state)
        self._fns: dict[int, object] = {}  # rows -> `_jitted_logprobs`, shared by `with_weights`

    def with_weights(self, model) -> ReferenceModel:
        """A scorer of `model`'s log-probs that reuses this one's compiled programs: `model` has this one's
        structure (its graphdef), other weights (a policy scored as it trains, without compiling again).

        Raises:
          ValueError: `model` is another structure.
        """
        graphdef, state = nnx.split(model)
        if graphdef != self._graphdef:
            raise ValueError("with_weights needs a model of the scorer's structure")
        other = object.__new__(ReferenceModel)
        other._graphdef, other._state, other._fns = graphdef, state, self._fns
        return other

    def scorer_for(self, model) -> ReferenceModel:
        """A scorer of `model`'s log-probs: `with_weights(model)` where it has this one's structure (no
        program compiled for it), else a `ReferenceModel` of its own (e.g. a LoRA policy beside its base)."""
        if nnx.graphdef(model) != self._graphdef:
            return ReferenceModel(model)
        return self.with_weights(model)

    def fill(self, batch: ScoredBatch) -> ScoredBatch:
        """`batch` with ref_logps [B, K] computed by the reference model (0 where completion_mask is False).

        Works on host (numpy) batches and on global device batches from `to_device`.
        """
        b, k = batch.rewards.shape
        if b * k not in self._fns:
            self._fns[b * k] = _jitted_logprobs(self._graphdef, b * k)
        seq_logps, _ = self._fns[b * k](self._state, batch.tokens)
        ref = jnp.where(jnp.asarray(batch.completion_mask), seq_logps.reshape(b, k), 0.0).astype(jnp.float32)
        return batch.replace(ref_logps=np.asarray(ref) if isinstance(batch.rewards, np.ndarray) else ref)

    def completion_logps(
        self, examples: list[Example], num_completions: int, length: int, mesh: Mesh | None = None
    ) -> np.ndarray:
        """[B, K] float32 summed reference log-probs of token-id examples, in one padded batch.

        Args:
          examples: B (prompt_ids [P], [completion_ids [C_k], ...]) with at most K completions, or None for a
            padding prompt; the same on every process.
          num_completions: K.
          length: row length T >= the longest prompt + completion (fixed T: one compilation).
          mesh: shard the rows over the mesh's batch axes (several processes: each places its own devices'
            rows, and every process gets all B results).
        Returns:
          [B, K] float32, 0 where a prompt has fewer than K completions.
        """
        n = len(examples)
        if mesh is not None:  # padding prompts, so that the rows divide over the batch shards
            examples = list(examples) + [None] * (-n % batch_shards(mesh))
        counts = [0 if ex is None else len(ex[1]) for ex in examples]
        mask = np.arange(num_completions)[None, :] < np.asarray(counts)[:, None]
        zeros = np.zeros(mask.shape, np.float32)
        batch = ScoredBatch(
            tokens=padded_layout(examples, num_completions, length),
            rewards=zeros,
            completion_mask=mask,
            ref_logps=zeros,
            completion_lengths=np.zeros(mask.shape, np.int32),
        )
        if mesh is not None:
            rows, prompts = (logical_sharding(mesh, a) for a in (("batch", "length"), ("batch", None)))
            batch = ScoredBatch(
                tokens=jax.tree.map(lambda x: global_array(x, rows), batch.tokens),
                **{f: global_array(getattr(batch, f), prompts) for f in PER_PROMPT_FIELDS},
            )
        return to_host(self.fill(batch).ref_logps)[:n].astype(np.float32)


def initial_reference(graphdef: nnx.GraphDef, trained: nnx.State, frozen: nnx.State) -> ReferenceModel:
    """The reference policy of a run that starts from `trained` params (with `frozen` ones, the LoRA base;
    empty without LoRA): `trained` copied into new buffers, since the train step donates them, merged with
    `frozen` (shared, never copied) and any LoRA adapters dropped (the base is the reference)."""
    copied = jax.tree.map(lambda x: x.copy(), trained)
    return ReferenceModel(without_adapters(nnx.merge(graphdef, copied, frozen)))
