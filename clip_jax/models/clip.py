"""The two-tower CLIP model: image and text encoders, linear projections into a
shared space, and a learned temperature (Radford et al. 2021, Figure 3).

The text tower is CLIP's Transformer or, for the objective study (paper §2.3,
Figure 2), a bag of words (config.model.text_encoder)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clip_jax.models.bag_of_words import BagOfWordsText
from clip_jax.models.image_towers import image_tower
from clip_jax.models.text import TextTransformer


def l2_normalize(x, eps=1e-12):
    """Rows of x scaled to unit L2 norm; [N, D] -> [N, D]."""
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


# Tower name (as in `locked`, config.lock_image/lock_text) -> its parameter subtree.
TOWER_PARAMS = {"image": "visual", "text": "text"}


def _transformer_text(cfg, dtype):
    text = cfg.text
    return TextTransformer(
        context_length=text.context_length, vocab_size=text.vocab_size, width=text.width,
        layers=text.layers, heads=text.heads, embed_dim=cfg.embed_dim,
        activation=cfg.activation, mlp_ratio=text.mlp_ratio, dtype=dtype,
        scan_layers=cfg.scan_layers, remat=cfg.remat, layer_loop=cfg.get("layer_loop", "auto"),
        attention=cfg.get("attention", "xla"),
        embed_cls=text.get("embed_cls", False), cls_mask=text.get("cls_mask", "legacy"),
        name="text")


def _bag_of_words_text(cfg, dtype):
    del dtype  # an embedding mean and one matmul: float32 throughout
    return BagOfWordsText(vocab_size=cfg.text.vocab_size, width=cfg.text.width,
                          embed_dim=cfg.embed_dim, name="text")


# config.model.text_encoder -> builder of the text tower (params `text`).
TEXT_TOWERS = {"transformer": _transformer_text, "bag_of_words": _bag_of_words_text}


def text_tower_builder(name):
    """The builder of config.model.text_encoder `name`."""
    if name not in TEXT_TOWERS:
        raise ValueError(f"config.model.text_encoder={name!r} is unknown; "
                         f"choose one of {', '.join(TEXT_TOWERS)}")
    return TEXT_TOWERS[name]


class CLIP(nn.Module):
    """`__call__(images [B,H,W,3], tokens [B,L])` -> (image [B,E], text [B,E] unit
    embeddings, logit_scale scalar, logit_bias scalar or None); `encode_image` /
    `encode_text` give the unnormalised projected embeddings [B, E].

    The learned bias exists only when config.logit_bias_init is set (SigLIP's
    sigmoid loss needs it; CLIP's softmax is invariant to it).

    `locked` towers ("image" and/or "text") run in inference mode (BatchNorm uses
    its running statistics) and pass no gradient back, as in LiT (Zhai et al.
    2022); the optimizer must also leave their parameters alone
    (optim.make_optimizer's `frozen`)."""

    config: ml_collections.ConfigDict  # config.model
    locked: tuple = ()

    def setup(self):
        cfg = self.config
        self.visual = image_tower(cfg)
        self.text = text_tower_builder(cfg.text_encoder)(cfg, jnp.dtype(cfg.dtype))
        # Stored as log(1/temperature) so the update is scale-free; init 1/0.07.
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_scale_init), ()), ())
        self.logit_bias = None if cfg.logit_bias_init is None else self.param(
            "logit_bias",
            nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_bias_init), ()), ())

    def encode_image(self, images, train=False, patch_keep=None):
        """`train` only matters for BatchNorm towers (batch statistics vs running);
        `patch_keep` [B, K]: the patches a ViT keeps (patch dropout), None: all."""
        return self.visual(images, train=train, patch_keep=patch_keep)

    def encode_text(self, tokens):
        return self.text(tokens)

    def temperature_scale(self):
        """exp(logit_scale), clipped at logit_scale_max (100) as in the paper."""
        return jnp.exp(jnp.minimum(self.logit_scale, jnp.log(self.config.logit_scale_max)))

    def embed(self, images, tokens, train=False, patch_keep=None):
        """(image [B,E], text [B,E]) unit embeddings: the per-example part of `__call__`."""
        image_embeddings = self.encode_image(images, train and "image" not in self.locked,
                                             patch_keep)
        text_embeddings = self.encode_text(tokens)
        # Nothing flows into a locked tower, so XLA drops its backward pass entirely.
        if "image" in self.locked:
            image_embeddings = jax.lax.stop_gradient(image_embeddings)
        if "text" in self.locked:
            text_embeddings = jax.lax.stop_gradient(text_embeddings)
        return l2_normalize(image_embeddings), l2_normalize(text_embeddings)

    def logit_params(self):
        """(temperature_scale scalar, logit_bias scalar or None): the batch-free part."""
        return self.temperature_scale(), self.logit_bias

    def __call__(self, images, tokens, train=False, patch_keep=None):
        return (*self.embed(images, tokens, train, patch_keep), *self.logit_params())

