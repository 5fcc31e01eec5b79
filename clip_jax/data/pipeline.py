"""Input pipelines: prepared TFDS splits (ArrayRecord, random access) -> batches.

Training (`TrainInput`): each process reads only its own rows of each global
batch (see `sampling` for who reads what), decodes and augments them in a thread
pool (PIL releases the GIL in its codecs), tokenizes, and keeps `prefetch`
batches ready in a background thread while the step runs. Every sample's crop
and caption choice come from its own seed (seed, stream position), so batches
do not depend on thread count or timing, and the cursor in `InputState` resumes
the stream exactly. Images travel to the devices as uint8 (4x less traffic than
float32) and are normalised inside the jitted step.

Evaluation input lives in `eval_input`.
"""

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue
import threading

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from tensorflow.core.example import example_pb2

from clip_jax import tokenizer
from clip_jax.data import augment, decode, sampling
from clip_jax.data.spec import parse_split
from clip_jax.data import builtin_datasets  # noqa: F401  (registers the built-in datasets)
from clip_jax.progress import is_terminal

_ARRAY_RECORD = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
# A batch that needs this many replacements means the data, not a few files, is broken.
_MAX_SKIPS_PER_BATCH_FACTOR = 10


def prepared_builder(name, data_dir):
    """The TFDS builder of `name[:version]`, prepared (see `_prepared_builder`)."""
    with _without_unprepared_folder_warnings():
        return _prepared_builder(name, data_dir)


def _prepared_builder(name, data_dir):
    """The TFDS builder of `name[:version]`. Datasets clip_jax generates itself (the
    built-in synthetic one) are prepared on first use, as ArrayRecord; any other
    must have been prepared already (nothing is downloaded at run time)."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"{name!r}: no such TFDS dataset in data_dir={data_dir!r} "
                         f"({str(error).splitlines()[0]})") from None
    if builder.is_prepared():
        return builder
    if not type(builder).__module__.startswith("clip_jax."):
        raise ValueError(
            f"{name!r} is not prepared in {builder.data_dir}: build it first with "
            f"`tfds build {name.split(':')[0]} --file_format=array_record"
            + (f" --data_dir={data_dir}`" if data_dir else "`")
            + " (or pass the data_dir that holds it)")
    # TFDS's bars write a frame per update into log files.
    tfds.display_progress_bar(is_terminal())
    # One process prepares first, so hosts sharing a data_dir never race.
    if jax.process_index() == 0:
        tfds.builder(name, data_dir=data_dir, file_format=_ARRAY_RECORD).download_and_prepare()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"prepare {name}")
    builder = tfds.builder(name, data_dir=data_dir, file_format=_ARRAY_RECORD)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


@contextlib.contextmanager
def _without_unprepared_folder_warnings():
    """TFDS warns of the version folder it is itself about to fill ('Variant
    folder ... has no dataset_info.json') while a built-in dataset is prepared."""
    def keep(record):
        return not str(record.msg).startswith("Variant folder")
    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def open_split(name, split, data_dir):
    """Random-access records of a prepared split as serialized tf.train.Examples.

    Parsing the protobuf ourselves (`record_field`) is ~6x cheaper per record than
    TFDS's feature decoding, and leaves images encoded for PIL."""
    builder = prepared_builder(name, data_dir)
    if builder.info.file_format != _ARRAY_RECORD:
        raise ValueError(
            f"{name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}; "
            "the input pipeline needs random access: re-prepare it as ArrayRecord "
            f"(`tfds build {name.split(':')[0]} --file_format=array_record`, or "
            "`python -m clip_jax.data.prepare` for image-text shards and CSVs)")
    if split not in builder.info.splits:
        raise ValueError(f"{name!r} has no split {split!r}; it has {', '.join(builder.info.splits)}")
    return builder.as_data_source(split=split,
                                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)


def record_field(example, key):
    """The values of feature `key` ('a/b' for nested features, as TFDS flattens
    them) of a parsed tf.train.Example: a list of bytes or ints; None if absent."""
    if key not in example.features.feature:
        return None
    feature = example.features.feature[key]
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


@dataclasses.dataclass
class InputState:
    """Where this process is in its input stream: positions consumed (`cursor`)
    and samples skipped so far, by reason."""
    cursor: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)

    def copy(self):
        return InputState(self.cursor, dict(self.skipped))


