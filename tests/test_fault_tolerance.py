"""Fault tolerance: bitwise resume after SIGKILL, SIGTERM saves and exits 0,
restore onto other meshes, damaged checkpoints, and skipped non-finite steps."""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax import checkpoint, convert, train_step
from clip_jax import variables as variables_lib
from clip_jax import train as train_lib
from clip_jax.train_step import setup_training
from tests.conftest import small_config
from tests.test_coca import small_coca_config
from tests.test_finetune import resnet_config
from tests.test_train_step import random_batch
from tests.trainer_process import distributed_flags, free_port, launch_trainer, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir(shrunk_data_dir):
    """The session's shrunk built-in datasets (tests/conftest.py), for the
    in-process and CLI runs."""
    return shrunk_data_dir


def _logged_steps(workdir):
    return [row["step"] for row in read_metrics(workdir) if "train/loss" in row]


def _wait_for_step(process, workdir, step, timeout=600):
    deadline = time.time() + timeout
    while max(_logged_steps(workdir), default=0) < step:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, f"no step {step} within {timeout}s"
        time.sleep(0.02)


def _finish(process):
    log = process.communicate(timeout=600)[0]
    assert process.returncode == 0, log[-3000:]
    return log


def _saved_steps(workdir):
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))
                  if name.isdigit())


def _final_variables(workdir, **model_overrides):
    return checkpoint.load_variables(
        str(workdir), convert.abstract_variables(small_config(**model_overrides).model))


def _saved_json(workdir, step, item="input"):
    with open(os.path.join(workdir, "checkpoints", str(step), item, "metadata")) as f:
        return json.load(f)


def _launches(rows):
    """Logged rows split per launch of the trainer (each resume logs lower steps again)."""
    launches = []
    for row in rows:
        if not launches or row["step"] <= launches[-1][-1]["step"]:
            launches.append([])
        launches[-1].append(row)
    return launches


KILL_RUN = {"total_steps": 10, "checkpoint_every": 2}
# The SIGKILL run reads a weighted mixture through worker processes, in three
# phases (16 patches of 4 px at full size): steps 1-4 at 8 px with patch dropout
# 0.5 and 6-token captions, 5-7 at 16 px with dropout 0.75, 8-10 unmasked.
MIXTURE = "synthetic_shapes:train@0.7 + synthetic_shapes_alt_text:train@0.3"
PHASES = {"model.image.patch_size": 4,
          "phases": "4: image_size=8, patch_dropout=0.5, context_length=6; "
                    "3: patch_dropout=0.75; 3"}


def _wait_for_save(process, workdir, step, timeout=600):
    """Until the checkpoint of `step` is committed (orbax renames it into place)."""
    deadline = time.time() + timeout
    while step not in (_saved_steps(workdir) if os.path.isdir(workdir / "checkpoints") else []):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, f"no save of step {step} within {timeout}s"
        time.sleep(0.02)


