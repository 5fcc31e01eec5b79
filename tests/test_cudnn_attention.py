"""config.model.attention="cudnn": the padding that lets cuDNN's kernel train
on odd sequence lengths changes no value or gradient. The kernel itself needs
a GPU; here jax.nn.dot_product_attention's XLA implementation computes the
padded call, so what is checked is the padding and its mask (the compiled
kernel for an H100 is in tests/test_gpu_target.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import sharding
from clip_jax.models import transformer
from clip_jax.models.cudnn_attention import cudnn_attention
from clip_jax.sharding_rules import DEFAULT_RULES, MESH_AXES
from tests.test_splash import assert_equals_xla_attention, qkv


def padded_xla(query, key, value, mask=None, causal=False):
    return cudnn_attention(query, key, value, mask=mask, causal=causal, implementation="xla")


@pytest.mark.parametrize("tokens, causal", [
    (50, False),   # ViT-B/32: even, passed through unpadded
    (197, False),  # ViT-B/16
    (257, False),  # ViT-L/14
    (577, False),  # ViT-L/14 at 336 px
    (77, True),    # the text tower: causal
])
def test_padded_attention_equals_unpadded(tokens, causal):
    assert_equals_xla_attention(lambda q, k, v: padded_xla(q, k, v, causal=causal),
                                tokens, causal, atol=2e-6, grad_atol=1e-5)


def test_padded_cross_attention_keeps_the_key_mask():
    """Queries and keys of different odd lengths (CoCa's decoder reading image
    tokens), with a per-example key mask: the padded key stays hidden and the
    caller's mask still applies."""
    query = qkv(77)[0]
    key, value = qkv(197, seed=1)[1:]
    key_mask = jnp.arange(197)[None, :] < jnp.array([[150], [197]])  # [B, S]
    mask = key_mask[:, None, None, :]
    out = padded_xla(query, key, value, mask=mask)
    expected = jax.nn.dot_product_attention(query, key, value, mask=mask)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-6)
    # The mask matters: the first example attends to 150 keys, not 197.
    unmasked = jax.nn.dot_product_attention(query, key, value)
    assert not np.allclose(out[0], unmasked[0], atol=1e-3)


def test_inside_a_partly_manual_mesh_it_runs_per_device(monkeypatch):
    """Under shard_map manual over `data` (GradCache's replicas) the kernel runs
    in a nested shard_map over fsdp and tensor, split over the batch and head
    axes: values and gradients as on the whole arrays, with a per-example key
    mask."""
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    nested = []
    real_shard_map = jax.shard_map
    monkeypatch.setattr(jax, "shard_map", lambda *a, **k: nested.append(k) or real_shard_map(
        *a, **k))
    query = qkv(77, batch=8)[0]
    key, value = qkv(197, batch=8, seed=1)[1:]
    mask = (jnp.arange(197)[None, :] < jnp.arange(150, 198, 6)[:, None])[:, None, None, :]
    rules = sharding.rules_without(DEFAULT_RULES, ("data",))

    def per_replica(query, key, value, mask):
        with nn.logical_axis_rules(rules):
            return padded_xla(query, key, value, mask=mask)

    def loss(query, key, value):
        attended = real_shard_map(per_replica, mesh=mesh, in_specs=jax.P("data"),
                                  out_specs=jax.P("data"), axis_names={"data"},
                                  check_vma=False)(query, key, value, mask)
        return jnp.sum(attended * jnp.cos(attended)), attended

    with jax.set_mesh(mesh):
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            query, key, value)
    assert nested and nested[0]["axis_names"] == set(MESH_AXES) - {"data"}
    expected = jax.nn.dot_product_attention(query, key, value, mask=mask)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-6)
    expected_grads = jax.grad(lambda q, k, v: jnp.sum(
        (a := jax.nn.dot_product_attention(q, k, v, mask=mask)) * jnp.cos(a)),
        argnums=(0, 1, 2))(query, key, value)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)


def _towers(attention, scan_layers, layer_loop, causal):
    return transformer.Transformer(layers=3, heads=2, causal=causal, activation="gelu",
                                   scan_layers=scan_layers, layer_loop=layer_loop,
                                   attention=attention)


@pytest.mark.parametrize("scan_layers, layer_loop", [(True, "scan"), (True, "unrolled"),
                                                     (False, "auto")])
@pytest.mark.parametrize("tokens, causal, pooled, masked", [
    (197, False, True, False),   # ViT-B/16: pooled class token
    (197, False, False, False),  # every token out
    (77, True, True, True),      # the text tower: causal, pooled at EOT, a key mask
])
def test_a_tower_pads_once_and_changes_no_value_or_gradient(
        monkeypatch, scan_layers, layer_loop, tokens, causal, pooled, masked):
    """A Transformer running cuDNN on an odd token count pads its stream once:
    every layer's call gets an even count with the last key marked as padding,
    and the tower's outputs and gradients equal XLA attention's."""
    calls = []

    def spied(query, key, value, mask=None, causal=False, padded_keys=0):
        calls.append((query.shape[1], key.shape[1], padded_keys))
        return cudnn_attention(query, key, value, mask=mask, causal=causal,
                               padded_keys=padded_keys, implementation="xla")

    monkeypatch.setattr(transformer, "cudnn_attention", spied)
    x = jax.random.normal(jax.random.key(0), (2, tokens, 32))
    pool = jnp.array([0, tokens - 3]) if pooled else None
    mask = (jnp.arange(tokens)[None] < jnp.array([[tokens], [tokens - 2]])) if masked else None
    reference = _towers("xla", scan_layers, layer_loop, causal)
    params = reference.init(jax.random.key(1), x)

    def loss_and_grads(attention):
        model = _towers(attention, scan_layers, layer_loop, causal)
        loss = lambda params, x: jnp.sum(jnp.sin(model.apply(params, x, pool, mask)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (loss, grads), (expected_loss, expected_grads) = loss_and_grads("cudnn"), loss_and_grads("xla")
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-4),
                 grads, expected_grads)
    full_blocks = 2 if pooled else 3
    assert calls == [(tokens + 1, tokens + 1, 1)] * (1 if layer_loop == "scan" else full_blocks)
