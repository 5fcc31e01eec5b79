"""`create_model(name)`: the flax Module of a named architecture (models/zoo.py),
a CLIP or, for the coca_* names, a CoCa."""

from clip_jax.models import zoo
from clip_jax.models.clip import CLIP
from clip_jax.models.coca import CoCa


def create_model(name: str, **overrides):
    """The flax Module of a preset; `overrides` set top-level model keys (e.g. dtype)."""
    config = zoo.model_config(name)
    config.lock()  # a misspelt override raises instead of adding a key
    config.update(overrides)
    return (CoCa if "decoder" in config else CLIP)(config)
