"""contrastive: CLIP. Image and text towers (the text tower a Transformer or a
bag of words, config.model.text_encoder) trained with the global-batch
contrastive loss of clip_jax.losses (config.loss)."""

from clip_jax import image_ops, losses, sharding
from clip_jax.models.clip import CLIP
from clip_jax.objectives.base import Objective


def embedding_loss(mesh, config):
    """loss_fn(image [B,E], text [B,E], logit_scale, logit_bias) -> metrics over the
    global batch (losses.contrastive_loss with config.loss)."""
    return losses.contrastive_loss(mesh, sharding.BATCH_AXES, config.loss.kind,
                                   config.loss.chunk_size)


def with_logit_params(metrics, logit_scale, logit_bias):
    """`metrics` with the temperature (and bias, if any) added for logging."""
    metrics["logit_scale"] = logit_scale
    if logit_bias is not None:
        metrics["logit_bias"] = logit_bias
    return metrics


def batch_loss(model, mesh, config):
    """loss(params, model_state, batch) -> (metrics, model_state): both towers on the
    whole batch, then the contrastive loss."""
    loss_fn = embedding_loss(mesh, config)

    def loss(params, model_state, batch):
        (image_embeddings, text_embeddings, logit_scale, logit_bias), model_state = model.apply(
            {"params": params, **model_state}, image_ops.normalize(batch["images"]),
            batch["tokens"], train=True, patch_keep=batch.get("patch_keep"),
            mutable=list(model_state))
        metrics = with_logit_params(
            loss_fn(image_embeddings, text_embeddings, logit_scale, logit_bias),
            logit_scale, logit_bias)
        return metrics, model_state

    return loss


OBJECTIVE = Objective(name="contrastive", model=CLIP, batch_loss=batch_loss,
                      lockable=("image", "text"), text_embeddings=True,
                      embedding_loss=embedding_loss)
