"""copg_jax.checkpoint on plain pytrees: round trip, retention, half-written and corrupt steps."""

import errno
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from copg_jax import checkpoint as ckpt
from copg_jax.sharding import logical_sharding, make_mesh

REPO = Path(__file__).resolve().parents[1]


def _state(step: int) -> dict:
    return {
        "w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8) + step,
        "b": jnp.full((3,), step, jnp.bfloat16),
        "step": jnp.int32(step),
        "rng": jax.random.key_data(jax.random.key(step)),
    }


def _save_steps(directory, steps, metrics=None, **kwargs):
    manager = ckpt.make_manager(directory, **kwargs)
    for s in steps:
        ckpt.save(manager, s, _state(s), {"epoch": 0, "index": s}, {"note": "x"}, (metrics or {}).get(s))
    manager.wait_until_finished()
    return manager


def _assert_state_equal(got, step):
    for k, v in _state(step).items():
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v))


def test_round_trip_restores_state_data_and_meta(tmp_path):
    manager = _save_steps(tmp_path / "c", [1, 2], keep_last=5, async_save=True)
    restored = ckpt.restore_latest(manager, _state(0))
    assert restored.step == 2
    assert restored.data == {"epoch": 0, "index": 2}
    assert restored.meta["note"] == "x" and restored.meta["step"] == 2
    _assert_state_equal(restored.state, 2)
    assert ckpt.restore_latest(manager, _state(0), step=1).data["index"] == 1
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint for step 7"):
        ckpt.restore_latest(manager, _state(0), step=7)


def test_empty_directory_restores_none(tmp_path):
    assert ckpt.restore_latest(ckpt.make_manager(tmp_path / "none"), _state(0)) is None


def test_keep_last_and_keep_best(tmp_path):
    # eval/loss at steps 1..6; without metrics at 3 and 5. Latest 2 = {5, 6}; best 1 by min loss = step 2.
    losses = {1: 5.0, 2: 1.0, 4: 3.0, 6: 4.0}
    metrics = {s: {"eval/loss": v} for s, v in losses.items()}
    manager = _save_steps(tmp_path / "c", range(1, 7), metrics, keep_last=2, keep_best=1, best_mode="min")
    assert manager.all_steps() == [2, 5, 6]
    manager = _save_steps(tmp_path / "d", range(1, 7), metrics, keep_last=1, keep_best=2, best_mode="max")
    assert manager.all_steps() == [1, 6]  # max: steps 1 (5.0) and 6 (4.0); latest is 6


