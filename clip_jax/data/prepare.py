r"""Prepares web image-text data (webdataset tars, CSV/TSV) as a TFDS dataset.

  python -m clip_jax.data.prepare --source 'train=/data/shards/*.tar' \
      --source validation=/data/val.csv --name my_web_data --data_dir ~/tensorflow_datasets

Every sample is checked with the training input's own rules (`data.decode`); the
ones that cannot be used are counted by reason, never dropped silently. Kept
images are stored as JPEG with the longer side at most --max_side, with EXIF
orientation applied; a JPEG that needs no change keeps its original bytes. The
output (array_record, input order) reads back without registering the name:
`tfds.builder(NAME, data_dir=DIR)`, `tfds.data_source(NAME, split=..., data_dir=DIR)`.
A report per split is printed and written to DIR/NAME/VERSION/prepare_report.json.
"""

from clip_jax import quiet_tensorflow  # noqa: F401  (before TensorFlow loads)
import argparse
import collections
import concurrent.futures
import functools
import io
import json
import os
import re
import sys
from typing import NamedTuple

import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import shuffle as tfds_shuffle

from clip_jax.data import decode, prepare_beam, sources
from clip_jax.data.sources import SourceError

NOT_UTF8_RECODED = "not_utf8_captions_recoded"  # informational: kept, read as cp1252/latin-1
REPORT_FILE = "prepare_report.json"
_EXIF_ORIENTATION = 0x0112
# Samples decoding or waiting in the thread pool at once; bounds memory.
_IN_FLIGHT_PER_WORKER = 8
# Output bytes per TFDS writer bucket; see `_tfds_key`.
_BUCKET_BYTES = 1 << 30


class PrepareError(ValueError):
    """A run that cannot go ahead (one line, names the fix)."""


class PreparedSample(NamedTuple):
    """A sample as stored: its key, JPEG bytes and caption."""
    key: str
    jpeg: bytes
    caption: str
    caption_recoded: bool  # the raw caption was bytes that are not UTF-8


# ---------------------------------------------------------------- one sample


