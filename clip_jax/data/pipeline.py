"""Input pipelines: prepared TFDS splits (ArrayRecord, random access) -> batches.

Training (`TrainInput`): each process reads only its own rows of each global
batch (see `sampling` for who reads what). Decoding, cropping and tokenizing run
in `config.data.workers` worker processes (Grain's `mp_prefetch`, started with
`spawn`, never forked from a process holding JAX threads), one *block* of a
process's stream at a time (`blocks`); the training process only cuts batches
from finished blocks and keeps the books, so its own CPU cost per sample is a
few microseconds of bookkeeping. Every sample's source, record, crop and
caption come from (seed, stream position), so batches depend neither on the
number of workers nor on timing, and the cursor in `InputState` resumes the
stream exactly. Images travel to the devices as uint8 (4x less traffic than
float32) and are normalised inside the jitted step.

Grain is used for the worker pool and its shared-memory transport, not for
sampling or state: Grain's own sampler would make a batch depend on which
samples are bad (a `filter` before `mp_prefetch` changes the output with the
worker count), while this stream replaces a bad sample from the process's own
positions and resumes from one integer per process, on any process count.

Evaluation input lives in `eval_input`.
"""

import collections
import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from jax.experimental import multihost_utils

from clip_jax.data import blocks, decode, spec
from clip_jax.data import builtin_datasets  # noqa: F401  (registers the built-in datasets)
from clip_jax.progress import is_terminal

_ARRAY_RECORD = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
# A batch that needs this many replacements means the data, not a few files, is broken.
_MAX_SKIPS_PER_BATCH_FACTOR = 10
# Blocks a stream can ask for: endless in practice (2**40 blocks).
_ENDLESS = 1 << 40
# How often a worker checks that the training process is still there.
_PARENT_POLL_SECONDS = 0.5


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


@dataclasses.dataclass
class InputState:
    """Where this process is in its input stream: positions consumed (`cursor`),
    samples skipped so far by reason, and samples drawn into batches so far by
    source ('name:split')."""
    cursor: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)
    drawn: dict = dataclasses.field(default_factory=dict)

    def copy(self):
        return InputState(self.cursor, dict(self.skipped), dict(self.drawn))


def train_sources(data):
    """config.data -> the tuple of spec.Source it trains on."""
    return spec.parse_train(data.train, image_key=data.image_key, caption_key=data.caption_key)


def source_files(source, data_dir, seed, index):
    """spec.Source (the index-th of the mixture) -> blocks.SourceFiles: its
    prepared ArrayRecord shards."""
    split_records = open_split(source.name, source.split, data_dir)
    if len(split_records) == 0:
        raise ValueError(f"config.data.train: {source.label} is empty")
    split_info = prepared_builder(source.name, data_dir).info.splits[source.split]
    paths = tuple(os.fspath(path) for path in split_info.filepaths)
    return blocks.SourceFiles.of(source, paths, len(split_records), seed, index)