class TrainInput:
    """Endless iterator of this process's training batches.

    next() -> (batch, state): batch = {"images": uint8 [b, S, S, 3],
    "tokens": int32 [b, L], "indices": int64 [b] (record of each row)} with
    b = batch_size / process_count; state = the InputState right after this
    batch, which restarts the stream at the next one. Close it (or use `with`)
    to stop the reader thread.
    """

    def __init__(self, config, state=None, *, process_index=None, process_count=None):
        data = config.data
        self._process_index = jax.process_index() if process_index is None else process_index
        self._process_count = jax.process_count() if process_count is None else process_count
        self._local_batch = config.batch_size // self._process_count
        self._seed = config.seed
        self._image_size = config.model.image.image_size
        self._context_length = config.model.text.context_length
        self._crop_scale = tuple(data.crop_scale)
        self._draft = augment.draft_size(self._image_size, self._crop_scale[0])
        self._image_key, self._caption_key = data.image_key, data.caption_key
        self._train_spec = data.train
        name, split = parse_split(data.train)
        self._records = open_split(name, split, data.data_dir)
        self._num_records = len(self._records)
        if self._num_records == 0:
            raise ValueError(f"config.data.train={data.train!r} is empty")
        self._state = (state or InputState()).copy()
        self._pool = concurrent.futures.ThreadPoolExecutor(data.workers or os.cpu_count())
        self._ready = queue.Queue(maxsize=max(1, data.prefetch))
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_ahead, daemon=True,
                                        name="clip_jax-input")
        self._reader.start()

    def __iter__(self):
        return self

    def __next__(self):
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        while self._reader.is_alive():  # unblock a reader waiting to put
            try:
                self._ready.get(timeout=0.1)
            except queue.Empty:
                pass
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_ahead(self):
        try:
            while not self._stop.is_set():
                batch = self._next_batch()
                item = (batch, self._state.copy())
                while not self._stop.is_set():
                    try:
                        self._ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # surfaced to the consumer by __next__
            self._ready.put(error)

    def _next_batch(self):
        images, captions, indices = [], [], []
        skipped_here = 0
        while len(images) < self._local_batch:
            cursors = np.arange(self._state.cursor,
                                self._state.cursor + self._local_batch - len(images))
            positions = sampling.global_positions(cursors, self._local_batch,
                                                  self._process_index, self._process_count)
            record_ids, _ = sampling.record_indices(positions, self._num_records, self._seed)
            records = self._records.__getitems__(record_ids.tolist())
            draws = sampling.uniforms(self._seed, positions, augment.CROP_DRAWS + 1)
            examples = self._pool.map(self._example, records, draws)
            self._state.cursor += len(cursors)
            for record_id, example in zip(record_ids.tolist(), examples):
                if isinstance(example, decode.Skipped):
                    self._state.skipped[example.reason] = (
                        self._state.skipped.get(example.reason, 0) + 1)
                    skipped_here += 1
                    continue
                images.append(example[0])
                captions.append(example[1])
                indices.append(record_id)
            if skipped_here > _MAX_SKIPS_PER_BATCH_FACTOR * self._local_batch:
                raise ValueError(
                    f"config.data.train={self._train_spec!r}: {skipped_here} bad samples while "
                    f"filling one batch of {self._local_batch} (skipped so far: "
                    f"{self._state.skipped}); is config.data.image_key/caption_key right?")
        return {"images": np.stack(images),
                "tokens": tokenizer.tokenize(captions, self._context_length),
                "indices": np.asarray(indices, np.int64)}

    def _example(self, record, draws):
        """(uint8 pixels, caption) of one serialized record, or the Skipped it raised."""
        example = example_pb2.Example.FromString(record)
        try:
            caption = _choose_caption(record_field(example, self._caption_key), draws[-1])
            image = decode.open_rgb(single_value(record_field(example, self._image_key)),
                                    min_size=self._draft)
            return (augment.random_resized_crop(image, self._image_size, draws[:-1],
                                                self._crop_scale), caption)
        except decode.Skipped as skipped:
            return skipped


def single_value(values):
    """The one value of a scalar feature; None when absent or empty."""
    return values[0] if values else None


def _choose_caption(captions, draw):
    """One caption of a feature holding one or several (e.g. coco_captions' five):
    `draw` in [0, 1) picks it, so the choice is seeded per sample."""
    if not captions:
        raise decode.Skipped(decode.MISSING_CAPTION)
    return decode.decode_caption(captions[int(draw * len(captions))])


def gather_input_states(local_state):
    """Every process's InputState as one JSON-able dict (a collective: all
    processes call it at the same step): what a checkpoint stores."""
    row = np.array([local_state.cursor] + [local_state.skipped.get(reason, 0)
                                           for reason in decode.REASONS], np.int64)
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, row.size)
    return {"process_count": len(rows),
            "cursors": rows[:, 0].tolist(),
            "skipped": [dict(zip(decode.REASONS, counts)) for counts in rows[:, 1:].tolist()]}


def skipped_metrics(global_states):
    """{"data/skipped": total, "data/skipped/<reason>": count, ...} summed over processes."""
    totals = {reason: sum(skipped.get(reason, 0) for skipped in global_states["skipped"])
              for reason in decode.REASONS}
    metrics = {f"data/skipped/{reason}": count for reason, count in totals.items() if count}
    return {"data/skipped": sum(totals.values()), **metrics}


def local_input_state(global_states, step, batch_size):
    """This process's InputState to resume at `step` from `gather_input_states`'
    output (None: a checkpoint without one).

    With the same process count the stream resumes exactly. Otherwise the
    positions consumed are assumed to be step x batch_size, which is exact
    unless samples were skipped before; the skip counts then carry over on
    process 0 so totals stay right. Returns (state, warning or None).
    """
    process_count, process_index = jax.process_count(), jax.process_index()
    if global_states and global_states["process_count"] == process_count:
        return InputState(global_states["cursors"][process_index],
                          dict(global_states["skipped"][process_index])), None
    state = InputState(cursor=step * (batch_size // process_count))
    if not global_states:
        return state, (f"the checkpoint at step {step} has no input position; resuming the "
                       "input at step x batch_size")
    totals = skipped_metrics(global_states)
    if process_index == 0:
        state.skipped = {reason: count for reason, count in
                         ((r, totals.get(f"data/skipped/{r}", 0)) for r in decode.REASONS) if count}
    if totals["data/skipped"]:
        return state, (f"the checkpoint was written by {global_states['process_count']} processes "
                       f"and {totals['data/skipped']} bad samples had been skipped, so the input "
                       f"resumes at step x batch_size: up to that many samples may repeat")
    return state, None
