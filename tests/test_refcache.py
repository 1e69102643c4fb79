"""Reference log-prob cache: values against an independent computation, reuse, refusal on any change."""

import dataclasses
import shutil

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from copg_jax.config import from_dict
from copg_jax.data import config as data_config
from copg_jax.data.config import DataConfig
from copg_jax.data.fingerprint import data_fingerprint
from copg_jax.data.formats import load_sources
from copg_jax.data.pipeline import DataIterator, to_device
from copg_jax.data.refcache import (
    ReferenceModel,
    StaleCacheError,
    open_ref_cache,
    precompute_ref,
    reference_fingerprint,
)
from copg_jax.data.testing import kway_rows, make_tiny_tokenizer, write_jsonl
from copg_jax.data.tokenize import tokenize_dataset
from copg_jax.models import ModelConfig, from_config, save_pretrained
from copg_jax.run_config import Config
from copg_jax.sharding import make_mesh
from copg_jax.train import load_data, precompute_reference

MODEL = dict(
    model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=128,
)  # fmt: skip


def tiny(seed):
    return from_config(ModelConfig(**MODEL), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    tok = make_tiny_tokenizer(str(tmp / "ckpt"))
    model = tiny(0)
    save_pretrained(model, tmp / "ckpt")
    other = nnx.clone(model)
    other.embed[...] = other.embed[...] * 1.01
    save_pretrained(other, tmp / "other")
    path = write_jsonl(kway_rows(10, seed=2, k_range=(2, 3)), str(tmp / "d.jsonl"))
    cfg = DataConfig(
        path=path, cache_dir=str(tmp / "cache"), batch_size=4, pad_multiple=16, max_prompt_length=16,
        max_completion_length=16, shuffle=False,
    )  # fmt: skip
    data = tokenize_dataset(cfg, tok)
    cache = precompute_ref(model, data, cfg, str(tmp / "ref.parquet"), checkpoint=str(tmp / "ckpt"))
    return dict(tmp=tmp, tok=tok, model=model, cfg=cfg, data=data, cache=cache, path=str(tmp / "ref.parquet"))


def direct_logps(model, pairs, length=40):
    """Independent reference: each prompt + completion alone in a causal row (trailing padding unseen),
    full log-softmax, summed over the completion tokens."""
    seqs = np.zeros((len(pairs), length), np.int32)
    for i, (p, c) in enumerate(pairs):
        seqs[i, : len(p) + len(c)] = np.concatenate([p, c])
    ids = jnp.asarray(seqs)
    positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
    hidden = model(ids, positions, jnp.ones_like(ids), jnp.zeros_like(ids))
    logp = np.asarray(jax.nn.log_softmax(model.logits(hidden), axis=-1), np.float64)
    return [logp[i, np.arange(len(p) - 1, len(p) + len(c) - 1), c].sum() for i, (p, c) in enumerate(pairs)]


def test_cached_values_match_direct_computation(env):
    data, cache = env["data"], env["cache"]
    slots = [(r, k) for r in range(len(data)) for k in range(len(data.rows[r]["completion_ids"]))]
    pairs = [
        (np.asarray(data.rows[r]["prompt_ids"]), np.asarray(data.rows[r]["completion_ids"][k]))
        for r, k in slots
    ]
    want = direct_logps(env["model"], pairs)
    got = [cache.logps[r, k] for r, k in slots]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert [cache.lengths[r, k] for r, k in slots] == [len(c) for _, c in pairs]
    assert np.isnan(cache.logps[[r for r in range(10) if len(data.rows[r]["completion_ids"]) == 2], 2]).all()


def test_cache_reused_and_served_in_batches(env):
    data, cfg = env["data"], env["cfg"]
    cache = open_ref_cache(env["path"], data, reference=str(env["tmp"] / "ckpt"))
    np.testing.assert_array_equal(cache.logps, env["cache"].logps)
    it = DataIterator(
        data,
        dataclasses.replace(cfg, layout="packed"),
        ref=cache,
        process_index=0,
        process_count=1,
        split_length=None,
    )
    batch, rows = it.batch(it.global_rows(0, 1))
    for b, r in enumerate(rows):
        n = len(data.rows[int(r)]["completion_ids"])
        np.testing.assert_array_equal(batch.ref_logps[b, :n], cache.logps[r, :n])
        assert (batch.ref_logps[b, n:] == 0).all()
    assert not np.isnan(batch.ref_logps).any()


def test_lookup_refuses_a_row_whose_completions_differ_from_the_cached_ones(env):
    """The lengths are the last check behind the fingerprint: a batch row with a completion more, fewer (the
    cache holds one the row lacks: it passed) or of another length than cached is refused."""
    cache, k = env["cache"], env["cache"].lengths.shape[1]
    r = int(np.flatnonzero((cache.lengths > 0).sum(1) == 2)[0])  # a row of 2 completions of 3 slots
    lengths = cache.lengths[r : r + 1].copy()
    np.testing.assert_array_equal(cache.lookup(np.asarray([r]), k, lengths)[0, :2], cache.logps[r, :2])
    fewer, more, longer = lengths.copy(), lengths.copy(), lengths.copy()
    fewer[0, 1], more[0, 2], longer[0, 0] = 0, 5, lengths[0, 0] + 1
    for changed in (fewer, more, longer):
        with pytest.raises(ValueError, match=f"row {r} has completion lengths .* recompute it"):
            cache.lookup(np.asarray([r]), k, changed)


def _rewritten(src: str, dst, edit) -> str:
    """A copy of the cache at `src` with its table passed through `edit`, its metadata kept."""
    table = pq.read_table(src)
    pq.write_table(edit(table).replace_schema_metadata(table.schema.metadata), dst)
    return str(dst)


def test_a_damaged_or_reshuffled_cache_is_refused_and_a_broken_one_named(env, tmp_path):
    """A flipped bit in the log-probs, or two rows swapped, passed the fingerprint and trained; the checksum
    written with the cache catches both. A cache missing a column was a KeyError traceback."""
    ckpt = str(env["tmp"] / "ckpt")

    def flip(table):
        values = np.asarray(table.column("ref_logps").combine_chunks().flatten(), np.float32).copy()
        values.view(np.uint32)[0] ^= 1 << 22
        offsets = table.column("ref_logps").combine_chunks().offsets
        return table.set_column(3, "ref_logps", pa.ListArray.from_arrays(offsets, pa.array(values)))

    def swap(table):
        order = list(range(table.num_rows))
        order[0], order[1] = order[1], order[0]
        swapped = table.take(order)
        return swapped.set_column(0, "row", table.column("row"))

    for name, edit in (("flip", flip), ("swap", swap)):
        with pytest.raises(
            StaleCacheError, match="is damaged: its rows, lengths or log-probs are not the ones"
        ):
            open_ref_cache(
                _rewritten(env["path"], tmp_path / f"{name}.parquet", edit), env["data"], reference=ckpt
            )
    cut = tmp_path / "cut.parquet"  # a Parquet file cut short: damaged, recomputed and replaced
    cut.write_bytes(open(env["path"], "rb").read()[:-100])
    with pytest.raises(StaleCacheError, match="cut.parquet' is damaged"):
        open_ref_cache(str(cut), env["data"], reference=ckpt)
    precompute_ref(env["model"], env["data"], env["cfg"], str(cut), checkpoint=ckpt)
    open_ref_cache(str(cut), env["data"], reference=ckpt)
    broken = _rewritten(env["path"], tmp_path / "broken.parquet", lambda t: t.drop_columns(["row"]))
    with pytest.raises(
        ValueError, match=r"broken.parquet' is not a copg reference cache of this version \(columns"
    ):
        open_ref_cache(broken, env["data"], reference=ckpt)


def test_a_cache_consistent_in_itself_but_not_with_the_data_names_its_first_bad_row(env, tmp_path):
    """Past its checksum (re-signed here), a cache whose lengths are not the data's completions', or whose
    log-probs are not finite, is refused naming its first such row (read from Arrow at once, not row by
    row)."""
    import json

    from copg_jax.data.refcache import META_KEY, _content_hash

    ckpt = str(env["tmp"] / "ckpt")

    def signed(table):
        meta = json.loads(table.schema.metadata[META_KEY])
        return table.replace_schema_metadata(
            {META_KEY: json.dumps({**meta, "content": _content_hash(table)})}
        )

    def edited(column, r, value):
        def edit(table):
            lists = table.column(column).combine_chunks()
            values = np.asarray(lists.flatten()).copy()
            values[lists.offsets[r].as_py()] = value
            return table.set_column(
                table.schema.get_field_index(column),
                column,
                pa.ListArray.from_arrays(lists.offsets, pa.array(values)),
            )

        return edit

    for name, (edit, r) in {
        "lengths": (edited("lengths", 3, 999), 3),
        "nan": (edited("ref_logps", 5, np.nan), 5),
    }.items():
        table = pq.read_table(env["path"])
        dst = tmp_path / f"{name}.parquet"
        pq.write_table(signed(edit(table).replace_schema_metadata(table.schema.metadata)), dst)
        with pytest.raises(StaleCacheError, match=rf"{name}.parquet' row {r}: \d+ log-probs over lengths"):
            open_ref_cache(str(dst), env["data"], reference=ckpt)


def test_the_cache_never_overwrites_a_data_file_or_a_file_that_is_no_cache(env, tmp_path):
    data_file = env["data"].sources[0]
    with pytest.raises(ValueError, match="is a data file of the run: the cache would overwrite it"):
        precompute_ref(env["model"], env["data"], env["cfg"], data_file)
    other = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"a": [1]}), other)
    with pytest.raises(
        ValueError, match="exists and is not a copg reference cache: the cache would overwrite"
    ):
        precompute_ref(env["model"], env["data"], env["cfg"], str(other))
    assert pq.read_table(other).column_names == ["a"]
    notes = tmp_path / "notes.txt"  # no Parquet at all: never taken for a damaged cache
    notes.write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a copg reference cache"):
        precompute_ref(env["model"], env["data"], env["cfg"], str(notes))
    assert notes.read_text() == "mine"
    with pytest.raises(ValueError, match="exists and is not a copg reference cache"):  # a folder
        precompute_ref(env["model"], env["data"], env["cfg"], str(tmp_path))


