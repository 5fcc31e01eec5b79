"""LayerNorm and exact GELU with hand-written backward passes that keep one
array for the backward pass where autodiff keeps several.

Autodiff saves every intermediate its derivative rules touch: four arrays of
the input's size for a LayerNorm (x - mean, its square, the normalised x, the
output) and three of the MLP's hidden size for the erf GELU. In a scanned
tower each saved array is a stack the forward loop writes layer by layer, so
their size is memory traffic every step. Here the LayerNorm keeps its input
(in its own dtype: bfloat16 under bfloat16 compute) with its mean and 1/std,
the GELU its input; the backward recomputes the rest (elementwise). Values
are autodiff's up to float rounding (tests/test_model.py).

By default they apply on CPU only, where they were measured (ViT-B/32 train
step 7% faster, 16% less memory on XLA:CPU). GPU and TPU compilers fuse and
rematerialise elementwise work themselves, and a custom VJP can stand in the
way of that; until measured there, `layer_norm` and `gelu` are autodiff's
elsewhere (the backend is read when the model is traced). `lean_backward("on")`
/ `("off")` around a trace forces them (and the flattened kernel gradient of
models.transformer.dense_matmul, and models/lean_attention.py) on or off on any
platform, so a device check can measure both (config.model.lean_backward).
"""

import contextvars
import functools
import math

import jax
import jax.numpy as jnp

from clip_jax.models import trace_modes

# config.model.lean_backward: "auto" (CPU only), "on" or "off" on every platform.
LEAN_BACKWARD_MODES = ("auto", "on", "off")
_MODE = contextvars.ContextVar("clip_jax_lean_backward", default="auto")


def lean_backward(mode):
    """Models traced inside use the hand-written backward passes per `mode`."""
    return trace_modes.active(_MODE, "lean_backward", LEAN_BACKWARD_MODES, mode)


def forced_backward():
    """True / False when the active mode forces the lean backward passes on or
    off, None for "auto" (each op decides by platform)."""
    mode = _MODE.get()
    return None if mode == "auto" else mode == "on"


def _moments(x, epsilon):
    """float32 mean and 1 / std over the last axis, each [..., 1]."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    inverse_std = jax.lax.rsqrt(jnp.square(x32 - mean).mean(axis=-1, keepdims=True) + epsilon)
    return mean, inverse_std


def _normalised(x, mean, inverse_std):
    """float32 (x - mean) / std, from _moments."""
    return (x.astype(jnp.float32) - mean) * inverse_std


def _normalise(x, epsilon):
    """float32 (x - mean) / std over the last axis."""
    return _normalised(x, *_moments(x, epsilon))


def hand_written_backward():
    """Whether the lean backward passes apply: as forced, else on the CPU backend only."""
    forced = forced_backward()
    return jax.default_backend() == "cpu" if forced is None else forced


def layer_norm(x, scale, bias, epsilon):
    """LayerNorm over the last axis, computed in float32, returned in x's dtype;
    the lean backward pass on CPU, autodiff's elsewhere."""
    if hand_written_backward():
        return lean_layer_norm(x, scale, bias, epsilon)
    return (_normalise(x, epsilon) * scale + bias).astype(x.dtype)


