"""Scanned layers, rematerialisation and bf16 compute: same model, other execution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import image_ops, losses, optim, sharding
from clip_jax.models import CLIP
from clip_jax.models.transformer import (split_layers, stack_layers, unrolled_layer_loop,
                                         unstack_layers)
from clip_jax.train_step import TrainState, setup_training
from clip_jax.variables import dummy_inputs
from tests.conftest import small_config
from tests.test_train_step import random_batch

TOWERS = ("visual", "text")


def init_params(config):
    model = CLIP(config.model)
    return model, nn.unbox(model.init(jax.random.key(0), *dummy_inputs(config.model)))["params"]


def map_towers(convert, params):
    """params with `convert` applied to both towers' Transformer params."""
    return {**params, **{tower: dict(params[tower], transformer=convert(params[tower]["transformer"]))
                         for tower in TOWERS}}


def abstract_params(config):
    return jax.eval_shape(lambda: init_params(config)[1])


def test_default_layout_is_one_subtree_per_block():
    params = abstract_params(small_config())
    assert sorted(k for k in params["visual"]["transformer"]) == ["resblocks_0", "resblocks_1"]


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_scanned_towers_equal_unscanned_given_stacked_params(layer_loop):
    config = small_config()
    scanned_config = small_config(**{"model.scan_layers": True, "model.layer_loop": layer_loop})
    model, params = init_params(config)
    scanned_model, scanned_init = init_params(scanned_config)
    stacked = map_towers(stack_layers, params)
    # Converted weights fit the scanned model exactly (names and shapes).
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned_init)
    jax.tree.map(np.testing.assert_array_equal, map_towers(unstack_layers, stacked), params)

    images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
    tokens = jax.random.randint(jax.random.key(2), (4, 8), 1, 49408)
    for method, inputs in (("encode_image", images), ("encode_text", tokens)):
        plain = model.apply({"params": params}, inputs, method=method)
        scanned = scanned_model.apply({"params": stacked}, inputs, method=method)
        np.testing.assert_allclose(scanned, plain, rtol=1e-5, atol=1e-6)


def embedding_loss_grads(config, params):
    """Gradients of a scalar of both towers' embeddings w.r.t. all parameters."""
    model = CLIP(config.model)
    images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
    tokens = jax.random.randint(jax.random.key(2), (4, 8), 1, 49408)

    def loss(p):
        image, text, scale, _ = model.apply({"params": p}, images, tokens)
        return scale * jnp.sum(image @ text.T) + jnp.sum(jnp.sin(image))

    return jax.jit(jax.grad(loss))(params)


def assert_grads_close(got, expected):
    """Recomputation or another loop may reorder float32 sums: tolerance relative
    to each tensor's scale, with a floor for gradients that are zero in exact
    arithmetic (attention key biases: softmax is invariant to them) and so come
    out as ~1e-6 noise."""
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
                     a, b, rtol=1e-5, atol=max(1e-5 * np.abs(b).max(), 1e-5)),
                 got, expected)


@pytest.mark.parametrize("remat,scan_layers,layer_loop", [
    ("full", False, "auto"), ("dots_saveable", True, "scan"), ("full", True, "unrolled")])
def test_remat_gives_the_same_gradients(remat, scan_layers, layer_loop):
    settings = {"model.scan_layers": scan_layers, "model.layer_loop": layer_loop}
    base = small_config(**settings)
    _, params = init_params(base)
    expected = embedding_loss_grads(base, params)
    got = embedding_loss_grads(small_config(**settings, **{"model.remat": remat}), params)
    assert_grads_close(got, expected)


def test_unrolled_loop_gives_the_scans_gradients():
    """Both loops over the same stacked params, both towers pooling their last
    block (three blocks, so the loop runs over two slices): the same gradients."""
    settings = {"model.scan_layers": True, "model.image.layers": 3, "model.text.layers": 3}
    scanned = small_config(**settings, **{"model.layer_loop": "scan"})
    _, params = init_params(scanned)
    unrolled = small_config(**settings, **{"model.layer_loop": "unrolled"})
    assert_grads_close(embedding_loss_grads(unrolled, params),
                       embedding_loss_grads(scanned, params))


