"""config.model.grad_reduce_dtype (models/weight_grads.py): in which dtype the
kernel gradients of a bfloat16 model are reduced across devices, read off the
compiled program, and what that does to their values.

XLA:CPU computes bfloat16 dots in float32 and, allowed excess precision (its
default), rounds only where a value leaves the program, which hides the
bfloat16 rounding a GPU or TPU does; these programs are compiled without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import capacity, hlo_stats
from clip_jax.models import lean_ops, weight_grads
from clip_jax.models.transformer import dense_matmul

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