def test_sigkill_at_any_point_then_resume_is_bitwise_an_uninterrupted_run(data_dir, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    config = {**KILL_RUN, "data.train": MIXTURE, "data.workers": 2, **PHASES}
    # The reference saves only its last step: saving must not change the run.
    _finish(launch_trainer(straight, data_dir, config={**config, "checkpoint_every": 0}))
    # Killed after step 3 once step 2 is saved (resumes from step 2, inside the first,
    # masked phase) and after step 9 once step 8 is saved (from step 8, inside the
    # unmasked one; the save of a later step may be in flight), each time resumed by
    # re-running the same command.
    first_steps = []  # the first step each launch after a kill logged
    for kill_after, saved in ((3, 2), (9, 8)):
        logged_before = len(_logged_steps(interrupted))
        process = launch_trainer(interrupted, data_dir, config=config)
        _wait_for_step(process, interrupted, kill_after)
        _wait_for_save(process, interrupted, saved)
        process.send_signal(signal.SIGKILL)
        process.wait()  # orphaned workers (if any) would hold the output pipe open
        if logged_before:
            first_steps.append(_logged_steps(interrupted)[logged_before])
    logged_before = len(_logged_steps(interrupted))
    _finish(launch_trainer(interrupted, data_dir, config=config))
    first_steps.append(_logged_steps(interrupted)[logged_before])
    assert first_steps == [3, 9]  # resumed from step 2 (masked phase), from 8 (unmasked)

    reference = {row["step"]: row for row in read_metrics(straight) if "train/loss" in row}
    rows = [row for row in read_metrics(interrupted) if "train/loss" in row]
    assert sorted({row["step"] for row in rows}) == list(range(1, 11))
    assert len(rows) > 10  # steps after the last save before a kill ran twice
    for row in rows:  # every run of every step: the same loss and gradient norm, bitwise
        for key in ("train/loss", "train/grad_norm", "train/logit_scale",
                    "data/source/synthetic_shapes:train/samples",
                    "data/source/synthetic_shapes_alt_text:train/samples"):
            assert row[key] == reference[row["step"]][key], (row["step"], key)
    patch_4 = {"model.image.patch_size": 4}
    jax.tree.map(np.testing.assert_array_equal, _final_variables(interrupted, **patch_4),
                 _final_variables(straight, **patch_4))
    assert _saved_json(interrupted, 10) == _saved_json(straight, 10)
    # train/seconds goes on from the resumed save's value rather than from 0.
    launches = _launches(rows)
    assert [launch[0]["step"] for launch in launches] == [1, 3, 9]
    seconds = [[row["train/seconds"] for row in launch if "train/seconds" in row
                and row["step"] <= saved] for launch, saved in zip(launches, (2, 8, 10))]
    saved_at_8 = _saved_json(interrupted, 8, "progress")["train_seconds"]
    assert seconds[0][-1] < min(seconds[1]) and max(seconds[1]) <= saved_at_8
    assert seconds[2] and min(seconds[2]) > saved_at_8


def _children(pid):
    """Pids of the live processes whose parent is `pid` (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _stat(entry) and int(_stat(entry)[1]) == pid:
            children.append(int(entry))
    return children


def _stat(pid):
    """(state, parent pid) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], fields[1]


def _exited(pid):
    stat = _stat(pid)
    return stat is None or stat[0] in ("Z", "X")  # an unreaped orphan has exited too


SIGTERM_RUN = {"total_steps": 100_000}  # runs until a signal ends it


