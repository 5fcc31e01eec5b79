"""The training input: who reads what (sampling), exact resume from the input
state, independence from thread and process counts, and counted skips."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from array_record.python import array_record_module
from PIL import Image

from clip_jax import tokenizer
from clip_jax.data import augment, blocks, decode, pipeline, sampling, spec
from tests.conftest import small_config


@pytest.mark.parametrize("num_records", [1, 2, 3, 5, 64, 1000, 4097])
def test_each_epoch_is_a_permutation_and_epochs_differ(num_records):
    first = sampling.shuffled_index(np.arange(num_records), num_records, seed=0, epoch=0)
    second = sampling.shuffled_index(np.arange(num_records), num_records, seed=0, epoch=1)
    assert sorted(first.tolist()) == list(range(num_records))
    assert sorted(second.tolist()) == list(range(num_records))
    if num_records >= 64:
        assert (first != second).mean() > 0.9
        other_seed = sampling.shuffled_index(np.arange(num_records), num_records, 1, 0)
        assert (first != other_seed).mean() > 0.9
        # Shuffled, not merely rotated: neighbours land far apart on average.
        assert np.abs(np.diff(first)).mean() > num_records / 5


def test_processes_own_disjoint_blocks_that_tile_the_global_batches():
    global_batch, processes, steps = 12, 3, 5
    local = global_batch // processes
    per_process = [sampling.global_positions(np.arange(steps * local), local, p, processes)
                   for p in range(processes)]
    # Step s of process p is rows p*local..(p+1)*local of global batch s.
    for step in range(steps):
        rows = np.concatenate([positions[step * local:(step + 1) * local]
                               for positions in per_process])
        np.testing.assert_array_equal(rows, np.arange(step * global_batch,
                                                      (step + 1) * global_batch))


def _png(colour, size=24):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def _serialize(record):
    """{"key": bytes} -> a serialized tf.train.Example, as TFDS stores records."""
    features = {key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
                for key, value in record.items()}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _records(num, bad=()):
    """Records whose image colour encodes their index; indices in `bad` are broken
    in rotating ways (truncated image, empty file, blank caption, no caption)."""
    records = []
    for index in range(num):
        record = {"image": _png((index % 256, index // 256, 77)),
                  "caption": f"record number {index}".encode()}
        if index in bad:
            kind = sorted(bad).index(index) % 4
            if kind == 0:
                record["image"] = record["image"][:40]
            elif kind == 1:
                record["image"] = b""
            elif kind == 2:
                record["caption"] = b"  \n "
            else:
                del record["caption"]
        records.append(_serialize(record))
    return records


@pytest.fixture
def fake_source(monkeypatch, tmp_path):
    """Makes the training input read `holder["records"]` (a list of serialized
    records: the one source; or {"name:split": records} per source) from
    ArrayRecord files written here, instead of a prepared TFDS split. Worker
    processes read the files, as they read a prepared split's shards."""
    holder = {}

    def files(source, data_dir, seed, index):
        served = holder["records"]
        served = served[source.label] if isinstance(served, dict) else served
        path = str(tmp_path / f"{source.label.replace(':', '-')}-{len(os.listdir(tmp_path))}")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for record in served:
            writer.write(record)
        writer.close()
        return blocks.SourceFiles.of(source, (path,), len(served), seed, index)

    monkeypatch.setattr(pipeline, "source_files", files)
    return holder


def _config(batch_size=8, workers=2, **overrides):
    return small_config(**{"batch_size": batch_size, "data.workers": workers,
                           "data.in_process": False, "data.prefetch": 2, **overrides})


def _take(config, steps, state=None, **process):
    with pipeline.TrainInput(config, state, **process) as batches:
        return [next(batches) for _ in range(steps)]


def test_resuming_from_a_mid_epoch_state_gives_exactly_the_remaining_batches(fake_source):
    fake_source["records"] = _records(50, bad={3, 7, 8, 20, 33, 41, 42, 43})
    config = _config()
    straight = _take(config, 12)  # 96 good samples: crosses into the second epoch
    for stop in (1, 4, 5):
        _, state = straight[stop - 1]
        resumed = _take(config, 12 - stop, state)
        for (expected, expected_state), (batch, batch_state) in zip(straight[stop:], resumed):
            for key in expected:
                np.testing.assert_array_equal(batch[key], expected[key])
            assert batch_state == expected_state