def gelu(x):
    """The exact (erf) GELU, x * Phi(x); the lean backward pass on CPU."""
    return lean_gelu(x) if hand_written_backward() else erf_gelu(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lean_layer_norm(x, scale, bias, epsilon):
    """layer_norm with the hand-written backward pass (on any backend)."""
    return (_normalise(x, epsilon) * scale + bias).astype(x.dtype)


def _layer_norm_fwd(x, scale, bias, epsilon):
    # The backward pass recomputes the normalised input from x (kept in its own
    # dtype, and often kept anyway: a block's input is the residual stream)
    # rather than keeping it in float32: under bfloat16 compute a third of the
    # bytes saved, written and read back.
    mean, inverse_std = _moments(x, epsilon)
    output = (_normalised(x, mean, inverse_std) * scale + bias).astype(x.dtype)
    return output, (x, mean, inverse_std, scale)


def _layer_norm_grads(x, mean, inverse_std, scale, grad):
    """(x, scale, bias) gradients of the LayerNorm from its kept input and
    statistics; the parameters' summed over every leading axis."""
    normalised = _normalised(x, mean, inverse_std)
    grad32 = grad.astype(jnp.float32)  # grad has the output's dtype, x's
    leading = tuple(range(grad.ndim - 1))
    scaled = grad32 * scale
    x_grad = inverse_std * (scaled - scaled.mean(axis=-1, keepdims=True)
                            - normalised * (scaled * normalised).mean(axis=-1, keepdims=True))
    return (x_grad.astype(grad.dtype), (grad32 * normalised).sum(axis=leading).astype(scale.dtype),
            grad32.sum(axis=leading).astype(scale.dtype))


def _layer_norm_grads_on_rows(x, mean, inverse_std, scale, grad):
    """_layer_norm_grads on [M, D] views, so the parameters' gradients sum over
    one axis. Summed over [B, T] of a [B, T, D] array, XLA's GPU layout
    assignment laid the residual stream out batch-minor and transposed every
    LayerNorm's gradient into float32 partial products (ViT-B/16 at 128 on an
    H100, unrolled: 31.6 -> 28.6 ms by the roofline, docs/capacity.md)."""
    width = x.shape[-1]
    x_grad, scale_grad, bias_grad = _layer_norm_grads(
        x.reshape(-1, width), mean.reshape(-1, 1), inverse_std.reshape(-1, 1), scale,
        grad.reshape(-1, width))
    return x_grad.reshape(x.shape), scale_grad, bias_grad


def _layer_norm_bwd(epsilon, residuals, grad):
    del epsilon
    # XLA:CPU has no such layout problem, and there the rows' sums would run in
    # another order than the [B, T] sums every CPU-trained figure in the docs
    # was measured with (same speed either way).
    return jax.lax.platform_dependent(*residuals, grad, cpu=_layer_norm_grads,
                                      default=_layer_norm_grads_on_rows)


lean_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _normal_cdf(x):
    """Phi(x) as (1 + erf(x / sqrt 2)) / 2, as PyTorch's GELU computes it.

    jax.nn.gelu writes it with erfc, which XLA:CPU expands into four fusions over
    the MLP's hidden activations: 5.3 ms against erf's 1.1 ms forward, 6.2 against
    2.5 ms backward, on [16, 99, 3072] float32 (2-core VM). The two differ by at
    most 1e-6 absolute over [-12, 12]: erf's form loses only the relative
    precision of Phi's far left tail, where GELU and its derivative are ~0."""
    return 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def erf_gelu(x):
    """The exact GELU, x * Phi(x), in x's dtype (as jax.nn.gelu computes it), with
    autodiff's backward pass; jax.nn.gelu(approximate=False)'s values within 1e-6.

    Not jax.nn.gelu itself: its erfc form costs accelerators more. The TPU
    compiler fuses the GELU into the MLP's first matmul and its derivative into
    the gradient's matmul; by its estimate (libtpu 0.0.42.1, v5e) a ViT-B/16
    MLP's forward and backward over 32 x 197 tokens take 14% longer with erfc
    than with no activation, and with erf no longer. XLA's GPU compiler keeps
    fewer of erf's intermediates for the backward pass. In float32 under
    bfloat16 compute, what autodiff keeps would be float32, a float32 stack in a
    scanned tower. docs/capacity.md has the train steps."""
    return x * _normal_cdf(x)


@jax.custom_vjp
def lean_gelu(x):
    """erf_gelu computed in float32, with the hand-written backward pass (on any
    backend), which keeps only x."""
    return erf_gelu(x.astype(jnp.float32)).astype(x.dtype)


def _gelu_fwd(x):
    return lean_gelu(x), x


def _gelu_bwd(x, grad):
    x32 = x.astype(jnp.float32)
    pdf = jnp.exp(-0.5 * jnp.square(x32)) / math.sqrt(2.0 * math.pi)
    return ((grad.astype(jnp.float32) * (_normal_cdf(x32) + x32 * pdf)).astype(x.dtype),)


lean_gelu.defvjp(_gelu_fwd, _gelu_bwd)
