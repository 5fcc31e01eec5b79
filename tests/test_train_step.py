"""The sharded train step: mesh-independence and the ability to learn."""

import functools

import jax
import numpy as np
import optax
import pytest

from clip_jax import optim
from clip_jax.train_step import setup_training
from tests.conftest import small_config


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    size, length = config.model.image.image_size, config.model.text.context_length
    tokens = rng.integers(1, 1000, size=(config.batch_size, length), dtype=np.int32)
    tokens[:, 0], tokens[:, -1] = 49406, 49407
    return {"images": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
            "tokens": tokens}


def build(config, devices, optimizer=None):
    """(jitted step, initial state) on a mesh over `devices`."""
    training = setup_training(config, devices, optimizer)
    return training.step, training.init_state(jax.random.key(config.seed))


MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1),
          dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=8, tensor=1)]
LOSSES = {
    "softmax": {},
    "softmax_chunked": {"loss.chunk_size": 8},
    "sigmoid": {"loss.kind": "sigmoid", "model.logit_scale_init": 2.302585,
                "model.logit_bias_init": -10.0},
}


def run_steps(config, devices, steps, optimizer_name):
    """(params, [metrics per step]) after `steps` steps on a fixed batch."""
    optimizer = optax.sgd(1.0) if optimizer_name == "sgd" else None
    step, state = build(config, devices, optimizer)
    batch = random_batch(config)
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history


@functools.lru_cache(maxsize=None)
def run_on_one_device(loss, steps, optimizer_name):
    """The single-device reference, computed once per (loss, steps, optimizer)."""
    config = small_config(**{"mesh.data": 1, "optimizer.warmup_steps": 0}, **LOSSES[loss])
    return run_steps(config, jax.devices()[:1], steps, optimizer_name)


def run_on_one_and_eight(mesh, steps, optimizer_name="adamw", loss="softmax"):
    """[(params, [metrics per step]) on 1 device, same on 8 devices with `mesh`]."""
    sharded = small_config(**{f"mesh.{k}": v for k, v in mesh.items()},
                           **{"optimizer.warmup_steps": 0}, **LOSSES[loss])
    return [run_on_one_device(loss, steps, optimizer_name),
            run_steps(sharded, jax.devices(), steps, optimizer_name)]


# The chunked softmax equals the plain one in values and gradients (test_losses.py).
# AdamW on every mesh with the softmax; the sigmoid ring's gradients on 8 devices
# are compared below (SGD exposes them), and the optimizer does not see the loss.
@pytest.mark.parametrize("mesh, loss", [(mesh, "softmax") for mesh in MESHES])
def test_adamw_steps_on_8_devices_equal_one_device(mesh, loss):
    (params_1, history_1), (params_8, history_8) = run_on_one_and_eight(mesh, 2, loss=loss)
    for metrics_1, metrics_8 in zip(history_1, history_8):
        for key in metrics_1:
            np.testing.assert_allclose(metrics_8[key], metrics_1[key], rtol=1e-5)
    # Adam divides by sqrt(v) + eps, which amplifies float noise in gradients that
    # are zero in exact arithmetic (e.g. attention key biases) up to ~lr * noise / eps;
    # 1e-5 absolute is 0.5% of one update (lr 2e-3).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 params_8, params_1)


@pytest.mark.parametrize("mesh, loss", [(MESHES[0], "softmax"), (MESHES[2], "softmax"),
                                        (MESHES[2], "sigmoid")])
def test_updated_parameters_on_8_devices_equal_one_device(mesh, loss):
    """With a linear update (SGD) the new parameters expose the gradient itself.

    Tolerance: 1e-5 relative to each parameter's largest entry, since entries that
    are sums of cancelling terms differ by float32 reduction order."""
    (params_1, _), (params_8, _) = run_on_one_and_eight(mesh, 1, "sgd", loss)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=max(1e-5 * np.abs(b).max(), 1e-7)),
                 params_8, params_1)


def test_tiny_model_overfits_a_fixed_batch():
    config = small_config(**{"optimizer.lr": 3e-3, "optimizer.warmup_steps": 5,
                             "total_steps": 400, "optimizer.weight_decay": 0.0})
    step, state = build(config, jax.devices())
    batch = random_batch(config)
    state, first = step(state, batch)
    for _ in range(120):
        # Block each step: the fake CPU devices share 2 cores, and a deep queue of
        # in-flight collectives can starve a rendezvous.
        state, metrics = jax.block_until_ready(step(state, batch))
    assert float(first["loss"]) > 2.0  # about log(16) at init
    assert float(metrics["loss"]) < 0.05
    assert float(metrics["i2t_top1"]) == 1.0 and float(metrics["t2i_top1"]) == 1.0


def test_weight_decay_skips_gains_biases_and_temperature():
    params = {"kernel": np.ones((2, 3)), "bias": np.ones(3), "logit_scale": np.float32(1.0)}
    mask = optim.decay_mask(jax.tree.map(np.asarray, params))
    assert mask == {"kernel": True, "bias": False, "logit_scale": False}


@pytest.mark.parametrize("max_norm", [1e3, 0.5])
def test_clipping_matches_optax(max_norm):
    rng = np.random.default_rng(0)
    grads = {"kernel": rng.normal(size=(4, 5)).astype(np.float32),
             "bias": rng.normal(size=5).astype(np.float32)}
    ours, _ = optim.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    if max_norm > float(optax.tree.norm(grads)):  # under the limit: untouched, bitwise
        jax.tree.map(np.testing.assert_array_equal, ours, grads)
    else:
        np.testing.assert_allclose(float(optax.tree.norm(ours)), max_norm, rtol=1e-6)
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), ours, theirs)
    # The state tree is optax's, so checkpoints restore across the two.
    assert (jax.tree.structure(optim.clip_by_global_norm(1.0).init(grads))
            == jax.tree.structure(optax.clip_by_global_norm(1.0).init(grads)))
