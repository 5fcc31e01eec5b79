"""Top-k ranking of a gallery for each query, and the hit rates derived from it.

Shared by zero-shot classification (gallery: class embeddings) and retrieval
(gallery: the other modality). Ties go to the lower gallery index, the rule of
`lax.top_k`, kept through chunking, so a ranking does not depend on how the
gallery is chunked or the queries sharded.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from clip_jax import sharding


def streamed_top_k(queries, gallery, gallery_valid, k, chunk_size):
    """(scores [Q, k], indices [Q, k]) of the k best gallery items per query by dot
    product; queries [Q, E], gallery [G, E], gallery_valid bool [G].

    Scores exist for [Q, chunk_size] at a time: the gallery is scanned in chunks
    and merged into a running top-k. Invalid items score -inf; when fewer than k
    items are valid the tail holds index -1.
    """
    num_items, width = gallery.shape
    chunk_size = min(chunk_size, num_items)
    padding = -num_items % chunk_size
    chunks = jnp.pad(gallery, ((0, padding), (0, 0))).reshape(-1, chunk_size, width)
    chunk_valid = jnp.pad(gallery_valid, (0, padding)).reshape(-1, chunk_size)
    offsets = jnp.arange(chunks.shape[0]) * chunk_size

    def merge(best, chunk):
        best_scores, best_indices = best
        items, valid, offset = chunk
        scores = jnp.einsum("qe,ge->qg", queries, items, precision=jax.lax.Precision.HIGHEST)
        scores = jnp.where(valid[None, :], scores, -jnp.inf)
        indices = jnp.broadcast_to(offset + jnp.arange(chunk_size), scores.shape)
        # The running best come first: they have the lower indices, so ties keep them.
        scores = jnp.concatenate([best_scores, scores], axis=1)
        indices = jnp.concatenate([best_indices, indices], axis=1)
        top_scores, positions = jax.lax.top_k(scores, k)
        return (top_scores, jnp.take_along_axis(indices, positions, axis=1)), None

    start = (jnp.full((queries.shape[0], k), -jnp.inf, queries.dtype),
             jnp.full((queries.shape[0], k), -1, jnp.int32))
    (scores, indices), _ = jax.lax.scan(merge, start, (chunks, chunk_valid, offsets))
    return scores, indices


@functools.lru_cache(maxsize=None)
def sharded_top_k_function(mesh, k, chunk_size):
    """The jitted (queries, gallery, gallery_valid) -> (scores, indices) of
    `sharded_top_k`, one per (mesh, k, chunk_size)."""
    batch = P(sharding.BATCH_AXES)
    local = jax.shard_map(functools.partial(streamed_top_k, k=k, chunk_size=chunk_size),
                          mesh=mesh, in_specs=(batch, P(), P()), out_specs=(batch, batch),
                          check_vma=False)
    return jax.jit(local)


def sharded_top_k(mesh, queries, gallery, gallery_valid, k, chunk_size=4096):
    """`streamed_top_k` with the queries split over the mesh's batch axes and the
    gallery replicated: each device holds [Q / devices, chunk_size] scores.
    Q must be divisible by the data-parallel size."""
    return sharded_top_k_function(mesh, k, chunk_size)(queries, gallery, gallery_valid)


def first_hit_ranks(top_indices, is_positive):
    """The 0-based rank of each query's first positive among its top k (k if none);
    top_indices int [Q, k], is_positive(top_indices) -> bool [Q, k]."""
    hits = is_positive(top_indices) & (top_indices >= 0)
    k = top_indices.shape[1]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), k)


def hit_rates(ranks, valid, ks):
    """{k: fraction of valid queries whose first positive ranks below k}."""
    count = max(int(valid.sum()), 1)
    return {k: float(((ranks < k) & valid).sum()) / count for k in ks}
