"""CLIP's causal text Transformer, pooled at the end-of-text token (or, for
CoCa, at a learned class token appended after the caption)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.partitioning import POOLED, TOKENS, constrain
from clip_jax.models.transformer import (TOKEN_TABLE, LayerNorm, Transformer, decoding,
                                        embed_tokens, normal)

# config.model.text.cls_mask: where CoCa's padding mask sits (TextTransformer).
CLS_MASKS = ("legacy", "correct")


@jax.custom_vjp
def add_positions(embedded, positions):
    """embedded [B, L, D] + positional embeddings [L, D] (promoted as `+` does).

    Only the backward pass is written here: the positions' gradient, a sum over
    the batch, is taken on GPUs as a matmul by ones. As a reduction it made XLA's
    GPU layout assignment lay the whole text stream out batch-minor ([L, D, B])
    and transpose it around every matmul: 1.1 ms of ViT-B/16's 28.6 ms H100
    roofline bound at 128 (docs/capacity.md); a GEMM's operand keeps the stream
    batch-major, as the image tower's is. XLA:CPU and TPUs keep the reduction
    (CPU-trained figures keep their numbers)."""
    return embedded + positions


def _add_positions_fwd(embedded, positions):
    # Empty arrays carry the two dtypes the gradients must have.
    return embedded + positions, (jnp.zeros((0,), embedded.dtype), jnp.zeros((0,), positions.dtype))


def _positions_grad_by_reduction(grad):
    return grad.sum(0)


def _positions_grad_by_matmul(grad):
    # Two rows of ones, not one: XLA rewrites a matrix-vector product into the
    # reduction this avoids.
    ones = jnp.ones((2, grad.shape[0]), grad.dtype)
    return jnp.einsum("kb,bld->kld", ones, grad, precision=jax.lax.Precision.HIGHEST)[0]


def _add_positions_bwd(dtypes, grad):
    embedded_dtype, positions_dtype = (empty.dtype for empty in dtypes)
    positions_grad = jax.lax.platform_dependent(
        grad, cuda=_positions_grad_by_matmul, rocm=_positions_grad_by_matmul,
        default=_positions_grad_by_reduction)
    return grad.astype(embedded_dtype), positions_grad.astype(positions_dtype)


add_positions.defvjp(_add_positions_fwd, _add_positions_bwd)


class TextTransformer(nn.Module):
    """Token ids [B, L] (int32, zero-padded, L <= context_length: shorter
    captions use the first L positional embeddings, as CLIPA trains) ->
    projected embeddings [B, embed_dim].

    The representation is the final LayerNorm's output at the end-of-text token,
    which is the highest id in each row (CLIP's tokenizer gives it id
    vocab_size - 1), so argmax finds it without a separate length input.

    `embed_cls` (CoCa, OpenCLIP's `embed_cls`): a learned class token is appended
    at position context_length (the tokens are zero-padded to context_length
    first, so the embedding does not depend on how a caller padded them), the
    padding is masked out of every key, and the representation is the class
    token's output. `cls_mask` places the key mask as OpenCLIP does: "legacy"
    (its default, which its released CoCa weights were trained with) shifts it
    one position to the right, "correct" masks exactly the padding.
    With `return_tokens` the call returns (embeddings, token outputs [B, L, width]
    before the final LayerNorm), what CoCa's decoder reads.
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
    layer_loop: str = "auto"  # see Transformer
    attention: str = "xla"  # models.transformer.ATTENTION_IMPLEMENTATIONS
    embed_cls: bool = False
    cls_mask: str = "legacy"  # CLS_MASKS

    @nn.compact
    def __call__(self, tokens, return_tokens=False):
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"tokens of shape {tokens.shape} are longer than "
                             f"context_length={self.context_length}")
        if self.embed_cls:
            return self._class_token_pooled(tokens, return_tokens)
        token_embedding = self.param("token_embedding", normal(0.02, TOKEN_TABLE),
                                     (self.vocab_size, self.width))
        positions = self.param("positional_embedding", normal(0.01, (None, "embed")),
                               (self.context_length, self.width))
        x = constrain(add_positions(embed_tokens(token_embedding, tokens, self.dtype),
                                    positions[:length]).astype(self.dtype), TOKENS)  # [B, L, D]
        end_positions = jnp.argmax(tokens, axis=-1)  # [B]
        end_outputs = Transformer(  # [B, D]
            self.layers, self.heads, causal=True, activation=self.activation,
            mlp_ratio=self.mlp_ratio, dtype=self.dtype, scan_layers=self.scan_layers,
            remat=self.remat, layer_loop=self.layer_loop, attention=self.attention,
            name="transformer")(x, end_positions)
        pooled = LayerNorm(name="ln_final")(constrain(end_outputs, POOLED))
        projection = self.param("text_projection", normal(self.width ** -0.5, ("embed", "joint")),
                                (self.width, self.embed_dim))
        return pooled.astype(jnp.float32) @ projection

    def _decode(self, tokens, token_embedding, positions):
        """(None, token outputs [B, t, width]) of the next tokens [B, t] under
        incremental decoding (models.transformer.decoding): their positions follow
        the ones decoded before; the first call, on a whole [B, S] buffer, makes
        the caches. No class token or padding mask: a decoder reads the caption's
        token outputs, which are causal and see no padding."""
        ready = self.has_variable("cache", "position")
        position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
        start = position.value if ready else 0
        rows = jax.lax.dynamic_slice_in_dim(positions, start, tokens.shape[1])
        if ready:
            position.value = start + tokens.shape[1]
        x = add_positions(embed_tokens(token_embedding, tokens, self.dtype), rows).astype(
            self.dtype)
        outputs = Transformer(
            self.layers, self.heads, causal=True, activation=self.activation,
            mlp_ratio=self.mlp_ratio, dtype=self.dtype, scan_layers=self.scan_layers,
            remat=self.remat, layer_loop=self.layer_loop, attention=self.attention,
            name="transformer")(x)
        return None, outputs

    def _class_token_pooled(self, tokens, return_tokens):
        if self.cls_mask not in CLS_MASKS:
            raise ValueError(f"config.model.text.cls_mask={self.cls_mask!r} is unknown; "
                             f"choose one of {', '.join(CLS_MASKS)}")
        token_embedding = self.param("token_embedding", normal(0.02, TOKEN_TABLE),
                                     (self.vocab_size, self.width))
        positions = self.param("positional_embedding", normal(0.01, (None, "embed")),
                               (self.context_length + 1, self.width))
        if decoding(self):
            return self._decode(tokens, token_embedding, positions)
        tokens = jnp.pad(tokens, ((0, 0), (0, self.context_length - tokens.shape[1])))
        class_embedding = self.param("cls_emb", normal(0.01, ("embed",)), (self.width,))
        batch = tokens.shape[0]
        x = jnp.concatenate([embed_tokens(token_embedding, tokens, self.dtype),
                             jnp.broadcast_to(class_embedding, (batch, 1, self.width))], axis=1)
        x = constrain(add_positions(x, positions).astype(self.dtype), TOKENS)  # [B, L+1, D]
        present, always = tokens != 0, jnp.ones((batch, 1), bool)
        key_mask = jnp.concatenate([always, present] if self.cls_mask == "legacy"
                                   else [present, always], axis=1)  # [B, L+1]
        outputs = Transformer(
            self.layers, self.heads, causal=True, activation=self.activation,
            mlp_ratio=self.mlp_ratio, dtype=self.dtype, scan_layers=self.scan_layers,
            remat=self.remat, layer_loop=self.layer_loop, attention=self.attention,
            name="transformer")(
                x, key_mask=key_mask)
        pooled = LayerNorm(name="ln_final")(constrain(outputs[:, -1], POOLED))
        projection = self.param("text_projection", normal(self.width ** -0.5, ("embed", "joint")),
                                (self.width, self.embed_dim))
        embeddings = pooled.astype(jnp.float32) @ projection
        return (embeddings, outputs[:, :-1]) if return_tokens else embeddings
