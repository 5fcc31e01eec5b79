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
