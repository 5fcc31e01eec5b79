"""Pre-LayerNorm Transformer shared by CLIP's image and text towers.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`) so that the
config's sharding rules place them; no mesh axes appear here.

Two layouts of a stack's parameters exist: unscanned (`resblocks_0`,
`resblocks_1`, ..., the default and what weight conversion targets) and scanned
(one `resblocks` subtree whose leaves carry a leading `layers` axis), where the
blocks run in a loop (`lax.scan`) so compile time does not grow with depth.
`stack_layers` / `unstack_layers` convert between them.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import lean_ops

# Logical name of the leading axis of scanned (stacked) block parameters.
LAYERS_AXIS = "layers"
# Name of the stacked-blocks subtree of a scanned Transformer.
SCANNED_BLOCKS = "resblocks"


@jax.custom_vjp
def dense_matmul(x, kernel):
    """x [..., K] @ kernel [K, N] -> [..., N], with the kernel gradient computed as
    x^T [K, M] @ grad [M, N] on an explicitly transposed x (M: all leading axes).

    Plain autodiff asks XLA for x contracted over its leading axis in place; on
    CPU XLA hands that form to Eigen instead of its fast matmul library, at a
    third to a half of the speed (4.6 s of a 16 s single-core ViT-B/32 image-tower
    backward). The transpose costs one copy of x and is made on CPU only; the
    values are the same.
    """
    return x @ kernel


def _dense_matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def kernel_grad_transposed(x, grad):
    """dL/dkernel [K, N] of x [..., K] @ kernel from grad [..., N], as x^T [K, M] @
    grad [M, N]: transpose-then-reshape, so that XLA cannot fold the transpose into
    the dot (the form XLA:CPU's matmul library takes)."""
    leading = tuple(range(x.ndim - 1))
    x_t = jnp.transpose(x, (x.ndim - 1, *leading)).reshape(x.shape[-1], -1)
    return x_t @ grad.reshape(-1, grad.shape[-1])


def kernel_grad_plain(x, grad):
    """The same as kernel_grad_transposed, as autodiff writes it (x contracted over
    its leading axes in place)."""
    leading = tuple(range(x.ndim - 1))
    return jnp.tensordot(x, grad, (leading, leading))


def _dense_matmul_bwd(residuals, grad):
    x, kernel = residuals
    # Only XLA:CPU needs the explicit transpose; GPU and TPU compilers pick their
    # own layouts and would pay for the extra copy of x.
    kernel_grad = jax.lax.platform_dependent(x, grad, cpu=kernel_grad_transposed,
                                             default=kernel_grad_plain)
    return grad @ kernel.T, kernel_grad


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


class Dense(nn.Module):
    """nn.Dense (params `kernel` [in, out], `bias`) over `dense_matmul`; computes in `dtype`."""

    features: int
    kernel_init: Callable
    bias_init: Callable
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        return dense_matmul(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation; its released weights were trained with it."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": lean_ops.gelu, "quick_gelu": quick_gelu}


def activation_fn(name: str) -> Callable:
    """Looks up an activation by config name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
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


def take_tokens(x, positions):
    """x [B, T, D], positions [B] -> [B, 1, D]: each row's token at its position."""
    return jnp.take_along_axis(x, positions[:, None, None], axis=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention; [B, T, D] -> [B, T, D], or [B, 1, D] for the
    queries at `query_positions` [B] only (keys and values from every token)."""

    heads: int
    causal: bool
    in_std: float
    out_std: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, query_positions=None):
        width = x.shape[-1]
        head_dim = width // self.heads

        def project(name, inputs):
            return nn.DenseGeneral(
                (self.heads, head_dim), dtype=self.dtype, name=name,
                kernel_init=normal(self.in_std, ("embed", "heads", "kv")),
                bias_init=zeros(("heads", "kv")),
            )(inputs)

        key, value = project("key", x), project("value", x)  # [B, T, N, H]
        if query_positions is None:
            query = project("query", x)
            attended = jax.nn.dot_product_attention(query, key, value, is_causal=self.causal)
        else:
            query = project("query", take_tokens(x, query_positions))  # [B, 1, N, H]
            # A causal query sees the keys up to its own position.
            mask = (jnp.arange(x.shape[1]) <= query_positions[:, None, None, None]
                    if self.causal else None)  # [B, 1, 1, T]
            attended = jax.nn.dot_product_attention(query, key, value, mask=mask)
        return nn.DenseGeneral(
            width, axis=(-2, -1), dtype=self.dtype, name="out",
            kernel_init=normal(self.out_std, ("heads", "kv", "embed")),
            bias_init=zeros(("embed",)),
        )(attended)


class ResidualBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)), as in CLIP's ResidualAttentionBlock;
    [B, T, D] -> [B, T, D], or [B, 1, D]: the outputs at `query_positions` [B] only."""

    heads: int
    layers: int  # depth of the whole stack, for the residual-branch init scale
    causal: bool
    activation: str
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, query_positions=None):
        width = x.shape[-1]
        hidden = int(width * self.mlp_ratio)
        # CLIP's init: residual-branch outputs shrink with depth so the stream stays O(1).
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * width) ** -0.5

        attended = SelfAttention(self.heads, self.causal, attn_std, proj_std, self.dtype,
                                 name="attn")(LayerNorm(name="ln_1")(x), query_positions)
        x = (x if query_positions is None else take_tokens(x, query_positions)) + attended
        h = Dense(hidden, dtype=self.dtype, name="c_fc",
                     kernel_init=normal(fc_std, ("embed", "mlp")), bias_init=zeros(("mlp",)))(
            LayerNorm(name="ln_2")(x))
        h = activation_fn(self.activation)(h)
        h = Dense(width, dtype=self.dtype, name="c_proj",
                     kernel_init=normal(proj_std, ("mlp", "embed")), bias_init=zeros(("embed",)))(h)
        return x + h


