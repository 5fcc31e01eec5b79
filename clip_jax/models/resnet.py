"""CLIP's modified ResNet image tower (Radford et al. 2021, section 2.4).

Changes from ResNet-D-style nets: a 3-conv stem with average pooling, strided
convolutions replaced by anti-aliased average pooling before the conv
(Zhang 2019), and global average pooling replaced by QKV attention pooling.
BatchNorm running statistics live in the `batch_stats` collection.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.transformer import normal, zeros

_CONV_INIT = nn.with_logical_partitioning(nn.initializers.kaiming_normal(),
                                          (None, None, None, "embed"))


def _batch_norm(train, name):
    # PyTorch defaults, which CLIP's checkpoints were trained with.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=zeros(("embed",)))


def _avg_pool(x, stride):
    return nn.avg_pool(x, (stride, stride), (stride, stride)) if stride > 1 else x


def _conv(features, kernel, dtype, name):
    return nn.Conv(features, (kernel, kernel), padding=[(kernel // 2, kernel // 2)] * 2,
                   use_bias=False, dtype=dtype, kernel_init=_CONV_INIT, name=name)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> avg-pool(stride) -> 1x1 (x4 channels), plus a pooled shortcut."""

    planes: int
    stride: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        out = nn.relu(_batch_norm(train, "bn1")(_conv(self.planes, 1, self.dtype, "conv1")(x)))
        out = nn.relu(_batch_norm(train, "bn2")(_conv(self.planes, 3, self.dtype, "conv2")(out)))
        out = _avg_pool(out, self.stride)
        out = _batch_norm(train, "bn3")(_conv(self.planes * 4, 1, self.dtype, "conv3")(out))
        identity = x
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            identity = _conv(self.planes * 4, 1, self.dtype, "downsample_conv")(
                _avg_pool(x, self.stride))
            identity = _batch_norm(train, "downsample_bn")(identity)
        return nn.relu(out + identity)


class AttentionPool(nn.Module):
    """Attention pooling: the mean feature queries all positions; [B, H, W, C] -> [B, out]."""

    heads: int
    output_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # [B, 1 + HW, C]
        positions = self.param("positional_embedding", normal(channels ** -0.5, (None, "embed")),
                               (height * width + 1, channels))
        x = x + positions.astype(x.dtype)
        std = channels ** -0.5

        def project(inputs, name):
            return nn.DenseGeneral((self.heads, channels // self.heads), dtype=self.dtype, name=name,
                                   kernel_init=normal(std, ("embed", "heads", "kv")),
                                   bias_init=zeros(("heads", "kv")))(inputs)

        query = project(x[:, :1], "q_proj")  # [B, 1, N, H]
        attended = jax.nn.dot_product_attention(query, project(x, "k_proj"), project(x, "v_proj"))
        out = nn.DenseGeneral(self.output_dim, axis=(-2, -1), dtype=self.dtype, name="c_proj",
                              kernel_init=normal(std, ("heads", "kv", "joint")),
                              bias_init=zeros(("joint",)))(attended)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    """Images [B, H, W, 3] (CLIP-normalised) -> projected embeddings [B, embed_dim]."""

    image_size: int
    stage_layers: Sequence[int]
    width: int
    heads: int
    embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train=False):
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images of shape {images.shape} do not match image_size={self.image_size}")
        x = images.astype(self.dtype)
        stem = [(self.width // 2, 2), (self.width // 2, 1), (self.width, 1)]
        for i, (features, stride) in enumerate(stem, start=1):
            x = nn.Conv(features, (3, 3), strides=(stride, stride), padding=[(1, 1), (1, 1)],
                        use_bias=False, dtype=self.dtype, kernel_init=_CONV_INIT, name=f"conv{i}")(x)
            x = nn.relu(_batch_norm(train, f"bn{i}")(x))
        x = _avg_pool(x, 2)
        for stage, blocks in enumerate(self.stage_layers):
            planes = self.width * 2 ** stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(planes, stride, self.dtype, name=f"layer{stage + 1}_{block}")(x, train)
        return AttentionPool(self.heads, self.embed_dim, self.dtype,
                             name="attnpool")(x).astype(jnp.float32)