def test_keep_best_keeps_the_best_steps_of_an_earlier_run_in_the_folder(tmp_path):
    """A resumed run's manager reads the metrics of the steps saved before it: the best of those is kept
    (it saw none, and let the best step go at its first save)."""
    metrics = {1: {"eval/loss": 5.0}, 2: {"eval/loss": 1.0}, 3: {"eval/loss": 4.0}}
    kw = dict(keep_last=1, keep_best=1, best_mode="min")
    assert _save_steps(tmp_path / "c", [1, 2, 3], metrics, **kw).all_steps() == [2, 3]
    resumed = _save_steps(tmp_path / "c", [4, 5], {4: {"eval/loss": 3.0}}, **kw)  # a new manager
    assert resumed.all_steps() == [2, 5]
    assert ckpt.make_manager(tmp_path / "c", **kw).all_steps() == [2, 5]
    # steps of a version that wrote no metrics beside them (as with keep_best 0) are kept, unranked
    _save_steps(tmp_path / "old", [1, 2], metrics, keep_last=3)
    assert _save_steps(tmp_path / "old", [3, 4], metrics, **kw).all_steps() == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_ranks_steps_without_a_finite_best_metric_last(tmp_path, mode):
    """Metrics without the best metric (a step where only generation eval ran) or with a NaN save and rank
    below every step that has one, in either mode."""
    metrics = {
        1: {"eval/loss": 5.0},
        2: {"eval/loss": 1.0},
        3: {"eval_gen/score": 0.5},
        4: {"eval/loss": math.nan},
    }
    manager = _save_steps(tmp_path / mode, range(1, 6), metrics, keep_last=1, keep_best=2, best_mode=mode)
    assert manager.all_steps() == [1, 2, 5]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"w": jnp.zeros((8, 8), jnp.bfloat16)}, "w: saved float32[8, 8], now bfloat16[8, 8]"),
        ({"b": jnp.zeros((4,), jnp.bfloat16)}, "b: saved bfloat16[3], now bfloat16[4]"),
        ({"extra": jnp.zeros(2)}, "1 leaves of this config not saved"),
    ],
)
def test_a_state_of_another_config_is_named_not_called_corrupt(tmp_path, change, named):
    """A config changed since the save (model.param_dtype, a model size, LoRA) makes another state: every
    step was refused as "corrupt or unreadable (garbled data)" and fallen back past; it is one error naming
    the leaves that differ, and nothing is set aside."""
    manager = _save_steps(tmp_path / "c", [1, 2], keep_last=3)
    with pytest.raises(ckpt.StateMismatchError, match=r"checkpoint step 2 in .* holds another state") as e:
        ckpt.restore_latest(manager, {**_state(0), **change})
    assert named in str(e.value) and "\n" not in str(e.value)
    assert manager.all_steps() == [1, 2]
    _assert_state_equal(ckpt.restore_latest(manager, _state(0)).state, 2)


def test_restore_onto_a_sharded_mesh(tmp_path):
    manager = _save_steps(tmp_path / "c", [3], keep_last=2)
    mesh = make_mesh(2, 2, 2)
    target = dict(_state(0))
    target["w"] = jax.device_put(target["w"], logical_sharding(mesh, ("batch", "embed")))
    restored = ckpt.restore_latest(manager, target)
    assert restored.state["w"].sharding == target["w"].sharding
    _assert_state_equal(restored.state, 3)


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garble", "metadata", "missing_item", "data_edited", "data_empty", "data_zero_bytes",
     "meta_edited"],
)  # fmt: skip
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, damage):
    directory = tmp_path / "c"
    _save_steps(directory, [1, 2], keep_last=3)
    step_dir = directory / "2"
    chunks = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert chunks
    if damage == "truncate":
        for p in chunks:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "garble":  # same size, flipped bytes: orbax reads it happily, the checksum does not
        for p in chunks:
            raw = bytearray(p.read_bytes())
            mid = len(raw) // 3
            raw[mid : mid + 8] = bytes(b ^ 0xFF for b in raw[mid : mid + 8])
            p.write_bytes(bytes(raw))
    elif damage == "metadata":
        (step_dir / "state" / "_METADATA").write_text("{not json")
    elif damage.startswith("data_"):  # the data position: resuming there would replay or skip batches
        position = step_dir / "data" / "metadata"
        edited = {"data_edited": position.read_text().replace('"index": 2', '"index": 5'), "data_empty": "{}"}
        assert edited["data_edited"] != position.read_text()
        position.write_text(edited.get(damage, ""))
    elif damage == "meta_edited":  # a setting edited: it was refused as the run's own change, not damage
        meta = step_dir / "meta" / "metadata"
        meta.write_text(meta.read_text().replace('"note": "x"', '"note": "y"'))
    else:
        import shutil

        shutil.rmtree(step_dir / "state")
    manager = ckpt.make_manager(directory)
    # the resume's checks read the step it falls back to where the latest's items are damaged
    assert ckpt.latest_items(manager)[0] == (1 if damage.startswith(("data_", "meta_")) else 2)
    with caplog.at_level(logging.WARNING, logger="copg_jax.checkpoint"):
        restored = ckpt.restore_latest(manager, _state(0))
    assert restored.step == 1 and restored.data == {"epoch": 0, "index": 1}
    _assert_state_equal(restored.state, 1)
    assert any("step 2" in r.message and str(step_dir) in r.message for r in caplog.records)
    if damage == "truncate":  # tensorstore's reason, naming the file, not orbax's wrapper naming nothing
        named = [r for r in caplog.records if str(step_dir / "state") in r.message]
        assert any("OUT_OF_RANGE" in r.message for r in named)


