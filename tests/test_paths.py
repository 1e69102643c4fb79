"""Runs whose inputs and run folder live on a URL: a train / resume / export / eval cycle on fsspec's
memory:// filesystem (nothing of the run on local disk), the object-store run lock, metrics without append,
and staged inputs."""

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import fsspec
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer

from copg_jax import checkpoint as ckpt
from copg_jax import paths, runlock
from copg_jax import train as tr
from copg_jax.metrics import MetricsWriter
from copg_jax.run_config import load_config
from copg_jax.runlock import RunFolderLocked, lock_run_folder

REPO = Path(__file__).resolve().parents[1]
MEMORY = fsspec.filesystem("memory")


@pytest.fixture
def url():
    """A fresh folder on the in-memory filesystem, removed afterwards."""
    root = f"memory://copg-{uuid.uuid4().hex[:8]}"
    yield root
    MEMORY.rm(root.removeprefix("memory://"), recursive=True)


@pytest.fixture
def local(tmp_path, monkeypatch):
    """The only local folders a run may touch: the cache (staged copies) and an empty working directory."""
    cache, cwd = tmp_path / "cache", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("COPG_CACHE_DIR", str(cache))
    monkeypatch.chdir(cwd)
    return {"cache": cache, "cwd": cwd}


def _objects(url: str) -> list[str]:
    """Every object under `url`, relative to it."""
    root = url.removeprefix("memory://")
    return sorted(p.removeprefix(f"/{root}/") for p in MEMORY.find(root))


def _data_position(url: str, step: int) -> dict:
    return json.loads(paths.read_text(f"{url}/run/checkpoints/{step}/data/metadata"))


def _checkpoints(url: str) -> set[str]:
    """Names in the run's checkpoint folder."""
    return {p.split("/")[1] for p in _objects(f"{url}/run") if p.startswith("checkpoints/")}


def _metrics(url: str) -> list[dict]:
    return [json.loads(line) for line in paths.read_text(f"{url}/run/metrics.jsonl").splitlines()]


def test_train_resume_export_and_eval_with_everything_on_a_url(url, local, caplog):
    for name in ("train.jsonl", "eval.jsonl"):
        paths.upload(REPO / "examples" / "tiny" / name, f"{url}/inputs/{name}")
    paths.upload(REPO / "examples" / "tiny" / "tokenizer", f"{url}/inputs/tokenizer")
    overrides = [
        f"data.path={url}/inputs/train.jsonl",
        f"data.eval_path={url}/inputs/eval.jsonl",
        "data.ref_cache=",
        "data.eval_ref_cache=",
        f"data.cache_dir={local['cache']}/datasets",
        f"model.tokenizer={url}/inputs/tokenizer",
        f"train.output_dir={url}/run",
        "train.steps=6",
        "train.eval_every=6",
        "train.progress=false",
        "train.log_every=3",
        "checkpoint.every_steps=2",
    ]
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", overrides)

    first = tr.train(cfg, stop_after=4)
    assert first.interrupted and first.step == 4
    run = _objects(f"{url}/run")
    for expected in ("config.yaml", "metrics.jsonl", "ref_cache/train.parquet", "ref_cache/eval.parquet"):
        assert expected in run
    assert any(p.startswith("tensorboard/events.out.tfevents") for p in run)
    assert _checkpoints(url) == {"2", "2.mirrored", "4", "4.mirrored"}
    [lock] = [p for p in run if p.startswith("run.lock/")]
    assert json.loads(paths.read_text(f"{url}/run/{lock}"))["released"] is True
    # rows at log_every and at every checkpoint: the resumed run pools from the checkpoint on, as a straight
    # run does, and the stop's last update is logged
    assert [row["step"] for row in _metrics(url)] == [2, 3, 4]
    assert {k: _data_position(url, 4)[k] for k in ("epoch", "index")} == {"epoch": 0, "index": 4}
    assert not any(local["cwd"].iterdir())  # nothing of the run on local disk but the cache ...
    shutil.rmtree(local["cache"])  # ... which goes: the resume reads everything from the URL

    with caplog.at_level(logging.INFO, logger="copg_jax.train"):
        second = tr.train(cfg)
    assert not second.interrupted and second.step == 6
    assert f"resumed from {url}/run/checkpoints at step 4" in caplog.text
    position = _data_position(url, 6)  # the data position went on from step 4, in the same row order
    assert position == {**_data_position(url, 4), "epoch": 0, "index": 6}
    rows = _metrics(url)
    assert [r["step"] for r in rows if "loss" in r] == [2, 3, 4, 6] and "eval/loss" in rows[-1]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(_objects(f"{url}/run/export"))
    assert _checkpoints(url) == {"4", "4.mirrored", "6", "6.mirrored"}  # keep_last=2
    assert not any(local["cwd"].iterdir())

    shutil.rmtree(local["cache"])
    out, step = tr.export_run(f"{url}/run", f"{url}/exported")
    assert (out, step) == (f"{url}/exported", 6)
    assert paths.read_bytes(f"{url}/exported/model.safetensors") == paths.read_bytes(
        f"{url}/run/export/model.safetensors"
    )
    evaluated = tr.evaluate_checkpoint(cfg, f"{url}/exported")  # the model folder is read from the URL
    assert evaluated["checkpoint"] == f"{url}/exported"
    np.testing.assert_allclose(evaluated["eval/loss"], rows[-1]["eval/loss"], rtol=1e-6)
    assert not any(local["cwd"].iterdir())


