"""cuDNN's fused attention (config.model.attention="cudnn"), through
jax.nn.dot_product_attention(implementation="cudnn"), adapted to the sequence
lengths CLIP's towers have.

JAX refuses to train through the kernel on an odd number of query or key
tokens ("Unsupported sequence length"), and a ViT's are odd: 197 for ViT-B/16,
257 for ViT-L/14, 77 for the text tower (a class token beside a square number
of patches). It checks for an even length whenever a bias is present, and its
wrapper always passes one (an empty placeholder when there is none; seen in
jax 0.10.2 and 0.11.2). So an odd sequence is padded by one token: the padded
key is hidden by cuDNN's own padding mask (the real length of every sequence,
key_value_seq_lengths), and the padded query's row is dropped. One token adds
under 1% of the attention's work and keeps the kernel's mask-free path.

Padding and slicing in every layer costs whole passes over the queries, keys,
values and outputs (1.7 ms of a ViT-B/16 H100 step's 33.8 ms roofline bound,
docs/capacity.md), so a Transformer that runs cuDNN pads its token stream once
before its blocks instead and tells each layer how many trailing keys are
padding (`padded_keys`); the layer's call then needs no padding of its own.

JAX's batching rule for the padded call reshapes the sequence lengths to the
vmapped batch and fails when they are not batched, so under jax.vmap (the
stacked blocks' initialisation, models/transformer.py) the caller uses XLA's
attention instead.

JAX partitions the kernel with custom_partitioning, which fails on a mesh that
is manual over some axes and automatic over others (GradCache's backward pass
runs per data-parallel replica, train_step._reduced_once). There the
kernel runs per device inside a nested shard_map over the remaining axes,
split over the batch and head axes the activation rules give the queries.
"""

import jax
import jax.numpy as jnp

from clip_jax.models.partitioning import per_device_attention_spec


def _pad_tokens(x, extra):
    return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x


def cudnn_attention(query, key, value, mask=None, causal=False, padded_keys=0,
                    implementation="cudnn"):
    """Softmax attention of query [B, T, N, H] over key and value [B, S, N, H]
    -> [B, T, N, H], as jax.nn.dot_product_attention computes it; `mask` bool,
    broadcastable to [B, N, T, S], hides the keys where False; the last
    `padded_keys` keys are padding, hidden by cuDNN's padding mask.
    `implementation` is jax.nn.dot_product_attention's (tests pass "xla" to check
    the padding on a machine without cuDNN)."""
    def attend(query, key, value, mask):
        return _padded_attention(query, key, value, mask, causal, padded_keys, implementation)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.manual_axes or not mesh.auto_axes:
        return attend(query, key, value, mask)
    spec = per_device_attention_spec() or jax.P(None, None, None, None)
    mask_spec = None if mask is None else jax.P(spec[0] if mask.shape[0] > 1 else None,
                                                spec[2] if mask.shape[1] > 1 else None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec, mask_spec),
                         out_specs=spec, axis_names=set(mesh.auto_axes),
                         check_vma=False)(query, key, value, mask)


def _padded_attention(query, key, value, mask, causal, padded_keys, implementation):
    """cudnn_attention on arrays the kernel's own partitioning places."""
    tokens, sources = query.shape[1], key.shape[1]
    extra_queries, extra_keys = tokens % 2, sources % 2
    if not (extra_queries or extra_keys or padded_keys):
        return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=causal,
                                            implementation=implementation)
    query = _pad_tokens(query, extra_queries)
    key, value = _pad_tokens(key, extra_keys), _pad_tokens(value, extra_keys)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], tokens, sources))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, extra_queries), (0, extra_keys)))
    real_keys = jnp.full((query.shape[0],), sources - padded_keys, jnp.int32)
    attended = jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=causal, key_value_seq_lengths=real_keys,
        implementation=implementation)
    return attended[:, :tokens]
