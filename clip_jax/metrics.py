"""Metric sinks: WORKDIR/metrics.jsonl (one JSON object per row) and TensorBoard.

TensorBoard events are written with the tensorboard package's record format
(`RecordWriter`) through `etils.epath`, not with `tf.summary` or tensorboard's
`EventFileWriter`, which both load TensorFlow (a 3 s import that accelerator
images often lack). epath reaches gs:// through TensorFlow's gfile only when a
workdir there is used.
"""

import itertools
import json
import os
import socket
import time

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

_writer_ids = itertools.count()  # one events file per writer, also within a second


class MetricWriter:
    """Writes scalar rows from process 0; other processes' writes are no-ops."""

    def __init__(self, workdir, enabled=True):
        self.enabled = enabled
        if enabled:
            workdir = epath.Path(workdir)
            events_dir = workdir / "tensorboard"
            events_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (workdir / "metrics.jsonl").open("a")
            events_name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
                           f".{os.getpid()}.{next(_writer_ids)}")
            self._events = RecordWriter((events_dir / events_name).open("wb"))
            self._write_event(event_pb2.Event(wall_time=time.time(),
                                              file_version="brain.Event:2"))

    def write(self, step, scalars):
        """Appends {"step": step, **scalars} and logs each scalar to TensorBoard."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=name, simple_value=float(value))
            for name, value in scalars.items()])
        self._write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                          summary=summary))

    def _write_event(self, event):
        self._events.write(event.SerializeToString())
        self._events.flush()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._events.close()
