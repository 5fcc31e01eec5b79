"""Devices of a TPU slice that is not attached, to compile for: the TPU
compiler (libtpu) builds, on any machine, the program a v4/v5e/v5p/v6e slice
would run, and its memory analysis and HLO say what each chip would hold and
move (jax.experimental.topologies, the ahead-of-time path MaxText's
train_compile takes). The devices can compile but not run anything.

Needs libtpu (`pip install -e '.[tpu]'`). Plan with JAX_PLATFORMS=cpu on a
machine without TPUs: the attached backend is then the CPU, and libtpu is
loaded for compiling only. Loading it registers its profiler in the process,
after which a CPU trace there records no device events: compile for TPUs in
a process of its own (`benchmark plan --tpu` is one).
"""

import os
from importlib import metadata

from jax.experimental import topologies

# jax's device_kind of each TPU chip -> its name in capacity.ACCELERATOR_MEMORY_GIB.
CHIP_NAMES = {"TPU v4": "TPU v4", "TPU v5 lite": "TPU v5e", "TPU v5": "TPU v5p",
              "TPU v6 lite": "TPU v6e"}
EXAMPLE = "v5e:4x4, v5p:2x2x2 or v6e:2x2"

# Clock (Hz) of the chips whose Google Cloud page fixes it: the bf16 peak over
# the MXUs' multiply-adds per cycle (four 128x128 MXUs per TensorCore; v5e: one
# TensorCore, 197 TFLOP/s; v5p: two, 459 TFLOP/s). v6e's page (one TensorCore
# of two 256x256 MXUs, 918 TFLOP/s) would put it at 3.5 GHz, which the
# compiler contradicts (it estimates an 8192^3 matmul at 369k FLOPs a cycle,
# more than two such MXUs do), and the compile-only v4 device reports one
# core (num_cores) where a v4 chip has two: their estimates stay in cycles.
CLOCK_HZ = {"TPU v5e": 197e12 / (4 * 128 * 128 * 2), "TPU v5p": 459e12 / (2 * 4 * 128 * 128 * 2)}


def devices(topology, slices=1):
    """The compile-only devices of `slices` TPU slices of `topology` (libtpu's
    form: GENERATION:SHAPE, e.g. v5p:2x2x2 is 8 chips); several slices carry
    slice_index 0..slices-1, as a multi-slice job's devices do. A ValueError
    (one line) when libtpu is missing or the name is not a topology."""
    if slices < 1:
        raise ValueError(f"TPU slices: expected at least 1, got {slices}")
    # libtpu reads the host it runs on from these (on a TPU VM, from its
    # metadata server); compiling needs neither, and unset it warns at length.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # No TPU is opened, so other processes compiling (or training) beside this
    # one need not wait for libtpu's one-process lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        found = topologies.get_topology_desc(
            topology_name=topology, platform="tpu",
            **({"num_slices": slices} if slices > 1 else {})).devices
    except RuntimeError as error:  # JaxRuntimeError is one
        message = str(error).splitlines()[0]
        if "not installed" in message:
            raise ValueError(f"TPU topology {topology!r}: compiling for TPUs needs libtpu "
                             "(pip install -e '.[tpu]')") from None
        raise ValueError(f"TPU topology {topology!r} (e.g. {EXAMPLE}): {message}") from None
    return list(found)


def chip_name(device):
    """capacity.ACCELERATOR_MEMORY_GIB's name of a TPU device's chip, else None."""
    return CHIP_NAMES.get(getattr(device, "device_kind", ""))


def clock_hz(device):
    """The clock of a TPU device's chip (CLOCK_HZ), else None."""
    return CLOCK_HZ.get(chip_name(device))


def libtpu_version():
    """The installed libtpu's version (whose compiler a plan used), or None."""
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None
