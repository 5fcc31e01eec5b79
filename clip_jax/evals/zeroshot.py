"""Zero-shot classification: each image takes the class of its nearest prompt ensemble.

As in the CLIP paper (section 3.1.4), a class is the mean of the unit text
embeddings of all its prompt templates, renormalised.
"""

import numpy as np

from clip_jax.evals import ranking
from clip_jax.evals.base import EvalResult, row_counts
from clip_jax.evals.embed import embed_split, to_host
from clip_jax.models import l2_normalize


def class_prompts(task):
    """All prompts, class-major: [class 0 template 0, class 0 template 1, ...]."""
    return [task.edit_prompt(template.format(name))
            for name in task.class_names for template in task.templates]


def class_embeddings(encoders, variables, task):
    """Unit prompt-ensemble embeddings, host array [C, E]."""
    texts = encoders.texts(variables, class_prompts(task))  # [C*T, E], unit
    texts = texts.reshape(len(task.class_names), len(task.templates), -1)
    return np.asarray(l2_normalize(texts.mean(axis=1)))


def classification_ranks(mesh, images, classes, labels, k=5):
    """Host arrays (rank of the true class among the top k, k if not there [N];
    top-k class indices [N, k]) of unit image embeddings [N, E] (sharded over the
    batch axes) against unit class embeddings [C, E]; ties go to the lower class."""
    num_classes = classes.shape[0]
    _, top = ranking.sharded_top_k(mesh, images, classes, np.ones(num_classes, bool),
                                   k=min(k, num_classes))
    top, labels = to_host(top), to_host(labels)
    return ranking.first_hit_ranks(top, lambda indices: indices == labels[:, None]), top


class ZeroShot:
    """evaluator(variables) -> EvalResult with {prefix}/top1, /top5, /examples,
    /skipped; details: class names, labels and top-5 predictions per image."""

    def __init__(self, encoders, source, task, batch_size, prefix, workers=0):
        self.encoders, self.source, self.task = encoders, source, task
        self.batch_size, self.prefix, self.workers = batch_size, prefix, workers

    def __call__(self, variables, progress=False):
        classes = class_embeddings(self.encoders, variables, self.task)
        data = embed_split(self.encoders, variables, self.source, self.batch_size,
                           workers=self.workers, progress=progress)
        ranks, top = classification_ranks(self.encoders.mesh, data["images"], classes,
                                          data["labels"])
        labels, mask, is_record = (to_host(data[name]) for name in ("labels", "mask", "is_record"))
        rates = ranking.hit_rates(ranks, mask, (1, 5))
        metrics = {f"{self.prefix}/top1": rates[1], f"{self.prefix}/top5": rates[5],
                   **row_counts(self.prefix, mask, is_record)}
        details = {"class_names": list(self.task.class_names), "labels": labels[mask],
                   "top5": top[mask]}
        return EvalResult(metrics, details)
