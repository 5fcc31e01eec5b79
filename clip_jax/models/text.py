"""CLIP's causal text Transformer, pooled at the end-of-text token."""

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models.partitioning import POOLED, TOKENS, constrain
from clip_jax.models.transformer import LayerNorm, Transformer, embed_tokens, normal


class TextTransformer(nn.Module):
    """Token ids [B, L] (int32, zero-padded, L <= context_length: shorter
    captions use the first L positional embeddings, as CLIPA trains) ->
    projected embeddings [B, embed_dim].

    The representation is the final LayerNorm's output at the end-of-text token,
    which is the highest id in each row (CLIP's tokenizer gives it id
    vocab_size - 1), so argmax finds it without a separate length input.
    """

    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    activation: str
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False  # see Transformer
    remat: str = "none"
    attention: str = "xla"  # models.transformer.ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, tokens):
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"tokens of shape {tokens.shape} are longer than "
                             f"context_length={self.context_length}")
        token_embedding = self.param("token_embedding", normal(0.02, ("vocab", "embed")),
                                     (self.vocab_size, self.width))
        positions = self.param("positional_embedding", normal(0.01, (None, "embed")),
                               (self.context_length, self.width))
        x = constrain((embed_tokens(token_embedding, tokens) + positions[:length]).astype(
            self.dtype),
                      TOKENS)  # [B, L, D]
        end_positions = jnp.argmax(tokens, axis=-1)  # [B]
        end_outputs = Transformer(  # [B, D]
            self.layers, self.heads, causal=True, activation=self.activation,
            mlp_ratio=self.mlp_ratio, dtype=self.dtype, scan_layers=self.scan_layers,
            remat=self.remat, attention=self.attention, name="transformer")(x, end_positions)
        pooled = LayerNorm(name="ln_final")(constrain(end_outputs, POOLED))
        projection = self.param("text_projection", normal(self.width ** -0.5, ("embed", "joint")),
                                (self.width, self.embed_dim))
        return pooled.astype(jnp.float32) @ projection