def _failing_reads(monkeypatch, manager, step: int, errors: list[Exception]) -> list[int]:
    """Reads of `step` raise `errors` in turn (then read normally); returns the steps read, in order."""
    read, restore = [], manager.restore

    def flaky(s, *args, **kwargs):
        read.append(s)
        if s == step and errors:
            raise errors.pop(0)
        return restore(s, *args, **kwargs)

    monkeypatch.setattr(manager, "restore", flaky)
    monkeypatch.setattr(ckpt, "RETRY_AFTER_S", (0.01, 0.01))
    return read


def test_a_transient_read_error_is_read_again_not_fallen_back_past(tmp_path, monkeypatch, caplog):
    """An I/O error reading the newest step (a storage hiccup) made the resume fall back a step, set the
    good newest step aside and retrain from the older one."""
    manager = _save_steps(tmp_path / "c", [1, 2], keep_last=3)
    read = _failing_reads(monkeypatch, manager, 2, [OSError(errno.EIO, "Input/output error")])
    with caplog.at_level(logging.WARNING, logger="copg_jax.checkpoint"):
        restored = ckpt.restore_latest(manager, _state(0))
    assert restored.step == 2 and read == [2, 2]
    _assert_state_equal(restored.state, 2)
    assert any("I/O error" in r.message and "reading it again" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("errors", "reads_of_2"),
    [
        ([TimeoutError("read timed out")] * 3, 3),  # still failing after every retry
        ([FileNotFoundError(2, "No such file")], 1),  # a missing file is not a hiccup: no retry
    ],
    ids=["lasting_io_error", "missing_file"],
)
def test_a_read_error_that_lasts_falls_back(tmp_path, monkeypatch, errors, reads_of_2):
    manager = _save_steps(tmp_path / "c", [1, 2], keep_last=3)
    read = _failing_reads(monkeypatch, manager, 2, list(errors))
    assert ckpt.restore_latest(manager, _state(0)).step == 1
    assert read == [2] * reads_of_2 + [1]


def test_all_corrupt_raises_naming_the_directory(tmp_path):
    directory = tmp_path / "c"
    _save_steps(directory, [1, 2], keep_last=3)
    for s in (1, 2):
        (directory / str(s) / "meta" / "metadata").write_text("{broken")
    with pytest.raises(ckpt.CheckpointError, match=f"no readable checkpoint in {directory}") as error:
        ckpt.restore_latest(ckpt.make_manager(directory), _state(0))
    message = str(error.value)  # one line, each step's reason in it
    assert "\n" not in message and message.index("step 2 (") < message.index("; step 1 (")


