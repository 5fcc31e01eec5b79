"""Training from real-looking web data: shards and a CSV with every kind of bad
input, prepared with the CLI's API, then read for an epoch and trained on."""

import json
import os

import numpy as np
import pytest
from tensorflow.core.example import example_pb2

from clip_jax import train as train_lib
from clip_jax.data import builtin_datasets, pipeline, prepare
from tests import web_data
from tests.conftest import small_config


@pytest.fixture(scope="module")
def prepared_web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    sources = web_data.write_web_dataset(str(root / "raw"))
    data_dir = str(root / "tfds")
    report = prepare.prepare({"train": [sources["shards"].path, sources["csv"].path]},
                             "web_test", data_dir, max_side=web_data.MAX_SIDE, workers=2)
    good = {**sources["shards"].good, **sources["csv"].good}
    return data_dir, report, good, sources


def _web_config(data_dir, **overrides):
    return small_config(**{"data.train": "web_test:train", "data.data_dir": data_dir,
                           "data.in_process": False,
                           "batch_size": 8, "data.workers": 2, **overrides})


def test_preparation_counts_every_skip_and_keeps_every_good_sample(prepared_web):
    _, report, good, sources = prepared_web
    split = report["splits"]["train"]
    expected_skips = {}
    for source in (sources["shards"], sources["csv"]):
        for reason, count in source.skipped.items():
            expected_skips[reason] = expected_skips.get(reason, 0) + count
    assert split["written"] == len(good)
    assert {r: c for r, c in split["skipped"].items() if c} == {
        r: c for r, c in expected_skips.items() if c}
    assert split["seen"] == len(good) + sum(expected_skips.values())


def test_one_epoch_of_training_input_reads_each_good_sample_once(prepared_web):
    data_dir, _, good, _ = prepared_web
    config = _web_config(data_dir, **{"model.image.image_size": 32})
    records = pipeline.open_split("web_test", "train", data_dir)
    steps = -(-len(good) // config.batch_size)  # covers the first epoch
    with pipeline.TrainInput(config) as batches:
        taken = [next(batches) for _ in range(steps)]
    indices = np.concatenate([batch["indices"] for batch, _ in taken])[:len(good)]
    keys = [example_pb2.Example.FromString(records[int(i)]).features.feature["key"]
            .bytes_list.value[0].decode() for i in indices]
    assert sorted(keys) == sorted(good)  # none lost, none repeated
    assert taken[-1][1].skipped == {}  # preparation already removed the bad ones
    # Every row shows its own sample: solid colours survive crop and resize.
    rows = [(batch["images"][row], key) for (batch, _), start in
            zip(taken, range(0, len(indices), config.batch_size))
            for row, key in zip(range(config.batch_size), keys[start:start + config.batch_size])]
    for pixels, key in rows:
        centre = pixels[12:20, 12:20].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(centre, good[key].colour, atol=12, err_msg=key)


def test_trainer_runs_on_the_prepared_web_dataset(prepared_web, tmp_path, monkeypatch):
    data_dir, _, _, _ = prepared_web
    # The zero-shot evaluation at the end reads a shrunk built-in dataset.
    monkeypatch.setattr(builtin_datasets.SyntheticShapes, "train_examples", 16)
    monkeypatch.setattr(builtin_datasets.SyntheticShapes, "test_examples", 64)
    config = _web_config(data_dir, total_steps=3, log_every=1, eval_every=0,
                         checkpoint_every=0)
    workdir = str(tmp_path / "run")
    final = train_lib.train(config, workdir)
    assert np.isfinite(final["train/loss"]) and final["data/skipped"] == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3]