def test_mirrored_checkpoints_fall_back_past_a_damaged_step_and_set_it_aside_at_the_url(url, local):
    directory = f"{url}/checkpoints"

    def state(step):
        return {"w": jnp.arange(8, dtype=jnp.float32) + step}

    manager = ckpt.make_manager(directory, keep_last=3)
    for step in (1, 2):
        ckpt.save(manager, step, state(step), {"epoch": 0, "index": step})
    manager.close()
    assert {"1", "1.mirrored", "2", "2.mirrored"} <= set(paths.listdir(directory))
    paths.write_text(f"{directory}/2/meta/metadata", "{broken")  # damaged at the URL
    shutil.rmtree(local["cache"])  # a fresh host: the steps come from the URL
    manager = ckpt.make_manager(directory, keep_last=3)
    restored = ckpt.restore_latest(manager, state(0))
    assert restored.step == 1 and restored.data == {"epoch": 0, "index": 1}
    assert ckpt.set_aside_newer(manager, 1) == [f"{directory}/2.corrupt"]
    assert paths.read_text(f"{directory}/2.corrupt/meta/metadata") == "{broken"  # kept for inspection
    ckpt.save(manager, 2, state(2), {"epoch": 0, "index": 2})  # the step number is free again
    manager.close()
    assert set(paths.listdir(directory)) >= {"1.mirrored", "2", "2.mirrored", "2.corrupt"}
    np.testing.assert_array_equal(
        ckpt.restore_latest(ckpt.make_manager(directory), state(0)).state["w"], state(2)["w"]
    )


