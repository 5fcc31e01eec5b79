"""clip_jax: CLIP (contrastive language-image pre-training) in JAX/Flax.

  clip = clip_jax.load("/tmp/clip_tiny")          # a workdir, or (name, weights file)
  probabilities = clip.classify(images, ["cat", "dog"])

  model = clip_jax.create_model("ViT-B-32")
  variables = clip_jax.convert.from_torch("ViT-B-32.pt", "ViT-B-32")
  image_embeddings = model.apply(variables, images, method=model.encode_image)
  text_embeddings = model.apply(variables, clip_jax.tokenize(texts), method=model.encode_text)
"""

from clip_jax import convert
from clip_jax.models.zoo import MODEL_NAMES, create_model
from clip_jax.tokenizer import tokenize

__all__ = ["MODEL_NAMES", "convert", "create_model", "load", "tokenize"]


def load(model_or_workdir, weights=None):
    """clip_jax.pretrained.load, imported on first use (it brings orbax and the
    trainer's set-up, which `import clip_jax` should not pay for)."""
    from clip_jax import pretrained  # noqa: PLC0415
    return pretrained.load(model_or_workdir, weights)
