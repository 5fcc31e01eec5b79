"""Cross-modal retrieval: image->text and text->image Recall@K, several captions per image.

An image query is a hit at K when any of its own captions is among the K
nearest captions; a caption query when its image is among the K nearest images
(the COCO/Flickr30k protocol of the CLIP paper, Table 13). Each device scores
its share of the queries against the gallery in chunks, so the full
images x captions matrix never exists on any one device.
"""

import numpy as np

from clip_jax.evals import ranking
from clip_jax.evals.base import EvalResult, row_counts
from clip_jax.evals.embed import embed_split
from clip_jax.evals.encoders import to_host

RECALL_AT = (1, 5, 10)


def retrieval_ranks(mesh, images, texts, image_valid, caption_mask, chunk_size=4096):
    """Host arrays (image_ranks [N], text_ranks [N*K], image_valid [N], text_valid [N*K]):
    the 0-based rank of each query's first positive among its top max(RECALL_AT)
    (max(RECALL_AT) when none is), from unit embeddings images [N, E], texts
    [N, K, E] (caption j of image i) and masks image_valid [N], caption_mask [N, K]."""
    captions_per_image = texts.shape[1]
    texts = texts.reshape(-1, texts.shape[-1])  # caption j of image i is row i*K + j
    text_valid = (caption_mask & image_valid[:, None]).reshape(-1)
    k = max(RECALL_AT)
    _, image_to_text = ranking.sharded_top_k(mesh, images, texts, text_valid, k, chunk_size)
    _, text_to_image = ranking.sharded_top_k(mesh, texts, images, image_valid, k, chunk_size)
    image_to_text, text_to_image, image_valid, text_valid = (
        to_host(array) for array in (image_to_text, text_to_image, image_valid, text_valid))
    image_ids = np.arange(len(image_valid))
    text_owner = np.arange(len(text_valid)) // captions_per_image
    image_ranks = ranking.first_hit_ranks(
        image_to_text, lambda indices: indices // captions_per_image == image_ids[:, None])
    text_ranks = ranking.first_hit_ranks(
        text_to_image, lambda indices: indices == text_owner[:, None])
    return image_ranks, text_ranks, image_valid, text_valid


def recall_metrics(prefix, image_ranks, text_ranks, image_valid, text_valid):
    """{prefix/image_to_text_r1: ..., prefix/text_to_image_r10: ...} from retrieval_ranks."""
    metrics = {}
    for direction, ranks, valid in (("image_to_text", image_ranks, image_valid),
                                    ("text_to_image", text_ranks, text_valid)):
        for at, rate in ranking.hit_rates(ranks, valid, RECALL_AT).items():
            metrics[f"{prefix}/{direction}_r{at}"] = rate
    return metrics


class Retrieval:
    """evaluator(variables) -> EvalResult with {prefix}/image_to_text_r{1,5,10},
    {prefix}/text_to_image_r{1,5,10}, /examples (images), /captions, /skipped."""

    def __init__(self, encoders, source, batch_size, prefix, workers=0, chunk_size=4096):
        self.encoders, self.source = encoders, source
        self.batch_size, self.prefix, self.workers = batch_size, prefix, workers
        self.chunk_size = chunk_size

    def __call__(self, variables, progress=False):
        data = embed_split(self.encoders, variables, self.source, self.batch_size,
                           workers=self.workers, progress=progress)
        image_ranks, text_ranks, image_valid, text_valid = retrieval_ranks(
            self.encoders.mesh, data["images"], data["texts"], data["mask"],
            data["caption_mask"], self.chunk_size)
        metrics = recall_metrics(self.prefix, image_ranks, text_ranks, image_valid, text_valid)
        metrics.update(row_counts(self.prefix, image_valid, to_host(data["is_record"])))
        metrics[f"{self.prefix}/captions"] = int(text_valid.sum())
        return EvalResult(metrics, {"image_ranks": image_ranks[image_valid],
                                    "text_ranks": text_ranks[text_valid]})
