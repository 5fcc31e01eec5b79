"""Evaluation input: a prepared split read once, in order, shared out to processes.

Global batch m holds records [m*B, (m+1)*B) in order, each process reading its
own contiguous rows of it, so row i of an embedded split is record i on any
number of processes. Images get CLIP's evaluation transform (shorter side
resized, centre crop). Every process yields the same number of fixed-size
batches (padding rows have mask=False), so all hosts run the same number of
collective steps. A row whose image does not
decode, or that lacks its label or every caption, is a masked row: evaluators
report how many rows they skipped instead of losing them silently.
"""

import concurrent.futures
import dataclasses
import math
import os
from typing import Optional

import jax
import numpy as np

from clip_jax import tokenizer
from clip_jax.data import augment, decode
from clip_jax.data.pipeline import open_split, prepared_builder
from clip_jax.data.records import parse_example, record_field, single_value


@dataclasses.dataclass(frozen=True)
class EvalSource:
    """What to read from which prepared split. `label_key` and `caption_key`
    are read when set; a row keeps its first `captions_per_image` captions."""
    dataset: str  # TFDS 'name[:version]'
    split: str  # any TFDS split expression, e.g. 'test' or 'train[:5000]'
    data_dir: Optional[str] = None
    image_key: str = "image"
    label_key: Optional[str] = None
    caption_key: Optional[str] = None
    captions_per_image: int = 1


def label_names(source):
    """The class names of the source's label feature (a TFDS ClassLabel), or None."""
    feature = prepared_builder(source.dataset, source.data_dir).info.features
    for part in source.label_key.split("/"):
        feature = feature[part] if part in getattr(feature, "keys", lambda: ())() else None
        if feature is None:
            return None
    return list(feature.names) if hasattr(feature, "names") else None


def batch_count(source, global_batch):
    """How many batches eval_batches yields on each process."""
    return math.ceil(len(open_split(source.dataset, source.split, source.data_dir)) / global_batch)


def eval_batches(source, image_size, global_batch, *, context_length=None, workers=0):
    """Yields this process's share of `source` in batches of global_batch / processes:
    {"images": uint8 [b, S, S, 3], "mask": bool [b] (usable rows), "is_record": bool [b]
    (rows that are records, not padding; is_record & ~mask were skipped)}, plus "labels": int32 [b] with
    a label_key, and "tokens": int32 [b, K, L] and "caption_mask": bool [b, K]
    (K = captions_per_image, L = context_length) with a caption_key.
    """
    records = open_split(source.dataset, source.split, source.data_dir)
    local_batch = global_batch // jax.process_count()
    captions_per_image = source.captions_per_image
    blank = np.zeros((image_size, image_size, 3), np.uint8)
    no_captions = [""] * captions_per_image

    def load(record):
        """(pixels, label, captions, caption mask, valid) of one record."""
        example = parse_example(record)
        try:
            label = 0
            if source.label_key:
                label = single_value(record_field(example, source.label_key))
                if label is None:
                    raise decode.Skipped("missing_label")
            captions, present = no_captions, [False] * captions_per_image
            if source.caption_key:
                found = (record_field(example, source.caption_key) or [])[:captions_per_image]
                if not found:
                    raise decode.Skipped(decode.MISSING_CAPTION)
                captions = [decode.decode_caption(c) for c in found] + no_captions[len(found):]
                present = [True] * len(found) + [False] * (captions_per_image - len(found))
            image = decode.open_rgb(single_value(record_field(example, source.image_key)),
                                    min_size=(image_size, image_size))
            return augment.resize_centre_crop(image, image_size), int(label), captions, present, True
        except decode.Skipped:
            return blank, 0, no_captions, [False] * captions_per_image, False

    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for batch_start in range(0, len(records), global_batch):
            # This process's rows of the global batch, so global row i is record i
            # whatever the process count (and rankings break ties the same way).
            first = batch_start + jax.process_index() * local_batch
            ids = list(range(first, min(len(records), first + local_batch)))
            rows = list(pool.map(load, records.__getitems__(ids))) if ids else []
            rows += [(blank, 0, no_captions, [False] * captions_per_image, False)
                     ] * (local_batch - len(rows))
            images, labels, captions, present, valid = zip(*rows)
            batch = {"images": np.stack(images), "mask": np.asarray(valid, bool),
                     "is_record": np.arange(local_batch) < len(ids)}
            if source.label_key:
                batch["labels"] = np.asarray(labels, np.int32)
            if source.caption_key:
                flat = [caption for row in captions for caption in row]
                batch["tokens"] = tokenizer.tokenize(flat, context_length).reshape(
                    local_batch, captions_per_image, context_length)
                batch["caption_mask"] = np.asarray(present, bool)
            yield batch
