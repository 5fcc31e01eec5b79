"""CoCa (Yu et al. 2022, "Contrastive Captioners"), as OpenCLIP defines it: a
CLIP whose image tower pools with learned queries and whose text tower pools
at an appended class token, plus a multimodal decoder that reads the caption's
unimodal token outputs, attends to the image tokens, and predicts the next
token (config.objective="coca", clip_jax/objectives/coca.py).

Parameters follow OpenCLIP's `CoCa` module by module (`visual` with
`attn_pool`, `text` with `cls_emb`, `decoder` for its `text_decoder`), so
clip_jax.convert maps its state dicts one tensor at a time.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clip_jax.models import output_classes
from clip_jax.models.clip import CLIP, l2_normalize
from clip_jax.models.partitioning import BATCH, LENGTH, TOKENS, VOCAB, constrain
from clip_jax.models.transformer import LayerNorm, normal, remat_block


class MultimodalDecoder(nn.Module):
    """(image tokens [B, N, width], caption token outputs [B, T, width]) ->
    next-token logits [B, T, output_size]: per layer a causal self-attention
    block (`resblocks_i`) then a cross-attention block on the image tokens
    (`cross_attn_i`), as OpenCLIP's MultimodalTransformer; final LayerNorm and a
    bias-free projection onto the vocabulary."""

    layers: int
    heads: int
    output_size: int
    activation: str
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention: str = "xla"

    @nn.compact
    def __call__(self, image_tokens, text_tokens):
        width = text_tokens.shape[-1]
        if image_tokens.shape[-1] != width:
            raise ValueError(f"the decoder (width {width}) reads image tokens of width "
                             f"{image_tokens.shape[-1]}: config.model.decoder.width must "
                             "equal config.model.embed_dim")
        block_class = remat_block(self.remat, scanned=False)
        block_args = (self.heads, self.layers, True, self.activation, self.mlp_ratio,
                      self.dtype, self.attention)
        x = constrain(text_tokens.astype(self.dtype), TOKENS)
        context = image_tokens.astype(self.dtype)
        for i in range(self.layers):
            x = block_class(*block_args, name=f"resblocks_{i}")(x)
            x = block_class(*block_args[:2], False, *block_args[3:], True,
                            name=f"cross_attn_{i}")(x, None, None, context)
        x = LayerNorm(name="ln_final")(x).astype(jnp.float32)
        projection = self.param("text_projection", normal(width ** -0.5, ("embed", "vocab")),
                                (width, self.output_size))
        return constrain(x @ projection, (BATCH, LENGTH, VOCAB))


class CoCa(CLIP):
    """`__call__(images [B,H,W,3], tokens [B,L])` -> (image [B,E], text [B,E] unit
    embeddings, logit_scale, logit_bias or None, logits [B, L-1, V]): logits[:, j]
    predict tokens[:, j + 1] from the image and tokens[:, :j + 1] (teacher
    forcing). `encode_image` / `encode_text` give the projected contrastive
    embeddings as a CLIP's do, so evaluators and zero-shot tools take it as one;
    `caption_logits(images, tokens)` the decoder's logits [B, L, V] for every
    position, `image_tokens` and `decode` its two halves (clip_jax.captioning)."""

    config: ml_collections.ConfigDict  # config.model, with `decoder`
    locked: tuple = ()

    def setup(self):
        super().setup()
        cfg = self.config
        self.decoder = MultimodalDecoder(
            layers=cfg.decoder.layers, heads=cfg.decoder.heads,
            output_size=output_classes.head_size(cfg.output_vocab, cfg.text.vocab_size),
            activation=cfg.activation, mlp_ratio=cfg.decoder.mlp_ratio,
            dtype=jnp.dtype(cfg.dtype), remat=cfg.remat, attention=cfg.get("attention", "xla"))

    def _image(self, images, train, patch_keep):
        """(embeddings [B, E], image tokens [B, N, E]), stopped if the tower is locked."""
        locked = "image" in self.locked
        outputs = self.visual(images, train=train and not locked, patch_keep=patch_keep)
        return jax.lax.stop_gradient(outputs) if locked else outputs

    def _text(self, tokens):
        """(embeddings [B, E], token outputs [B, context_length, D])."""
        outputs = self.text(tokens, return_tokens=True)
        return jax.lax.stop_gradient(outputs) if "text" in self.locked else outputs

    def encode_image(self, images, train=False, patch_keep=None):
        return self.visual(images, train=train, patch_keep=patch_keep)[0]

    def embed(self, images, tokens, train=False, patch_keep=None):
        image_embeddings, _ = self._image(images, train, patch_keep)
        text_embeddings, _ = self._text(tokens)
        return l2_normalize(image_embeddings), l2_normalize(text_embeddings)

    def image_tokens(self, images):
        """The image tokens [B, N, E] the decoder reads (inference mode)."""
        return self._image(images, False, None)[1]

    def decode(self, image_tokens, tokens):
        """Logits [B, L, V] of the token after each of tokens [B, L], given the
        image tokens: the text tower's token outputs through the decoder."""
        _, text_tokens = self._text(tokens)
        return self.decoder(image_tokens, text_tokens[:, :tokens.shape[1]])

    def caption_logits(self, images, tokens):
        """Logits [B, L, V] of the token after each of tokens [B, L]."""
        return self.decode(self.image_tokens(images), tokens)

    def __call__(self, images, tokens, train=False, patch_keep=None):
        image_embeddings, image_tokens = self._image(images, train, patch_keep)
        text_embeddings, text_tokens = self._text(tokens)
        logits = self.decoder(image_tokens, text_tokens[:, :tokens.shape[1] - 1])
        return (l2_normalize(image_embeddings), l2_normalize(text_embeddings),
                *self.logit_params(), logits)
