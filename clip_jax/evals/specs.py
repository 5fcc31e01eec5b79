"""config.evals entries and the evaluate CLI's specs: what to evaluate, on which data.

An entry names its kind and TFDS dataset; what it leaves empty (split, feature
keys, captions per image) comes from the dataset's row in DATASETS, or the
generic defaults for datasets not listed (e.g. ones made by clip_jax.data.prepare).
Metrics are named "<kind>/<dataset>/<metric>", e.g. zeroshot/cifar10/top1.
"""

import ml_collections


KINDS = ("zeroshot", "retrieval", "linear_probe")

_GENERIC = dict(split="test", train_split="train", image_key="image", label_key="label",
                caption_key="caption", captions_per_image=1)
# Splits and feature keys of TFDS catalogue datasets (from their TFDS catalogue pages).
DATASETS = {
    "synthetic_shapes": {},
    "synthetic_shapes_alt_text": {},
    "imagenet2012": dict(split="validation"),
    "imagenet_v2": dict(train_split=""),
    "imagenet_sketch": dict(train_split=""),
    "cifar10": {},
    "cifar100": {},
    "food101": dict(split="validation"),
    "oxford_iiit_pet": {},
    "caltech101": {},
    "oxford_flowers102": {},
    "stl10": {},
    "dtd": {},
    # The Karpathy 5k-image test split, five captions per image as in the CLIP paper.
    "coco_captions": dict(caption_key="captions/text", captions_per_image=5, label_key="",
                          train_split=""),
}


def evaluator_config(kind, dataset, **fields):
    """A config.evals entry; empty fields take the dataset's defaults.
    every: steps between runs in training; 0: config.eval_every; -1: only at the end.
    templates (zeroshot): prompt templates such as "a photo of a {}." instead of the
    dataset's own (clip_jax/evals/prompts.py)."""
    entry = ml_collections.ConfigDict(dict(
        kind=kind, dataset=dataset, split="", train_split="",
        data_dir=ml_collections.FieldReference(None, field_type=str),  # None: config.data's
        image_key="", label_key="", caption_key="", captions_per_image=0,
        batch_size=512, every=0, templates=()))
    entry.update(fields)
    return entry


def parse_spec(spec):
    """'kind:dataset[:split]' (the evaluate CLI's --evals) -> a config.evals entry."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"eval spec {spec!r} is not 'kind:dataset[:split]', "
                         "e.g. 'zeroshot:cifar10' or 'retrieval:coco_captions:test'")
    if parts[0] not in KINDS:
        raise ValueError(f"eval spec {spec!r}: unknown kind {parts[0]!r}; "
                         f"choose one of {', '.join(KINDS)}")
    return evaluator_config(parts[0], parts[1], **({"split": parts[2]} if len(parts) == 3 else {}))


def resolved(entry, default_data_dir=None):
    """The entry with every empty field filled from DATASETS / the generic defaults."""
    name = entry.dataset.split(":")[0]
    defaults = dict(_GENERIC, **DATASETS.get(name, {}))
    values = entry.to_dict()
    for key, default in defaults.items():
        if values[key] in ("", 0):
            values[key] = default
    values["data_dir"] = values["data_dir"] or default_data_dir
    values["templates"] = tuple(values.get("templates") or ())  # absent in older configs
    values["prefix"] = f"{entry.kind}/{name}"
    return values


def check_entry(key, entry, data_parallel):
    """One-line ValueError for an entry that cannot work (no data is read)."""
    where = f"config.evals.{key}"
    if entry.kind not in KINDS:
        raise ValueError(f"{where}.kind={entry.kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if entry.batch_size <= 0 or entry.batch_size % data_parallel:
        raise ValueError(f"{where}.batch_size={entry.batch_size} must be a positive multiple "
                         f"of the data-parallel size {data_parallel}")
    if entry.every < -1:
        raise ValueError(f"{where}.every={entry.every} must be >= -1")
    values = resolved(entry)
    if entry.kind in ("zeroshot", "linear_probe") and not values["label_key"]:
        raise ValueError(f"{where}: {entry.kind} needs a label_key")
    if entry.kind == "linear_probe" and not values["train_split"]:
        raise ValueError(f"{where}: linear_probe needs a train_split "
                         f"({values['dataset']} has no default one)")
    if entry.kind == "retrieval" and not values["caption_key"]:
        raise ValueError(f"{where}: retrieval needs a caption_key")
    if entry.kind != "zeroshot" and values["templates"]:
        raise ValueError(f"{where}.templates: only zeroshot evaluators take prompt templates")
    bad = [template for template in values["templates"] if template.count("{}") != 1]
    if bad:
        raise ValueError(f"{where}.templates: {bad[0]!r} must hold the class name as one '{{}}'")
