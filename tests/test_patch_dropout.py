"""Patch dropout (FLIP) and towers run at other sizes than their parameters':
what reaches the Transformer, the masks, mesh and GradCache equality, and the
positional-embedding resampling against a NumPy reference of the method."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import patch_dropout
from clip_jax.models.clip import CLIP
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer, resample_positions
from tests.conftest import small_config
from tests.test_train_step import MESHES, random_batch, run_steps

PATCHES = 16  # 32 px images in 8 px patches


def dropout_config(rate, **overrides):
    return small_config(**{"model.image.image_size": 32, "model.image.patch_dropout": rate,
                           "optimizer.warmup_steps": 0, **overrides})


@pytest.fixture(scope="module")
def clip_model():
    config = dropout_config(0.5)
    model = CLIP(config.model)
    batch = random_batch(config)
    images = jnp.asarray(batch["images"], jnp.float32) / 255
    variables = nn.unbox(model.init(jax.random.key(0), images, batch["tokens"]))
    return model, variables, images, jnp.asarray(batch["tokens"])


def transformer_inputs(model, variables, images, tokens, **kwargs):
    """The image tower's token sequence as the Transformer receives it (ln_pre's output)."""
    _, captured = model.apply(variables, images, tokens, capture_intermediates=True,
                              mutable=["intermediates"], **kwargs)
    return captured["intermediates"]["visual"]["ln_pre"]["__call__"][0]


@pytest.mark.parametrize("rate", [0.5, 0.75])
def test_the_transformer_gets_the_kept_patches_and_the_class_token(clip_model, rate):
    model, variables, images, tokens = clip_model
    batch, kept = images.shape[0], round((1 - rate) * PATCHES)
    keep = patch_dropout.keep_indices(0, 1, batch, PATCHES, rate)
    assert keep.shape == (batch, kept)
    seen = transformer_inputs(model, variables, images, tokens, train=True, patch_keep=keep)
    full = transformer_inputs(model, variables, images, tokens)  # inference: nothing dropped
    assert seen.shape == (batch, 1 + kept, 32) and full.shape == (batch, 1 + PATCHES, 32)
    # Each kept token is its patch's token of the full sequence, at whichever place.
    row = 3
    np.testing.assert_allclose(seen[row, 0], full[row, 0], atol=1e-6)  # the class token
    np.testing.assert_allclose(seen[row, 1:], full[row, 1 + keep[row]], atol=1e-5)


def test_keeping_every_patch_in_order_is_the_tower_without_dropout(clip_model):
    """The gather path with nothing dropped gives the same embeddings and
    parameter gradients as the plain tower."""
    model, variables, images, tokens = clip_model
    everything = jnp.broadcast_to(jnp.arange(PATCHES), (images.shape[0], PATCHES))

    def loss(params, patch_keep):
        image, text, scale, _ = model.apply({"params": params}, images, tokens,
                                            patch_keep=patch_keep)
        return jnp.sum(scale * image @ text.T), image

    (plain, plain_image), plain_grads = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], None)
    (gathered, gathered_image), gathered_grads = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], everything)
    np.testing.assert_allclose(gathered_image, plain_image, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gathered, plain, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 gathered_grads, plain_grads)


def test_masks_are_distinct_patches_differ_per_example_and_come_from_seed_step_position():
    keep = np.asarray(patch_dropout.keep_indices(0, 7, 16, PATCHES, 0.5))
    assert all(len(set(row)) == 8 and set(row) <= set(range(PATCHES)) for row in keep.tolist())
    assert len({tuple(sorted(row)) for row in keep.tolist()}) == 16  # every example its own
    again = patch_dropout.keep_indices(0, 7, 16, PATCHES, 0.5)
    np.testing.assert_array_equal(again, keep)
    # A row's mask depends on its position, not on the batch around it (meshes, GradCache).
    np.testing.assert_array_equal(patch_dropout.keep_indices(0, 7, 32, PATCHES, 0.5)[:16], keep)
    for other in (patch_dropout.keep_indices(0, 8, 16, PATCHES, 0.5),
                  patch_dropout.keep_indices(1, 7, 16, PATCHES, 0.5)):
        assert not np.array_equal(np.sort(other, axis=1), np.sort(keep, axis=1))
    assert patch_dropout.kept_patches(196, 0.5) == 98 and patch_dropout.kept_patches(196, 0.75) == 49
    assert patch_dropout.kept_patches(4, 0.9) == 1  # never no patch at all


def test_the_train_step_drops_and_evaluation_does_not():
    """Same parameters and batch: the step's loss changes with the rate; the
    model's inference path (what evaluators call) never reads it."""
    losses = {}
    for rate in (0.0, 0.5):
        config = dropout_config(rate)
        _, history = run_steps(config, jax.devices()[:1], 1, "sgd")
        losses[rate] = float(history[0]["loss"])
    assert losses[0.0] != losses[0.5]
    assert "patch_dropout" not in {field.name for field in
                                   VisionTransformer.__dataclass_fields__.values()}


