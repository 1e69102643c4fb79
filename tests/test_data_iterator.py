"""Batching: deterministic shuffles, disjoint per-host shares, exact resume, device placement."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from copg_jax.data.config import DataConfig
from copg_jax.data.layout import verify_layout
from copg_jax.data.pipeline import DataIterator, epoch_order, host_examples, to_device
from copg_jax.data.testing import kway_rows, make_tiny_tokenizer, slot_targets, write_jsonl
from copg_jax.data.tokenize import tokenize_dataset
from copg_jax.sharding import make_mesh

LAYOUTS = ["padded", "packed", "shared_prefix"]


def _tokenized(tmp, rows: int, seed: int = 5):
    tok = make_tiny_tokenizer(str(tmp / "tok"))
    path = write_jsonl(kway_rows(rows, seed=seed, k_range=(2, 4)), str(tmp / "d.jsonl"))
    return tokenize_dataset(DataConfig(path=path, cache_dir=str(tmp / "cache")), tok)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _tokenized(tmp_path_factory.mktemp("iter"), 37)


# what the row order of `data` under `cfg()` depends on: 37 rows, seed 3, batches of 8, shuffled, drop_last
ORDER = {"num_rows": 37, "seed": 3, "batch_size": 8, "shuffle": True, "drop_last": True}


def cfg(**kw):
    base = dict(batch_size=8, pad_multiple=8, max_prompt_length=16, max_completion_length=16, seed=3)
    return DataConfig(**{**base, **kw})


def arrays(batch):
    return [np.asarray(x) for x in jax.tree.leaves(batch)]


def same(a, b):
    return len(arrays(a)) == len(arrays(b)) and all(
        x.shape == y.shape and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
        for x, y in zip(arrays(a), arrays(b), strict=True)
    )


def test_epoch_order_deterministic():
    a, b = epoch_order(37, 3, 0), epoch_order(37, 3, 0)
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(37))
    assert not np.array_equal(a, epoch_order(37, 3, 1)) and not np.array_equal(a, epoch_order(37, 4, 0))
    np.testing.assert_array_equal(epoch_order(5, 3, 0, shuffle=False), range(5))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batches_match_rows_and_layout(data, layout):
    it = DataIterator(data, cfg(layout=layout), ref=None, process_index=0, process_count=1, split_length=None)
    assert it.batches_per_epoch == 37 // 8
    for index in range(2):
        rows = it.global_rows(0, index)
        batch = next(it)
        examples = host_examples(data, rows)
        verify_layout(batch.tokens, [e[:2] for e in examples], it.num_completions)
        for b, (_, comps, rewards) in enumerate(examples):
            n = len(comps)
            np.testing.assert_array_equal(batch.rewards[b, :n], rewards)
            assert batch.completion_mask[b, :n].all() and not batch.completion_mask[b, n:].any()
            np.testing.assert_array_equal(batch.completion_lengths[b, :n], [len(c) for c in comps])
            assert np.isnan(batch.ref_logps[b, :n]).all() and (batch.ref_logps[b, n:] == 0).all()
        assert batch.rewards.shape == (8, it.num_completions)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shares_disjoint_covering_equal_shapes(data, layout, hosts):
    c = cfg(layout=layout)
    its = [
        DataIterator(data, c, ref=None, process_index=p, process_count=hosts, split_length=None)
        for p in range(hosts)
    ]
    k = its[0].num_completions
    for index in range(its[0].batches_per_epoch):
        rows = its[0].global_rows(1, index)
        parts = [it.batch(rows) for it in its]
        local = np.concatenate([p[1] for p in parts])
        np.testing.assert_array_equal(local, rows)  # disjoint, in order, covering the global batch
        assert len({tuple(a.shape for a in arrays(p[0])) for p in parts}) == 1  # same shapes on every host
        for p, (batch, rows_p) in enumerate(parts):
            examples = [e[:2] for e in host_examples(data, rows_p)]
            verify_layout(batch.tokens, examples, k, positions=range(p * len(rows_p), (p + 1) * len(rows_p)))


def test_resume_yields_the_same_batches(data):
    c = cfg(layout="packed")
    reference = DataIterator(data, c, ref=None, process_index=0, process_count=1, split_length=None)
    expected = [next(reference) for _ in range(11)]  # 4 batches per epoch: crosses two epoch boundaries
    assert reference.get_state() == {"epoch": 2, "index": 3, **ORDER, "rows_digest": data.digest().hex()}
    first = DataIterator(data, c, ref=None, process_index=0, process_count=1, split_length=None)
    for _ in range(5):
        next(first)
    state = first.get_state()
    resumed = DataIterator(data, c, ref=None, process_index=0, process_count=1, split_length=None)
    resumed.set_state(state)
    assert all(same(next(resumed), e) for e in expected[5:])
    assert not same(expected[0], expected[4])  # epochs differ: the comparison above can fail


@pytest.fixture(scope="module")
def one_more_row(tmp_path_factory):
    """`data` with a 38th row appended (e.g. by `copg generate` between interruption and resume)."""
    return _tokenized(tmp_path_factory.mktemp("more"), 38)


@pytest.fixture(scope="module")
def other_rows(tmp_path_factory):
    """37 other rows (the file replaced, or its rows edited or reordered, between interruption and resume)."""
    return _tokenized(tmp_path_factory.mktemp("other"), 37, seed=6)


@pytest.mark.parametrize(
    ("change", "changed"),
    [
        ({"rows": 38}, "num_rows 37 -> 38"),
        (
            {"rows": "other"},
            r"the rows' content \(another file, rows edited or reordered, or other tokenis\w+ settings\)",
        ),
        ({"seed": 4}, "seed 3 -> 4"),
        ({"batch_size": 4}, "batch_size 8 -> 4"),
        ({"shuffle": False}, "shuffle True -> False"),
        ({"drop_last": False}, "drop_last True -> False"),
    ],
)
def test_resume_refuses_another_row_order(data, one_more_row, other_rows, change, changed):
    first = DataIterator(data, cfg(), ref=None, process_index=0, process_count=1, split_length=None)
    next(first), next(first)
    state = first.get_state()
    rows = {38: one_more_row, "other": other_rows, None: data}[change.get("rows")]
    other = cfg(**{k: v for k, v in change.items() if k in ("seed", "batch_size")})
    flags = {k: v for k, v in change.items() if k in ("shuffle", "drop_last")}
    resumed = DataIterator(
        rows, other, ref=None, process_index=0, process_count=1, split_length=None, **flags
    )
    with pytest.raises(
        ValueError, match=rf"epoch 0, batch 2\) was saved for another row order \({changed}\)"
    ):
        resumed.set_state(state)
    assert (resumed.epoch, resumed.index) == (0, 0)  # the refused position was not taken


def test_resume_from_a_state_without_the_order(data):
    """A checkpoint from before the order was saved ({epoch, index} only) still restores, unchecked."""
    c = cfg()
    reference = DataIterator(data, c, ref=None, process_index=0, process_count=1, split_length=None)
    expected = [next(reference) for _ in range(7)]
    resumed = DataIterator(data, c, ref=None, process_index=0, process_count=1, split_length=None)
    resumed.set_state({"epoch": 1, "index": 1})  # 4 batches per epoch: batch 5 of the reference
    assert same(next(resumed), expected[5]) and same(next(resumed), expected[6])
    other_seed = DataIterator(
        data, cfg(seed=9), ref=None, process_index=0, process_count=1, split_length=None
    )
    other_seed.set_state({"epoch": 1, "index": 1, "num_rows": 37})  # only the keys present are checked
    assert other_seed.get_state() == {
        "epoch": 1,
        "index": 1,
        **ORDER,
        "rows_digest": data.digest().hex(),
        "seed": 9,
    }


@pytest.mark.parametrize("shuffle", [True, False])
def test_rows_left_out_of_each_epoch_are_reported(data, caplog, shuffle):
    with caplog.at_level("WARNING", logger="copg_jax.data.pipeline"):
        DataIterator(data, cfg(shuffle=shuffle), ref=None, split_length=None)  # 37 rows, batches of 8
    assert "data: 5 of 37 rows are left out of each epoch" in caplog.text
    assert ("the same rows every epoch" in caplog.text) != shuffle
    caplog.clear()
    with caplog.at_level("WARNING", logger="copg_jax.data.pipeline"):
        DataIterator(
            data, cfg(drop_last=False), ref=None, split_length=None
        )  # padded instead: every row trained
    assert "left out" not in caplog.text


def test_last_batch_padded_and_single_epoch(data):
    it = DataIterator(
        data,
        cfg(),
        ref=None,
        process_index=0,
        process_count=1,
        repeat=False,
        drop_last=False,
        split_length=None,
    )
    batches = list(it)
    assert it.get_state() == {
        "epoch": 0,
        "index": 5,
        **ORDER,
        "rows_digest": it.rows_digest,
        "drop_last": False,
    }
    assert len(batches) == 5 and it.rows_digest == data.digest().hex()
    last = batches[-1]
    assert last.completion_mask[:5].any(axis=1).all() and not last.completion_mask[5:].any()
    assert int(sum(b.completion_mask.sum() for b in batches)) == data.report.completions
    assert (last.tokens.target_slots[5 * it.num_completions :] == -1).all()


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
def test_a_row_length_some_row_cannot_fit_is_refused_before_any_batch(data, layout):
    """It failed at the first batch that drew such a row (steps into a run), naming a batch item."""
    need = [
        (p - 1 + sum(1 + c for c in cs)) if layout == "shared_prefix" else p + max(cs)
        for p, cs in zip(data.rows["prompt_length"], data.rows["completion_lengths"], strict=True)
    ]
    longest = max(need)
    first = need.index(longest)
    DataIterator(
        data, cfg(layout=layout, row_length=longest), ref=None, split_length=None
    )  # the longest fits
    where = f"{data.rows[first]['source']} row {data.rows[first]['source_row']}: its {layout} layout needs"
    with pytest.raises(ValueError, match=f"^{re.escape(where)} {longest} tokens in a row, more than data."):
        DataIterator(data, cfg(layout=layout, row_length=longest - 1), ref=None, split_length=None)


def test_to_device_shards_batch_axis(data):
    mesh = make_mesh(data=4, fsdp=2)
    it = DataIterator(
        data, cfg(layout="packed"), ref=None, process_index=0, process_count=1, mesh=mesh, split_length=None
    )
    host = next(it)
    assert host.tokens.input_ids.shape[0] % 8 == 0  # row count rounded to the 8 batch shards
    dev = to_device(host, mesh)
    assert dev.tokens.input_ids.sharding.spec[0] == ("data", "fsdp", "expert")
    assert dev.rewards.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None)
    assert same(dev, host)
    with pytest.raises(ValueError, match="batch_size=4 does not divide over the 8 batch shards"):
        DataIterator(
            data, cfg(batch_size=4), ref=None, process_index=0, process_count=1, mesh=mesh, split_length=None
        )


def test_batch_size_must_split_over_hosts(data):
    with pytest.raises(ValueError, match="batch_size=8 does not divide over 3 processes"):
        DataIterator(data, cfg(), ref=None, process_index=0, process_count=3, split_length=None)
    too_big = dataclasses.replace(cfg(), batch_size=64)
    with pytest.raises(ValueError, match="37 rows make no full batch"):
        DataIterator(data, too_big, ref=None, process_index=0, process_count=1, split_length=None)


def per_prompt(batch):
    return [np.asarray(getattr(batch, f)) for f in ("rewards", "completion_mask", "completion_lengths")]


def check_assembles(data, c, hosts, positions):
    """The hosts' batches of a global batch: each host's prompts are those at `positions[p]`, its per-prompt
    arrays those of the one-process batch there, and together they hold every slot of it, token for token."""
    whole = DataIterator(data, c, ref=None, process_index=0, process_count=1, split_length=None)
    rows = whole.global_rows(0, 1)
    expected, _ = whole.batch(rows)
    parts = [it.batch(rows) for it in hosts]
    assert len({tuple(a.shape for a in arrays(b)) for b, _ in parts}) == 1  # same shapes on every host
    for (batch, local), where in zip(parts, positions, strict=True):
        np.testing.assert_array_equal(local, rows[where])
        for got, want in zip(per_prompt(batch), per_prompt(expected), strict=True):
            np.testing.assert_array_equal(got, want[where])
    keys = [tuple(w) for w in positions]
    one_per_share = [parts[keys.index(key)][0] for key in set(keys)]
    assert slot_targets(one_per_share) == slot_targets([expected])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_processes_sharing_batch_shards_feed_them_the_same_prompts(data, layout):
    """mesh (data 2, tensor 4) over 4 processes of 2 devices, as with one process per GPU pair: processes 0
    and 1 hold batch shard 0, processes 2 and 3 shard 1; each pair loads the same prompts (before, this
    was refused: each process fed a shared shard other prompts)."""
    c = cfg(layout=layout)
    mesh = make_mesh(2, 1, 4)
    hosts = [
        DataIterator(data, c, ref=None, mesh=mesh, process_index=p, process_count=4, split_length=None)
        for p in range(4)
    ]
    assert [it.feed.shards for it in hosts] == [(0,), (0,), (1,), (1,)]
    assert hosts[0].local_batch == 4
    check_assembles(data, c, hosts, [range(4), range(4), range(4, 8), range(4, 8)])
    rows = hosts[0].global_rows(0, 1)
    assert same(hosts[0].batch(rows)[0], hosts[1].batch(rows)[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_interleaved_device_order_places_each_prompt_at_its_shard(data, layout):
    """A mesh whose data axis alternates between 2 processes (as a topology-ordered pod mesh may): process 0
    holds batch shards 0, 2, 4, 6. It loads those prompts, and their completions keep the global slots of
    those positions (before, process 0 loaded prompts 0-3, which the mesh placed at shards 0, 2, 4, 6 while
    their slots said 0-3: rewards paired with other prompts' log-probs)."""
    c = cfg(layout=layout)
    devices = jax.devices()
    mesh = make_mesh(8, 1, 1, devices=[devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)])
    hosts = [
        DataIterator(data, c, ref=None, mesh=mesh, process_index=p, process_count=2, split_length=None)
        for p in range(2)
    ]
    assert [it.feed.shards for it in hosts] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    check_assembles(data, c, hosts, [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_processes_holding_overlapping_batch_shards_are_refused(data):
    """Process 0 (devices 0-3) would hold shards 0-2 and process 1 (devices 4-7) shards 1-3: no per-process
    rows could assemble such a batch."""
    d = jax.devices()
    mesh = make_mesh(4, 1, 2, devices=[d[i] for i in (0, 1, 2, 4, 3, 5, 6, 7)])
    with pytest.raises(ValueError, match=r"overlapping or unequal sets of its 4 batch shards \(process 0: "):
        DataIterator(data, cfg(), ref=None, mesh=mesh, process_index=0, process_count=2, split_length=None)


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
@pytest.mark.parametrize("split_length", [None, 12])
def test_the_longest_item_of_every_row_at_once_is_item_lengths_of_each(data, layout, split_length):
    """The row-length check reads every row's longest sequence or prompt group at once from Arrow
    (`item_lengths` of one row at a time, and a numpy array per row, took 17 s and 220 MB at 1M rows on
    every host); it equals `item_lengths` row by row, LongRoPE's split included, and names the first row
    that does not fit."""
    from copg_jax.data.layout import item_lengths

    it = DataIterator(data, cfg(layout=layout), ref=None, split_length=split_length)
    want = [
        max(item_lengths([ex[:2]], layout, split_length=split_length))
        for ex in host_examples(data, np.arange(len(data)))
    ]
    np.testing.assert_array_equal(it._longest_items(), want)
    assert max(want) > min(want)
    first = int(np.flatnonzero(np.asarray(want) > max(want) - 1)[0])
    row = data.rows[first]
    with pytest.raises(ValueError, match=rf"{row['source']} row {row['source_row']}: .* {max(want)} tokens"):
        DataIterator(data, cfg(layout=layout, row_length=max(want) - 1), ref=None, split_length=split_length)
