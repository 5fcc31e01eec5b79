"""Train state, its sharded initialisation, and the jitted train step.

`step(state, batch) -> (state, metrics)` is a pure function; jit places it on
the mesh with explicit in/out shardings and donates the old state.
"""

import contextlib
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clip_jax import image_ops, objectives, optim, patch_dropout, phases, sharding
from clip_jax import teacher as teacher_lib
from clip_jax import variables as variables_lib
from clip_jax.models import lean_ops, weight_grads
from clip_jax.models.clip import TOWER_PARAMS
from clip_jax.models.partitioning import spec_axes
from clip_jax.objectives.contrastive import TEACHER_INPUTS, teacher_inputs, with_logit_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (skipped updates included)
    params: Any
    opt_state: Any
    # Non-trained collections, e.g. {"batch_stats": ...} for ResNets; {} for ViTs.
    model_state: Any
    # Steps whose loss or gradients were not finite, so their update was dropped:
    # in all, and in a row up to now (the run stops at config.max_bad_steps).
    skipped_steps: jax.Array = 0
    bad_steps_in_a_row: jax.Array = 0

    def variables(self):
        """The model's variables for `model.apply`."""
        return {"params": self.params, **self.model_state}


def state_shardings(model, optimizer, mesh, rules, rng):
    """(abstract TrainState, TrainState of NamedShardings) without allocating anything."""
    param_shardings = sharding.logical_shardings(
        variables_lib.boxed_variables(model, rng)["params"], mesh, rules)
    abstract = jax.eval_shape(lambda r: _init_state(model, optimizer, r), rng)
    opt_shardings = _mirror_param_shardings(abstract.opt_state, abstract.params, param_shardings,
                                            sharding.replicated(mesh))
    # Running statistics are small: replicate them.
    model_state_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract.model_state)
    replicated = sharding.replicated(mesh)
    return abstract, TrainState(step=replicated, params=param_shardings,
                                opt_state=opt_shardings, model_state=model_state_shardings,
                                skipped_steps=replicated, bad_steps_in_a_row=replicated)


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
    variables = nn.unbox(model.init(rng, *variables_lib.dummy_inputs(model.config)))
    params = variables.pop("params")
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                      model_state=variables, skipped_steps=zero, bad_steps_in_a_row=zero)


def create_train_state(model, optimizer, shardings, rng):
    """Initialises parameters and optimizer state directly in their shardings, so
    no full-size copy ever sits on one device."""
    return jax.jit(lambda r: _init_state(model, optimizer, r), out_shardings=shardings)(rng)


def _full_batch_grads(batch_loss):
    """grads(state, batch) -> (grads, metrics, model_state) in one forward/backward
    of the objective's batch_loss(params, model_state, batch)."""

    def grads(state, batch):
        def loss_and_metrics(params):
            metrics, model_state = batch_loss(params, state.model_state, batch)
            return metrics["loss"], (metrics, model_state)

        grads, (metrics, model_state) = jax.grad(loss_and_metrics, has_aux=True)(state.params)
        return grads, metrics, model_state

    return grads


def _split_microbatches(x, num_microbatches, mesh):
    """[B, ...] -> [k, B/k, ...]. Micro-batch j holds rows j, j + k, j + 2k, ...: with
    B/k divisible by the batch shards, each device's micro-batch rows come from
    its own block of the batch, so the split moves no data."""
    x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sharding.microbatch_sharding(mesh))


def _merge_microbatches(x, mesh):
    """Inverse of `_split_microbatches`: [k, B/k, ...] -> [B, ...] in batch order."""
    x = x.swapaxes(0, 1).reshape(-1, *x.shape[2:])
    return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))


def _reduced_in(grad, reduce_dtype):
    """The dtype a summed gradient crosses devices in: `reduce_dtype` for
    matrices (kernels, token and position tables: the gradients a k=1 step
    reduces as its dots emit them), float32 for vectors and scalars."""
    return reduce_dtype if grad.ndim >= 2 else grad.dtype


# config.gradcache_weights: FSDP's weights in GradCache's micro-batch passes.
GRADCACHE_WEIGHTS = ("sharded", "gathered")


