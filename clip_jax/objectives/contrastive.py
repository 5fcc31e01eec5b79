"""contrastive: CLIP. Image and text towers (the text tower a Transformer or a
bag of words, config.model.text_encoder) trained with the global-batch
contrastive loss of clip_jax.losses (config.loss), plus, when distilling
(config.distill), OpenCLIP's distillation term against a frozen teacher's
embeddings of the same batch (clip_jax.teacher)."""

from clip_jax import image_ops, losses, sharding
from clip_jax.models.clip import CLIP
from clip_jax.objectives.base import Objective


# The batch entries a teacher adds (clip_jax.teacher), which the loss reads.
TEACHER_INPUTS = ("teacher_image", "teacher_text")


def teacher_inputs(batch):
    """The teacher's entries of `batch` ({} when not distilling)."""
    return {key: batch[key] for key in TEACHER_INPUTS if key in batch}


def embedding_loss(mesh, config, teacher_scale=None):
    """loss_fn(image [B,E], text [B,E], logit_scale, logit_bias, **teacher_inputs)
    -> metrics over the global batch: losses.contrastive_loss with config.loss;
    given the teacher's temperature `teacher_scale`, plus config.distill.weight x
    the distillation term (logged as contrastive_loss and distill_loss)."""
    contrastive = losses.contrastive_loss(mesh, sharding.BATCH_AXES, config.loss.kind,
                                          config.loss.chunk_size)
    if teacher_scale is None:
        return contrastive
    distill = losses.distillation_loss(mesh, sharding.BATCH_AXES, teacher_scale,
                                       config.loss.chunk_size)

    def loss_fn(image, text, logit_scale, logit_bias, teacher_image, teacher_text):
        metrics = contrastive(image, text, logit_scale, logit_bias)
        metrics["contrastive_loss"] = metrics["loss"]
        metrics["distill_loss"] = distill(image, text, logit_scale, teacher_image, teacher_text)
        metrics["loss"] = metrics["loss"] + config.distill.weight * metrics["distill_loss"]
        return metrics

    return loss_fn


def with_logit_params(metrics, logit_scale, logit_bias):
    """`metrics` with the temperature (and bias, if any) added for logging."""
    metrics["logit_scale"] = logit_scale
    if logit_bias is not None:
        metrics["logit_bias"] = logit_bias
    return metrics


def batch_loss(model, mesh, config, teacher_scale=None):
    """loss(params, model_state, batch) -> (metrics, model_state): both towers on the
    whole batch, then the contrastive loss (and distillation: `embedding_loss`)."""
    loss_fn = embedding_loss(mesh, config, teacher_scale)

    def loss(params, model_state, batch):
        (image_embeddings, text_embeddings, logit_scale, logit_bias), model_state = model.apply(
            {"params": params, **model_state}, image_ops.normalize(batch["images"]),
            batch["tokens"], train=True, patch_keep=batch.get("patch_keep"),
            mutable=list(model_state))
        metrics = with_logit_params(
            loss_fn(image_embeddings, text_embeddings, logit_scale, logit_bias,
                    **teacher_inputs(batch)),
            logit_scale, logit_bias)
        return metrics, model_state

    return loss


OBJECTIVE = Objective(name="contrastive", model=CLIP, batch_loss=batch_loss,
                      lockable=("image", "text"), text_embeddings=True,
                      embedding_loss=embedding_loss)
