"""The CLIP towers: logical names, causality, pooling, temperature, locking.

Reference sizes and numerics are checked against PyTorch in test_interchange.py."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import CLIP
from clip_jax.variables import dummy_inputs
from tests.conftest import small_config


@pytest.fixture(scope="module")
def model_and_params():
    config = small_config()
    model = CLIP(config.model)
    variables = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(config.model)))
    return config, model, variables


def test_every_parameter_has_logical_axis_names():
    config = small_config()
    model = CLIP(config.model)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config.model)))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)


def test_text_is_pooled_at_end_token_and_causal(model_and_params):
    config, model, variables = model_and_params
    def encode(tokens):
        return model.apply(variables, jnp.asarray(tokens), method=model.encode_text)
    tokens = np.zeros((1, config.model.text.context_length), np.int32)
    tokens[0, :4] = [49406, 320, 1125, 49407]
    after_end = tokens.copy()
    after_end[0, 5:] = 999  # content after the end token must not matter (causal mask)
    before_end = tokens.copy()
    before_end[0, 2] = 2368
    np.testing.assert_allclose(encode(after_end), encode(tokens), rtol=1e-6)
    assert not np.allclose(encode(before_end), encode(tokens), rtol=1e-3)


def test_outputs_are_unit_vectors_and_temperature_is_clipped(model_and_params):
    config, model, variables = model_and_params
    images, tokens = dummy_inputs(config.model)
    tokens = tokens.at[:, 0].set(49407)
    image, text, scale, bias = model.apply(variables, images + 0.5, tokens)
    assert bias is None  # no bias parameter unless logit_bias_init is set
    np.testing.assert_allclose(jnp.linalg.norm(image, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(text, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)  # paper's init
    hot = {"params": dict(variables["params"], logit_scale=jnp.float32(10.0))}
    assert float(model.apply(hot, images, tokens)[2]) == pytest.approx(100.0)


def test_images_smaller_than_a_patch_are_a_clear_error(model_and_params):
    config, model, variables = model_and_params
    with pytest.raises(ValueError, match="no whole 8 x 8 patch"):
        model.apply(variables, jnp.zeros((1, 4, 32, 3)), method=model.encode_image)



@pytest.mark.parametrize("image_size", [32, 36])  # 36: VALID drops the partial patches
def test_patch_embedding_is_clips_strided_convolution(image_size):
    """The matmul patch embedding equals CLIP's bias-free stride-P convolution with
    the same [P, P, C, D] kernel, tokens in row-major grid order, and has its init."""
    from clip_jax.models.vit import PatchEmbedding  # noqa: PLC0415

    images = jax.random.normal(jax.random.key(1), (2, image_size, image_size, 3))
    embedding = PatchEmbedding(patch_size=8, width=16)
    variables = nn.unbox(embedding.init(jax.random.key(0), images))
    conv = nn.Conv(16, (8, 8), strides=(8, 8), padding="VALID", use_bias=False)
    expected = conv.apply(variables, images).reshape(2, -1, 16)
    np.testing.assert_allclose(embedding.apply(variables, images), expected, rtol=1e-5, atol=1e-5)
    conv_init = nn.unbox(conv.init(jax.random.key(0), images))["params"]["kernel"]
    np.testing.assert_array_equal(variables["params"]["kernel"], conv_init)


def _reference_layer_norm(x, scale, bias, epsilon=1e-5):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    variance = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(variance + epsilon) * scale + bias).astype(x.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lean_layer_norm_and_gelu_equal_autodiff(dtype):
    """The hand-written backward passes of models/lean_ops.py give autodiff's
    values and gradients (w.r.t. the input, scale and bias) for a [B, T, D] input,
    in float32 and in bfloat16 (float32 parameters, as the towers hold them); the
    erf GELU the accelerators differentiate is jax.nn.gelu's exact one."""
    from clip_jax.models import lean_ops  # noqa: PLC0415

    x = 3 * jax.random.normal(jax.random.key(0), (3, 5, 16), dtype) + 0.5
    scale = jax.random.normal(jax.random.key(1), (16,))
    bias = jax.random.normal(jax.random.key(2), (16,))
    weights = jax.random.normal(jax.random.key(3), (3, 5, 16), dtype)
    tolerance = 2e-5 if dtype == jnp.float32 else 3e-2
    _assert_equal_values_and_gradients(lambda *a: lean_ops.lean_layer_norm(*a, 1e-5),
                                       _reference_layer_norm, (x, scale, bias), weights, tolerance)
    exact_gelu = functools.partial(jax.nn.gelu, approximate=False)
    for gelu in (lean_ops.lean_gelu, lean_ops.erf_gelu):
        _assert_equal_values_and_gradients(gelu, exact_gelu, (x,), weights, tolerance)