def _reduced_once(backward, mesh, replica_axes, rules, reduce_dtype, gathered_axes=(),
                  param_shardings=None):
    """backward(params, microbatches, embedding_grads) -> (grads, sums), run by
    each data-parallel replica on its own rows and summed over the replicas
    once, after the micro-batch loop (and over FSDP's devices, with
    `gathered_axes`).

    Left to the partitioner, the replicas' block gradients of stacked layers
    (model.scan_layers) are all-reduced inside the loop, once per micro-batch
    (k times the bytes of a k=1 step, docs/scaling.md). Here the loop runs
    under shard_map, manual over `replica_axes` (batch axes that split no
    parameter: the replicas hold equal parameters) and automatic over the rest:
    each replica accumulates its own float32 partial sums and they are
    all-reduced once, matrices in `reduce_dtype`. Activation constraints
    inside follow `rules` less the manual axes.

    `gathered_axes` (config.gradcache_weights="gathered": FSDP's axes, the
    params already gathered over them, their own split `param_shardings`)
    are manual too: every device sums whole gradients of its own rows, and
    each is reduce-scattered onto its parameter's split once, where left
    automatic FSDP reduce-scatters every micro-batch's.
    """
    # In the batch's own order, so that each device group's rows are one block.
    manual = tuple(axis for axis in sharding.BATCH_AXES
                   if axis in replica_axes or axis in gathered_axes)
    if not manual:
        return backward
    local_rules = sharding.rules_without(rules, manual)
    # Per gradient: the manual axes of its parameter's split (its out_spec).
    others = [axis for axis in sharding.MESH_AXES if axis not in gathered_axes]
    out_specs = (jax.P() if not gathered_axes else jax.tree.map(
        lambda shard: sharding.spec_without(shard.spec, others), param_shardings))

    def reduced(grad, out_spec):
        wire = grad.astype(_reduced_in(grad, reduce_dtype))
        pending = list(manual)
        for dim, entry in enumerate(out_spec):
            for axis in spec_axes(entry):  # major to minor, as PartitionSpec splits
                wire = jax.lax.psum_scatter(wire, axis, scatter_dimension=dim, tiled=True)
                pending.remove(axis)
        return jax.lax.psum(wire, tuple(pending)).astype(grad.dtype)

    def local(params, microbatches, embedding_grads):
        with nn.logical_axis_rules(local_rules):
            grads, sums = backward(params, microbatches, embedding_grads)
        specs = out_specs if gathered_axes else jax.tree.map(lambda _: jax.P(), grads)
        grads = jax.tree.map(reduced, grads, specs)
        return grads, jax.lax.psum(sums, manual)

    rows = jax.P(None, manual)  # [k, B/k, ...]: each device group's own rows
    # Unchecked: Pallas kernels inside (splash attention) declare no varying
    # axes. The outputs are psums, equal on every replica.
    return jax.shard_map(local, mesh=mesh, in_specs=(jax.P(), rows, rows),
                         out_specs=(out_specs, jax.P()), axis_names=set(manual),
                         check_vma=False)


