"""CLIP towers in Flax linen."""

from clip_jax.models.clip import CLIP, l2_normalize

__all__ = ["CLIP", "l2_normalize"]
