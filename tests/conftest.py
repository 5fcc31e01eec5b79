"""Test set-up: 8 fake CPU devices, so sharding tests run on any machine."""

import os

from clip_jax import cpu_devices

# Before JAX starts its backend; a process that chose its own device count (the
# multi-host workers) keeps it.
cpu_devices.request(8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from configs.clip import get_config  # noqa: E402


def small_config(**overrides):
    """The tiny config shrunk further for unit tests; overrides use dotted keys."""
    config = get_config("tiny")
    with config.unlocked():
        config.batch_size = 16
        config.model.image.update(image_size=16, patch_size=8, width=32, layers=2, heads=2)
        config.model.text.update(context_length=8, width=32, layers=2, heads=2)
        config.model.embed_dim = 16
        for entry in config.evals.values():
            entry.batch_size = 64
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[leaf] = value
    return config


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
    return small_config()
