"""CLIP's symmetric contrastive loss over the global batch, computed shard-locally.

Each device holds `local` rows of the batch. It all-gathers both embeddings and
computes only its own rows of the image->text and text->image logits, so its
logits are [B_local, B_global], never [B_global, B_global]. The loss is the mean
over all 2 * B_global rows, identical to the paper's pseudocode on one device.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def _cross_entropy_sum(logits, labels):
    """Sum over rows of -log softmax(logits)[label]; logits [N, C], labels [N]."""
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked)


def local_contrastive_loss(local_image, local_text, logit_scale, *, axis_names):
    """Global-batch loss and in-batch top-1 accuracies, from inside shard_map.

    local_image, local_text: [B_local, E] unit embeddings; logit_scale: scalar.
    Returns ({"loss", "i2t_top1", "t2i_top1"}), each already reduced over devices.
    """
    global_image = jax.lax.all_gather(local_image, axis_names, tiled=True)  # [B_global, E]
    global_text = jax.lax.all_gather(local_text, axis_names, tiled=True)  # [B_global, E]
    local_batch, global_batch = local_image.shape[0], global_image.shape[0]
    # Row r of this shard is example shard_index * B_local + r of the global batch.
    labels = jax.lax.axis_index(axis_names) * local_batch + jnp.arange(local_batch)

    image_to_text = logit_scale * local_image @ global_text.T  # [B_local, B_global]
    text_to_image = logit_scale * local_text @ global_image.T  # [B_local, B_global]
    loss_sum = _cross_entropy_sum(image_to_text, labels) + _cross_entropy_sum(text_to_image, labels)
    hits = jnp.stack([jnp.sum(jnp.argmax(image_to_text, -1) == labels),
                      jnp.sum(jnp.argmax(text_to_image, -1) == labels)])
    loss_sum, hits = jax.lax.psum((loss_sum, hits), axis_names)
    return {
        "loss": loss_sum / (2 * global_batch),
        "i2t_top1": hits[0] / global_batch,
        "t2i_top1": hits[1] / global_batch,
    }


def contrastive_loss(mesh, batch_axes):
    """Returns loss_fn(image [B,E], text [B,E], logit_scale) -> metrics dict, with
    the batch dimension sharded over `batch_axes` of `mesh`."""
    return jax.shard_map(
        functools.partial(local_contrastive_loss, axis_names=tuple(batch_axes)),
        mesh=mesh,
        in_specs=(P(batch_axes), P(batch_axes), P()),
        out_specs=P(),
    )