class Transformer(nn.Module):
    """A stack of `layers` residual blocks; [B, T, D] -> [B, T, D].

    With `pool_positions` [B] only each row's token at that position is wanted
    (CLIP's towers pool one token): returns [B, D], and the last block computes
    queries, attention and MLP for that token alone (keys and values for all),
    the same values for about 7% fewer FLOPs in a 12-block tower.

    scan_layers: run the blocks in a loop (lax.scan) with parameters stacked on a
    leading `layers` axis (params `resblocks/...`) instead of one submodule per
    block (`resblocks_0/...`); the outputs are the same given stacked params.
    remat: a name from REMAT_NAMES; wraps each block in nn.remat with that policy.
    """

    layers: int
    heads: int
    causal: bool
    activation: str
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, x, pool_positions=None):
        block_class = ResidualBlock
        if self.remat != "none":
            if self.remat not in REMAT_POLICIES:
                raise ValueError(f"unknown remat policy {self.remat!r}; "
                                 f"choose one of {', '.join(REMAT_NAMES)}")
            # Under scan the loop boundary already stops XLA from merging the
            # recomputation with the forward pass, so CSE prevention is not needed.
            block_class = nn.remat(ResidualBlock, policy=REMAT_POLICIES[self.remat],
                                   prevent_cse=not self.scan_layers)
        block_args = (self.heads, self.layers, self.causal, self.activation, self.mlp_ratio,
                      self.dtype)
        full_blocks = self.layers if pool_positions is None else self.layers - 1
        if not self.scan_layers:
            for i in range(full_blocks):
                x = block_class(*block_args, name=f"resblocks_{i}")(x)
            if pool_positions is None:
                return x
            return block_class(*block_args, name=f"resblocks_{full_blocks}")(x, pool_positions)[:, 0]

        # The blocks' parameters, stacked, are one parameter of this module (the
        # layout nn.scan would give), so that the pooled last block can apply the
        # last slice outside the loop.
        block = block_class(*block_args, parent=None)

        def init_stacked(rng):
            stacked = jax.vmap(lambda key: block.init(key, x)["params"])(
                jax.random.split(rng, self.layers))
            return jax.tree.map(lambda box: box.add_axis(0, {nn.PARTITION_NAME: LAYERS_AXIS}),
                                stacked, is_leaf=lambda leaf: isinstance(leaf, nn.meta.AxisMetadata))

        stacked = self.param(SCANNED_BLOCKS, init_stacked)
        looped = stacked if pool_positions is None else jax.tree.map(lambda p: p[:-1], stacked)
        x, _ = jax.lax.scan(lambda carry, params: (block.apply({"params": params}, carry), None),
                            x, looped)
        if pool_positions is None:
            return x
        last = jax.tree.map(lambda p: p[-1], stacked)
        return block.apply({"params": last}, x, pool_positions)[:, 0]


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