def test_lean_layer_norm_keeps_its_input_in_its_own_dtype_for_the_backward_pass():
    """Under bfloat16 the lean LayerNorm's residuals are its bfloat16 input and
    per-row float32 statistics: no float32 array of the input's size (autodiff's
    keeps several), which in a scanned tower is a float32 stack per LayerNorm."""
    from clip_jax.models import lean_ops  # noqa: PLC0415

    x = jax.random.normal(jax.random.key(0), (3, 5, 16), jnp.bfloat16)
    _, backward = jax.vjp(lambda *a: lean_ops.lean_layer_norm(*a, 1e-5), x, jnp.ones(16),
                          jnp.zeros(16))
    kept = sorted((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(backward))
    assert kept == [((3, 5, 1), "float32"), ((3, 5, 1), "float32"),
                    ((3, 5, 16), "bfloat16"), ((16,), "float32")]


def test_lean_layer_norm_backward_sums_over_batch_and_tokens_on_cpu_and_rows_elsewhere():
    """On CPU the parameters' gradients are summed over [B, T] as they always
    were (CPU-trained figures reproduce bitwise); the rows form other backends
    take ([M, D] views, one summed axis) gives the same values up to rounding."""
    from clip_jax.models import lean_ops  # noqa: PLC0415

    x = jax.random.normal(jax.random.key(0), (32, 50, 64), jnp.float32)
    scale = 1 + 0.1 * jax.random.normal(jax.random.key(1), (64,))
    grad = jax.random.normal(jax.random.key(2), (32, 50, 64), jnp.float32)
    _, residuals = lean_ops._layer_norm_fwd(x, scale, jnp.zeros(64), 1e-5)
    on_cpu = jax.jit(lambda r, g: lean_ops._layer_norm_bwd(1e-5, r, g))(residuals, grad)
    summed_over_batch_and_tokens = jax.jit(lean_ops._layer_norm_grads)(*residuals, grad)
    on_rows = jax.jit(lean_ops._layer_norm_grads_on_rows)(*residuals, grad)
    for mine, expected, rows in zip(on_cpu, summed_over_batch_and_tokens, on_rows):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(expected))
        assert rows.shape == mine.shape
        np.testing.assert_allclose(np.asarray(rows), np.asarray(mine), rtol=1e-5, atol=1e-5)


def test_text_positions_have_autodiffs_gradients_on_cpu_and_a_matmuls_on_gpus():
    """add_positions' gradients are autodiff's on CPU, bitwise and in their dtypes
    (bfloat16 tokens, float32 positions); the matmul by ones GPUs take gives
    the positions' gradient to float32 rounding."""
    from clip_jax.models import text  # noqa: PLC0415

    embedded = jax.random.normal(jax.random.key(0), (8, 77, 64), jnp.bfloat16)
    positions = jax.random.normal(jax.random.key(1), (77, 64), jnp.float32)
    weights = jax.random.normal(jax.random.key(2), (8, 77, 64), jnp.float32)

    def loss(add):
        return lambda e, p: (add(e, p) * weights).sum()

    mine = jax.jit(jax.grad(loss(text.add_positions), (0, 1)))(embedded, positions)
    autodiff = jax.jit(jax.grad(loss(jnp.add), (0, 1)))(embedded, positions)
    for ours, expected in zip(mine, autodiff):
        assert ours.dtype == expected.dtype and ours.shape == expected.shape
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    by_matmul = jax.jit(text._positions_grad_by_matmul)(weights)
    np.testing.assert_allclose(np.asarray(by_matmul), np.asarray(mine[1]), rtol=1e-5, atol=1e-5)


