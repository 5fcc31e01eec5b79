"""Logical names of activation axes, and the constraint that pins an activation to them.

Parameters name their axes when they are created (`nn.with_logical_partitioning`:
`embed`, `mlp`, `heads`, ...); activations name theirs here, with names of their
own, because the two are placed differently: FSDP splits a weight's `embed` axis
over devices but keeps every example's residual stream whole, splitting the
batch instead. Without these constraints XLA's sharding propagation is free to
follow the weights' layout into the activations and keep the whole global batch
on every device (ViT-B/16 under `fsdp=8`: 5x the temporaries of `data=8`).

The config's `sharding_rules` map these names to mesh axes, as they do the
parameters'. The names mean nothing until a function is traced under
`clip_jax.sharding.activation_sharding` (the train step is); elsewhere
(evaluation, inference, weight conversion) `constrain` returns its input.
"""

import contextlib

import flax.linen as nn
import jax

BATCH = "activation_batch"
LENGTH = "activation_length"  # tokens of a sequence (patches, caption positions)
EMBED = "activation_embed"  # a tower's residual width
MLP = "activation_mlp"  # the MLP's hidden units
HEADS = "activation_heads"
KV = "activation_kv"  # per-head features
VOCAB = "activation_vocab"  # logits over the output vocabulary

# Every name a model uses; the config's rules must map each of them.
ACTIVATION_AXES = (BATCH, LENGTH, EMBED, MLP, HEADS, KV, VOCAB)

# The layouts the towers use.
TOKENS = (BATCH, LENGTH, EMBED)  # [B, T, D]: a residual stream
HIDDEN = (BATCH, LENGTH, MLP)  # [B, T, F]: MLP hidden units
PER_HEAD = (BATCH, LENGTH, HEADS, KV)  # [B, T, N, H]: queries, keys, values, attended
POOLED = (BATCH, EMBED)  # [B, D]: one vector per example
FEATURE_MAP = (BATCH, None, None, EMBED)  # [B, H, W, C]: convolutional features


def spec_axes(entry):
    """A PartitionSpec entry (None, a mesh axis, or a tuple of them) -> tuple of axes."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def constrain(x, names):
    """x, its sharding pinned to the mesh axes the active rules give `names`
    (one per dimension, None: replicated); x itself outside
    `sharding.activation_sharding`."""
    return nn.with_logical_constraint(x, names)


def per_device_attention_spec():
    """The PartitionSpec of a [B, T, N, H] attention operand for a kernel run
    per device under shard_map (Mosaic's splash, cuDNN's on a partly manual
    mesh): its batch and heads split as the active rules split them, each
    sequence and head dim whole. None outside `sharding.activation_sharding` or
    when the rules split none of its axes."""
    spec = nn.logical_to_mesh_axes(PER_HEAD)
    if spec is None or all(axis is None for axis in spec):
        return None
    return jax.P(spec[0], None, spec[2], None)


def compute_weight(weight, names, dtype):
    """A parameter (logical axes `names`) cast to the compute dtype and still
    split as it is stored, so FSDP gathers it after the cast: in bfloat16, half
    the bytes of gathering the float32 copy, which XLA otherwise does first."""
    return constrain(weight.astype(dtype), names)


@contextlib.contextmanager
def unconstrained():
    """No constraints inside: for traces that only make parameters (a stacked
    block's init under vmap, which flax re-traces to check shapes even in apply),
    where flax would also constrain each new parameter and vmap would misplace
    the batch axis of the activations'."""
    with nn.logical_axis_rules(()):
        yield
