"""CLIP's modified ResNet image tower (Radford et al. 2021, section 2.4).

Changes from ResNet-D-style nets: a 3-conv stem with average pooling, strided
convolutions replaced by anti-aliased average pooling before the conv
(Zhang 2019), and global average pooling replaced by QKV attention pooling.
BatchNorm running statistics live in the `batch_stats` collection.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models.lean_attention import attention
from clip_jax.models.partitioning import FEATURE_MAP, PER_HEAD, POOLED, TOKENS, constrain
from clip_jax.models.transformer import DenseGeneral, normal, zeros

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
        # Each convolution's output pinned to the batch split: the kernels' output
        # channels are split over fsdp, whose layout XLA would otherwise follow.
        def conv_bn(features, kernel, name, bn_name, inputs):
            features_out = constrain(_conv(features, kernel, self.dtype, name)(inputs), FEATURE_MAP)
            return _batch_norm(train, bn_name)(features_out)

        out = nn.relu(conv_bn(self.planes, 1, "conv1", "bn1", x))
        out = nn.relu(conv_bn(self.planes, 3, "conv2", "bn2", out))
        out = conv_bn(self.planes * 4, 1, "conv3", "bn3", _avg_pool(out, self.stride))
        identity = x
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            identity = conv_bn(self.planes * 4, 1, "downsample_conv", "downsample_bn",
                               _avg_pool(x, self.stride))
        return constrain(nn.relu(out + identity), FEATURE_MAP)


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
        x = constrain(x + positions.astype(x.dtype), TOKENS)
        std = channels ** -0.5

        def project(inputs, name):
            return constrain(DenseGeneral((self.heads, channels // self.heads), std,
                                          ("embed", "heads", "kv"), dtype=self.dtype,
                                          name=name)(inputs), PER_HEAD)

        query = project(x[:, :1], "q_proj")  # [B, 1, N, H]
        attended = attention(query, project(x, "k_proj"), project(x, "v_proj"))
        out = DenseGeneral((self.output_dim,), std, ("heads", "kv", "joint"), axes=2,
                           dtype=self.dtype, name="c_proj")(constrain(attended, PER_HEAD))
        return constrain(out[:, 0], POOLED)


class ModifiedResNet(nn.Module):
    """Images [B, H, W, 3] (CLIP-normalised) -> projected embeddings [B, embed_dim]."""

    image_size: int
    stage_layers: Sequence[int]
    width: int
    heads: int
    embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train=False, patch_keep=None):
        if patch_keep is not None:
            raise ValueError("patch dropout needs a ViT image tower, not CLIP's ResNet")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images of shape {images.shape} do not match image_size={self.image_size}")
        x = constrain(images.astype(self.dtype), FEATURE_MAP)
        stem = [(self.width // 2, 2), (self.width // 2, 1), (self.width, 1)]
        for i, (features, stride) in enumerate(stem, start=1):
            x = nn.Conv(features, (3, 3), strides=(stride, stride), padding=[(1, 1), (1, 1)],
                        use_bias=False, dtype=self.dtype, kernel_init=_CONV_INIT, name=f"conv{i}")(x)
            x = nn.relu(_batch_norm(train, f"bn{i}")(constrain(x, FEATURE_MAP)))
        x = _avg_pool(x, 2)
        for stage, blocks in enumerate(self.stage_layers):
            planes = self.width * 2 ** stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(planes, stride, self.dtype, name=f"layer{stage + 1}_{block}")(x, train)
        return AttentionPool(self.heads, self.embed_dim, self.dtype,
                             name="attnpool")(x).astype(jnp.float32)
