"""Preparation as an Apache Beam pipeline (`prepare --beam_pipeline_options=...`).

The same per-sample rules as the local path (`prepare.prepare_sample`, passed
in) run over the source files as a Beam pipeline, and TFDS's Beam writer
stores the kept samples as the same ArrayRecord dataset, in input order: on
the DirectRunner across a machine's cores, or on Dataflow, Spark or Flink
with the same command. Every sample seen, written and skipped (by reason) is
a Beam counter; TFDS hands the finished pipeline's result to the builder,
which reads the counters back for `prepare_report.json`.

Beam is the `beam` extra (`pip install -e '.[beam]'`); it is imported through
TFDS's lazy importer, so the local path never loads it.
"""

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils.lazy_imports_utils import apache_beam as beam

from clip_jax.data import decode

NAMESPACE = "clip_jax.prepare"
# Keys keep input order (TFDS sorts by key when shuffling is off): file, then sample.
_SAMPLE_BITS = 32


def pipeline_options(text):
    """TFDS's --beam_pipeline_options format ('runner=DirectRunner,direct_num_workers=2')
    -> Beam PipelineOptions."""
    flags = [f"--{option.strip()}" for option in text.split(",") if option.strip()]
    return beam.options.pipeline_options.PipelineOptions(flags=flags)


def store(name, version, data_dir, paths_by_split, *, features, read_samples, prepare_sample,
          beam_options):
    """Writes the dataset -> {split: {"seen", "written", "skipped": {reason: n},
    "not_utf8_recoded"}} from the pipeline's counters.

    read_samples(path) yields a file's sources.RawSample (or decode.Skipped for
    a broken-off shard); prepare_sample(raw) -> prepare.PreparedSample or
    decode.Skipped. Both must pickle (module functions or partials of them)."""
    splits = {split: _split_transform(split, paths, read_samples, prepare_sample)
              for split, paths in paths_by_split.items()}
    builder = _BeamBuilder(name=name, version=version, features=features, split_datasets=splits,
                           data_dir=data_dir, disable_shuffling=True)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(beam_options=pipeline_options(beam_options)))
    return {split: _split_counts(builder.counters, split) for split in paths_by_split}


def _split_transform(split, paths, read_samples, prepare_sample):
    """The split's PTransform: files -> (key, example) of the kept samples."""
    return (f"{split}: files" >> beam.Create(list(enumerate(paths)))
            | f"{split}: read" >> beam.FlatMap(_file_samples, read_samples=read_samples)
            # A file's samples spread over the workers, not one worker per file.
            | f"{split}: spread" >> beam.Reshuffle()
            | f"{split}: prepare" >> beam.FlatMap(_prepared, split=split,
                                                   prepare_sample=prepare_sample))


def _file_samples(indexed_path, *, read_samples):
    file_index, path = indexed_path
    for sample_index, raw in enumerate(read_samples(path)):
        yield (file_index << _SAMPLE_BITS) | sample_index, raw


def _prepared(keyed_raw, *, split, prepare_sample):
    key, raw = keyed_raw
    _count(split, "seen")
    outcome = prepare_sample(raw)
    if isinstance(outcome, decode.Skipped):
        _count(split, f"skipped/{outcome.reason}")
        return
    _count(split, "written")
    if outcome.caption_recoded:
        _count(split, "not_utf8_recoded")
    yield key, {"image": outcome.jpeg, "caption": outcome.caption, "key": outcome.key}


def _count(split, name):
    beam.metrics.Metrics.counter(NAMESPACE, f"{split}/{name}").inc()


def _split_counts(counters, split):
    prefix = f"{split}/"
    mine = {name[len(prefix):]: count for name, count in counters.items()
            if name.startswith(prefix)}
    return {"seen": mine.get("seen", 0), "written": mine.get("written", 0),
            "skipped": {name.removeprefix("skipped/"): count for name, count in sorted(mine.items())
                        if name.startswith("skipped/")},
            "not_utf8_recoded": mine.get("not_utf8_recoded", 0)}


class _BeamBuilder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
    """TFDS's ad-hoc builder, keeping the pipeline's clip_jax counters."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.counters = {}

    def _process_pipeline_result(self, pipeline_result):
        if pipeline_result is None:
            return
        query = pipeline_result.metrics().query(
            beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
        for counter in query["counters"]:  # one result per counter and pipeline step
            value = counter.committed if counter.committed is not None else counter.attempted
            name = counter.key.metric.name
            self.counters[name] = self.counters.get(name, 0) + value
