"""clip_jax/huge_pages.py: when `python -m` entry points restart with
transparent huge pages for XLA:CPU's per-step buffers, and when they do not."""

import os
import subprocess
import sys

import pytest

from clip_jax import huge_pages

GLIBC = (2, 36)


@pytest.mark.parametrize("environ, glibc, thp, accelerator, expected", [
    ({}, GLIBC, "madvise", False, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise", False,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", False, None),  # opted out
    ({}, GLIBC, "always", False, None),   # huge pages already
    ({}, GLIBC, "never", False, None),    # none to be had
    ({}, GLIBC, None, False, None),       # no THP in this kernel
    ({}, (2, 34), "madvise", False, None),  # before glibc.malloc.hugetlb
    ({}, None, "madvise", False, None),   # musl and others
    ({}, GLIBC, "madvise", True, None),   # a TPU or GPU host: unmeasured there
])
def test_restarts_only_where_huge_pages_can_help(environ, glibc, thp, accelerator, expected):
    assert huge_pages.tunables_with_huge_pages(environ, glibc, thp, accelerator) == expected


@pytest.mark.parametrize("environ, visible", [
    ({"JAX_PLATFORMS": "cpu"}, False), ({"JAX_PLATFORMS": "tpu"}, True),
    ({"JAX_PLATFORMS": "cuda,cpu"}, True)])
def test_jax_platforms_says_whether_an_accelerator_runs(environ, visible):
    assert huge_pages.accelerator_visible(environ) == visible


@pytest.mark.parametrize("tunables, on", [
    ("", False), ("glibc.malloc.hugetlb=1", True), ("glibc.malloc.hugetlb=0", False),
    ("glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2", True)])
def test_requested_reads_the_tunable(tunables, on):
    assert huge_pages.requested({"GLIBC_TUNABLES": tunables}) == on


@pytest.mark.parametrize("argv, module", [
    (["python", "-m", "clip_jax.train", "--workdir", "w"], "clip_jax.train"),
    (["python", "-u", "-m", "clip_jax.benchmark"], "clip_jax.benchmark"),
    (["python", "-c", "import clip_jax"], None), (["pytest", "-m"], None)])
def test_started_module_reads_the_command_line(argv, module):
    assert huge_pages.started_module(argv) == module


def test_importing_the_library_never_restarts():
    """Only `python -m` of an entry point restarts; the library imported by a
    notebook, a test or `python -m` of another module runs as it is."""
    environment = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
    child = subprocess.run(
        [sys.executable, "-c", "import os, clip_jax; print(os.environ.get('GLIBC_TUNABLES'))"],
        env=environment, capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "None"
