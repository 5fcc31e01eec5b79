"""The config a training run wrote to its workdir, for everything that reads a
run afterwards (evaluation, loading for inference, weight conversion)."""

import json

import ml_collections
from etils import epath

from clip_jax import output_vocab
from clip_jax.evals import specs


def read(workdir):
    """WORKDIR/config.json as a ConfigDict, with the keys of later versions
    filled in for runs that predate them; a ValueError when there is none."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise ValueError(f"{workdir}: no config.json; is it a clip_jax training workdir?")
    values = json.loads(path.read_text())
    if "evals" not in values and "zeroshot" in values:  # workdirs from before config.evals
        old = values.pop("zeroshot")
        values["evals"] = {"zeroshot": specs.evaluator_config(
            "zeroshot", old["dataset"], split=old["split"], label_key=old["label_key"],
            batch_size=old["batch_size"]).to_dict()}
    # Workdirs from before config.objective trained CLIP with its Transformer text tower.
    values.setdefault("objective", "contrastive")
    values["model"].setdefault("text_encoder", "transformer")
    values.setdefault("phases", "")  # runs from before phases and patch dropout
    if values["model"]["image"].get("kind") == "vit":
        values["model"]["image"].setdefault("patch_dropout", 0.0)
    # Earlier runs named their output vocabulary; it is token ids now.
    vocab = values["model"].setdefault("output_vocab", "full")
    if isinstance(vocab, str) and vocab in output_vocab.NAMES:
        values["model"]["output_vocab"] = output_vocab.NAMES[vocab]()
    values["model"]["output_vocab"] = tuple(values["model"]["output_vocab"])
    return ml_collections.ConfigDict(values)
