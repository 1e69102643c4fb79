"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from the config, the environment, or the
cluster (SLURM, Cloud TPU, Open MPI) — and nothing at all for a single process.

Call `maybe_initialize_distributed` first thing, before any JAX computation (the backends must not exist yet).

Where the settings come from, first match wins, per setting:
  1. the `distributed:` config section (coordinator_address, num_processes, process_id);
  2. COPG_COORDINATOR_ADDRESS / COPG_NUM_PROCESSES / COPG_PROCESS_ID (set by launch/local_multiprocess.sh and
     launch/slurm_gpu.sbatch), or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID;
  3. JAX's own cluster detection (Cloud TPU VMs, Open MPI; SLURM and k8s with `enabled: on`) for whatever
     is still unset.
A run is multi-process when any of these says more than one process; otherwise this is a no-op. SLURM
variables alone do not switch it on (a batch script's own step has them too and would wait for peers that
never come): launch/slurm_gpu.sbatch sets the COPG_* variables per task.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Literal

import jax

log = logging.getLogger(__name__)

_ENV = {
    "coordinator_address": ("COPG_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("COPG_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("COPG_PROCESS_ID", "JAX_PROCESS_ID"),
}


@dataclasses.dataclass
class DistributedConfig:
    """The `distributed:` section: how the processes of one run find each other."""

    enabled: Literal["auto", "on", "off"] | bool = "auto"
    """"auto" (initialise when the config, environment or cluster says >1 process), "on" (always call
    jax.distributed.initialize, letting JAX detect the cluster), or "off" (single process, ignore the env)."""
    coordinator_address: str = ""
    """host:port of process 0's coordinator service ("" = from the environment / cluster)."""
    num_processes: int = 0
    """Total processes (0 = from the environment / cluster)."""
    process_id: int = -1
    """This process's rank (-1 = from the environment / cluster)."""
    initialization_timeout_s: int = 300
    """Seconds to wait for all processes to join."""
    cpu_collectives: str = "gloo"
    """Cross-process collectives on the CPU backend ("gloo" or "mpi"; CPU runs only)."""
    local_device_ids: tuple[int, ...] = ()
    """Devices this process uses (() = all visible, or JAX's per-cluster default)."""

    def __post_init__(self):
        if isinstance(self.enabled, bool):  # YAML 1.1 reads an unquoted on / off as true / false
            self.enabled = "on" if self.enabled else "off"
        if self.enabled not in ("auto", "on", "off"):
            raise ValueError(f"distributed.enabled must be auto, on or off, got {self.enabled!r}")
        for name, least in (("num_processes", 0), ("process_id", -1), ("initialization_timeout_s", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"distributed.{name} must be >= {least}, got {getattr(self, name)}")
        if self.cpu_collectives not in ("gloo", "mpi"):
            raise ValueError(f"distributed.cpu_collectives must be gloo or mpi, got {self.cpu_collectives!r}")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits: rank, count, and its devices against all devices."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int


def _from_env(name: str) -> str | None:
    for var in _ENV[name]:
        if os.environ.get(var, "") != "":
            return os.environ[var]
    return None


def _int_setting(cfg_value: int, unset: int, name: str) -> int | None:
    if cfg_value != unset:
        return cfg_value
    raw = _from_env(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable for {name} is not an integer: {raw!r}") from None


def resolve(cfg: DistributedConfig) -> tuple[str | None, int | None, int | None]:
    """(coordinator_address, num_processes, process_id): config first, then environment; None = unset."""
    address = cfg.coordinator_address or _from_env("coordinator_address")
    return (
        address,
        _int_setting(cfg.num_processes, 0, "num_processes"),
        _int_setting(cfg.process_id, -1, "process_id"),
    )


def _cluster_detected() -> bool:
    """True when JAX's own detection would find a multi-process cluster we have no explicit settings for."""
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:  # a multi-host Cloud TPU slice
        return True
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def process_info() -> ProcessInfo:
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def maybe_initialize_distributed(cfg: DistributedConfig | None = None) -> ProcessInfo:
    """Initialises JAX's multi-process runtime when this run has several processes; a no-op otherwise.

    Safe to call twice (the second call only reports). Must run before any JAX computation.

    Returns:
      this process's ProcessInfo.
    Raises:
      ValueError: inconsistent settings (e.g. a rank outside [0, num_processes)), naming the setting.
    """
    cfg = cfg or DistributedConfig()
    if jax.distributed.is_initialized() or cfg.enabled == "off":
        return process_info()
    address, num, rank = resolve(cfg)
    multi = cfg.enabled == "on" or (num is not None and num > 1) or _cluster_detected()
    if not multi and num is None and rank is not None:
        raise ValueError(
            f"distributed: process_id {rank} is set (config or COPG_PROCESS_ID) without num_processes "
            "(COPG_NUM_PROCESSES): set both, or neither for one process (it would run alone as process 0)"
        )
    if not multi:
        return process_info()
    if num is not None and rank is not None and not 0 <= rank < num:
        raise ValueError(f"distributed: process_id {rank} is outside [0, num_processes={num})")
    if (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")).startswith("cpu"):
        # CPU has no cross-process collectives unless one is chosen, before the backend starts
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    device_ids = list(cfg.local_device_ids) or None
    explicit = None not in (address, num, rank)
    log.info("jax.distributed.initialize(%s, num_processes=%s, process_id=%s)", address, num, rank)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num,
        process_id=rank,
        local_device_ids=device_ids,
        # all three known: skip JAX's detection, which would also pin one GPU per process under SLURM
        cluster_detection_method="deactivate" if explicit else None,
        initialization_timeout=cfg.initialization_timeout_s,
    )
    info = process_info()
    log.info("process %d/%d: %d local of %d devices", *dataclasses.astuple(info))
    return info
