"""Robust decoding of web images and captions.

Web data is full of broken files. Everything decodable is decoded into what a
CLIP expects (8-bit RGB pixels, a non-empty str caption): grayscale, CMYK,
palette, RGBA (composited on white), 16-bit and float images are converted;
captions that are not UTF-8 are read as Windows-1252 / Latin-1. Everything else
raises `Skipped` with a short reason, which the callers count and report, so no
sample is ever dropped silently.

Used by the dataset preparation CLI (`clip_jax.data.prepare`) and by the training
input (`clip_jax.data.pipeline`), so both apply the same rules.
"""

import io

import numpy as np
from PIL import Image, ImageOps

# Reasons a sample is skipped (metric names: data/skipped/<reason>).
EMPTY_IMAGE = "empty_image"  # zero-byte file
CORRUPT_IMAGE = "corrupt_image"  # not an image, truncated, unreadable
IMAGE_TOO_LARGE = "image_too_large"  # more pixels than max_pixels after JPEG draft
MISSING_IMAGE = "missing_image"  # a caption without an image file
MISSING_CAPTION = "missing_caption"  # an image without a caption
EMPTY_CAPTION = "empty_caption"  # blank after stripping whitespace
# A tar shard unreadable from some point on (truncated download, bad block): the
# samples before it are kept, the rest of the shard is lost, counted once.
CORRUPT_SHARD = "corrupt_shard"
REASONS = (EMPTY_IMAGE, CORRUPT_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE, MISSING_CAPTION,
           EMPTY_CAPTION, CORRUPT_SHARD)

# PIL's own default bomb limit (~89 Mpixel, 1024 * 1024 * 1024 // 4 // 3). We apply it
# ourselves after JPEG draft mode, so a huge JPEG that decodes at 1/8 scale is kept.
DEFAULT_MAX_PIXELS = 89_478_485
# Our check replaces PIL's, which would reject at open time, before draft mode can
# shrink the decode; the limit is enforced in `open_rgb` for every image.
Image.MAX_IMAGE_PIXELS = None

# What PIL raises on malformed data, depending on the codec.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
                  MemoryError, Image.DecompressionBombError, ZeroDivisionError)


class Skipped(Exception):
    """A sample that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_rgb(encoded, *, min_size=None, max_pixels=DEFAULT_MAX_PIXELS, exif_transpose=False):
    """Encoded image bytes -> an 8-bit RGB PIL image.

    min_size: (width, height) the caller needs at least; JPEGs are then decoded at
    the smallest DCT scale (1/2, 1/4, 1/8) that still covers it, which is several
    times faster for big photos. exif_transpose: apply the EXIF orientation tag
    (costly per step; the preparation CLI bakes it in once).
    Raises Skipped(EMPTY_IMAGE | CORRUPT_IMAGE | IMAGE_TOO_LARGE).
    """
    if not encoded:
        raise Skipped(EMPTY_IMAGE)
    try:
        image = Image.open(io.BytesIO(encoded))
        if min_size is not None and image.format == "JPEG":
            image.draft("RGB", tuple(int(side) for side in min_size))
        width, height = image.size
        if width * height > max_pixels:
            raise Skipped(IMAGE_TOO_LARGE, f"{width}x{height}")
        image.load()
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Skipped:
        raise
    except _DECODE_ERRORS as error:
        raise Skipped(CORRUPT_IMAGE, f"{type(error).__name__}: {error}") from None


def _to_rgb(image):
    """Any PIL mode -> 8-bit RGB, keeping what the pixels mean."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # High bit depth grayscale: PIL's convert("L") clips at 255, so scale down.
        values = np.asarray(image, dtype=np.float64)
        peak = 1.0 if image.mode == "F" and values.max() <= 1.0 else (
            65535.0 if values.max() > 255 else 255.0)
        values = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(values, "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        # Transparent pixels have arbitrary colour underneath; show them on white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_caption(raw):
    """Caption bytes or str -> stripped str. Bytes that are not UTF-8 are read as
    Windows-1252 (most web alt text that is not UTF-8), else Latin-1, which
    accepts any byte. Raises Skipped(MISSING_CAPTION | EMPTY_CAPTION)."""
    if raw is None:
        raise Skipped(MISSING_CAPTION)
    if isinstance(raw, bytes):
        for encoding in ("utf-8-sig", "cp1252", "latin-1"):
            try:
                raw = raw.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
    caption = " ".join(raw.split())  # newlines and tabs from alt text become spaces
    if not caption:
        raise Skipped(EMPTY_CAPTION)
    return caption
