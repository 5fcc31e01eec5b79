"""Zero-shot classification: classify images by their nearest class prompt.

As in the CLIP paper (section 3.1.4), each class is represented by the mean of
the unit text embeddings of several prompt templates, renormalised.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import image_ops, sharding, tokenizer
from clip_jax.data import pipeline, synthetic_shapes
from clip_jax.models import l2_normalize

@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
    class_names: tuple
    templates: tuple
    # Applied to each filled-in prompt, e.g. to fix "a orange" -> "an orange".
    edit_prompt: Callable[[str], str] = lambda prompt: prompt

# Dataset name -> its class names and prompt templates.
ZEROSHOT_TASKS = {
    "synthetic_shapes": ZeroShotTask(
        class_names=tuple(synthetic_shapes.CLASS_NAMES),
        templates=("a {}.", "a photo of a {}.", "there is a {}.", "a picture of a {}.",
                   "an image of a {}."),
        edit_prompt=synthetic_shapes.with_articles,
    ),
}

def zeroshot_task(dataset):
    if dataset not in ZEROSHOT_TASKS:
        raise ValueError(f"config.zeroshot.dataset={dataset!r} has no class names/templates; "
                         f"known: {', '.join(ZEROSHOT_TASKS)}")
    return ZEROSHOT_TASKS[dataset]

def class_embeddings(encode_text, task, context_length):
    """Unit prompt-ensemble embeddings [C, E]; encode_text: tokens [N, L] -> [N, E]."""
    prompts = [task.edit_prompt(template.format(name))
               for name in task.class_names for template in task.templates]
    text = l2_normalize(encode_text(tokenizer.tokenize(prompts, context_length)))  # [C*T, E]
    text = text.reshape(len(task.class_names), len(task.templates), -1)
    return l2_normalize(text.mean(axis=1))

def _count_hits(variables, model, batch, classes):
    """(top-1 hits, top-5 hits, examples) for one masked batch; classes [C, E]."""
    images = l2_normalize(model.apply(variables, image_ops.normalize(batch["images"]),
                                      method=model.encode_image))  # [B, E]
    scores = images @ classes.T  # [B, C]
    top5 = jax.lax.top_k(scores, min(5, classes.shape[0]))[1]  # [B, 5]
    labels, mask = batch["labels"], batch["mask"]
    top1_hits = jnp.sum((top5[:, 0] == labels) & mask)
    top5_hits = jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) & mask)
    return top1_hits, top5_hits, jnp.sum(mask)

class ZeroShotEvaluator:
    """evaluator(variables) -> {"zeroshot/<dataset>/top1": float, ".../top5": float},
    computed on all devices of all hosts."""

    def __init__(self, config, model, mesh, variable_shardings):
        self.config, self.model, self.mesh = config, model, mesh
        self.task = zeroshot_task(config.zeroshot.dataset)
        self.batch_sharding = sharding.batch_sharding(mesh)
        replicated = sharding.replicated(mesh)
        self._encode_text = jax.jit(
            lambda variables, tokens: model.apply(variables, tokens, method=model.encode_text),
            in_shardings=(variable_shardings, replicated), out_shardings=replicated)
        self._count_hits = jax.jit(
            lambda variables, batch, classes: _count_hits(variables, model, batch, classes),
            in_shardings=(variable_shardings, self.batch_sharding, replicated),
            out_shardings=replicated)

    def __call__(self, variables):
        zs = self.config.zeroshot
        classes = class_embeddings(lambda tokens: self._encode_text(variables, tokens), self.task,
                                   self.config.model.text.context_length)
        totals = np.zeros(3)
        for local in pipeline.eval_batches(self.config, zs.dataset, zs.split, zs.label_key,
                                           zs.batch_size):
            batch = jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local)
            totals += np.array([int(v) for v in self._count_hits(variables, batch, classes)])
        prefix = f"zeroshot/{zs.dataset}"
        return {f"{prefix}/top1": totals[0] / totals[2], f"{prefix}/top5": totals[1] / totals[2]}