def _gradcache_grads(model, loss_fn, num_microbatches, mesh, example_loss=None, *,
                     replica_axes=(), rules=(), reduce_dtype=jnp.float32, gathered_axes=(),
                     param_shardings=None):
    """grads(state, batch) -> (grads, metrics, model_state) with GradCache (Gao et al.
    2021): activations of one micro-batch at a time, the loss over the global batch.

    1. Embed the k micro-batches without gradients -> unit embeddings [B, E].
    2. Loss over the global batch; its gradient w.r.t. the embeddings [B, E] and
       the logit scale / bias.
    3. Re-run each micro-batch under jax.vjp, pulling back its slice of the
       embedding gradient, and sum the parameter gradients.
    An objective's `example_loss` (CoCa's captioning: a sum over examples) is
    computed in step 3's forward pass, its gradient pulled back with the
    embeddings'. Step 3 runs per data-parallel replica (`replica_axes`) and is
    summed over them once (`_reduced_once`, which `rules` and
    `reduce_dtype` serve). With `gathered_axes` (FSDP's, and the parameters'
    NamedShardings `param_shardings`) the parameters are gathered over them once,
    before step 1, and steps 1 and 3 run on the whole weights (their float32
    gradient sums too), reduce-scattered once after the loop. The gradients
    equal the full-batch ones.

    BatchNorm (ResNet) normalises with per-micro-batch statistics and updates
    its running averages once per micro-batch, in order: inherent to GradCache,
    not equal to k=1. Its statistics span the replicas, so models with running
    statistics run step 3 on the global view.
    """

    def embed(params, model_state, microbatch):
        """(image [b,E], text [b,E]) unit embeddings of one micro-batch, new model_state."""
        embeddings, model_state = model.apply(
            {"params": params, **model_state}, image_ops.normalize(microbatch["images"]),
            microbatch["tokens"], train=True, patch_keep=microbatch.get("patch_keep"),
            method="embed", mutable=list(model_state))
        return embeddings, dict(model_state)

    def loss_and_metrics(image_embeddings, text_embeddings, params, teacher):
        logit_scale, logit_bias = model.apply({"params": params}, method="logit_params")
        metrics = with_logit_params(
            loss_fn(image_embeddings, text_embeddings, logit_scale, logit_bias, **teacher),
            logit_scale, logit_bias)
        return metrics["loss"], metrics

    def grads(state, batch):
        # The teacher's embeddings (distillation) are the loss's, over the whole batch.
        teacher = teacher_inputs(batch)
        microbatches = {key: _split_microbatches(value, num_microbatches, mesh)
                        for key, value in batch.items() if key not in teacher}  # [k, B/k, ...]
        params = state.params if not gathered_axes else jax.lax.with_sharding_constraint(
            state.params, jax.tree.map(
                lambda shard: shard.update(spec=sharding.spec_without(shard.spec, gathered_axes)),
                param_shardings))

        def embed_microbatch(model_state, microbatch):
            embeddings, model_state = embed(params, model_state, microbatch)
            return model_state, embeddings

        # On gathered weights, nothing re-splits them for the embedding pass.
        with (nn.logical_axis_rules(sharding.rules_without(rules, gathered_axes,
                                                           weights_only=True))
              if gathered_axes else contextlib.nullcontext()):
            model_state, embeddings = jax.lax.scan(
                embed_microbatch, dict(state.model_state), microbatches)
        image_embeddings, text_embeddings = (_merge_microbatches(e, mesh) for e in embeddings)

        (_, metrics), (image_grads, text_grads, grads) = jax.value_and_grad(
            loss_and_metrics, argnums=(0, 1, 2), has_aux=True)(
                image_embeddings, text_embeddings, state.params, teacher)
        # `grads` so far holds the logit scale / bias terms (zero elsewhere).

        embedding_grads = tuple(_split_microbatches(g, num_microbatches, mesh)
                                for g in (image_grads, text_grads))  # [k, B/k, E] each

        def backward(params, microbatches, embedding_grads):
            """(parameter gradients, example-loss sums) over the micro-batches."""
            if example_loss is None:
                def accumulate(grads, inputs):
                    microbatch, embedding_grads = inputs
                    # The running statistics this forward would write are already updated.
                    _, pullback = jax.vjp(
                        lambda params: embed(params, state.model_state, microbatch)[0], params)
                    (microbatch_grads,) = pullback(embedding_grads)
                    return jax.tree.map(jnp.add, grads, microbatch_grads), None

                grads, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params),
                                        (microbatches, embedding_grads))
                return grads, {}

            def accumulate_with_example_loss(grads, inputs):
                microbatch, embedding_grads = inputs

                def forward(params):
                    embeddings, microbatch_sums, _ = example_loss.forward(
                        params, state.model_state, microbatch)
                    term = example_loss.weight * microbatch_sums[example_loss.key] / count
                    return (embeddings, term), microbatch_sums

                (_, term), pullback, microbatch_sums = jax.vjp(forward, params, has_aux=True)
                (microbatch_grads,) = pullback((embedding_grads, jnp.ones_like(term)))
                return jax.tree.map(jnp.add, grads, microbatch_grads), microbatch_sums

            grads, microbatch_sums = jax.lax.scan(
                accumulate_with_example_loss, jax.tree.map(jnp.zeros_like, params),
                (microbatches, embedding_grads))
            return grads, jax.tree.map(lambda sums: jnp.sum(sums, axis=0), microbatch_sums)

        count = example_loss.count(batch) if example_loss is not None else None
        # BatchNorm's statistics are the micro-batch's, over every replica
        # (config_checks refuses gathered weights with them).
        replicas = () if state.model_state else replica_axes
        backward_grads, sums = _reduced_once(
            backward, mesh, replicas, rules, reduce_dtype, gathered_axes, param_shardings)(
                params, microbatches, embedding_grads)
        grads = jax.tree.map(jnp.add, grads, backward_grads)
        if example_loss is not None:
            means, term = example_loss.metrics(sums, count)
            metrics.update(means, loss=metrics["loss"] + term)
        return grads, metrics, model_state

    return grads


