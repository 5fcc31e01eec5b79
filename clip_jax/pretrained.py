"""Trained or released CLIP weights, ready to use: for notebooks and the evaluate CLI.

  clip = clip_jax.load("/tmp/clip_tiny")                     # a training workdir
  clip = clip_jax.load("ViT-B-32-quickgelu", "ViT-B-32.pt")  # released weights
  probabilities = clip.classify(images, ["cat", "dog"])      # PIL images or uint8 arrays
  captions = clip.caption(images)                            # CoCa models
"""

import dataclasses

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from clip_jax import (captioning, checkpoint, convert, objectives, run_config, sharding,
                      sharding_rules)
from clip_jax import variables as variables_lib
from clip_jax.data import augment
from clip_jax.evals.encoders import Encoders
from clip_jax.evals.prompts import DEFAULT_TEMPLATES, ZeroShotTask
from clip_jax.models import zoo


def released_config(model_name):
    """The config that loading released weights of a zoo architecture needs:
    its objective (CLIP's, or CoCa's for the coca_* names), the architecture, a
    data-parallel mesh and the default sharding rules."""
    model = zoo.model_config(model_name)
    return ml_collections.ConfigDict(dict(
        objective="coca" if "decoder" in model else "contrastive", model=model,
        mesh=dict(dcn_data=1, data=-1, fsdp=1, tensor=1), sharding_rules=sharding_rules.DEFAULT_RULES,
        data=dict(data_dir=ml_collections.FieldReference(None, field_type=str)), evals={}))


def _evaluation_mesh(config):
    """The run's mesh when it fits these devices, else pure data parallel."""
    try:
        return sharding.make_mesh(config.mesh)
    except ValueError:
        return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def load_model(config, weights, mesh=None):
    """(model, mesh, variables placed per the config's sharding rules, shardings):
    the objective's model and its variables only (no optimizer state), on `mesh`
    (default: the run's mesh where it fits these devices, else data parallel)."""
    mesh = mesh or _evaluation_mesh(config)
    model = objectives.get(config.objective).model(config.model)
    shardings = variables_lib.variable_shardings(model, mesh, config.sharding_rules)
    abstract = variables_lib.with_shardings(variables_lib.abstract_variables(model), shardings)
    if epath.Path(weights).is_dir():  # a workdir or a clip_jax.convert output
        variables = checkpoint.load_variables(weights, abstract)
    else:
        variables = jax.device_put(convert.from_torch(weights, config.model), shardings)
    return model, mesh, variables, shardings


@dataclasses.dataclass
class Pretrained:
    """A model with its variables on this machine's devices."""
    model: object  # the objective's model, e.g. clip_jax.models.CLIP
    variables: dict
    encoders: Encoders

    @property
    def image_size(self):
        return self.encoders.image_size

    def preprocess(self, images):
        """PIL images or uint8 [H, W, 3] arrays -> uint8 [N, S, S, 3]: the evaluation
        transform (shorter side to S, centre crop)."""
        return np.stack([augment.resize_centre_crop(
            (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
            .convert("RGB"), self.image_size) for image in images])

    def encode_images(self, images):
        """Unit image embeddings [N, E] (numpy) of PIL images or uint8 arrays."""
        return self.encoders.images(self.variables, self.preprocess(images))

    def _require_text_tower(self, method):
        objective = objectives.of_model(self.model)
        if not objective.text_embeddings:
            raise ValueError(f"{method} needs a text tower; this model was trained with "
                             f"config.objective={objective.name!r} (its zero-shot accuracy: "
                             "python -m clip_jax.evaluate --workdir ...)")

    def encode_texts(self, texts):
        """Unit text embeddings [N, E] (numpy) of strings (contrastive models)."""
        self._require_text_tower("encode_texts")
        return self.encoders.texts(self.variables, texts)

    def classify(self, images, class_names, templates=DEFAULT_TEMPLATES):
        """Zero-shot class probabilities [N, C]: softmax over the learned-temperature
        cosine similarities to each class's prompt ensemble (contrastive models)."""
        self._require_text_tower("classify")
        classes = self.encoders.classes(self.variables,
                                        ZeroShotTask(tuple(class_names), tuple(templates)))
        scale = float(self.model.apply(self.variables, method=self.model.temperature_scale))
        logits = scale * self.encode_images(images) @ classes.T
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        return probabilities / probabilities.sum(axis=1, keepdims=True)


    def caption(self, images, max_len=20, beams=1):
        """Captions (strings) of PIL images or uint8 arrays (CoCa models:
        clip_jax.captioning): greedy, or the best of `beams` beams."""
        objective = objectives.of_model(self.model)
        if objective.name != "coca":
            raise ValueError(f"caption needs a CoCa model; this one was trained with "
                             f"config.objective={objective.name!r}")
        return captioning.captions(self.model, self.variables, self.preprocess(images), max_len,
                                   beams)


def load(model_or_workdir, weights=None, image_size=None):
    """A Pretrained from a training workdir (its latest checkpoint), or from a zoo
    architecture name and its weights (PyTorch/safetensors file or clip_jax.convert
    directory). image_size: encode images at this size instead of the model's (a
    ViT resamples its positional embeddings, e.g. ViT-L-14 weights at 336)."""
    if weights is None:
        config, weights = run_config.read(model_or_workdir), model_or_workdir
    else:
        config = released_config(model_or_workdir)
    model, mesh, variables, shardings = load_model(config, weights)
    if image_size and model.config.image.kind != "vit":
        raise ValueError(f"image_size={image_size}: only a ViT runs at another size than "
                         f"its {model.config.image.image_size}")
    return Pretrained(model, variables, Encoders(model, mesh, shardings, image_size))