def fit_within(size, max_side):
    """(width, height) scaled so the longer side is at most max_side; never larger."""
    width, height = size
    scale = max_side / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def stored_jpeg(encoded, *, max_side, jpeg_quality):
    """Encoded image -> the JPEG bytes to store. Raises decode.Skipped.

    An RGB JPEG that is upright and small enough is returned unchanged: no
    generation loss and no encoding cost, which is most of a typical web crawl.
    """
    header = _read_header(encoded)
    # JPEG draft mode decodes big photos at 1/2..1/8 scale, still at least the
    # output size (in stored orientation, hence before the EXIF transpose).
    output_size = fit_within(header.size, max_side) if header else None
    image = decode.open_rgb(encoded, min_size=output_size, exif_transpose=True)
    if (header is not None and header.format == "JPEG" and header.mode == "RGB"
            and header.orientation == 1 and output_size == header.size):
        return encoded
    resized_size = fit_within(image.size, max_side)
    if resized_size != image.size:
        image = image.resize(resized_size, Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue()


class _Header(NamedTuple):
    format: str
    mode: str
    size: tuple
    orientation: int


def _read_header(encoded):
    """What PIL reads without decoding pixels, or None where it cannot (then
    open_rgb says why)."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            return _Header(image.format, image.mode, image.size, orientation)
    except Exception:  # noqa: BLE001 (any failure here is re-diagnosed by open_rgb)
        return None


def prepare_sample(raw, *, max_side, jpeg_quality):
    """sources.RawSample -> PreparedSample, or the decode.Skipped saying why not.

    Checks run cheapest first: image present, caption usable, image decodable.
    A broken-off shard arrives as a decode.Skipped already and is passed on.
    """
    if isinstance(raw, decode.Skipped):
        print(f"warning: {raw}", file=sys.stderr)
        return raw
    try:
        encoded = raw.image if raw.image_path is None else sources.read_image_file(raw.image_path)
        if encoded is None:
            raise decode.Skipped(decode.MISSING_IMAGE)
        caption = decode.decode_caption(raw.caption)
        jpeg = stored_jpeg(encoded, max_side=max_side, jpeg_quality=jpeg_quality)
    except decode.Skipped as skipped:
        return skipped
    return PreparedSample(raw.key, jpeg, caption, _is_not_utf8(raw.caption))


def _is_not_utf8(raw_caption):
    if not isinstance(raw_caption, bytes):
        return False
    try:
        raw_caption.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# ---------------------------------------------------------------- streams


def ordered_map(function, items, *, workers):
    """Yields function(item) for each item, in input order, computed in a thread
    pool with at most `_IN_FLIGHT_PER_WORKER * workers` items pending, so memory
    stays bounded however long `items` is. PIL releases the GIL in its codecs."""
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _tfds_key(index, bytes_before):
    """The TFDS example key keeping input order, for the index-th example written
    after `bytes_before` bytes of images.

    With disable_shuffling TFDS sorts by key, spilling to 1000 on-disk buckets
    chosen by key / 2**128 once it holds over 1 GB, then loads and sorts one bucket
    at a time. Small keys (0, 1, 2...) would all land in bucket 0, so the whole
    split would be loaded into memory at the end. Starting each _BUCKET_BYTES of
    output at the next bucket bounds that to about _BUCKET_BYTES (for up to ~1000
    times that per split); the index keeps the keys increasing.
    """
    buckets = tfds_shuffle.BUCKETS_NUMBER
    bucket = min(bytes_before // _BUCKET_BYTES, buckets - 1)
    bucket_start = (bucket * 2**tfds_shuffle.HKEY_SIZE + buckets - 1) // buckets  # rounded up
    return bucket_start + index


class _SplitReport:
    """Counts for one split, filled in as its examples are generated."""

    def __init__(self, paths):
        self.paths = paths
        self.seen = 0
        self.written = 0
        self.skipped = collections.Counter()
        self.not_utf8_recoded = 0

    def as_dict(self):
        return {"sources": self.paths, "seen": self.seen, "written": self.written,
                "skipped": dict(sorted(self.skipped.items())),
                NOT_UTF8_RECODED: self.not_utf8_recoded,
                # Counted independently: every sample seen was written or skipped.
                "all_accounted_for":
                    self.seen == self.written + sum(self.skipped.values())}


def _split_examples(paths, report, *, workers, image_column, caption_column, **image_options):
    """Yields (TFDS key, example) for the kept samples of `paths`, in order,
    counting written and skipped ones in `report`."""
    raw_samples = (raw for path in paths for raw in sources.read_samples(
        path, image_column=image_column, caption_column=caption_column))
    outcomes = ordered_map(lambda raw: prepare_sample(raw, **image_options), raw_samples,
                           workers=workers)
    bytes_written = 0
    for outcome in outcomes:
        report.seen += 1
        if isinstance(outcome, decode.Skipped):
            report.skipped[outcome.reason] += 1
            continue
        key = _tfds_key(report.written, bytes_written)
        report.written += 1
        report.not_utf8_recoded += outcome.caption_recoded
        bytes_written += len(outcome.jpeg)
        # Bytes go into the Image feature as they are: TFDS stores them unchanged.
        yield key, {"image": outcome.jpeg, "caption": outcome.caption, "key": outcome.key}


# ---------------------------------------------------------------- the dataset


def features():
    """The stored features: JPEG image, caption and the sample's source key."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "caption": tfds.features.Text(),
        "key": tfds.features.Text(),  # <source file basename>/<key in that file>
    })