def test_cache_refused_when_model_changes(env):
    with pytest.raises(ValueError, match="changed: the reference model"):
        open_ref_cache(env["path"], env["data"], reference=str(env["tmp"] / "other"))
    with pytest.raises(ValueError, match="cached from a checkpoint, checked against a weights"):
        open_ref_cache(env["path"], env["data"], reference=env["model"])


def test_cache_refused_when_tokenisation_changes(env):
    cfg = dataclasses.replace(env["cfg"], max_completion_length=3)
    data = tokenize_dataset(cfg, env["tok"])
    with pytest.raises(ValueError, match="tokenisation settings \\(max_completion_length: 16 -> 3\\)"):
        open_ref_cache(env["path"], data, reference=str(env["tmp"] / "ckpt"))


def test_cache_refused_when_the_tokenisation_rules_change(env, monkeypatch):
    """Same settings, new rules (what a cut completion becomes): a cache made under the old ones is stale."""
    monkeypatch.setattr(data_config, "TOKENIZATION_RULES", data_config.TOKENIZATION_RULES + 1)
    data = tokenize_dataset(env["cfg"], env["tok"])
    rules = f"rules: {data_config.TOKENIZATION_RULES - 1} -> {data_config.TOKENIZATION_RULES}"
    with pytest.raises(ValueError, match=f"tokenisation settings \\({rules}\\)"):
        open_ref_cache(env["path"], data, reference=str(env["tmp"] / "ckpt"))


