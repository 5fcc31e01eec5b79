"""Pre-LayerNorm Transformer shared by CLIP's image and text towers.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`) so that the
config's sharding rules place them; no mesh axes appear here.

Two layouts of a stack's parameters exist: unscanned (`resblocks_0`,
`resblocks_1`, ..., the default and what weight conversion targets) and scanned
(one `resblocks` subtree whose leaves carry a leading `layers` axis), where the
blocks run in a loop (`lax.scan`) so compile time does not grow with depth.
`stack_layers` / `unstack_layers` convert between them.
"""

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import lean_ops, weight_grads
from clip_jax.models.cudnn_attention import cudnn_attention
from clip_jax.models.lean_attention import attention
from clip_jax.models.partitioning import (EMBED, HIDDEN, PER_HEAD, TOKENS, compute_weight,
                                          constrain, spec_axes, unconstrained)
from clip_jax.models.splash import splash_attention

# Logical name of the leading axis of scanned (stacked) block parameters.
LAYERS_AXIS = "layers"
# Name of the stacked-blocks subtree of a scanned Transformer.
SCANNED_BLOCKS = "resblocks"


@jax.custom_vjp
def dense_matmul(x, kernel):
    """x [..., K] @ kernel [K, N] -> [..., N], with the kernel gradient computed as
    x [M, K] contracted with grad [M, N] over M, both flattened to matrices first
    (M: all leading axes).

    Plain autodiff contracts x and grad over all their leading axes at once; on
    XLA:CPU that dot, and a transpose of x fused into one, run well below its
    matmul library's speed (the ViT-B/16 train step at batch 8 with half the
    patches: 3.4 s with a transposed x, 3.1 s flattened, 2.7 s flattened and
    unscanned, where the transposes cost 1.0 s). Flattening is free (a bitcast)
    and made on CPU only; the values are the same.
    """
    return x @ kernel


def _dense_matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def kernel_grad_flattened(x, grad, dtype=None):
    """dL/dkernel [K, N] of x [..., K] @ kernel from grad [..., N], as x [M, K]
    and grad [M, N] contracted over M (the form XLA:CPU's matmul library takes
    at full speed); the dot emits `dtype` (None: its inputs')."""
    return jax.lax.dot_general(x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]),
                               (((0,), (0,)), ((), ())), preferred_element_type=dtype)


def kernel_grad_plain(x, grad, dtype=None):
    """The same as kernel_grad_flattened, as autodiff writes it (x contracted over
    its leading axes in place)."""
    leading = tuple(range(x.ndim - 1))
    return jax.lax.dot_general(x, grad, ((leading, leading), ((), ())),
                               preferred_element_type=dtype)


def _dense_matmul_bwd(residuals, grad):
    x, kernel = residuals
    # Only XLA:CPU is measured to need the flattened form; GPU and TPU compilers
    # choose their own layouts (unless the mode forces it).
    forced = lean_ops.forced_backward()
    # Emitted in float32 under grad_reduce_dtype="float32", so the partitioner
    # reduces it across devices in float32; rounded to the kernel's dtype after.
    dtype = weight_grads.kernel_grad_dtype()
    if forced is None:
        kernel_grad = jax.lax.platform_dependent(
            x, grad, cpu=functools.partial(kernel_grad_flattened, dtype=dtype),
            default=functools.partial(kernel_grad_plain, dtype=dtype))
    else:
        kernel_grad = (kernel_grad_flattened if forced else kernel_grad_plain)(x, grad, dtype)
    return grad @ kernel.T, kernel_grad.astype(kernel.dtype)


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


class Dense(nn.Module):
    """x [..., K] -> [..., features]: nn.Dense's params (`kernel` [K, features],
    `bias`, normal / zero init with the given logical axes) over `dense_matmul`,
    computed in `dtype`."""

    features: int
    kernel_std: float
    kernel_axes: tuple  # logical names of (in, out)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", normal(self.kernel_std, self.kernel_axes),
                            (x.shape[-1], self.features))
        bias = self.param("bias", zeros(self.kernel_axes[-1:]), (self.features,))
        return (dense_matmul(x.astype(self.dtype), compute_weight(kernel, self.kernel_axes,
                                                                  self.dtype))
                + bias.astype(self.dtype))