def test_half_written_step_is_never_listed(tmp_path):
    """A process killed while its async save is in flight leaves only orbax's temporary folder behind."""
    directory = tmp_path / "c"
    _save_steps(directory, [1], keep_last=3)
    script = textwrap.dedent(
        f"""
        import os, jax.numpy as jnp
        from copg_jax import checkpoint as ckpt
        m = ckpt.make_manager({str(directory)!r}, async_save=True)
        big = {{"w": jnp.ones((4096, 4096), jnp.float32), "step": jnp.int32(2),
               "b": jnp.zeros((3,), jnp.bfloat16), "rng": jnp.zeros((2,), jnp.uint32)}}
        ckpt.save(m, 2, big, {{"epoch": 0, "index": 2}})
        os._exit(0)  # die before the background write commits
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    leftovers = sorted(p.name for p in directory.iterdir())
    assert "2" not in leftovers, leftovers  # never committed under its final name
    manager = ckpt.make_manager(directory)
    assert manager.all_steps() == [1]
    assert ckpt.restore_latest(manager, _state(0)).step == 1


@pytest.mark.parametrize("damage", ["{bad", "", '["eval/loss"]', '{"eval/loss": "low"}'])
def test_a_damaged_metrics_item_is_rewritten_or_set_aside_not_a_stop_naming_no_file(tmp_path, caplog, damage):
    """Orbax reads every step's keep-best metrics (`<step>/metrics/metrics`) while building a manager: a
    damaged one stopped resume, export and eval with a JSON error naming no file. A writable manager rewrites
    it from the step's metadata, which records them (setting the whole step aside had retrained up to
    `every_steps` updates of a readable state), and ranks the step by them. Where the metadata is damaged
    too, it sets the step aside as `<step>.corrupt` (warning naming the file) and resumes from the step
    before; a read-only one (export, eval) does not read the metrics, and restores the step itself."""
    import shutil

    directory = tmp_path / "c"
    metrics = {1: {"eval/loss": 2.0}, 2: {"eval/loss": 1.0}, 3: {"eval/loss": 3.0}}
    _save_steps(directory, [1, 2, 3], metrics, keep_last=1, keep_best=1, async_save=False)
    assert sorted(p.name for p in directory.iterdir()) == ["2", "3"]
    (directory / "2" / "metrics" / "metrics").write_text(damage)
    shutil.copytree(directory, tmp_path / "copy")
    shutil.copytree(directory, tmp_path / "read_only")
    with caplog.at_level(logging.WARNING, logger="copg_jax.checkpoint"):
        manager = ckpt.make_manager(directory, keep_last=1, keep_best=1)
    assert manager.all_steps() == [2, 3] and "rewrote it from the step's metadata" in caplog.text
    assert json.loads((directory / "2" / "metrics" / "metrics").read_text()) == {"eval/loss": 1.0}
    assert manager.best_step() == 2
    caplog.clear()
    directory = tmp_path / "copy"
    edited = json.loads((directory / "2" / "meta" / "metadata").read_text())
    edited["metrics"]["eval/loss"] = -5.0
    (directory / "2" / "meta" / "metadata").write_text(json.dumps(edited))
    with caplog.at_level(logging.WARNING, logger="copg_jax.checkpoint"):
        manager = ckpt.make_manager(directory, keep_last=1, keep_best=1)
    assert manager.all_steps() == [3] and (directory / "2.corrupt" / "metrics").is_dir()
    named = str(directory / "2" / "metrics" / "metrics")
    assert any(named in r.message for r in caplog.records), [r.message for r in caplog.records]
    assert any("set aside unreadable checkpoint step 2" in r.message for r in caplog.records)
    assert ckpt.restore_latest(manager, _state(0)).step == 3
    read_only = ckpt.make_manager(tmp_path / "read_only", keep_best=1, read_only=True)
    assert ckpt.restore_latest(read_only, _state(0), step=2).step == 2


def test_an_unfinished_save_is_removed_by_a_writable_manager_only(tmp_path, caplog):
    """A save killed mid-write leaves `<step>.orbax-checkpoint-tmp*`, which orbax removes only when that step
    number is saved again: a resume (a writable manager) removes it, naming it; a read-only manager (export,
    eval, perhaps beside a run still saving) leaves it."""
    directory = tmp_path / "c"
    _save_steps(directory, [1], keep_last=3, async_save=False)
    unfinished = directory / f"2{ckpt.TMP_SUFFIX}"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "part").write_bytes(b"half")
    assert ckpt.make_manager(directory, read_only=True).all_steps() == [1] and unfinished.exists()
    with caplog.at_level(logging.WARNING, logger="copg_jax.checkpoint"):
        manager = ckpt.make_manager(directory)
    assert not unfinished.exists() and manager.all_steps() == [1]
    assert any(str(unfinished) in r.message for r in caplog.records)


def test_checksums_are_sharding_independent():
    x = jnp.arange(4096, dtype=jnp.float32) * 1.37
    mesh = make_mesh(8, 1, 1)
    sharded = jax.device_put(x, logical_sharding(mesh, ("batch",)))
    assert ckpt.state_checksums({"x": x}) == ckpt.state_checksums({"x": sharded})
    assert ckpt.state_checksums({"x": x}) != ckpt.state_checksums({"x": x.at[17].add(1e-3)})


def test_checksums_of_many_sharded_and_replicated_leaves_do_not_deadlock_xla_cpu():
    """200 leaves, sharded and replicated by turns, on 2 CPU devices: a program per leaf, queued at once,
    deadlocked XLA:CPU (a device takes only so many programs in flight; an all-reduce waited for the device
    whose part could not be queued) in about 1 save of 8 on the 2-device trainer, and every time here. The
    checksums equal the sums of the leaves' bits computed in numpy."""
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from copg_jax.checkpoint import state_checksums

        mesh = Mesh(np.array(jax.devices()), ("x",))
        host = {f"l{i:03d}": np.arange(16 * (1 + i % 5), dtype=np.float32) * 1.37 + i for i in range(200)}
        state = {k: jax.device_put(v, NamedSharding(mesh, P("x") if i % 2 else P()))
                 for i, (k, v) in enumerate(host.items())}
        for _ in range(10):
            sums = state_checksums(state)
        expected = {f"['{k}']": int(v.view(np.uint32).sum(dtype=np.uint32)) for k, v in host.items()}
        assert sums == expected, [k for k in expected if sums.get(k) != expected[k]][:5]
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_warn_stuck_timeout_seconds=10 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=20"
    )
    cmd = [sys.executable, "-c", script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-1500:]