def test_cache_refused_when_tokenizer_or_data_change(env, tmp_path):
    tok = make_tiny_tokenizer(str(tmp_path / "tok2"))
    tok.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="changed: the tokenizer"):
        open_ref_cache(env["path"], tokenize_dataset(env["cfg"], tok), reference=None)
    # special tokens written out in the text read as plain text: other ids for the same text (once unseen)
    literal = make_tiny_tokenizer(str(tmp_path / "tok3"))
    literal.split_special_tokens = True
    with pytest.raises(ValueError, match="changed: the tokenizer"):
        open_ref_cache(env["path"], tokenize_dataset(env["cfg"], literal), reference=None)
    edited = write_jsonl(kway_rows(10, seed=3, k_range=(2, 3)), str(tmp_path / "d.jsonl"))
    data = tokenize_dataset(dataclasses.replace(env["cfg"], path=edited), env["tok"])
    with pytest.raises(ValueError, match="changed: the data files' content"):
        open_ref_cache(env["path"], data)


def test_layouts_and_mesh_give_the_same_cache(env, tmp_path):
    mesh = make_mesh(data=4, devices=jax.devices()[:4])
    base = env["cache"].logps
    for layout in ("packed", "shared_prefix"):
        cfg = dataclasses.replace(env["cfg"], layout=layout)
        got = precompute_ref(env["model"], env["data"], cfg, str(tmp_path / f"{layout}.parquet"), mesh=mesh)
        np.testing.assert_allclose(got.logps, base, rtol=2e-5, atol=2e-5)
        assert np.array_equal(np.isnan(got.logps), np.isnan(base))
        # fingerprinted by the in-memory weights: the same model object is accepted, another is not
        open_ref_cache(str(tmp_path / f"{layout}.parquet"), env["data"], reference=env["model"])