def test_patch_dropout_on_8_devices_equals_one_device():
    mesh = MESHES[2]  # data x fsdp x tensor = 2 x 2 x 2
    one = run_steps(dropout_config(0.5), jax.devices()[:1], 2, "adamw")
    eight = run_steps(dropout_config(0.5, **{f"mesh.{k}": v for k, v in mesh.items()}),
                      jax.devices(), 2, "adamw")
    for metrics_1, metrics_8 in zip(one[1], eight[1]):
        np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 eight[0], one[0])


def test_patch_dropout_under_gradcache_equals_one_microbatch():
    """Scanned blocks with remat, as the zoo presets train; the k=4 step on 8
    data-parallel replicas, each summing its own micro-batches' gradients."""
    settings = {"batch_size": 32, "model.scan_layers": True, "model.remat": "full"}
    one = run_steps(dropout_config(0.75, **settings), jax.devices()[:1], 1, "sgd")
    four = run_steps(dropout_config(0.75, microbatches=4, **{"mesh.data": 8}, **settings),
                     jax.devices(), 1, "sgd")
    np.testing.assert_allclose(four[1][0]["loss"], one[1][0]["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 four[0], one[0])


def _triangle_resize_matrix(in_size, out_size):
    """[out, in] weights of 1-D linear resampling with half-pixel centres; when
    shrinking, the triangle is widened by in/out (antialiasing); each row sums to 1."""
    scale = out_size / in_size
    half_width = max(1.0, 1 / scale)
    weights = np.zeros((out_size, in_size))
    for out in range(out_size):
        centre = (out + 0.5) / scale - 0.5
        weights[out] = np.maximum(0, 1 - np.abs(np.arange(in_size) - centre) / half_width)
    return weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("old, new", [((8, 8), (4, 4)), ((8, 8), (3, 5)), ((4, 4), (6, 6)),
                                      ((4, 4), (7, 3)), ((7, 7), (16, 16))])
def test_positional_embeddings_resample_as_the_numpy_reference(old, new):
    grid = np.random.default_rng(0).normal(size=(*old, 5)).astype(np.float32)
    expected = np.einsum("oi,ijd,pj->opd", _triangle_resize_matrix(old[0], new[0]), grid,
                         _triangle_resize_matrix(old[1], new[1]))
    np.testing.assert_allclose(resample_positions(jnp.asarray(grid), new), expected,
                               rtol=1e-5, atol=1e-6)


def test_resampling_to_the_same_grid_is_the_identity():
    grid = jnp.asarray(np.random.default_rng(0).normal(size=(7, 7, 5)), jnp.float32)
    np.testing.assert_array_equal(resample_positions(grid, (7, 7)), grid)


def test_a_vit_at_another_resolution_uses_its_resampled_positions():
    """16 px parameters on 32 px images = a 32 px tower holding the resampled
    embeddings (e.g. 224 px weights evaluated at 336 px)."""
    arguments = dict(patch_size=8, width=32, layers=1, heads=2, embed_dim=16, activation="gelu")
    small, large = VisionTransformer(16, **arguments), VisionTransformer(32, **arguments)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    params = nn.unbox(small.init(jax.random.key(0), images[:, :16, :16]))["params"]
    positions = params["positional_embedding"]
    resampled = resample_positions(positions[1:].reshape(2, 2, 32), (4, 4)).reshape(16, 32)
    large_params = dict(params, positional_embedding=jnp.concatenate([positions[:1], resampled]))
    np.testing.assert_allclose(small.apply({"params": params}, images),
                               large.apply({"params": large_params}, images), rtol=1e-6)


def test_shorter_captions_use_the_first_positional_embeddings():
    arguments = dict(vocab_size=49408, width=32, layers=1, heads=2, embed_dim=16,
                     activation="gelu")
    tokens = jnp.asarray([[49406, 320, 1125, 49407, 0], [49406, 539, 49407, 0, 0]], jnp.int32)
    full, short = TextTransformer(8, **arguments), TextTransformer(5, **arguments)
    params = nn.unbox(full.init(jax.random.key(0), tokens))["params"]
    short_params = dict(params, positional_embedding=params["positional_embedding"][:5])
    np.testing.assert_allclose(full.apply({"params": params}, tokens),
                               short.apply({"params": short_params}, tokens), rtol=1e-6)
    with pytest.raises(ValueError, match="longer than context_length=5"):
        short.apply({"params": short_params}, jnp.zeros((1, 8), jnp.int32))
