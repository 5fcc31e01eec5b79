r"""Trains CLIP: config -> mesh -> sharded state -> input -> jitted step -> metrics.

  python -m clip_jax.train --config configs/clip.py:tiny --workdir /tmp/clip_tiny

--config is a config file and its argument, FILE.py:VARIANT[,KEY=VALUE,...]
(configs/clip.py: `tiny` or a zoo model such as ViT-B-32, with top-level knobs,
e.g. configs/clip.py:ViT-B-32,total_steps=1000). Any key is then overridden with
--config.KEY=VALUE, dotted for nested keys (--config.optimizer.lr=1e-3
--config.mesh.fsdp=8). Every key is listed with its meaning in docs/configs.md
and commented in configs/clip.py. Re-running with the same --workdir resumes
from its latest checkpoint.
"""

from clip_jax import quiet_tensorflow  # noqa: F401  (before TensorFlow loads)
import os
import re
import socket
import sys
import time

import jax
import numpy as np
import tqdm
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from clip_jax import checkpoint, config_files, op_profile, preemption, sharding, spawn
from clip_jax import phases as phases_lib
from clip_jax.distributed import define_distributed_flags, initialize_distributed
from clip_jax import variables as variables_lib
from clip_jax.config_checks import ConfigError, check_config
from clip_jax.progress import StepProgress
from clip_jax.data import pipeline
from clip_jax.data.phased_input import PhasedInput
from clip_jax.metrics import MetricWriter
from clip_jax.train_step import setup_training
from clip_jax.evals.suite import EvalSuite




def _define_flags():
    """--config (with --config.key=value overrides) and --workdir.

    ml_collections applies the overrides while defining the flag, so an unknown
    key surfaces here as a KeyError/AttributeError: turn it into one line.
    """
    try:
        config = config_flags.DEFINE_config_file(
            "config", f"{config_files.DEFAULT_FILE}:tiny",
            "Config file and variant, e.g. configs/clip.py:tiny.", lock_config=True)
    except (AttributeError, KeyError) as error:
        message = str(error).replace("\\", "")
        key = re.search(r"'(\w+)'", message)
        key = key.group(1) if key else message
        suggestion = re.search(r'Did you mean "(\w+)"', message)
        flag = next((a for a in sys.argv if a.startswith("--config.") and key in a), key)
        sys.exit(f"config error: {flag}: no such config key {key!r}"
                 + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""))
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                                  "TensorBoard logs (local or gs://).", required=True)
    return config, workdir


def _print(message):
    """Prints on process 0 only, without breaking the progress bar."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


def _describe_start(config, mesh, state, shardings, start_step, phases):
    _print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} on "
           f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}")
    _print("parameters (path, shape, sharding):\n"
           + sharding.sharding_table(state.params, shardings.params))
    _print(f"global batch {config.batch_size}, {config.total_steps} steps"
           + (f", resuming from step {start_step}" if start_step else ""))
    if len(phases) > 1:
        _print("phases:\n" + "\n".join(f"  {phase.describe()}" for phase in phases))


def _global_batch(local_batch, batch_sharding):
    """This process's numpy batch -> global jax arrays sharded over the batch axes."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
                        local_batch)


def _initialise_from(path, state, abstract_state, shardings):
    """`state` with its parameters and running statistics read from `path`."""
    abstract = variables_lib.with_shardings(
        {"params": abstract_state.params, **abstract_state.model_state}, shardings.variables())
    try:
        variables = checkpoint.load_variables(path, abstract)
    except ValueError as error:
        raise ConfigError(f"config.init_from: {error}") from None
    _print(f"initialised parameters from {path}")
    params = variables.pop("params")
    return state.replace(params=params, model_state=variables)


def _is_due(step, every, total_steps):
    return step == total_steps or (every > 0 and step % every == 0)


