"""synthetic_shapes: a procedurally drawn image-caption dataset, built in.

Coloured shapes on dark, noisy backgrounds, captioned from varied templates
("a large red circle near the top", "there is a small blue star next to a tiny
green cross"). It needs no download, is deterministic, and is hard enough that
a CLIP must bind colour to shape to classify it zero-shot: 8 colours x 6 shapes
= 48 classes (chance 2.1%).

Splits: `train` (20,000 pairs; 30% with a smaller second object) and `test`
(2,000 held-out images from another seed stream, single objects only, so the
zero-shot label "<colour> <shape>" is unambiguous).

`synthetic_shapes_alt_text` has the same images and labels with captions made
noisier the way web alt-text is: boilerplate before or after the description
("stock photo: a red circle on the left royalty free") and some captions that
say nothing about the picture ("img 4821"). The objective study
(configs/objectives.py) trains on it.

This module draws and captions; `builtin_datasets` serves both as TFDS datasets.
"""

import math
import re

import numpy as np
from PIL import Image, ImageDraw

SEED = 20211
IMAGE_SIZE = 64
TRAIN_EXAMPLES = 20_000
TEST_EXAMPLES = 2_000

# Saturated, well-separated hues (and white) that stand out on a dark background.
COLOURS = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 20),
    "green": (30, 190, 40),
    "cyan": (20, 220, 230),
    "blue": (40, 80, 255),
    "purple": (150, 40, 220),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
CLASS_NAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

_TEMPLATES = (
    "a {size} {colour} {shape} {position}",
    "there is a {size} {colour} {shape}",
    "there is a {colour} {shape} {position}",
    "a photo of a {colour} {shape} {position}",
    "a photo of a {size} {colour} {shape}",
    "a {colour} {shape}",
    "an image of a {size} {colour} {shape} {position}",
    "a {colour} {shape} on a dark background",
    "a picture of a {size} {colour} {shape}",
    "{size} {colour} {shape} {position}",
    "the {colour} {shape} is {position}",
    "a drawing of a {colour} {shape}",
)
_SECOND_OBJECT = (" next to a small {colour} {shape}", " and a tiny {colour} {shape}",
                  " beside a little {colour} {shape}")
# Most BPE tokens here are one word each: 12 words (+ a full stop, start and end
# tokens) fit the 16-token text context of the CPU-sized model.
_MAX_WORDS = 12
_SIZE_WORDS = ((0.47, "small"), (0.58, "medium"), (1.0, "large"))  # upper bound of diameter


# synthetic_shapes_alt_text: each caption, with its own seed, gets a boilerplate
# prefix and/or suffix, or is replaced by an uninformative one ({number}: four digits).
_ALT_PREFIXES = ("stock photo:", "image:", "hd wallpaper -", "free download:", "new!")
_ALT_SUFFIXES = ("stock photo", "royalty free", "free download", "hd wallpaper",
                 "vector illustration", "clip art", "#art #design", "by jane doe", "| my blog",
                 "high resolution", "(2019)", "on sale now")
_ALT_UNINFORMATIVE = ("untitled", "img {number}", "dsc {number}", "image {number}",
                      "no description available", "click to enlarge")
ALT_PREFIX_PROB, ALT_SUFFIX_PROB, ALT_UNINFORMATIVE_PROB = 0.25, 0.5, 0.1


def with_articles(text):
    """'a orange circle' -> 'an orange circle' (captions and prompts alike)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def class_name(label):
    """'<colour> <shape>' of a class index."""
    return CLASS_NAMES[label]


def alt_text_caption(caption, rng):
    """`caption` as web alt-text: replaced by an uninformative one with probability
    ALT_UNINFORMATIVE_PROB, else with a boilerplate prefix and/or suffix."""
    if rng.uniform() < ALT_UNINFORMATIVE_PROB:
        return _ALT_UNINFORMATIVE[rng.integers(len(_ALT_UNINFORMATIVE))].format(
            number=f"{rng.integers(10_000):04d}")
    if rng.uniform() < ALT_PREFIX_PROB:
        caption = f"{_ALT_PREFIXES[rng.integers(len(_ALT_PREFIXES))]} {caption}"
    if rng.uniform() < ALT_SUFFIX_PROB:
        caption = f"{caption} {_ALT_SUFFIXES[rng.integers(len(_ALT_SUFFIXES))]}"
    return caption


def caption_vocabulary():
    """Phrases that hold every word a caption of either variant can contain (each
    word tokenizes alone, so their tokens are all the captions' tokens)."""
    def without_fields(template):
        return re.sub(r"\{\w+\}", " ", template)
    positions = {_position_words(x, y) for x in (0.1, 0.5, 0.9) for y in (0.1, 0.5, 0.9)}
    return [*map(without_fields, _TEMPLATES + _SECOND_OBJECT + _ALT_UNINFORMATIVE),
            *COLOURS, *SHAPES, *(word for _, word in _SIZE_WORDS), *positions, "an .",
            *_ALT_PREFIXES, *_ALT_SUFFIXES, " ".join("0123456789")]


def _colour_shape(label):
    """(colour, shape) words of a class index."""
    return list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]


