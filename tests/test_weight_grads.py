"""config.model.grad_reduce_dtype (models/weight_grads.py): in which dtype the
kernel and token-table gradients of a bfloat16 model are reduced across
devices, read off the compiled program, and what that does to their values.

XLA:CPU computes bfloat16 dots in float32 and, allowed excess precision (its
default), rounds only where a value leaves the program, which hides the
bfloat16 rounding a GPU or TPU does; these programs are compiled without it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import capacity, hlo_stats, sharding
from clip_jax.models import lean_ops, weight_grads
from clip_jax.models.transformer import TOKEN_TABLE, dense_matmul, embed_tokens
from clip_jax.sharding_rules import BATCH_AXES, DEFAULT_RULES, MESH_AXES

BATCH, FEATURES_IN, FEATURES_OUT = 4096, 32, 48
REDUCTIONS = ("all-reduce", "reduce-scatter")


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:8])


def kernel_grad_step(mesh, mode, lean):
    """jitted d/dkernel of <dense_matmul(x, kernel in bfloat16), cotangent>, x and
    the cotangent split over 8 devices by rows, the float32 kernel replicated."""
    def loss(kernel, x, cotangent):
        out = dense_matmul(x, kernel.astype(jnp.bfloat16))
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    def grad(*args):  # the modes apply where the backward pass is traced
        with lean_ops.lean_backward(lean), weight_grads.grad_reduce_dtype(mode):
            return jax.grad(loss)(*args)

    rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return jax.jit(grad, in_shardings=(whole, rows, rows), out_shardings=whole)


def compiled(mesh, mode, lean, *args):
    """kernel_grad_step compiled with bfloat16 rounded as an accelerator rounds it."""
    return kernel_grad_step(mesh, mode, lean).lower(*args).compile(
        compiler_options=capacity.DEVICE_NUMERICS)


def inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (FEATURES_IN, FEATURES_OUT)),
            jax.random.normal(keys[1], (BATCH, FEATURES_IN)).astype(jnp.bfloat16),
            jax.random.normal(keys[2], (BATCH, FEATURES_OUT)).astype(jnp.bfloat16))


@pytest.mark.parametrize("lean", ["on", "off"])
@pytest.mark.parametrize("mode, wire", [("compute", "bf16"), ("float32", "f32")])
def test_the_kernel_gradient_is_reduced_across_devices_in_the_mode_dtype(mesh, mode, wire,
                                                                         lean):
    text = compiled(mesh, mode, lean, *inputs()).as_text()
    reduced = [collective.dtypes for collective in hlo_stats.collectives(text, 8)
               if collective.kind in REDUCTIONS]
    assert reduced == [(wire,)]


def test_float32_reduction_rounds_the_global_gradient_once(mesh):
    """Under "float32" the 8-device gradient is the exact sum rounded to bfloat16
    (up to float32 summation order); under "compute" each device's share is
    rounded before the sum, and many entries land off the nearest bfloat16."""
    kernel, x, cotangent = inputs()
    exact = np.asarray(x, np.float64).T @ np.asarray(cotangent, np.float64)
    nearest = exact.astype(np.float32).astype(jnp.bfloat16).astype(np.float64)

    def off_nearest(mode):
        grad = compiled(mesh, mode, "off", kernel, x, cotangent)(kernel, x, cotangent)
        grad = np.asarray(grad, np.float64)
        return np.mean(grad != nearest)

    assert off_nearest("float32") < 0.01
    assert off_nearest("compute") > 0.1


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="grad_reduce_dtype='bf16' is unknown"):
        with weight_grads.grad_reduce_dtype("bf16"):
            pass


VOCAB, WIDTH, ROWS, LENGTH = 1024, 64, 64, 64


def table_grad_step(mode, axis="fsdp"):
    """jitted d/dtable of <embed_tokens(table, tokens, bfloat16), cotangent> over
    8 devices on mesh `axis` (fsdp or data): the float32 table split as the
    default rules split a token table, the tokens and the cotangent over the
    batch."""
    shape = tuple(8 if name == axis else 1 for name in MESH_AXES)
    mesh = jax.make_mesh(shape, MESH_AXES, devices=jax.devices()[:8],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)

    def loss(table, tokens, cotangent):
        return jnp.sum(embed_tokens(table, tokens, jnp.bfloat16).astype(jnp.float32) * cotangent)

    def grad(*args):
        with weight_grads.grad_reduce_dtype(mode):
            return jax.grad(loss)(*args)

    rules = [tuple(rule) for rule in DEFAULT_RULES]
    table = nn.logical_to_mesh_sharding(P(*TOKEN_TABLE), mesh, rules)
    rows = NamedSharding(mesh, P(BATCH_AXES))
    return jax.jit(sharding.with_activation_sharding(grad, mesh, DEFAULT_RULES),
                   in_shardings=(table, rows, rows), out_shardings=table)


def table_inputs(tokens):
    keys = jax.random.split(jax.random.key(1), 2)
    return (jax.random.normal(keys[0], (VOCAB, WIDTH)), tokens,
            jax.random.normal(keys[1], (ROWS, LENGTH, WIDTH)))


@pytest.mark.parametrize("axis, reduction", [("fsdp", "reduce-scatter"), ("data", "all-reduce")])
@pytest.mark.parametrize("mode, wire", [("compute", "bf16"), ("float32", "f32")])
def test_the_token_tables_gradient_is_reduced_in_the_mode_dtype(axis, reduction, mode, wire):
    """The table's gradient is reduce-scattered onto its FSDP split, or
    all-reduced under data parallelism, in the dtype the mode gives every
    kernel gradient: bfloat16 by default, where autodiff's form all-reduced
    data parallelism's float32 partial sums."""
    tokens = jax.random.randint(jax.random.key(2), (ROWS, LENGTH), 0, VOCAB)
    text = table_grad_step(mode, axis).lower(*table_inputs(tokens)).compile(
        compiler_options=capacity.DEVICE_NUMERICS).as_text()
    # (The batch axes of one device each are summed over too, moving nothing.)
    reduced = [(c.kind, c.dtypes) for c in hlo_stats.collectives(text, 8)
               if c.kind in REDUCTIONS and c.group_size > 1]
    assert reduced == [(reduction, (wire,))]


@pytest.mark.parametrize("axis", ["fsdp", "data"])
def test_a_frequent_tokens_rows_are_summed_in_float32(axis):
    """Each device sums its own rows of a token in float32 before the bfloat16
    reduction: 512 unit rows a device give 512, where bfloat16 additions stop at
    256 (256 + 1 rounds back to 256). Rows of one token, cotangent ones."""
    table, tokens, _ = table_inputs(jnp.full((ROWS, LENGTH), 7, jnp.int32))
    ones = jnp.ones((ROWS, LENGTH, WIDTH))
    grad = table_grad_step("compute", axis).lower(table, tokens, ones).compile(
        compiler_options=capacity.DEVICE_NUMERICS)(table, tokens, ones)
    expected = np.zeros((VOCAB, WIDTH), np.float32)
    expected[7] = ROWS * LENGTH
    np.testing.assert_array_equal(np.asarray(grad), expected)
