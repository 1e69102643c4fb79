"""GPUs (and TPU slices) described to XLA without the hardware, for ahead-of-time (deviceless) compilation on
a CPU machine.

`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)` takes the GPU's
`GpuTargetConfig` (protobuf text: SM count and limits, memory, compute capability, cuDNN and CUDA versions)
and gives devices that `jax.jit(...).lower(...).compile()` compiles for with XLA:GPU's own pipeline (fusion,
scheduling, buffer assignment, Triton and cuDNN kernels), without autotuning and without running anything.
Needs the CUDA plugin and its libraries (`pip install "jax-cuda12-plugin[with-cuda]"` at jax's version), not a
GPU, and `JAX_PLATFORMS=cpu` so that JAX does not look for one. TPU slices come from libtpu's own
descriptions (`tpu_devices`; needs libtpu, not a TPU).
"""

from __future__ import annotations

import math

from jax.experimental import topologies

TPUS = ("v5e", "v5p")  # the TPU generations `tpu_devices` describes

# GpuTargetConfig fields of the chips (NVIDIA datasheets / cudaGetDeviceProperties of the SXM parts).
GPUS = {
    "h200": {
        "name": "NVIDIA H200",
        "hbm_bytes": 139 * 2**30,  # 141 GB HBM3e, of which ~139 GiB are visible to CUDA
        "sms": 132,
        "clock_ghz": 1.98,
        "bandwidth": 4_800_000_000_000,
        "l2": 52_428_800,
        "cc": (9, 0),
    },
    "h100": {
        "name": "NVIDIA H100 80GB HBM3",
        "hbm_bytes": 84_929_347_584,  # 80 GB HBM3: cudaGetDeviceProperties' totalGlobalMem
        "sms": 132,
        "clock_ghz": 1.98,
        "bandwidth": 3_352_320_000_000,
        "l2": 52_428_800,
        "cc": (9, 0),
    },
}


def target_config(chip: dict) -> str:
    """The chip's GpuTargetConfig in protobuf text format (Hopper SM limits)."""
    major, minor = chip["cc"]
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {chip["sms"]}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {chip["bandwidth"]}
  l2_cache_size: {chip["l2"]}
  clock_rate_ghz: {chip["clock_ghz"]}
  device_memory_size: {chip["hbm_bytes"]}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{chip["name"]}"
"""


def gpu_devices(chip: str, count: int = 1) -> list:
    """`count` GPUs of kind `chip` on one host, described without the hardware (needs the CUDA plugin)."""
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=target_config(GPUS[chip]), topology=f"1x1x{count}"
    )
    return list(topology.devices)


def tpu_devices(generation: str, count: int) -> list:
    """Devices of a TPU slice of `count` chips, described without the hardware (needs libtpu installed).

    v5e slices are 2-D (v5e:16x16 = 256 chips), v5p slices 3-D (v5p:2x2x2 = 8 chips); 4 chips per host.
    """
    dims = [1, 1] if generation == "v5e" else [1, 1, 1]
    while math.prod(dims) < count:
        dims[dims.index(min(dims))] *= 2
    if math.prod(dims) != count:
        raise ValueError(f"a {generation} slice of {count} chips: the count must be a power of two")
    name = f"{generation}:{'x'.join(map(str, sorted(dims)))}"
    bounds = (2, 2, 1) if count >= 4 else (1, 1, 1)
    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name=name,
        chip_config_name="default",
        chips_per_host_bounds=bounds,
        num_slices=1,
    )
    return list(topology.devices)


def aot_devices(kind: str, count: int) -> list:
    """`count` devices of `kind` (a GPUS key, or a TPUS generation: a slice of `count` chips), described
    without the hardware."""
    return tpu_devices(kind, count) if kind in TPUS else gpu_devices(kind, count)
