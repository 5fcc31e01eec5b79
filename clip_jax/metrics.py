"""Metric sinks: WORKDIR/metrics.jsonl (one JSON object per row) and TensorBoard."""

import json
import os

import tensorflow as tf


class MetricWriter:
    """Writes scalar rows from process 0; other processes' writes are no-ops."""

    def __init__(self, workdir, enabled=True):
        self.enabled = enabled
        if enabled:
            tf.io.gfile.makedirs(workdir)
            self._jsonl = tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl"), "a")
            self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step, scalars):
        """Appends {"step": step, **scalars} and logs each scalar to TensorBoard."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        with self._summary.as_default(step=int(step)):
            for name, value in scalars.items():
                tf.summary.scalar(name, float(value))
        self._summary.flush()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._summary.close()
