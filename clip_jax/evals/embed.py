"""Unit embeddings of evaluation data, computed on every device of every host.

An embedded split stays a set of global arrays sharded over the batch axes;
row i of every array belongs to the same record, whichever process read it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from clip_jax import image_ops, sharding, tokenizer
from clip_jax.data import eval_input
from clip_jax.progress import is_terminal
from clip_jax.models import l2_normalize


class Encoders:
    """Jitted unit-embedding functions of a model on a mesh: image(variables,
    uint8 images [B, S, S, 3]) and text(variables, tokens [B, L]) -> [B, E],
    B sharded over the batch axes."""

    def __init__(self, model, mesh, variable_shardings):
        self.model, self.mesh = model, mesh
        self.variable_shardings = variable_shardings
        self.batch_sharding = sharding.batch_sharding(mesh)
        in_shardings = (variable_shardings, self.batch_sharding)
        self.image = jax.jit(
            lambda variables, images: l2_normalize(model.apply(
                variables, image_ops.normalize(images), method=model.encode_image)),
            in_shardings=in_shardings, out_shardings=self.batch_sharding)
        self.text = jax.jit(
            lambda variables, tokens: l2_normalize(model.apply(
                variables, tokens, method=model.encode_text)),
            in_shardings=in_shardings, out_shardings=self.batch_sharding)

    @property
    def context_length(self):
        return self.model.config.text.context_length

    @property
    def image_size(self):
        return self.model.config.image.image_size

    def texts(self, variables, texts, batch_size=1024):
        """Unit embeddings of a list of strings (the same on every process) as a
        host array [N, E]."""
        return self._in_batches(self.text, variables,
                                tokenizer.tokenize(list(texts), self.context_length), batch_size)

    def images(self, variables, images, batch_size=256):
        """Unit embeddings of uint8 images [N, S, S, 3] (the same on every process)
        as a host array [N, E]."""
        return self._in_batches(self.image, variables, np.asarray(images, np.uint8), batch_size)

    def _in_batches(self, encode, variables, rows, batch_size):
        """encode(variables, batch) over `rows` in batches padded to a multiple of
        the data-parallel size, gathered to the host."""
        data_parallel = sharding.data_parallel_size(self.mesh)
        step = -(-min(batch_size, max(len(rows), 1)) // data_parallel) * data_parallel
        padded = np.pad(rows, ((0, -len(rows) % step),) + ((0, 0),) * (rows.ndim - 1))
        embeddings = [to_host(encode(variables, jax.device_put(padded[start:start + step],
                                                               self.batch_sharding)))
                      for start in range(0, len(padded), step)]
        return np.concatenate(embeddings)[:len(rows)]


def to_host(array):
    """A global array as one numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


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
