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
    def norm(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
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

    def grad(mesh):
        return jax.jit(jax.grad(loss_on(mesh), argnums=(0, 1, 2)))(
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


def numpy_sigmoid_loss(image, text, scale, bias):
    """SigLIP (Zhai et al. 2023, Algorithm 1): -sum log sigmoid(z * logits) / B."""
    logits = scale * image @ text.T + bias
    signs = 2 * np.eye(len(image)) - 1
    return np.sum(np.logaddexp(0, -signs * logits)) / len(image)


@pytest.mark.parametrize("data,fsdp", [(1, 1), (8, 1), (2, 4)])
def test_sigmoid_ring_loss_matches_numpy(data, fsdp):
    image, text = random_embeddings(32)
    loss_fn = losses.contrastive_loss(make_mesh(data, fsdp), sharding.BATCH_AXES, kind="sigmoid")
    metrics = jax.jit(loss_fn)(image, text, jnp.float32(10.0), jnp.float32(-10.0))
    np.testing.assert_allclose(metrics["loss"], numpy_sigmoid_loss(image, text, 10.0, -10.0),
                               rtol=1e-5)


@pytest.mark.parametrize("kind,chunk_size", [("softmax", 16), ("sigmoid", 0), ("sigmoid", 4)])
def test_memory_bounded_losses_give_plain_gradients(kind, chunk_size):
    """Chunked softmax and ring sigmoid on 8 shards: same loss and gradients
    (embeddings, scale, bias) as the plain loss on one device."""
    raw_image, raw_text = (jnp.asarray(x) * 3 for x in random_embeddings(64, seed=2))

    def loss_on(mesh, chunk):
        loss_fn = losses.contrastive_loss(mesh, sharding.BATCH_AXES, kind, chunk)
        return lambda i, t, s, b: loss_fn(l2_normalize(i), l2_normalize(t), s, b)["loss"]

    def value_and_grads(mesh, chunk):
        return jax.jit(jax.value_and_grad(loss_on(mesh, chunk), argnums=(0, 1, 2, 3)))(
            raw_image, raw_text, jnp.float32(10.0), jnp.float32(-5.0))

    plain_loss, plain_grads = value_and_grads(make_mesh(1), 0)
    bounded_loss, bounded_grads = value_and_grads(make_mesh(8), chunk_size)
    np.testing.assert_allclose(bounded_loss, plain_loss, rtol=1e-5)
    for plain, bounded in zip(plain_grads, bounded_grads):
        np.testing.assert_allclose(bounded, plain, rtol=1e-5, atol=1e-7)


def test_chunked_accuracy_matches_plain():
    image, text = random_embeddings(64, seed=3)
    plain = losses.contrastive_loss(make_mesh(8), sharding.BATCH_AXES)(image, text, 5.0)
    chunked = losses.contrastive_loss(make_mesh(8), sharding.BATCH_AXES, chunk_size=16)(
        image, text, 5.0)
    for key in ("i2t_top1", "t2i_top1"):
        assert float(chunked[key]) == float(plain[key])


@pytest.mark.parametrize("kind,chunk_size,held,absent", [
    ("softmax", 16, "f32[8,16]", "f32[8,64]"),  # [B_local, chunk], never [B_local, B_global]
    ("sigmoid", 0, "f32[8,8]", "f32[8,64]"),  # [B_local, B_local]
    ("sigmoid", 4, "f32[8,4]", "f32[8,8]"),  # [B_local, chunk]
])
def test_memory_bounded_losses_hold_small_logits(kind, chunk_size, held, absent):
    image, text = random_embeddings(64, dim=24)  # no embedding shape looks like a logit block
    loss_fn = losses.contrastive_loss(make_mesh(8), sharding.BATCH_AXES, kind, chunk_size)
    hlo = jax.jit(jax.grad(lambda i, t: loss_fn(i, t, 1.0, 0.0)["loss"])).lower(
        image, text).compile().as_text()
    assert held in hlo
    assert absent not in hlo and "f32[64,64]" not in hlo


def numpy_distill_loss(image, text, scale, teacher_image, teacher_text, teacher_scale):
    """OpenCLIP's DistillClipLoss distill term (open_clip/loss.py): the mean over
    rows of -sum(softmax(teacher_logits) * log_softmax(student_logits)), averaged
    over the image->text and text->image directions."""
    def log_softmax(rows):
        rows = rows - rows.max(axis=1, keepdims=True)
        return rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))

    def dist_loss(teacher_logits, student_logits):
        return -np.mean(np.sum(np.exp(log_softmax(teacher_logits)) * log_softmax(student_logits),
                               axis=1))

    student = scale * image.astype(np.float64) @ text.T.astype(np.float64)
    teacher = teacher_scale * teacher_image.astype(np.float64) @ teacher_text.T.astype(np.float64)
    return (dist_loss(teacher, student) + dist_loss(teacher.T, student.T)) / 2


