"""The built-in synthetic_shapes dataset: TFDS preparation, determinism, and
that images and captions agree."""

import collections
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from clip_jax.data import builtin_datasets, pipeline
from clip_jax.data import synthetic_shapes as ss

TRAIN, TEST = 64, 32
PALETTE = np.array(list(ss.COLOURS.values()), np.float32)


def _prepare(data_dir):
    """Prepares a shrunk synthetic_shapes into data_dir; {split: list of examples}."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtin_datasets.SyntheticShapes, "train_examples", TRAIN)
        patch.setattr(builtin_datasets.SyntheticShapes, "test_examples", TEST)
        builder = tfds.builder("synthetic_shapes", data_dir=data_dir)
        builder.download_and_prepare()
    return builder, {
        split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        for split in ("train", "test")}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("tfds"))


def _object_pixels(image):
    """Bright pixels [N, 3]: the background is dark (every channel < ~85) and every
    object colour has a channel above 200."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    return pixels[pixels.max(axis=1) > 120]


def _nearest_colour(pixels):
    """Index into COLOURS of each pixel's nearest palette colour."""
    return np.argmin(((pixels[:, None] - PALETTE[None]) ** 2).sum(-1), axis=1)


def _shape_words(caption):
    return [word.strip(".") for word in caption.split() if word.strip(".") in ss.SHAPES]


def test_class_names():
    assert len(ss.CLASS_NAMES) == len(set(ss.CLASS_NAMES)) == 48
    assert ss.class_name(0) == "red circle" and ss.class_name(47) == "white diamond"
    assert ss.class_name(8) == "orange triangle"  # colour-major


def test_prepare_splits_and_features(prepared):
    builder, splits = prepared
    assert builder.info.name == "synthetic_shapes"
    assert builder.info.splits["train"].num_examples == TRAIN
    assert builder.info.splits["test"].num_examples == TEST
    assert builder.info.features["label"].names == ss.CLASS_NAMES
    for split in ("train", "test"):
        assert len(splits[split]) == builder.info.splits[split].num_examples
        for example in splits[split]:
            assert example["image"].shape == (ss.IMAGE_SIZE, ss.IMAGE_SIZE, 3)
            assert example["image"].dtype == np.uint8
            assert isinstance(example["caption"], bytes) and example["caption"]
            assert 0 <= example["label"] < 48


def test_prepared_examples_are_draw_example_by_index(prepared):
    """Stored example i is exactly draw_example(rng [SEED, split_id, i]) (PNG is lossless)."""
    _, splits = prepared
    for split_id, (split, count, prob) in enumerate((("train", TRAIN, 0.3), ("test", TEST, 0.0))):
        expected = {}
        for index in range(count):
            example = ss.draw_example(np.random.default_rng([ss.SEED, split_id, index]),
                                      ss.IMAGE_SIZE, prob)
            expected[example["image"].tobytes()] = example
        assert len(expected) == count
        for stored in splits[split]:
            drawn = expected.pop(stored["image"].tobytes())
            assert stored["caption"].decode() == drawn["caption"]
            assert stored["label"] == drawn["label"]
        assert not expected


def test_deterministic_across_data_dirs(prepared, tmp_path):
    _, first = prepared
    _, second = _prepare(tmp_path)
    for split in ("train", "test"):
        assert len(first[split]) == len(second[split])
        for a, b in zip(first[split], second[split]):
            np.testing.assert_array_equal(a["image"], b["image"])
            assert a["caption"] == b["caption"] and a["label"] == b["label"]


def test_test_split_has_single_objects(prepared):
    _, splits = prepared
    assert all(len(_shape_words(e["caption"].decode())) == 1 for e in splits["test"])
    # ... while train mixes in second objects (30%).
    assert any(len(_shape_words(e["caption"].decode())) == 2 for e in splits["train"])


@pytest.mark.parametrize("second_object_prob", [0.0, 1.0])
def test_caption_and_pixels_match_label(second_object_prob):
    for index in range(150):
        example = ss.draw_example(np.random.default_rng([7, index]), 64, second_object_prob)
        image, caption, label = example["image"], example["caption"], example["label"]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        colour, shape = ss.class_name(label).split()
        words = caption.rstrip(".").split()
        # The primary object is named first.
        assert words.index(colour) < words.index(shape)
        assert _shape_words(caption)[0] == shape
        assert len(_shape_words(caption)) == (2 if second_object_prob else 1)
        # The most common object colour is the label's (the second object is far smaller).
        pixels = _object_pixels(image)
        nearest = _nearest_colour(pixels)
        counts = np.bincount(nearest, minlength=len(ss.COLOURS))
        assert list(ss.COLOURS)[counts.argmax()] == colour, caption
        mean = pixels[nearest == counts.argmax()].mean(axis=0)
        assert np.abs(mean - ss.COLOURS[colour]).max() < 35, (caption, mean)


def test_position_and_size_words_are_true():
    extents = collections.defaultdict(list)  # (shape, size word) -> object extents
    for index in range(400):
        example = ss.draw_example(np.random.default_rng([11, index]), 64, 0.0)
        caption = example["caption"].rstrip(".")
        image = example["image"]
        ys, xs = np.nonzero(image.max(axis=2) > 120)
        centre_y, centre_x = (ys.min() + ys.max() + 1) / 128, (xs.min() + xs.max() + 1) / 128
        if "top" in caption:
            assert centre_y < 0.38, caption
        if "bottom" in caption:
            assert centre_y > 0.62, caption
        if "left" in caption:
            assert centre_x < 0.38, caption
        if "right" in caption:
            assert centre_x > 0.62, caption
        if "in the centre" in caption:
            assert 0.28 < centre_y < 0.72 and 0.28 < centre_x < 0.72, caption
        shape = ss.class_name(example["label"]).split()[1]
        for size in ("small", "medium", "large"):
            if f"{size} " in caption:
                extents[shape, size].append(max(np.ptp(ys), np.ptp(xs)) + 1)
    for shape in ss.SHAPES:
        assert max(extents[shape, "small"]) <= min(extents[shape, "medium"]), shape
        assert max(extents[shape, "medium"]) <= min(extents[shape, "large"]), shape


def test_first_use_says_what_it_prepares_without_tfds_download_wording(tmp_path, capfd):
    scratch = tmp_path / "tempdir"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtin_datasets.SyntheticShapes, "train_examples", TRAIN)
        patch.setattr(builtin_datasets.SyntheticShapes, "test_examples", TEST)
        patch.setattr(tempfile, "tempdir", str(scratch))
        builder = pipeline.prepared_builder("synthetic_shapes", str(tmp_path / "data"))
    out, err = capfd.readouterr()
    assert builder.is_prepared()
    assert list(scratch.iterdir()) == []  # no temporary directory left behind
    assert f"preparing the built-in dataset synthetic_shapes ({TRAIN} + {TEST} images" in out
    assert "ownload" not in out + err and "Variant folder" not in out + err
