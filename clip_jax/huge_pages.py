"""Transparent huge pages for XLA:CPU's per-step buffers, chosen at start-up.

XLA:CPU allocates a step's temporaries afresh at every execution, as one block
(2.5 GB for the ViT-B/16 train step at batch 16, half the patches). glibc maps a
block that large with mmap and unmaps it when it is freed, so the kernel faults
it in again every step, 4 KiB at a time: 650,000 page faults and ~1 s of system
time per 4.8 s step on the 2-core VM. With the glibc tunable
glibc.malloc.hugetlb=1, glibc asks for transparent huge pages on what it maps
(madvise(MADV_HUGEPAGE)) and the faults are 2 MiB ones: 29,000 per step, 0.4 s
of system time, 4.8 s -> 4.5 s per step (docs/benchmarks.md, "CPU train step").

glibc reads its tunables once, when a process starts, so `python -m` of the
command-line entry points (ENTRY_POINTS) re-executes itself once with the
tunable added, from the package's __init__, before anything heavy is imported.
This applies where it can help: Linux with glibc 2.35 or later, the kernel's
THP mode "madvise" (under "always" every large mapping gets huge pages already,
under "never" none can), and no TPU or GPU in sight (there the step's buffers
live in device memory; unmeasured). A GLIBC_TUNABLES that already sets
glibc.malloc.hugetlb is left as it is: GLIBC_TUNABLES=glibc.malloc.hugetlb=0
opts out.
"""

import glob
import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb"
# The modules whose `python -m` runs restart (the library imported elsewhere never does).
ENTRY_POINTS = ("clip_jax.train", "clip_jax.evaluate", "clip_jax.benchmark")
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_ACCELERATOR_NODES = ("/dev/accel*", "/dev/nvidia[0-9]*", "/dev/vfio/[0-9]*")


def tunables_with_huge_pages(environ, glibc, thp, accelerator):
    """The GLIBC_TUNABLES value to restart with, or None to run as is.

    environ: the process environment; glibc: its (major, minor) version, or None
    off glibc; thp: the kernel's THP mode ("always", "madvise", "never"), or None
    where unknown; accelerator: whether a TPU or GPU is in sight."""
    existing = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in existing or accelerator or thp != "madvise":
        return None
    if glibc is None or glibc < (2, 35):
        return None
    return ":".join(filter(None, (existing, f"{TUNABLE}=1")))


def glibc_version():
    """This process's glibc (major, minor), or None off glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if name == "glibc" and match else None


def thp_mode():
    """The kernel's transparent-huge-page mode, or None where unknown."""
    try:
        with open(_THP_MODE_FILE, encoding="ascii") as modes:
            match = re.search(r"\[(\w+)\]", modes.read())
    except OSError:
        return None
    return match and match.group(1)


def accelerator_visible(environ):
    """Whether JAX_PLATFORMS names a non-CPU platform or, unset, a TPU or NVIDIA
    device node exists."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return any(name.strip() not in ("cpu", "") for name in platforms.split(","))
    return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def requested(environ=os.environ):
    """Whether `environ`'s GLIBC_TUNABLES turns glibc.malloc.hugetlb on (any
    non-zero value), as this process's glibc read it at start-up."""
    settings = dict(item.partition("=")[::2] for item in
                    environ.get("GLIBC_TUNABLES", "").split(":") if item)
    return settings.get(TUNABLE, "0") not in ("", "0")


def started_module(argv):
    """The module `python [options] -m MODULE ...` runs, from sys.orig_argv, or None."""
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None


def restart_with_huge_pages():
    """Re-executes this process's command line with glibc.malloc.hugetlb=1 added
    to GLIBC_TUNABLES, if it was started as `python -m` one of ENTRY_POINTS and
    tunables_with_huge_pages says so; returns otherwise (the process image is
    replaced when it restarts)."""
    if sys.platform != "linux" or started_module(sys.orig_argv) not in ENTRY_POINTS:
        return
    tunables = tunables_with_huge_pages(os.environ, glibc_version(), thp_mode(),
                                        accelerator_visible(os.environ))
    if tunables is None:
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
