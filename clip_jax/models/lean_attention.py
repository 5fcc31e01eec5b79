"""Full-sequence attention with a hand-written backward pass, for XLA:CPU.

XLA's generic attention (jax.nn.dot_product_attention, implementation="xla")
contracts the [B, T, N, H] projections in place, and autodiff differentiates
the softmax through a reduction over the [B, N, T, S] scores that XLA:CPU fuses
into the score matmul. Here the heads move in front once ([B, N, T, H], so every
product is a plain batched matmul), and the backward pass is FlashAttention's
(Dao et al. 2022, appendix B.2): dS = P * (dP - rowsum(dO * O)), a
reduction over the head dimension, not the key one. ViT-B/16 shapes, batch 16
with half the patches ([16, 99, 12, 64]), one layer forward and backward:
37.7 ms -> 20.5 ms on the 2-core VM (docs/benchmarks.md). Values and gradients
are XLA's up to float rounding (tests/test_model.py).

It applies where models/lean_ops.py's passes do (CPU by default,
config.model.lean_backward forces it), and only in place of implementation
"xla": cuDNN and splash are fused kernels with their own backward passes.
"""

import jax
import jax.numpy as jnp

from clip_jax.models.lean_ops import hand_written_backward

# What jax.nn.dot_product_attention adds to masked logits: finite, so a row with
# every key masked gets uniform weights rather than NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention(query, key, value, mask=None, is_causal=False):
    """Softmax attention of query [B, T, N, H] over key and value [B, S, N, H] ->
    [B, T, N, H]; `mask` bool, broadcastable to [B, N, T, S], hides the keys
    where False; `is_causal` hides the keys after each query's own position.
    jax.nn.dot_product_attention's XLA computation, with the lean backward pass
    where it applies."""
    if not hand_written_backward():
        return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal)
    if is_causal:
        seen = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
        mask = seen if mask is None else jnp.logical_and(mask, seen)
    return lean_attention(query, key, value, mask)


def _heads_first(x):
    return jnp.swapaxes(x, 1, 2)  # [B, T, N, H] <-> [B, N, T, H]


def _probabilities(query_heads, key_heads, mask):
    """float32 softmax weights [B, N, T, S] of the 1/sqrt(H)-scaled logits."""
    logits = jnp.einsum("bnth,bnsh->bnts", query_heads, key_heads,
                        preferred_element_type=jnp.float32)
    logits = logits * (query_heads.shape[-1] ** -0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    return jax.nn.softmax(logits, axis=-1)


def _forward(query, key, value, mask):
    query_heads, key_heads, value_heads = map(_heads_first, (query, key, value))
    weights = _probabilities(query_heads, key_heads, mask).astype(value.dtype)
    attended_heads = jnp.einsum("bnts,bnsh->bnth", weights, value_heads)
    residuals = (query_heads, key_heads, value_heads, weights, attended_heads, mask)
    return _heads_first(attended_heads), residuals


@jax.custom_vjp
def lean_attention(query, key, value, mask):
    """`attention` with the hand-written backward pass (on any backend); `mask`
    a bool array broadcastable to [B, N, T, S], or None."""
    return _forward(query, key, value, mask)[0]


def _backward(residuals, grad):
    query_heads, key_heads, value_heads, weights, attended_heads, mask = residuals
    grad_heads = _heads_first(grad)
    value_grad = jnp.einsum("bnts,bnth->bnsh", weights, grad_heads)
    weights_grad = jnp.einsum("bnth,bnsh->bnts", grad_heads, value_heads,
                              preferred_element_type=jnp.float32)
    # rowsum(P * dP) = rowsum(dO * O): the softmax's correction, over H, not S.
    correction = jnp.sum(grad_heads.astype(jnp.float32) * attended_heads.astype(jnp.float32),
                         axis=-1, keepdims=True)
    logits_grad = (weights.astype(jnp.float32) * (weights_grad - correction)
                   * (query_heads.shape[-1] ** -0.5))
    if mask is not None:  # a row with every key masked has weights, but no gradient
        logits_grad = jnp.where(mask, logits_grad, 0.0)
    logits_grad = logits_grad.astype(query_heads.dtype)
    query_grad = jnp.einsum("bnts,bnsh->bnth", logits_grad, key_heads)
    key_grad = jnp.einsum("bnts,bnth->bnsh", logits_grad, query_heads)
    return (_heads_first(query_grad), _heads_first(key_grad), _heads_first(value_grad),
            None)


lean_attention.defvjp(_forward, _backward)