class DenseGeneral(nn.Module):
    """x [..., *in] -> [..., *features]: the last `axes` input axes contracted with
    kernel [*in, *features] (normal init, logical axes `kernel_axes`), plus bias
    [*features] (zeros); computed in `dtype`.

    nn.DenseGeneral's parameters (`kernel`, `bias`, same shapes), made in their
    own shape: flax's makes the kernel flat and reshapes it, and under logical
    axis rules it then constrains the flat kernel with the unflattened kernel's
    axis names, which fails.
    """

    features: tuple
    kernel_std: float
    kernel_axes: tuple  # logical names of (*in, *features)
    axes: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", normal(self.kernel_std, self.kernel_axes),
                            (*x.shape[-self.axes:], *self.features))
        bias = self.param("bias", zeros(self.kernel_axes[self.axes:]), tuple(self.features))
        weight = compute_weight(kernel, self.kernel_axes, self.dtype)
        inputs = x.astype(self.dtype)
        # One [..., K] @ [K, N] matmul (free reshapes), so the kernel gradient is
        # dense_matmul's; as a multi-axis dot XLA:CPU also relaid the kernel out
        # every step (ViT-B/16 train step at batch 16 with half the patches: 4.9
        # -> 4.6 s). The bias joins the flat product, where the GPU compiler
        # folds it into the GEMM (after the reshape it took a pass of its own).
        contracted = math.prod(weight.shape[:self.axes])
        flat = dense_matmul(inputs.reshape(*x.shape[:-self.axes], contracted),
                            weight.reshape(contracted, -1)) + bias.astype(self.dtype).reshape(-1)
        return flat.reshape(*flat.shape[:-1], *self.features)


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation; its released weights were trained with it."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": lean_ops.gelu, "quick_gelu": quick_gelu}


def activation_fn(name: str) -> Callable:
    """Looks up an activation by config name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"config.model.activation={name!r} is unknown; "
                         f"choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# config.model.remat -> what each residual block keeps for the backward pass
# ("none": no rematerialisation; "full": keep nothing, recompute the block).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
REMAT_NAMES = ("none", *REMAT_POLICIES)


def remat_policy(name):
    """The jax.checkpoint policy of config.model.remat `name`; None for "none"."""
    if name not in REMAT_NAMES:
        raise ValueError(f"config.model.remat={name!r} is unknown; "
                         f"choose one of {', '.join(REMAT_NAMES)}")
    return REMAT_POLICIES.get(name)


def normal(stddev, names):
    """Normal initialiser with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


