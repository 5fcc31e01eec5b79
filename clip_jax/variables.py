"""A model's variables as shapes and shardings, before any array exists.

Shared by training (train_step.py), inference (pretrained.py) and weight
conversion (convert.py), none of which needs the others: nothing here knows
optimizers, datasets or checkpoints.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax import sharding


def dummy_inputs(model_config):
    """Batch-of-one inputs of the right shapes for init and eval_shape."""
    size = model_config.image.image_size
    return (jnp.zeros((1, size, size, 3), jnp.float32),
            jnp.zeros((1, model_config.text.context_length), jnp.int32))


def boxed_variables(model, rng=None):
    """jax.eval_shape of model.init: every collection, parameters still carrying
    their logical axis names (nn.LogicallyPartitioned)."""
    rng = jax.random.key(0) if rng is None else rng
    return jax.eval_shape(lambda r: model.init(r, *dummy_inputs(model.config)), rng)


def abstract_variables(model):
    """Variable shapes and dtypes of `model` (a flax Module), nothing allocated."""
    return nn.unbox(boxed_variables(model))


def variable_shardings(model, mesh, rules):
    """NamedShardings of model's variables on `mesh`: parameters by their logical
    axes and `rules`, other collections (BatchNorm statistics, small) replicated."""
    boxed = boxed_variables(model)
    return {collection: (sharding.logical_shardings(tree, mesh, rules) if collection == "params"
                         else jax.tree.map(lambda _: sharding.replicated(mesh), nn.unbox(tree)))
            for collection, tree in boxed.items()}


def with_shardings(abstract, shardings):
    """A tree of jax.ShapeDtypeStruct carrying `shardings` (what orbax restores
    into and jit lowers from)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
