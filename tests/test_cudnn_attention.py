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
