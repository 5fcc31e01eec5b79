"""Zero-shot class names and templates: every dataset loads, counts match TFDS, and the
JSON files really ship with the package."""

import collections
import configparser
import fnmatch
import importlib.resources
import pathlib

import pytest
import tensorflow_datasets as tfds

from clip_jax.data import synthetic_shapes
from clip_jax.evals import prompts

ALIASES = ("imagenet_v2", "imagenet_sketch")
BUILT_IN = ("synthetic_shapes", "synthetic_shapes_alt_text")  # prompts in code, not files
FILE_DATASETS = [d for d in prompts.known_datasets() if d not in (*ALIASES, *BUILT_IN)]
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tfds_labels(tmp_path_factory):
    """dataset -> its TFDS label feature, from builder info alone (nothing downloaded)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    return lambda dataset: tfds.builder(dataset, data_dir=data_dir).info.features["label"]


@pytest.mark.parametrize("dataset", prompts.known_datasets())
def test_every_known_dataset_loads(dataset):
    task = prompts.zeroshot_task(dataset)
    assert task.class_names and task.templates
    assert all(isinstance(name, str) and name for name in task.class_names)
    # A template with no "{}" would give every class the same prompt.
    assert all(template.count("{}") == 1 for template in task.templates)
    assert prompts.zeroshot_task(dataset) is task  # cached


@pytest.mark.parametrize("dataset", FILE_DATASETS)
def test_one_name_per_tfds_label(dataset, tfds_labels):
    task = prompts.zeroshot_task(dataset)
    assert len(task.class_names) == tfds_labels(dataset).num_classes
    assert task.source.startswith("https://github.com/openai/CLIP ")
    if dataset != "imagenet2012":  # see test_imagenet2012
        assert len(set(task.class_names)) == len(task.class_names)


def test_imagenet2012():
    task = prompts.zeroshot_task("imagenet2012")
    assert len(task.class_names) == 1000
    assert len(task.templates) == len(set(task.templates)) == 80
    assert task.class_names[:2] == ("tench", "goldfish")
    assert task.class_names[-1] == "toilet paper"
    # CLIP's published list names two pairs of WordNet classes alike (missile/projectile,
    # sunglass/sunglasses); kept as published so that CLIP's accuracies reproduce.
    repeated = {name: count for name, count in collections.Counter(task.class_names).items()
                if count > 1}
    assert repeated == {"missile": 2, "sunglasses": 2}


def test_label_order_spot_checks():
    """Datasets whose CLIP list is in another order than TFDS's labels."""
    names = {d: prompts.zeroshot_task(d).class_names for d in
             ("cifar10", "cifar100", "caltech101", "oxford_iiit_pet", "eurosat", "food101")}
    assert names["cifar10"][0] == "airplane" and names["cifar10"][-1] == "truck"
    assert len(names["cifar10"]) == 10 and len(names["cifar100"]) == 100
    assert names["cifar100"][:2] == ("apple", "aquarium fish")
    # TFDS: accordion, airplanes, anchor, ant, background_google, ... faces, faces_easy
    assert names["caltech101"][:5] == ("accordion", "airplane", "anchor", "ant", "background")
    assert names["caltech101"][37:39] == ("off-center face", "centered face")
    # TFDS: Abyssinian, american_bulldog, ...; CLIP lists the cats first.
    assert names["oxford_iiit_pet"][:2] == ("Abyssinian", "american bulldog")
    # TFDS: AnnualCrop, Forest, HerbaceousVegetation, ...
    assert names["eurosat"][:3] == ("annual crop land", "forest", "brushland or shrubland")
    # TFDS: ..., ceviche, cheesecake, cheese_plate, ...
    assert names["food101"][16:18] == ("cheesecake", "cheese plate")


def test_aliases_share_imagenet2012(tfds_labels):
    imagenet = prompts.zeroshot_task("imagenet2012")
    for alias in ALIASES:
        assert prompts.zeroshot_task(alias) is imagenet
        # Same WordNet ids in the same order, so the same class names apply.
        assert tfds_labels(alias).names == tfds_labels("imagenet2012").names


def test_synthetic_shapes():
    task = prompts.zeroshot_task("synthetic_shapes")
    assert task.class_names == tuple(synthetic_shapes.CLASS_NAMES)
    assert task.edit_prompt("a photo of a orange circle.") == "a photo of an orange circle."


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ValueError) as error:
        prompts.zeroshot_task("imagenet_a")
    message = str(error.value)
    assert "\n" not in message and "'imagenet_a'" in message
    assert all(dataset in message for dataset in prompts.known_datasets())


def test_known_datasets_sorted_with_aliases():
    known = prompts.known_datasets()
    assert list(known) == sorted(known)
    assert {*ALIASES, *BUILT_IN, "imagenet2012", "cifar10"} <= set(known)


def test_json_files_are_package_data():
    """The files are found as package resources and setup.cfg ships them."""
    packaged = importlib.resources.files("clip_jax") / "assets/zeroshot"
    assert sorted(entry.name for entry in packaged.iterdir() if entry.name.endswith(".json")) \
        == sorted(f"{dataset}.json" for dataset in FILE_DATASETS)

    # setuptools globs [options.package_data] patterns relative to the package directory.
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in setup["options.package_data"]["clip_jax"].split(",")]
    for dataset in FILE_DATASETS:
        path = f"assets/zeroshot/{dataset}.json"
        assert any(fnmatch.fnmatch(path, p) and p.count("/") == path.count("/")
                   for p in patterns), f"{path} is not in setup.cfg's package_data"