def prepare(sources_by_split, name, data_dir, *, version="1.0.0", max_side=512,
            jpeg_quality=95, workers=None, image_column="filepath", caption_column="title",
            overwrite=False, beam_options=None):
    """Writes the TFDS dataset NAME:VERSION under data_dir -> the report dict.

    sources_by_split: {split: [path or glob of .tar/.csv/.tsv files, ...]}; the
    files of a split are read in the order given (each glob sorted).
    beam_options: None (threads in this process) or TFDS's
    --beam_pipeline_options text, e.g. 'runner=DirectRunner,direct_num_workers=2,
    direct_running_mode=multi_processing' (the same rules as a Beam pipeline).
    Raises PrepareError / sources.SourceError for runs that cannot go ahead.
    """
    _check_arguments(name, sources_by_split, max_side, jpeg_quality)
    paths_by_split = {split: _expand_all(patterns) for split, patterns in sources_by_split.items()}
    for paths in paths_by_split.values():
        for path in paths:
            sources.check_columns(path, image_column=image_column, caption_column=caption_column)
    version_dir = os.path.join(data_dir, name, str(version))
    if tf.io.gfile.exists(version_dir):
        if not overwrite:
            raise PrepareError(f"{version_dir} already exists; pass --overwrite to replace it, "
                               "or choose another --name or --version")
        tf.io.gfile.rmtree(version_dir)
    reports = {split: _SplitReport(paths) for split, paths in paths_by_split.items()}
    workers = workers or os.cpu_count()
    for split, paths in paths_by_split.items():
        print(f"{split}: {len(paths)} source files ({paths[0]}{', ...' if len(paths) > 1 else ''})")
    print(f"writing {version_dir} (max_side={max_side}, jpeg_quality={jpeg_quality}, "
          + (f"Beam: {beam_options})" if beam_options else f"{workers} workers)"))
    if beam_options:
        _store_with_beam(name, version, data_dir, paths_by_split, reports, beam_options,
                         image_column=image_column, caption_column=caption_column,
                         max_side=max_side, jpeg_quality=jpeg_quality)
    else:
        split_examples = {
            split: _split_examples(paths, reports[split], workers=workers,
                                   image_column=image_column, caption_column=caption_column,
                                   max_side=max_side, jpeg_quality=jpeg_quality)
            for split, paths in paths_by_split.items()}
        _store(name, version, data_dir, split_examples, reports)
    report = {"name": name, "version": str(version), "data_dir": data_dir,
              "max_side": max_side, "jpeg_quality": jpeg_quality,
              "splits": {split: split_report.as_dict() for split, split_report in reports.items()}}
    with tf.io.gfile.GFile(os.path.join(version_dir, REPORT_FILE), "w") as file:
        json.dump(report, file, indent=2)
    return report


def _store(name, version, data_dir, split_examples, reports):
    """Writes the splits' examples with TFDS, which consumes each generator once,
    in order, holding serialized examples in memory (up to 1 GB) or temporary
    bucket files until it writes the final array_record shards."""
    try:
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name, version=version, features=features(), split_datasets=split_examples,
            data_dir=data_dir, file_format="array_record", disable_shuffling=True)
    except AssertionError as error:
        if "No examples were yielded" not in str(error):
            raise
        # TFDS refuses an empty split; the first one still empty is the one it was writing.
        empty = next(split for split, report in reports.items() if report.written == 0)
        raise PrepareError(f"split {empty!r}: no usable sample, nothing written "
                           f"(skipped: {reports[empty].as_dict()['skipped']})") from None


def _store_with_beam(name, version, data_dir, paths_by_split, reports, beam_options, *,
                     image_column, caption_column, max_side, jpeg_quality):
    """The splits through prepare_beam; the reports filled from its counters."""
    try:
        counts = prepare_beam.store(
            name, version, data_dir, paths_by_split, features=features(),
            read_samples=functools.partial(sources.read_samples, image_column=image_column,
                                           caption_column=caption_column),
            prepare_sample=functools.partial(prepare_sample, max_side=max_side,
                                             jpeg_quality=jpeg_quality),
            beam_options=beam_options)
    except ValueError as error:
        if "total number of generated examples is 0" not in str(error):
            raise
        empty = next((split for split in paths_by_split if f"split {split}" in str(error)), "?")
        raise PrepareError(f"split {empty!r}: no usable sample, nothing written") from None
    for split, report in reports.items():
        split_counts = counts[split]
        report.seen, report.written = split_counts["seen"], split_counts["written"]
        report.skipped.update(split_counts["skipped"])
        report.not_utf8_recoded = split_counts["not_utf8_recoded"]


