"""Multi-process runs on one machine (2 CPU processes on 127.0.0.1, local_multiprocess.sh); launch scripts.

Each test launches tests/test_multihost_worker.py under the launcher (bounded by a timeout; the launcher kills
every process when one fails) and compares what each process computed with a single-process reference.
"""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
WORKER = ROOT / "tests" / "test_multihost_worker.py"


def launch(
    phase: str, out: Path, num: int = 2, devices: int = 2, timeout_s: int = 150, *args: str
) -> list[dict]:
    # the launcher appends each process's device count to XLA_FLAGS (the last counts); conftest's -O0 stays
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env |= {"COPG_LOCAL_DEVICES": str(devices), "COPG_TIMEOUT_S": str(timeout_s), "PYTHONPATH": str(ROOT)}
    env |= {"COPG_LOG_DIR": str(out / "logs")}
    cmd = [str(LAUNCH), str(num), sys.executable, str(WORKER), phase, str(out), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s + 30)
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((out / "logs").glob("*.log"))
        )
        pytest.fail(f"launcher exited {proc.returncode}: {proc.stderr[-2000:]}\n{logs}")
    return [json.loads((out / f"{phase}_{i}.json").read_text()) for i in range(num)]


def test_two_processes_collectives_and_sharded_jit(tmp_path):
    from copg_jax.runlock import lock_run_folder

    held = lock_run_folder(tmp_path / "locked")  # another run (this process) writes there
    try:
        results = launch("collectives", tmp_path / "out")
    finally:
        held.release()
    rows = 4 * 4  # 2 processes x 2 devices, 4 rows per device
    full = np.arange(rows * 3, dtype=np.float64).reshape(rows, 3)
    for rank, r in enumerate(results):
        assert (r["rank"], r["count"], r["devices"]) == (rank, 2, 4)
        np.testing.assert_allclose(r["sum_sq"], np.sum(full**2), rtol=1e-6)
        np.testing.assert_allclose(r["psum"], np.sum(full), rtol=1e-6)
        np.testing.assert_allclose(r["projected"], full @ np.array([1.0, 2.0, 3.0]), rtol=1e-6)
        assert r["gathered"] == [[0, 0], [1, 10]]
        # A real matmul rate on a CPU device (~1e10-1e11); timing a device of another process gave ~1e14.
        assert 1e8 < r["matmul_flops"] < 5e12, r["matmul_flops"]
        # one run-folder lock per run: process 0 holds it, all processes stop together at a held one
        assert r["lock_holder_pid"] == results[0]["pid"]
        assert r["requeued_holder_pid"] == results[0]["pid"] and r["requeued_wait"] >= 0.9
        assert f"in use by pid {os.getpid()}" in results[0]["refused"]
        assert "in use by another run (process 0 says which)" in results[1]["refused"]
    # a write process 0 does for all: its result there; its failure raised by every process together
    assert [r["main_result"] for r in results] == [42, None]
    assert results[0]["main_failure"] == "OSError: No space left on device: 'config.yaml'\nsecond line"
    assert results[1]["main_failure"] == (
        "MainProcessError: process 0 failed to write config.yaml: OSError: No space left on device: "
        "'config.yaml'"
    )


class FakeTpu:
    """A device as mesh_utils reads it, on a multi-slice TPU job: id, slice, process (laid out like CPU)."""

    platform = device_kind = "cpu"

    def __init__(self, id: int, slice_index: int):
        self.id, self.slice_index, self.process_index = id, slice_index, id // 4

    def __repr__(self):
        return f"D{self.id}/s{self.slice_index}"