PHI3 = dict(
    model_type="phi3", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    original_max_position_embeddings=8,
    rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 1.2, 1.1], "long_factor": [4.0, 8.0, 3, 2]},
)  # fmt: skip


def test_longrope_reference_gives_one_cache_in_every_layout_and_train_lays_out_so(env, tmp_path):
    """A LongRoPE reference (pretrained length 8) rotates the sequences of more than 8 tokens with other
    frequencies: the shared-prefix layout groups a prompt's sequences apart on each side of 8 (the model's
    split_length), so its cache is the padded layout's; `copg train`'s iterators carry that split."""
    model = from_config(ModelConfig.from_hf(PHI3), rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: 6 * x, nnx.state(model, nnx.Param)))  # sharp attention
    rows = env["data"].rows
    lengths = [
        p + c for p, cs in zip(rows["prompt_length"], rows["completion_lengths"], strict=True) for c in cs
    ]
    assert min(lengths) <= 8 < max(lengths)
    caches = {
        layout: precompute_ref(
            model, env["data"], dataclasses.replace(env["cfg"], layout=layout), str(tmp_path / f"{layout}.pq")
        ).logps
        for layout in ("padded", "shared_prefix")
    }
    np.testing.assert_allclose(caches["shared_prefix"], caches["padded"], rtol=2e-5, atol=2e-5)
    cfg = from_dict(Config, {
        "model": {"config": PHI3, "tokenizer": str(env["tmp"] / "ckpt"), "dtype": "float32"},
        "data": {"path": env["cfg"].path, "eval_path": env["cfg"].path, "layout": "shared_prefix",
                 "batch_size": 4, "max_prompt_length": 16, "max_completion_length": 16},
        "lora": {"rank": 2},  # the reference in the step: no cache to compute here
        "train": {"output_dir": str(tmp_path / "run")},
    })  # fmt: skip
    mesh = make_mesh(1, devices=jax.devices()[:1])
    for evaluation in (False, True):
        assert load_data(cfg, env["tok"], mesh, evaluation=evaluation).split_length == 8


