"""Train state, its sharded initialisation, and the jitted train step.

`step(state, batch) -> (state, metrics)` is a pure function; jit places it on
the mesh with explicit in/out shardings and donates the old state.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clip_jax import image_ops, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    # Non-trained collections, e.g. {"batch_stats": ...} for ResNets; {} for ViTs.
    model_state: Any

    def variables(self):
        """The model's variables for `model.apply`."""
        return {"params": self.params, **self.model_state}


def dummy_inputs(model_config):
    """Batch-of-one inputs of the right shapes for init and eval_shape."""
    size = model_config.image.image_size
    return (jnp.zeros((1, size, size, 3), jnp.float32),
            jnp.zeros((1, model_config.text.context_length), jnp.int32))


def state_shardings(model, optimizer, mesh, rules, rng):
    """(abstract TrainState, TrainState of NamedShardings) without allocating anything."""
    inputs = dummy_inputs(model.config)
    boxed = jax.eval_shape(lambda r: model.init(r, *inputs), rng)
    param_shardings = sharding.logical_shardings(boxed["params"], mesh, rules)
    abstract = jax.eval_shape(lambda r: _init_state(model, optimizer, r), rng)
    opt_shardings = _mirror_param_shardings(abstract.opt_state, abstract.params, param_shardings,
                                            sharding.replicated(mesh))
    # Running statistics are small: replicate them.
    model_state_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract.model_state)
    return abstract, TrainState(step=sharding.replicated(mesh), params=param_shardings,
                                opt_state=opt_shardings, model_state=model_state_shardings)


def _mirror_param_shardings(opt_state, params, param_shardings, replicated):
    """Optimizer-state shardings: a leaf whose key path ends with a parameter's path and
    has its shape (Adam's moments, masked or not) takes that parameter's sharding;
    counters and scalars are replicated. Works for any optax state, frozen subtrees
    included, without running the optimizer's init on placeholders."""
    def names(path):
        return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    by_path = {names(path): (leaf.shape, shard) for (path, leaf), shard in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))}

    def leaf_sharding(path, leaf):
        path = names(path)
        for start in range(len(path)):
            shape, shard = by_path.get(path[start:], (None, None))
            if shard is not None and shape == leaf.shape:
                return shard
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


def _init_state(model, optimizer, rng):
    variables = nn.unbox(model.init(rng, *dummy_inputs(model.config)))
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), model_state=variables)


def create_train_state(model, optimizer, shardings, rng):
    """Initialises parameters and optimizer state directly in their shardings, so
    no full-size copy ever sits on one device."""
    return jax.jit(lambda r: _init_state(model, optimizer, r), out_shardings=shardings)(rng)


def make_train_step(model, optimizer, loss_fn, schedule):
    """Returns step(state, batch) -> (state, metrics).

    batch: {"images": uint8 [B, H, W, 3], "tokens": int32 [B, L]}, B global.
    loss_fn(image [B,E], text [B,E], logit_scale, logit_bias) -> {"loss", ...} over the
    global batch.
    """

    def step(state, batch):
        def loss_and_metrics(params):
            (image_embeddings, text_embeddings, logit_scale, logit_bias), model_state = model.apply(
                {"params": params, **state.model_state}, image_ops.normalize(batch["images"]),
                batch["tokens"], train=True, mutable=list(state.model_state))
            metrics = loss_fn(image_embeddings, text_embeddings, logit_scale, logit_bias)
            metrics["logit_scale"] = logit_scale
            if logit_bias is not None:
                metrics["logit_bias"] = logit_bias
            return metrics["loss"], (metrics, model_state)

        grads, (metrics, model_state) = jax.grad(loss_and_metrics, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               model_state=dict(model_state))
        return new_state, metrics

    return step


def jit_train_step(step, shardings, mesh):
    """The step under jit: state stays in its shardings, batch split over the batch axes."""
    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(step,
                   in_shardings=(shardings, {"images": batch_sharding, "tokens": batch_sharding}),
                   out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=0)
