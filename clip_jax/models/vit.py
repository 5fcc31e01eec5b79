"""CLIP's Vision Transformer image tower (Radford et al. 2021, section 2.4)."""

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models.partitioning import POOLED, TOKENS, compute_weight, constrain
from clip_jax.models.transformer import LayerNorm, Transformer, normal


class PatchEmbedding(nn.Module):
    """Images [B, H, W, C] -> patch tokens [B, (H/P)*(W/P), D] in row-major grid order:
    CLIP's bias-free stride-P convolution, as one matmul over flattened patches.

    The kernel keeps the convolution's [P, P, C, D] layout (what weight conversion
    and released checkpoints use). XLA's CPU convolution with a P x P stride runs
    at a third of matmul speed and its weight gradient slower still; the reshape
    costs one copy of the images.
    """

    patch_size: int
    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        batch, height, width, channels = images.shape
        size = self.patch_size
        kernel_axes = (None, None, None, "embed")
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3), kernel_axes),
            (size, size, channels, self.width))
        grid_h, grid_w = height // size, width // size
        patches = images[:, :grid_h * size, :grid_w * size].astype(self.dtype).reshape(
            batch, grid_h, size, grid_w, size, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid_h * grid_w, size * size * channels)
        return patches @ compute_weight(kernel, kernel_axes, self.dtype).reshape(-1, self.width)


class VisionTransformer(nn.Module):
    """Images [B, H, W, 3] (CLIP-normalised) -> projected embeddings [B, embed_dim].

    Patch conv without bias, class token, learned positions, an extra LayerNorm
    before the Transformer (CLIP's one change to ViT), LayerNorm on the class
    token, and a bias-free linear projection into the joint space.
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    activation: str
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False  # see Transformer
    remat: str = "none"

    @nn.compact
    def __call__(self, images, train=False):
        del train  # no dropout or batch statistics
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images of shape {images.shape} do not match image_size={self.image_size}")
        scale = self.width ** -0.5
        tokens = PatchEmbedding(self.patch_size, self.width, self.dtype, name="conv1")(images)
        batch = tokens.shape[0]

        class_embedding = self.param("class_embedding", normal(scale, ("embed",)), (self.width,))
        class_tokens = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, self.width))
        tokens = jnp.concatenate([class_tokens, tokens], axis=1)  # [B, 1 + grid*grid, D]
        positions = self.param("positional_embedding", normal(scale, (None, "embed")),
                               tokens.shape[1:])
        tokens = tokens + positions.astype(self.dtype)

        tokens = constrain(LayerNorm(name="ln_pre")(tokens), TOKENS)
        class_outputs = Transformer(  # the class token's, [B, D]
            self.layers, self.heads, causal=False, activation=self.activation,
            mlp_ratio=self.mlp_ratio, dtype=self.dtype, scan_layers=self.scan_layers,
            remat=self.remat, name="transformer")(tokens, jnp.zeros((batch,), jnp.int32))
        pooled = LayerNorm(name="ln_post")(constrain(class_outputs, POOLED))
        proj = self.param("proj", normal(scale, ("embed", "joint")), (self.width, self.embed_dim))
        return pooled.astype(jnp.float32) @ proj
