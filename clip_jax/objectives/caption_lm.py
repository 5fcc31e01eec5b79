"""caption_lm: a Transformer decoder on the image embedding predicts the caption
left to right (teacher forcing; models.caption_decoder).

Loss: the next-token cross-entropy over the output vocabulary
(config.model.output_vocab), averaged over every predicted token of the
global batch (the words and the end token; not the padding after it).

Zero-shot: a prompt's score is its log-likelihood given the image divided by
its number of predicted tokens (length-normalised), so longer class names are
not penalised for their length.
"""

import jax
import jax.numpy as jnp

from clip_jax import image_ops
from clip_jax.models import tokens as token_layout
from clip_jax.models.caption_decoder import CaptionModel
from clip_jax.objectives.base import Objective
from clip_jax.objectives.bow_predict import output_classes

# Prompts decoded at once by the zero-shot scorer: [images x this, T, width] activations.
PROMPTS_AT_ONCE = 8


def _cross_entropy(logits, labels):
    """-log softmax(logits)[label] over the last axis, as optax's
    softmax_cross_entropy_with_integer_labels computes it, but with the label's
    logit picked by a masked sum over the vocabulary instead of a gather. XLA's
    SPMD partitioner aborts on that gather when the vocabulary is split over
    `tensor` inside a shard_map manual over the batch's replica axes (CoCa under
    GradCache: train_step._reduced_once); the masked sum is a reduction
    that it splits like the normaliser's."""
    vocab = jnp.arange(logits.shape[-1])
    label_logits = jnp.sum(jnp.where(vocab == labels[..., None], logits, 0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - label_logits


def token_cross_entropy(logits, tokens, classes):
    """(cross-entropy [B, L-1] of each next token, its target class [B, L-1],
    bool mask [B, L-1] of the predicted ones) from logits [B, L-1, V]
    (logits[:, j] predict token j+1) and tokens [B, L]; `classes` maps token
    ids to output classes."""
    targets = classes[tokens[:, 1:]]
    return _cross_entropy(logits, targets), targets, token_layout.next_token_mask(tokens)


def batch_loss(model, mesh, config):
    """loss(params, model_state, batch) -> (metrics, model_state)."""
    del mesh  # a mean over the batch-sharded tokens: jit reduces it over devices
    classes = output_classes(config.model)

    def loss(params, model_state, batch):
        tokens = batch["tokens"]
        logits, model_state = model.apply(
            {"params": params, **model_state}, image_ops.normalize(batch["images"]), tokens,
            train=True, patch_keep=batch.get("patch_keep"),
            mutable=list(model_state))  # [B, L, V]
        logits = logits[:, :-1]  # the last position predicts nothing
        cross_entropy, targets, predicted = token_cross_entropy(logits, tokens, classes)
        count = jnp.maximum(predicted.sum(), 1)
        hits = jnp.argmax(logits, axis=-1) == targets
        return {"loss": jnp.sum(cross_entropy * predicted) / count,
                "token_top1": jnp.sum(hits & predicted) / count}, model_state

    return loss


def prompt_scorer(model):
    """scores(variables, images, prompts [P, T]) -> [N, P]: the mean log-likelihood
    per predicted token of each prompt given each image. The image tower runs once;
    the decoder PROMPTS_AT_ONCE prompts at a time for all images."""
    classes = output_classes(model.config)

    def scores(variables, images, prompts):
        embeddings = model.apply(variables, image_ops.normalize(images),
                                 method=model.encode_image)  # [N, E]

        def score(prompt):  # [T] -> [N]
            rows = jnp.broadcast_to(prompt, (embeddings.shape[0], prompt.shape[0]))
            logits = model.apply(variables, embeddings, rows, method=model.decode)
            cross_entropy, _, predicted = token_cross_entropy(logits[:, :-1], rows, classes)
            return -jnp.sum(cross_entropy * predicted, axis=-1) / jnp.maximum(
                predicted.sum(axis=-1), 1)

        return jax.lax.map(score, prompts, batch_size=PROMPTS_AT_ONCE).T

    return scores


OBJECTIVE = Objective(name="caption_lm", model=CaptionModel, batch_loss=batch_loss,
                      prompt_scorer=prompt_scorer)