def _shape_polygon(shape, cx, cy, r):
    """Vertices of `shape` centred at (cx, cy), fitting a box of half-side r (not circles)."""
    def ring(count, radius, offset_deg):
        return [(cx + radius * math.cos(math.radians(offset_deg + 360 * i / count)),
                 cy + radius * math.sin(math.radians(offset_deg + 360 * i / count)))
                for i in range(count)]
    if shape == "square":
        h = 0.85 * r  # a little under r: about the area of the circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return ring(4, r, -90)
    if shape == "triangle":  # equilateral, shifted down so it spans [cy - 0.95r, cy + 0.78r]
        return [(x, y + 0.2 * r) for x, y in ring(3, 1.15 * r, -90)]
    if shape == "star":
        outer, inner = ring(5, r, -90), ring(5, 0.42 * r, -54)
        return [point for pair in zip(outer, inner) for point in pair]
    if shape == "cross":
        t = 0.36 * r  # half arm thickness
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw(draw, shape, cx, cy, r, rgb):
    """Fills `shape` (centre (cx, cy), half-size r) on a PIL ImageDraw."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=rgb)


def _position_words(x, y):
    """Where (x, y) in [0, 1]^2 lies in a 3x3 grid, as words; None near a grid line,
    where any word could be argued with."""
    if min(abs(v - line) for v in (x, y) for line in (1 / 3, 2 / 3)) < 0.04:
        return None
    row = ("top", "middle", "bottom")[int(3 * y)]
    col = ("left", "centre", "right")[int(3 * x)]
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"near the {row}" if col == "centre" else f"in the {row} {col}"


def _size_word(diameter):
    """small/medium/large for a diameter (fraction of the side); None near a boundary."""
    if min(abs(diameter - bound) for bound, _ in _SIZE_WORDS[:-1]) < 0.015:
        return None
    return next(word for bound, word in _SIZE_WORDS if diameter < bound)


def draw_example(rng, image_size=IMAGE_SIZE, second_object_prob=0.0):
    """One example: {"image": uint8 [S, S, 3], "caption": str, "label": int}."""
    scale = 2  # draw at 2x and downsample: anti-aliased edges
    canvas = image_size * scale
    # Dark, nearly grey background: every object colour, white included, stands out.
    background = np.clip(rng.integers(0, 60) + rng.integers(-12, 13, size=3), 0, 255)
    image = Image.new("RGB", (canvas, canvas), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)

    def jitter(rgb):  # small enough that no hue drifts towards a neighbour's
        return tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-15, 16, 3), 0, 255))

    label = int(rng.integers(len(CLASS_NAMES)))
    colour, shape = _colour_shape(label)
    diameter = rng.uniform(0.35, 0.7)  # of the bounding box, as a fraction of the side
    r = diameter * canvas / 2
    cx, cy = rng.uniform(r, canvas - r, size=2)  # fully inside the image
    _draw(draw, shape, cx, cy, r, jitter(COLOURS[colour]))

    second = ""
    if rng.uniform() < second_object_prob:
        other = int(rng.integers(len(CLASS_NAMES) - 1))
        other += other >= label  # any class but the primary's
        colour2, shape2 = _colour_shape(other)
        r2 = rng.uniform(0.35, 0.5) * r
        # Of a few random spots, the one farthest from the primary: at most a small overlap.
        spots = rng.uniform(r2, canvas - r2, size=(16, 2))
        cx2, cy2 = spots[np.argmax(np.hypot(spots[:, 0] - cx, spots[:, 1] - cy))]
        _draw(draw, shape2, cx2, cy2, r2, jitter(COLOURS[colour2]))
        second = _SECOND_OBJECT[rng.integers(len(_SECOND_OBJECT))].format(
            colour=colour2, shape=shape2)

    words = dict(size=_size_word(diameter), colour=colour, shape=shape,
                 position=_position_words(cx / canvas, cy / canvas))
    # Only templates whose words are all true of this picture, and short captions.
    captions = [t.format(**words) + second for t in _TEMPLATES
                if all(f"{{{k}}}" not in t or v for k, v in words.items())]
    captions = [c for c in captions if len(c.split()) <= _MAX_WORDS]
    caption = captions[rng.integers(len(captions))]

    caption = with_articles(caption)
    if rng.uniform() < 0.5:  # zero-shot prompts end in a full stop; captions sometimes do
        caption += "."
    pixels = np.asarray(image.reduce(scale), dtype=np.int16)  # 2x2 box average
    # Mild per-pixel noise (std ~5); uniform integers are 5x cheaper to draw than normals.
    pixels = pixels + rng.integers(-8, 9, pixels.shape, dtype=np.int16)
    return {"image": np.clip(pixels, 0, 255).astype(np.uint8), "caption": caption, "label": label}
