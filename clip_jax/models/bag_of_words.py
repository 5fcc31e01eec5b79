"""Bag-of-words models of the CLIP paper's objective study (§2.3, Figure 2):
a text tower that ignores word order, and an image model that predicts a
caption's words.

Both read a caption's words w_1..w_n (models.tokens.word_mask: not the start,
end or padding tokens) and treat them as a multiset.
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clip_jax.models import output_classes
from clip_jax.models import tokens as token_layout
from clip_jax.models.image_towers import embed_images, image_tower
from clip_jax.models.partitioning import BATCH, POOLED, VOCAB, constrain
from clip_jax.models.transformer import TOKEN_TABLE, embed_tokens, normal, zeros


class BagOfWordsText(nn.Module):
    """Token ids [B, L] -> projected embeddings [B, embed_dim]: the mean of the
    embeddings of the caption's words, then a bias-free linear projection, as
    the CLIP tower it replaces. A row without words embeds to zero."""

    vocab_size: int
    width: int
    embed_dim: int

    @nn.compact
    def __call__(self, tokens):
        token_embedding = self.param("token_embedding", normal(0.02, TOKEN_TABLE),
                                     (self.vocab_size, self.width))
        words = token_layout.word_mask(tokens).astype(jnp.float32)  # [B, L]
        rows = embed_tokens(token_embedding, tokens, jnp.float32)  # [B, L, D]
        summed = constrain(jnp.einsum("bl,bld->bd", words, rows), POOLED)
        mean = summed / jnp.maximum(words.sum(axis=-1, keepdims=True), 1.0)  # [B, D]
        projection = self.param("text_projection", normal(self.width ** -0.5, ("embed", "joint")),
                                (self.width, self.embed_dim))
        return mean @ projection


class BagOfWordsPredictor(nn.Module):
    """The bow_predict model: `__call__(images [B,H,W,3], tokens)` -> logits
    [B, V] over the output vocabulary (output_classes.head_size classes), a linear
    head on the image embedding; `encode_image` gives the embedding [B, E].

    The tokens are not read (they are the loss's target); a locked image tower
    runs in inference mode and passes no gradient back, as in CLIP."""

    config: ml_collections.ConfigDict  # config.model
    locked: tuple = ()

    def setup(self):
        cfg = self.config
        self.visual = image_tower(cfg)
        # Zero-initialised, as classifier heads usually are: the first prediction is
        # uniform over the head's classes.
        self.bow_head = nn.Dense(
            output_classes.head_size(cfg.output_vocab, cfg.text.vocab_size),
            kernel_init=zeros(("joint", "vocab")), bias_init=zeros(("vocab",)))

    def encode_image(self, images, train=False, patch_keep=None):
        return self.visual(images, train=train, patch_keep=patch_keep)

    def word_logits(self, images, train=False, patch_keep=None):
        """Logits [B, V] of the caption's words given the images."""
        embeddings = embed_images(self.visual, images, train, "image" in self.locked,
                                  patch_keep)
        return constrain(self.bow_head(embeddings), (BATCH, VOCAB))

    def __call__(self, images, tokens=None, train=False, patch_keep=None):
        del tokens
        return self.word_logits(images, train, patch_keep)
