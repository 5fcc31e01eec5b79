"""A sweep as runs: each run's workdir name, config overrides and command line.

Pure functions: nothing here touches the filesystem or starts a process.
"""

import hashlib
import re

from clip_jax import overrides

# Longest workdir name kept whole; longer ones are cut and end in a hash of the full
# name, so they stay distinct and under filesystem limits (255 bytes).
MAX_NAME_LENGTH = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
# The launchers of other machines, by --emit name; each takes the trainer's
# arguments after `--`.
LAUNCHERS = {"tpu": "launch.tpu_vm", "slurm": "launch.slurm"}


def format_value(value):
    """A config value as the trainer's `--config.key=VALUE` reads it."""
    return repr(value) if isinstance(value, float) else str(value)


def run_name(overrides):
    """A readable, filesystem-safe workdir name: 'optimizer.lr=0.001_batch_size=64'."""
    name = "_".join(f"{key}={format_value(value)}" for key, value in overrides.items())
    name = _UNSAFE.sub("-", name) or "default"
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME_LENGTH - 9]}-{digest}"
    return name


def run_names(runs):
    """Workdir names of `runs` (lists of overrides), in order; an error if two clash."""
    names = [run_name(run) for run in runs]
    seen = {}
    for name, run in zip(names, runs):
        if name in seen:
            raise ValueError(f"runs {seen[name]} and {run} get the same workdir name {name!r}")
        seen[name] = run
    return names


def parse_sets(assignments):
    """['key=value', ...] -> {key: 'value'} (values stay strings, as on a command line)."""
    return dict(overrides.split(assignment) for assignment in assignments)


def check_keys(config, runs, sets):
    """Raises ValueError naming the first override key that `config` (a ConfigDict)
    lacks or whose value does not parse as the trainer would read it, or a --set
    key that a run also sets."""
    for run_overrides in [sets, *runs]:
        for key, value in run_overrides.items():
            try:
                overrides.parse(config, key, format_value(value))
            except ValueError as error:
                raise ValueError(f"{error} (in {run_overrides})") from None
    for run in runs:
        clash = sorted(set(run) & set(sets))
        if clash:
            raise ValueError(f"--set {clash[0]} is swept by the sweep itself; drop it from --set")


def trainer_args(config_arg, workdir, overrides):
    """The trainer's arguments for one run: --config, --workdir, --config.key=value."""
    return (["--config", config_arg, "--workdir", workdir]
            + [f"--config.{key}={format_value(value)}" for key, value in overrides.items()])


def run_command(python, args, emit="local", launcher_args=()):
    """The command line that runs the trainer with `args`: in this machine's Python
    (`emit` 'local') or through a launcher of another machine ('tpu', 'slurm')."""
    if emit == "local":
        return [python, "-m", "clip_jax.train", *args]
    # The launchers take --config, --workdir and --config.KEY=VALUE as their own flags.
    return [python, "-m", LAUNCHERS[emit], *launcher_args, *args]


def expected_total_steps(config, sets, overrides):
    """The run's config.total_steps once the command-line overrides apply."""
    value = overrides.get("total_steps", sets.get("total_steps", config.total_steps))
    return int(value)
