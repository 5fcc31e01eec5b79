"""Multi-process start-up shared by the trainer and the evaluator: the
--coordinator_address / --num_processes / --process_id / --distributed_auto
flags and the jax.distributed.initialize call they drive."""

import jax
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec


def define_distributed_flags():
    """Multi-process flags -> {keyword of `initialize_distributed`: flag holder}."""
    return dict(
        coordinator_address=flags.DEFINE_string(
            "coordinator_address", None, "Multi-process runs: host:port of process 0, passed "
            "to jax.distributed.initialize with --num_processes and --process_id. Omit all "
            "three for a single process."),
        num_processes=flags.DEFINE_integer(
            "num_processes", None, "Multi-process runs: total number of processes."),
        process_id=flags.DEFINE_integer(
            "process_id", None, "Multi-process runs: this process's index."),
        auto=flags.DEFINE_bool(
            "distributed_auto", False, "Call jax.distributed.initialize() without arguments, "
            "letting JAX detect the cluster (Cloud TPU, SLURM, Kubernetes, MPI). Off by "
            "default so single-process runs never wait for a coordinator."),
        cpu_collectives=flags.DEFINE_enum(
            "cpu_collectives", "gloo", ["gloo", "mpi"], "Cross-process collectives of the CPU "
            "backend in multi-process runs (jax_cpu_collectives_implementation); accelerators "
            "ignore it."),
    )


def initialize_distributed(coordinator_address, num_processes, process_id, auto=False,
                           cpu_collectives="gloo"):
    """Joins a multi-process run (jax.distributed) before anything touches devices.

    Explicit arguments win; with none, `auto` lets JAX detect the cluster; else
    this stays a single-process run."""
    explicit = (coordinator_address, num_processes, process_id)
    if all(value is None for value in explicit) and not auto:
        return
    if any(value is None for value in explicit) and not all(value is None for value in explicit):
        raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    # Only the CPU client reads this; accelerators bring their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    if cpu_collectives == "gloo" and jax.process_count() > 1 and jax.default_backend() == "cpu":
        widen_gloo_send_buffers()


# Bytes each device reduce-scatters at start-up: gloo's first message is half of
# them, above the kernel's cap on a requested send buffer (net.core.wmem_max,
# 208 KiB by default).
_WIDENING_BYTES = 4 * 2**20


def widen_gloo_send_buffers():
    """One reduce-scatter over all devices, of 4 MiB per device, so that gloo
    sizes its connections' send buffers for megabytes rather than bytes.

    gloo's TCP pair sets a connection's SO_SNDBUF to the first message it sends
    through its buffer-bound path, which XLA:CPU's reduce-scatter takes, and
    setting SO_SNDBUF switches off Linux's autotuning of that buffer for good. A
    train step's first reduce-scatter is the contrastive loss's, a few hundred
    bytes, so the buffer stayed at the kernel's minimum (4.5 KiB) and every
    later collective on the connection moved one 64 KiB loopback segment per
    delayed ACK (about 40 ms): the tiny train step took 6.5 s on 2 processes x 2
    CPU devices, 0.33-0.67 s after this (docs/benchmarks.md). A larger first
    message is the one lever outside gloo. Collectives over a sub-group of the
    devices have connections of their own, which this leaves as they are."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    count = mesh.devices.size
    columns = max(_WIDENING_BYTES // (4 * count), 1)
    spec = PartitionSpec("devices")
    scatter = jax.jit(jax.shard_map(
        lambda rows: jax.lax.psum_scatter(rows, "devices", scatter_dimension=0, tiled=True),
        mesh=mesh, in_specs=spec, out_specs=spec))
    local = np.zeros((count * jax.local_device_count(), columns), np.float32)
    jax.block_until_ready(scatter(jax.make_array_from_process_local_data(
        NamedSharding(mesh, spec), local)))
