"""bow_predict: the image embedding predicts the caption's bag of words.

Loss: softmax cross-entropy between a linear head's distribution over the
output vocabulary (config.model.output_vocab) and the caption's normalised
word counts, averaged over the examples. The words are the caption's tokens
w_1..w_n; start, end and padding tokens are not words.

Zero-shot: a prompt's score is the mean over its words of log p(word | image),
i.e. minus the same cross-entropy with the prompt as the caption.
"""

import jax
import jax.numpy as jnp

from clip_jax import image_ops
from clip_jax.models import output_classes as output_classes_lib
from clip_jax.models import tokens as token_layout
from clip_jax.models.bag_of_words import BagOfWordsPredictor
from clip_jax.objectives.base import Objective


def output_classes(model_config):
    """int32 [vocab_size]: token id -> output class of the model's head."""
    return jnp.asarray(output_classes_lib.token_classes(model_config.output_vocab,
                                                  model_config.text.vocab_size))


def bag_of_words(tokens, classes, num_classes):
    """Normalised word counts [B, num_classes] of token rows [B, L]; `classes`
    [vocab_size] maps token ids to output classes. A row without words is zero."""
    words = token_layout.word_mask(tokens).astype(jnp.float32)  # [B, L]
    # A scatter-add per row, not a [B, L, V] one-hot: V may be 49,408.
    counts = jax.vmap(lambda row, weights: jnp.zeros(num_classes).at[row].add(weights))(
        classes[tokens], words)
    return counts / jnp.maximum(words.sum(axis=-1, keepdims=True), 1.0)


def cross_entropy(logits, targets):
    """-sum_v targets[:, v] log softmax(logits)[:, v]: [B] from [B, V] and [B, V]."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def batch_loss(model, mesh, config):
    """loss(params, model_state, batch) -> (metrics, model_state)."""
    del mesh  # a mean over the batch-sharded examples: jit reduces it over devices
    classes = output_classes(config.model)

    def loss(params, model_state, batch):
        logits, model_state = model.apply(
            {"params": params, **model_state}, image_ops.normalize(batch["images"]),
            train=True, patch_keep=batch.get("patch_keep"), mutable=list(model_state))  # [B, V]
        targets = bag_of_words(batch["tokens"], classes, logits.shape[-1])
        return {"loss": jnp.mean(cross_entropy(logits, targets))}, model_state

    return loss


def prompt_scorer(model):
    """scores(variables, images, prompts [P, T]) -> [N, P]: the mean over each
    prompt's words of log p(word | image)."""
    classes = output_classes(model.config)

    def scores(variables, images, prompts):
        logits = model.apply(variables, image_ops.normalize(images), method=model.word_logits)
        prompt_words = bag_of_words(prompts, classes, logits.shape[-1])  # [P, V]
        return jnp.einsum("nv,pv->np", jax.nn.log_softmax(logits), prompt_words,
                          precision=jax.lax.Precision.HIGHEST)

    return scores


OBJECTIVE = Objective(name="bow_predict", model=BagOfWordsPredictor, batch_loss=batch_loss,
                      prompt_scorer=prompt_scorer)