class TrainInput:
    """Endless iterator of this process's training batches.

    next() -> (batch, state): batch = {"images": uint8 [b, S, S, 3],
    "tokens": int32 [b, L], "indices": int64 [b] (record of each row in its
    source), "sources": int32 [b] (index into the mixture)} with b = batch_size /
    process_count; state = the InputState right after this batch, which
    restarts the stream at the next one. Close it (or use `with`) to stop the
    worker processes; they also stop by themselves when this process dies.
    Images are cropped to `image_size` and captions tokenized to
    `context_length` (default: config.model's; a phase's, clip_jax.phases).
    """

    def __init__(self, config, state=None, *, process_index=None, process_count=None,
                 image_size=None, context_length=None):
        data = config.data
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        self._local_batch = config.batch_size // process_count
        self._train_spec = data.train
        sources = train_sources(data)
        self.source_labels = tuple(source.label for source in sources)
        decoder = blocks.BlockDecoder(
            sources=tuple(source_files(source, data.data_dir, config.seed, index)
                          for index, source in enumerate(sources)),
            seed=config.seed, local_batch=self._local_batch, process_index=process_index,
            process_count=process_count,
            image_size=image_size or config.model.image.image_size,
            context_length=context_length or config.model.text.context_length,
            crop_scale=tuple(data.crop_scale))
        self._state = (state or InputState()).copy()
        workers = 0 if data.in_process else data.workers or os.cpu_count()
        dataset = (grain.MapDataset.range(0, _ENDLESS)
                   .map(_BlockAt(decoder, self._state.cursor, self._local_batch))
                   .to_iter_dataset(grain.ReadOptions(num_threads=data.threads,
                                                      prefetch_buffer_size=data.threads)))
        if workers > 0:
            if not flags.FLAGS.is_parsed():  # Grain reads absl flags; a notebook parses none
                flags.FLAGS.mark_as_parsed()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers,
                                             per_worker_buffer_size=max(1, data.prefetch)),
                worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
        self._blocks = iter(dataset)
        self._pending = collections.deque()  # (block, first unused row)

    def __iter__(self):
        return self

    def __next__(self):
        parts, needed, skipped_here = [], self._local_batch, 0
        while needed:
            if not self._pending:
                self._pending.append((next(self._blocks), 0))
            block, start = self._pending.popleft()
            rows = len(block["cursors"])
            take = min(needed, rows - start)
            if take:
                parts.append({key: block[key][start:start + take]
                              for key in ("images", "tokens", "indices", "sources")})
                needed -= take
            if start + take < rows:  # the batch ends inside this block
                self._pending.appendleft((block, start + take))
                end_cursor = int(block["cursors"][start + take - 1]) + 1
            else:  # past the block's last position, bad ones included
                end_cursor = int(block["start"]) + self._local_batch
            skipped_here += self._count_skips(block, end_cursor)
            self._state.cursor = end_cursor
            if skipped_here > _MAX_SKIPS_PER_BATCH_FACTOR * self._local_batch:
                raise ValueError(
                    f"config.data.train={self._train_spec!r}: {skipped_here} bad samples while "
                    f"filling one batch of {self._local_batch} (skipped so far: "
                    f"{self._state.skipped}); is config.data.image_key/caption_key right?")
        batch = (parts[0] if len(parts) == 1 else
                 {key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
        for source, count in zip(*np.unique(batch["sources"], return_counts=True)):
            label = self.source_labels[source]
            self._state.drawn[label] = self._state.drawn.get(label, 0) + int(count)
        return batch, self._state.copy()

    def _count_skips(self, block, end_cursor):
        """Counts the block's bad positions in [cursor, end_cursor) by reason."""
        cursors = block["skipped_cursors"]
        counted = (cursors >= self._state.cursor) & (cursors < end_cursor)
        for reason in block["skipped_reasons"][counted].tolist():
            name = decode.REASONS[reason]
            self._state.skipped[name] = self._state.skipped.get(name, 0) + 1
        return int(counted.sum())

    def close(self):
        self._pending.clear()  # blocks in shared memory are freed with their last reference
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclasses.dataclass(frozen=True)
class _BlockAt:
    """Block k of a stream restarted at `start` (what Grain maps over k)."""
    decoder: blocks.BlockDecoder
    start: int
    local_batch: int

    def __call__(self, block_index):
        return self.decoder(self.start + int(block_index) * self.local_batch)


def _exit_with_parent(parent_pid, worker_index, worker_count):
    """Worker start-up hook: exit as soon as the training process is gone (a
    SIGKILLed or OOM-killed trainer cannot stop its workers, and orphans would
    keep their memory on a preempted host). Grain stops workers itself on
    close, exceptions and normal exit."""
    del worker_index, worker_count

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="clip_jax-parent-watch").start()


def source_labels(data):
    """'name:split' of each source of config.data.train, in mixture order."""
    return tuple(source.label for source in train_sources(data))


def gather_input_states(local_state, labels):
    """Every process's InputState as one JSON-able dict (a collective: all
    processes call it at the same step): what a checkpoint stores. `labels`:
    source_labels(config.data)."""
    row = np.array([local_state.cursor]
                   + [local_state.skipped.get(reason, 0) for reason in decode.REASONS]
                   + [local_state.drawn.get(label, 0) for label in labels], np.int64)
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, row.size)
    reasons_end = 1 + len(decode.REASONS)
    return {"process_count": len(rows),
            "cursors": rows[:, 0].tolist(),
            "skipped": [dict(zip(decode.REASONS, counts))
                        for counts in rows[:, 1:reasons_end].tolist()],
            "drawn": [dict(zip(labels, counts)) for counts in rows[:, reasons_end:].tolist()]}


def input_metrics(global_states):
    """Summed over processes: {"data/skipped": total, "data/skipped/<reason>":
    count, ..., "data/source/<name:split>/samples": samples drawn so far}."""
    totals = {reason: sum(skipped.get(reason, 0) for skipped in global_states["skipped"])
              for reason in decode.REASONS}
    metrics = {f"data/skipped/{reason}": count for reason, count in totals.items() if count}
    drawn = _summed(global_states.get("drawn", []))
    metrics.update({f"data/source/{label}/samples": count for label, count in drawn.items()})
    return {"data/skipped": sum(totals.values()), **metrics}


def _summed(per_process):
    totals = {}
    for counts in per_process:
        for key, count in counts.items():
            totals[key] = totals.get(key, 0) + count
    return totals


def local_input_state(global_states, step, batch_size):
    """This process's InputState to resume at `step` from `gather_input_states`'
    output (None: a checkpoint without one).

    With the same process count the stream resumes exactly. Otherwise the
    positions consumed are assumed to be step x batch_size, which is exact
    unless samples were skipped before; the skip and per-source counts then
    carry over on process 0 so totals stay right. Returns (state, warning or None).
    """
    process_count, process_index = jax.process_count(), jax.process_index()
    if global_states and global_states["process_count"] == process_count:
        drawn = global_states.get("drawn") or [{}] * process_count
        return InputState(global_states["cursors"][process_index],
                          dict(global_states["skipped"][process_index]),
                          dict(drawn[process_index])), None
    state = InputState(cursor=step * (batch_size // process_count))
    if not global_states:
        return state, (f"the checkpoint at step {step} has no input position; resuming the "
                       "input at step x batch_size")
    skipped = _summed(global_states["skipped"])
    if process_index == 0:
        state.skipped = {reason: count for reason, count in skipped.items() if count}
        state.drawn = _summed(global_states.get("drawn", []))
    total_skipped = sum(skipped.values())
    if total_skipped:
        return state, (f"the checkpoint was written by {global_states['process_count']} processes "
                       f"and {total_skipped} bad samples had been skipped, so the input "
                       f"resumes at step x batch_size: up to that many samples may repeat")
    return state, None
