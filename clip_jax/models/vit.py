"""CLIP's Vision Transformer image tower (Radford et al. 2021, section 2.4)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.partitioning import POOLED, TOKENS, compute_weight, constrain
from clip_jax.models.transformer import Attention, LayerNorm, Transformer, dense_matmul, normal


def patch_grid(images, patch_size):
    """(rows, columns) of whole patches in images [B, H, W, C]: a partial patch at
    the bottom or right edge is dropped, as CLIP's VALID convolution drops it."""
    grid = tuple(side // patch_size for side in images.shape[1:3])
    if min(grid) == 0:
        raise ValueError(f"images of shape {images.shape} hold no whole "
                         f"{patch_size} x {patch_size} patch")
    return grid


def resample_positions(grid_positions, grid):
    """Positional embeddings of a patch grid [h, w, D] resized to `grid` (rows,
    columns) -> [rows, columns, D]: bilinear with half-pixel centres, antialiased
    (the triangle kernel widened by the shrink factor) when shrinking, as
    big_vision's FlexiViT resizes them. The same grid is returned as it is."""
    if tuple(grid_positions.shape[:2]) == tuple(grid):
        return grid_positions
    return jax.image.resize(grid_positions, (*grid, grid_positions.shape[-1]), "bilinear",
                            antialias=True)


def take_patches(x, patch_keep):
    """x [B, N, ...], patch_keep int [B, K] -> [B, K, ...]: each row's kept patches.

    A gather whose batch dimension is declared as such (take_along_axis), so the
    partitioner keeps it on each device's own rows."""
    index = patch_keep.reshape(*patch_keep.shape, *(1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


class PatchEmbedding(nn.Module):
    """Images [B, H, W, C] -> patch tokens [B, (H/P)*(W/P), D] in row-major grid order
    (or [B, K, D]: only the patches at `patch_keep` [B, K]): CLIP's bias-free
    stride-P convolution, as one matmul over flattened patches.

    The kernel keeps the convolution's [P, P, C, D] layout (what weight conversion
    and released checkpoints use). XLA's CPU convolution with a P x P stride runs
    at a third of matmul speed and its weight gradient slower still; the reshape
    costs one copy of the images. Dropped patches are removed before the matmul,
    so patch dropout saves its FLOPs too.
    """

    patch_size: int
    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, patch_keep=None):
        batch, _, _, channels = images.shape
        size = self.patch_size
        kernel_axes = (None, None, None, "embed")
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3), kernel_axes),
            (size, size, channels, self.width))
        grid_h, grid_w = patch_grid(images, size)
        patches = images[:, :grid_h * size, :grid_w * size].astype(self.dtype).reshape(
            batch, grid_h, size, grid_w, size, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid_h * grid_w, size * size * channels)
        if patch_keep is not None:
            patches = take_patches(patches, patch_keep)
        return dense_matmul(patches,
                            compute_weight(kernel, kernel_axes, self.dtype).reshape(-1, self.width))


class AttentionalPooler(nn.Module):
    """Tokens [B, T, C] -> [B, queries, width]: learned queries (LayerNormed)
    attend to the LayerNormed tokens, OpenCLIP's AttentionalPooler (CoCa's image
    pooling; Yu et al. 2022, "attentional poolers")."""

    queries: int
    width: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        # OpenCLIP's queries start at unit scale; their LayerNorm sets the scale anyway.
        query = self.param("query", normal(1.0, (None, "embed")), (self.queries, self.width))
        query = LayerNorm(name="ln_q")(query.astype(self.dtype))
        tokens = LayerNorm(name="ln_k")(tokens)
        queries = constrain(jnp.broadcast_to(query, (tokens.shape[0], *query.shape)), TOKENS)
        return Attention(self.heads, causal=False, in_std=tokens.shape[-1] ** -0.5,
                         out_std=self.width ** -0.5, dtype=self.dtype, name="attn")(
            queries, context=tokens)


