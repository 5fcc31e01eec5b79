r"""Config sweeps: run every run of a sweep declared next to the config, then
tabulate them.

  python -m launch.sweep run --config configs/clip.py:tiny --sweep lr_batch --root /tmp/sweep \
      [--set total_steps=300 ...] [--dry-run]
  python -m launch.sweep collect --root /tmp/sweep --metric zeroshot/synthetic_shapes/top1 \
      [--x optimizer.lr] [--output /tmp/sweep/ablation]
  python -m launch.sweep collect --root /tmp/objectives --metric zeroshot/synthetic_shapes/top1 \
      --efficiency [--target 0.5] [--output /tmp/objectives/efficiency]

`run` trains the runs one after another in ROOT/NAME, NAME spelling the run's
overrides (e.g. optimizer.lr=0.001_batch_size=64); runs that reached total_steps
are skipped, unfinished ones resume. `collect --efficiency` plots the metric
against images seen and tabulates the images each run needs to reach a target
(default: the lowest of the runs' best values), with the ratios of the runs the
config's get_comparisons(sweep) names (launch/efficiency.py).
`--emit tpu|slurm` prints each run's command
through launch.tpu_vm / launch.slurm instead, with the launcher's own arguments
given after `--`:

  python -m launch.sweep run --config configs/clip.py:ViT-B-32 --sweep lr_batch \
      --root gs://bucket/sweep --emit tpu -- --tpu my-tpu --zone us-central2-b
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as `python launch/sweep.py`: import from the repository
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip_jax import config_files  # noqa: E402
from launch import ablation, efficiency, sweep_plan  # noqa: E402
from launch.arguments import split_at_double_dash  # noqa: E402

LOG_FILE = "train.log"  # the trainer's output, in each run directory
_LOG_TAIL_LINES = 15  # shown when a run fails


class SweepError(ValueError):
    """A sweep that cannot start or be collected; the message is one line."""


def load_config_module(path):
    """The config file at `path` (e.g. configs/clip.py) as a module."""
    try:
        return config_files.load_module(path)
    except FileNotFoundError as error:
        raise SweepError(str(error)) from None


def plan_runs(config_flag, sweep_name, root, sets):
    """[(name, workdir, overrides, total_steps)] of the sweep's runs; `sets`
    ({key: value string}) apply to all of them. Checks every key first."""
    path, _, arg = config_flag.partition(":")
    module = load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} declares no sweeps (it has no get_sweep(name))")
    try:
        runs = module.get_sweep(sweep_name)
        config = module.get_config(arg or None)
        sweep_plan.check_keys(config, runs, sets)
        names = sweep_plan.run_names(runs)
    except ValueError as error:
        raise SweepError(str(error)) from None
    return [(name, os.path.join(root, name), run,
             sweep_plan.expected_total_steps(config, sets, run))
            for name, run in zip(names, runs)]


def is_finished(workdir, total_steps):
    """Whether the run in `workdir` logged its last step."""
    rows = ablation.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return any(int(row["step"]) == total_steps for row in rows)


def _log_tail(path):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-_LOG_TAIL_LINES:])


def _train(command, workdir, record):
    """Runs one trainer command with its output in WORKDIR/train.log; its exit code."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ablation.SWEEP_FILE), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(workdir, LOG_FILE), "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def run_sweep(config_flag, sweep_name, root, assignments=(), emit="local", dry_run=False,
              launcher_args=()):
    """Trains (or prints the commands of) every run of the sweep, with the `--set`
    `assignments` ('key=value') applied to each; returns the names of the runs that
    failed."""
    sets = sweep_plan.parse_sets(assignments)
    runs = plan_runs(config_flag, sweep_name, root, sets)
    failed, trained, skipped = [], 0, 0
    for index, (name, workdir, overrides, total_steps) in enumerate(runs, 1):
        args = sweep_plan.trainer_args(config_flag, workdir, {**overrides, **sets})
        # Launcher commands are for copying to a shell; local ones run this interpreter.
        command = sweep_plan.run_command(sys.executable if emit == "local" else "python", args,
                                         emit, launcher_args)
        if emit != "local":
            print(shlex.join(command))
            continue
        if is_finished(workdir, total_steps):
            skipped += 1
            print(f"# [{index}/{len(runs)}] {name}: finished (step {total_steps}), skipped")
            continue
        if dry_run:
            print(shlex.join(command))
            continue
        print(f"[{index}/{len(runs)}] {name}: training, log in {workdir}/{LOG_FILE}", flush=True)
        started = time.time()
        record = dict(sweep=sweep_name, config=config_flag, overrides=overrides, set=sets)
        code = _train(command, workdir, record)
        if code == 0:
            trained += 1
            print(f"[{index}/{len(runs)}] {name}: done in {time.time() - started:.0f}s", flush=True)
        else:
            failed.append(name)
            print(f"[{index}/{len(runs)}] {name}: FAILED with exit code {code} after "
                  f"{time.time() - started:.0f}s; the end of its log:\n"
                  + _log_tail(os.path.join(workdir, LOG_FILE)), flush=True)
    if emit == "local" and not dry_run:
        print(f"sweep {sweep_name}: {trained} trained, {skipped} already finished, "
              f"{len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
    return failed


def _output_prefix(root, output):
    if output:
        return output
    # PNGs are written locally: a remote sweep's table goes to the current directory.
    return os.path.join(root, "ablation") if "://" not in root else "ablation"


def collect(root, metric, x_key=None, output=None, goal="max"):
    """Writes OUTPUT.md, OUTPUT.csv and OUTPUT.png for the runs under `root`; prints
    the Markdown table and returns the paths written."""
    runs = ablation.with_overrides(ablation.read_runs(root))
    if not runs:
        raise SweepError(f"{root}: no run directories (with sweep.json or config.json)")
    logged = sorted({name for run in runs for row in run["rows"] for name in row} - {"step"})
    if metric not in logged:
        raise SweepError(f"--metric {metric!r} was not logged by any run; logged: "
                         + ", ".join(logged))
    swept = ablation.swept_keys(runs)
    if x_key and x_key not in swept:
        raise SweepError(f"--x {x_key!r} is not a swept key; swept: {', '.join(swept)}")
    header, rows = ablation.table(runs, metric, goal)
    prefix = _output_prefix(root, output)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    paths = [f"{prefix}.md", f"{prefix}.csv", f"{prefix}.png"]
    text = ablation.markdown(header, rows)
    with open(paths[0], "w") as f:
        f.write(f"# Sweep {root}: {metric}\n\n{text}\n![{metric}]({os.path.basename(paths[2])})\n")
    with open(paths[1], "w") as f:
        f.write(ablation.csv_text(header, rows))
    if x_key:
        series = ablation.series_against(runs, metric, x_key)
        ablation.plot(series, paths[2], x_key, f"final {metric}", f"{root}: {metric}")
    else:
        series = ablation.series_over_steps(runs, metric)
        ablation.plot(series, paths[2], "step", metric, f"{root}: {metric}")
    print(text)
    print("wrote " + ", ".join(paths))
    return paths


def _config_module_of(runs, config_flag=None):
    """(the sweep's config module or None, sweep name or None): from --config, else from
    the config path the runs' sweep.json recorded (relative to the directory the sweep
    ran in, or to this repository)."""
    records = [run["record"] for run in runs if run["record"]]
    sweep_name = records[0]["sweep"] if records else None
    path = (config_flag or (records[0]["config"] if records else "")).partition(":")[0]
    if not path:
        return None, sweep_name
    repository_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   path)
    if not os.path.exists(path) and os.path.exists(repository_path):
        path = repository_path
    return load_config_module(path), sweep_name