def _check_arguments(name, sources_by_split, max_side, jpeg_quality):
    if max_side < 1:
        raise PrepareError(f"--max_side={max_side}: must be at least 1")
    if not 1 <= jpeg_quality <= 100:
        raise PrepareError(f"--jpeg_quality={jpeg_quality}: must be in 1..100")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise PrepareError(f"--name={name!r}: TFDS names are lower_snake_case (e.g. my_web_data)")
    if name in tfds.list_builders(with_community_datasets=False):
        raise PrepareError(f"--name={name!r} is a registered TFDS dataset, which "
                           "tfds.builder would load instead; choose another name")
    if not sources_by_split:
        raise PrepareError("no --source given")
    for split in sources_by_split:
        if not re.fullmatch(r"\w+", split):
            raise PrepareError(f"split {split!r}: split names are letters, digits and _")


def _expand_all(patterns):
    """Patterns (a list, or one string) -> their files in order, each file once."""
    if isinstance(patterns, str):
        patterns = [patterns]
    return list(dict.fromkeys(path for pattern in patterns for path in sources.expand(pattern)))


# ---------------------------------------------------------------- CLI


def format_report(report):
    """The report as one line per split, for people."""
    lines = [f"{report['data_dir']}/{report['name']}/{report['version']}:"]
    for split, counts in report["splits"].items():
        skipped = ", ".join(f"{reason} {count}" for reason, count in counts["skipped"].items())
        lines.append(
            f"  {split}: {counts['written']} written, "
            f"{sum(counts['skipped'].values())} skipped ({skipped or 'none'}) of {counts['seen']} "
            f"seen; {counts[NOT_UTF8_RECODED]} non-UTF-8 captions read as cp1252/latin-1")
    return "\n".join(lines)


def parse_sources(values):
    """['SPLIT=PATH' or 'PATH', ...] -> {split: [path, ...]}; no split means train.
    The text before the first '=' is a split when it is a plain word, so a path
    with '=' in it needs an explicit split: train=gs://b/date=1/*.tar."""
    sources_by_split = {}
    for value in values:
        split, separator, path = value.partition("=")
        if not (separator and re.fullmatch(r"\w+", split)):
            split, path = "train", value
        sources_by_split.setdefault(split, []).append(path)
    return sources_by_split


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m clip_jax.data.prepare",
        description="Prepare webdataset tars and CSV/TSV image-caption files as a TFDS dataset.")
    parser.add_argument("--source", action="append", required=True, metavar="[SPLIT=]PATH",
                        help="a .tar shard, .csv or .tsv file, or a glob of them (gs:// works); "
                             "SPLIT defaults to train; repeat for more files or splits")
    parser.add_argument("--name", required=True, help="TFDS dataset name (lower_snake_case)")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory (local or gs://)")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--max_side", type=int, default=512,
                        help="longer image side is resized down to this")
    parser.add_argument("--jpeg_quality", type=int, default=95,
                        help="quality of re-encoded images")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (default: CPU count); without Beam")
    parser.add_argument("--beam_pipeline_options", default=None,
                        help="run as an Apache Beam pipeline (the beam extra), TFDS's format: "
                             "'runner=DirectRunner,direct_num_workers=4,"
                             "direct_running_mode=multi_processing', or runner=DataflowRunner,...")
    parser.add_argument("--image_column", default="filepath", help="CSV/TSV image path column")
    parser.add_argument("--caption_column", default="title", help="CSV/TSV caption column")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset of this name and version")
    args = parser.parse_args(argv)
    try:
        report = prepare(parse_sources(args.source), args.name, args.data_dir,
                         version=args.version, max_side=args.max_side,
                         jpeg_quality=args.jpeg_quality, workers=args.workers,
                         image_column=args.image_column, caption_column=args.caption_column,
                         overwrite=args.overwrite, beam_options=args.beam_pipeline_options)
    except (PrepareError, SourceError) as error:
        sys.exit(f"prepare error: {error}")
    print(format_report(report))


if __name__ == "__main__":
    main()
