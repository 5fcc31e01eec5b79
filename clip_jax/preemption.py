"""Preemption: a SIGTERM (TPU maintenance or spot preemption, SLURM time limit,
`kill`) asks the run to save at the next step boundary and exit cleanly.

Multi-process runs must all save the same step: JAX's preemption sync manager
(started by jax.distributed.initialize) catches SIGTERM on any host and the
coordination service picks a step every host reaches
(`multihost_utils.reached_preemption_sync_point`). A single process just
catches the signal itself.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """`watcher.reached(step)`: True once, at the step boundary where a
    requested preemption should save and stop. Call it at every step on every
    process; use as a context manager to restore the previous signal handler."""

    def __init__(self):
        self._requested = threading.Event()
        self._previous = None
        self._distributed = jax.process_count() > 1
        if not self._distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        del signum, frame
        self._requested.set()

    def reached(self, step):
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
