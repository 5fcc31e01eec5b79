"""The image towers (config.model.image.kind: ViT or CLIP's ResNet, params
`visual`), shared by the model of every objective."""

import jax
import jax.numpy as jnp

from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.vit import VisionTransformer


def _vit(cfg, dtype):
    image = cfg.image
    return VisionTransformer(
        image_size=image.image_size, patch_size=image.patch_size, width=image.width,
        layers=image.layers, heads=image.heads, embed_dim=cfg.embed_dim,
        activation=cfg.activation, mlp_ratio=image.mlp_ratio, dtype=dtype,
        scan_layers=cfg.scan_layers, remat=cfg.remat, layer_loop=cfg.get("layer_loop", "auto"),
        attention=cfg.get("attention", "xla"),
        pool_queries=image.get("pool_queries", 0), pool_heads=image.get("pool_heads", 8),
        name="visual")


def _resnet(cfg, dtype):
    # Convolutional tower: ReLU, no MLP blocks, no Transformer stack to scan or remat.
    image = cfg.image
    return ModifiedResNet(image_size=image.image_size, stage_layers=tuple(image.stage_layers),
                          width=image.width, heads=image.heads, embed_dim=cfg.embed_dim,
                          dtype=dtype, name="visual")


# config.model.image.kind -> builder of the image tower.
IMAGE_TOWERS = {"vit": _vit, "resnet": _resnet}


def image_tower(cfg):
    """The image tower of config.model `cfg`: images [B,H,W,3] -> [B, embed_dim]."""
    if cfg.image.kind not in IMAGE_TOWERS:
        raise ValueError(f"config.model.image.kind={cfg.image.kind!r} is unknown; "
                         f"choose one of {', '.join(IMAGE_TOWERS)}")
    return IMAGE_TOWERS[cfg.image.kind](cfg, jnp.dtype(cfg.dtype))


def embed_images(tower, images, train, locked, patch_keep=None):
    """tower(images) [B, E], of only the patches at `patch_keep` [B, K] if given
    (patch dropout); a locked tower (LiT) runs in inference mode (BatchNorm uses
    its running statistics) and passes no gradient back."""
    if locked:
        return jax.lax.stop_gradient(tower(images, train=False, patch_keep=patch_keep))
    return tower(images, train=train, patch_keep=patch_keep)
