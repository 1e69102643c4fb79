"""The launch scripts' --dry-run: each process's settings are the ones copg_jax.distributed reads, exactly.

Every script prints `process I on HOST: VAR=VALUE ... -- COMMAND` per process (shell-quoted) and its launcher
commands as `run: ...`; the settings are fed to `distributed.resolve` under a clean environment. SLURM and
Cloud TPU are simulated: their variables are set, and `scontrol` / `gcloud` are small fakes on PATH (the fake
gcloud answers only `describe`, so a dry run that tried to ssh would fail).
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from copg_jax import distributed

REPO = Path(__file__).resolve().parent.parent
COMMAND = ["copg", "train", "--config", "configs/a b.yaml", "train.steps=3"]
READ = {var for names in distributed._ENV.values() for var in names}  # what distributed.py reads


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _dry_run(script: str, args: list[str], env: dict[str, str], tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake(bin_dir, "scontrol", '[[ "$1 $2" == "show hostnames" ]] && printf "gpu001\\ngpu002\\n"\n')
    ips = "10.0.0.2\\n10.0.0.3\\n10.0.0.4\\n10.0.0.5\\n"
    _fake(
        bin_dir,
        "gcloud",
        f'for a in "$@"; do [[ $a == describe ]] && {{ printf "{ips}"; exit 0; }}; done\n'
        'echo "fake gcloud: not under --dry-run: $*" >&2; exit 1\n',
    )
    clean = {k: v for k, v in os.environ.items() if k not in READ and not k.startswith(("SLURM_", "TPU_"))}
    full = {**clean, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", str(REPO / "launch" / script), "--dry-run", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _processes(stdout: str) -> list[tuple[str, dict[str, str], list[str]]]:
    """(host, settings, command) of every `process I on HOST: ...` line, in order of I."""
    found = []
    for line in stdout.splitlines():
        if not line.startswith("process "):
            continue
        head, rest = line.split(": ", 1)
        words = shlex.split(rest)
        cut = words.index("--")
        assert head == f"process {len(found)} on {head.split(' on ')[1]}", line
        found.append((head.split(" on ")[1], dict(w.split("=", 1) for w in words[:cut]), words[cut + 1 :]))
    return found


def _resolved(settings: dict[str, str], monkeypatch) -> tuple:
    """What copg_jax.distributed would start jax.distributed with, given only these variables."""
    with monkeypatch.context() as m:
        for var in READ:
            m.delenv(var, raising=False)
        for key, value in settings.items():
            m.setenv(key, value)
        return distributed.resolve(distributed.DistributedConfig())


def _check(procs, address: str, hosts: list[str], monkeypatch) -> None:
    assert [host for host, _, _ in procs] == hosts
    for rank, (_, settings, command) in enumerate(procs):
        assert _resolved(settings, monkeypatch) == (address, len(hosts), rank)
        assert command == COMMAND
        # and the tag tpu_pod.sh stops a run's processes by (launch/stop_tagged.sh)
        assert {k for k in settings if k.startswith("COPG_")} - {"COPG_RUN_TAG"} <= READ


def test_local_multiprocess(tmp_path, monkeypatch):
    env = {"COPG_PORT": "23456", "COPG_LOCAL_DEVICES": "2"}
    out = _dry_run("local_multiprocess.sh", ["3", *COMMAND], env, tmp_path)
    procs = _processes(out)
    _check(procs, "127.0.0.1:23456", ["127.0.0.1"] * 3, monkeypatch)
    for _, settings, _ in procs:
        assert settings["JAX_PLATFORMS"] == "cpu"
        assert settings["XLA_FLAGS"].split()[-1] == "--xla_force_host_platform_device_count=2"
    runs = [shlex.split(line[len("run: ") :]) for line in out.splitlines() if line.startswith("run: ")]
    for (_, settings, _), run in zip(procs, runs, strict=True):  # what it starts carries the same settings
        assert run == ["setsid", "env", *(f"{k}={v}" for k, v in settings.items()), *COMMAND]


SLURM = {
    "SLURM_JOB_NODELIST": "gpu[001-002]",
    "SLURM_JOB_ID": "5123",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS": "16",
}


@pytest.mark.parametrize("per_node", [False, True])
def test_slurm_gpu(tmp_path, monkeypatch, per_node):
    env = {**SLURM, "SLURM_SUBMIT_DIR": str(tmp_path), **({"COPG_PER_NODE": "1"} if per_node else {})}
    out = _dry_run("slurm_gpu.sbatch", COMMAND, env, tmp_path)
    hosts = ["gpu001", "gpu002"] if per_node else ["gpu001"] * 8 + ["gpu002"] * 8
    _check(_processes(out), "gpu001:29523", hosts, monkeypatch)  # port 29400 + job id % 1000
    (run,) = [shlex.split(line[len("run: ") :]) for line in out.splitlines() if line.startswith("run: ")]
    assert run[:2] == ["srun", "--kill-on-bad-exit=1"] and run[-len(COMMAND) :] == COMMAND
    assert ("--ntasks=2" in run) == per_node and ("--gpus-per-task=1" in run) != per_node


def test_tpu_pod(tmp_path, monkeypatch):
    out = _dry_run("tpu_pod.sh", ["my-tpu", "us-west4-a", "my-project", "--", *COMMAND], {}, tmp_path)
    procs = _processes(out)
    _check(procs, "10.0.0.2:8476", ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"], monkeypatch)
    runs = [shlex.split(line[len("run: ") :]) for line in out.splitlines() if line.startswith("run: ")]
    for rank, ((_, settings, _), run) in enumerate(zip(procs, runs, strict=True)):
        assert run[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "--project", "my-project", "ssh"]
        assert f"--worker={rank}" in run
        remote = shlex.split(run[run.index("--command") + 1])
        start = remote.index("env") + 1  # the worker runs `env VAR=VALUE ... COMMAND`
        assert remote[start:] == [*(f"{k}={v}" for k, v in settings.items()), *COMMAND]
    (tag,) = {settings["COPG_RUN_TAG"] for _, settings, _ in procs}  # one tag, on every worker
    (stop,) = [shlex.split(line.split(": ", 1)[1][len("run: ") :]) for line in out.splitlines()
               if line.startswith("stop ")]  # fmt: skip
    assert "--worker=all" in stop
    assert stop[stop.index("--command") + 1] == f"bash ~/copg_jax/launch/stop_tagged.sh {tag} 10"
