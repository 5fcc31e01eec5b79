"""Checkpoints of the train state with orbax-checkpoint's CheckpointManager.

Saves are asynchronous and written collectively by all processes; restoring
into `abstract_state` (which carries shardings) places every array directly
on its devices, on whatever mesh the restoring run uses.
"""

import json
import os

import orbax.checkpoint as ocp


def make_manager(workdir, config):
    """A CheckpointManager under WORKDIR/checkpoints keeping the last 3 saves."""
    options = ocp.CheckpointManagerOptions(max_to_keep=3, create=True,
                                           save_interval_steps=1)
    # Local paths must be absolute for orbax; gs:// and other URLs pass through.
    root = workdir if "://" in workdir else os.path.abspath(workdir)
    return ocp.CheckpointManager(os.path.join(root, "checkpoints"),
                                 options=options, metadata={"config": json.loads(config.to_json())})


def save(manager, state):
    """Starts an asynchronous save of `state` at its step."""
    manager.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)))


def restore_latest(manager, abstract_state):
    """The latest saved state, placed per `abstract_state`'s shardings, or None."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored.state
