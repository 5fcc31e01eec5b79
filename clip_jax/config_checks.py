"""Validation of a training config before anything is built or compiled.

Each problem is reported as one line naming the key, its value and the fix.
"""

import jax
import jax.numpy as jnp

from clip_jax import losses, objectives, overrides, phases, sharding
from clip_jax.train_step import GRADCACHE_WEIGHTS
from clip_jax import teacher as teacher_lib
from clip_jax.data.spec import parse_train
from clip_jax.evals import specs
from clip_jax.models.clip import text_tower_builder
from clip_jax.models.image_towers import image_tower
from clip_jax.models import output_classes
from clip_jax.models.lean_ops import LEAN_BACKWARD_MODES
from clip_jax.models.partitioning import ACTIVATION_AXES
from clip_jax.models.transformer import (activation_fn, attention_implementation, remat_policy,
                                         unrolled_layer_loop)
from clip_jax.models.weight_grads import GRAD_REDUCE_DTYPES


class ConfigError(ValueError):
    """A config value that cannot work; the message is the one-line diagnosis."""


def _require(condition, message):
    if not condition:
        raise ConfigError(message)


def _looked_up(lookup, value):
    """lookup(value), its ValueError (a one-line message) as a ConfigError."""
    try:
        return lookup(value)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _positive(config, *keys):
    for key in keys:
        value = overrides.lookup(config, key)
        _require(value > 0, f"config.{key}={value!r} must be positive")


def _non_negative(config, *keys):
    for key in keys:
        value = overrides.lookup(config, key)
        _require(value >= 0, f"config.{key}={value!r} must be >= 0")




