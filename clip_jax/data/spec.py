r"""Names of training data in a config, read without TensorFlow (config checks use it).

`config.data.train` names one prepared TFDS split, `name[:version]:split`, or a
weighted mixture of several joined by `+`, each with an optional weight after
`@` (default 1; weights are normalised) and optional feature keys of its own in
parentheses, for sources that store captions under another name:

    coco_captions:train@0.2(caption_key=captions/text) + my_web_data:train@0.8

Keys not given per source are `config.data.image_key` / `caption_key`.
"""

import dataclasses
import re

# Weights are kept as integers of this resolution, so source assignment is exact
# integer arithmetic (sampling.mixture_sources).
WEIGHT_RESOLUTION = 10**6
_KEYS = ("image_key", "caption_key")
_SOURCE = re.compile(r"\s*(?P<split>[^@()+\s]+)\s*(?:@\s*(?P<weight>[^()+\s]+))?\s*"
                     r"(?:\((?P<keys>[^()]*)\))?\s*")


@dataclasses.dataclass(frozen=True)
class Source:
    """One training source: a TFDS split, its share of the stream and its feature keys."""
    name: str  # 'name[:version]'
    split: str
    weight: int  # in units of 1 / WEIGHT_RESOLUTION before normalisation
    image_key: str
    caption_key: str

    @property
    def label(self):
        """'name:split', as metrics and checkpoints name the source."""
        return f"{self.name}:{self.split}"


def parse_split(spec):
    """'name[:version]:split' -> ('name[:version]', 'split')."""
    name, sep, split = spec.rpartition(":")
    if not sep or not name or not split:
        raise ValueError(f"{spec!r} is not 'name[:version]:split' (e.g. 'synthetic_shapes:train')")
    return name, split


def parse_train(spec, *, image_key, caption_key):
    """config.data.train -> a tuple of Source (one per mixture member, in order)."""
    sources = []
    for part in spec.split("+"):
        match = _SOURCE.fullmatch(part)
        if not match:
            raise ValueError(f"config.data.train: {part.strip()!r} is not "
                             "'name:split[@weight][(caption_key=...)]'")
        name, split = parse_split(match["split"])
        try:
            weight = float(match["weight"] or 1)
        except ValueError:
            raise ValueError(f"config.data.train: weight {match['weight']!r} of "
                             f"{match['split']!r} is not a number") from None
        if not 0 < weight < float("inf") or round(weight * WEIGHT_RESOLUTION) < 1:
            raise ValueError(f"config.data.train: weight {weight} of {match['split']!r} must be "
                             f"positive (at least {1 / WEIGHT_RESOLUTION})")
        keys = {"image_key": image_key, "caption_key": caption_key}
        for assignment in filter(None, (item.strip() for item in (match["keys"] or "").split(";"))):
            key, sep, value = (item.strip() for item in assignment.partition("="))
            if not sep or key not in _KEYS or not value:
                raise ValueError(f"config.data.train: {assignment!r} in {match['split']!r}: "
                                 f"expected {' or '.join(_KEYS)}=VALUE, ';'-separated")
            keys[key] = value
        sources.append(Source(name, split, round(weight * WEIGHT_RESOLUTION), **keys))
    labels = [source.label for source in sources]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config.data.train: a source is named twice in {spec!r}")
    return tuple(sources)