def test_split_layers_cuts_the_stack_and_concatenates_its_gradient():
    """Groups of layers, as slicing gives them, and the gradient autodiff's
    slices would give: each group's gradient in its place along the stack."""
    stacked = {"kernel": jnp.arange(4 * 3 * 2, dtype=jnp.float32).reshape(4, 3, 2),
               "bias": jnp.arange(4 * 2, dtype=jnp.float32).reshape(4, 2)}
    groups = split_layers(stacked, (1, 2, 1))
    assert [group["kernel"].shape[0] for group in groups] == [1, 2, 1]
    np.testing.assert_array_equal(groups[1]["bias"], stacked["bias"][1:3])

    def loss(split):
        def weighted(params):
            pieces = split(params)
            return sum((i + 1.0) * jnp.sum(jnp.sin(piece["kernel"]) * jnp.sum(piece["bias"]))
                       for i, piece in enumerate(pieces))
        return weighted

    by_slices = lambda p: [jax.tree.map(lambda leaf: leaf[a:b], p)  # noqa: E731
                           for a, b in ((0, 1), (1, 3), (3, 4))]
    expected = jax.grad(loss(by_slices))(stacked)
    got = jax.grad(loss(lambda p: split_layers(p, (1, 2, 1))))(stacked)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.parametrize("backend, remat, unrolled", [
    ("cpu", "none", True), ("cpu", "full", True), ("gpu", "none", True),
    ("gpu", "dots_saveable", True), ("gpu", "dots_with_no_batch_dims_saveable", True),
    ("gpu", "full", False), ("gpu", "nothing_saveable", False), ("tpu", "none", True),
    ("tpu", "dots_saveable", True), ("tpu", "everything_saveable", True),
    ("tpu", "full", False), ("tpu", "nothing_saveable", False)])
def test_auto_layer_loop_scans_on_accelerators_only_where_remat_keeps_nothing(
        backend, remat, unrolled, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert unrolled_layer_loop("auto", remat=remat) == unrolled
    assert unrolled_layer_loop("auto", backend, remat) == unrolled
    assert unrolled_layer_loop("scan") is False and unrolled_layer_loop("unrolled") is True


def test_bf16_compute_keeps_float32_params_and_a_close_finite_loss():
    config = small_config(**{"mesh.data": 1})
    bf16_config = small_config(**{"mesh.data": 1, "model.dtype": "bfloat16"})
    model, params = init_params(config)
    bf16_model, bf16_params = init_params(bf16_config)
    assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.float32)}

    batch = random_batch(config)
    loss_fn = losses.contrastive_loss(sharding.make_mesh(config.mesh, jax.devices()[:1]),
                                      sharding.BATCH_AXES)

    def loss(m, p):
        image, text, scale, bias = m.apply({"params": p}, image_ops.normalize(batch["images"]),
                                           batch["tokens"])
        assert image.dtype == text.dtype == jnp.float32  # the loss runs in float32
        return loss_fn(image, text, scale, bias)["loss"]

    loss_32 = jax.jit(lambda p: loss(model, p))(params)
    loss_16, grads_16 = jax.jit(jax.value_and_grad(lambda p: loss(bf16_model, p)))(params)
    assert np.isfinite(float(loss_16))
    assert float(loss_16) == pytest.approx(float(loss_32), rel=2e-2)
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads_16))


def test_weight_decay_mask_ignores_the_stacked_layers_axis():
    params = abstract_params(small_config())
    mask = optim.decay_mask(params)
    stacked = jax.eval_shape(lambda p: map_towers(stack_layers, p), params)
    # Stacked params get the mask of any one block (resblocks_0), stacking nothing.
    assert optim.decay_mask(stacked) == map_towers(
        lambda tower: {**{k: v for k, v in tower.items() if not k.startswith("resblocks_")},
                       "resblocks": tower["resblocks_0"]}, mask)


def one_step(config, devices, params):
    """(metrics, new params on the host) of one AdamW step from `params` on a mesh
    over `devices`."""
    training = setup_training(config, devices)
    optimizer, shardings = training.optimizer, training.shardings
    # Blocked so one multi-device program runs at a time: 8 fake devices on few
    # cores can starve a collective's rendezvous otherwise.
    state = jax.block_until_ready(jax.jit(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                             opt_state=optimizer.init(p), model_state={}),
        out_shardings=shardings)(jax.device_put(params, shardings.params)))
    step = training.step
    state, metrics = step(state, random_batch(config))
    return jax.device_get(metrics), jax.device_get(state.params), shardings.params


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_scanned_train_step_on_a_3d_mesh_equals_unscanned(layer_loop):
    """data=2, fsdp=2, tensor=2: stacked params are sharded by their logical names
    (leading `layers` axis replicated) and one AdamW step matches the unscanned
    model's step on one device from the same weights."""
    config = small_config(**{"mesh.data": 1, "optimizer.warmup_steps": 0})
    _, params = init_params(config)
    plain_metrics, plain_params, _ = one_step(config, jax.devices()[:1], params)

    scanned_config = small_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                     "optimizer.warmup_steps": 0, "model.scan_layers": True,
                                     "model.layer_loop": layer_loop})
    scanned_metrics, scanned_params, shardings = one_step(
        scanned_config, jax.devices(), map_towers(stack_layers, params))
    query = shardings["visual"]["transformer"]["resblocks"]["attn"]["query"]
    assert query["kernel"].spec == P(None, "fsdp", "tensor", None)

    for key in plain_metrics:
        np.testing.assert_allclose(scanned_metrics[key], plain_metrics[key], rtol=1e-5)
    # Adam amplifies float noise in exactly-zero gradients (see test_train_step).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 map_towers(unstack_layers, scanned_params), plain_params)
