"""Class names and prompt templates for zero-shot classification, per TFDS dataset.

The names and templates are CLIP's (openai/CLIP), shipped as package data in
clip_jax/assets/zeroshot/<dataset>.json and written by
tools/make_zeroshot_assets.py, which puts class_names[i] at TFDS label i.
"""

import dataclasses
import functools
import importlib.resources
import json
from typing import Callable

from clip_jax.data import synthetic_shapes

_ASSETS = "assets/zeroshot"

# Datasets labelled with another dataset's classes in the same order: one file serves both.
_ALIASES = {
    "imagenet_v2": "imagenet2012",
    "imagenet_sketch": "imagenet2012",
}


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
    class_names: tuple
    templates: tuple
    # Applied to each filled-in prompt, e.g. to fix "a orange" -> "an orange".
    edit_prompt: Callable[[str], str] = lambda prompt: prompt
    source: str = ""

    def prompts(self):
        """Every prompt, class-major: [class 0 template 0, class 0 template 1, ...]."""
        return [self.edit_prompt(template.format(name))
                for name in self.class_names for template in self.templates]


# Built in code: the classes come from the dataset's own module, not a file.
_SYNTHETIC_SHAPES = ZeroShotTask(
    class_names=tuple(synthetic_shapes.CLASS_NAMES),
    templates=("a {}.", "a photo of a {}.", "there is a {}.", "a picture of a {}.",
               "an image of a {}."),
    edit_prompt=synthetic_shapes.with_articles,
    source="clip_jax.data.synthetic_shapes",
)


# The built-in datasets (both caption variants have the same images and classes).
_BUILT_IN = {"synthetic_shapes": _SYNTHETIC_SHAPES, "synthetic_shapes_alt_text": _SYNTHETIC_SHAPES}


# For datasets without shipped prompts: CLIP's default single prompt (paper, 3.1.4).
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def task_from_label_names(names, source):
    """A task for a dataset that names its own classes (TFDS ClassLabel names such
    as 'golden_retriever'): names made readable, the default template."""
    return ZeroShotTask(class_names=tuple(name.replace("_", " ") for name in names),
                        templates=DEFAULT_TEMPLATES, source=source)


def _asset_dir():
    return importlib.resources.files("clip_jax") / _ASSETS


@functools.cache
def known_datasets() -> tuple[str, ...]:
    """Every dataset name zeroshot_task accepts, sorted."""
    files = [entry.name.removesuffix(".json") for entry in _asset_dir().iterdir()
             if entry.name.endswith(".json")]
    return tuple(sorted({*files, *_ALIASES, *_BUILT_IN}))


@functools.cache
def zeroshot_task(dataset: str) -> ZeroShotTask:
    """The class names (in TFDS label order) and prompt templates of `dataset`."""
    if dataset in _BUILT_IN:
        return _BUILT_IN[dataset]
    if dataset in _ALIASES:
        return zeroshot_task(_ALIASES[dataset])  # the very same (cached) object
    if dataset not in known_datasets():
        raise ValueError(f"no class names/templates for {dataset!r}; "
                         f"known: {', '.join(known_datasets())}")
    data = json.loads((_asset_dir() / f"{dataset}.json").read_text(encoding="utf-8"))
    return ZeroShotTask(class_names=tuple(data["class_names"]),
                        templates=tuple(data["templates"]), source=data["source"])
