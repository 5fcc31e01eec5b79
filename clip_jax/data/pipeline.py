"""Input pipelines: TFDS -> images + tokens, batched, this process's rows.

Training: every process follows one seeded stream of global batches and keeps
its rows, so the global batch does not depend on the process count. Evaluation:
each process reads a disjoint slice of the split. Images travel to the devices
as uint8 (4x less host->device traffic than float32) and are normalised inside
the jitted step.
"""

import math

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from clip_jax import tokenizer
from clip_jax.data import synthetic_shapes  # noqa: F401  (registers the built-in dataset)

# tf.data only feeds the host; keep TensorFlow off any accelerator.
tf.config.set_visible_devices([], "GPU")


def prepared_builder(name, data_dir):
    """A TFDS builder for `name[:version]`, preparing it first where it can be
    generated locally (the built-in synthetic dataset needs no download)."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"config.data.name={name!r}: no such TFDS dataset ({error})") from None
    if not builder.is_prepared():
        # One process prepares first, so hosts sharing a data_dir never race.
        if jax.process_index() == 0:
            builder.download_and_prepare()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"prepare {name}")
        if not builder.is_prepared():
            builder.download_and_prepare()
    return builder


def _resize(image, size):
    """uint8 [H, W, 3] -> uint8 [size, size, 3]; bicubic with antialiasing."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    resized = tf.image.resize(image, (size, size), method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def train_dataset(config, *, start_step=0):
    """Endless iterator of this process's batches: {"images": uint8 [b, S, S, 3],
    "tokens": int32 [b, L]}, with b = batch_size / process_count.

    Every process runs the same seeded stream of global batches and keeps its own
    rows (process p: rows p * b to (p + 1) * b), so the global batch at every step
    is the same for any number of processes: a run on N hosts matches one on a
    single host, step for step. The cost: each process reads and decodes the whole
    split, not 1/N of it, which suits the in-memory datasets this trainer ships
    with; sharded random access (array_record + grain) is the way past that.
    """
    data, model = config.data, config.model
    local_batch = config.batch_size // jax.process_count()
    first_row = jax.process_index() * local_batch
    builder = prepared_builder(data.name, data.data_dir)
    ds = builder.as_dataset(split=data.train_split, shuffle_files=True,
                            read_config=tfds.ReadConfig(shuffle_seed=config.seed))
    size = model.image.image_size
    ds = ds.map(lambda ex: {"images": _resize(ex[data.image_key], size),
                            "captions": ex[data.caption_key]},
                num_parallel_calls=tf.data.AUTOTUNE)
    if data.cache:
        ds = ds.cache()
    ds = ds.shuffle(data.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(config.batch_size, drop_remainder=True)
    ds = ds.map(lambda batch: {key: value[first_row:first_row + local_batch]
                               for key, value in batch.items()})
    # Resuming replays the batch order up to start_step; exact constant-time
    # resume is the data-state issue's.
    ds = ds.skip(start_step).prefetch(data.prefetch)
    context_length = model.text.context_length
    # Tokenised here, once per batch (~3 ms for 256 captions thanks to the word
    # cache), while the previous step runs on the devices. Not inside tf.data:
    # a tf.numpy_function in a prefetching pipeline deadlocks on the GIL when the
    # iterator is torn down at interpreter exit.
    for batch in ds.as_numpy_iterator():
        captions = [caption.decode("utf-8") for caption in batch["captions"]]
        yield {"images": batch["images"], "tokens": tokenizer.tokenize(captions, context_length)}


def eval_batches(config, dataset, split, label_key, global_batch):
    """Yields this process's share of a labelled split in fixed-size batches:
    {"images": uint8 [b, S, S, 3], "labels": int32 [b], "mask": bool [b]}.

    Every process yields the same number of batches (the tail padded with
    mask=False), so all hosts run the same number of collective steps.
    """
    builder = prepared_builder(dataset, config.data.data_dir)
    num_batches = math.ceil(builder.info.splits[split].num_examples / global_batch)
    local_batch = global_batch // jax.process_count()
    size = config.model.image.image_size
    ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False)
    ds = ds.map(lambda ex: {"images": _resize(ex[config.data.image_key], size),
                            "labels": tf.cast(ex[label_key], tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE)
    batches = ds.batch(local_batch).prefetch(2).as_numpy_iterator()
    empty = {"images": np.zeros((0, size, size, 3), np.uint8), "labels": np.zeros((0,), np.int32)}
    for _ in range(num_batches):
        batch = next(batches, empty)
        pad = local_batch - len(batch["labels"])
        yield {"images": np.pad(batch["images"], ((0, pad), (0, 0), (0, 0), (0, 0))),
               "labels": np.pad(batch["labels"], (0, pad)),
               "mask": np.arange(local_batch) < len(batch["labels"])}