def _assert_equal_values_and_gradients(ours, reference, args, weights, tolerance):
    """ours(*args) equals reference(*args), and so do the gradients of their
    `weights`-weighted sums w.r.t. every arg, in dtype and shape too."""
    def weighted(fn):
        return lambda *a: (fn(*a) * weights).astype(jnp.float32).sum()
    np.testing.assert_allclose(np.asarray(ours(*args), np.float32),
                               np.asarray(reference(*args), np.float32),
                               rtol=tolerance, atol=tolerance)
    argnums = tuple(range(len(args)))
    for mine, expected in zip(jax.grad(weighted(ours), argnums)(*args),
                              jax.grad(weighted(reference), argnums)(*args)):
        assert mine.dtype == expected.dtype and mine.shape == expected.shape
        np.testing.assert_allclose(np.asarray(mine, np.float32),
                                   np.asarray(expected, np.float32),
                                   rtol=tolerance, atol=tolerance * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("queries, keys, causal, key_mask", [
    (50, 50, False, False),  # a ViT-B/32 image tower
    (13, 13, True, False),   # a text tower
    (13, 13, True, True),    # with padding; example 0's first query sees no key
    (1, 9, False, True),     # a pooled query
    (6, 11, False, True),    # cross-attention (CoCa's decoder)
])
def test_lean_attention_equals_xla_attention(queries, keys, causal, key_mask, dtype):
    """models/lean_attention.py's backward pass gives the values and gradients
    (query, key, value) of jax.nn.dot_product_attention's XLA computation, with
    causal and key masks, and where a query's every key is masked."""
    from clip_jax.models import lean_attention, lean_ops  # noqa: PLC0415

    rngs = jax.random.split(jax.random.key(0), 5)
    query = jax.random.normal(rngs[0], (2, queries, 3, 16), dtype)
    key, value = (jax.random.normal(r, (2, keys, 3, 16), dtype) for r in rngs[1:3])
    weights = jax.random.normal(rngs[3], (2, queries, 3, 16), dtype)
    mask = None
    if key_mask:
        mask = (jax.random.uniform(rngs[4], (2, 1, 1, keys)) > 0.3).at[0, ..., 0].set(False)

    def reference(*args):
        return jax.nn.dot_product_attention(*args, mask=mask, is_causal=causal)

    def ours(*args):
        with lean_ops.lean_backward("on"):
            return lean_attention.attention(*args, mask=mask, is_causal=causal)

    tolerance = 2e-5 if dtype == jnp.float32 else 3e-2
    _assert_equal_values_and_gradients(ours, reference, (query, key, value), weights, tolerance)


@pytest.mark.parametrize("backend, lean", [("cpu", True), ("gpu", False), ("tpu", False)])
def test_lean_backward_passes_apply_on_cpu_only(backend, lean, monkeypatch):
    """Measured on XLA:CPU only: other backends trace autodiff's LayerNorm, GELU
    and attention."""
    from clip_jax.models import lean_attention, lean_ops  # noqa: PLC0415
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    x = jnp.ones((2, 4, 2, 8))
    # Fresh functions: jax caches traces by function.
    for fn in (lambda v: lean_ops.layer_norm(v, jnp.ones(8), jnp.zeros(8), 1e-5),
               lambda v: lean_ops.gelu(v),
               lambda v: lean_attention.attention(v, v, v, is_causal=True)):
        assert ("custom_vjp_call" in str(jax.make_jaxpr(fn)(x))) == lean


@pytest.mark.parametrize("mode, backend, lean", [("on", "gpu", True), ("off", "cpu", False),
                                                ("auto", "tpu", False)])
def test_lean_backward_mode_forces_the_hand_written_passes_on_any_platform(
        mode, backend, lean, monkeypatch):
    """config.model.lean_backward: "on"/"off" override the platform, for the
    LayerNorm, the GELU, the attention and the kernel gradient's flattened form."""
    from clip_jax.models import lean_attention, lean_ops, transformer  # noqa: PLC0415
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    x = jnp.ones((2, 3, 8))
    kernel = jnp.ones((8, 4))
    with lean_ops.lean_backward(mode):
        for fn in (lambda v: lean_ops.layer_norm(v, jnp.ones(8), jnp.zeros(8), 1e-5),
                   lambda v: lean_ops.gelu(v),
                   lambda v: lean_attention.attention(v[..., None, :], v[..., None, :],
                                                      v[..., None, :])):
            assert ("custom_vjp_call" in str(jax.make_jaxpr(fn)(x))) == lean
        backward = str(jax.make_jaxpr(jax.grad(
            lambda k: transformer.dense_matmul(x, k).sum()))(kernel))
    # Forced: one form, traced as such; auto: both, chosen by platform at run time.
    assert ("platform_index" in backward) == (mode == "auto")
    with pytest.raises(ValueError, match="lean_backward='sometimes' is unknown"):
        with lean_ops.lean_backward("sometimes"):
            pass


@pytest.mark.parametrize("backend, dtype, chosen", [
    ("cpu", "bfloat16", "xla"), ("tpu", "bfloat16", "xla"), ("gpu", "float32", "xla"),
    ("gpu", "bfloat16", "cudnn"), ("gpu", "float16", "cudnn")])
def test_auto_attention_takes_cudnn_only_where_it_applies(backend, dtype, chosen, monkeypatch):
    from clip_jax.models import transformer  # noqa: PLC0415
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert transformer.attention_implementation("auto", dtype) == chosen
    assert transformer.attention_implementation("xla", dtype) == "xla"


def test_the_attention_setting_reaches_every_tower(monkeypatch):
    """config.model.attention is what each tower's attention is traced with."""
    from clip_jax.models import transformer  # noqa: PLC0415
    seen = []
    original = transformer.attention_implementation
    monkeypatch.setattr(transformer, "attention_implementation",
                        lambda name, dtype: seen.append(name) or original(name, dtype))
    config = small_config(**{"model.attention": "auto"})
    model = CLIP(config.model)
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32))
    # Each tower's check for cuDNN's padding, and every block but each tower's
    # pooled last one: 1 image + 1 text here.
    assert seen == ["auto"] * 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_matmul_gradients_are_autodiffs(dtype):
    """The hand-written VJP gives autodiff's gradients for a [B, T, K] input, in
    float32 and bfloat16; both kernel-gradient forms (CPU's flattened one, the
    other platforms' plain one) equal autodiff's."""
    from clip_jax.models import transformer  # noqa: PLC0415

    x = jax.random.normal(jax.random.key(0), (3, 5, 8), dtype)
    kernel = jax.random.normal(jax.random.key(1), (8, 4), dtype)
    weights = jax.random.normal(jax.random.key(2), (3, 5, 4), dtype)

    def loss(matmul):
        return jax.grad(lambda x, k: (matmul(x, k) * weights).sum().astype(jnp.float32),
                        argnums=(0, 1))(x, kernel)

    tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
    reference = loss(jnp.matmul)
    for ours, expected in zip(loss(transformer.dense_matmul), reference):
        assert ours.dtype == expected.dtype and ours.shape == expected.shape
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(expected, np.float32),
                                   rtol=tolerance, atol=tolerance)
    for form in (transformer.kernel_grad_flattened, transformer.kernel_grad_plain):
        np.testing.assert_allclose(np.asarray(form(x, weights), np.float32),
                                   np.asarray(reference[1], np.float32),
                                   rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("causal", [False, True])
def test_pooled_last_block_gives_the_full_stacks_outputs_at_the_pooled_tokens(causal):
    """The towers run their last block for the pooled token only: the same
    values as the full stack's output at those positions, unscanned and scanned."""
    from clip_jax.models.transformer import Transformer, stack_layers  # noqa: PLC0415

    x = jax.random.normal(jax.random.key(0), (3, 6, 16))
    positions = jnp.array([0, 3, 5])
    plain = Transformer(3, 2, causal, "gelu")
    params = nn.unbox(plain.init(jax.random.key(1), x))["params"]
    full = plain.apply({"params": params}, x)
    expected = full[jnp.arange(3), positions]
    np.testing.assert_allclose(plain.apply({"params": params}, x, positions), expected,
                               rtol=1e-5, atol=1e-6)
    scanned = Transformer(3, 2, causal, "gelu", scan_layers=True)
    stacked = {"params": stack_layers(params)}
    np.testing.assert_allclose(scanned.apply(stacked, x), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scanned.apply(stacked, x, positions), expected,
                               rtol=1e-5, atol=1e-6)