def test_one_epoch_reads_every_good_record_once_and_counts_every_skip(fake_source):
    bad = {0, 5, 6, 17, 18, 19, 30, 47}
    fake_source["records"] = _records(48, bad=bad)
    batches = _take(_config(), 5)  # 40 good samples = the whole first epoch
    indices = np.concatenate([batch["indices"] for batch, _ in batches])
    assert sorted(indices.tolist()) == sorted(set(range(48)) - bad)
    final = batches[-1][1]
    assert final.cursor == 48
    assert final.skipped == {decode.CORRUPT_IMAGE: 2, decode.EMPTY_IMAGE: 2,
                             decode.EMPTY_CAPTION: 2, decode.MISSING_CAPTION: 2}
    # Each row's pixels and tokens belong to its record.
    for batch, _ in batches:
        for row, index in enumerate(batch["indices"]):
            assert tuple(batch["images"][row, 0, 0]) == (index % 256, index // 256, 77)


def test_batches_do_not_depend_on_the_number_of_worker_processes(fake_source):
    fake_source["records"] = _records(40, bad={2, 9})
    one, four = _take(_config(workers=1), 6), _take(_config(workers=4), 6)
    for (a, _), (b, _) in zip(one, four):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_two_processes_read_disjoint_halves_of_the_same_global_batches(fake_source):
    fake_source["records"] = _records(64)
    config = _config(batch_size=8)
    single = _take(config, 6, process_index=0, process_count=1)
    halves = [_take(config, 6, process_index=p, process_count=2) for p in range(2)]
    for step in range(6):
        for key in ("images", "tokens", "indices"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][0][key], halves[1][step][0][key]]),
                single[step][0][key])
    # With bad samples the processes still never share a record.
    fake_source["records"] = _records(64, bad={1, 2, 40})
    seen = [np.concatenate([b["indices"] for b, _ in _take(config, 7, process_index=p,
                                                             process_count=2)])
            for p in range(2)]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_several_captions_per_image_give_a_seeded_choice_among_them(fake_source):
    """coco_captions-like records: a nested, repeated caption feature."""
    captions = [b"a dog on a beach", b"a brown dog running", b"sand and sea"]
    features = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png((1, 2, 3))])),
                "captions/text": tf.train.Feature(bytes_list=tf.train.BytesList(value=captions))}
    record = tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()
    fake_source["records"] = [record] * 16
    config = _config(**{"data.caption_key": "captions/text"})
    first, again = _take(config, 4), _take(config, 4)
    chosen = np.concatenate([batch["tokens"] for batch, _ in first])
    np.testing.assert_array_equal(chosen, np.concatenate([b["tokens"] for b, _ in again]))
    expected = {tuple(row) for row in tokenizer.tokenize([c.decode() for c in captions],
                                                         config.model.text.context_length)}
    assert {tuple(row) for row in chosen} == expected  # every caption gets drawn


def test_a_dataset_of_only_bad_samples_stops_with_a_clear_error(fake_source):
    fake_source["records"] = _records(20, bad=set(range(20)))
    with pytest.raises(ValueError, match=r"'synthetic_shapes:train': \d+ bad samples while "
                                         "filling one batch of 8"):
        _take(_config(), 1)


def test_input_state_round_trips_and_adapts_to_another_process_count():
    labels = ("a:train", "b:train")
    state = pipeline.InputState(cursor=37, skipped={decode.EMPTY_IMAGE: 3},
                                drawn={"a:train": 20, "b:train": 14})
    saved = pipeline.gather_input_states(state, labels)  # one process here
    assert saved == {"process_count": 1, "cursors": [37],
                     "skipped": [{reason: (3 if reason == decode.EMPTY_IMAGE else 0)
                                  for reason in decode.REASONS}],
                     "drawn": [{"a:train": 20, "b:train": 14}]}
    assert pipeline.input_metrics(saved) == {
        "data/skipped": 3, f"data/skipped/{decode.EMPTY_IMAGE}": 3,
        "data/source/a:train/samples": 20, "data/source/b:train/samples": 14}
    restored, warning = pipeline.local_input_state(saved, step=4, batch_size=8)
    assert restored == pipeline.InputState(37, dict(saved["skipped"][0]), dict(state.drawn))
    assert warning is None
    # Written by 2 processes with nothing skipped: exact at step x local batch.
    clean = {"process_count": 2, "cursors": [16, 16], "skipped": [{}, {}]}
    restored, warning = pipeline.local_input_state(clean, step=4, batch_size=8)
    assert (restored.cursor, warning) == (32, None)
    # With skips, the totals survive and the approximation is announced.
    dirty = {"process_count": 2, "cursors": [17, 18],
             "skipped": [{decode.EMPTY_IMAGE: 1}, {decode.CORRUPT_IMAGE: 2}],
             "drawn": [{"a:train": 16}, {"a:train": 10, "b:train": 6}]}
    restored, warning = pipeline.local_input_state(dirty, step=4, batch_size=8)
    assert restored.cursor == 32 and "3 bad samples" in warning
    metrics = pipeline.input_metrics(pipeline.gather_input_states(restored, labels))
    assert metrics["data/skipped"] == 3 and metrics["data/source/a:train/samples"] == 26
    _, warning = pipeline.local_input_state(None, step=4, batch_size=8)
    assert "no input position" in warning