def teacher_embeddings(batch, dim=12, seed=5):
    return random_embeddings(batch, dim=dim, seed=seed)


@pytest.mark.parametrize("data,fsdp,chunk_size", [(1, 1, 0), (8, 1, 0), (2, 4, 16), (8, 1, 8)])
def test_distillation_matches_openclip_numpy(data, fsdp, chunk_size):
    image, text = random_embeddings(32)
    teacher_image, teacher_text = teacher_embeddings(32)
    distill = losses.distillation_loss(make_mesh(data, fsdp), sharding.BATCH_AXES,
                                       teacher_scale=30.0, chunk_size=chunk_size)
    loss = jax.jit(distill)(image, text, jnp.float32(14.3), teacher_image, teacher_text)
    np.testing.assert_allclose(
        loss, numpy_distill_loss(image, text, 14.3, teacher_image, teacher_text, 30.0),
        rtol=1e-5)


def test_distillation_gradients_reach_the_student_only_and_match_one_device():
    """Chunked on 8 shards: the plain one-device gradients w.r.t. the student's
    embeddings and scale; none w.r.t. the teacher's."""
    raw_image, raw_text = (jnp.asarray(x) * 3 for x in random_embeddings(64, seed=2))
    teacher_image, teacher_text = (jnp.asarray(x) for x in teacher_embeddings(64))

    def grads(mesh, chunk):
        distill = losses.distillation_loss(mesh, sharding.BATCH_AXES, 20.0, chunk)
        return jax.jit(jax.grad(lambda i, t, s, ti, tt: distill(
            l2_normalize(i), l2_normalize(t), s, ti, tt), argnums=(0, 1, 2, 3, 4)))(
                raw_image, raw_text, jnp.float32(10.0), teacher_image, teacher_text)

    plain, chunked = grads(make_mesh(1), 0), grads(make_mesh(8), 16)
    for single, sharded in zip(plain[:3], chunked[:3]):
        assert np.abs(single).max() > 0
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-7)
    for teacher_grad in (*plain[3:], *chunked[3:]):
        assert not np.any(teacher_grad)


@pytest.mark.parametrize("chunk_size, held, absent", [(0, "f32[8,64]", "f32[64,64]"),
                                                      (16, "f32[8,16]", "f32[8,64]")])
def test_distillation_holds_no_global_by_global_logits(chunk_size, held, absent):
    image, text = random_embeddings(64, dim=24)
    teacher_image, teacher_text = teacher_embeddings(64, dim=40)
    distill = losses.distillation_loss(make_mesh(8), sharding.BATCH_AXES, 20.0, chunk_size)
    hlo = jax.jit(jax.grad(lambda i, t: distill(i, t, 10.0, teacher_image, teacher_text))).lower(
        image, text).compile().as_text()
    assert held in hlo
    assert absent not in hlo and "f32[64,64]" not in hlo
