"""config.model.attention="splash": the Pallas TPU kernel, run here in
interpret mode, equals XLA's attention in values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding

from clip_jax import sharding
from clip_jax.models import CLIP
from clip_jax.models.partitioning import PER_HEAD
from clip_jax.models.splash import attention_mask, block_size, padded_length, splash_attention
from clip_jax.sharding_rules import DEFAULT_RULES
from clip_jax.variables import dummy_inputs
from tests.conftest import small_config

HEAD_DIM = 64


def qkv(tokens, heads=2, batch=2, head_dim=HEAD_DIM, seed=0, keys=None):
    """Queries of `tokens`, keys and values of `keys` (default: `tokens`) tokens."""
    rngs = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(rng, (batch, length, heads, head_dim), jnp.float32)
            for rng, length in zip(rngs, (tokens, keys or tokens, keys or tokens))]


def loss_and_grads(attention, query, key, value):
    # A fixed random cotangent, so every output element's gradient path counts.
    weights = jax.random.normal(jax.random.key(9), query.shape)
    return jax.jit(jax.value_and_grad(lambda q, k, v: (attention(q, k, v) * weights).sum(),
                                      argnums=(0, 1, 2)))(query, key, value)


def assert_equals_xla_attention(attention, tokens, causal, atol, grad_atol, keys=None):
    """attention(q, k, v) gives jax.nn.dot_product_attention's values (within
    atol) and gradients (within grad_atol) on `tokens`-long sequences (of
    queries; keys and values `keys` long, default the same)."""
    query, key, value = qkv(tokens, keys=keys)
    out = jax.jit(attention)(query, key, value)
    expected = jax.nn.dot_product_attention(query, key, value, is_causal=causal)
    assert out.shape == expected.shape == (2, tokens, 2, HEAD_DIM)
    np.testing.assert_allclose(out, expected, atol=atol, rtol=atol)

    ours = loss_and_grads(attention, query, key, value)
    reference = loss_and_grads(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal), query, key, value)
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-5)
    for grad, expected_grad in zip(ours[1], reference[1]):
        np.testing.assert_allclose(grad, expected_grad, atol=grad_atol, rtol=grad_atol)


@pytest.mark.parametrize("tokens, causal", [
    (50, False),   # ViT-B/32 at 224 px: 49 patches + class token
    (197, False),  # ViT-B/16
    (257, False),  # ViT-L/14
    (577, False),  # ViT-L/14 at 336 px
    (77, True),    # the text tower: causal, CLIP's context length
])
def test_splash_equals_xla_attention_with_padding(tokens, causal):
    """Sequences padded to the kernel's 128-token blocks and head dim 64 padded
    to its 128 lanes give XLA's values and gradients."""
    assert_equals_xla_attention(lambda q, k, v: splash_attention(q, k, v, causal=causal),
                                tokens, causal, atol=2e-5, grad_atol=1e-4)


@pytest.mark.parametrize("queries, keys", [
    (76, 197),  # CoCa's decoder: caption positions reading ViT-B/16's image tokens
    (256, 50),  # CoCa's attention pool: 256 queries over ViT-B/32's tokens
    (1, 257),
])
def test_splash_cross_attention_pads_queries_and_keys_apart(queries, keys):
    assert_equals_xla_attention(splash_attention, queries, False, atol=2e-5, grad_atol=1e-4,
                                keys=keys)


def test_padding_and_blocks():
    assert [padded_length(t) for t in (50, 128, 197, 257, 577)] == [128, 128, 256, 384, 640]
    assert [block_size(p) for p in (128, 256, 384, 512, 640, 1024)] == [128, 256, 128, 512, 128, 512]
    mask = attention_mask(3, 4, 4, causal=False)
    assert mask[:, :3].all() and not mask[:, 3].any()  # padded key: never attended
    cross = attention_mask(3, 2, 4, causal=False)
    assert cross.shape == (2, 4) and cross[:, :3].all() and not cross[:, 3].any()
    causal = attention_mask(3, 4, 4, causal=True)
    np.testing.assert_array_equal(causal[:3, :3], np.tril(np.ones((3, 3), bool)))
    assert not causal[:, 3].any()


@pytest.mark.parametrize("mesh_sizes", [dict(data=4, tensor=2), dict(dcn_data=2, fsdp=4)])
def test_splash_on_a_mesh_runs_per_device_and_equals_xla(mesh_sizes):
    """On 8 devices the kernel runs inside shard_map over the batch and head
    axes, and gives what XLA's attention gives."""
    mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_sizes))
    query, key, value = qkv(50, heads=4, batch=8)
    with sharding.activation_sharding(mesh, DEFAULT_RULES):
        spec = nn.logical_to_mesh_axes(PER_HEAD)
    placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (query, key, value)]
    attend = sharding.with_activation_sharding(
        lambda q, k, v: splash_attention(q, k, v), mesh, DEFAULT_RULES)
    lowered = jax.jit(attend).lower(*placed)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    np.testing.assert_allclose(lowered.compile()(*placed),
                               jax.nn.dot_product_attention(query, key, value),
                               atol=2e-5, rtol=2e-5)


def test_a_clip_model_with_splash_attention_equals_xla():
    """Both towers' attention (the text's causal) through the kernel: the same
    embeddings as with XLA's. (Gradients are the kernel tests' above.)"""
    config = small_config()
    with config.unlocked():
        config.model.image.update(width=128, heads=2)  # head dim 64
        config.model.text.update(width=128, heads=2)
    splash_model = config.model.copy_and_resolve_references()
    with splash_model.unlocked():
        splash_model.attention = "splash"
    inputs = dummy_inputs(config.model)
    images = jax.random.normal(jax.random.key(1), inputs[0].shape)
    tokens = jax.random.randint(jax.random.key(2), inputs[1].shape, 1, 100)
    variables = nn.unbox(CLIP(config.model).init(jax.random.key(0), images, tokens))

    def embed(model_config):
        return jax.jit(lambda v: CLIP(model_config).apply(v, images, tokens)[:2]).lower(variables)

    lowered = embed(splash_model)
    assert lowered.as_text().count("splash") >= 2  # a block of each tower
    for ours, expected in zip(lowered.compile()(variables), embed(config.model).compile()(variables)):
        np.testing.assert_allclose(ours, expected, atol=1e-5)