def test_per_sample_draws_are_uniform_and_depend_only_on_seed_and_position():
    draws = sampling.uniforms(0, np.arange(20_000), 3)
    assert draws.shape == (20_000, 3) and 0 <= draws.min() and draws.max() < 1
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 1 / 12) < 0.005
    np.testing.assert_array_equal(sampling.uniforms(0, [7, 19_999], 3), draws[[7, 19_999]])
    assert not np.array_equal(sampling.uniforms(1, [7], 3), draws[[7]])


def test_random_resized_crop_stays_inside_the_image_and_in_the_scale_range():
    draws = sampling.uniforms(0, np.arange(1000), augment.CROP_DRAWS)
    for width, height in [(100, 100), (300, 120), (50, 400)]:
        for sample in draws[:200]:
            left, top, right, bottom = augment.crop_box(width, height, sample, (0.9, 1.0))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            ratio = (right - left) / (bottom - top)
            assert 3 / 4 - 0.05 <= ratio <= 4 / 3 + 0.05
    # Square images usually get a crop within the area range.
    areas = [(r - left) * (b - t) / 1e4 for left, t, r, b in
             (augment.crop_box(100, 100, sample, (0.9, 1.0)) for sample in draws[200:400])]
    assert 0.88 <= min(areas) and max(areas) <= 1.0


def test_eval_transform_centres_the_shorter_side():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # the centre square is white, the sides black
    out = augment.resize_centre_crop(Image.fromarray(image), 16)
    # The filter reaches half a source pixel past the box: only edge columns blend.
    assert out.shape == (16, 16, 3) and out[:, 1:-1].min() == 255 and out.min() > 200


def test_bad_data_config_is_one_line():
    with pytest.raises(ValueError, match="name\\[:version\\]:split"):
        spec.parse_split("synthetic_shapes")
    config = _config(**{"data.train": "no_such_dataset_xyz:train"})
    with pytest.raises(ValueError, match="no such TFDS dataset"):
        pipeline.TrainInput(config)


def _nested_caption_records(num):
    """coco_captions-like records (captions under 'captions/text'), colour-coded
    like _records but in the blue channel."""
    records = []
    for index in range(num):
        features = {
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[_png((index % 256, index // 256, 200))])),
            "captions/text": tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[f"nested caption {index}".encode()]))}
        records.append(tf.train.Example(features=tf.train.Features(feature=features))
                       .SerializeToString())
    return records


def test_a_weighted_mixture_draws_each_source_at_its_weight_and_resumes_exactly(fake_source):
    fake_source["records"] = {"web:train": _records(300, bad={5, 77}),
                              "coco:train": _nested_caption_records(40)}
    config = _config(batch_size=64, **{
        "data.train": "web:train@0.8 + coco:train@0.2(caption_key=captions/text)"})
    straight = _take(config, 100)  # 6,400 samples
    drawn = straight[-1][1].drawn
    assert sum(drawn.values()) == 6400
    assert abs(drawn["coco:train"] / 6400 - 0.2) <= 0.02
    rows = {name: np.concatenate([batch["indices"][batch["sources"] == source]
                                  for batch, _ in straight])
            for source, name in enumerate(("web:train", "coco:train"))}
    # Each source walks its own epochs: the small one has gone round 32 times.
    assert len(rows["coco:train"]) == drawn["coco:train"]
    np.testing.assert_array_equal(np.bincount(rows["coco:train"][:1280], minlength=40),
                                  np.full(40, 32))
    # Rows carry their own source's pixels and captions (its own caption key).
    batch, _ = straight[0]
    for row, (source, index) in enumerate(zip(batch["sources"], batch["indices"])):
        blue = 200 if source == 1 else 77
        assert tuple(batch["images"][row, 0, 0]) == (index % 256, index // 256, blue)
    for stop in (1, 37):
        resumed = _take(config, 10, straight[stop - 1][1])
        for (expected, expected_state), (got, got_state) in zip(straight[stop:], resumed):
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
            assert got_state == expected_state


def test_mixture_sources_are_exact_shares_at_any_position():
    positions = np.arange(50_000)
    sources, source_positions = sampling.mixture_sources(positions, [1, 2, 7], seed=3)
    for source, weight in enumerate((0.1, 0.2, 0.7)):
        mine = source_positions[sources == source]
        np.testing.assert_array_equal(mine, np.arange(len(mine)))  # consecutive, none shared
        for prefix in (10, 999, 50_000):
            assert abs((sources[:prefix] == source).sum() - weight * prefix) <= 1
    far = np.arange(10**12, 10**12 + 1000)
    far_sources, far_positions = sampling.mixture_sources(far, [1, 2, 7], seed=3)
    assert np.bincount(far_sources).tolist() == [100, 200, 700]
    again = sampling.mixture_sources(far[500:], [1, 2, 7], seed=3)
    np.testing.assert_array_equal(again[1], far_positions[500:])
