"""What a training-input worker computes: one *block* of a process's stream.

A block is `local_batch` consecutive positions of one process's own stream
(see `sampling`), starting at any cursor: each position's source, record, crop
and caption draws are pure functions of (seed, global position), so a block
decodes the same in any worker, in any order, after any restart. A block holds
the good samples, stacked and tokenized, plus the cursor of every sample, good
or skipped; the consumer (`pipeline.TrainInput`) cuts batches from consecutive
blocks and keeps the books. Nothing here imports JAX or TensorFlow, so a worker
process stays small; the decoder pickles to its configuration only and opens
the record files in the process that runs it.
"""

import dataclasses
import functools

import numpy as np

from clip_jax import tokenizer
from clip_jax.data import augment, decode, records, sampling


@dataclasses.dataclass(frozen=True)
class SourceFiles:
    """One mixture member as the workers see it."""
    label: str  # 'name:split'
    paths: tuple  # its ArrayRecord shards, in order
    num_records: int
    weight: int
    image_key: str
    caption_key: str
    seed: int  # of its epoch permutations

    @classmethod
    def of(cls, source, paths, num_records, run_seed, index):
        """The index-th source (a spec.Source) of a run, stored in `paths`."""
        # Source 0 keeps the run seed, so a one-source run reads what it always read.
        seed = run_seed if index == 0 else int(
            np.random.SeedSequence([run_seed, 3, index]).generate_state(1)[0])
        return cls(source.label, tuple(paths), num_records, source.weight, source.image_key,
                   source.caption_key, seed)


@dataclasses.dataclass(frozen=True)
class BlockDecoder:
    """decoder(start_cursor) -> the block of this process's positions
    [start_cursor, start_cursor + local_batch):

    {"start": the start cursor, "images": uint8 [k, S, S, 3], "tokens": int32 [k, L],
     "indices": int64 [k] (record of each row in its source), "sources": int32 [k], "cursors": int64 [k]
     (cursor of each row), "skipped_cursors": int64 [m], "skipped_reasons": int32 [m]
     (index into decode.REASONS)}, k + m = local_batch.
    """
    sources: tuple  # of SourceFiles
    seed: int
    local_batch: int
    process_index: int
    process_count: int
    image_size: int
    context_length: int
    crop_scale: tuple

    def __call__(self, start_cursor):
        cursors = np.arange(start_cursor, start_cursor + self.local_batch, dtype=np.int64)
        positions = sampling.global_positions(cursors, self.local_batch, self.process_index,
                                              self.process_count)
        source_ids, source_positions = sampling.mixture_sources(
            positions, [source.weight for source in self.sources], self.seed)
        record_ids = np.empty_like(positions)
        serialized = [None] * len(positions)
        for source_id, source in enumerate(self.sources):
            rows = np.flatnonzero(source_ids == source_id)
            if not len(rows):
                continue
            record_ids[rows], _ = sampling.record_indices(source_positions[rows],
                                                          source.num_records, source.seed)
            fetched = _open(source.paths).__getitems__(record_ids[rows].tolist())
            for row, record in zip(rows.tolist(), fetched):
                serialized[row] = record
        draws = sampling.uniforms(self.seed, positions, augment.CROP_DRAWS + 1)
        images, captions, kept, skipped, reasons = [], [], [], [], []
        draft = augment.draft_size(self.image_size, self.crop_scale[0])
        for row, record in enumerate(serialized):
            source = self.sources[source_ids[row]]
            try:
                image, caption = _example(record, draws[row], source, self.image_size,
                                          self.crop_scale, draft)
            except decode.Skipped as error:
                skipped.append(row)
                reasons.append(decode.REASONS.index(error.reason))
                continue
            images.append(image)
            captions.append(caption)
            kept.append(row)
        size = self.image_size
        return {
            "start": np.int64(start_cursor),
            "images": (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)),
            "tokens": tokenizer.tokenize(captions, self.context_length) if captions
            else np.zeros((0, self.context_length), np.int32),
            "indices": record_ids[kept],
            "sources": source_ids[kept].astype(np.int32),
            "cursors": cursors[kept],
            "skipped_cursors": cursors[skipped],
            "skipped_reasons": np.asarray(reasons, np.int32),
        }


@functools.lru_cache(maxsize=None)
def _open(paths):
    """Each process opens each source's files once."""
    return records.open_files(paths)


def _example(record, draws, source, image_size, crop_scale, draft):
    """(uint8 pixels, caption) of one serialized record; raises decode.Skipped."""
    example = records.parse_example(record)
    caption = choose_caption(records.record_field(example, source.caption_key), draws[-1])
    image = decode.open_rgb(records.single_value(records.record_field(example, source.image_key)),
                            min_size=draft)
    return augment.random_resized_crop(image, image_size, draws[:-1], crop_scale), caption


def choose_caption(captions, draw):
    """One caption of a feature holding one or several (e.g. coco_captions' five):
    `draw` in [0, 1) picks it, so the choice is seeded per sample."""
    if not captions:
        raise decode.Skipped(decode.MISSING_CAPTION)
    return decode.decode_caption(captions[int(draw * len(captions))])
