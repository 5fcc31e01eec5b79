"""What an objective is made of (see clip_jax.objectives)."""

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    # The flax Module class, built as model(config.model, locked=(tower, ...)); its
    # __call__ takes (images [B,H,W,3], tokens [B,L], train, patch_keep) and it has
    # encode_image.
    model: type
    # batch_loss(model, mesh, config) -> loss(params, model_state, batch) ->
    # (metrics with "loss", model_state): the loss over the global batch
    # {"images": uint8 [B,S,S,3], "tokens": int32 [B,L]}, sharded over the batch axes,
    # with "patch_keep" int32 [B,K] under patch dropout (passed to the model).
    batch_loss: Callable
    # Towers config.lock_<tower> may freeze.
    lockable: tuple = ("image",)
    # Whether the model embeds text (encode_text): zero-shot by the nearest prompt
    # embedding, and retrieval; otherwise zero-shot by `prompt_scorer`, no retrieval.
    text_embeddings: bool = False
    # prompt_scorer(model) -> scores(variables, images uint8 [N,S,S,3], prompts int32
    # [P,T]) -> [N, P]: how well each prompt describes each image (higher is better),
    # for objectives without text embeddings.
    prompt_scorer: Optional[Callable] = None
    # embedding_loss(mesh, config) -> loss_fn(image [B,E], text [B,E], logit_scale,
    # logit_bias): the loss over unit embeddings, which GradCache (config.microbatches
    # > 1) splits the step around. None: no GradCache.
    embedding_loss: Optional[Callable] = None
    # example_loss(model, config) -> ExampleLoss: a term added to the embedding loss
    # that sums over examples (CoCa's captioning); GradCache computes it with each
    # micro-batch's second forward pass. None: the embedding loss is the whole loss.
    example_loss: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class ExampleLoss:
    """weight x (sum over the global batch's examples) / count(batch), with the
    embeddings the embedding loss takes from the same forward pass."""

    # forward(params, model_state, batch) -> ((image [b,E], text [b,E]) unit
    # embeddings, sums {name: scalar} over the batch's rows, model_state); sums[key]
    # is the loss's numerator, every sum is logged divided by the count.
    forward: Callable
    # count(batch) -> scalar: the divisor, from the whole global batch (no gradient).
    count: Callable
    key: str
    weight: float

    def metrics(self, sums, count):
        """{name: sum / count} and this term's share of the loss, `weight x mean`."""
        means = {name: total / count for name, total in sums.items()}
        return means, self.weight * means[self.key]