def test_object_store_lock_refuses_a_fresh_holder_and_takes_over_a_stale_one(url, local, monkeypatch, caplog):
    folder = f"{url}/run"
    other = {"pid": 1, "host": "elsewhere-7", "started": "2026-01-01T00:00:00"}
    paths.write_text(f"{folder}/run.lock/3", json.dumps(other))
    with pytest.raises(RunFolderLocked, match="in use by pid 1 on host 'elsewhere-7'"):
        lock_run_folder(folder, wait_s=0)
    monkeypatch.setattr(runlock, "STALE_AFTER_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="copg_jax.runlock"):
        lock = lock_run_folder(folder)
    assert "taking over the stale lock" in caplog.text
    assert paths.listdir(f"{folder}/run.lock") == ["4"]  # a new generation; the old one is history
    monkeypatch.setattr(runlock, "STALE_AFTER_S", 120.0)
    with pytest.raises(RunFolderLocked, match="already in use by this process"):
        lock_run_folder(folder)
    lock.release()
    assert json.loads(paths.read_text(f"{folder}/run.lock/4"))["released"] is True
    lock_run_folder(folder).release()  # a released lock is free at once
    assert paths.listdir(f"{folder}/run.lock") == ["5"]


def test_of_two_runs_racing_for_a_generation_one_gets_it(url, local, monkeypatch):
    folder = f"{url}/run"
    real = paths.create_exclusive

    def raced(path, data):  # another run creates the same generation between our read and our create
        real(path, b'{"pid": 1, "host": "elsewhere-7", "started": "now"}')
        return real(path, data)

    monkeypatch.setattr(paths, "create_exclusive", raced)
    with pytest.raises(RunFolderLocked, match="was just locked by another run"):
        lock_run_folder(folder)
    monkeypatch.setattr(paths, "create_exclusive", real)
    with pytest.raises(RunFolderLocked, match="in use by pid 1 on host 'elsewhere-7'"):
        lock_run_folder(folder, wait_s=0)


def test_a_requeued_run_waits_for_a_gone_hosts_object_lock_to_go_stale(url, local, monkeypatch):
    """A preempted run's generation on another host, its heartbeat just stopped: the requeued run waits for it
    to go stale (by the store's clock) and takes the next generation."""
    monkeypatch.setattr(runlock, "STALE_AFTER_S", 1.0)
    monkeypatch.setattr(runlock, "POLL_S", 0.05)
    folder = f"{url}/run"
    paths.write_text(f"{folder}/run.lock/3", json.dumps({"pid": 1, "host": "elsewhere-7", "started": "now"}))
    start = time.monotonic()
    lock = lock_run_folder(folder)
    assert time.monotonic() - start >= 0.9
    assert paths.listdir(f"{folder}/run.lock") == ["4"]
    lock.release()


def test_the_object_lock_heartbeat_rewrites_its_generation(url, local, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = lock_run_folder(f"{url}/run")
    try:
        first = paths.modified(lock.object)
        time.sleep(0.5)
        assert paths.modified(lock.object) > first
    finally:
        lock.release()


def test_metrics_on_a_url_are_rewritten_whole_and_a_resumed_writer_continues_them(url, local, monkeypatch):
    monkeypatch.setattr("copg_jax.metrics.FLUSH_S", 3600.0)
    writer = MetricsWriter(f"{url}/run", enabled=True)
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": float("nan")})
    assert not paths.exists(f"{url}/run/metrics.jsonl")  # not yet flushed
    writer.flush()
    writer.write(3, {"loss": 0.5})
    writer.close()
    shutil.rmtree(local["cache"])
    resumed = MetricsWriter(f"{url}/run", enabled=True)
    resumed.write(4, {"loss": 0.25})
    resumed.close()
    assert _metrics(url) == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": None},
        {"step": 3, "loss": 0.5},
        {"step": 4, "loss": 0.25},
    ]
    assert not any(local["cwd"].iterdir())


def test_a_restarted_writer_drops_what_a_killed_run_logged_past_its_checkpoint(tmp_path, caplog, monkeypatch):
    """Steps 1-5 logged, then killed; the run resumes from its checkpoint at step 3 and logs 4-5 again:
    metrics.jsonl and TensorBoard's view hold each step once, with the resumed run's values."""
    # event files of one second and process carry tensorboard's counter, 9 then 10 here: ".10" sorted first,
    # and TensorBoard read the killed run's points after the restart's (this failed within the suite)
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    killed = MetricsWriter(tmp_path / "run", enabled=True, start_step=0)
    for step in range(1, 6):
        killed.write(step, {"loss": float(step)})
        killed.write(step, {"rollout/reward_mean": float(step)})  # after the step's checkpoint: redone
    killed.close()  # a hard kill leaves the same lines (each write appends and closes the file)
    (tmp_path / "run" / "metrics.jsonl").open("a").write("not json\n")
    with caplog.at_level(logging.WARNING, logger="copg_jax.metrics"):
        resumed = MetricsWriter(tmp_path / "run", enabled=True, start_step=3, redone=("rollout/",))
    assert "dropped 5 rows logged at or past step 3" in caplog.text
    for step in (3, 4, 5):
        if step > 3:
            resumed.write(step, {"loss": 10.0 * step})
        resumed.write(step, {"rollout/reward_mean": 10.0 * step})
    resumed.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines == [
        '{"step": 1, "loss": 1.0}', '{"step": 1, "rollout/reward_mean": 1.0}',
        '{"step": 2, "loss": 2.0}', '{"step": 2, "rollout/reward_mean": 2.0}',
        '{"step": 3, "loss": 3.0}', "not json", '{"step": 3, "rollout/reward_mean": 30.0}',
        '{"step": 4, "loss": 40.0}', '{"step": 4, "rollout/reward_mean": 40.0}',
        '{"step": 5, "loss": 50.0}', '{"step": 5, "rollout/reward_mean": 50.0}',
    ]  # fmt: skip
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
    rollout = [(e.step, e.value) for e in events.Scalars("rollout/reward_mean")]
    assert rollout == [(1, 1), (2, 2), (3, 30), (4, 40), (5, 50)]  # step 3 once, the resumed run's
    # killed in the middle of a write: the half line goes, and the next row is not appended to it (that row
    # was lost and the file could no longer be read)
    (tmp_path / "run" / "metrics.jsonl").open("a").write('{"step": 6, "loss": 6')
    MetricsWriter(tmp_path / "run", enabled=True, start_step=5).write(6, {"loss": 60.0})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines[-2:] == ['{"step": 5, "rollout/reward_mean": 50.0}', '{"step": 6, "loss": 60.0}']
    # a fresh run killed before its first checkpoint starts over: its evaluation and rollout at step 0 too
    fresh = tmp_path / "fresh"
    killed = MetricsWriter(fresh, enabled=True, start_step=0)
    killed.write(0, {"eval_gen/reward": 1.0})
    killed.write(0, {"rollout/reward_mean": 1.0})
    killed.write(1, {"loss": 1.0})
    MetricsWriter(fresh, enabled=True, start_step=0, redone=("rollout/", "eval_gen/")).close()
    assert (fresh / "metrics.jsonl").read_text() == ""


def test_staged_inputs_follow_changes_at_the_url(url, local, monkeypatch):
    paths.write_text(f"{url}/data/a.jsonl", '{"x": 1}\n')
    paths.write_text(f"{url}/data/sub/b.jsonl", '{"x": 2}\n')
    folder = Path(paths.stage(f"{url}/data"))
    assert folder.is_relative_to(local["cache"])
    assert (folder / "a.jsonl").read_text() == '{"x": 1}\n' and (folder / "sub" / "b.jsonl").is_file()
    copies, real = [], MEMORY.get_file
    monkeypatch.setattr(MEMORY, "get_file", lambda *a, **k: copies.append(a) or real(*a, **k))
    paths.stage(f"{url}/data")
    assert copies == []  # unchanged objects are not copied again
    time.sleep(0.01)
    paths.write_text(f"{url}/data/a.jsonl", '{"x": 3}\n')
    paths.remove(f"{url}/data/sub/b.jsonl")
    paths.stage(f"{url}/data")
    assert (folder / "a.jsonl").read_text() == '{"x": 3}\n' and not (folder / "sub" / "b.jsonl").exists()
    assert len(copies) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        paths.stage(f"{url}/nothing")


def test_paths_of_both_kinds(tmp_path):
    assert paths.is_url("gs://b/x") and paths.is_url("memory://x") and not paths.is_url("runs/x")
    assert paths.is_local("file:///tmp/x") and paths.normal("file:///tmp/x") == "/tmp/x"
    assert paths.join("gs://b/run/", "checkpoints", "4") == "gs://b/run/checkpoints/4"
    assert paths.join("runs/x", "checkpoints") == os.path.join("runs/x", "checkpoints")
    assert paths.parent("gs://b/run/metrics.jsonl") == "gs://b/run"
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError), paths.atomic_writer(target) as f:
        f.write(b"half")
        raise RuntimeError("crash while writing")
    assert not target.exists() and os.listdir(tmp_path) == []  # no half-written file, no temporary left
    assert paths.create_exclusive(target, b"1") and not paths.create_exclusive(target, b"2")
    assert target.read_bytes() == b"1"


