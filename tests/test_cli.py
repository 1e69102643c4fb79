"""The `copg` CLI end to end on configs/tiny_cpu.yaml: train, resume (bitwise), SIGTERM, corrupt checkpoints,
eval and export, in subprocesses that share a persistent compilation cache."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from copg_jax import cli
from copg_jax import train as tr
from copg_jax.jsonl import read_jsonl
from copg_jax.runlock import lock_run_folder

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def _env(cache: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        # one device (the last count given is the one XLA takes); conftest's -O0 carries over
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny_cpu.yaml with absolute inputs and outputs in a temp folder, reference cache precomputed."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"]["tokenizer"] = str(REPO / cfg["model"]["tokenizer"])
    for key in ("path", "eval_path"):
        cfg["data"][key] = str(REPO / cfg["data"][key])
    cfg["data"]["ref_cache"] = str(root / "ref" / "train.parquet")
    cfg["data"]["eval_ref_cache"] = str(root / "ref" / "eval.parquet")
    cfg["train"]["progress"] = False
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = _env(root / "jax_cache")
    _copg(env, "precompute-ref", "--config", str(config))
    return {"root": root, "config": str(config), "env": env}


def _start(env, *args) -> subprocess.Popen:
    """`copg ARGS` started in the background: commands that do not depend on each other run side by side
    (each spends seconds on one core importing and compiling), then `_finish` waits for each."""
    return subprocess.Popen(
        [sys.executable, "-m", "copg_jax.cli", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, check=True) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and out.returncode != 0:
        args = proc.args[3:]
        raise AssertionError(f"copg {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-4000:]}")
    return out


def _copg(env, *args, check=True) -> subprocess.CompletedProcess:
    return _finish(_start(env, *args), check=check)


def test_unknown_subcommand_lists_the_valid_ones(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'trian'" in err
    for name in ("train", "eval", "export", "precompute-ref"):
        assert name in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=0.1", ["unknown config key 'optim.lrr'", "did you mean 'lr'", "'warmup_steps'"]),
        ("trian.steps=3", ["unknown config key 'trian'", "did you mean 'train'"]),
        ("optim.lr=fast", ["optim.lr", "expected a number"]),
        ("loss.name=ppo", ["loss.name", "'ppo'", "copg"]),
        ("data.layout=diagonal", ["data.layout='diagonal'"]),
    ],
)
def test_bad_config_keys_fail_clearly(capsys, override, expected):
    assert cli.main(["train", "--config", str(TINY), override]) == 2
    err = capsys.readouterr().err
    assert "config error" in err
    for text in expected:
        assert text in err, (text, err)


def test_overrides_after_an_option_are_read_and_config_is_given_by_option(capsys):
    """`--on-bad-row skip optim.lrr=1`: the override after an option was refused as an unrecognised
    argument (argparse); now read (its key is checked). `config=X.yaml` names --config."""
    assert cli.main(["train", "--config", str(TINY), "--on-bad-row", "skip", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_config_args([f"config={TINY}"], "copg train", "")
    assert "give the config file as --config FILE" in capsys.readouterr().err


def test_bad_key_exit_status_from_the_script(tiny):
    out = _copg(tiny["env"], "train", "--config", tiny["config"], "checkpoint.evry_steps=3", check=False)
    assert out.returncode == 2
    assert "checkpoint.evry_steps" in out.stderr and "every_steps" in out.stderr


def test_train_resume_export_eval(tiny, capsys, caplog):
    root, env, config = tiny["root"], tiny["env"], tiny["config"]
    straight, resumed = root / "straight", root / "resumed"
    _copg(env, "train", "--config", config, f"train.output_dir={straight}")
    # the eval command on the finished run, beside the interrupted run (which compiles nothing new)
    evaluating = _start(env, "eval", "--config", config, "--checkpoint", str(straight))

    # the run folder: resolved config, metrics, TensorBoard events, checkpoints (keep_last 2 + best 1), export
    assert (straight / "config.yaml").is_file()
    rows = read_jsonl(straight / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10, 12]
    for key in ("rewards/margins", "kl/seq", "grad_norm", "lr", "perf/tokens_per_s", "perf/mfu"):
        assert all(r[key] is not None for r in train_rows), key
    assert [r["step"] for r in rows if "eval/loss" in r] == [4, 8, 12]
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    kept = sorted(int(p.name) for p in (straight / "checkpoints").iterdir() if p.name.isdigit())
    best = min((r for r in rows if "eval/loss" in r), key=lambda r: r["eval/loss"])["step"]
    assert kept == sorted({8, 12, best})
    assert (straight / "export" / "config.json").is_file()
    assert (straight / "export" / "tokenizer.json").is_file()
    # starting over on the finished run's folder is refused before anything of the run is touched (it wiped
    # the metrics, then failed at a step number both had, or kept the old run's later steps beside its own)
    before = {p: (straight / p).read_bytes() for p in ("metrics.jsonl", "config.yaml")}
    out = _copg(env, "train", "--config", config, f"train.output_dir={straight}", "checkpoint.resume=false",
                check=False)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{straight / 'checkpoints'} holds checkpoints of an earlier run (steps " in out.stderr
    assert {p: (straight / p).read_bytes() for p in before} == before

    # interrupted at step 5 (checkpoints 4 and 5), latest one garbled: resume falls back to 4 with a warning
    out = _copg(env, "train", "--config", config, f"train.output_dir={resumed}", "--stop-after", "5")
    assert "interrupted at step 5" in out.stdout
    chunks = [
        p for p in (resumed / "checkpoints" / "5" / "state").rglob("*") if p.is_file() and "/d/" in str(p)
    ]
    for p in chunks:
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        p.write_bytes(bytes(raw))
    out = _copg(env, "train", "--config", config, f"train.output_dir={resumed}")
    assert "checkpoint step 5" in out.stderr and "corrupt" in out.stderr
    assert "resumed from" in out.stderr and "at step 4" in out.stderr
    assert "finished at step 12" in out.stdout
    # bitwise the same policy as the uninterrupted run (float32 safetensors bytes)
    exported = (resumed / "export" / "model.safetensors").read_bytes()
    assert exported == (straight / "export" / "model.safetensors").read_bytes()
    # resumed against another reference (a random init of another seed; another model.path): refused before
    # the reference cache is recomputed for it (it was, and the policy went on toward the new reference)
    cache = (root / "ref" / "train.parquet").read_bytes()
    assert cli.main(["train", "--config", config, f"train.output_dir={resumed}", "train.seed=7"]) == 1
    err = capsys.readouterr().err
    assert f"{resumed / 'checkpoints'}: step 12 was trained against another reference policy" in err
    assert (root / "ref" / "train.parquet").read_bytes() == cache
    # resumed over other rows (a file of as many rows, in another order): refused, before the cache is made
    lines = (REPO / "examples" / "tiny" / "train.jsonl").read_text().splitlines(keepends=True)
    (root / "shuffled.jsonl").write_text("".join(lines[1:] + lines[:1]))
    args = [
        "train",
        "--config",
        config,
        f"train.output_dir={resumed}",
        f"data.path={root / 'shuffled.jsonl'}",
    ]
    assert cli.main(args) == 1
    assert "saved for another row order (the rows' content" in capsys.readouterr().err
    assert (root / "ref" / "train.parquet").read_bytes() == cache

    # export of a run by the export command; eval of a checkpoint by the eval command
    out_dir = root / "exported"
    _copg(env, "export", "--run", str(resumed), "--out", str(out_dir))
    assert (out_dir / "model.safetensors").read_bytes() == exported
    out = _finish(evaluating)
    metrics = json.loads(out.stdout[out.stdout.index("{") :])
    assert metrics["step"] == 12
    final_eval = [r for r in rows if "eval/loss" in r][-1]
    assert metrics["eval/loss"] == pytest.approx(final_eval["eval/loss"], rel=1e-5)
    # an exported folder holds one set of weights: a step asked of it is refused, not ignored
    assert cli.main(["eval", "--config", config, "--checkpoint", str(out_dir), "--step", "8"]) == 1
    capsys.readouterr()

    # resumed with another loss.beta and a longer cosine schedule: refused before any data is read, naming
    # both (it trained on, silently, and config.yaml forgot what steps 1-12 were trained with) ...
    config_before = (resumed / "config.yaml").read_text()
    longer = ["train", "--config", config, f"train.output_dir={resumed}", "loss.beta=0.25", "train.steps=16"]
    assert cli.main(longer) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 12 was trained with other settings of what the run learns" in err
    assert "loss.beta 0.1 -> 0.25" in err and "train.steps 12 -> 16 (the learning rate after step 12" in err
    assert "checkpoint.allow_changes=[loss.beta,train.steps]" in err
    assert (resumed / "config.yaml").read_text() == config_before
    # ... and resumed when allowed, with a warning; config.yaml keeps the one steps 1-12 were trained with
    allowed = [*longer, "checkpoint.allow_changes=[loss, train.steps]", "--stop-after", "12"]
    with caplog.at_level(logging.WARNING, logger="copg_jax.train"):
        assert cli.main(allowed) == 0
    assert "resuming step 12 with changed settings (checkpoint.allow_changes): loss.beta 0.1 -> 0.25" in (
        caplog.text
    )
    assert (resumed / "config.until-step-12.yaml").read_text() == config_before
    assert yaml.safe_load((resumed / "config.yaml").read_text())["loss"]["beta"] == 0.25


def test_second_train_on_a_run_folder_stops_with_one_line(tiny):
    """Another run (this process) holds the folder: `copg train` there stops before writing anything."""
    run = tiny["root"] / "taken"
    held = lock_run_folder(run)
    try:
        out = _copg(tiny["env"], "train", "--config", tiny["config"], f"train.output_dir={run}", check=False)
    finally:
        held.release()
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = f"copg train: error: run folder {run} is in use by pid {os.getpid()} on host"
    assert [x for x in out.stderr.splitlines() if x.startswith("copg train:")][0].startswith(line)
    assert list(run.iterdir()) == []  # no config.yaml, metrics or checkpoints of a second writer


def test_a_checkpoint_folder_outside_the_run_folder_has_one_writer_too(tiny, capsys):
    """Two runs of their own folders sharing one checkpoint.dir deleted each other's steps and read
    half-written ones: the second stops with one line naming the holder, before writing anything."""
    shared = tiny["root"] / "shared_checkpoints"
    held = lock_run_folder(shared)
    try:
        args = ["train", "--config", tiny["config"], f"train.output_dir={tiny['root'] / 'other'}"]
        assert cli.main([*args, f"checkpoint.dir={shared}"]) == 1
    finally:
        held.release()
    assert f"run folder {shared} is already in use by this process" in capsys.readouterr().err
    assert not (tiny["root"] / "other" / "config.yaml").exists()
    assert not tr._inside(str(shared), str(tiny["root"] / "other"))
    assert tr._inside(str(tiny["root"] / "other" / "checkpoints"), str(tiny["root"] / "other"))
    (tiny["root"] / "link").symlink_to(tiny["root"] / "other")  # the run folder by another name
    assert tr._inside(str(tiny["root"] / "other" / "checkpoints"), str(tiny["root"] / "link"))


def test_sigterm_saves_a_checkpoint_and_exits_with_its_status(tiny):
    """SIGTERM: a checkpoint at the current step, then exit status 143 (128 + SIGTERM): the run is not
    finished, and a scheduler told 0 counted a preempted job as done (never resumed)."""
    run = tiny["root"] / "sigterm"
    args = [
        sys.executable, "-m", "copg_jax.cli", "train", "--config", tiny["config"], f"train.output_dir={run}",
        "train.steps=100000", "train.log_every=1", "train.eval_every=0", "checkpoint.every_steps=0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, env=tiny["env"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "interrupted at step" in stdout
    step = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert 1 <= step < 100000
    assert (run / "checkpoints" / str(step) / "state").is_dir()


def test_stale_cache_of_another_random_init_reference_is_recomputed_not_used(tiny, tmp_path):
    # The tiny model is random-init (no model.path): the cache is checked against its initial weights, so a
    # different seed -- a different reference policy -- must not train against the old cache: `copg train`
    # recomputes it (one command, no precompute-ref), saying what changed, and reuses it when it is current.
    shutil.copytree(tiny["root"] / "ref", tmp_path / "ref")
    old = pq.read_schema(tmp_path / "ref" / "train.parquet").metadata[b"copg_ref_cache"]
    args = [
        "train", "--config", tiny["config"], f"train.output_dir={tmp_path / 'seed7'}", "train.seed=7",
        "train.steps=1", f"data.ref_cache={tmp_path / 'ref' / 'train.parquet'}",
        f"data.eval_ref_cache={tmp_path / 'ref' / 'eval.parquet'}",
    ]  # fmt: skip
    out = _copg(tiny["env"], *args)
    assert "computed for different inputs" in out.stderr and "the reference model" in out.stderr
    assert "Recomputing it." in out.stderr and "not checked" not in out.stderr
    new = pq.read_schema(tmp_path / "ref" / "train.parquet").metadata[b"copg_ref_cache"]
    assert json.loads(new)["fingerprint"]["model"] != json.loads(old)["fingerprint"]["model"]
    again = _copg(tiny["env"], *args[:3], f"train.output_dir={tmp_path / 'again'}", *args[4:])
    assert "recomputing" not in again.stderr and "does not exist" not in again.stderr


def test_on_bad_row_flag_skips_and_reports(tiny, tmp_path):
    rows = read_jsonl(REPO / "examples" / "tiny" / "train.jsonl")[:9]
    rows[3]["rewards"][1] = float("nan")
    data = tmp_path / "with_bad_row.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "precompute-ref", "--config", tiny["config"], f"data.path={data}", "data.eval_path=",
        f"data.ref_cache={tmp_path / 'ref.parquet'}",
    ]  # fmt: skip
    failing = _start(tiny["env"], *args)  # fails before it writes the cache; runs beside the skipping one
    skipping = _start(tiny["env"], *args, "--on-bad-row", "skip")
    failed = _finish(failing, check=False)
    assert failed.returncode != 0
    assert "with_bad_row.jsonl" in failed.stderr and "row 3" in failed.stderr and "rewards" in failed.stderr
    skipped = _finish(skipping)
    assert "8/9 rows kept" in skipped.stderr and "skipped 1 rows" in skipped.stderr
    assert (tmp_path / "ref.parquet").is_file()


def test_bad_input_errors_are_one_clean_line(tiny, tmp_path):
    missing = tmp_path / "nope.jsonl"
    args = ["precompute-ref", "--config", tiny["config"], f"data.path={missing}"]
    with_traceback = _start({**tiny["env"], "COPG_TRACEBACK": "1"}, *args)
    out = _copg(tiny["env"], *args, check=False)
    assert out.returncode == 1
    assert f"copg precompute-ref: error: data file '{missing}' does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    assert "Traceback" in _finish(with_traceback, check=False).stderr


FAILING_COMMAND = """
import threading, time

