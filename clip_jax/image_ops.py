"""Image normalisation with the statistics every CLIP checkpoint expects."""

import jax.numpy as jnp

# OpenAI CLIP's per-channel RGB mean and std (of its training images, in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images_uint8):
    """uint8 RGB [..., H, W, 3] -> float32 CLIP-normalised images of the same shape."""
    images = images_uint8.astype(jnp.float32) / 255.0
    return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