def test_two_writers_of_one_process_id_replace_a_file_whole(tmp_path):
    """Hosts sharing a folder over NFS may run writers of one process id (containers count from 1): their
    temporary files were named by it, so the second writer truncated the first's half-written file and the
    first's rename failed. Two writers interleaved in one process stand in for them."""
    path = str(tmp_path / "cache.json")
    first = paths.atomic_writer(path)
    f = first.__enter__()
    f.write(b"first, half")
    paths.write_bytes(path, b"second")  # the other writer, start to end, while the first is open
    assert Path(path).read_bytes() == b"second"
    f.write(b" and the rest")
    first.__exit__(None, None, None)
    assert Path(path).read_bytes() == b"first, half and the rest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]  # no temporary file left


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A kill mid-write (no exception to clean up after) left a temporary file beside its target at every
    kill: a reference cache of many GB each time. The next write of that file removes the ones untouched for
    an hour, never a live writer's or another file's."""
    path = tmp_path / "train.parquet"
    stale, live = paths.temp_beside(path), paths.temp_beside(path)
    other, foreign = paths.temp_beside(tmp_path / "eval.parquet"), f"{path}.mine.tmp"
    for p in (stale, live, other, foreign):
        Path(p).write_bytes(b"x" * 10)
    hour_ago = time.time() - paths.STALE_TEMP_S - 5
    for p in (stale, other, foreign):
        os.utime(p, (hour_ago, hour_ago))
    paths.write_bytes(path, b"cache")
    assert path.read_bytes() == b"cache"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        Path(p).name for p in (path, live, other, foreign)
    )


def test_a_full_disk_under_metrics_names_the_file(tmp_path):
    """OSError's message for a full disk names no file; the run's one line said only 'No space left'."""
    from copg_jax.metrics import MetricsWriter

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OSError, match=r"No space left on device: '.*run/metrics.jsonl'"):
        MetricsWriter(tmp_path / "run", enabled=True).write(1, {"loss": 1.0})
