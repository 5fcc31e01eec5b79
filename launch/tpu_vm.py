r"""Trains on a Cloud TPU VM or pod slice: creates it, installs this project on
every worker, runs the same training command on all of them and deletes it;
a preempted slice is re-created and training resumes from the gs:// workdir.

  python -m launch.tpu_vm --name clip-b32 --zone us-central2-b --accelerator-type v4-16 \
      --spot --workdir gs://BUCKET/clip-b32 --config configs/clip.py:ViT-B-32 \
      --config.batch_size=4096 [--queued] [--keep] [--dry-run] [-- more trainer flags]

--dry-run prints the gcloud commands, one shell line each, instead of running them.
Only the standard library is used, so this runs wherever gcloud does.
"""

import argparse
import dataclasses
import itertools
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/tpu_vm.py`: import from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.arguments import parse_with_trainer_args  # noqa: E402

REMOTE_CHECKOUT = "~/clip_jax"
REMOTE_LOG = "~/clip_jax_train.log"
# TPU VM images have python3 but no `python`.
REMOTE_PYTHON = "python3"
# Node states that need a new slice. TERMINATED is what a preemptible slice
# shows at the end of its lifetime, which ends the run like a preemption.
PREEMPTED_STATES = ("PREEMPTED", "TERMINATED")
QUEUED_FAILED_STATES = ("FAILED", "SUSPENDED")
POLL_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class Slice:
    """The TPU VM (or pod slice) to create; with `queued`, through a queued
    resource of the same name."""
    name: str
    zone: str
    accelerator_type: str
    runtime_version: str
    provisioning: str | None = None  # "spot", "preemptible" or None (on demand)
    queued: bool = False
    project: str | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """What every worker runs: this commit of the repository, then the trainer."""
    repo: str
    ref: str
    workdir: str
    trainer_args: tuple[str, ...] = ()  # --config ..., overrides, extra flags


def _gcloud(tpu_slice, *args):
    project = ["--project", tpu_slice.project] if tpu_slice.project else []
    return ["gcloud", "compute", "tpus", *args, "--zone", tpu_slice.zone, *project]


def create_command(tpu_slice):
    """gcloud command that creates the TPU VM, or queues its request."""
    if tpu_slice.queued:
        command = _gcloud(tpu_slice, "queued-resources", "create", tpu_slice.name) + [
            "--node-id", tpu_slice.name, "--accelerator-type", tpu_slice.accelerator_type,
            "--runtime-version", tpu_slice.runtime_version]
    else:
        command = _gcloud(tpu_slice, "tpu-vm", "create", tpu_slice.name) + [
            "--accelerator-type", tpu_slice.accelerator_type,
            "--version", tpu_slice.runtime_version]
    if tpu_slice.provisioning:
        command.append(f"--{tpu_slice.provisioning}")
    return command


def queued_state_command(tpu_slice):
    """gcloud command printing the queued resource's state (ACTIVE once the VM exists)."""
    return _gcloud(tpu_slice, "queued-resources", "describe", tpu_slice.name) + [
        "--format", "value(state.state)"]


def node_state_command(tpu_slice):
    """gcloud command printing the TPU VM's state (READY, PREEMPTED, ...)."""
    return _gcloud(tpu_slice, "tpu-vm", "describe", tpu_slice.name) + ["--format", "value(state)"]


def delete_command(tpu_slice):
    """gcloud command deleting the TPU VM, or the queued resource and its VM."""
    if tpu_slice.queued:
        return _gcloud(tpu_slice, "queued-resources", "delete", tpu_slice.name) + [
            "--force", "--quiet"]
    return _gcloud(tpu_slice, "tpu-vm", "delete", tpu_slice.name) + ["--quiet"]


def on_all_workers(tpu_slice, remote_command):
    """gcloud command running one shell line on every worker of the slice."""
    return _gcloud(tpu_slice, "tpu-vm", "ssh", tpu_slice.name) + [
        "--worker=all", "--command", remote_command]


def install_script(job):
    """Remote shell line: a fresh clone of job.repo at job.ref, installed with TPU JAX.

    The literal `~` stays unquoted so the remote shell expands it."""
    return (f"rm -rf {REMOTE_CHECKOUT} && git clone -q {shlex.quote(job.repo)} {REMOTE_CHECKOUT}"
            f" && cd {REMOTE_CHECKOUT} && git checkout -q {shlex.quote(job.ref)}"
            f' && {REMOTE_PYTHON} -m pip install -q -e ".[tpu]"')


def train_command(job):
    """The trainer's argv; jax.distributed finds the other workers by itself on Cloud TPU."""
    return [REMOTE_PYTHON, "-m", "clip_jax.train", "--distributed_auto",
            "--workdir", job.workdir, *job.trainer_args]


def train_script(job):
    """Remote shell line: the trainer in the checkout (relative --config paths resolve
    there), its output streamed back and appended to a log file on the worker;
    pipefail keeps the trainer's exit status through `tee`."""
    return (f"set -o pipefail; cd {REMOTE_CHECKOUT} && {shlex.join(train_command(job))}"
            f" 2>&1 | tee -a {REMOTE_LOG}")


def is_preempted(describe):
    """Whether `tpu-vm describe` (a CompletedProcess) shows a preempted or vanished VM.

    A queued resource's spot VM is deleted on preemption, hence NOT_FOUND."""
    if describe.returncode != 0:
        return "NOT_FOUND" in describe.stderr
    return describe.stdout.strip() in PREEMPTED_STATES


class Shell:
    """Runs commands with their output on this terminal, or with dry_run prints each
    as one shell line instead."""

    def __init__(self, dry_run=False, poll_seconds=POLL_SECONDS):
        self.dry_run = dry_run
        self.poll_seconds = poll_seconds

    def run(self, command):
        """Exit status of `command` (0 in a dry run)."""
        if self.dry_run:
            print(shlex.join(command), flush=True)
            return 0
        print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
        return subprocess.run(command).returncode

    def query(self, command):
        """`command`'s CompletedProcess, output captured as text; never in a dry run."""
        return subprocess.run(command, capture_output=True, text=True)

    def sleep(self, seconds):
        time.sleep(seconds)


def wait_until_active(tpu_slice, shell):
    """Polls the queued resource until its VM exists; exit status (1 if it failed)."""
    command = queued_state_command(tpu_slice)
    if shell.dry_run:
        return shell.run(command)
    last_state = None
    while True:
        result = shell.query(command)
        if result.returncode != 0:
            print(result.stderr.strip(), file=sys.stderr)
            return result.returncode
        state = result.stdout.strip()
        if state != last_state:
            print(f"queued resource {tpu_slice.name}: {state}", file=sys.stderr, flush=True)
            last_state = state
        if state == "ACTIVE":
            return 0
        if state in QUEUED_FAILED_STATES:
            return 1
        shell.sleep(shell.poll_seconds)


def provision(tpu_slice, shell):
    """Creates the slice and waits until it can run commands; exit status."""
    status = shell.run(create_command(tpu_slice))
    if status or not tpu_slice.queued:
        return status
    return wait_until_active(tpu_slice, shell)


def launch(tpu_slice, job, shell, max_restarts=3, keep=False):
    """Create, install, train, delete; after a preemption delete, re-create and go on.

    The VM state is checked after the run whatever its exit status: a trainer that
    got SIGTERM saves and exits 0 before the VM goes down. Returns the exit status."""
    try:
        status = provision(tpu_slice, shell)
        if status:
            return status
        for restart in itertools.count(1):
            status = (shell.run(on_all_workers(tpu_slice, install_script(job)))
                      or shell.run(on_all_workers(tpu_slice, train_script(job))))
            if shell.dry_run or not is_preempted(shell.query(node_state_command(tpu_slice))):
                return status
            if restart > max_restarts:
                print(f"{tpu_slice.name} was preempted {restart} times; giving up "
                      f"(--max_restarts={max_restarts})", file=sys.stderr)
                return status or 1
            print(f"{tpu_slice.name} was preempted: re-creating it (restart {restart} of "
                  f"{max_restarts}); training resumes from {job.workdir}", file=sys.stderr)
            shell.run(delete_command(tpu_slice))
            status = provision(tpu_slice, shell)
            if status:
                return status
    finally:
        if not keep:
            shell.run(delete_command(tpu_slice))


def local_checkout(directory):
    """(origin URL, HEAD commit, whether a remote branch holds that commit) of a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                              text=True, check=True).stdout.strip()
    commit = git("rev-parse", "HEAD")
    return git("remote", "get-url", "origin"), commit, bool(git("branch", "-r", "--contains", commit))


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu_vm", allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="--config.KEY=VALUE overrides and anything after `--` go to the trainer.")
    parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name.")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
    parser.add_argument("--accelerator-type", "--accelerator_type", dest="accelerator_type",
                        required=True, help="e.g. v4-16 (a pod slice of 2 workers)")
    parser.add_argument("--version", "--runtime_version", dest="runtime_version",
                        default="tpu-ubuntu2204-base", help="TPU VM runtime; v5e, v5p and v6e "
                        "need their own (see Cloud TPU's runtime versions).")
    parser.add_argument("--project", help="Google Cloud project (default: gcloud's).")
    provisioning = parser.add_mutually_exclusive_group()
    provisioning.add_argument("--spot", dest="provisioning", action="store_const", const="spot")
    provisioning.add_argument("--preemptible", dest="provisioning", action="store_const",
                              const="preemptible")
    parser.add_argument("--queued", action="store_true", help="Request the slice as a queued "
                        "resource and wait until it is ACTIVE.")
    parser.add_argument("--repo", help="git URL the workers clone (default: this checkout's "
                        "origin; it must be reachable from the workers).")
    parser.add_argument("--ref", help="commit, branch or tag (default: this checkout's HEAD, "
                        "which must be pushed).")
    parser.add_argument("--workdir", required=True, help="gs://BUCKET/PATH shared by all workers.")
    parser.add_argument("--config", help="Trainer config, e.g. configs/clip.py:ViT-B-32 "
                        "(relative to the repository root).")
    parser.add_argument("--max_restarts", "--max-restarts", type=int, default=3,
                        help="Re-creations after preemption before giving up.")
    parser.add_argument("--keep", action="store_true", help="Do not delete the slice at the end.")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Print the commands instead of running them.")
    return parser


def parse(argv):
    """(Slice, Job, options) from the command line; exits with one line on bad input."""
    options, trainer_args = parse_with_trainer_args(_parser(), argv)
    if not options.workdir.startswith("gs://"):
        sys.exit(f"tpu_vm: --workdir={options.workdir} is not on Cloud Storage: every worker "
                 "reads and writes the same checkpoints, so use --workdir=gs://BUCKET/PATH")
    if options.queued and options.provisioning == "preemptible":
        sys.exit("tpu_vm: queued resources take --spot, not --preemptible")
    repo, ref = options.repo, options.ref
    if repo is None or ref is None:
        checkout = Path(__file__).resolve().parent.parent
        try:
            origin, commit, pushed = local_checkout(checkout)
        except subprocess.CalledProcessError as error:
            sys.exit(f"tpu_vm: cannot read the origin URL and commit of {checkout} "
                     f"({error.stderr.strip()}); pass --repo and --ref")
        if ref is None and not pushed:
            print(f"tpu_vm: warning: commit {commit[:12]} is on no remote branch; the workers "
                  "cannot check it out until it is pushed", file=sys.stderr)
        repo, ref = repo or origin, ref or commit
    tpu_slice = Slice(options.name, options.zone, options.accelerator_type,
                      options.runtime_version, options.provisioning, options.queued,
                      options.project)
    job = Job(repo, ref, options.workdir, tuple(trainer_args))
    return tpu_slice, job, options


def main(argv=None):
    tpu_slice, job, options = parse(sys.argv[1:] if argv is None else argv)
    try:
        return launch(tpu_slice, job, Shell(dry_run=options.dry_run),
                      max_restarts=options.max_restarts, keep=options.keep)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