def test_input_workers_exit_when_the_trainer_is_killed(data_dir, tmp_path):
    # SIGTERM_RUN's train step (its total_steps set the schedule), which the
    # session's compilation cache then holds for the SIGTERM test, or this one.
    process = launch_trainer(tmp_path / "run", data_dir,
                             config={**SIGTERM_RUN, "data.workers": 2})
    _wait_for_step(process, tmp_path / "run", 2)
    workers = _children(process.pid)
    assert len(workers) >= 2, workers  # the two input workers (and multiprocessing's tracker)
    for pid in workers:  # spawned from a bare interpreter, not a copy of the trainer
        with open(f"/proc/{pid}/maps") as f:
            assert "tensorflow" not in f.read(), pid
    process.send_signal(signal.SIGKILL)
    process.wait()  # not communicate(): orphaned workers would hold the output pipe open
    deadline = time.time() + 120  # a liveness bound, not a speed figure
    while not all(_exited(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert [pid for pid in workers if not _exited(pid)] == []


def test_sigterm_saves_the_current_step_and_exits_cleanly(data_dir, tmp_path):
    workdir = tmp_path / "run"
    process = launch_trainer(workdir, data_dir, config=SIGTERM_RUN)
    _wait_for_step(process, workdir, 3)
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=120)[0]
    assert process.returncode == 0, log[-3000:]
    last = max(_logged_steps(workdir))
    assert _saved_steps(workdir) == [last]  # checkpoint_every=0: only the preemption save
    assert f"preempted: saved step {last}" in log
    assert _saved_json(workdir, last)["cursors"] == [last * 16]


def test_sigterm_on_one_of_two_processes_saves_the_same_step_on_both(data_dir, tmp_path):
    """A preemption notice reaches one host; JAX's preemption sync manager makes
    both hosts save the same step (2 processes x 1 CPU device, gloo: the sync is
    between hosts, and one device each keeps the steps short on 2 cores)."""
    workdir, port = tmp_path / "run", free_port()
    processes = [launch_trainer(workdir, data_dir, 1, distributed_flags(port, i),
                                config=SIGTERM_RUN) for i in range(2)]
    _wait_for_step(processes[0], workdir, 3)
    processes[1].send_signal(signal.SIGTERM)
    logs = [process.communicate(timeout=180)[0] for process in processes]
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    saved = _saved_steps(workdir)
    assert len(saved) == 1 and saved[0] >= 3
    assert f"preempted: saved step {saved[0]}" in logs[0]
    assert _saved_json(workdir, saved[0])["cursors"] == [saved[0] * 8] * 2


def _one_step_state(config, devices=None):
    training = setup_training(config, devices)
    state = training.init_state(jax.random.key(0))
    state, _ = training.step(state, random_batch(config))
    return training, jax.block_until_ready(state)


def _abstract(training):
    return variables_lib.with_shardings(training.abstract_state, training.shardings)


@pytest.fixture(scope="module")
def saved_on_8_devices(tmp_path_factory):
    """(checkpoint dir, the saved state on the host) of one step on data=8."""
    directory = str(tmp_path_factory.mktemp("saved"))
    config = small_config()
    _, state = _one_step_state(config)
    manager = checkpoint.make_manager(directory, config)
    checkpoint.save(manager, state)
    manager.wait_until_finished()
    return directory, jax.device_get(state)


@pytest.mark.parametrize("mesh, devices", [({"data": 1, "fsdp": 4, "tensor": 1}, 4),
                                           ({"data": 1, "fsdp": 2, "tensor": 2}, 4),
                                           ({"data": 1, "fsdp": 1, "tensor": 1}, 1)])
def test_a_checkpoint_from_8_devices_restores_onto_other_meshes(saved_on_8_devices, mesh,
                                                                devices):
    directory, saved = saved_on_8_devices
    other = small_config(**{f"mesh.{axis}": size for axis, size in mesh.items()})
    training = setup_training(other, jax.devices()[:devices])
    restored, _ = checkpoint.restore_latest(checkpoint.make_manager(directory, other),
                                            _abstract(training))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    placed = jax.tree.leaves(jax.tree.map(lambda leaf: leaf.sharding, restored.params))
    assert all(len(s.device_set) == devices for s in placed)
    assert jax.tree.map(lambda leaf: leaf.sharding, restored) == training.shardings


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    config = small_config()
    training, state = _one_step_state(config)
    manager = checkpoint.make_manager(str(tmp_path), config)
    checkpoint.save(manager, state)  # step 1
    manager.wait_until_finished()
    saved = jax.device_get(state)  # the step below donates `state`
    later, _ = training.step(state, random_batch(config, seed=1))
    checkpoint.save(manager, later)  # step 2
    manager.wait_until_finished()
    # A half-written data file, as a disk filling up or a bad copy leaves it.
    files = [os.path.join(root, name) for root, _, names in
             os.walk(tmp_path / "checkpoints" / "2" / "state") for name in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)

    warnings = []
    restored, saved_items = checkpoint.restore_latest(
        checkpoint.make_manager(str(tmp_path), config), _abstract(training),
        warn=warnings.append)
    assert int(restored.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    assert len(warnings) == 1 and "checkpoint at step 2" in warnings[0]
    assert saved_items == {}  # saved without input position or clock
    assert "\n" not in warnings[0]


@pytest.mark.parametrize("make_config", [small_config, small_coca_config, resnet_config],
                         ids=["vit", "coca", "resnet"])
def test_the_train_state_holds_no_typed_prng_keys(make_config):
    """checkpoint._state_handler leaves out orbax's array-metadata store, which only
    typed PRNG keys need: a key in the state would need it back."""
    abstract = setup_training(make_config(), jax.devices()[:8]).abstract_state
    keys = [jax.tree_util.keystr(path) for path, leaf in
            jax.tree_util.tree_flatten_with_path(abstract)[0]
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)]
    assert keys == []


def _poisoned(batch):
    """NaN pixels (float images go through the same normalisation as uint8), so
    the loss and every gradient are NaN, as an overflow would make them."""
    return dict(batch, images=np.full(batch["images"].shape, np.nan, np.float32))


def test_a_non_finite_step_is_skipped_and_counted():
    config = small_config()
    training, state = _one_step_state(config)
    before = jax.device_get(state)
    state, metrics = training.step(state, _poisoned(random_batch(config, seed=1)))
    metrics = jax.device_get(metrics)
    assert not np.isfinite(metrics["loss"])
    assert (metrics["skipped_steps"], metrics["bad_steps_in_a_row"]) == (1, 1)
    after = jax.device_get(state)
    assert int(after.step) == 2  # the step is taken, its update dropped
    jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
    jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
    state, metrics = training.step(state, random_batch(config, seed=2))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"])
    assert (metrics["skipped_steps"], metrics["bad_steps_in_a_row"]) == (1, 0)


@pytest.mark.parametrize("finite", [True, False])
def test_the_accelerators_selected_update_equals_the_cpus_cond(finite):
    """GPUs and TPUs guard the update with a select (train_step._update_selected),
    which this CPU never lowers in a train step: it must keep or update exactly as
    the cond does."""
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda leaf: jnp.sin(leaf) + 0.5, params)

    def apply_update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    args = (apply_update, grads, opt_state, params, jnp.asarray(finite))
    selected = jax.jit(train_step._update_selected, static_argnums=0)(*args)
    under_cond = jax.jit(train_step._update_under_cond, static_argnums=0)(*args)
    jax.tree.map(np.testing.assert_array_equal, selected, under_cond)
    changed = not np.array_equal(selected[0]["w"], params["w"])
    assert changed == finite


