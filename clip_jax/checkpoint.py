"""Checkpoints of the train state with orbax-checkpoint's CheckpointManager.

Saves are asynchronous and written collectively by all processes; restoring
into `abstract_state` (which carries shardings) places every array directly
on its devices, on whatever mesh the restoring run uses.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clip_jax.pytree import get_path, set_path

# Orbax writes a replicated array cooperatively, each replica a slice of it, which
# spreads the device-to-host copies and writes of large arrays over devices and
# hosts. Each slice is cut by an eager op compiled per shape and device, so a
# small array costs far more to cut than to copy whole: saving the tiny test
# model's state (239 arrays, 8 CPU devices) blocked the train loop 3.5 s the
# first time and 0.4 s after, 0.34 s and 0.06 s with no slices under this size
# (such arrays are saved whole by one replica; 2-core VM, orbax 0.12.8).
MIN_REPLICA_SLICE_BYTES = 1 << 20


# JSON items saved beside the state: where the input stands
# (`pipeline.gather_input_states`) and the run's clock ({"train_seconds": ...}).
JSON_ITEMS = ("input", "progress")


def _state_handler():
    """The handler of the train state: orbax's standard one with replica-parallel
    saves limited to slices of at least MIN_REPLICA_SLICE_BYTES. (The state holds
    no typed PRNG keys, so orbax's array-metadata store, which records only
    those, is not needed.)"""
    scalar = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalar), (float, scalar), (np.number, scalar),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def make_manager(workdir, config, *, best_metric=None):
    """A CheckpointManager under WORKDIR/checkpoints keeping the newest
    `config.keep_checkpoints` saves. Saves are asynchronous and atomic: orbax
    writes into a temporary directory and renames it when every host is done,
    so a save cut short (crash, SIGKILL) is never listed as a step.

    best_metric: instead, the one save with the highest value of that metric
    (pass it as `save(..., metrics=...)`); use WORKDIR/best as its workdir.
    """
    if best_metric:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda metrics: metrics[best_metric],
            best_mode="max", keep_checkpoints_without_metrics=False)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                               create=True, save_interval_steps=1)
    # Local paths must be absolute for orbax; gs:// and other URLs pass through.
    root = workdir if "://" in workdir else os.path.abspath(workdir)
    return ocp.CheckpointManager(
        os.path.join(root, "checkpoints"), options=options,
        item_handlers={"state": _state_handler(),
                       **{name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS}},
        metadata={"config": json.loads(config.to_json())})


def save(manager, state, metrics=None, **json_items):
    """Starts an asynchronous save of `state` at its step, with the JSON_ITEMS given
    as keywords (JSON-able dicts); `metrics` rank the saves of a best-checkpoint
    manager."""
    unknown = set(json_items) - set(JSON_ITEMS)
    if unknown:
        raise TypeError(f"unknown checkpoint items {sorted(unknown)}; they are {JSON_ITEMS}")
    items = {"state": ocp.args.PyTreeSave(state)}
    items.update({name: ocp.args.JsonSave(value) for name, value in json_items.items()})
    manager.save(int(state.step), args=ocp.args.Composite(**items), metrics=metrics)


def restore_latest(manager, abstract_state, warn=print):
    """(state, {item: dict}) of the newest readable save: the state placed per
    `abstract_state`'s shardings (any mesh: orbax reshards) and those JSON_ITEMS
    the save holds; (None, {}) without one.

    A save that cannot be read (truncated or corrupted files) is reported through
    `warn` in one line and the next older one is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        items = {"state": ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
        step_dir = epath.Path(manager.directory) / str(step)
        saved_json = [name for name in JSON_ITEMS if (step_dir / name).exists()]
        items.update({name: ocp.args.JsonRestore() for name in saved_json})
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001  (any unreadable save: fall back)
            reason = " ".join(str(error).split())[:300]
            warn(f"checkpoint at step {step} in {manager.directory} is unreadable, trying an "
                 f"older one ({type(error).__name__}: {reason})")
            continue
        return restored.state, {name: restored[name] for name in saved_json}
    return None, {}


def save_variables(path, variables):
    """Writes model variables ({"params": ..., ...}) as one orbax checkpoint at `path`."""
    path = path if "://" in path else os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, variables)
    checkpointer.wait_until_finished()


def latest_step(workdir):
    """The newest complete save's step under WORKDIR/checkpoints; None if there is none."""
    path = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))
    if not (path / "checkpoints").exists():
        return None
    manager = ocp.CheckpointManager(path / "checkpoints")
    step = manager.latest_step()
    manager.close()
    return step


def load_variables(path, abstract_variables):
    """Model variables from `path`: a `save_variables` checkpoint or a training workdir
    (the parameters and running statistics of its latest state), placed per the
    shardings of `abstract_variables` (jax.ShapeDtypeStructs; none: default device).

    Raises ValueError naming the first leaf missing or shaped unlike the model's.
    """
    path = epath.Path(path if "://" in str(path) else os.path.abspath(path))
    if not path.exists():
        raise ValueError(f"{path}: no such checkpoint directory")
    item_dir, stored_path = path, lambda variables_path: variables_path
    if (path / "checkpoints").exists():
        step = latest_step(path)
        if step is None:
            raise ValueError(f"{path}: the workdir holds no complete checkpoint")
        item_dir = path / "checkpoints" / str(step) / "state"
        # Train states keep non-trained collections under model_state.
        stored_path = lambda p: p if p[0] == "params" else ("model_state",) + p  # noqa: E731
    checkpointer = ocp.PyTreeCheckpointer()
    stored = checkpointer.metadata(item_dir).item_metadata.tree
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for key, spec in jax.tree_util.tree_flatten_with_path(abstract_variables)[0]:
        names = tuple(k.key for k in key)
        node = stored
        for name in stored_path(names):
            node = node.get(name) if isinstance(node, dict) else None
        if node is None:
            raise ValueError(f"{path}: missing {'/'.join(names)} (the model expects shape "
                             f"{tuple(spec.shape)}): a different architecture?")
        if tuple(node.shape) != tuple(spec.shape):
            raise ValueError(f"{path}: {'/'.join(names)} has shape {tuple(node.shape)}, "
                             f"the model expects {tuple(spec.shape)}")
        sharding = getattr(spec, "sharding", None) or default
        set_path(target, stored_path(names), jax.ShapeDtypeStruct(spec.shape, spec.dtype,
                                                                     sharding=sharding))
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    return jax.tree_util.tree_map_with_path(
        lambda key, _: get_path(restored, stored_path(tuple(k.key for k in key))),
        abstract_variables)
