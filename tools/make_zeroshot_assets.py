"""Writes clip_jax/assets/zeroshot/<tfds name>.json from OpenAI's CLIP repository.

    git clone https://github.com/openai/CLIP /tmp/CLIP
    python tools/make_zeroshot_assets.py --clip_repo /tmp/CLIP

Class names and templates are CLIP's own (data/prompts.md, and for ImageNet
notebooks/Prompt_Engineering_for_ImageNet.ipynb), read at the checkout's HEAD
commit, which each JSON's "source" records.

What this script guarantees is the ORDER: class_names[i] must be the name of
TFDS label i, and CLIP's lists do not always follow TFDS (Caltech101 puts the
capitalised folders first, OxfordPets cats first, EuroSAT has its own order,
Food101 and SUN397 swap a pair each). Every TFDS name is matched to exactly one
CLIP name, by normalised spelling or through the explicit RENAMES below, and the
JSON lists CLIP's names in TFDS label order. The TFDS names come from the
installed tensorflow_datasets (builder info; no download).

A few TFDS builders only learn their names from the downloaded archive
(ClassLabel(num_classes=...)), so offline TFDS shows "0".."9". For those the
label order is the archive's own, which TFDS keeps (label i = line i of the
archive's names file, or the digit/binary label itself); ARCHIVE_NAMES below
states it and CLIP's list is checked against it.
"""

import argparse
import ast
import json
import os
import re
import subprocess
import tempfile

import tensorflow_datasets as tfds

REPO_URL = "https://github.com/openai/CLIP"

# TFDS name -> the data/prompts.md section with its classes and templates.
PROMPTS_MD_SECTIONS = {
    "caltech101": "Caltech101",
    "cars196": "StanfordCars",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "dtd": "DescribableTextures",
    "eurosat": "EuroSAT",
    "food101": "Food101",
    "mnist": "MNIST",
    "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "OxfordPets",
    "patch_camelyon": "PatchCamelyon",
    "resisc45": "RESISC45",
    "stl10": "STL10",
    "sun397": "SUN397",
}

# TFDS name -> CLIP's name, where the two do not normalise to the same words.
RENAMES = {
    "caltech101": {
        "background_google": "background", "faces": "off-center face",
        "faces_easy": "centered face", "leopards": "leopard", "motorbikes": "motorbike",
        "airplanes": "airplane", "car_side": "side of a car",
        "cougar_body": "body of a cougar cat", "cougar_face": "face of a cougar cat",
        "crocodile_head": "head of a  crocodile",  # sic: CLIP's double space
        "flamingo_head": "head of a flamingo", "snoopy": "snoopy (cartoon beagle)",
        "yin_yang": "yin and yang symbol",
    },
    # CLIP's EuroSAT names describe the land use rather than spell the folder names.
    "eurosat": {
        "AnnualCrop": "annual crop land", "Forest": "forest",
        "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
        "Industrial": "industrial buildings or commercial buildings",
        "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
        "Residential": "residential buildings or homes or apartments", "River": "river",
        "SeaLake": "lake or sea",
    },
    "oxford_flowers102": {
        "globe-flower": "globe flower", "pink-yellow dahlia?": "pink and yellow dahlia",
        "ball moss": "air plant",  # ball moss is an air plant (Tillandsia)
    },
}

# Label order of the builders whose names TFDS reads from the downloaded archive.
ARCHIVE_NAMES = {
    # cifar-10-batches-bin/batches.meta.txt (also keras.datasets.cifar10's documented order).
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                "ship", "truck"],
    # stl10_binary/class_names.txt; TFDS subtracts 1 from the archive's 1-based labels.
    "stl10": ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
              "truck"],
    # The label is the digit itself.
    "mnist": [str(digit) for digit in range(10)],
    # TFDS: "a binary label indicating presence of metastatic tissue" (1 = tumour).
    "patch_camelyon": ["lymph node", "lymph node containing metastatic tumor tissue"],
}
# cifar-100-binary/fine_label_names.txt is in alphabetical order (apple, aquarium_fish, ...).
ALPHABETICAL_ARCHIVE_NAMES = {"cifar100"}
# TFDS's ImageNet labels are the sorted WordNet ids, i.e. the standard ILSVRC-2012 class
# index, which CLIP's list follows (google-research/big_vision pairs the same list with TFDS
# imagenet2012 labels). The names cannot be matched by spelling, so only the ids are checked.
WORDNET_ID_ORDER = {"imagenet2012"}


