r"""Runs N trainer processes on this machine, joined by jax.distributed: one
multi-GPU box, or a laptop trying out a multi-process run on CPU devices.

  python -m launch.local --processes 2 --gpus_per_process 4 -- \
      --workdir /tmp/run --config configs/clip.py:ViT-B-32
  python -m launch.local --processes 2 --cpu_devices 4 -- --workdir /tmp/run

Process 0's output comes here; process i's goes to WORKDIR/process_<i>.log (or
--log_dir). When one process fails the others are stopped and its exit status is
this command's. Ctrl-C or SIGTERM reaches every process as SIGTERM, so they save
at the next step boundary and exit; a second Ctrl-C kills them.
"""

import argparse
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
import time

if __package__ in (None, ""):  # run as `python launch/local.py`: import from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clip_jax import cpu_devices as simulated_devices  # noqa: E402
from launch.arguments import split_at_double_dash  # noqa: E402

# Seconds a process stopped because another failed gets to exit before SIGKILL: it
# is usually stuck in a collective with the dead one and never reaches a save.
KILL_AFTER_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Process:
    """One child: its argv, the environment variables it adds, where its output goes
    (None: this terminal)."""
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    log_path: str | None = None

    def shell_line(self):
        """The process as one shell line: variables, command, redirection."""
        line = " ".join([f"{name}={shlex.quote(value)}" for name, value in self.env]
                        + [shlex.join(self.argv)])
        return f"{line} > {shlex.quote(self.log_path)} 2>&1" if self.log_path else line


def device_env(process_id, gpus_per_process, cpu_devices):
    """Environment variables giving process `process_id` its devices: GPUs
    [i*K, (i+1)*K) of this machine, or `cpu_devices` CPU devices."""
    if cpu_devices:
        return (("JAX_PLATFORMS", "cpu"),
                ("XLA_FLAGS", simulated_devices.xla_flags(cpu_devices)))
    if gpus_per_process:
        first = process_id * gpus_per_process
        gpus = ",".join(str(gpu) for gpu in range(first, first + gpus_per_process))
        return (("CUDA_VISIBLE_DEVICES", gpus),)
    return ()


def processes(num_processes, port, trainer_args, log_dir, gpus_per_process=1, cpu_devices=0,
              module="clip_jax.train", python=sys.executable):
    """The N Process specs of a localhost run of `python -m module`."""
    specs = []
    for process_id in range(num_processes):
        argv = (python, "-m", module, f"--coordinator_address=localhost:{port}",
                f"--num_processes={num_processes}", f"--process_id={process_id}", *trainer_args)
        log_path = os.path.join(log_dir, f"process_{process_id}.log") if process_id else None
        specs.append(Process(argv, device_env(process_id, gpus_per_process, cpu_devices),
                             log_path))
    return specs


def _exit_status(returncode):
    """A child's returncode as a shell exit status (128 + N when killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _start(spec):
    log = open(spec.log_path, "ab") if spec.log_path else None
    try:
        # A session of its own: Ctrl-C reaches only this launcher, which decides
        # what the children get.
        return subprocess.Popen(spec.argv, env={**os.environ, **dict(spec.env)}, stdout=log,
                                stderr=subprocess.STDOUT if log else None,
                                start_new_session=True)
    finally:
        if log:
            log.close()


def _signal_all(children, signum):
    for child in children:
        if child.poll() is None:
            child.send_signal(signum)


def _stop(children, kill_after_seconds):
    """SIGTERM to the children still running, SIGKILL to those left after the grace."""
    _signal_all(children, signal.SIGTERM)
    deadline = time.monotonic() + kill_after_seconds
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run(specs, kill_after_seconds=KILL_AFTER_SECONDS, poll_seconds=0.1):
    """Runs the processes until all exit 0 (returns 0) or one fails: the others are
    stopped and its exit status is returned. SIGINT/SIGTERM here send SIGTERM to all
    (a second one SIGKILL) and wait for them."""
    children = []
    interrupts = []

    def on_signal(signum, frame):
        del frame
        interrupts.append(signum)
        if len(interrupts) == 1:
            print(f"launch.local: {signal.Signals(signum).name}: SIGTERM to {len(children)} "
                  "processes, which save and exit (again to kill them)", file=sys.stderr)
        _signal_all(children, signal.SIGTERM if len(interrupts) == 1 else signal.SIGKILL)

    previous = {signum: signal.signal(signum, on_signal)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for spec in specs:
            children.append(_start(spec))
            if interrupts:  # a signal that came while starting: this child missed it
                _signal_all(children[-1:], signal.SIGTERM)
        while True:
            returncodes = [child.poll() for child in children]
            failed = next((code for code in returncodes if code not in (None, 0)), None)
            if failed is not None:
                _stop(children, kill_after_seconds)
                return _exit_status(failed)
            if all(code == 0 for code in returncodes):
                return 0
            time.sleep(poll_seconds)
    finally:
        _stop(children, kill_after_seconds)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def free_port():
    """A TCP port nobody listens on right now, for the coordinator."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def workdir_of(trainer_args):
    """The value of the trainer's --workdir flag, or None."""
    for index, arg in enumerate(trainer_args):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and index + 1 < len(trainer_args):
            return trainer_args[index + 1]
    return None


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m launch.local", allow_abbrev=False,
        usage="python -m launch.local --processes N [options] -- TRAINER_ARGS...",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True)
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--gpus_per_process", "--gpus-per-process", type=int, default=1,
                         help="GPUs per process, by CUDA_VISIBLE_DEVICES (0: leave it unset).")
    devices.add_argument("--cpu_devices", "--cpu-devices", type=int, default=0,
                         help="Run on this many CPU devices per process instead of GPUs.")
    parser.add_argument("--port", type=int, default=0, help="Coordinator port (default: a free one).")
    parser.add_argument("--log_dir", "--log-dir", help="Where process_<i>.log go "
                        "(default: the trainer's --workdir).")
    parser.add_argument("--module", default="clip_jax.train",
                        help="What each process runs, as python -m MODULE (e.g. clip_jax.evaluate).")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Print the commands with their environment variables; run nothing.")
    return parser


def main(argv=None):
    own_args, trainer_args = split_at_double_dash(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    options = parser.parse_args(own_args)
    if options.processes < 1:
        parser.error("--processes must be at least 1")
    log_dir = options.log_dir or workdir_of(trainer_args)
    if log_dir is None or log_dir.startswith("gs://"):
        reason = "no --workdir after `--`" if log_dir is None else f"--workdir is {log_dir}"
        sys.exit(f"launch.local: {reason}; pass --log_dir, a local directory for the "
                 "other processes' logs")
    specs = processes(options.processes, options.port or free_port(), trainer_args, log_dir,
                      options.gpus_per_process, options.cpu_devices, options.module)
    if options.dry_run:
        for spec in specs:
            print(spec.shell_line())
        return 0
    os.makedirs(log_dir, exist_ok=True)
    for process_id, spec in enumerate(specs[1:], start=1):
        print(f"launch.local: process {process_id} logs to {spec.log_path}", file=sys.stderr)
    return run(specs)


if __name__ == "__main__":
    sys.exit(main())
