"""Retrieval ranking at COCO size on simulated devices: bytes per device
against the full similarity matrix, and wall time."""

import json
import time

import jax
import numpy as np

from clip_jax import capacity, sharding
from clip_jax.benchmarks.memory import data_parallel_mesh

def retrieval_benchmark(images=5000, captions_per_image=5, embed_dim=512, chunk_size=4096,
                        num_devices=8, repeats=3):
    """Per-device bytes (compiled) and wall time of ranking images x captions both ways."""
    from clip_jax.evals import ranking  # noqa: PLC0415
    mesh = data_parallel_mesh(num_devices)
    rng = np.random.default_rng(0)
    unit = lambda rows: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(  # noqa: E731
        rng.normal(size=(rows, embed_dim)).astype(np.float32))
    image_embeddings = jax.device_put(unit(images), sharding.batch_sharding(mesh))
    text_embeddings = jax.device_put(unit(images * captions_per_image),
                                     sharding.batch_sharding(mesh))
    directions = {"image_to_text": (image_embeddings, text_embeddings),
                  "text_to_image": (text_embeddings, image_embeddings)}
    rows = []
    for direction, (queries, gallery) in directions.items():
        valid = np.ones(gallery.shape[0], bool)
        rank = ranking.sharded_top_k_function(mesh, 10, chunk_size)
        compiled = rank.lower(queries, gallery, valid).compile()
        jax.block_until_ready(rank(queries, gallery, valid))  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(rank(queries, gallery, valid))
            seconds.append(time.perf_counter() - start)
        rows.append({"direction": direction, "queries": queries.shape[0],
                     "gallery": gallery.shape[0], "embed_dim": embed_dim,
                     "chunk_size": chunk_size, "devices": num_devices,
                     "full_matrix_bytes": 4 * queries.shape[0] * gallery.shape[0],
                     "median_seconds": float(np.median(seconds)), **capacity.memory_bytes(compiled)})
    return rows


def run_retrieval(args):
    rows = retrieval_benchmark(args.images, args.captions_per_image, args.embed_dim,
                               args.chunk_size)
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['direction']:<14} {row['queries']:>7,} x {row['gallery']:>7,}: "
                  f"{row['bytes_per_device'] / 2**20:8.1f} MiB per device (full matrix "
                  f"{row['full_matrix_bytes'] / 2**20:,.1f} MiB), {row['median_seconds']:.2f} s",
                  flush=True)
