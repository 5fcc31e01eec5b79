"""Zero-shot classification: each image takes the class whose prompts describe it best.

Contrastive models (`ZeroShot`): as in the CLIP paper (section 3.1.4), a class
is the mean of the unit text embeddings of all its prompt templates,
renormalised, and an image takes the nearest class.

Models without a text tower (`PromptScoreZeroShot`, the bow_predict and
caption_lm objectives): the objective scores every prompt given the image
(e.g. its mean log-likelihood per token) and a class scores the mean over its
templates. Both report the same metrics, so the objectives compare on one
scale (CLIP paper, Figure 2).
"""

import jax
import numpy as np

from clip_jax import sharding, tokenizer
from clip_jax.evals import ranking
from clip_jax.evals.base import EvalResult, row_counts
from clip_jax.evals.embed import embed_split
from clip_jax.evals.encoders import to_host

TOP_K = 5


def classification_ranks(mesh, images, classes, labels, k=TOP_K):
    """Host arrays (rank of the true class among the top k, k if not there [N];
    top-k class indices [N, k]) of unit image embeddings [N, E] (sharded over the
    batch axes) against unit class embeddings [C, E]; ties go to the lower class."""
    num_classes = classes.shape[0]
    _, top = ranking.sharded_top_k(mesh, images, classes, np.ones(num_classes, bool),
                                   k=min(k, num_classes))
    top, labels = to_host(top), to_host(labels)
    return ranking.first_hit_ranks(top, lambda indices: indices == labels[:, None]), top


def ranks_of_scores(scores, labels, k=TOP_K):
    """(rank of the true class among the top k, k if not there [N]; top-k class
    indices [N, k]) of class scores [N, C] (higher is better), host arrays; ties
    go to the lower class, as in classification_ranks."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :min(k, scores.shape[1])]
    return ranking.first_hit_ranks(top, lambda indices: indices == labels[:, None]), top


def _result(prefix, task, ranks, top, data):
    """EvalResult with {prefix}/top1, /top5, /examples, /skipped and the details the
    report draws, from the ranks and top-k of an embedded split `data`."""
    labels, mask, is_record = (to_host(data[name]) for name in ("labels", "mask", "is_record"))
    rates = ranking.hit_rates(ranks, mask, (1, 5))
    metrics = {f"{prefix}/top1": rates[1], f"{prefix}/top5": rates[5],
               **row_counts(prefix, mask, is_record)}
    details = {"class_names": list(task.class_names), "labels": labels[mask], "top5": top[mask]}
    return EvalResult(metrics, details)


class ZeroShot:
    """evaluator(variables) -> EvalResult with {prefix}/top1, /top5, /examples,
    /skipped; details: class names, labels and top-5 predictions per image."""

    def __init__(self, encoders, source, task, batch_size, prefix, workers=0):
        self.encoders, self.source, self.task = encoders, source, task
        self.batch_size, self.prefix, self.workers = batch_size, prefix, workers

    def __call__(self, variables, progress=False):
        classes = self.encoders.classes(variables, self.task)
        data = embed_split(self.encoders, variables, self.source, self.batch_size,
                           workers=self.workers, progress=progress)
        ranks, top = classification_ranks(self.encoders.mesh, data["images"], classes,
                                          data["labels"], TOP_K)
        return _result(self.prefix, self.task, ranks, top, data)


def prompt_tokens(task, context_length):
    """Tokenized task.prompts(), int32 [C*T, L'], cut after the longest
    prompt's end token (L' <= context_length): a decoder then runs no padding."""
    tokens = tokenizer.tokenize(task.prompts(), context_length)
    return tokens[:, :int(tokens.argmax(axis=1).max()) + 1]


class PromptScoreZeroShot:
    """Zero-shot by an objective's prompt scores: evaluator(variables) -> the
    EvalResult of ZeroShot. `prompt_scorer`: Objective.prompt_scorer's scores
    (variables, uint8 images [N,S,S,3], prompts [P,T]) -> [N, P], run here under
    jit with the images split over the batch axes."""

    def __init__(self, encoders, prompt_scorer, source, task, batch_size, prefix, workers=0):
        self.encoders, self.source, self.task = encoders, source, task
        self.batch_size, self.prefix, self.workers = batch_size, prefix, workers
        self.prompts = prompt_tokens(task, encoders.context_length)
        self.scores = jax.jit(prompt_scorer, in_shardings=(
            encoders.variable_shardings, encoders.batch_sharding,
            sharding.replicated(encoders.mesh)), out_shardings=encoders.batch_sharding)

    def __call__(self, variables, progress=False):
        prompts = jax.device_put(self.prompts, sharding.replicated(self.encoders.mesh))
        data = embed_split(self.encoders, variables, self.source, self.batch_size,
                           workers=self.workers, progress=progress,
                           encode_images=lambda v, images: self.scores(v, images, prompts))
        prompt_scores = to_host(data["images"])  # [N, C*T], class-major
        class_scores = prompt_scores.reshape(len(prompt_scores), len(self.task.class_names),
                                             len(self.task.templates)).mean(axis=2)
        ranks, top = ranks_of_scores(class_scores, to_host(data["labels"]))
        return _result(self.prefix, self.task, ranks, top, data)