def collect_efficiency(root, metric, target=None, output=None, config_flag=None):
    """Writes OUTPUT.md (images to reach `target` per run, the config's comparisons with
    the paper's ratios), OUTPUT.csv (the per-run table) and OUTPUT.png (metric against
    images seen); prints the Markdown and returns the paths written."""
    runs = ablation.with_overrides(ablation.read_runs(root))
    runs = [run for run in ablation.in_swept_order(runs) if efficiency.images_seen(run, metric)]
    if not runs:
        raise SweepError(f"{root}: no run logged {metric!r}")
    module, sweep_name = _config_module_of(runs, config_flag)
    comparisons = (module.get_comparisons(sweep_name)
                   if module is not None and hasattr(module, "get_comparisons") else [])
    if module is not None and sweep_name:  # the sweep's own order (Figure 2: slowest first)
        declared = module.get_sweep(sweep_name)
        runs.sort(key=lambda run: declared.index(run["overrides"])
                  if run["overrides"] in declared else len(declared))
    series = {efficiency.label(run): efficiency.images_seen(run, metric) for run in runs}
    target = efficiency.default_target(series) if target is None else target
    (run_header, run_rows), (comparison_header, comparison_rows) = efficiency.tables(
        runs, metric, target, comparisons)
    prefix = output or (os.path.join(root, "efficiency") if "://" not in root else "efficiency")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    paths = [f"{prefix}.md", f"{prefix}.csv", f"{prefix}.png"]
    text = ablation.markdown(run_header, run_rows)
    if comparison_rows:
        text += "\n" + ablation.markdown(comparison_header, comparison_rows)
    with open(paths[0], "w") as f:
        f.write(f"# Sweep {root}: images seen to reach {metric} = {target:.4g}\n\n{text}\n"
                f"![{metric} against images seen]({os.path.basename(paths[2])})\n")
    with open(paths[1], "w") as f:
        f.write(ablation.csv_text(run_header, run_rows))
    time_series = ({efficiency.label(run): efficiency.training_seconds(run, metric)
                    for run in runs} if efficiency.timed(runs, metric) else None)
    efficiency.plot(series, paths[2], metric, target, f"{root}: {metric}", time_series)
    print(f"target {metric} = {target:.4g}\n{text}")
    print("wrote " + ", ".join(paths))
    return paths


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train every run of a sweep (or print the commands)")
    run.add_argument("--config", required=True,
                     help="config file and argument, e.g. configs/clip.py:tiny")
    run.add_argument("--sweep", required=True, help="a sweep name of the config's get_sweep")
    run.add_argument("--root", required=True, help="directory of the runs' workdirs")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="config override applied to every run (repeatable)")
    run.add_argument("--emit", choices=["local", *sweep_plan.LAUNCHERS], default="local",
                     help="local: train here; tpu/slurm: print launcher commands, with the "
                     "arguments after -- passed to the launcher")
    run.add_argument("--dry-run", action="store_true", help="print the commands, train nothing")
    collect_ = commands.add_parser("collect", help="ablation table (Markdown, CSV) and plot")
    collect_.add_argument("--root", required=True, help="the sweep's --root")
    collect_.add_argument("--metric", required=True,
                          help="e.g. zeroshot/synthetic_shapes/top1")
    collect_.add_argument("--x", help="swept key to plot the final metric against (default: "
                          "the metric against the step, per run)")
    collect_.add_argument("--goal", choices=["max", "min"], default="max",
                          help="whether the best value of --metric is its max or its min")
    collect_.add_argument("--output", help="path prefix of the .md, .csv and .png "
                          "(default ROOT/ablation, with --efficiency ROOT/efficiency)")
    collect_.add_argument("--efficiency", action="store_true",
                          help="the metric against images seen, images to reach --target per "
                          "run and the config's comparisons (CLIP paper, Figure 2)")
    collect_.add_argument("--target", type=float,
                          help="with --efficiency: the metric value to reach (default: the "
                          "lowest of the runs' best values)")
    collect_.add_argument("--config", help="with --efficiency: the config file declaring "
                          "get_comparisons (default: the one the runs' sweep.json recorded)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # Arguments after `--` belong to the launcher (--emit tpu|slurm).
    own_args, launcher_args = split_at_double_dash(argv)
    options = _parser().parse_args(own_args)
    try:
        if options.command == "collect" and options.efficiency:
            collect_efficiency(options.root, options.metric, options.target, options.output,
                               options.config)
            return 0
        if options.command == "collect":
            collect(options.root, options.metric, options.x, options.output, options.goal)
            return 0
        if launcher_args and options.emit == "local":
            raise SweepError("arguments after -- go to a launcher; add --emit tpu or slurm")
        failed = run_sweep(options.config, options.sweep, options.root, options.set,
                           options.emit, options.dry_run, launcher_args)
    except SweepError as error:
        sys.exit(f"sweep error: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
