"""Splash attention (config.model.attention="splash"): the Pallas TPU
flash-attention kernel that ships with JAX (jax.experimental.pallas.ops.tpu.
splash_attention), wrapped to take and give what jax.nn.dot_product_attention
does: [B, T, N, H] queries and [B, S, N, H] keys and values (S = T but for
cross-attention), scaled by H ** -0.5, optionally causal.

The kernel is used, not rewritten; this module only adapts shapes to it:
- it attends one example's [N, T, H] at a time (vmapped over the batch) and
  expects the queries already scaled;
- its blocks are multiples of 128 tokens, so queries and keys are padded to
  one each and the padded keys are masked out (padded queries attend to the
  real keys and their rows are dropped), and the head dim is zero-padded to a multiple of 128,
  TPU's lane width, which changes no dot product;
- Mosaic kernels are opaque to XLA's partitioner, so on a mesh the kernel runs
  per device inside shard_map, over the batch and head axes the activation
  rules give the queries (the sequence and head dim are kept whole).
Lowered for any other platform the kernel runs in Pallas interpret mode: slow,
for tests on CPU only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask

from clip_jax.models.partitioning import per_device_attention_spec

LANES = 128  # the kernel's block sizes are multiples of this; so is TPU's lane width
BLOCKS = (512, 256, 128)  # tokens per block tried, largest first


def _round_up(size, multiple):
    return -(-size // multiple) * multiple


def padded_length(tokens):
    """Sequence length the kernel computes on for `tokens` real ones."""
    return _round_up(tokens, LANES)


def block_size(padded):
    """The largest block of BLOCKS that tiles a padded sequence."""
    return next(block for block in BLOCKS if padded % block == 0)


def attention_mask(keys, padded_queries, padded_keys, causal):
    """[padded_queries, padded_keys] bool, True where a query may attend to a
    key: the `keys` real ones only (and not later ones if causal)."""
    query, key = np.arange(padded_queries)[:, None], np.arange(padded_keys)[None, :]
    allowed = np.broadcast_to(key < keys, (padded_queries, padded_keys))
    return allowed & (key <= query) if causal else allowed


def _kernel(queries, keys, heads, causal, interpret):
    """The kernel for one pair of sequence lengths; made at each trace, not
    cached, as it holds arrays of the trace it was made in."""
    padded_queries, padded_keys = padded_length(queries), padded_length(keys)
    block_q, block_kv = block_size(padded_queries), block_size(padded_keys)
    mask = splash_attention_mask.NumpyMask(
        attention_mask(keys, padded_queries, padded_keys, causal))
    sizes = splash_attention_kernel.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    return splash_attention_kernel.make_splash_mha_single_device(
        splash_attention_mask.MultiHeadMask([mask] * heads), block_sizes=sizes,
        interpret=interpret)


def _local_attention(query, key, value, causal, interpret):
    """Splash attention of [B, T, N, H] queries and [B, S, N, H] keys and values
    held on one device."""
    queries, heads, head_dim = query.shape[1:]
    keys = key.shape[1]
    padded_dim = _round_up(head_dim, LANES)

    def to_kernel(x):  # [B, T, N, H] -> [B, N, T_padded, H_padded]
        tokens = x.shape[1]
        x = jnp.pad(x, ((0, 0), (0, padded_length(tokens) - tokens), (0, 0),
                        (0, padded_dim - head_dim)))
        return jnp.swapaxes(x, 1, 2)

    query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
    kernel = _kernel(queries, keys, heads, causal, interpret)
    attended = jax.vmap(kernel)(to_kernel(query), to_kernel(key), to_kernel(value))
    return jnp.swapaxes(attended, 1, 2)[:, :queries, :, :head_dim]


def _per_platform(query, key, value, causal):
    """The Mosaic kernel when the program is lowered for a TPU, the interpreted
    one for any other platform: chosen at lowering, not by the attached backend,
    so a program traced on a CPU host compiles the real kernel for TPU devices
    (clip_jax/tpu_topology.py)."""
    kernel = functools.partial(_local_attention, causal=causal)
    return jax.lax.platform_dependent(
        query, key, value, tpu=functools.partial(kernel, interpret=False),
        default=functools.partial(kernel, interpret=True))


def splash_attention(query, key, value, causal=False):
    """[B, T, N, H] queries, [B, S, N, H] keys and values -> [B, T, N, H], as
    jax.nn.dot_product_attention(query, key, value, is_causal=causal)."""
    local = functools.partial(_per_platform, causal=causal)
    mesh = jax.sharding.get_abstract_mesh()
    spec = per_device_attention_spec()
    if mesh.empty or spec is None:
        return local(query, key, value)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(query, key, value)
