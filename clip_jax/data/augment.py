"""Host-side image geometry: training crops and evaluation resizes, on PIL images.

Both end in one bicubic, antialiased PIL resize of a source box straight to the
output size (no intermediate image). Pixels stay uint8; CLIP's mean/std
normalisation happens on the device (`clip_jax.image_ops.normalize`).
"""

import math

import numpy as np
from PIL import Image

# RandomResizedCrop's aspect-ratio range (Inception / torchvision / OpenCLIP).
CROP_RATIO = (3 / 4, 4 / 3)


def draft_size(size, min_scale=1.0):
    """(w, h) a decoder may shrink a JPEG to (DCT scaling) and still give every
    crop of area >= min_scale of the image at least `size` pixels per side."""
    # The narrowest crop spans sqrt(min_scale * min ratio) of a side.
    side = math.ceil(size / math.sqrt(min_scale * min(CROP_RATIO)))
    return side, side


# Draws per sample that crop_box may use: up to 10 tries of 4 numbers.
CROP_DRAWS = 40


def crop_box(width, height, draws, scale):
    """torchvision's RandomResizedCrop box (left, top, right, bottom): area a
    uniform fraction `scale` of the image, log-uniform aspect ratio in
    CROP_RATIO, up to 10 tries, else the largest centred box within the ratios.
    draws: CROP_DRAWS uniforms in [0, 1) (see sampling.uniforms)."""
    area = width * height
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for area_draw, ratio_draw, left_draw, top_draw in np.reshape(draws, (-1, 4)).tolist():
        target_area = area * (scale[0] + (scale[1] - scale[0]) * area_draw)
        ratio = math.exp(low + (high - low) * ratio_draw)
        crop_w = round(math.sqrt(target_area * ratio))
        crop_h = round(math.sqrt(target_area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(left_draw * (width - crop_w + 1))
            top = int(top_draw * (height - crop_h + 1))
            return left, top, left + crop_w, top + crop_h
    ratio = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])
    crop_w, crop_h = (width, round(width / ratio)) if width / height < ratio else (
        round(height * ratio), height)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def random_resized_crop(image, size, draws, scale=(0.9, 1.0)):
    """PIL RGB image -> uint8 [size, size, 3]: a random crop (see crop_box) resized
    bicubically. scale=(1, 1) with a square image is a plain resize."""
    box = crop_box(image.width, image.height, draws, scale)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def resize_centre_crop(image, size):
    """PIL RGB image -> uint8 [size, size, 3]: shorter side resized to `size`, then
    the centre square (CLIP's evaluation transform), in one resize."""
    side = min(image.width, image.height)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    box = (left, top, left + side, top + side)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))
