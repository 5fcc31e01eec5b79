"""Unit embeddings of evaluation data, computed on every device of every host.

An embedded split stays a set of global arrays sharded over the batch axes;
row i of every array belongs to the same record, whichever process read it.
"""

import functools

import jax
import jax.numpy as jnp
import tqdm

from clip_jax.data import eval_input
from clip_jax.progress import is_terminal


@functools.lru_cache(maxsize=None)
def _concatenate(batch_sharding):
    return jax.jit(lambda parts: jnp.concatenate(parts), out_shardings=batch_sharding)


def embed_split(encoders, variables, source, batch_size, *, workers=0, progress=False,
                encode_images=None):
    """A split's embeddings as global arrays sharded over the batch axes:
    {"images": [N, E], "mask": bool [N], "is_record": bool [N]} (see
    eval_input.eval_batches), with source.label_key "labels": [N],
    with source.caption_key "texts": [N, K, E] and "caption_mask": bool [N, K].
    N is the split size rounded up to whole batches; padding rows are masked.
    `encode_images(variables, uint8 images [B, S, S, 3]) -> [B, ...]` replaces
    encoders.image for "images" (e.g. an objective's per-prompt scores)."""
    encode_images = encode_images or encoders.image
    to_global = lambda local: jax.make_array_from_process_local_data(  # noqa: E731
        encoders.batch_sharding, local)
    parts = {}
    batches = eval_input.eval_batches(source, encoders.image_size, batch_size,
                                      context_length=encoders.context_length, workers=workers)
    show = progress and jax.process_index() == 0
    for batch in tqdm.tqdm(batches, desc=f"embedding {source.dataset}:{source.split}",
                           unit="batch", disable=not (show and is_terminal()), leave=False,
                           total=eval_input.batch_count(source, batch_size) if show else None):
        rows = {"images": encode_images(variables, to_global(batch["images"])),
                "mask": to_global(batch["mask"]), "is_record": to_global(batch["is_record"])}
        if "labels" in batch:
            rows["labels"] = to_global(batch["labels"])
        if "tokens" in batch:
            local_rows, captions, length = batch["tokens"].shape
            texts = encoders.text(variables, to_global(
                batch["tokens"].reshape(local_rows * captions, length)))
            rows["texts"] = texts.reshape(-1, captions, texts.shape[-1])
            rows["caption_mask"] = to_global(batch["caption_mask"])
        for name, value in rows.items():
            parts.setdefault(name, []).append(value)
    return {name: _concatenate(encoders.batch_sharding)(values) for name, values in parts.items()}
