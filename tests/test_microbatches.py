"""GradCache micro-batching: k micro-batches give the global batch's loss and
gradients with the activations of one micro-batch."""

import jax
import numpy as np
import optax
import pytest

from clip_jax import image_ops
from clip_jax.models import CLIP
from tests.conftest import small_config
from tests.test_train_step import LOSSES, build, random_batch

MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)]


def sgd_step(microbatches, mesh, loss, batch_size=32, **overrides):
    """(updated params, metrics) after one SGD(1.0) step: the update is -gradient."""
    config = small_config(**{f"mesh.{k}": v for k, v in mesh.items()}, **LOSSES[loss],
                          batch_size=batch_size, microbatches=microbatches, **overrides)
    step, state = build(config, jax.devices(), optax.sgd(1.0))
    state, metrics = step(state, random_batch(config))
    return jax.device_get(state.params), jax.device_get(metrics)


# The chunked softmax on data=8, the sigmoid ring on the 3-D mesh (each case compiles
# two 8-device steps; the plain softmax equals the chunked one, test_losses.py); then
# stacked blocks with the splash kernel (Pallas, interpret mode) on the replicas.
@pytest.mark.parametrize("mesh, loss, overrides", [
    (MESHES[0], "softmax_chunked", {}),
    (MESHES[1], "sigmoid", {}),
    (MESHES[1], "sigmoid", {"model.scan_layers": True, "model.attention": "splash"}),
    # Weights gathered once per step over fsdp (GradCache's gradcache_weights).
    (dict(data=2, fsdp=4, tensor=1), "softmax", {"gradcache_weights": "gathered"}),
    (MESHES[1], "sigmoid", {"gradcache_weights": "gathered", "model.scan_layers": True})])
def test_four_microbatches_equal_one(mesh, loss, overrides):
    """Same loss, metrics and gradients (exposed by SGD) as the full batch; each
    data-parallel replica sums its micro-batches' gradients before they are
    reduced over the replicas.

    Tolerance as in test_train_step: 1e-5 relative to each parameter's largest
    entry, since sums of cancelling terms differ by float32 reduction order."""
    params_1, metrics_1 = sgd_step(1, mesh, loss, **overrides)
    params_4, metrics_4 = sgd_step(4, mesh, loss, **overrides)
    assert metrics_4.keys() == metrics_1.keys()
    for key in metrics_1:
        np.testing.assert_allclose(metrics_4[key], metrics_1[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=max(1e-5 * np.abs(b).max(), 1e-7)),
                 params_4, params_1)


def resnet_config(**overrides):
    config = small_config(batch_size=16, microbatches=2, **overrides)
    with config.unlocked():
        config.model.image = dict(kind="resnet", image_size=16, stage_layers=(1,), width=8,
                                  heads=2)
    return config


def test_batchnorm_gradcache_on_replicas_equals_one_device():
    """BatchNorm normalises each micro-batch over all of its rows, whichever
    devices hold them: the replicas' step is the one device's."""
    one = resnet_config(**{"mesh.data": 1})
    two = resnet_config(**{"mesh.data": 2})
    step_1, state_1 = build(one, jax.devices()[:1], optax.sgd(1.0))
    step_2, state_2 = build(two, jax.devices()[:2], optax.sgd(1.0))
    state_1, metrics_1 = step_1(state_1, random_batch(one))
    state_2, metrics_2 = step_2(state_2, random_batch(two))
    np.testing.assert_allclose(metrics_2["loss"], metrics_1["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=max(1e-5 * np.abs(b).max(), 1e-7)),
                 jax.device_get(state_2.params), jax.device_get(state_1.params))


def test_batchnorm_statistics_update_once_per_microbatch():
    """ResNet under GradCache: the running statistics are those of k sequential
    train-mode passes over micro-batches j = rows j, j + k, ... (per-micro-batch
    BatchNorm, inherent to GradCache)."""
    config = resnet_config(**{"mesh.data": 1})
    step, state = build(config, jax.devices()[:1])  # BatchNorm compiles slowly
    batch = random_batch(config)
    embed = jax.jit(lambda variables, images, tokens: CLIP(config.model).apply(
        variables, image_ops.normalize(images), tokens, train=True, method="embed",
        mutable=["batch_stats"])[1])
    expected = state.model_state
    for j in range(config.microbatches):
        expected = embed({"params": state.params, **expected},
                         batch["images"][j::config.microbatches],
                         batch["tokens"][j::config.microbatches])
    expected = jax.device_get(expected)
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(state.model_state), expected)


def temp_bytes(microbatches, batch_size):
    """XLA's scratch memory for the compiled step on one device."""
    config = small_config(**{"mesh.data": 1}, batch_size=batch_size, microbatches=microbatches)
    step, state = build(config, jax.devices()[:1])
    compiled = step.lower(state, random_batch(config)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_microbatches_reduce_activation_memory():
    """Activation memory follows the micro-batch, not the batch: four micro-batches
    of 64 need about the scratch memory of one batch of 64 (gradient accumulator
    included), where one batch of 256 needs much more."""
    full, micro, one_micro = temp_bytes(1, 256), temp_bytes(4, 256), temp_bytes(1, 64)
    print(f"temp bytes: k=1 {full:,}, k=4 {micro:,}, one micro-batch {one_micro:,}")
    assert full > 1.3 * one_micro  # activations matter at this size
    assert micro < 1.05 * one_micro
