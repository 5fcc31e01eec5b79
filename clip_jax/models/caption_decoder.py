"""The caption language model of the CLIP paper's objective study (§2.3,
Figure 2): a Transformer decoder that reads the image and predicts the caption
left to right.

Conditioning: the image embedding [B, E] (the same vector the contrastive and
bag-of-words objectives train) is mapped linearly to one prefix token ahead of
the caption, and the caption attends to it through the decoder's own causal
self-attention (a prefix LM, as in ClipCap and SimVLM). Cross-attention to the
image tower's patch features (VirTex, which the paper's caption model follows)
would give this objective more of the image than the other two get, and needs
the ViT to return its tokens; with the prefix all three objectives read the
same bottleneck, so the study compares objectives, not interfaces. One prefix
token carries the embedding whole when width >= embed_dim.

The decoder has the text tower's shape (config.model.text: width, layers,
heads, context length), as the paper's 63M-parameter caption Transformer has
CLIP's text encoder's.
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clip_jax.models import output_classes
from clip_jax.models.image_towers import embed_images, image_tower
from clip_jax.models.partitioning import BATCH, LENGTH, TOKENS, VOCAB, constrain
from clip_jax.models.transformer import (TOKEN_TABLE, LayerNorm, Transformer, embed_tokens,
                                        normal, zeros)


class CaptionDecoder(nn.Module):
    """(image embeddings [B, E], tokens [B, T]) -> next-token logits [B, T, V]:
    logits[:, j] predict tokens[:, j + 1] from the image and tokens[:, :j + 1].
    T may be shorter than context_length (zero-shot prompts are)."""

    context_length: int
    vocab_size: int  # of the input tokens
    output_size: int  # output classes (output_classes.head_size)
    width: int
    layers: int
    heads: int
    activation: str
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    layer_loop: str = "auto"  # see Transformer
    attention: str = "xla"  # models.transformer.ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, image_embeddings, tokens):
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"tokens of shape {tokens.shape} exceed "
                             f"context_length={self.context_length}")
        token_embedding = self.param("token_embedding", normal(0.02, TOKEN_TABLE),
                                     (self.vocab_size, self.width))
        positions = self.param("positional_embedding", normal(0.01, (None, "embed")),
                               (self.context_length, self.width))
        prefix = nn.Dense(self.width, name="image_prefix",
                          kernel_init=normal(image_embeddings.shape[-1] ** -0.5,
                                             ("joint", "embed")),
                          bias_init=zeros(("embed",)))(image_embeddings)  # [B, D]
        words = embed_tokens(token_embedding, tokens, self.dtype) + positions[:length]  # [B, T, D]
        x = constrain(jnp.concatenate([prefix[:, None], words], axis=1).astype(self.dtype),
                      TOKENS)  # [B, 1+T, D]
        x = Transformer(self.layers, self.heads, causal=True, activation=self.activation,
                        mlp_ratio=self.mlp_ratio, dtype=self.dtype, scan_layers=self.scan_layers,
                        remat=self.remat, layer_loop=self.layer_loop,
                        attention=self.attention, name="transformer")(x)
        # Output i + 1 has read the prefix and tokens[:, :i + 1]: it predicts token i + 1.
        x = LayerNorm(name="ln_final")(x[:, 1:]).astype(jnp.float32)  # [B, T, D]
        logits = nn.Dense(self.output_size, name="head",
                          kernel_init=normal(self.width ** -0.5, ("embed", "vocab")),
                          bias_init=zeros(("vocab",)))(x)
        return constrain(logits, (BATCH, LENGTH, VOCAB))


class CaptionModel(nn.Module):
    """The caption_lm model: `__call__(images [B,H,W,3], tokens [B,L])` ->
    next-token logits [B, L, V] (teacher forcing); `encode_image` gives the image
    embedding [B, E], `decode(image embeddings, tokens)` the logits from it.

    A locked image tower runs in inference mode and passes no gradient back."""

    config: ml_collections.ConfigDict  # config.model
    locked: tuple = ()

    def setup(self):
        cfg = self.config
        self.visual = image_tower(cfg)
        text = cfg.text
        self.decoder = CaptionDecoder(
            context_length=text.context_length, vocab_size=text.vocab_size,
            output_size=output_classes.head_size(cfg.output_vocab, text.vocab_size),
            width=text.width, layers=text.layers, heads=text.heads, activation=cfg.activation,
            mlp_ratio=text.mlp_ratio, dtype=jnp.dtype(cfg.dtype), scan_layers=cfg.scan_layers,
            remat=cfg.remat, layer_loop=cfg.get("layer_loop", "auto"),
            attention=cfg.get("attention", "xla"))

    def encode_image(self, images, train=False, patch_keep=None):
        return self.visual(images, train=train, patch_keep=patch_keep)

    def decode(self, image_embeddings, tokens):
        return self.decoder(image_embeddings, tokens)

    def __call__(self, images, tokens, train=False, patch_keep=None):
        embeddings = embed_images(self.visual, images, train, "image" in self.locked,
                                  patch_keep)
        return self.decoder(embeddings, tokens)
