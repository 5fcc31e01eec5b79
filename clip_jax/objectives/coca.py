"""coca: CoCa (Yu et al. 2022), as OpenCLIP trains it. The contrastive loss of
the image and text embeddings over the global batch (clip_jax.losses, config.loss)
plus the decoder's next-token cross-entropy of the caption given the image:

  loss = clip_loss_weight x contrastive + caption_loss_weight x caption,

with OpenCLIP's defaults 1.0 and 2.0 (config.coca). The caption term is averaged
over every predicted token of the global batch (the words and the end token;
not the padding after it: OpenCLIP ignores label id 0, which is also the word
'!', so it differs where a caption holds '!'). Zero-shot and retrieval use the
contrastive embeddings, as for CLIP.
"""

import jax.numpy as jnp

from clip_jax import image_ops, losses, sharding
from clip_jax.models import tokens as token_layout
from clip_jax.models.coca import CoCa
from clip_jax.objectives.base import ExampleLoss, Objective
from clip_jax.objectives.bow_predict import output_classes
from clip_jax.objectives.caption_lm import token_cross_entropy
from clip_jax.objectives.contrastive import with_logit_params


def embedding_loss(mesh, config):
    """loss_fn(image, text, logit_scale, logit_bias) -> metrics: clip_loss_weight x
    the contrastive loss (logged unweighted as contrastive_loss)."""
    contrastive = losses.contrastive_loss(mesh, sharding.BATCH_AXES, config.loss.kind,
                                          config.loss.chunk_size)

    def loss_fn(image, text, logit_scale, logit_bias):
        metrics = contrastive(image, text, logit_scale, logit_bias)
        metrics["contrastive_loss"] = metrics["loss"]
        metrics["loss"] = config.coca.clip_loss_weight * metrics["loss"]
        return metrics

    return loss_fn


def predicted_tokens(batch):
    """The caption tokens the decoder predicts in the whole batch (its divisor)."""
    return jnp.maximum(jnp.sum(token_layout.next_token_mask(batch["tokens"])), 1)


def example_loss(model, config):
    """The caption term: sums of the next-token cross-entropy (and of correct
    argmax predictions) over a batch's predicted tokens."""
    classes = output_classes(config.model)

    def forward(params, model_state, batch):
        tokens = batch["tokens"]
        (image, text, _, _, logits), model_state = model.apply(
            {"params": params, **model_state}, image_ops.normalize(batch["images"]), tokens,
            train=True, patch_keep=batch.get("patch_keep"), mutable=list(model_state))
        # logits [B, L-1, V] predict tokens 1..L-1
        cross_entropy, targets, predicted = token_cross_entropy(logits, tokens, classes)
        hits = jnp.argmax(logits, axis=-1) == targets
        sums = {"caption_loss": jnp.sum(cross_entropy * predicted),
                "caption_token_top1": jnp.sum(hits & predicted)}
        return (image, text), sums, model_state

    return ExampleLoss(forward=forward, count=predicted_tokens, key="caption_loss",
                       weight=config.coca.caption_loss_weight)


def batch_loss(model, mesh, config):
    """loss(params, model_state, batch) -> (metrics, model_state): the whole batch
    in one forward pass."""
    contrastive = embedding_loss(mesh, config)
    caption = example_loss(model, config)

    def loss(params, model_state, batch):
        (image, text), sums, model_state = caption.forward(params, model_state, batch)
        logit_scale, logit_bias = model.apply({"params": params}, method="logit_params")
        metrics = with_logit_params(contrastive(image, text, logit_scale, logit_bias),
                                    logit_scale, logit_bias)
        means, caption_term = caption.metrics(sums, caption.count(batch))
        metrics.update(means, loss=metrics["loss"] + caption_term)
        return metrics, model_state

    return loss


OBJECTIVE = Objective(name="coca", model=CoCa, batch_loss=batch_loss,
                      lockable=("image", "text"), text_embeddings=True,
                      embedding_loss=embedding_loss, example_loss=example_loss)