def train(config, workdir):
    """Runs training to config.total_steps and returns the last logged metrics."""
    check_config(config, jax.device_count())
    started = time.time()
    try:
        training = setup_training(config)
    except ValueError as error:  # e.g. a mesh axis that does not divide a parameter
        raise ConfigError(str(error)) from None
    mesh, model, shardings = training.mesh, training.model, training.shardings
    abstract_state = training.abstract_state

    manager = checkpoint.make_manager(workdir, config)
    state, saved = checkpoint.restore_latest(
        manager, variables_lib.with_shardings(abstract_state, shardings),
        warn=lambda message: _print(f"warning: {message}"))
    if state is None:
        state = training.init_state(jax.random.key(config.seed))
        if config.init_from:
            state = _initialise_from(config.init_from, state, abstract_state, shardings)
    start_step = int(state.step)
    input_state, input_warning = pipeline.local_input_state(saved.get("input"), start_step,
                                                            config.batch_size)
    trained_seconds = saved.get("progress", {}).get("train_seconds", 0.0)
    if start_step and "progress" not in saved:
        _print(f"warning: the checkpoint at step {start_step} has no training time; "
               "train/seconds counts from 0")
    if start_step and input_warning:
        logging.warning("input: %s", input_warning)
        _print(f"warning: {input_warning}")
    _describe_start(config, mesh, state, shardings, start_step, training.phases)
    if jax.process_index() == 0:
        workdir_path = epath.Path(workdir)
        workdir_path.mkdir(parents=True, exist_ok=True)
        (workdir_path / "config.json").write_text(config.to_json(indent=2))

    try:
        evaluator = EvalSuite(config.evals, model, mesh, shardings.variables(),
                              eval_every=config.eval_every,
                              default_data_dir=config.data.data_dir, workers=config.data.workers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    best_manager = (checkpoint.make_manager(os.path.join(workdir, "best"), config,
                                            best_metric=config.keep_best)
                    if config.keep_best else None)
    run = _Run(config, training, sharding.batch_sharding(mesh), evaluator, writer, manager,
               best_manager, workdir)
    try:
        with (PhasedInput(config, training.phases, input_state, start_step) as batches,
              preemption.PreemptionWatcher() as watcher):
            row, preempted_at = run.loop(state, batches, input_state, start_step,
                                         trained_seconds, watcher)
    finally:
        for open_manager in (manager, best_manager):
            if open_manager is not None:
                open_manager.wait_until_finished()  # a started save always completes
                open_manager.close()
        writer.close()
    if preempted_at is not None:
        _print(f"preempted: saved step {preempted_at}; re-run the same command to resume")
        return row
    _print(f"done: step {config.total_steps} in {time.time() - started:.0f}s; "
           + (f"train/loss {row['train/loss']:.4f}; " if "train/loss" in row else "")
           + _headline_metrics(row))
    return row


def _step_profiler(profile, workdir):
    """config.profile's window (None when off), its trace kept where TensorBoard's
    profile plugin and xprof look: WORKDIR/plugins/profile/RUN/HOST.xplane.pb."""
    if not profile.start_step or workdir is None:
        return None
    last = profile.start_step + profile.steps - 1
    host = f"{socket.gethostname()}_process{jax.process_index()}"
    return op_profile.StepWindow(profile.start_step, profile.steps, keep_as=os.path.join(
        workdir, "plugins", "profile", f"steps_{profile.start_step}-{last}", f"{host}.xplane.pb"))


class TrainingStopped(RuntimeError):
    """The run cannot usefully go on (e.g. diverged); the message is one line."""


def _next_device_batch(batches, batch_sharding):
    """(global device batch, input state after it) from the host input."""
    host_batch, input_state = next(batches)
    # Record ids and sources: for tests, debugging and the mixture metrics, not the step.
    del host_batch["indices"], host_batch["sources"]
    return _global_batch(host_batch, batch_sharding), input_state


def _all_agree(flag):
    """Process 0's value of `flag` on every process (a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.bool_)))


def _diverged_message(step, metrics, config):
    metrics = jax.device_get(metrics)
    names = ["loss"] + sorted(name for name in metrics if name.startswith("grad_norm"))
    values = {name: float(metrics[name]) for name in names}
    bad = [name for name, value in values.items() if not np.isfinite(value)]
    return (f"step {step}: {int(metrics['bad_steps_in_a_row'])} steps in a row with non-finite "
            f"values (config.max_bad_steps={config.max_bad_steps}); non-finite: "
            f"{', '.join(bad) or 'none reported'} ("
            + ", ".join(f"{name}={value:.4g}" for name, value in values.items())
            + "); the last good parameters are checkpointed")


# Headline metrics as eval lines show them; the rest is in metrics.jsonl.
_HEADLINE_LABELS = {"top1": "top-1", "image_to_text_r1": "i2t R@1", "text_to_image_r1": "t2i R@1"}
_EVALUATOR_ORDER = ("zeroshot", "linear_probe", "retrieval")


def _headline_metrics(row):
    """'zeroshot/D top-1 V; retrieval/D i2t R@1 V, t2i R@1 V (+N in metrics.jsonl)':
    each evaluator's headline metrics, zero-shot first, so the line fits a terminal;
    non-zero skip counts are shown too (they are warnings)."""
    groups, hidden = {}, 0
    for key, value in row.items():
        prefix, _, metric = key.rpartition("/")
        if metric in _HEADLINE_LABELS or (metric == "skipped" and value):
            groups.setdefault(prefix, []).append(f"{_HEADLINE_LABELS.get(metric, metric)} {value:.4g}")
        elif prefix.split("/")[0] in _EVALUATOR_ORDER and metric not in (
                "examples", "captions", "train_examples", "skipped"):
            hidden += 1
    rank = lambda prefix: (_EVALUATOR_ORDER.index(prefix.split("/")[0])  # noqa: E731
                           if prefix.split("/")[0] in _EVALUATOR_ORDER else len(_EVALUATOR_ORDER),
                           prefix)
    line = "; ".join(f"{prefix} {', '.join(groups[prefix])}" for prefix in sorted(groups, key=rank))
    return line + (f" (+{hidden} in metrics.jsonl)" if hidden else "")


def _eval_line(step, eval_row):
    return f"step {step}: {_headline_metrics(eval_row)}"


class _Run:
    """The step loop of one run and what it writes (metrics, evals, checkpoints)."""

    def __init__(self, config, training, batch_sharding, evaluator, writer, manager,
                 best_manager=None, workdir=None):
        self.config, self.training, self.batch_sharding = config, training, batch_sharding
        self.evaluator, self.writer, self.manager = evaluator, writer, manager
        self.best_manager = best_manager
        self.profiler = _step_profiler(config.profile, workdir)
        self.last_save_time = time.time()
        self.source_labels = pipeline.source_labels(config.data)

    def save_if_best(self, state, input_state, eval_row):
        metric = self.config.keep_best
        if metric not in eval_row:
            raise ConfigError(f"config.keep_best={metric!r} is not an eval metric; "
                              f"they are {', '.join(sorted(eval_row))}")
        checkpoint.save(self.best_manager, state, metrics={metric: float(eval_row[metric])},
                        input=self.input_states(input_state))

    def input_states(self, input_state):
        """Every process's input position (a collective), as checkpoints store it."""
        return pipeline.gather_input_states(input_state, self.source_labels)

    def _profiled(self, step, metrics, hlo_text, progress):
        """Logs the profile of config.profile's steps once its last one is dispatched."""
        window = self.profiler
        try:
            summary = window.after(step, metrics, hlo_text)
        except Exception as error:  # noqa: BLE001  (the profiler raises its own types)
            progress.write(f"warning: no profile of steps {window.first}-{window.last}: "
                           f"{str(error).strip().splitlines()[0]}")
            return
        if summary is not None:
            progress.write(f"profile of steps {window.first}-{window.last}, trace in "
                           f"{window.keep_as}:\n" + "\n".join(op_profile.describe(summary)))

    def save(self, state, input_state, trained_seconds):
        checkpoint.save(self.manager, state, input=self.input_states(input_state),
                        progress={"train_seconds": trained_seconds})
        self.last_save_time = time.time()

    def loop(self, state, batches, input_state, start_step, trained_seconds, watcher):
        """Steps start_step + 1 .. total_steps -> (last logged metrics, the step
        saved for a preemption or None). trained_seconds: train/seconds at
        start_step (0 for a new run)."""
        config = self.config
        progress = StepProgress(config.total_steps, start_step,
                                enabled=jax.process_index() == 0)
        row = {}
        last_time, last_step = None, start_step
        in_flight = None
        upcoming = (_next_device_batch(batches, self.batch_sharding)
                    if start_step < config.total_steps else None)
        if upcoming is not None:
            progress.write("compiling the train step (the first step waits for it)")
        run_phases = self.training.phases
        # train/seconds: wall-clock of the steps, compilation and evaluation left
        # out (what the efficiency study plots accuracy against), as process 0
        # measures it; saves carry it, so it goes on counting after a resume.
        def seconds_now():
            return trained_seconds + (0.0 if last_time is None else time.time() - last_time)
        for step in range(start_step + 1, config.total_steps + 1):
            batch, input_state = upcoming
            phase = phases_lib.phase_at(run_phases, step)
            if step == phase.first_step + 1 and step > start_step + 1:
                progress.write(f"phase {run_phases.index(phase) + 1} of {len(run_phases)}, "
                               f"{phase.describe()}: compiling its train step")
                if last_time is not None:
                    jax.block_until_ready(in_flight)
                    trained_seconds += time.time() - last_time
                last_time = None  # its compilation is not throughput
            step_function = self.training.step_at(step)
            if self.profiler:
                self.profiler.before(step, pending=in_flight)
            # Any implicit host<->device copy inside the step is a bug: fail loudly.
            with jax.transfer_guard("disallow"):
                prepared = self.training.prepare(batch)
                state, metrics = step_function(state, prepared)
            if self.profiler:
                self._profiled(step, metrics, lambda: step_function.lower(
                    state, prepared).compile().as_text(), progress)
            # The next batch goes to the devices while this step runs.
            upcoming = (_next_device_batch(batches, self.batch_sharding)
                        if step < config.total_steps else None)
            # Keep one step in flight: enough to hide dispatch, and a deeper queue of
            # collectives can starve the rendezvous of many fake devices on few CPU cores.
            jax.block_until_ready(in_flight)
            if (in_flight is not None
                    and int(in_flight["bad_steps_in_a_row"]) >= config.max_bad_steps):
                # Bad steps left the parameters untouched.
                self.save(state, input_state, seconds_now())
                raise TrainingStopped(_diverged_message(step - 1, in_flight, config))
            in_flight = metrics
            progress.update()
            if last_time is None:  # exclude compilation from the throughput figure
                jax.block_until_ready(metrics)
                last_time, last_step = time.time(), step
            logged = _is_due(step, config.log_every, config.total_steps)
            if logged:
                row = {f"train/{name}": value for name, value in jax.device_get(metrics).items()
                       if name != "bad_steps_in_a_row"}
                row.update(pipeline.input_metrics(self.input_states(input_state)))
                if step > last_step:  # the first step of a run is compilation, not throughput
                    now = time.time()
                    row["train/samples_per_sec"] = ((step - last_step) * config.batch_size
                                                    / (now - last_time))
                    trained_seconds += now - last_time
                    row["train/seconds"] = trained_seconds
                    last_time, last_step = now, step
                progress.log(step, float(row["train/loss"]), row.get("train/samples_per_sec"),
                             config.batch_size)
                self.writer.write(step, row)
            evaluated = bool(self.evaluator.due(step, final=step == config.total_steps))
            if evaluated:
                jax.block_until_ready(metrics)
                trained_seconds += time.time() - last_time
                last_time = None  # evaluation is not training time
                eval_row, _ = self.evaluator(state.variables(), step,
                                             final=step == config.total_steps)
                self.writer.write(step, eval_row)
                row.update(eval_row)
                progress.write(_eval_line(step, eval_row))
                if self.best_manager is not None:
                    self.save_if_best(state, input_state, eval_row)
            if watcher.reached(step):
                self.save(state, input_state, seconds_now())
                progress.close()
                return row, step
            overdue = logged and config.checkpoint_minutes > 0 and _all_agree(
                time.time() - self.last_save_time >= 60 * config.checkpoint_minutes)
            if overdue or _is_due(step, config.checkpoint_every, config.total_steps):
                self.save(state, input_state, seconds_now())
            if evaluated:
                last_time, last_step = time.time(), step  # throughput counts training only
        progress.close()
        return row, None


def main(argv, config_flag, workdir_flag, distributed_flags):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    initialize_distributed(**{key: flag.value for key, flag in distributed_flags.items()})
    try:
        train(config_flag.value, workdir_flag.value)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    except TrainingStopped as error:
        sys.exit(f"training stopped: {error}")


if __name__ == "__main__":
    spawn.detach_main_module()  # input workers need none of this module's imports
    _config_flag, _workdir_flag = _define_flags()
    _distributed_flags = define_distributed_flags()
    if {"-h", "--help", "--helpshort"} & set(sys.argv[1:]):  # absl exits 1 on --help
        print(__doc__ + "\n" + flags.FLAGS.main_module_help())
        sys.exit(0)
    app.run(lambda argv: main(argv, _config_flag, _workdir_flag, _distributed_flags))