def with_patch_dropout(compute_grads, rate, patch_size, seed):
    """compute_grads with each image keeping round((1 - rate) * patches) of its
    patches (batch["patch_keep"], drawn by clip_jax.patch_dropout from the seed,
    the step and the example's position); compute_grads itself when rate is 0."""
    if rate == 0:
        return compute_grads

    def grads(state, batch):
        images = batch["images"]
        patches = (images.shape[1] // patch_size) * (images.shape[2] // patch_size)
        keep = patch_dropout.keep_indices(seed, state.step, images.shape[0], patches, rate)
        return compute_grads(state, {**batch, "patch_keep": keep})

    return grads


def with_backward_modes(fn, model_config):
    """fn, traced with the models' hand-written backward passes per
    config.model.lean_backward (models/lean_ops.py) and their kernel gradients
    emitted per config.model.grad_reduce_dtype (models/weight_grads.py)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with (lean_ops.lean_backward(model_config.get("lean_backward", "auto")),
              weight_grads.grad_reduce_dtype(model_config.get("grad_reduce_dtype", "compute"))):
            return fn(*args, **kwargs)
    return traced


def _update_under_cond(apply_update, grads, opt_state, params, finite):
    """(params, opt_state) updated when `finite`, else unchanged, under a cond:
    XLA:CPU does not fuse a select into the update, and selecting would read and
    write the parameters and both moments once more (0.39 s of an 8.1 s ViT-B/32
    step at batch 32, docs/capacity.md)."""
    return jax.lax.cond(finite, apply_update, lambda _, opt_state, params: (params, opt_state),
                        grads, opt_state, params)


def _kept_if_not(finite, new, old):
    """Tree `new` where `finite`, else `old`, leaf by leaf."""
    return jax.tree.map(lambda new_leaf, old_leaf: jnp.where(finite, new_leaf, old_leaf), new, old)


def _update_selected(apply_update, grads, opt_state, params, finite):
    """The same by a select, which GPU and TPU compilers fuse into the update's
    one elementwise pass: under a cond of donated state they copy the parameters
    and moments out of the cond's buffers into the outputs instead (1.5 ms of a
    ViT-B/16 H100 step at 128 by the roofline, docs/capacity.md)."""
    return _kept_if_not(finite, apply_update(grads, opt_state, params), (params, opt_state))


def make_train_step(compute_grads, optimizer, schedule):
    """Returns step(state, batch) -> (state, metrics).

    batch: {"images": uint8 [B, H, W, 3], "tokens": int32 [B, L]}, B global.
    compute_grads(state, batch) -> (grads, metrics with "loss", model_state): the
    objective's loss and its gradients over the global batch (`gradients`).
    """

    def apply_update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step(state, batch):
        grads, metrics, model_state = compute_grads(state, batch)
        # A non-finite loss or gradient must not reach the parameters or the Adam
        # moments: the step keeps the old state (its data is still consumed).
        grad_norms = {f"grad_norm/{name}": optax.tree.norm(subtree)
                      for name, subtree in grads.items()}
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(
            jnp.isfinite(jnp.stack(list(grad_norms.values()))))
        params, opt_state = jax.lax.platform_dependent(
            grads, state.opt_state, state.params, finite,
            cpu=functools.partial(_update_under_cond, apply_update),
            default=functools.partial(_update_selected, apply_update))
        bad = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state,
            model_state=_kept_if_not(finite, dict(model_state), dict(state.model_state)),
            skipped_steps=state.skipped_steps + bad,
            bad_steps_in_a_row=(state.bad_steps_in_a_row + bad) * bad)
        metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step), **grad_norms,
                       skipped_steps=new_state.skipped_steps,
                       bad_steps_in_a_row=new_state.bad_steps_in_a_row)
        return new_state, metrics

    return step


def gradients(objective, model, mesh, config, teacher_scale=None, param_shardings=None):
    """compute_grads(state, batch) of `objective` for make_train_step: one forward and
    backward over the batch, or GradCache over config.microbatches micro-batches
    (objectives with an embedding loss only; config_checks says so in one line).
    teacher_scale: the teacher's temperature when distilling (contrastive only);
    param_shardings: the parameters' NamedShardings (config.gradcache_weights
    "gathered" needs them)."""
    distilling = {} if teacher_scale is None else {"teacher_scale": teacher_scale}
    if config.microbatches == 1:
        return _full_batch_grads(objective.batch_loss(model, mesh, config, **distilling))
    example_loss = objective.example_loss and objective.example_loss(model, config)
    reduce_dtype = (jnp.float32 if config.model.get("grad_reduce_dtype") == "float32"
                    else jnp.dtype(config.model.dtype))
    gathered_axes = (sharding.weight_batch_axes(mesh, config.sharding_rules)
                     if config.get("gradcache_weights") == "gathered" else ())
    return _gradcache_grads(model, objective.embedding_loss(mesh, config, **distilling),
                            config.microbatches, mesh, example_loss,
                            replica_axes=sharding.replica_axes(mesh, config.sharding_rules),
                            rules=config.sharding_rules, reduce_dtype=reduce_dtype,
                            gathered_axes=gathered_axes, param_shardings=param_shardings)


def jit_train_step(step, shardings, mesh, batch_keys=("images", "tokens")):
    """The step under jit: state stays in its shardings, batch split over the batch axes."""
    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(step,
                   in_shardings=(shardings, {key: batch_sharding for key in batch_keys}),
                   out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


@flax.struct.dataclass
class Training:
    """Everything a run builds from its config before the first step."""

    model: nn.Module = flax.struct.field(pytree_node=False)  # the objective's model
    optimizer: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    mesh: jax.sharding.Mesh = flax.struct.field(pytree_node=False)
    abstract_state: TrainState  # shapes and dtypes only
    shardings: TrainState  # of NamedShardings
    # The run's phases (clip_jax.phases) and the jitted step(state, batch) of each:
    # jit compiles each once, for its phase's image size and caption length.
    phases: tuple = flax.struct.field(pytree_node=False)
    phase_steps: tuple = flax.struct.field(pytree_node=False)
    # Distillation's frozen teacher (clip_jax.teacher), or None: the steps take
    # batches with its embeddings, `prepare(batch)`.
    teacher: Any = flax.struct.field(pytree_node=False, default=None)

    def prepare(self, batch):
        """A batch from the input as the steps take it: with the teacher's
        embeddings when distilling."""
        return batch if self.teacher is None else self.teacher.embed(batch)

    @property
    def step(self):
        """The jitted step of the first phase (of the whole run, without phases)."""
        return self.phase_steps[0]

    def step_at(self, step):
        """The jitted step that train step `step` (1-based) runs."""
        return self.phase_steps[self.phases.index(phases.phase_at(self.phases, step))]

    def init_state(self, rng):
        """A fresh TrainState, created directly in its shardings."""
        return create_train_state(self.model, self.optimizer, self.shardings, rng)


def setup_training(config, devices=None, optimizer=None) -> Training:
    """config -> mesh, the objective's model (with locked towers), optimizer, state
    shardings and the jitted step of each phase; `optimizer` replaces the config's AdamW (tests use
    plain SGD). The config is one config_checks.check_config passed: the commands
    (train, evaluate, benchmark) check it first; analyses may bend a rule it
    enforces for real data (a small vocabulary in tests/test_flops.py)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    objective = objectives.get(config.objective)
    locked = tuple(tower for tower in TOWER_PARAMS if config[f"lock_{tower}"])
    model = objective.model(config.model, locked=locked)
    optimizer = optimizer or optim.make_optimizer(
        config.optimizer, config.total_steps, frozen=tuple(TOWER_PARAMS[t] for t in locked))
    schedule = optim.learning_rate_schedule(config.optimizer, config.total_steps)
    abstract, shardings = state_shardings(model, optimizer, mesh, config.sharding_rules,
                                          jax.random.key(config.seed))
    teacher = (teacher_lib.load(config, mesh) if config.get("distill") and config.distill.teacher
               else None)
    compute_grads = gradients(objective, model, mesh, config,
                              None if teacher is None else teacher.logit_scale, shardings.params)
    batch_keys = ("images", "tokens", *(TEACHER_INPUTS if teacher else ()))
    run_phases = phases.parse(config.phases, config.total_steps, config.model)

    def phase_step(phase):
        step = make_train_step(
            with_patch_dropout(compute_grads, phase.patch_dropout,
                               config.model.image.get("patch_size"), config.seed),
            optimizer, schedule)
        step = with_backward_modes(step, config.model)
        return jit_train_step(sharding.with_activation_sharding(step, mesh, config.sharding_rules),
                              shardings, mesh, batch_keys)

    return Training(model=model, optimizer=optimizer, mesh=mesh, abstract_state=abstract,
                    shardings=shardings, phases=run_phases,
                    phase_steps=tuple(phase_step(phase) for phase in run_phases), teacher=teacher)
