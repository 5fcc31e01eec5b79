"""Global-batch contrastive losses, computed shard-locally inside shard_map.

softmax (CLIP): each device all-gathers both embeddings and computes only its
own rows of the image->text and text->image logits, so it holds [B_local,
B_global] logits, or [B_local, chunk] with chunking, never [B_global, B_global].
The loss is the mean over all 2 * B_global rows, identical to the paper's
pseudocode on one device.

distillation (OpenCLIP's DistillClipLoss): the student's image->text and
text->image rows against the softmax of a frozen teacher's rows over the same
global batch; each device gathers both models' embeddings and computes its own
rows, in column chunks like the softmax loss.

sigmoid (SigLIP, Zhai et al. 2023): every (image, text) pair is an independent
binary problem. Text shards travel around the batch axes with ppermute; each
device only ever holds [B_local, B_local] logits, or [B_local, chunk] with
chunking.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def _row_stats(queries, keys, scale, chunk_size):
    """(logsumexp [N], argmax [N]) of the rows of scale * queries @ keys.T.

    queries [N, E], keys [M, E]. With chunk_size > 0 the columns are visited in
    chunks under remat, so forward and backward hold [N, chunk_size] at a time.
    """
    if chunk_size <= 0 or chunk_size >= keys.shape[0]:
        logits = scale * queries @ keys.T
        return jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1)
    if keys.shape[0] % chunk_size:
        raise ValueError(f"config.loss.chunk_size={chunk_size} does not divide the global "
                         f"batch {keys.shape[0]}")
    chunks = keys.reshape(-1, chunk_size, keys.shape[-1])  # [M / c, c, E]

    @jax.checkpoint
    def visit(carry, chunk_and_index):
        lse, best, best_index = carry
        chunk, index = chunk_and_index
        logits = scale * queries @ chunk.T  # [N, c]
        chunk_best = jnp.max(logits, axis=-1)
        best_index = jnp.where(chunk_best > best, index * chunk_size + jnp.argmax(logits, -1),
                               best_index)
        return (jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=-1)),
                jnp.maximum(best, chunk_best), best_index), None

    # Built from `queries` so the carry varies over the same mesh axes as the body's output.
    lowest = jnp.full_like(queries[:, 0], -jnp.inf)
    init = (lowest, lowest, jnp.zeros_like(queries[:, 0], dtype=jnp.int32))
    (lse, _, best_index), _ = jax.lax.scan(visit, init, (chunks, jnp.arange(chunks.shape[0])))
    return lse, best_index


def local_softmax_loss(local_image, local_text, logit_scale, logit_bias=None, *, axis_names,
                       chunk_size=0):
    """CLIP loss and in-batch top-1 accuracies, from inside shard_map.

    local_image, local_text: [B_local, E] unit embeddings; logit_scale: scalar.
    The bias, if any, is ignored: it cancels in a softmax. Returns {"loss",
    "i2t_top1", "t2i_top1"}, each already reduced over devices.
    """
    del logit_bias
    global_image = jax.lax.all_gather(local_image, axis_names, tiled=True)  # [B_global, E]
    global_text = jax.lax.all_gather(local_text, axis_names, tiled=True)  # [B_global, E]
    local_batch, global_batch = local_image.shape[0], global_image.shape[0]
    # Row r of this shard is example shard_index * B_local + r of the global batch.
    labels = jax.lax.axis_index(axis_names) * local_batch + jnp.arange(local_batch)
    positives = logit_scale * jnp.sum(local_image * local_text, axis=-1)  # [B_local]

    loss_sum, hits = 0.0, []
    for queries, keys in ((local_image, global_text), (local_text, global_image)):
        lse, best = _row_stats(queries, keys, logit_scale, chunk_size)
        loss_sum += jnp.sum(lse - positives)
        hits.append(jnp.sum(best == labels))
    loss_sum, hits = jax.lax.psum((loss_sum, jnp.stack(hits)), axis_names)
    return {
        "loss": loss_sum / (2 * global_batch),
        "i2t_top1": hits[0] / global_batch,
        "t2i_top1": hits[1] / global_batch,
    }


def _distill_row_loss(queries, keys, scale, teacher_queries, teacher_keys, teacher_scale,
                      chunk_size):
    """[N]: cross-entropy of each row of the student's logits scale * queries @
    keys.T [N, M] against the softmax of the teacher's teacher_scale *
    teacher_queries @ teacher_keys.T: logsumexp(s_i) - sum_j softmax(t_i)_j s_ij.

    With 0 < chunk_size < M the columns are visited in chunks under remat, the
    teacher's softmax accumulated online (a running logsumexp and the weighted
    sum rescaled to it), so both hold [N, chunk_size] logits at a time."""
    def block(key_block, teacher_key_block):
        return (scale * queries @ key_block.T,
                jax.lax.stop_gradient(teacher_scale * teacher_queries @ teacher_key_block.T))

    if chunk_size <= 0 or chunk_size >= keys.shape[0]:
        student, teacher = block(keys, teacher_keys)
        return (jax.nn.logsumexp(student, axis=-1)
                - jnp.sum(jax.nn.softmax(teacher, axis=-1) * student, axis=-1))
    if keys.shape[0] % chunk_size:
        raise ValueError(f"config.loss.chunk_size={chunk_size} does not divide the global "
                         f"batch {keys.shape[0]}")

    @jax.checkpoint
    def visit(carry, chunks):
        student_lse, teacher_lse, weighted = carry
        student, teacher = block(*chunks)
        new_teacher_lse = jnp.logaddexp(teacher_lse, jax.nn.logsumexp(teacher, axis=-1))
        weighted = (weighted * jnp.exp(teacher_lse - new_teacher_lse)
                    + jnp.sum(jnp.exp(teacher - new_teacher_lse[:, None]) * student, axis=-1))
        return (jnp.logaddexp(student_lse, jax.nn.logsumexp(student, axis=-1)),
                new_teacher_lse, weighted), None

    def chunked(x):
        return x.reshape(-1, chunk_size, x.shape[-1])

    lowest = jnp.full_like(queries[:, 0], -jnp.inf)
    (student_lse, _, weighted), _ = jax.lax.scan(
        visit, (lowest, lowest, jnp.zeros_like(lowest)), (chunked(keys), chunked(teacher_keys)))
    return student_lse - weighted


def local_distill_loss(local_image, local_text, logit_scale, local_teacher_image,
                       local_teacher_text, *, teacher_scale, axis_names, chunk_size=0):
    """OpenCLIP's distillation term from inside shard_map: the mean over all 2 *
    B_global rows (image->text and text->image) of the student's cross-entropy
    against the teacher's softmax, the teacher's logits scaled by its own
    temperature `teacher_scale`. Holds [B_local, B_global] logits (or chunks)."""
    def gathered(x):
        return jax.lax.all_gather(x, axis_names, tiled=True)

    global_image, global_text = gathered(local_image), gathered(local_text)
    teacher_image, teacher_text = gathered(local_teacher_image), gathered(local_teacher_text)
    loss_sum = 0.0
    for queries, keys, teacher_queries, teacher_keys in (
            (local_image, global_text, local_teacher_image, teacher_text),
            (local_text, global_image, local_teacher_text, teacher_image)):
        loss_sum += jnp.sum(_distill_row_loss(queries, keys, logit_scale, teacher_queries,
                                              teacher_keys, teacher_scale, chunk_size))
    return jax.lax.psum(loss_sum, axis_names) / (2 * global_image.shape[0])


def _sigmoid_pair_loss(images, texts, logit_scale, logit_bias, has_positives, chunk_size):
    """-sum log sigmoid(z * (scale * images @ texts.T + bias)) over an [N, M] block:
    z = +1 on the diagonal (row i, column i) when `has_positives`, -1 elsewhere.
    With 0 < chunk_size < M the columns are visited in chunks under remat, holding
    [N, chunk_size] logits at a time."""
    rows = jnp.arange(images.shape[0])[:, None]

    def block_loss(block_texts, first_column):
        logits = logit_scale * images @ block_texts.T + logit_bias  # [N, c]
        if not has_positives:
            return -jnp.sum(jax.nn.log_sigmoid(-logits))
        columns = first_column + jnp.arange(block_texts.shape[0])[None, :]
        signs = jnp.where(rows == columns, 1.0, -1.0)
        return -jnp.sum(jax.nn.log_sigmoid(signs * logits))

    if chunk_size <= 0 or chunk_size >= texts.shape[0]:
        return block_loss(texts, 0)
    if texts.shape[0] % chunk_size:
        raise ValueError(f"config.loss.chunk_size={chunk_size} does not divide the per-device "
                         f"batch {texts.shape[0]}")
    chunks = texts.reshape(-1, chunk_size, texts.shape[-1])

    @jax.checkpoint
    def visit(total, chunk_and_index):
        chunk, index = chunk_and_index
        return total + block_loss(chunk, index * chunk_size), None

    # Built from `images` so the carry varies over the same mesh axes as the body's output.
    total, _ = jax.lax.scan(visit, jnp.zeros_like(images[0, 0]),
                            (chunks, jnp.arange(chunks.shape[0])))
    return total


def local_sigmoid_loss(local_image, local_text, logit_scale, logit_bias, *, axis_names,
                       chunk_size=0):
    """SigLIP loss from inside shard_map: -sum log sigmoid(z * logit) / B_global
    over all B_global^2 pairs (z = +1 for matching pairs, -1 otherwise).

    Holds [B_local, B_local] logits per hop, or [B_local, chunk_size] with chunking,
    so memory grows linearly in the global batch at a fixed device count."""
    num_shards = jax.lax.psum(1, axis_names)
    local_batch = local_image.shape[0]
    # Shard s sends its texts to shard s + 1, so at hop k this shard holds
    # the texts of shard (own - k); they match its images only at hop 0.
    ring = [(s, (s + 1) % num_shards) for s in range(num_shards)]

    def pair_loss(texts, positive):
        return _sigmoid_pair_loss(local_image, texts, logit_scale, logit_bias,
                                  positive, chunk_size)

    @jax.checkpoint
    def hop(carry, _):
        loss_sum, texts = carry
        texts = jax.lax.ppermute(texts, axis_names, ring)
        return (loss_sum + pair_loss(texts, False), texts), None

    loss_sum = pair_loss(local_text, True)
    (loss_sum, _), _ = jax.lax.scan(hop, (loss_sum, local_text), None, length=num_shards - 1)
    loss_sum = jax.lax.psum(loss_sum, axis_names)
    return {"loss": loss_sum / (local_batch * num_shards)}


# config.loss.kind -> the shard-local loss.
LOSSES = {"softmax": local_softmax_loss, "sigmoid": local_sigmoid_loss}


def contrastive_loss(mesh, batch_axes, kind="softmax", chunk_size=0):
    """Returns loss_fn(image [B,E], text [B,E], logit_scale, logit_bias=None) ->
    metrics dict, with the batch dimension sharded over `batch_axes` of `mesh`."""
    if kind not in LOSSES:
        raise ValueError(f"config.loss.kind={kind!r} is unknown; choose one of {', '.join(LOSSES)}")
    local_loss = functools.partial(LOSSES[kind], axis_names=tuple(batch_axes),
                                   chunk_size=chunk_size)

    def loss_fn(image, text, logit_scale, logit_bias=None):
        bias = jnp.zeros(()) if logit_bias is None else logit_bias
        return jax.shard_map(local_loss, mesh=mesh, in_specs=(P(batch_axes), P(batch_axes), P(), P()),
                             out_specs=P())(image, text, logit_scale, bias)

    return loss_fn


def distillation_loss(mesh, batch_axes, teacher_scale, chunk_size=0):
    """Returns distill_fn(image [B,E], text [B,E], logit_scale, teacher_image
    [B,E_t], teacher_text [B,E_t]) -> scalar: OpenCLIP's DistillClipLoss term over
    the global batch, the batch dimension sharded over `batch_axes` of `mesh`;
    `teacher_scale` (a number) is the teacher's temperature."""
    local_loss = functools.partial(local_distill_loss, teacher_scale=teacher_scale,
                                   axis_names=tuple(batch_axes), chunk_size=chunk_size)
    rows = P(batch_axes)
    return jax.shard_map(local_loss, mesh=mesh, in_specs=(rows, rows, P(), rows, rows),
                         out_specs=P())
