"""clip_jax: CLIP (contrastive language-image pre-training) in JAX/Flax."""

from clip_jax.tokenizer import tokenize

__all__ = ["tokenize"]