class LayerNorm(nn.Module):
    """LayerNorm over `embed` with params `scale` and `bias`, computed in float32
    for stability under bf16; returns the input dtype."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (width,))
        bias = self.param("bias", zeros(("embed",)), (width,))
        return lean_ops.layer_norm(x, scale, bias, self.epsilon)


TOKEN_TABLE = ("vocab", "embed")  # the logical axes of every token embedding table


def _rows(table, tokens):
    return constrain(constrain(table, ("vocab", EMBED))[tokens], TOKENS)


def embed_tokens(table, tokens, dtype):
    """Rows of table [V, D] (params `TOKEN_TABLE`) at tokens [B, L] -> [B, L, D]
    in `dtype`, split over the batch like every activation.

    The table is cast to `dtype`, the tower's compute dtype, and then gathered
    whole over `embed`, as FSDP gathers a layer's weights in the dtype its
    matmuls read them: in bfloat16 the table's gather and its gradient's
    reduction move half the bytes of float32's. Left alone, XLA looks every
    device's tokens up in its own slice of the width and exchanges the rows; on
    a mesh that also has a `data` axis it cannot reach the batch split from
    there and replicates the whole batch's embeddings on every device instead.
    """
    return _embedded(table.astype(dtype), tokens)


@jax.custom_vjp
def _embedded(table, tokens):
    return _rows(table, tokens)


def _embedded_fwd(table, tokens):
    return _rows(table, tokens), (table, tokens)


def _embedded_bwd(residuals, rows_grad):
    """The table's gradient reduced straight into the table's own split, in
    the dtype a kernel's gradient is reduced in (config.model.grad_reduce_dtype,
    models/weight_grads.py: the compute dtype by default).

    Autodiff pins it to the forward's gathered split first, so XLA summed every
    device's scatter into the whole table on each (an all-reduce of V x D) and
    then kept its slice. Left to choose without that pin, XLA gathers the row
    gradients of every batch shard instead, an activation of the global batch.
    Here each device scatters its own rows into a whole-table partial sum, in
    float32, and casts it to the reduction's dtype: where FSDP splits the table
    the sum is reduce-scattered onto the table's split (half the bytes of the
    all-reduce, none of them growing with the batch), under data parallelism
    all-reduced. (XLA reduces a partial sum before any cast, so autodiff's form
    all-reduced data parallelism's float32 sum.)
    """
    table, tokens = residuals
    wire = weight_grads.kernel_grad_dtype() or table.dtype
    mesh = jax.sharding.get_abstract_mesh()
    table_spec = nn.logical_to_mesh_axes(TOKEN_TABLE)
    rows_spec = nn.logical_to_mesh_axes(TOKENS)
    if not _reduces_per_device(mesh, table_spec, rows_spec, table.shape, tokens.shape[0]):
        # What autodiff does: the gathered table's gradient, then the table's split.
        whole = constrain(_scattered(tokens, rows_grad, table.shape, wire), ("vocab", EMBED))
        return constrain(whole, TOKEN_TABLE).astype(table.dtype), None
    batch = rows_spec[0]
    reduce = functools.partial(_reduced_onto, shape=table.shape, dtype=wire,
                               table_spec=tuple(table_spec), batch_axes=spec_axes(batch))
    table_grad = jax.shard_map(reduce, mesh=mesh, in_specs=(jax.P(batch), jax.P(batch)),
                               out_specs=jax.P(*table_spec))(tokens, rows_grad)
    # The TPU compiler (libtpu 0.0.42.1) aborts on a reduce-scatter inside a loop
    # whose result is converted before it is summed (GradCache's micro-batch loop
    # under FSDP: its while-loop all-reduce code motion, a RET_CHECK); behind the
    # barrier it leaves the reduction where it is, as GPUs do.
    table_grad = jax.lax.optimization_barrier(table_grad)
    return table_grad.astype(table.dtype), None


def _reduces_per_device(mesh, table_spec, rows_spec, table_shape, rows):
    """Whether the rows are split over more than one device, with every split
    even: otherwise there is nothing to reduce (one device) or the table's
    split is uneven, and autodiff's form serves."""
    if mesh.empty or table_spec is None or rows_spec is None:
        return False
    def size(entry):
        return math.prod(mesh.shape[axis] for axis in spec_axes(entry))
    return (size(rows_spec[0]) > 1 and rows % size(rows_spec[0]) == 0
            and all(dim % size(entry) == 0 for dim, entry in zip(table_shape, table_spec)))


def _scattered(tokens, rows_grad, shape, dtype):
    """[V, D] in `dtype`: rows_grad [..., D] summed into the rows `tokens` [...]
    name. The sum is float32's: a frequent token's rows are many, and bfloat16
    would round after each."""
    summed = jnp.zeros(shape, jnp.float32).at[tokens].add(rows_grad.astype(jnp.float32))
    return summed.astype(dtype)


def _reduced_onto(tokens, rows_grad, *, shape, dtype, table_spec, batch_axes):
    """This device's block of the table gradient (split as `table_spec`) from
    its own batch rows: a reduce-scatter over the batch axes that split the
    table, a plain slice over axes the rows are not split on (they are equal
    there), a sum over the batch axes that do not split it."""
    grad = _scattered(tokens, rows_grad, shape, dtype)
    pending = list(batch_axes)
    for dim, entry in enumerate(table_spec):
        for axis in spec_axes(entry):  # major to minor, as PartitionSpec splits
            if axis in pending:
                grad = jax.lax.psum_scatter(grad, axis, scatter_dimension=dim, tiled=True)
                pending.remove(axis)
            else:
                size = grad.shape[dim] // jax.lax.axis_size(axis)
                grad = jax.lax.dynamic_slice_in_dim(grad, jax.lax.axis_index(axis) * size, size,
                                                    axis=dim)
    return jax.lax.psum(grad, tuple(pending)) if pending else grad


_embedded.defvjp(_embedded_fwd, _embedded_bwd)


def take_tokens(x, positions):
    """x [B, T, D], positions [B] -> [B, 1, D]: each row's token at its position.

    A masked sum, exact: XLA splits it over the batch like any elementwise op,
    where a gather with per-row indices is computed for the whole batch on
    every device."""
    chosen = (jnp.arange(x.shape[1]) == positions[:, None])[..., None]  # [B, T, 1]
    return constrain(jnp.sum(jnp.where(chosen, x, 0), axis=1, keepdims=True), TOKENS)


# config.model.attention: which kernel computes the full-sequence attention.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")


def attention_implementation(name, dtype, platform=None):
    """The kernel config.model.attention `name` selects: "xla" (XLA's generic
    attention), "cudnn" (cuDNN's fused kernel: GPU, fp16 or bf16), "splash" (the
    Pallas TPU kernel, models/splash.py; interpreted, slowly, off TPU), or
    "auto": cuDNN where it applies (a GPU and a half-precision dtype), else XLA's.
    Splash is not auto's choice on TPU until a TPU measurement shows it faster
    there (docs/benchmarks.md, "Device check"). `platform`: the one compiled
    for, by default JAX's default backend, read when the model is traced."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={name!r} is unknown; "
                         f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if name == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if (platform or jax.default_backend()) == "gpu" and half else "xla"
    return name


class Attention(nn.Module):
    """Multi-head attention; x [B, T, D] -> [B, T, D], or [B, 1, D] for the queries
    at `query_positions` [B] only (keys and values from every token).

    Keys and values come from `context` [B, S, C] when given (cross-attention,
    e.g. CoCa's decoder reading the image tokens), else from x (self-attention);
    `key_mask` bool [B, S] hides the keys where it is False (padding).

    `attention` (ATTENTION_IMPLEMENTATIONS) computes the full-sequence attention;
    the single pooled query, and any masked attention, use XLA's computation
    (models/lean_attention.py), which takes a per-row mask (splash's padding is
    per sequence length, not per example). `padded_tokens`: x's last tokens are
    padding its keys must hide (cuDNN's; see Transformer)."""

    heads: int
    causal: bool
    in_std: float
    out_std: float
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    padded_tokens: int = 0

    @nn.compact
    def __call__(self, x, query_positions=None, context=None, key_mask=None):
        width = x.shape[-1]
        head_dim = width // self.heads

        def project(name, inputs):
            return constrain(DenseGeneral((self.heads, head_dim), self.in_std,
                                          ("embed", "heads", "kv"), dtype=self.dtype,
                                          name=name)(inputs), PER_HEAD)

        if decoding(self):
            return self._decode(project, x, context)
        sources = x if context is None else context
        key, value = project("key", sources), project("value", sources)  # [B, S, N, H]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        if query_positions is None:
            query = project("query", x)
            implementation = attention_implementation(self.attention, self.dtype)
            if implementation == "cudnn" and self.is_initializing():
                # Same shapes and parameters; stacked blocks initialise under jax.vmap,
                # which JAX's rule for cuDNN's padded call does not batch.
                implementation = "xla"
            if implementation == "splash" and mask is None:
                attended = splash_attention(query, key, value, causal=self.causal)
            elif implementation == "cudnn":
                attended = cudnn_attention(
                    query, key, value, mask=mask, causal=self.causal,
                    padded_keys=self.padded_tokens if context is None else 0)
            else:
                attended = attention(query, key, value, mask=mask, is_causal=self.causal)
        else:
            query = project("query", take_tokens(x, query_positions))  # [B, 1, N, H]
            # A causal query sees the keys up to its own position.
            if self.causal:
                seen = jnp.arange(sources.shape[1]) <= query_positions[:, None, None, None]
                mask = seen if mask is None else mask & seen  # [B, 1, 1, S]
            attended = attention(query, key, value, mask=mask)
        # With heads split over `tensor` this is Megatron's row-parallel matmul: the
        # partial sums meet in one all-reduce, at the residual stream's constraint.
        return self._out(attended, width)


    def _decode(self, project, x, context):
        """Incremental decoding with a key/value cache (see `decoding`): the first
        call, on a whole [B, S, D] sequence, only makes a zero cache of S
        positions; each later call takes the next tokens [B, t, D] and attends over
        every cached position so far. Cross-attention caches the context's keys
        and values on the first call. Key masks do not apply (the caller decodes
        no padding)."""
        if context is not None:
            ready = self.has_variable("cache", "context_key")
            key = self.variable("cache", "context_key", lambda: project("key", context))
            value = self.variable("cache", "context_value", lambda: project("value", context))
            if not ready:
                return jnp.zeros_like(x)
            attended = attention(project("query", x), key.value, value.value)
            return self._out(attended, x.shape[-1])
        ready = self.has_variable("cache", "cached_key")
        new_key, new_value = project("key", x), project("value", x)  # [B, t, N, H]
        key = self.variable("cache", "cached_key", jnp.zeros_like, new_key)
        value = self.variable("cache", "cached_value", jnp.zeros_like, new_value)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not ready:
            return jnp.zeros_like(x)
        start = index.value
        key.value = jax.lax.dynamic_update_slice(key.value, new_key, (0, start, 0, 0))
        value.value = jax.lax.dynamic_update_slice(value.value, new_value, (0, start, 0, 0))
        index.value = start + x.shape[1]
        # Query j (at position start + j) sees the cached positions up to its own.
        positions = jnp.arange(key.value.shape[1])
        seen = positions[None, :] <= start + jnp.arange(x.shape[1])[:, None]  # [t, S]
        attended = attention(project("query", x), key.value, value.value, mask=seen[None, None])
        return self._out(attended, x.shape[-1])

    def _out(self, attended, width):
        return constrain(DenseGeneral((width,), self.out_std, ("heads", "kv", "embed"), axes=2,
                                      dtype=self.dtype, name="out")(
            constrain(attended, PER_HEAD)), TOKENS)


def decoding(module):
    """Whether `module` runs incremental decoding: its apply was given the
    "cache" collection as mutable (clip_jax.captioning does), outside init."""
    return module.is_mutable_collection("cache") and not module.is_initializing()


class ResidualBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)), as in CLIP's ResidualAttentionBlock;
    [B, T, D] -> [B, T, D], or [B, 1, D]: the outputs at `query_positions` [B] only.

    `cross_attention`: the block attends to `context` [B, S, D] (normalised by its
    own `ln_1_kv`), as OpenCLIP's cross-attention blocks in CoCa's decoder do;
    `key_mask` bool [B, S]: the keys (of x, or of the context) attended to;
    `padded_tokens`: x's last tokens are padding (Attention)."""

    heads: int
    layers: int  # depth of the whole stack, for the residual-branch init scale
    causal: bool
    activation: str
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    cross_attention: bool = False
    padded_tokens: int = 0

    @nn.compact
    def __call__(self, x, query_positions=None, key_mask=None, context=None):
        width = x.shape[-1]
        hidden = int(width * self.mlp_ratio)
        # CLIP's init: residual-branch outputs shrink with depth so the stream stays O(1).
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * width) ** -0.5

        x = constrain(x, TOKENS)
        if self.cross_attention:
            context = constrain(LayerNorm(name="ln_1_kv")(context), TOKENS)
        attended = Attention(self.heads, self.causal, attn_std, proj_std, self.dtype,
                             self.attention, self.padded_tokens, name="attn")(
            LayerNorm(name="ln_1")(x), query_positions, context, key_mask)
        x = (x if query_positions is None else take_tokens(x, query_positions)) + attended
        h = Dense(hidden, fc_std, ("embed", "mlp"), self.dtype, name="c_fc")(
            LayerNorm(name="ln_2")(x))
        h = activation_fn(self.activation)(constrain(h, HIDDEN))
        h = Dense(width, proj_std, ("mlp", "embed"), self.dtype, name="c_proj")(h)
        return constrain(x + h, TOKENS)


