"""Multi-process start-up shared by the trainer and the evaluator: the
--coordinator_address / --num_processes / --process_id / --distributed_auto
flags and the jax.distributed.initialize call they drive."""

import jax
from absl import app, flags


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