def test_over_several_slices_only_the_data_axis_crosses_them(caplog):
    """Two slices of 8 chips, listed interleaved: data 4 x fsdp 2 x tensor 2 puts each slice's devices at
    data 0-1 and 2-3 (fsdp and tensor traffic stays within a slice, as an expert axis's does); a data axis
    the slices do not divide falls back to the listed order with a warning, as does a single-slice CPU mesh
    never reorder."""
    from copg_jax.sharding import device_grid, make_mesh

    devices = [FakeTpu(i, i % 2) for i in range(16)]
    grid = device_grid((4, 2, 1, 2), devices)
    assert grid.shape == (4, 2, 1, 2)
    assert {d.slice_index for d in grid[:2].flat} == {0} and {d.slice_index for d in grid[2:].flat} == {1}
    experts = device_grid((2, 1, 4, 2), devices)  # an expert axis stays within a slice too
    assert [{d.slice_index for d in experts[i].flat} for i in range(2)] == [{0}, {1}]
    with caplog.at_level(logging.WARNING, logger="copg_jax.sharding"):
        fallback = device_grid((1, 16, 1, 1), devices)
    assert list(fallback.flat) == devices
    assert "mesh.data=1 is not a multiple of the 2 slices" in caplog.text
    import jax

    assert list(make_mesh(2, 2, 2).devices.flat) == jax.devices()  # CPU: the devices' own order


def test_a_step_one_process_cannot_read_is_passed_over_by_every_process(tmp_path):
    """A damaged chunk of step 2 that only process 1 reads: both fall back to step 1 together (process 1
    alone falling back paired the collectives of different steps and hung the resume)."""
    results = launch("checkpoint_fallback", tmp_path / "out", 2, 2, 120, str(tmp_path / "ckpt"))
    assert results == [{"saved": [1, 2], "step": 1, "right": True}] * 2


def _write_not_finished(folder) -> str:
    """What every process of a run raises when a checkpoint write into `folder` failed on one of them."""
    return (
        f"{folder}: a checkpoint write did not finish on every process within checkpoint.async_timeout_s: it "
        "failed on some process (its log says why), or the storage is slower than that"
    )


def test_a_background_checkpoint_write_failing_on_one_process_stops_every_process(tmp_path):
    """Process 1's async write fails (a full disk there): the others wait for it in orbax's barrier until
    checkpoint.async_timeout_s (default 20 minutes, 10 s here), then the next save raises on both processes
    saying why it most likely did, not a collective's deadline."""
    (tmp_path / "out").mkdir()
    results = launch("checkpoint_async_failure", tmp_path / "out", 2, 2, 120, str(tmp_path / "ckpt"))
    for r in results:
        assert r["raised"] == _write_not_finished(tmp_path / "ckpt")
        assert 9 < r["seconds"] < 60


def test_what_one_process_sees_otherwise_stops_every_process(tmp_path):
    """Checkpoint steps listed differently, a different --stop-after, and a synchronous save failing on one
    process (each hung the run or trained it on a mixed state): refused on both, the save within
    checkpoint.async_timeout_s."""
    (tmp_path / "out").mkdir()
    results = launch("disagreements", tmp_path / "out", 2, 2, 120, str(tmp_path / "ckpt"))
    for r in results:
        assert r["steps"] == (
            f"{tmp_path / 'ckpt'}: the processes list different checkpoint steps (the latest: process 0: 4, "
            "process 1: 2, or other steps before it): every process must see the same folder; a shared "
            "filesystem's listing may lag (a list cache): resume once it agrees"
        )
        assert r["stop"] == (
            "the processes were started with different --stop-after (process 0: none, process 1: 3): every "
            "process of a run needs the same command line"
        )
        assert r["save"] == _write_not_finished(tmp_path / "ckpt")
        assert 9 < r["seconds"] < 60