def test_reference_model_fills_and_is_a_snapshot(env):
    data, cfg = env["data"], env["cfg"]
    model = nnx.clone(env["model"])
    ref = ReferenceModel(model)
    model.embed[...] = model.embed[...] * 0  # a later in-place policy update must not reach the reference
    it = DataIterator(data, cfg, ref=None, process_index=0, process_count=1, split_length=None)
    host, rows = it.batch(it.global_rows(0, 0))
    assert np.isnan(host.ref_logps[host.completion_mask]).all()  # no reference given: loud NaN
    filled = ref.fill(host)
    expected = env["cache"].logps[rows]
    np.testing.assert_allclose(
        np.where(host.completion_mask, filled.ref_logps, 0), np.nan_to_num(expected), atol=1e-4
    )
    on_mesh = ref.fill(to_device(host, make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])))
    np.testing.assert_allclose(np.asarray(on_mesh.ref_logps), filled.ref_logps, atol=1e-5)


def test_precompute_reference_from_config(env, tmp_path):
    from copg_jax.run_config import load_config

    out = tmp_path / "cli.parquet"
    cfg = load_config(
        None,
        [
            f"model.path={env['tmp'] / 'ckpt'}",
            "model.dtype=float32",
            f"data.path={env['cfg'].path}",
            f"data.cache_dir={env['cfg'].cache_dir}",
            f"data.ref_cache={out}",
            "data.batch_size=4",
            "data.pad_multiple=16",
            "data.max_prompt_length=16",
            "data.max_completion_length=16",
            "data.shuffle=false",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
        ],
    )
    assert precompute_reference(cfg) == [str(out)]
    cache = open_ref_cache(str(out), env["data"], reference=str(env["tmp"] / "ckpt"))
    np.testing.assert_allclose(cache.logps, env["cache"].logps, rtol=2e-5, atol=2e-5)


def test_data_fingerprint_follows_a_dataset_folder_with_brackets_in_its_name(tmp_path):
    folder = str(tmp_path / "ds[v1]")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(kway_rows(4, seed=0))}).save_to_disk(folder)
    [source] = load_sources(folder, "train")
    assert source.name == f"{folder}[train]"
    before = data_fingerprint([source.name])
    shutil.rmtree(folder)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(kway_rows(4, seed=1))}).save_to_disk(folder)
    assert data_fingerprint([source.name]) != before
    with pytest.raises(ValueError, match=r"'.*gone\.jsonl': no file or folder of that name to fingerprint"):
        data_fingerprint([str(tmp_path / "gone.jsonl")])


