"""The sharded global-batch loss against the paper's pseudocode in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import losses, sharding
from clip_jax.models import l2_normalize
from configs.clip import get_config


def numpy_clip_loss(image, text, scale):
    """CLIP paper, Figure 3: logits = I_e @ T_e.T * exp(t); symmetric CE with arange labels."""
    logits = scale * image @ text.T

    def cross_entropy(rows):
        rows = rows - rows.max(axis=1, keepdims=True)
        log_softmax = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(log_softmax))

    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2


def random_embeddings(batch, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, dim)).astype(np.float64)
    text = (image + rng.normal(size=(batch, dim))).astype(np.float64)  # correlated pairs
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    return norm(image).astype(np.float32), norm(text).astype(np.float32)


def make_mesh(data, fsdp=1):
    mesh_config = get_config("tiny").mesh
    with mesh_config.unlocked():
        mesh_config.update(data=data, fsdp=fsdp, tensor=1)
    return sharding.make_mesh(mesh_config, jax.devices()[:data * fsdp])


@pytest.mark.parametrize("data,fsdp", [(1, 1), (8, 1), (2, 4)])
def test_loss_matches_numpy_pseudocode(data, fsdp):
    image, text = random_embeddings(32)
    loss_fn = losses.contrastive_loss(make_mesh(data, fsdp), sharding.BATCH_AXES)
    metrics = jax.jit(loss_fn)(image, text, jnp.float32(14.3))
    np.testing.assert_allclose(metrics["loss"], numpy_clip_loss(image, text, 14.3), rtol=1e-5)


def test_in_batch_accuracy_counts_diagonal_hits():
    image, _ = random_embeddings(16)
    text = image.copy()
    text[[0, 1]] = text[[1, 0]]  # two pairs swapped: 14/16 right in both directions
    metrics = losses.contrastive_loss(make_mesh(8), sharding.BATCH_AXES)(image, text, 50.0)
    assert float(metrics["i2t_top1"]) == pytest.approx(14 / 16)
    assert float(metrics["t2i_top1"]) == pytest.approx(14 / 16)


def test_gradients_through_all_gather_match_single_device():
    """The gradient w.r.t. every embedding row and the scale is the same on 8
    shards as on one: no world-size scaling error through the gather."""
    raw_image, raw_text = (jnp.asarray(x) * 3 for x in random_embeddings(32, seed=1))

    def loss_on(mesh):
        loss_fn = losses.contrastive_loss(mesh, sharding.BATCH_AXES)
        return lambda i, t, s: loss_fn(l2_normalize(i), l2_normalize(t), s)["loss"]

    grad = lambda mesh: jax.jit(jax.grad(loss_on(mesh), argnums=(0, 1, 2)))(
        raw_image, raw_text, jnp.float32(10.0))
    for single, sharded in zip(grad(make_mesh(1)), grad(make_mesh(8))):
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-7)


def test_per_device_logits_are_local_by_global():
    """No device ever materialises the global x global similarity matrix."""
    image, text = random_embeddings(64)
    mesh = make_mesh(8)
    hlo = jax.jit(losses.contrastive_loss(mesh, sharding.BATCH_AXES)).lower(
        image, text, 1.0).compile().as_text()
    assert "f32[8,64]" in hlo  # [B_local, B_global] logits
    assert "f32[64,64]" not in hlo
