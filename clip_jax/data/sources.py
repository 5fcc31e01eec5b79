"""Raw image-text samples from webdataset tar shards and CSV/TSV files.

Reading only: every sample found is yielded, broken or not, so the caller can
validate it with `clip_jax.data.decode` and count what it skips. Paths go through
`tf.io.gfile`, so gs:// works as well as local files.

Sample keys are `<file basename>/<key in file>`: the webdataset key (member path
up to the first dot of its basename) for tar shards, the 0-based data row for
CSV/TSV files.
"""

import csv
import json
import os
import tarfile
from typing import Iterator, NamedTuple

import tensorflow as tf

from clip_jax.data import decode

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order within one key
_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}


class SourceError(ValueError):
    """A source that cannot be read at all (one line, names the fix)."""


class RawSample(NamedTuple):
    """One sample as found. image: its encoded bytes, or None when the source names
    a file (image_path) or has no image; caption: bytes, str or None if absent."""
    key: str
    image: bytes | None
    image_path: str | None
    caption: bytes | str | None


def expand(pattern):
    """A path or glob -> the sorted list of source files it matches."""
    paths = sorted(set(tf.io.gfile.glob(pattern)))
    if not paths:
        raise SourceError(f"--source {pattern!r} matches no files")
    for path in paths:
        if not (path.endswith(".tar") or _extension(path) in _CSV_DELIMITERS):
            hint = ("; img2dataset's .parquet and _stats.json files beside the shards are "
                    "metadata: match the .tar files only (e.g. 'dir/*.tar')"
                    if _extension(path) in (".parquet", ".json") else "")
            raise SourceError(f"--source {pattern!r}: {path} is not a .tar, .csv or .tsv file"
                              + hint)
    return paths


def check_columns(path, *, image_column, caption_column):
    """Raises SourceError unless a .csv/.tsv file has both columns (tars pass), so
    a wrong column name fails before any writing starts."""
    if not path.endswith(".tar"):
        with tf.io.gfile.GFile(path, "rb") as file:
            _column_indices(path, _csv_rows(path, file), image_column, caption_column)


def read_samples(path, *, image_column, caption_column):
    """Iterator of RawSample from one .tar shard or .csv/.tsv file, in file order;
    a tar shard that breaks off ends with a decode.Skipped(CORRUPT_SHARD)."""
    if path.endswith(".tar"):
        return _tar_samples(path)
    return _table_samples(path, image_column=image_column, caption_column=caption_column)


def _extension(path):
    return os.path.splitext(path)[1].lower()


def _tar_samples(path) -> Iterator[RawSample]:
    """Streams a webdataset shard: members of one key are adjacent, so a key is
    complete when the next one starts, and at most one sample is held in memory.
    A shard that breaks off (truncated, corrupt header) ends with a
    decode.Skipped(CORRUPT_SHARD) in place of the samples it lost."""
    shard_name = os.path.basename(path)
    seen_keys = set()
    key, members = None, {}
    try:
        # Member names that are not UTF-8 stay distinct, and storable, as escapes.
        with (tf.io.gfile.GFile(path, "rb") as file,
              tarfile.open(fileobj=file, mode="r|*", encoding="utf-8",
                           errors="backslashreplace") as tar):
            for member in tar:
                member_key, extension = _split_member_name(member.name)
                if not member.isfile() or member_key is None:
                    continue
                if member_key != key:
                    if key is not None:
                        yield _tar_sample(f"{shard_name}/{key}", members)
                    if member_key in seen_keys:
                        raise SourceError(
                            f"{path}: members of key {member_key!r} are not adjacent; rewrite "
                            "the shard with each key's files together (as webdataset/img2dataset "
                            "do)")
                    seen_keys.add(member_key)
                    key, members = member_key, {}
                # The first member with a given extension wins, like the first image type.
                members.setdefault(extension, tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as error:
        # The key being read when the shard broke off may be incomplete: dropped too.
        yield decode.Skipped(decode.CORRUPT_SHARD, f"{path} after key {key!r}: {error}")
        return
    if key is not None:
        yield _tar_sample(f"{shard_name}/{key}", members)


def _split_member_name(name):
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'); hidden files -> (None, None)."""
    directory, basename = os.path.split(name)
    if not basename or basename.startswith("."):
        # Not samples: macOS resource forks ('._000123.jpg') and the like.
        return None, None
    stem, _, extension = basename.partition(".")
    return os.path.join(directory, stem), extension.lower()


def _tar_sample(key, members):
    """The members of one key -> RawSample; the .txt caption wins over the .json one."""
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    caption = members.get("txt")
    if caption is None and "json" in members:
        caption = _json_caption(members["json"])
    return RawSample(key, image, None, caption)


def _json_caption(encoded):
    """The `caption` field of img2dataset's per-sample JSON as bytes, or None.

    Returned as bytes so that decode_caption treats it like a .txt caption: a
    file that is not UTF-8 keeps its original bytes (surrogateescape), and a
    lone surrogate escaped in the JSON ("\\ud800") becomes "?" instead of
    failing later when TFDS encodes the text.
    """
    try:
        metadata = json.loads(encoded.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None
    caption = metadata.get("caption") if isinstance(metadata, dict) else None
    if not isinstance(caption, str):
        return None
    try:
        return caption.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return caption.encode("utf-8", "replace")


def _table_samples(path, *, image_column, caption_column) -> Iterator[RawSample]:
    """Rows of a CSV/TSV file; image paths are relative to its directory."""
    file_name = os.path.basename(path)
    directory = os.path.dirname(path)
    with tf.io.gfile.GFile(path, "rb") as file:
        rows = _csv_rows(path, file)
        image_index, caption_index = _column_indices(path, rows, image_column, caption_column)
        for row_number, row in enumerate(rows):
            image_path = _field(row, image_index)
            if image_path is not None and image_path.strip():
                image_path = _resolve(directory, image_path.strip())
            else:
                image_path = None
            yield RawSample(f"{file_name}/{row_number}", None, image_path,
                            _field(row, caption_index))


def _csv_rows(path, file):
    """A csv.reader over an open binary file; the delimiter follows the extension."""
    # Bytes that are not UTF-8 survive as surrogates, so a caption in another
    # encoding comes back byte-exact in `_field` and decode_caption can read it.
    lines = (line.decode("utf-8", "surrogateescape") for line in file)
    return csv.reader(lines, delimiter=_CSV_DELIMITERS[_extension(path)])


def _column_indices(path, rows, image_column, caption_column):
    """Reads the header row -> (image column index, caption column index)."""
    header = [name.lstrip("\ufeff").strip() for name in next(rows, [])]
    missing = [column for column in (image_column, caption_column) if column not in header]
    if missing:
        raise SourceError(
            f"{path}: no column {', '.join(map(repr, missing))}; columns found: "
            f"{', '.join(header) or 'none'} (choose with --image_column/--caption_column)")
    return header.index(image_column), header.index(caption_column)


def _field(row, index):
    """The field as the original bytes, or None for a row too short to have it."""
    if index >= len(row):
        return None
    return row[index].encode("utf-8", "surrogateescape")


def _resolve(directory, image_path):
    image_path = os.fsdecode(image_path)
    if os.path.isabs(image_path) or "://" in image_path:
        return image_path
    return os.path.join(directory, image_path)


def read_image_file(path):
    """The bytes of an image file, or None if it does not exist."""
    try:
        with tf.io.gfile.GFile(path, "rb") as file:
            return file.read()
    except tf.errors.NotFoundError:
        return None