def check_config(config, num_devices, platform=None):
    """Raises ConfigError for the first invalid value, given the device count and
    the platform the step is compiled for (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    _positive(config, "batch_size", "total_steps", "log_every", "optimizer.eps",
              "keep_checkpoints", "max_bad_steps",
              "model.embed_dim",
              "model.logit_scale_max", "model.text.mlp_ratio")
    _non_negative(config, "loss.chunk_size", "eval_every", "checkpoint_every",
                  "checkpoint_minutes", "optimizer.lr",
                  "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.grad_clip_norm",
                  "data.prefetch", "data.workers")
    _positive(config, "data.threads", "profile.steps")
    _non_negative(config, "profile.start_step")
    for key in ("optimizer.b1", "optimizer.b2"):
        value = overrides.lookup(config, key)
        _require(0 <= value < 1, f"config.{key}={value!r} must be in [0, 1)")

    try:
        mesh = sharding.mesh_shape(config.mesh, num_devices)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    data_parallel = mesh["dcn_data"] * mesh["data"] * mesh["fsdp"]
    batch_axes = ("dcn_data x " if mesh["dcn_data"] > 1 else "") + "data x fsdp"
    batch_sizes = (f"{mesh['dcn_data']} x " if mesh["dcn_data"] > 1 else "") + (
        f"{mesh['data']} x {mesh['fsdp']}")
    _require(config.batch_size % data_parallel == 0,
             f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
             f"{data_parallel} (mesh {batch_axes} = {batch_sizes})")
    for key, entry in config.evals.items():
        try:
            specs.check_entry(key, entry, data_parallel)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    _check_data(config.data)

    microbatches = config.microbatches
    _require(microbatches >= 1, f"config.microbatches={microbatches} must be >= 1")
    _require(config.batch_size % (microbatches * data_parallel) == 0,
             f"config.batch_size={config.batch_size} is not divisible by config.microbatches x "
             f"data-parallel size = {microbatches} x {data_parallel}")
    gradcache_weights = config.get("gradcache_weights", "sharded")
    _require(gradcache_weights in GRADCACHE_WEIGHTS,
             f"config.gradcache_weights={gradcache_weights!r} is unknown; "
             f"choose one of {', '.join(GRADCACHE_WEIGHTS)}")
    _require(gradcache_weights == "sharded" or config.model.image.kind == "vit",
             f"config.gradcache_weights={gradcache_weights!r}: a ResNet tower's BatchNorm "
             "statistics span every device, so its micro-batches run on sharded weights")
    _check_objective(config)

    _require(config.loss.kind in losses.LOSSES,
             f"config.loss.kind={config.loss.kind!r} is unknown; "
             f"choose one of {', '.join(losses.LOSSES)}")
    _require(config.loss.kind != "sigmoid" or config.model.logit_bias_init is not None,
             "config.loss.kind='sigmoid' needs a learned bias: set config.model.logit_bias_init "
             "(SigLIP: -10, with config.model.logit_scale_init=2.302585)")
    chunk = config.loss.chunk_size
    _require(chunk == 0 or config.batch_size % chunk == 0,
             f"config.loss.chunk_size={chunk} does not divide config.batch_size={config.batch_size}")
    # The sigmoid ring chunks each device's [B_local, B_local] block.
    local_batch = config.batch_size // data_parallel
    _require(config.loss.kind != "sigmoid" or chunk == 0 or chunk >= local_batch
             or local_batch % chunk == 0,
             f"config.loss.chunk_size={chunk} does not divide the per-device batch {local_batch} "
             "(sigmoid loss)")

    model = config.model
    # Names are checked by the lookups that use them, called here before anything runs.
    _looked_up(image_tower, model)
    _looked_up(activation_fn, model.activation)
    _looked_up(remat_policy, model.remat)
    _looked_up(unrolled_layer_loop, model.get("layer_loop", "auto"))
    _require(model.get("lean_backward", "auto") in LEAN_BACKWARD_MODES,
             f"config.model.lean_backward={model.get('lean_backward')!r} is unknown; choose one "
             f"of {', '.join(LEAN_BACKWARD_MODES)}")
    _require(model.get("grad_reduce_dtype", "compute") in GRAD_REDUCE_DTYPES,
             f"config.model.grad_reduce_dtype={model.get('grad_reduce_dtype')!r} is unknown; "
             f"choose one of {', '.join(GRAD_REDUCE_DTYPES)}")
    try:
        jnp.dtype(model.dtype)
    except TypeError:
        raise ConfigError(f"config.model.dtype={model.dtype!r} is not a dtype name") from None
    _looked_up(lambda name: attention_implementation(name, model.dtype),
               model.get("attention", "xla"))
    _require(model.get("attention", "xla") != "cudnn" or platform == "gpu",
             f"config.model.attention='cudnn' needs a GPU with cuDNN; this platform is "
             f"{platform} (use 'xla', or 'auto' to take cuDNN where it applies)")
    _require(model.get("attention", "xla") != "cudnn"
             or jnp.dtype(model.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)),
             f"config.model.attention='cudnn' computes in bfloat16 or float16 only; "
             f"config.model.dtype={model.dtype!r}")
    _require(model.get("attention", "xla") != "splash" or platform != "gpu",
             "config.model.attention='splash' is a TPU kernel; on a GPU use 'cudnn' or 'auto'")
    if model.image.kind == "vit":
        _positive(config, "model.image.patch_size", "model.image.layers", "model.image.mlp_ratio")
        _require(model.image.image_size % model.image.patch_size == 0,
                 f"config.model.image.image_size={model.image.image_size} is not divisible by "
                 f"patch_size={model.image.patch_size}")
    for tower in ("image", "text"):
        width, heads = model[tower].width, model[tower].heads
        _require(heads > 0 and width % heads == 0,
                 f"config.model.{tower}.width={width} is not divisible by heads={heads}")
    _require(model.text.context_length >= 2,
             f"config.model.text.context_length={model.text.context_length} must be >= 2 "
             "(start and end tokens)")
    _require(model.text.vocab_size >= 49408,
             f"config.model.text.vocab_size={model.text.vocab_size} is smaller than the CLIP "
             "tokenizer's 49408 ids")
    rule_names = [rule[0] for rule in config.sharding_rules]
    batch_rule = dict((rule[0], rule[1]) for rule in config.sharding_rules).get("activation_batch")
    batch_rule = batch_rule if isinstance(batch_rule, (tuple, list)) else (batch_rule,)
    _require(mesh["dcn_data"] == 1 or "dcn_data" in batch_rule,
             f"config.mesh.dcn_data={mesh['dcn_data']}: config.sharding_rules' activation_batch "
             f"-> {tuple(batch_rule)} leaves dcn_data out, so every slice would hold the whole "
             "batch's activations; add it (the default rules do)")
    for rule in config.sharding_rules:
        axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for axis in axes:
            _require(axis is None or axis in sharding.MESH_AXES,
                     f"config.sharding_rules: {rule[0]!r} -> {axis!r} is not a mesh axis "
                     f"({', '.join(sharding.MESH_AXES)})")
    _require(len(set(rule_names)) == len(rule_names),
             f"config.sharding_rules names a logical axis twice: {rule_names}")
    missing = [name for name in ACTIVATION_AXES if name not in rule_names]
    _require(not missing,
             f"config.sharding_rules has no rule for {', '.join(missing)}: those activations "
             "would be replicated on every device; map each (configs/clip.py lists them)")
    _check_phases(config)  # after the model, whose values the phases default to


def _check_phases(config):
    """config.phases, and model.image.patch_dropout, which is a phase setting."""
    try:
        run_phases = phases.parse(config.phases, config.total_steps, config.model)
    except ValueError as error:
        raise ConfigError(f"config.phases={config.phases!r}: {error}") from None
    image, text = config.model.image, config.model.text
    where = (lambda phase: "" if len(run_phases) == 1  # noqa: E731
             else f" in config.phases ({phase.describe()})")
    for phase in run_phases:
        _require(0 <= phase.patch_dropout < 1,
                 f"patch_dropout={phase.patch_dropout:g}{where(phase)} must be in [0, 1) "
                 "(config.model.image.patch_dropout)")
        _require(phase.patch_dropout == 0 or image.kind == "vit",
                 f"patch_dropout={phase.patch_dropout:g}{where(phase)}: patch dropout needs a "
                 f"ViT image tower, not config.model.image.kind={image.kind!r}")
        _require(image.kind == "vit" or phase.image_size == image.image_size,
                 f"image_size={phase.image_size}{where(phase)}: a ResNet tower trains at "
                 f"config.model.image.image_size={image.image_size} only")
        if image.kind == "vit":
            _require(phase.image_size > 0 and phase.image_size % image.patch_size == 0,
                     f"image_size={phase.image_size}{where(phase)} is not a positive multiple "
                     f"of config.model.image.patch_size={image.patch_size}")
        _require(2 <= phase.context_length <= text.context_length,
                 f"context_length={phase.context_length}{where(phase)} must be in [2, "
                 f"config.model.text.context_length={text.context_length}] (start and end "
                 "tokens; the positional embeddings hold that many)")


def _check_data(data):
    try:
        parse_train(data.train, image_key=data.image_key, caption_key=data.caption_key)
    except ValueError as error:
        raise ConfigError(f"config.data.train={data.train!r}: {error}") from None
    low, high = data.crop_scale
    _require(0 < low <= high <= 1,
             f"config.data.crop_scale={tuple(data.crop_scale)!r} must be (low, high) "
             "with 0 < low <= high <= 1")


def _check_objective(config):
    """config.objective and what it needs of the rest of the config."""
    objective = _looked_up(objectives.get, config.objective)
    _looked_up(text_tower_builder, config.model.text_encoder)
    try:
        output_classes.check(config.model.output_vocab, config.model.text.vocab_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _require(config.microbatches == 1 or objective.embedding_loss is not None,
             f"config.microbatches={config.microbatches}: GradCache splits the step around a "
             f"loss over embeddings, which config.objective={objective.name!r} does not have; "
             "use config.microbatches=1")
    for tower in ("image", "text"):
        _require(not config[f"lock_{tower}"] or tower in objective.lockable,
                 f"config.lock_{tower}=True: config.objective={objective.name!r} has no "
                 f"{tower} tower to lock")
    _check_distill(config, objective)
    _check_coca(config, objective)


def _check_coca(config, objective):
    """A CoCa model exactly when config.objective is "coca"."""
    model = config.model
    has_decoder = "decoder" in model
    if objective.name != "coca":
        _require(not has_decoder, f"config.model has a CoCa decoder; train it with "
                                  f"config.objective='coca', not {objective.name!r}")
        return
    _require(has_decoder and model.image.kind == "vit" and model.image.get("pool_queries", 0) > 1
             and model.text.get("embed_cls", False),
             "config.objective='coca' needs a CoCa model config (a ViT pooled by "
             "model.image.pool_queries > 1, model.text.embed_cls, model.decoder): "
             "configs/clip.py:coca_tiny or a coca_* zoo name")
    _require(model.text.width == model.embed_dim,
             f"config.model.text.width={model.text.width} must equal config.model.embed_dim="
             f"{model.embed_dim}: CoCa's decoder, as wide as the text tower, reads image "
             "tokens of the embedding width")
    _require(model.text.width % model.decoder.heads == 0,
             f"config.model.decoder.heads={model.decoder.heads} must divide the text width "
             f"{model.text.width}")
    for name in ("clip_loss_weight", "caption_loss_weight"):
        _require(config.coca[name] >= 0, f"config.coca.{name}={config.coca[name]!r} must be >= 0")


def _check_distill(config, objective):
    """config.distill; the teacher itself is checked when it is loaded (clip_jax.teacher)."""
    distill = config.get("distill")
    if not distill or not distill.teacher:
        return
    _require(objective.name == "contrastive",
             f"config.distill.teacher: distillation adds to the contrastive loss; "
             f"config.objective={objective.name!r}")
    _require(distill.weight >= 0, f"config.distill.weight={distill.weight!r} must be >= 0")
    _require(distill.dtype in teacher_lib.DTYPES,
             f"config.distill.dtype={distill.dtype!r} is unknown; choose one of "
             f"{', '.join(teacher_lib.DTYPES)}")
