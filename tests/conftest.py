"""Test set-up: 8 fake CPU devices, so sharding tests run on any machine."""

import concurrent.futures
import multiprocessing
import os
import shutil
import tempfile

from clip_jax import cpu_devices

# Compiling dominates the suite on 2 cores, so the tests make XLA:CPU's code
# generation cheap (the trainer processes they start inherit the flags). The HLO,
# the partitioning and so what each program computes are XLA's own either way:
# - LLVM builds the code at -O0: tests/test_train_step.py and
#   tests/test_microbatches.py ran in 149 s at -O0 against 322 s at the default
#   (2-core x86_64 VM, c8dc5df);
# - fusions go through XLA's elemental IR emitters, not its MLIR fusion emitters:
#   compiling the tiny train step at three batch sizes took 6.2-6.5 s of CPU
#   against 12.5-14.9 s (same VM, jaxlib 0.10.2, which setup.cfg pins: a jaxlib
#   without the flag would refuse it at start-up).
# Benchmarks never run under this file.
_FAST_CODEGEN_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_existing_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [_existing_flags, *(
    flag for flag in _FAST_CODEGEN_FLAGS if flag.split("=")[0] not in _existing_flags)]))
# Before JAX starts its backend; a process that chose its own device count (the
# multi-host workers) keeps it.
cpu_devices.request(8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite's devices are the CPU's; libtpu (the tpu extra, for compiling for
# TPU topologies) is then loaded for compiling only, in tests that ask for it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite compiles the same programs many times over: each test's one-device
# reference, every trainer process of a kill-and-resume run. Compiling dominates
# on 2 cores, so one XLA compilation cache serves the session: pytest-xdist's
# workers and every subprocess inherit it from the process that made it (and
# that process removes it). A cached executable is the one XLA compiled for the
# same program, flags and devices, so the tests see the same code.
_OWN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_COMPILATION_CACHE = tempfile.mkdtemp(prefix="clip_jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILATION_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from clip_jax import overrides as config_overrides  # noqa: E402
from configs.clip import get_config  # noqa: E402


def small_config(**overrides):
    """The tiny config shrunk further for unit tests; overrides use dotted keys."""
    config = get_config("tiny")
    with config.unlocked():
        config.batch_size = 16
        config.model.image.update(image_size=16, patch_size=8, width=32, layers=2, heads=2)
        config.model.text.update(context_length=8, width=32, layers=2, heads=2)
        config.model.embed_dim = 16
        for entry in config.evals.values():
            entry.batch_size = 64
        # Worker processes cost a spawn per input; the tests of the input itself,
        # of SIGKILL/resume and of multi-process runs use them (data.in_process=False).
        config.data.in_process = True
        config_overrides.apply(config, overrides)
    return config


@pytest.fixture(scope="module")
def compile_only_process():
    """run(function, *args) in one spawned process per test module, returning
    plain data: where the TPU and GPU compilers load (libtpu, the CUDA plugin),
    they bring their profilers into the process, after which a CPU trace there
    records no device events (the trainer's profile test, run later in the
    same pytest worker, saw none)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        yield lambda function, *args: pool.submit(function, *args).result()


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
    return small_config()


@pytest.fixture(scope="session")
def shrunk_data_dir(tmp_path_factory):
    """A TFDS data_dir with the built-in synthetic_shapes and synthetic_shapes_alt_text
    shrunk to 256 train and 100 test images: prepared once per session (per xdist
    worker) for the tests that train on it in-process or through the CLI."""
    from clip_jax.data import builtin_datasets, pipeline  # noqa: PLC0415
    directory = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtin_datasets.SyntheticShapes, "train_examples", 256)
        patch.setattr(builtin_datasets.SyntheticShapes, "test_examples", 100)
        pipeline.prepared_builder("synthetic_shapes", directory)
        pipeline.prepared_builder("synthetic_shapes_alt_text", directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_basetemp(tmp_path_factory):
    """Points tempfile and TMPDIR (which the trainer processes inherit) into
    pytest's own rotated base directory: libraries leave empty temporary
    directories behind (TFDS's DatasetInfo.initialize_from_bucket makes one per
    builder of an unprepared dataset other than the built-in ones, such as those
    `clip_jax.data.prepare` stores, and never removes it; Beam one per
    pipeline), about 20 a run, which would otherwise collect in /tmp."""
    directory = str(tmp_path_factory.mktemp("tmpdir"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", directory)
        patch.setattr(tempfile, "tempdir", directory)
        yield directory


def pytest_sessionfinish(session, exitstatus):
    if _OWN_COMPILATION_CACHE is not None:
        shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)