LAYER_LOOPS = ("auto", "scan", "unrolled")


def unrolled_layer_loop(name, platform=None, remat="none"):
    """Whether config.model.layer_loop `name` runs stacked blocks one call per
    block (see Transformer); "auto": on CPUs, and on GPUs and TPUs unless the
    blocks are rematerialised keeping nothing (config.model.remat "full" or
    "nothing_saveable"). `platform`: the one the step runs on, by default the
    backend the model is traced on."""
    if name not in LAYER_LOOPS:
        raise ValueError(f"config.model.layer_loop={name!r} is unknown; choose one of "
                         f"{', '.join(LAYER_LOOPS)}")
    if name == "auto":
        platform = platform or jax.default_backend()
        keeps_nothing = remat_policy(remat) is jax.checkpoint_policies.nothing_saveable
        return platform == "cpu" or not keeps_nothing
    return name == "unrolled"


def remat_block(remat, scanned):
    """ResidualBlock, wrapped in nn.remat with config.model.remat's policy
    (REMAT_NAMES) unless that is "none"; `scanned`: the blocks run under lax.scan."""
    policy = remat_policy(remat)
    if policy is None:
        return ResidualBlock
    # Under scan the loop boundary already stops XLA from merging the
    # recomputation with the forward pass, so CSE prevention is not needed.
    return nn.remat(ResidualBlock, policy=policy, prevent_cse=not scanned)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_layers(stacked, sizes):
    """The stacked blocks' parameters cut along their layers axis into groups
    of `sizes` layers, each a tree of the same leaves with a leading [size]
    axis; its gradient is one concatenation of the groups' gradients.
    Autodiff's transpose of a slice is the whole stack's shape zero-padded
    around it, and the optimizer would read the sum of one per layer: the TPU
    compiler recomputes that sum in three kernels of the AdamW update (the
    parameter and each moment) where it otherwise writes all three in one.
    ViT-B/16 at 32 per v5e chip, data=4, by its estimate: the update 5.6 ms
    against 10.8, the step 52.7 against 56.6 (docs/capacity.md)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [jax.tree.map(lambda leaf, start=start, size=size: leaf[start:start + size], stacked)
            for start, size in zip(starts, sizes)]


def _split_layers_fwd(stacked, sizes):
    return split_layers(stacked, sizes), None


def _split_layers_bwd(sizes, _, group_grads):
    return (jax.tree.map(lambda *grads: jnp.concatenate(grads), *group_grads),)


split_layers.defvjp(_split_layers_fwd, _split_layers_bwd)


class Transformer(nn.Module):
    """A stack of `layers` residual blocks; [B, T, D] -> [B, T, D].

    With `pool_positions` [B] only each row's token at that position is wanted
    (CLIP's towers pool one token): returns [B, D], and the last block computes
    queries, attention and MLP for that token alone (keys and values for all),
    the same values for about 7% fewer FLOPs in a 12-block tower.

    scan_layers: run the blocks in a loop (lax.scan) with parameters stacked on a
    leading `layers` axis (params `resblocks/...`) instead of one submodule per
    block (`resblocks_0/...`); the outputs are the same given stacked params.
    layer_loop: how stacked blocks run (LAYER_LOOPS): "scan" (one lax.scan) or
    "unrolled" (one call per block on its slice of the stack); "auto" unrolls
    on CPUs, and on GPUs and TPUs unless remat keeps nothing. A scan writes each array
    the backward pass keeps into a stack of all layers' and copies it back out,
    kernels of their own wherever a GEMM or cuDNN made the array; unrolled, the
    arrays stay where they were made. XLA:CPU: ViT-B/16 train step at batch 16,
    half the patches, 2-core VM, 5.8 s scanned, 5.0 s unrolled. XLA's GPU
    compiler, bf16, cuDNN (docs/capacity.md): ViT-B/16 at 128 on one H100
    needs 8.7 GiB of temporaries unrolled against 18.4 scanned, its roofline
    bound 32.5 ms against 53.0, for 8 s more compile time; ViT-L/14 at 32 per
    GPU on 8 (fsdp=8) 10.2 against 14.9 GiB, 33.1 against 47.6 ms. Under
    remat="full" the scan keeps less: there 1.5 GiB scanned against 4.3
    unrolled, and 36.9 against 40.8 ms. The TPU compiler, bf16, XLA's attention
    (its memory analysis and its own estimate of the step, docs/capacity.md):
    ViT-B/16 at 32 per v5e chip (data=4) 4.6 GiB unrolled against 9.1 scanned,
    53 against 90 ms, for 4x the compile time; under remat="full", at 128 per
    chip, 7.1 against 4.6 GiB in about the same time (303 and 301 ms). A policy that keeps the
    matmuls' outputs (dots_saveable) keeps a little per layer, and there the
    unrolled loop is faster again in no more memory: ViT-B/16 at 128 on an
    H100 (cuDNN, lean passes) 32.2 against 36.9 ms, 5.5 against 5.6 GiB; at 64
    per v5e chip 136.3 against 157.6 ms, 7.0 against 7.6 GiB.
    remat: a name from REMAT_NAMES; wraps each block in nn.remat with that policy.
    """

    layers: int
    heads: int
    causal: bool
    activation: str
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    layer_loop: str = "auto"  # LAYER_LOOPS
    remat: str = "none"
    attention: str = "xla"  # ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x, pool_positions=None, key_mask=None):
        """key_mask bool [B, T]: the tokens attended to (None: all)."""
        if self.scan_layers and decoding(self):
            raise ValueError("incremental decoding runs unscanned blocks (scan_layers=False; "
                             "models.transformer.unstack_layers converts the parameters)")
        unrolled = self.scan_layers and unrolled_layer_loop(self.layer_loop, remat=self.remat)
        block_class = remat_block(self.remat, self.scan_layers and not unrolled)
        tokens, stream_mask = x.shape[1], key_mask
        padded = self._cudnn_padding(tokens)
        if padded:
            x = jnp.pad(x, ((0, 0), (0, padded), (0, 0)))
            stream_mask = None if key_mask is None else jnp.pad(key_mask, ((0, 0), (0, padded)))
        block_args = (self.heads, self.layers, self.causal, self.activation, self.mlp_ratio,
                      self.dtype, self.attention)
        full_blocks = self.layers if pool_positions is None else self.layers - 1
        if not self.scan_layers:
            for i in range(full_blocks):
                x = block_class(*block_args, padded_tokens=padded, name=f"resblocks_{i}")(
                    x, None, stream_mask)
            if pool_positions is None:
                return x[:, :tokens]
            # The pooled query runs XLA's attention over the real tokens only.
            return block_class(*block_args, name=f"resblocks_{full_blocks}")(
                x[:, :tokens], pool_positions, key_mask)[:, 0]

        # The blocks' parameters, stacked, are one parameter of this module (the
        # layout nn.scan would give), so that the pooled last block can apply the
        # last slice outside the loop.
        block = block_class(*block_args, padded_tokens=padded, parent=None)

        def init_stacked(rng):
            with unconstrained():
                stacked = jax.vmap(lambda key: block.init(key, x)["params"])(
                    jax.random.split(rng, self.layers))
            return jax.tree.map(lambda box: box.add_axis(0, {nn.PARTITION_NAME: LAYERS_AXIS}),
                                stacked, is_leaf=lambda leaf: isinstance(leaf, nn.meta.AxisMetadata))

        stacked = self.param(SCANNED_BLOCKS, init_stacked)
        if unrolled:
            layers = [jax.tree.map(lambda p: p[0], group)
                      for group in split_layers(stacked, (1,) * self.layers)]
            for params in layers[:full_blocks]:
                x = block.apply({"params": params}, x, None, stream_mask)
        else:
            # Plain slices here: the scan's gradient is already one stack, and
            # concatenating the pooled last layer's onto it would copy it whole
            # (GPU roofline, scanned ViT-B/16 at 128: 54.1 ms against 53.0).
            layers = [jax.tree.map(lambda p: p[-1], stacked)]
            looped = stacked if pool_positions is None else jax.tree.map(lambda p: p[:-1], stacked)
            x, _ = jax.lax.scan(
                lambda carry, params: (block.apply({"params": params}, carry, None, stream_mask),
                                       None),
                x, looped)
        x = x[:, :tokens]
        if pool_positions is None:
            return x
        last = layers[-1]
        return block.clone(padded_tokens=0).apply({"params": last}, x, pool_positions,
                                                  key_mask)[:, 0]

    def _cudnn_padding(self, tokens):
        """1 where the blocks run cuDNN's attention on an odd number of tokens:
        the stream is then padded by one token before the first block and sliced
        after the last, once, instead of in every layer (models/cudnn_attention.py).
        The padded token's keys are hidden and its rows are never read, so every
        real token's value and gradient is unchanged."""
        cudnn = attention_implementation(self.attention, self.dtype) == "cudnn"
        return int(tokens % 2 == 1 and cudnn and not self.is_initializing()
                   and not decoding(self))


def stack_layers(transformer_params):
    """Unscanned Transformer params {resblocks_i: tree for i < L} -> scanned
    {resblocks: the same tree with a leading [L] axis on every leaf}; other keys
    are kept. The inverse of `unstack_layers`."""
    rest = {k: v for k, v in transformer_params.items() if not k.startswith("resblocks_")}
    layers = len(transformer_params) - len(rest)
    blocks = [transformer_params[f"resblocks_{i}"] for i in range(layers)]
    return {**rest, SCANNED_BLOCKS: jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}


def unstack_layers(transformer_params):
    """Scanned Transformer params {resblocks: stacked tree} -> unscanned
    {resblocks_i: tree}, the inverse of `stack_layers`; other keys are kept."""
    stacked = transformer_params[SCANNED_BLOCKS]
    layers = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in transformer_params.items() if k != SCANNED_BLOCKS}
    return {**rest, **{f"resblocks_{i}": jax.tree.map(lambda leaf: leaf[i], stacked)
                       for i in range(layers)}}
