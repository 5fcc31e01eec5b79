"""clip_jax: CLIP (contrastive language-image pre-training) in JAX/Flax.

  clip = clip_jax.load("/tmp/clip_tiny")          # a workdir, or (name, weights file)
  probabilities = clip.classify(images, ["cat", "dog"])

  model = clip_jax.create_model("ViT-B-32")
  variables = clip_jax.convert.from_torch("ViT-B-32.pt", "ViT-B-32")
  image_embeddings = model.apply(variables, images, method=model.encode_image)
  text_embeddings = model.apply(variables, clip_jax.tokenize(texts), method=model.encode_text)

`import clip_jax` imports nothing heavy: each name below brings its module (and
JAX, Flax, orbax or TensorFlow with it) on first use, so that launchers and
config files pay only for what they touch.
"""

import importlib

from clip_jax import huge_pages

huge_pages.restart_with_huge_pages()  # `python -m clip_jax.train` etc. only

# Public name -> (module, attribute in it; None: the module itself).
_LAZY = {
    "MODEL_NAMES": ("clip_jax.models.zoo", "MODEL_NAMES"),
    "create_model": ("clip_jax.models.named", "create_model"),
    "convert": ("clip_jax.convert", None),
    "load": ("clip_jax.pretrained", "load"),
    "tokenize": ("clip_jax.tokenizer", "tokenize"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'clip_jax' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value
