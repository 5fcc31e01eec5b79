"""Jitted unit-embedding functions of a model on a mesh, for evaluation and
inference (no data pipeline here: `embed` reads splits)."""

import jax
import numpy as np
from jax.experimental import multihost_utils

from clip_jax import image_ops, sharding, tokenizer
from clip_jax.models import l2_normalize


class Encoders:
    """Jitted unit-embedding functions of a model on a mesh: image(variables,
    uint8 images [B, S, S, 3]) and text(variables, tokens [B, L]) -> [B, E],
    B sharded over the batch axes."""

    def __init__(self, model, mesh, variable_shardings, image_size=None):
        """image_size: the size images are encoded at (ViTs resample their
        positional embeddings to it); None: the model config's."""
        self.model, self.mesh, self._image_size = model, mesh, image_size
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
        return self._image_size or self.model.config.image.image_size

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

    def classes(self, variables, task):
        """Zero-shot class embeddings of a prompts.ZeroShotTask, host array [C, E]:
        the mean unit embedding of each class's prompts, renormalised (CLIP paper,
        section 3.1.4)."""
        texts = self.texts(variables, task.prompts())  # [C*T, E], unit
        texts = texts.reshape(len(task.class_names), len(task.templates), -1)
        return np.asarray(l2_normalize(texts.mean(axis=1)))


def to_host(array):
    """A global array as one numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
