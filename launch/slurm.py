r"""Trains on a SLURM GPU cluster: writes a batch script and submits it with sbatch.

  python -m launch.slurm --nodes 2 --gpus_per_node 4 --partition gpu --time 24:00:00 \
      --requeue --workdir /shared/runs/b32 --config configs/clip.py:ViT-B-32 \
      --config.batch_size=4096 [--task_per_node] [--dry-run] [-- more trainer flags]

Submit from the repository root: the tasks start in the submission directory, where
relative --config paths resolve. --dry-run writes the script, prints it and the
sbatch command line, and submits nothing.
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/slurm.py`: import from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.arguments import parse_with_trainer_args  # noqa: E402


def resource_lines(nodes, gpus_per_node, task_per_node):
    """(#SBATCH lines for the tasks and GPUs, script lines choosing each task's GPUs).

    JAX's SLURM detection assumes every task sees all GPUs of its node and gives task
    SLURM_LOCALID the GPU of that number; JAX_LOCAL_DEVICE_IDS overrides it to fit."""
    if task_per_node:
        sbatch = [f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}"]
        devices = [f"# One task per node drives all {gpus_per_node} of its GPUs.",
                   "export JAX_LOCAL_DEVICE_IDS="
                   + ",".join(str(device) for device in range(gpus_per_node))]
    else:
        # --gpus-per-task needs an explicit task count.
        sbatch = [f"--nodes={nodes}", f"--ntasks={nodes * gpus_per_node}",
                  f"--ntasks-per-node={gpus_per_node}", "--gpus-per-task=1"]
        devices = ["# Each task sees only its own GPU, as device 0.",
                   "export JAX_LOCAL_DEVICE_IDS=0"]
    return [f"#SBATCH {option}" for option in sbatch], devices


def train_command(workdir, trainer_args):
    """The trainer's argv; jax.distributed reads the job's layout from SLURM's variables."""
    return ["python", "-m", "clip_jax.train", "--distributed_auto", "--workdir", workdir,
            *trainer_args]


def batch_script(options, trainer_args):
    """The sbatch script (text) for the parsed command-line `options`."""
    resources, devices = resource_lines(options.nodes, options.gpus_per_node,
                                           options.task_per_node)
    optional = [(f"--partition={options.partition}", options.partition),
                (f"--account={options.account}", options.account),
                (f"--time={options.time}", options.time),
                (f"--cpus-per-task={options.cpus_per_task}", options.cpus_per_task),
                (f"--output={options.output}", options.output),
                # A requeued job writes to the same log: append instead of truncating.
                ("--open-mode=append", options.requeue),
                ("--requeue", options.requeue)]
    header = (["#!/bin/bash", f"#SBATCH --job-name={options.job_name}", *resources]
              + [f"#SBATCH {line}" for line, wanted in optional if wanted]
              + [f"#SBATCH --signal=B:USR1@{options.save_before_limit}"])
    srun = ["srun", "--kill-on-bad-exit=1"]
    if options.cpus_per_task:
        # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05).
        srun.append(f"--cpus-per-task={options.cpus_per_task}")
    srun += train_command(options.workdir, trainer_args)
    after_save = ("then the job is requeued and resumes" if options.requeue
                  else "submitting this script again resumes")
    lines = [
        *header,
        "",
        *options.setup,
        *([""] if options.setup else []),
        *devices,
        "",
        f"# USR1 comes {options.save_before_limit} s before the time limit: SIGTERM goes to "
        "the training tasks",
        "# (by scancel: srun would turn it into SIGKILL), they save at the next step "
        "boundary and",
        f"# exit 0, {after_save} from the workdir.",
        "time_limit=0",
        'trap \'time_limit=1; scancel --signal=TERM "$SLURM_JOB_ID"\' USR1',
        "",
        f"{shlex.join(srun)} &",
        "srun_pid=$!",
        'wait "$srun_pid"',
        "status=$?",
        'if [ "$time_limit" = 1 ]; then',
        "    # The trap interrupted the wait above: wait for the save.",
        '    wait "$srun_pid"',
        "    status=$?",
        *(['    if [ "$status" = 0 ]; then', '        scontrol requeue "$SLURM_JOB_ID"', "    fi"]
          if options.requeue else []),
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m launch.slurm", allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="--config.KEY=VALUE overrides and anything after `--` go to the trainer.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", "--gpus-per-node", type=int, required=True)
    parser.add_argument("--task_per_node", "--task-per-node", action="store_true",
                        help="One task per node driving all its GPUs (default: one per GPU).")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", help="Time limit, e.g. 24:00:00.")
    parser.add_argument("--cpus_per_task", "--cpus-per-task", type=int,
                        help="CPU cores per task (image decoding threads).")
    parser.add_argument("--job_name", "--job-name", default="clip_jax")
    parser.add_argument("--output", help="Log path (SLURM's %%j = job id; default slurm-%%j.out).")
    parser.add_argument("--requeue", action="store_true", help="Requeue after saving at the "
                        "time limit, and after node failure or preemption.")
    parser.add_argument("--save_before_limit", type=int, default=120, metavar="SECONDS",
                        help="SIGTERM the trainer this long before the time limit so it saves.")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="Shell line run before training, e.g. 'source ~/venv/bin/activate' "
                        "(repeatable).")
    parser.add_argument("--workdir", required=True, help="Directory shared by all nodes, or gs://.")
    parser.add_argument("--config", help="Trainer config, e.g. configs/clip.py:ViT-B-32.")
    parser.add_argument("--script", help="Where to write the batch script "
                        "(default: JOB_NAME.sbatch here).")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Write and print the script and the sbatch command; submit nothing.")
    return parser


def parse(argv):
    """(options, trainer args) from the command line."""
    parser = _parser()
    options, trainer_args = parse_with_trainer_args(parser, argv)
    if options.nodes < 1 or options.gpus_per_node < 1:
        parser.error("--nodes and --gpus_per_node must be at least 1")
    return options, trainer_args


def main(argv=None):
    options, trainer_args = parse(sys.argv[1:] if argv is None else argv)
    script = batch_script(options, trainer_args)
    path = options.script or f"{options.job_name}.sbatch"
    with open(path, "w") as f:
        f.write(script)
    submit = ["sbatch", path]
    if options.dry_run:
        print(script, end="")
        print(shlex.join(submit))
        return 0
    print(f"wrote {path}; + {shlex.join(submit)}", file=sys.stderr, flush=True)
    return subprocess.run(submit).returncode


if __name__ == "__main__":
    sys.exit(main())
