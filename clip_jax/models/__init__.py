"""CLIP towers in Flax linen. The package imports no Flax itself: `zoo` (the
named architectures as configs) is read by config files and launchers, and the
names below load `models.clip` on first use."""

import importlib

_LAZY = {"CLIP": "clip_jax.models.clip", "l2_normalize": "clip_jax.models.clip"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'clip_jax.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
