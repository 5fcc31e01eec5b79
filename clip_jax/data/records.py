"""Serialized tf.train.Example records read without TensorFlow: the training
input's worker processes parse records with the Example schema that TFDS ships
(`tensorflow_datasets.proto`), which imports neither TensorFlow nor JAX, so a
worker costs about 100 MiB instead of the 600+ MiB of TensorFlow."""

from array_record.python import array_record_data_source
from tensorflow_datasets.proto import tf_example_pb2


def parse_example(serialized):
    """bytes -> the tf.train.Example message."""
    return tf_example_pb2.Example.FromString(serialized)


def record_field(example, key):
    """The values of feature `key` ('a/b' for nested features, as TFDS flattens
    them) of a parsed Example: a list of bytes or ints; None if absent."""
    if key not in example.features.feature:
        return None
    feature = example.features.feature[key]
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


def single_value(values):
    """The one value of a scalar feature; None when absent or empty."""
    return values[0] if values else None


def open_files(paths):
    """Random-access records of ArrayRecord files, in order (one split's shards)."""
    return array_record_data_source.ArrayRecordDataSource(list(paths))