def test_too_many_bad_steps_in_a_row_stop_with_a_diagnostic_and_a_checkpoint(
        data_dir, tmp_path, monkeypatch):
    config = small_config(**{"data.data_dir": data_dir, "total_steps": 12, "log_every": 1,
                             "eval_every": 0, "checkpoint_every": 1, "keep_checkpoints": 10,
                             "max_bad_steps": 2})
    fetch = train_lib._next_device_batch
    fetched = []

    def poison_from_step_3(batches, batch_sharding):
        fetched.append(1)
        batch, input_state = fetch(batches, batch_sharding)
        if len(fetched) >= 3:
            batch = dict(batch, images=jax.device_put(_poisoned(jax.device_get(batch))["images"],
                                                      batch["images"].sharding))
        return batch, input_state

    monkeypatch.setattr(train_lib, "_next_device_batch", poison_from_step_3)
    workdir = tmp_path / "diverging"
    with pytest.raises(train_lib.TrainingStopped, match="2 steps in a row") as stopped:
        train_lib.train(config, str(workdir))
    assert "non-finite: loss" in str(stopped.value) and "\n" not in str(stopped.value)
    rows = [row for row in read_metrics(workdir) if "train/loss" in row]
    assert [row["train/skipped_steps"] for row in rows][:4] == [0, 0, 1, 2]
    # The stop's checkpoint (the newest) holds the parameters of the last good step, 2.
    last = _saved_steps(workdir)[-1]
    assert last > 4
    abstract = convert.abstract_variables(small_config().model)
    step_2 = checkpoint.load_variables(str(workdir / "checkpoints" / "2" / "state"), abstract)
    jax.tree.map(np.testing.assert_array_equal, _final_variables(workdir), step_2)


def test_keep_best_holds_the_save_with_the_best_eval_metric(data_dir, tmp_path):
    metric = "zeroshot/synthetic_shapes/top1"
    config = small_config(**{"data.data_dir": data_dir, "total_steps": 3, "log_every": 1,
                             "eval_every": 1, "checkpoint_every": 0, "keep_best": metric,
                             "optimizer.lr": 1e-2})
    workdir = tmp_path / "run"
    train_lib.train(config, str(workdir))
    scores = {row["step"]: row[metric] for row in read_metrics(workdir) if metric in row}
    kept = _saved_steps(workdir / "best")
    assert len(kept) == 1 and scores[kept[0]] == max(scores.values())
    assert _saved_steps(workdir) == [3]  # the regular saves are unaffected
    best = _final_variables(workdir / "best")  # a best save reads like a workdir
    assert jax.tree.leaves(best)

    with pytest.raises(train_lib.ConfigError, match="not an eval metric"):
        train_lib.train(small_config(**{"data.data_dir": data_dir, "total_steps": 1,
                                        "keep_best": "zeroshot/nope"}), str(tmp_path / "bad"))
