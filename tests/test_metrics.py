"""The metric sinks: metrics.jsonl rows and TensorBoard events TensorBoard reads
back, written without TensorFlow on the trainer's import path."""

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator

from clip_jax.metrics import MetricWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensorboard_scalars(directory):
    """{tag: [(step, value)]} as TensorBoard's own reader loads them."""
    accumulator = event_accumulator.EventAccumulator(str(directory))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_rows_go_to_jsonl_and_tensorboard_reads_the_same_scalars(tmp_path):
    writer = MetricWriter(str(tmp_path / "run"))
    writer.write(2, {"train/loss": 3.5, "train/lr": 1e-3})
    writer.write(4, {"train/loss": 2.25, "zeroshot/top1": 0.5})
    writer.close()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows == [{"step": 2, "train/loss": 3.5, "train/lr": 1e-3},
                    {"step": 4, "train/loss": 2.25, "zeroshot/top1": 0.5}]
    scalars = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["train/loss"] == [(2, 3.5), (4, 2.25)]
    assert scalars["train/lr"] == [(2, pytest.approx(1e-3))]
    assert scalars["zeroshot/top1"] == [(4, 0.5)]


def test_a_resumed_run_appends_rows_and_adds_an_events_file(tmp_path):
    for step in (1, 2):
        writer = MetricWriter(str(tmp_path))
        writer.write(step, {"train/loss": float(step)})
        writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert len(os.listdir(tmp_path / "tensorboard")) == 2
    assert _tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 2.0)]


def test_other_processes_write_nothing(tmp_path):
    writer = MetricWriter(str(tmp_path / "run"), enabled=False)
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    assert not os.path.exists(tmp_path / "run")


def test_the_trainer_and_evaluator_import_without_tensorflow():
    # TensorFlow costs ~3 s per launch and is absent from accelerator images.
    probe = ("import sys, clip_jax.train, clip_jax.evaluate; "
             "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]"
