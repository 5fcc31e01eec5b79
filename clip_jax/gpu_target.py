"""Devices of NVIDIA GPUs that are not attached, to compile for: XLA's GPU
compiler (JAX's CUDA plugin) builds, on a machine with no GPU and no driver,
the program an H100 or H200 host would run, from a description of the chip
(stream_executor's GpuTargetConfigProto; jax.experimental.topologies). Its
memory analysis and HLO say what each GPU would hold and move, and which
kernels (cuDNN's fused attention, cuBLAS or Triton GEMMs) the step calls. The
devices can compile but not run anything.

Kernel autotuning needs a device, so the compiler takes its default choice
for each fusion (and, with jaxlib 0.10, GEMMs are cuBLAS's: compiler_options):
the buffers, fusions and collectives are the GPU compiler's own, but a tuned
run's GEMM kernels (and their workspace) may differ.

Needs the CUDA plugin and the CUDA libraries it loads (`pip install -e
'.[gpu]'`). Plan with JAX_PLATFORMS=cpu on a machine without GPUs. As with TPU
planning (clip_jax/tpu_topology.py), compile in a process of its own: the
plugin brings the CUDA profiler library into the process.
"""

import os
from importlib import metadata

from jax.experimental import topologies

# The chips' figures, from XLA's descriptions of them
# (openxla/xla: xla/backends/gpu/target_config/specs/h100_sxm.txtpb, h200.txtpb):
# jax's device_kind, memory bytes, memory bandwidth (bytes/s), SMs, clock (GHz).
CHIPS = {
    "h100": ("NVIDIA H100 80GB HBM3", 84_942_979_072, 3_352_320_000_000, 132, 1.98),
    "h200": ("NVIDIA H200 141GB HBM3e", 151_397_597_184, 4_800_000_000_000, 132, 1.98),
}
# jax's device_kind of each chip -> its name in capacity.ACCELERATOR_MEMORY_GIB.
CHIP_NAMES = {"NVIDIA H100 80GB HBM3": "H100", "NVIDIA H200 141GB HBM3e": "H200"}
GPUS_PER_HOST = 8
# The cuDNN release the compiler may assume (9.10, XLA's description of both
# chips): fused attention's lowering asks for 9.x features only.
CUDNN_VERSION = (9, 10)


def target_config(chip):
    """The GpuTargetConfigProto text of `chip` (a key of CHIPS): Hopper's
    per-SM limits (compute capability 9.0) and the chip's own figures."""
    kind, memory, bandwidth, cores, clock_ghz = CHIPS[chip]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: {cores}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: {clock_ghz}
  device_memory_size: {memory}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {CUDNN_VERSION[0]} minor: {CUDNN_VERSION[1]} }}
device_description_str: "{kind}"
"""


def devices(chip, count=1):
    """The compile-only devices of `count` GPUs of kind `chip` (h100 or h200),
    GPUS_PER_HOST to a host. A ValueError (one line) when the CUDA plugin is
    missing, the chip unknown or the count not whole hosts."""
    name = chip.lower()
    if name not in CHIPS:
        raise ValueError(f"GPU {chip!r}: expected one of {', '.join(CHIPS)}")
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise ValueError(f"GPU count {count}: expected 1 to {GPUS_PER_HOST}, or whole "
                         f"hosts of {GPUS_PER_HOST}")
    # The plugin checks the CUDA libraries against the driver when it loads
    # (unless JAX_PLATFORMS leaves CUDA out); compiling needs no driver.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    hosts, per_host = (count // GPUS_PER_HOST, GPUS_PER_HOST) if count > GPUS_PER_HOST \
        else (1, count)
    try:
        found = topologies.get_topology_desc(
            name, "cuda", target_config=target_config(name),
            topology=f"1x{hosts}x{per_host}").devices
    except (RuntimeError, NotImplementedError) as error:  # JaxRuntimeError is a RuntimeError
        message = (str(error).splitlines() or [type(error).__name__])[0]
        if "not implemented for" in message or "Unknown backend" in message:
            raise ValueError(f"GPU {chip!r}: compiling for GPUs needs JAX's CUDA plugin "
                             "(pip install -e '.[gpu]')") from None
        raise ValueError(f"GPU {chip!r}: {message}") from None
    return list(found)


def compiler_options():
    """Options for compiling a step for these devices. Without autotuning (no
    device), jaxlib 0.10's Triton GEMM emitter fails to tile some of a train
    step's dots ("Couldn't find output tile sizes", at ViT-B/16's widths too),
    so with it GEMMs are compiled for cuBLAS, as the device check's "cuBLAS
    GEMMs" flag set runs them on a GPU; jaxlib 0.11.2 tiles them."""
    release = tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
    return {"xla_gpu_enable_triton_gemm": False} if release < (0, 11) else {}


# Memory bytes/s by the lowercase device_kind's name, first match: a compile-only
# device's kind is CHIPS's, an attached GPU's the CUDA name of its board (the
# SXM H100 "NVIDIA H100 80GB HBM3", the H200 "NVIDIA H200"); the PCIe and NVL
# H100s' figures are NVIDIA's H100 datasheet's.
_BANDWIDTH_BY_KIND = (("h100 pcie", 2.0e12), ("h100 nvl", 3.9e12), ("h100", CHIPS["h100"][2]),
                      ("h200", CHIPS["h200"][2]))


def memory_bandwidth(device):
    """Memory bytes/s of a GPU device's chip, compile-only or attached, else None."""
    kind = getattr(device, "device_kind", "").lower()
    return next((bandwidth for name, bandwidth in _BANDWIDTH_BY_KIND if name in kind), None)


def chip_name(device):
    """capacity.ACCELERATOR_MEMORY_GIB's name of a GPU device's chip, else None."""
    return CHIP_NAMES.get(getattr(device, "device_kind", ""))


def cuda_plugin_version():
    """The installed CUDA plugin's version (whose compiler a plan used), or None."""
    for package in ("jax-cuda13-plugin", "jax-cuda12-plugin"):
        try:
            return f"{package} {metadata.version(package)}"
        except metadata.PackageNotFoundError:
            continue
    return None