def test_resume_past_a_corrupt_step_can_save_that_step_again(tmp_path):
    directory = tmp_path / "c"
    _save_steps(directory, [1, 2], keep_last=3, async_save=False)
    (directory / "2" / "meta" / "metadata").write_text("{broken")
    manager = ckpt.make_manager(directory, keep_last=3, async_save=False)
    restored = ckpt.restore_latest(manager, _state(0))
    assert restored.step == 1
    assert ckpt.set_aside_newer(manager, restored.step) == [str(directory / "2.corrupt")]
    assert (directory / "2.corrupt" / "meta" / "metadata").read_text() == "{broken"  # kept for inspection
    ckpt.save(manager, 2, _state(2), {"epoch": 0, "index": 2})  # orbax refused: "step 2 already exists"
    manager.wait_until_finished()
    assert ckpt.restore_latest(ckpt.make_manager(directory), _state(0)).step == 2


def test_a_best_metric_no_evaluation_gives_is_refused_before_a_save_ranks_by_it():
    """A mistyped checkpoint.best_metric ranked every checkpoint by nothing, and the best one was deleted as
    the worst; the training loss is not saved with checkpoints at all."""
    import types

    from copg_jax import train as tr
    from copg_jax.config import ConfigError, apply_overrides, from_dict
    from copg_jax.run_config import Config

    def cfg(*overrides):
        base = {"model": {"config": {"model_type": "llama"}, "tokenizer": "tok"}}
        return from_dict(Config, apply_overrides(base, ["checkpoint.keep_best=1", *overrides]))

    with pytest.raises(ConfigError, match="checkpoint.best_metric: must be an evaluation metric"):
        cfg("checkpoint.best_metric=loss")
    run = types.SimpleNamespace(cfg=cfg("checkpoint.best_metric=eval/losss"))
    with pytest.raises(
        ValueError, match=r"best_metric='eval/losss' is not among the evaluation metrics \['eval/"
    ):
        tr.save(run, None, 4, {"eval/loss": 1.0, "eval/reward_acc": 0.5})
