"""config.model.attention="cudnn": the padding that lets cuDNN's kernel train
on odd sequence lengths changes no value or gradient. The kernel itself needs
a GPU; here jax.nn.dot_product_attention's XLA implementation computes the
padded call, so what is checked is the padding and its mask (the compiled
kernel for an H100 is in tests/test_gpu_target.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models.cudnn_attention import cudnn_attention
from tests.test_splash import HEAD_DIM, loss_and_grads, qkv


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
    query, key, value = qkv(tokens)
    out = jax.jit(lambda q, k, v: padded_xla(q, k, v, causal=causal))(query, key, value)
    expected = jax.nn.dot_product_attention(query, key, value, is_causal=causal)
    assert out.shape == expected.shape == (2, tokens, 2, HEAD_DIM)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-6)

    ours = loss_and_grads(lambda q, k, v: padded_xla(q, k, v, causal=causal), query, key, value)
    reference = loss_and_grads(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal), query, key, value)
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-5)
    for grad, expected_grad in zip(ours[1], reference[1]):
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)


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