def git_show(repo, path):
    return subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], capture_output=True,
                          text=True, check=True).stdout


def python_list(text, name):
    """The literal list assigned to `name` in a code listing."""
    match = re.search(rf"^{name} = (\[.*?\])\s*$", text, re.S | re.M)
    return ast.literal_eval(match.group(1))


def prompts_md_sections(markdown):
    """{section title: (classes, templates)} of data/prompts.md."""
    sections = {}
    for match in re.finditer(r"^## (\S+)\n\n```bash\n(.*?)```", markdown, re.S | re.M):
        body = match.group(2)
        sections[match.group(1)] = python_list(body, "classes"), python_list(body, "templates")
    return sections


def imagenet_notebook(notebook):
    cells = json.loads(notebook)["cells"]
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    return python_list(code, "imagenet_classes"), python_list(code, "imagenet_templates")


def normalise(name):
    """'/a/apartment_building/outdoor', 'British_Shorthair' -> 'apartment building outdoor', ..."""
    name = re.sub(r"^/[a-z]/", "", name)  # SUN397's first-letter directory
    return re.sub(r"[_/]", " ", name).lower()


def in_tfds_order(dataset, clip_names, tfds_names):
    """CLIP's names reordered so that entry i names TFDS label i."""
    if dataset in ARCHIVE_NAMES:
        assert clip_names == ARCHIVE_NAMES[dataset], dataset
        return clip_names
    if dataset in WORDNET_ID_ORDER:
        assert tfds_names == sorted(tfds_names) and all(
            re.fullmatch(r"n\d{8}", n) for n in tfds_names), dataset
        return clip_names
    if dataset in ALPHABETICAL_ARCHIVE_NAMES:
        assert [n.replace(" ", "_") for n in clip_names] == sorted(
            n.replace(" ", "_") for n in clip_names), dataset
        return clip_names
    renames = RENAMES.get(dataset, {})
    by_normalised = {normalise(name): name for name in clip_names}
    assert len(by_normalised) == len(clip_names), f"{dataset}: names collide when normalised"
    ordered = [renames[t] if t in renames else by_normalised[normalise(t)] for t in tfds_names]
    assert sorted(ordered) == sorted(clip_names), f"{dataset}: not a one-to-one match"
    return ordered


def tfds_label_names(dataset):
    # A throwaway data_dir: builder info needs none of the data.
    builder = tfds.builder(dataset, data_dir=tempfile.mkdtemp())
    return builder.info.features["label"].names, str(builder.info.version)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip_repo", required=True, help="a checkout (or bare clone) of "
                        f"{REPO_URL}")
    parser.add_argument("--out", default=os.path.normpath(os.path.join(
        os.path.dirname(os.path.abspath(__file__)), os.pardir, "clip_jax", "assets", "zeroshot")))
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", args.clip_repo, "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()

    tasks = {}
    names, templates = imagenet_notebook(
        git_show(args.clip_repo, "notebooks/Prompt_Engineering_for_ImageNet.ipynb"))
    tasks["imagenet2012"] = (names, templates,
                             "notebooks/Prompt_Engineering_for_ImageNet.ipynb "
                             "(imagenet_classes, imagenet_templates)")
    sections = prompts_md_sections(git_show(args.clip_repo, "data/prompts.md"))
    for dataset, section in PROMPTS_MD_SECTIONS.items():
        names, templates = sections[section]
        tasks[dataset] = names, templates, f"data/prompts.md, section {section}"

    os.makedirs(args.out, exist_ok=True)
    for dataset, (names, templates, where) in sorted(tasks.items()):
        tfds_names, version = tfds_label_names(dataset)
        assert len(names) == len(tfds_names), (dataset, len(names), len(tfds_names))
        ordered = in_tfds_order(dataset, names, tfds_names)
        assert all(t.count("{}") == 1 for t in templates), dataset
        order = ("CLIP's order" if ordered == names else "reordered from CLIP's order")
        source = (f"{REPO_URL} {where} at commit {commit}; class order: TFDS {dataset} "
                  f"{version} label order ({order})")
        path = os.path.join(args.out, f"{dataset}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"source": source, "class_names": ordered, "templates": templates}, f,
                      indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"{path}: {len(ordered)} classes, {len(templates)} templates, {order}")


if __name__ == "__main__":
    main()
