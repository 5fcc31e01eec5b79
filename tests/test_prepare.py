"""Dataset preparation: web tars and CSV/TSV files in, a TFDS dataset out, with
nothing good lost or duplicated and every skipped sample counted by reason."""

import collections
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import shuffle as tfds_shuffle

from clip_jax.data import prepare
from clip_jax.data.sources import SourceError
from tests.web_data import MAX_SIDE, write_web_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "web_test"
# Solid colours survive JPEG (and lossy WebP) re-encoding within a few levels.
COLOUR_TOLERANCE = 12


def read_split(data_dir, split, name=NAME):
    """The stored examples of a split, in order: dicts of bytes."""
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              decoders={"image": tfds.decode.SkipDecoding()})
    return [source[index] for index in range(len(source))]


def merged(*sources):
    """The good samples and skip counts expected from preparing `sources` together."""
    good, skipped = {}, collections.Counter()
    for source in sources:
        good.update(source.good)
        skipped.update(source.skipped)
    return good, dict(skipped)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The web dataset prepared once: train = tar shards + CSV, validation = TSV."""
    root = tmp_path_factory.mktemp("web")
    sources = write_web_dataset(str(root))
    data_dir = str(root / "tfds")
    report = prepare.prepare(
        {"train": [sources["shards"].path, sources["csv"].path],
         "validation": [sources["tsv"].path]},
        NAME, data_dir, max_side=MAX_SIDE, workers=2)
    good, skipped = merged(sources["shards"], sources["csv"])
    expected = {"train": (good, skipped), "validation": merged(sources["tsv"])}
    examples = {split: read_split(data_dir, split) for split in expected}
    return dict(sources=sources, data_dir=data_dir, report=report, expected=expected,
                examples=examples)


def stored_by_key(prepared):
    return {example["key"].decode(): example
            for examples in prepared["examples"].values() for example in examples}


def good_by_key(prepared):
    return {key: sample for good, _ in prepared["expected"].values()
            for key, sample in good.items()}


def test_report_counts_every_sample_as_written_or_skipped_by_reason(prepared):
    sources = prepared["sources"]
    for split, (good, skipped) in prepared["expected"].items():
        counts = prepared["report"]["splits"][split]
        assert counts["written"] == len(good)
        assert counts["skipped"] == skipped
        assert counts["seen"] == len(good) + sum(skipped.values())
        assert counts["all_accounted_for"]
    assert prepared["report"]["splits"]["train"][prepare.NOT_UTF8_RECODED] == (
        sources["shards"].not_utf8_captions + sources["csv"].not_utf8_captions)


def test_report_is_saved_next_to_the_dataset(prepared):
    path = os.path.join(prepared["data_dir"], NAME, "1.0.0", prepare.REPORT_FILE)
    with open(path) as file:
        assert json.load(file) == prepared["report"]


def test_kept_keys_are_exactly_the_good_ones_in_input_order(prepared):
    for split, (good, _) in prepared["expected"].items():
        keys = [example["key"].decode() for example in prepared["examples"][split]]
        assert keys == list(good)


def test_captions_are_decoded_including_cp1252(prepared):
    stored = stored_by_key(prepared)
    for key, sample in good_by_key(prepared).items():
        assert stored[key]["caption"].decode("utf-8") == sample.caption, key
    assert any("caf\u00e9 \u2013" in sample.caption for sample in good_by_key(prepared).values())


def test_pixels_and_sizes_match_each_samples_image(prepared):
    stored = stored_by_key(prepared)
    for key, sample in good_by_key(prepared).items():
        image = Image.open(io.BytesIO(stored[key]["image"]))
        assert image.format == "JPEG" and image.mode == "RGB", key
        assert image.size == sample.size, (key, sample.kind)
        difference = np.abs(np.asarray(image, np.int16) - np.array(sample.colour, np.int16))
        assert difference.max() <= COLOUR_TOLERANCE, (key, sample.kind, difference.max())


def samples_of_kind(prepared, kind):
    stored = stored_by_key(prepared)
    found = [(sample, stored[key]["image"]) for key, sample in good_by_key(prepared).items()
             if sample.kind == kind]
    assert found, kind
    return found


def test_oversize_image_is_resized_to_max_side(prepared):
    for sample, stored in samples_of_kind(prepared, "oversize_jpeg"):
        assert max(Image.open(io.BytesIO(sample.original)).size) > MAX_SIDE
        assert max(Image.open(io.BytesIO(stored)).size) == MAX_SIDE


def test_exif_orientation_is_applied(prepared):
    for sample, stored in samples_of_kind(prepared, "exif_rotated"):
        width, height = Image.open(io.BytesIO(sample.original)).size
        assert Image.open(io.BytesIO(stored)).size == (height, width)


def test_jpegs_needing_no_change_are_stored_byte_identical(prepared):
    stored = stored_by_key(prepared)
    verbatim = [key for key, sample in good_by_key(prepared).items() if sample.verbatim]
    assert len(verbatim) >= 10
    for key in verbatim:
        assert stored[key]["image"] == good_by_key(prepared)[key].original, key
    for key, sample in good_by_key(prepared).items():
        if not sample.verbatim:
            assert stored[key]["image"] != sample.original, (key, sample.kind)


def test_beam_direct_runner_with_two_workers_keeps_and_counts_the_same_samples(prepared,
                                                                              tmp_path):
    """The same rules as a Beam pipeline (2 worker processes): the same examples
    in the same order, the same report, counted by Beam counters."""
    pytest.importorskip("apache_beam", reason="the beam extra (installed by .ci/run)")
    sources = prepared["sources"]
    data_dir = str(tmp_path / "tfds")
    report = prepare.prepare(
        {"train": [sources["shards"].path, sources["csv"].path],
         "validation": [sources["tsv"].path]}, NAME, data_dir, max_side=MAX_SIDE,
        beam_options="runner=DirectRunner,direct_num_workers=2,"
                     "direct_running_mode=multi_processing")
    assert report["splits"] == prepared["report"]["splits"]
    for split, expected in prepared["examples"].items():
        stored = read_split(data_dir, split)
        assert [example["key"] for example in stored] == [example["key"] for example in expected]
        for got, want in zip(stored, expected):
            assert got["image"] == want["image"] and got["caption"] == want["caption"]
    with open(os.path.join(data_dir, NAME, "1.0.0", prepare.REPORT_FILE)) as f:
        assert json.load(f)["splits"] == report["splits"]


def test_builder_reads_the_unregistered_name_from_files(prepared):
    builder = tfds.builder(NAME, data_dir=prepared["data_dir"])
    for split, (good, _) in prepared["expected"].items():
        assert builder.info.splits[split].num_examples == len(good)
    assert set(builder.info.features) == {"image", "caption", "key"}


def test_input_order_survives_spilling_to_several_disk_buckets(tmp_path, monkeypatch):
    """Past TFDS's in-memory limit examples go to on-disk buckets; they must come
    back in input order, and spread over buckets rather than all in one."""
    sources = write_web_dataset(str(tmp_path))
    buckets_used = set()
    bucket_number = tfds_shuffle.get_bucket_number

    def recording_bucket_number(*args, **kwargs):
        number = bucket_number(*args, **kwargs)
        buckets_used.add(number)
        return number

    monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 0)
    monkeypatch.setattr(tfds_shuffle, "get_bucket_number", recording_bucket_number)
    monkeypatch.setattr(prepare, "_BUCKET_BYTES", 2000)
    prepare.prepare({"train": [sources["shards"].path]}, NAME, str(tmp_path / "tfds"),
                    max_side=MAX_SIDE, workers=2)
    keys = [example["key"].decode() for example in read_split(str(tmp_path / "tfds"), "train")]
    assert keys == list(sources["shards"].good)
    assert len(buckets_used) > 3


def test_fit_within_never_upscales():
    assert prepare.fit_within((100, 50), 512) == (100, 50)
    assert prepare.fit_within((1024, 512), 512) == (512, 256)
    assert prepare.fit_within((300, 1200), 512) == (128, 512)


def test_parse_sources_defaults_to_train_and_keeps_order():
    assert prepare.parse_sources(["a/*.tar", "validation=v.csv", "train=gs://b/x=1/*.tar",
                                  "gs://b/x=1/*.tar"]) == {
        "train": ["a/*.tar", "gs://b/x=1/*.tar", "gs://b/x=1/*.tar"],
        "validation": ["v.csv"]}


# ---------------------------------------------------------------- errors


def assert_one_line(error):
    assert "\n" not in str(error), str(error)


def test_source_matching_no_files_is_named(tmp_path):
    with pytest.raises(SourceError, match="nothing_here") as error:
        prepare.prepare({"train": [str(tmp_path / "nothing_here/*.tar")]}, NAME, str(tmp_path))
    assert_one_line(error.value)


def test_img2dataset_metadata_beside_the_shards_is_named_not_read(tmp_path):
    """img2dataset writes 00000.tar, 00000.parquet and 00000_stats.json side by side."""
    for name in ("00000.tar", "00000.parquet", "00000_stats.json"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(SourceError, match=r"00000.parquet is not a .tar.*match the .tar files"
                       ) as error:
        prepare.prepare({"train": [str(tmp_path / "*")]}, NAME, str(tmp_path / "tfds"))
    assert_one_line(error.value)


def test_missing_csv_column_lists_the_columns_found(tmp_path):
    sources = write_web_dataset(str(tmp_path))
    expected = "captions.csv: no column 'caption'; columns found: filepath, title"
    with pytest.raises(SourceError, match=expected) as error:
        prepare.prepare({"train": [sources["csv"].path]}, NAME, str(tmp_path / "tfds"),
                        caption_column="caption")
    assert_one_line(error.value)
    assert not os.path.exists(tmp_path / "tfds" / NAME)  # failed before writing anything


def test_existing_dataset_needs_overwrite(tmp_path):
    sources = write_web_dataset(str(tmp_path))
    data_dir = str(tmp_path / "tfds")
    prepare.prepare({"train": [sources["tsv"].path]}, NAME, data_dir, workers=1)
    with pytest.raises(prepare.PrepareError, match="--overwrite") as error:
        prepare.prepare({"train": [sources["csv"].path]}, NAME, data_dir, workers=1)
    assert_one_line(error.value)
    report = prepare.prepare({"train": [sources["csv"].path]}, NAME, data_dir, workers=1,
                             overwrite=True)
    assert report["splits"]["train"]["written"] == len(sources["csv"].good)
    assert len(read_split(data_dir, "train")) == len(sources["csv"].good)


@pytest.mark.parametrize("beam_options", [None, "runner=DirectRunner"])
def test_split_without_usable_samples_is_an_error(tmp_path, beam_options):
    if beam_options:
        pytest.importorskip("apache_beam", reason="the beam extra (installed by .ci/run)")
    table = tmp_path / "broken.csv"
    table.write_text("filepath,title\nmissing.jpg,a caption\n")
    with pytest.raises(prepare.PrepareError, match="'train': no usable sample") as error:
        prepare.prepare({"train": [str(table)]}, NAME, str(tmp_path / "tfds"),
                        beam_options=beam_options)
    assert_one_line(error.value)
    if not beam_options:
        assert "missing_image" in str(error.value)


def test_tar_keys_must_be_adjacent(tmp_path):
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("a.txt", "b.txt", "a.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(SourceError, match="'a' are not adjacent"):
        prepare.prepare({"train": [str(shard)]}, NAME, str(tmp_path / "tfds"))


def test_a_truncated_shard_keeps_what_came_before_and_is_counted(tmp_path):
    shard = tmp_path / "shard.tar"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    with tarfile.open(shard, "w") as tar:
        for index, colour in enumerate(colours):
            image = io.BytesIO()
            Image.new("RGB", (64, 64), colour).save(image, "JPEG")
            for name, data in ((f"{index}.jpg", image.getvalue()),
                               (f"{index}.txt", f"caption {index}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    whole = shard.read_bytes()
    # Cut inside the third sample's image: two samples survive.
    third_image = whole.index(b"2.jpg")
    (tmp_path / "cut.tar").write_bytes(whole[:third_image + 700])
    report = prepare.prepare({"train": [str(tmp_path / "cut.tar")]}, NAME,
                             str(tmp_path / "tfds"))
    split = report["splits"]["train"]
    assert (split["written"], split["skipped"]) == (2, {"corrupt_shard": 1})
    assert [e["key"].decode() for e in read_split(str(tmp_path / "tfds"), "train")] == [
        "cut.tar/0", "cut.tar/1"]


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--source", str(tmp_path / "*.tar"), "--name", NAME,
                      "--data_dir", str(tmp_path)])
    assert str(exit_info.value.code).startswith("prepare error: --source")
    assert_one_line(exit_info.value.code)


def test_cli_writes_the_dataset_and_prints_the_report(tmp_path):
    sources = write_web_dataset(str(tmp_path))
    data_dir = str(tmp_path / "tfds")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "clip_jax.data.prepare", "--source",
         f"validation={sources['tsv'].path}", "--name", "cli_test", "--data_dir", data_dir,
         "--max_side", str(MAX_SIDE), "--workers", "2"],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation: 2 written, 1 skipped (missing_image 1) of 3 seen" in result.stdout
    keys = [example["key"].decode() for example in read_split(data_dir, "validation", "cli_test")]
    assert keys == list(sources["tsv"].good)