def run(argv):
    threading.Thread(target=time.sleep, args=(600,), name="stuck-save").start()  # never finishes
    raise ValueError("the write failed")
"""


def test_a_failed_command_exits_though_a_background_thread_never_ends(tmp_path):
    """A save's threads stuck after a failed write kept the `copg` process from ever exiting after its
    one-line error: it waits THREAD_GRACE_S for them, then exits with its status."""
    (tmp_path / "failing_command.py").write_text(FAILING_COMMAND)
    script = (
        "import sys; from copg_jax import cli; cli.THREAD_GRACE_S = 1.0; "
        "cli.COMMANDS['fail'] = ('failing_command:run', ''); sys.argv = ['copg', 'fail']; "
        "sys.exit(cli.main())"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "copg fail: error: the write failed",
        "copg: 1 background thread(s) (stuck-save) still running 1s after the error; exiting without them",
    ]


INTERRUPTED_SETUP = """
import sys
from copg_jax import cli, train

def interrupted(cfg):
    raise KeyboardInterrupt

train.setup = interrupted
sys.argv = ["copg", "train", "--config", sys.argv[1], "train.output_dir=" + sys.argv[2]]
cli.main()
"""


def test_ctrl_c_before_training_starts_is_one_line(monkeypatch, capsys, tmp_path):
    """Ctrl-C while a run is set up (data tokenised, reference cache computed), before the training loop
    that stops with a checkpoint: one line, not a KeyboardInterrupt traceback, and the command dies of
    SIGINT as before (a shell loop around it stops); called as a library, the interrupt is the caller's."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_SETUP)
    out = subprocess.run(
        [sys.executable, str(script), str(TINY), str(tmp_path / "run")],
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == -signal.SIGINT and out.stderr == "copg train: interrupted (Ctrl-C)\n"

    monkeypatch.setattr(tr, "setup", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", "--config", str(TINY), f"train.output_dir={tmp_path / 'run'}"])
    assert capsys.readouterr().err == "copg train: interrupted (Ctrl-C)\n"


def test_a_peer_lost_in_a_collective_is_said_so_whatever_its_error_type(monkeypatch, capsys, tmp_path):
    """gloo's lost peer reaches a process as a ValueError from multihost_utils (inside orbax's barriers):
    it printed as bad input, without the hint that another process stopped."""
    lost = "UNKNOWN: Gloo AllGather failed: [../third_party/gloo]: Connection reset by peer"
    monkeypatch.setattr(tr, "setup", lambda cfg: (_ for _ in ()).throw(ValueError(lost)))
    monkeypatch.setattr(cli, "_distributed", lambda: True)
    monkeypatch.setattr(cli, "_leave_run", lambda status, owns_process: status)  # not os._exit here
    assert cli.main(["train", "--config", str(TINY), f"train.output_dir={tmp_path / 'run'}"]) == 1
    assert capsys.readouterr().err == (
        "copg train: error: a collective failed, most likely because another process of the run stopped (its "
        f"log says why): {lost}\n"
    )


def test_what_process_0_failed_to_do_is_one_line_on_the_other_processes(monkeypatch, capsys, tmp_path):
    """In a multi-process run the other processes raise MainProcessError (process 0 failed to write the
    reference cache, say): its one line, not a traceback, which process 0's log already has."""
    from copg_jax.sharding import MainProcessError

    said = "process 0 failed to write ref.parquet: OSError: [Errno 28] No space left on device"
    monkeypatch.setattr(tr, "setup", lambda cfg: (_ for _ in ()).throw(MainProcessError(said)))
    monkeypatch.setattr(cli, "_distributed", lambda: True)
    monkeypatch.setattr(cli, "_leave_run", lambda status, owns_process: status)  # not os._exit here
    assert cli.main(["train", "--config", str(TINY), f"train.output_dir={tmp_path / 'run'}"]) == 1
    assert capsys.readouterr().err == f"copg train: error: {said}\n"