def test_data_fingerprint_ignores_the_cache_files_tokenising_writes_beside_the_data(tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(kway_rows(6, seed=0)).save_to_disk(str(folder))
    before = data_fingerprint([str(folder)])
    tok = make_tiny_tokenizer(str(tmp_path / "tok"))
    for length in (3, 8):  # two tokenisations: two cache files in the dataset's folder
        tokenize_dataset(DataConfig(path=str(folder), max_prompt_length=length), tok)
    assert len(list(folder.glob("cache-*.arrow"))) == 2
    assert data_fingerprint([str(folder)]) == before
    other = tmp_path / "other"
    datasets.Dataset.from_list(kway_rows(6, seed=1)).save_to_disk(str(other))
    [data_file] = other.glob("data-*.arrow")
    shutil.copy(data_file, folder / data_file.name)  # new rows under the same state.json
    assert data_fingerprint([str(folder)]) != before


def test_a_random_init_reference_has_one_fingerprint_scanned_or_unrolled():
    """The same weights held per layer or stacked for lax.scan are the same reference: a cache computed with
    one `model.scan_layers` serves the other (it was recomputed before); any changed weight still tells, and
    the config's training-only router_aux_loss_coef does not."""
    cfg = ModelConfig(**MODEL)
    unrolled = from_config(cfg, rngs=nnx.Rngs(0))
    scanned = from_config(cfg, rngs=nnx.Rngs(0), scan_layers=True)
    assert reference_fingerprint(scanned) == reference_fingerprint(unrolled)
    before = reference_fingerprint(unrolled)  # a training coefficient is no part of the reference
    unrolled.config = dataclasses.replace(cfg, router_aux_loss_coef=0.5)
    assert reference_fingerprint(unrolled) == before
    unrolled.config = dataclasses.replace(cfg, norm_eps=0.5)
    assert reference_fingerprint(unrolled) != before
    scanned.layers.mlp.down.kernel[...] = scanned.layers.mlp.down.kernel[...].at[1, 0, 0].add(1e-3)
    assert reference_fingerprint(scanned) != reference_fingerprint(unrolled)


def test_a_reference_that_gives_nan_caches_nothing(env, tmp_path):
    """A cache of NaN log-probs trained a NaN loss, blamed on a batch; it is refused before it is written."""
    broken = nnx.clone(env["model"])
    broken.final_norm.scale[...] = broken.final_norm.scale[...] * jnp.nan
    with pytest.raises(
        ValueError, match=r"log-probs are not finite on 10 row\(s\) of the data \(e.g. rows \[0,"
    ):
        precompute_ref(broken, env["data"], env["cfg"], str(tmp_path / "nan.parquet"))
    assert not (tmp_path / "nan.parquet").exists()


def test_cache_refused_when_the_rows_token_ids_change_whatever_changed_them(env, tmp_path, monkeypatch):
    """The rows' token ids are a part of the fingerprint: a tokenizer setting it did not name
    (clean_up_tokenization_spaces re-tokenised recorded completions to other ids of the same length) passed
    the check with the cache's stale log-probs. A cache written before this part is still read."""
    import copg_jax.data.refcache as refcache

    def other_ids(row):
        ids = [list(c) for c in row["completion_ids"]]
        ids[0][0] = (ids[0][0] + 1) % 200 + 3
        return {"completion_ids": ids}

    changed = dataclasses.replace(env["data"], rows=env["data"].rows.map(other_ids))
    with pytest.raises(StaleCacheError, match=r"changed: the rows' token ids"):
        open_ref_cache(env["path"], changed, reference=str(env["tmp"] / "ckpt"))
    written = refcache._fingerprint
    monkeypatch.setattr(
        refcache,
        "_fingerprint",
        lambda *a, **k: {k_: v for k_, v in written(*a, **k).items() if k_ != "tokens"},
    )
    old = str(tmp_path / "old.parquet")
    precompute_ref(env["model"], env["data"], env["cfg"], old, checkpoint=str(env["tmp"] / "ckpt"))
    monkeypatch.undo()
    assert open_ref_cache(old, env["data"], reference=str(env["tmp"] / "ckpt")).meta["fingerprint"]


def test_a_parquet_file_replaced_with_its_time_kept_is_read_anew(tmp_path):
    """`datasets` keys its cache of a Parquet or CSV file by path and modification time: a file replaced
    with its time kept (cp -p, a sync) was read as its old rows, trained silently."""
    import os

    path, cache = tmp_path / "d.parquet", str(tmp_path / "cache")
    datasets.Dataset.from_list(kway_rows(4, seed=0)).to_parquet(str(path))
    [before] = load_sources(str(path), "train", cache)
    stamp = os.stat(path).st_mtime_ns
    datasets.Dataset.from_list(kway_rows(4, seed=1)).to_parquet(str(path))
    os.utime(path, ns=(stamp, stamp))
    [after] = load_sources(str(path), "train", cache)
    assert after.rows.to_list() == kway_rows(4, seed=1) != before.rows.to_list()


def test_the_weights_fingerprint_reads_the_shards_an_index_names_in_a_subfolder(env, tmp_path):
    """A checkpoint whose index names shards in a subfolder: only the folder's own files were hashed, so
    another model's shard copied over the named one kept the fingerprint."""
    import json

    from copg_jax.data.fingerprint import checkpoint_fingerprint

    folder = tmp_path / "ckpt"
    shutil.copytree(env["tmp"] / "ckpt", folder)
    (folder / "shards").mkdir()
    (folder / "model.safetensors").rename(folder / "shards" / "model.safetensors")
    index = {"metadata": {}, "weight_map": {"embed": "shards/model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    before = checkpoint_fingerprint(str(folder))
    shutil.copy(env["tmp"] / "other" / "model.safetensors", folder / "shards" / "model.safetensors")
    assert checkpoint_fingerprint(str(folder)) != before
