"""Patch dropout (FLIP, Li et al. 2023; OpenCLIP's `patch_dropout`): which patch
tokens each training image keeps.

The kept set of an example is drawn from (run seed, step, position of the
example in the global batch) alone, so a run is deterministic, resumes
bitwise, and gives the same masks on any mesh and under GradCache's
micro-batches. The image tower then encodes only those patches plus the class
token (models/vit.py): the dropped ones are removed from the sequence, not
zeroed, so the tower's FLOPs fall with them.
"""

import jax
import jax.numpy as jnp

from clip_jax.models.partitioning import BATCH, constrain

# Folded into the run seed so the masks are independent of the parameter init.
_STREAM = 0x706472  # "pdr"


def kept_patches(patches, rate):
    """How many of `patches` patch tokens an image keeps at dropout `rate`:
    round((1 - rate) * patches), at least one."""
    return max(1, round((1 - rate) * patches))


def keep_indices(seed, step, batch_size, patches, rate):
    """int32 [batch_size, K], K = kept_patches(patches, rate): row i holds the
    row-major grid indices of the patches example i of train step `step` keeps,
    K distinct ones chosen uniformly at random.

    Positions are pinned to the batch sharding (under the train step's rules),
    so each device draws only its own rows' masks."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), step)
    positions = constrain(jnp.arange(batch_size), (BATCH,))
    noise = constrain(jax.vmap(
        lambda i: jax.random.uniform(jax.random.fold_in(key, i), (patches,)))(positions),
        (BATCH, None))  # [B, N]
    # A sort, not top_k: XLA partitions a sort over its other axes, top_k not.
    kept = jnp.argsort(noise, axis=-1)[:, :kept_patches(patches, rate)]
    return constrain(kept.astype(jnp.int32), (BATCH, None))
