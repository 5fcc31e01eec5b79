"""The dtype in which matmul kernels' gradients leave their dot, and so the
dtype in which they are reduced across devices (config.model.grad_reduce_dtype).

Autodiff differentiates a bfloat16 matmul into bfloat16 matmuls, so each
device's share of a kernel gradient leaves its dot rounded to bfloat16. The
partitioner reduces a gradient over the batch-sharded devices where its dot
makes it, before the cast back to the float32 parameter, so data parallelism
and FSDP then all-reduce / reduce-scatter those gradients in bfloat16: half
the bytes, but a ring reduction rounds at every hop, more of them the more
devices there are. "float32" makes the kernel-gradient dot emit float32 (its
accumulator's precision: no extra arithmetic), so the reduction moves float32
and the global gradient is rounded to the compute dtype once, after it; twice
the gradient bytes on the wire. OpenCLIP under mixed precision and Megatron-LM
in bfloat16 reduce float32 gradients. "compute" (the default) keeps autodiff's
program; with float32 compute the two are the same.

The mode is read when a model is traced, like models/lean_ops.py's, and covers
the kernels that go through models.transformer.dense_matmul (every dense layer
of the towers, attention's projections and the ViT patch embedding) and the
token tables (models.transformer.embed_tokens, gathered in the compute dtype,
their gradients reduced in the mode's). ResNet's
convolutions keep their compute-dtype gradients: JAX's convolution transpose
takes no accumulation dtype without upcasting its inputs.
"""

import contextvars

import jax.numpy as jnp

from clip_jax.models import trace_modes

GRAD_REDUCE_DTYPES = ("compute", "float32")
_MODE = contextvars.ContextVar("clip_jax_grad_reduce_dtype", default="compute")


def grad_reduce_dtype(mode):
    """Models traced inside emit their kernel gradients per `mode`."""
    return trace_modes.active(_MODE, "grad_reduce_dtype", GRAD_REDUCE_DTYPES, mode)


def kernel_grad_dtype():
    """The preferred_element_type of a kernel-gradient dot under the active mode:
    float32, or None (its inputs' dtype)."""
    return jnp.float32 if _MODE.get() == "float32" else None