def test_resolve_reads_config_then_environment(monkeypatch):
    from copg_jax.distributed import DistributedConfig, maybe_initialize_distributed, resolve

    for var in (
        "COPG_COORDINATOR_ADDRESS",
        "COPG_NUM_PROCESSES",
        "COPG_PROCESS_ID",
        "JAX_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert resolve(DistributedConfig()) == (None, None, None)
    monkeypatch.setenv("COPG_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("COPG_NUM_PROCESSES", "4")
    monkeypatch.setenv("COPG_PROCESS_ID", "3")
    assert resolve(DistributedConfig()) == ("10.0.0.1:1234", 4, 3)
    assert resolve(DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=0)) == (
        "h:1",
        2,
        0,
    )
    with pytest.raises(ValueError, match="process_id 5 is outside"):
        maybe_initialize_distributed(DistributedConfig(num_processes=2, process_id=5))
    monkeypatch.setenv("COPG_NUM_PROCESSES", "four")
    with pytest.raises(ValueError, match="not an integer: 'four'"):
        resolve(DistributedConfig())
    monkeypatch.setenv("COPG_NUM_PROCESSES", "1")  # a single process: nothing to initialise
    info = maybe_initialize_distributed(DistributedConfig())
    assert (info.process_index, info.process_count) == (0, 1)
    monkeypatch.delenv("COPG_NUM_PROCESSES")  # a rank without a count: rank 1 ran alone as process 0
    monkeypatch.setenv("COPG_PROCESS_ID", "1")
    with pytest.raises(ValueError, match="process_id 1 is set .* without num_processes"):
        maybe_initialize_distributed(DistributedConfig())


def _fake_bin(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_slurm_script_sets_coordinator_and_rank_per_task(tmp_path):
    """The script's real path (not --dry-run): srun is faked, running the task command twice with SLURM_PROCID
    0 and 1 as two tasks would; each task's process sees the coordinator and its rank."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "scontrol", 'printf "gpu-node7\\ngpu-node8\\n"\n')
    fake_srun = 'echo "srun-args: ${@:1:2}"\nwhile [[ "$1" == --* ]]; do shift; done\n'
    fake_srun += 'for r in 0 1; do SLURM_NTASKS=2 SLURM_PROCID=$r "$@"; done\n'
    _fake_bin(bin_dir, "srun", fake_srun)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node[7-8]",
        "SLURM_JOB_ID": "1234",
        "SLURM_NTASKS": "2",  # set by SLURM from the script's #SBATCH --ntasks-per-node
    }
    env |= {"SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(tmp_path)}
    task = [
        "bash",
        "-c",
        'echo "task $COPG_PROCESS_ID/$COPG_NUM_PROCESSES at $COPG_COORDINATOR_ADDRESS: $0"',
        "x y",
    ]
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), *task], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "srun-args: --kill-on-bad-exit=1 --gpus-per-task=1" in out.stdout
    assert (
        "task 0/2 at gpu-node7:29634: x y" in out.stdout and "task 1/2 at gpu-node7:29634: x y" in out.stdout
    )


def test_tpu_script_runs_the_quoted_command_on_every_worker(tmp_path):
    """The script's real path (not --dry-run): gcloud is faked, listing two workers on `describe` and running
    each `ssh --worker=I --command CMD` locally; each worker's command runs with its own settings."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = 'for a in "$@"; do [[ $a == describe ]] && { printf "10.0.0.2\\n10.0.0.3\\n"; exit 0; }; done\n'
    fake += "while [[ $# -gt 0 && $1 != --command ]]; do shift; done\n"
    fake += 'cmd=${2/#cd \\/opt\\/copg/cd .}; bash -c "$cmd"\n'  # run the remote command here
    _fake_bin(bin_dir, "gcloud", fake)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "COPG_REPO_DIR": "/opt/copg", "HOME": str(tmp_path)}
    cmd = [str(ROOT / "launch" / "tpu_pod.sh"), "my-tpu", "us-east5-a", "proj", "--"]
    task = ["bash", "-c", 'echo "task $COPG_PROCESS_ID/$COPG_NUM_PROCESSES at $COPG_COORDINATOR_ADDRESS: $0"']
    out = subprocess.run([*cmd, *task, "a b=1"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):
        assert f"task {rank}/2 at 10.0.0.2:8476: a b=1" in out.stdout, out.stdout


def _start_tagged(tag: str, ignore_term: bool) -> subprocess.Popen:
    trap = 'trap "" TERM; ' if ignore_term else ""
    env = {**os.environ, "COPG_RUN_TAG": tag} if tag else dict(os.environ)
    return subprocess.Popen(["bash", "-c", f"{trap}sleep 120 & wait"], env=env, start_new_session=True)


def _ended(pid: int, wait_s: float = 10) -> bool:
    """Whether process `pid` is gone (or a zombie) within `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


def test_stop_tagged_ends_the_runs_processes_and_only_them():
    """launch/stop_tagged.sh TAG: SIGTERM to the processes whose environment holds COPG_RUN_TAG=TAG, SIGKILL
    to those still running after the grace period (one ignores SIGTERM, as a multi-process JAX process that
    takes it for a preemption notice and hangs); another tag's and untagged processes run on."""
    procs = [_start_tagged("run-a", False), _start_tagged("run-a", True), _start_tagged("run-b", False)]
    procs.append(_start_tagged("", False))
    try:
        stop = ["bash", str(ROOT / "launch" / "stop_tagged.sh"), "run-a", "1"]
        out = subprocess.run(stop, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "process(es) of run run-a still running 1s after SIGTERM; killing them" in out.stderr
        assert [p.wait(timeout=10) for p in procs[:2]] == [-15, -9]
        assert [p.poll() for p in procs[2:]] == [None, None]
        procs.append(_start_tagged("run-c", True))  # no grace: SIGKILL at once
        time.sleep(0.5)
        subprocess.run(
            ["bash", str(ROOT / "launch" / "stop_tagged.sh"), "run-c", "0"], timeout=60, check=True
        )
        assert procs[-1].wait(timeout=10) == -9
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass


def test_a_failed_worker_stops_the_others_on_every_worker(tmp_path):
    """tpu_pod.sh with gcloud faked (each `ssh --worker=I` runs its command here, in the background, as a
    remote command outlives its local ssh): worker 1 fails, and worker 0's command, which ignores SIGTERM, is
    ended on its worker through `ssh --worker=all` running launch/stop_tagged.sh; the script exits with
    worker 1's status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = 'for a in "$@"; do [[ $a == describe ]] && { printf "10.0.0.2\\n10.0.0.3\\n"; exit 0; }; done\n'
    fake += "while [[ $# -gt 0 && $1 != --command ]]; do shift; done\n"
    fake += 'setsid bash -c "$2" &\nwait $!\n'  # a new session: stopping this ssh leaves it running
    _fake_bin(bin_dir, "gcloud", fake)
    repo = tmp_path / "repo"  # the workers' checkout: the command runs there
    repo.mkdir()
    (repo / "launch").symlink_to(ROOT / "launch")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "COPG_REPO_DIR": str(repo), "COPG_KILL_GRACE_S": "1"}
    task = 'if [ "$COPG_PROCESS_ID" = 1 ]; then sleep 1; exit 3; fi; '
    task += 'trap "" TERM; echo $$ > worker0.pid; sleep 120'
    cmd = [str(ROOT / "launch" / "tpu_pod.sh"), "my-tpu", "us-east5-a", "--", "bash", "-c", task]
    out = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 3, out.stderr
    assert "a worker failed with status 3; stopping the others" in out.stderr
    assert _ended(int((repo / "worker0.pid").read_text()))


def test_local_launcher_kills_processes_that_outlive_sigterm(tmp_path):
    """A process that takes SIGTERM as a preemption notice and hangs is killed COPG_KILL_GRACE_S later: when
    another process fails, nothing of the job is left running, not even what it started in a session of its
    own (found by the run's COPG_RUN_TAG) or with an environment of its own (found by its process group);
    also when the launcher is run through a link."""
    task = (
        'if [ "$COPG_PROCESS_ID" = 1 ]; then sleep 1; exit 3; fi; trap "" TERM; echo $$ > p0.pid; '
        "setsid bash -c 'echo $$ > detached.pid; sleep 120' & "
        "env -i bash -c 'trap \"\" TERM; echo $$ > envless.pid; sleep 120' & sleep 120"
    )
    env = {**os.environ, "COPG_KILL_GRACE_S": "1", "COPG_LOG_DIR": str(tmp_path / "logs")}
    (tmp_path / "launch.sh").symlink_to(LAUNCH)
    out = subprocess.run([str(tmp_path / "launch.sh"), "2", "bash", "-c", task], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "still running 1s after SIGTERM; killing them" in out.stderr
    for name in ("p0", "detached", "envless"):
        assert _ended(int((tmp_path / f"{name}.pid").read_text())), name


TINY = {
    "model_type": "llama", "vocab_size": 207, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
}  # fmt: skip


def _tiny_offline_run(tmp_path) -> dict:
    """The base config of a 4-step tiny run on 32 K-way rows, its reference cache computed."""
    from copg_jax.config import apply_overrides, from_dict
    from copg_jax.data.testing import kway_rows, make_tiny_tokenizer, write_jsonl
    from copg_jax.run_config import Config
    from copg_jax.train import precompute_reference

    make_tiny_tokenizer(str(tmp_path / "tok"))
    rows = kway_rows(
        32, seed=3, k_range=(2, 3)
    )  # a field for the reward (constant per prompt: no loss change)
    write_jsonl([{**row, "bonus": float(i)} for i, row in enumerate(rows)], str(tmp_path / "train.jsonl"))
    base = {
        "model": {"config": TINY, "tokenizer": str(tmp_path / "tok"), "dtype": "float32"},
        "data": {"path": str(tmp_path / "train.jsonl"), "ref_cache": str(tmp_path / "ref.parquet"),
                 "batch_size": 8, "pad_multiple": 16, "max_prompt_length": 16, "max_completion_length": 16},
        "optim": {"lr": 0.01, "schedule": "constant"},
        "loss": {"beta": 0.5},
        "train": {"steps": 4, "log_every": 1, "progress": False, "export_on_finish": True},
        "checkpoint": {"every_steps": 0, "async_save": False},
    }  # fmt: skip
    precompute_reference(from_dict(Config, apply_overrides(base, [f"data.cache_dir={tmp_path}/dc"])))
    return base


def _per_process_data_run(
    tmp_path: Path, on_bad_row: str, rollout_prompts: bool = False, extra: str = ""
) -> tuple[int, list[str], float]:
    """`copg train` on 2 processes whose copies of the data differ: process 1's has row 5 damaged (a reward
    list one short); or, `rollout_prompts`, the same data and online rollouts from prompt files whose second
    prompt differs; `extra` overrides (in which $COPG_PROCESS_ID is each process's). (launcher status, each
    process's log, seconds taken)."""
    import yaml

    from copg_jax.data.testing import kway_rows, make_tiny_tokenizer, write_jsonl

    make_tiny_tokenizer(str(tmp_path / "tok"))
    rows = kway_rows(16, seed=3, k_range=(2, 3))
    write_jsonl(rows, str(tmp_path / "data_0.jsonl"))
    rows[5]["rewards"] = rows[5]["rewards"][:-1]
    write_jsonl(
        rows if not rollout_prompts else kway_rows(16, seed=3, k_range=(2, 3)), str(tmp_path / "data_1.jsonl")
    )
    config = {
        "model": {"config": TINY, "tokenizer": str(tmp_path / "tok"), "dtype": "float32"},
        "data": {"batch_size": 4, "pad_multiple": 16, "max_prompt_length": 16, "max_completion_length": 16,
                 "on_bad_row": on_bad_row},
        "lora": {"rank": 2},
        "train": {"steps": 2, "progress": False, "output_dir": str(tmp_path / "run")},
    }  # fmt: skip
    if rollout_prompts:
        (tmp_path / "online_reward.py").write_text(ONLINE_REWARD)
        for i, second in enumerate(("w5 w6", "w5 w7")):
            write_jsonl([{"prompt": "w1 w2"}, {"prompt": second}], str(tmp_path / f"prompts_{i}.jsonl"))
        config["rollout"] = {"every_n_steps": 1, "num_prompts": 2, "num_completions": 2, "max_new_tokens": 4,
                             "reward": {"fn": "online_reward:even_words"}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    task = (
        f"exec {sys.executable} -m copg_jax.cli train --config {tmp_path / 'run.yaml'} "
        f"data.path={tmp_path}/data_$COPG_PROCESS_ID.jsonl data.cache_dir={tmp_path}/cache_$COPG_PROCESS_ID"
    )
    if rollout_prompts:
        task += f" rollout.prompts_path={tmp_path}/prompts_$COPG_PROCESS_ID.jsonl"
    task += f" {extra}"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env |= {"COPG_TIMEOUT_S": "150", "COPG_KILL_GRACE_S": "2", "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    env |= {"COPG_LOG_DIR": str(tmp_path / "logs")}
    start = time.monotonic()
    proc = subprocess.run([str(LAUNCH), "2", "bash", "-c", task], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=200)  # fmt: skip
    logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    return proc.returncode, logs, time.monotonic() - start


@pytest.mark.slow
def test_a_row_only_one_process_rejects_ends_every_process(tmp_path):
    """Process 1's copy of the data has a bad row: it stops with the row's one line and exits at once, not
    in JAX's shutdown barrier waiting for process 0, which waits for it in the next collective (the job hung,
    no process ever exiting); process 0's collective fails and it exits too."""
    status, logs, seconds = _per_process_data_run(tmp_path, "error")
    assert status != 0 and seconds < 120, (status, seconds, logs)
    assert "copg train: error: 1 invalid row(s)" in logs[1] and "row 5: field 'rewards'" in logs[1]
    assert "copg train: error: a collective failed, most likely because another process" in logs[0]
    assert "timeout after" not in logs[0] + logs[1]


@pytest.mark.slow
def test_processes_whose_data_differ_are_refused_together(tmp_path):
    """Under data.on_bad_row=skip process 1 keeps 15 rows, process 0 all 16: each would feed its batch
    shards from a different permutation of different rows, every global batch misaligned, silently. Both
    stop at the start, naming the counts."""
    status, logs, _ = _per_process_data_run(tmp_path, "skip")
    assert status == 1, logs
    for log in logs:
        assert "the processes read different rows from" in log and "process 0: 16, process 1: 15" in log


@pytest.mark.slow
def test_processes_started_with_other_settings_are_refused_together(tmp_path):
    """Process 1 with another loss.beta trained on silently, its gradients mixed into process 0's; another
    train.steps hung the run when the processes' collectives parted. Both stop at the start, naming it."""
    status, logs, _ = _per_process_data_run(tmp_path, "error", extra="loss.beta=0.1$COPG_PROCESS_ID")
    assert status == 1, logs
    for log in logs:
        assert (
            "the processes were started with different settings or code (process 1: loss.beta 0.1 -> " in log
        )
        assert "0.11; against process 0's)" in log


@pytest.mark.slow
def test_a_run_folder_the_processes_do_not_share_is_refused_together(tmp_path):
    """Each host's own disk under the run folder's path: the run trained, then hung in its first collective
    save, each folder holding a part of the checkpoint. Both stop at the start, naming the folder."""
    extra = f"train.output_dir={tmp_path}/run_$COPG_PROCESS_ID"
    status, logs, _ = _per_process_data_run(tmp_path, "error", extra=extra)
    assert status == 1, logs
    for i, log in enumerate(logs):
        assert (
            f"train.output_dir {tmp_path}/run_{i} is not shared by the run's processes: process(es) [1]"
            in log
        )


@pytest.mark.slow
def test_processes_whose_rollout_prompts_differ_are_refused_together(tmp_path):
    """Online rollouts sample each process's share of the prompts drawn from its own prompt file: a second
    prompt that differs on one host paired other prompts with other completions, silently."""
    status, logs, _ = _per_process_data_run(tmp_path, "error", rollout_prompts=True)
    assert status == 1, logs
    for log in logs:
        assert "the processes read different rollout prompts (rows: process 0: 2, process 1: 2; or the" in log


@pytest.mark.slow
def test_two_process_training_with_resume_equals_one_process(tmp_path):
    """A checkpoint saved and restored by 2 processes of one device each, on a mesh whose tensor axis spans
    them (one process per GPU with tensor parallelism): both feed their shared batch shard the same prompts,
    and the run equals 1 process on the same mesh shape, same batch."""
    from copg_jax.models import from_pretrained

    base = _tiny_offline_run(tmp_path)
    base["mesh"] = {"data": 1, "tensor": 2, "replication_tolerance": 1.0}  # vocab 207: embeddings replicated
    results = {}
    for name, num, devices, stop_after in (("single", 1, 2, 0), ("multi", 2, 1, 2)):
        spec = {"base": base, "overrides": [f"train.output_dir={tmp_path / name}"], "stop_after": stop_after}
        (tmp_path / f"{name}.json").write_text(json.dumps(spec))
        out = tmp_path / f"out_{name}"
        results[name] = launch("train_resume", out, num, devices, 240, str(tmp_path / f"{name}.json"))
    multi = results["multi"]
    assert [r["first_step"] for r in multi] == [2, 2] and all(r["first_interrupted"] for r in multi)
    assert [r["step"] for r in multi] == [4, 4]
    single = results["single"][0]["metrics"]
    for r in multi:
        np.testing.assert_allclose(r["metrics"]["loss"], single["loss"], rtol=1e-4)
    a = from_pretrained(tmp_path / "single" / "export", dtype=np.float32)
    b = from_pretrained(tmp_path / "multi" / "export", dtype=np.float32)
    from flax import nnx

    for (path, x), (_, y) in zip(
        nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b)), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(x.get_value()), np.asarray(y.get_value()), atol=2e-5, err_msg=str(path)
        )


@pytest.mark.slow
def test_processes_agree_on_a_signal_that_reaches_one_and_on_the_reference_cache(tmp_path):
    """A Ctrl-C (SIGINT, forwarded as a preemption notice) that reaches process 1 only: both stop after the
    same update and save it together (a per-process flag had process 1 enter the collective save alone and
    the run hang: so it did for SIGTERM, and for SIGINT until it was forwarded). And a
    reference cache only process 0 can read (process 1 looks on a disk of its own) is computed by both (one
    reading it while the other computed it collectively hung the start)."""
    base = _tiny_offline_run(tmp_path)
    base["train"].update(steps=100_000, export_on_finish=False)
    spec = {"base": base, "overrides": [f"train.output_dir={tmp_path / 'run'}"]}
    (tmp_path / "run.json").write_text(json.dumps(spec))
    results = launch("train_signal", tmp_path / "out", 2, 2, 240, str(tmp_path / "run.json"))
    steps = {r["step"] for r in results}
    assert len(steps) == 1 and all(r["interrupted"] for r in results), results
    (step,) = steps
    assert 2 <= step < 100_000 and results[1]["signalled_at"] <= step
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [str(step)]
    assert results[0]["cache_computed"]


ONLINE_REWARD = '''
def even_words(prompts, completions):
    """Fraction of words ending in an even digit (deterministic: the same on every process)."""
    return [sum(w[-1] in "02468" for w in c.split()) / max(len(c.split()), 1) for c in completions]


def even_words_plus(prompts, completions, bonus):
    """`even_words` plus the prompt row's field `bonus`: each process must pass its share's own fields."""
    return [x + b for x, b in zip(even_words(prompts, completions), bonus, strict=True)]
'''


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mixed", "prompts_alone"])
def test_two_process_online_run_with_resume_equals_one_process(tmp_path, mode):
    """Online mode and evaluation by generation on 2 processes: each samples on the global mesh and scores its
    share; the run stops, resumes, and ends with the same replay buffer, weights and generation metrics as 1
    process straight through. `prompts_alone`: no logged data (every prompt from the buffer, 4 a rollout in
    batches of 8: padding prompts, split unevenly over the processes), straight through, no evaluation by
    generation."""
    from copg_jax.config import apply_overrides, from_dict
    from copg_jax.data.testing import kway_rows, make_tiny_tokenizer, write_jsonl
    from copg_jax.models import from_pretrained
    from copg_jax.rollout import OnlineRollouts
    from copg_jax.run_config import Config
    from copg_jax.train import precompute_reference

    (tmp_path / "online_reward.py").write_text(ONLINE_REWARD)
    make_tiny_tokenizer(str(tmp_path / "tok"))
    rows = kway_rows(
        32, seed=3, k_range=(2, 3)
    )  # a field for the reward (constant per prompt: no loss change)
    write_jsonl([{**row, "bonus": float(i)} for i, row in enumerate(rows)], str(tmp_path / "train.jsonl"))
    base = {
        "model": {"config": TINY, "tokenizer": str(tmp_path / "tok"), "dtype": "float32"},
        "data": {"path": str(tmp_path / "train.jsonl"), "ref_cache": str(tmp_path / "ref.parquet"),
                 "batch_size": 8, "pad_multiple": 16, "max_prompt_length": 16, "max_completion_length": 16},
        "optim": {"lr": 0.01, "schedule": "constant"},
        "loss": {"beta": 0.5},
        "train": {"steps": 4, "log_every": 1, "progress": False, "export_on_finish": True},
        "checkpoint": {"every_steps": 2, "async_save": False},
        "rollout": {"every_n_steps": 2, "num_prompts": 4, "num_completions": 3, "max_new_tokens": 6,
                    "fresh_fraction": 0.5, "buffer_size": 6, "policy_lag": 1,
                    "reward": {"fn": "online_reward:even_words_plus"}},
        "eval_generation": {"reward": {"fn": "online_reward:even_words_plus"}, "every_steps": 2,
                            "num_prompts": 6, "num_samples": 2, "max_new_tokens": 6, "batch_size": 8,
                            "prompts_path": str(tmp_path / "train.jsonl")},
    }  # fmt: skip
    if mode == "prompts_alone":
        base["data"].update(path="", ref_cache="")
        base["rollout"].update(fresh_fraction=1.0, prompts_path=str(tmp_path / "train.jsonl"), buffer_size=8)
        # two functions summed: each one's mean is gathered from the processes' shares into its own metric
        base["rollout"]["reward"] = {"fn": ["online_reward:even_words", "online_reward:even_words_plus"]}
        del base["eval_generation"]
    else:
        precompute_reference(from_dict(Config, apply_overrides(base, [f"data.cache_dir={tmp_path}/dc"])))
    results = {}
    stop = 2 if mode == "mixed" else 0  # a resume from prompts alone: test_rollout.py, on one process
    for name, num, devices, stop_after in (("single", 1, 4, 0), ("multi", 2, 2, stop)):
        spec = {"base": base, "overrides": [f"train.output_dir={tmp_path / name}"], "stop_after": stop_after}
        spec["sys_path"] = str(tmp_path)
        (tmp_path / f"{name}.json").write_text(json.dumps(spec))
        out = tmp_path / f"out_{name}"
        results[name] = launch("train_resume", out, num, devices, 300, str(tmp_path / f"{name}.json"))
    multi = results["multi"]
    assert [r["first_step"] for r in multi] == [stop or None] * 2 and [r["step"] for r in multi] == [4, 4]
    single = results["single"][0]["metrics"]
    for r in multi:  # the loss, and the final evaluation by generation (samples scored on both processes)
        np.testing.assert_allclose(r["metrics"]["loss"], single["loss"], rtol=1e-4)
        for key in ("eval_gen/reward", "eval_gen/kl", "eval_gen/length") if mode == "mixed" else ():
            np.testing.assert_allclose(r["metrics"][key], single[key], rtol=1e-4, atol=1e-5, err_msg=key)
    if mode == "prompts_alone":  # each reward function's mean, gathered from the processes' shares
        keys = ("rollout/reward/even_words", "rollout/reward/even_words_plus")
        logged = {}
        for name in ("single", "multi"):
            rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            logged[name] = [[r[k] for k in keys] for r in rows if keys[0] in r]
        assert len(logged["multi"]) == 2 and all(plus > plain for plain, plus in logged["multi"])
        np.testing.assert_allclose(logged["multi"], logged["single"], rtol=1e-6)
    with (
        np.load(OnlineRollouts.state_path(tmp_path / "single" / "checkpoints", 4)) as a,
        np.load(OnlineRollouts.state_path(tmp_path / "multi" / "checkpoints", 4)) as b,
    ):
        assert sorted(a.files) == sorted(b.files) and len(a["buffer/counts"]) > 0
        for key in a.files:
            if key.startswith("buffer/") and "logps" in key:
                np.testing.assert_allclose(a[key], b[key], atol=2e-5, err_msg=key)
            elif key.startswith("buffer/"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    x = from_pretrained(tmp_path / "single" / "export", dtype=np.float32)
    y = from_pretrained(tmp_path / "multi" / "export", dtype=np.float32)
    from flax import nnx

    for (path, u), (_, v) in zip(
        nnx.to_flat_state(nnx.state(x)), nnx.to_flat_state(nnx.state(y)), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(u.get_value()), np.asarray(v.get_value()), atol=2e-5, err_msg=str(path)
        )