class VisionTransformer(nn.Module):
    """Images [B, H, W, 3] (CLIP-normalised) -> projected embeddings [B, embed_dim].

    Patch conv without bias, class token, learned positions, an extra LayerNorm
    before the Transformer (CLIP's one change to ViT), LayerNorm on the class
    token, and a bias-free linear projection into the joint space.

    With `pool_queries` > 0 (CoCa, OpenCLIP's `attentional_pool`) an
    AttentionalPooler of that many queries reads every output token instead,
    and the call returns (embeddings [B, embed_dim], image tokens [B,
    pool_queries - 1, embed_dim]): the first query, LayerNormed and projected,
    is the embedding, the others, LayerNormed, are what a decoder reads.
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
    layer_loop: str = "auto"  # see Transformer
    attention: str = "xla"  # models.transformer.ATTENTION_IMPLEMENTATIONS
    pool_queries: int = 0
    pool_heads: int = 8

    @nn.compact
    def __call__(self, images, train=False, patch_keep=None):
        """images [B, H, W, 3] of any size (the positional embeddings of the
        image_size grid are resampled to the images' patch grid, H/P x W/P);
        patch_keep int [B, K]: the patches (row-major grid indices) each image
        keeps (patch dropout, FLIP), None: all. The class token is always kept."""
        del train  # no dropout or batch statistics
        scale = self.width ** -0.5
        tokens = PatchEmbedding(self.patch_size, self.width, self.dtype, name="conv1")(
            images, patch_keep)  # [B, N or K, D]
        batch = tokens.shape[0]
        class_embedding = self.param("class_embedding", normal(scale, ("embed",)), (self.width,))
        grid = self.image_size // self.patch_size
        positions = self.param("positional_embedding", normal(scale, (None, "embed")),
                               (1 + grid * grid, self.width))
        image_grid = patch_grid(images, self.patch_size)
        patch_positions = resample_positions(
            positions[1:].reshape(grid, grid, self.width), image_grid).reshape(-1, self.width)
        patch_positions = patch_positions.astype(self.dtype)  # [N, D]
        # Rows of the (replicated) table at each image's kept patches, [B, K, D]:
        # its gradient is one scatter-add into [N, D].
        patch_positions = (patch_positions[None] if patch_keep is None
                           else constrain(patch_positions[patch_keep], TOKENS))
        class_tokens = jnp.broadcast_to(class_embedding.astype(self.dtype)
                                        + positions[0].astype(self.dtype),
                                        (batch, 1, self.width))
        tokens = jnp.concatenate([class_tokens, tokens + patch_positions], axis=1)

        tokens = constrain(LayerNorm(name="ln_pre")(tokens), TOKENS)
        if self.pool_queries:
            return self._attention_pooled(tokens)
        class_outputs = Transformer(  # the class token's, [B, D]
            self.layers, self.heads, causal=False, activation=self.activation,
            mlp_ratio=self.mlp_ratio, dtype=self.dtype, scan_layers=self.scan_layers,
            remat=self.remat, layer_loop=self.layer_loop, attention=self.attention,
            name="transformer")(
                tokens, jnp.zeros((batch,), jnp.int32))
        pooled = LayerNorm(name="ln_post")(constrain(class_outputs, POOLED))
        proj = self.param("proj", normal(scale, ("embed", "joint")), (self.width, self.embed_dim))
        return pooled.astype(jnp.float32) @ proj

    def _attention_pooled(self, tokens):
        """(embeddings [B, E], image tokens [B, Q-1, E]) of the ln_pre'd tokens."""
        outputs = Transformer(
            self.layers, self.heads, causal=False, activation=self.activation,
            mlp_ratio=self.mlp_ratio, dtype=self.dtype, scan_layers=self.scan_layers,
            remat=self.remat, layer_loop=self.layer_loop, attention=self.attention,
            name="transformer")(tokens)
        pooled = AttentionalPooler(self.pool_queries, self.embed_dim, self.pool_heads,
                                   self.dtype, name="attn_pool")(outputs)
        pooled = LayerNorm(name="ln_post")(pooled)  # [B, Q, E]
        proj = self.param("proj", normal(self.width ** -0.5, ("embed", "joint")),
                          (self.embed_dim, self.embed_dim))
        return pooled[:, 0].astype(jnp.float32) @ proj, pooled[:, 1:]
