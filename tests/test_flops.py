"""The analytic FLOP count (clip_jax/flops.py) against XLA's cost analysis of
the compiled computations, on one device.

XLA counts every operation, the analytic count only matrix products, so the
shapes are chosen for the products to dominate: widths of 64, and OpenAI's
quick_gelu, since XLA expands the exact GELU's erf into a polynomial of ~30
FLOPs per element (+17% on these shapes, 3.5% with quick_gelu). A small
vocabulary keeps the AdamW update of the token embedding (~20 FLOPs per
parameter, not model FLOPs) out of the way.
"""

import jax
import jax.numpy as jnp
import pytest

from clip_jax import capacity, flops, phases
from clip_jax import overrides as config_overrides
from clip_jax.models.clip import CLIP
from configs.clip import get_config
from tests.conftest import small_config

BATCH = 32


def vit_config():
    """A ViT CLIP where matrix products dominate: 32 px images in 8 px patches
    (17 tokens), text of 16 tokens, widths 64 in 2 heads, 2 layers per tower."""
    return small_config(**{
        "batch_size": BATCH, "mesh.data": 1, "model.activation": "quick_gelu",
        "model.image.image_size": 32, "model.image.width": 64, "model.image.heads": 2,
        "model.text.context_length": 16, "model.text.width": 64, "model.text.vocab_size": 128,
        "model.embed_dim": 64})


def resnet_config():
    # Two stages on 64 px: the feature maps stay >= 8 x 8, where zero padding is a
    # small part of the 3x3 windows. XLA counts only the taps that land inside the
    # image; the analytic count, as usual, counts every tap.
    return small_config(**{"model.image": dict(kind="resnet", image_size=64,
                                               stage_layers=(1, 1), width=32, heads=2)})


def forward_xla_flops(model_config, method, inputs, **kwargs):
    """XLA's FLOPs of `CLIP.<method>(inputs)` with abstract parameters."""
    model = CLIP(model_config)
    size, length = model_config.image.image_size, model_config.text.context_length
    variables = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)))
    compiled = jax.jit(lambda v, x: model.apply(v, x, method=method, **kwargs)).lower(
        variables, inputs).compile()
    return capacity.compiled_flops(compiled)


def assert_within(analytic, xla, tolerance=0.10):
    assert abs(analytic / xla - 1) < tolerance, f"analytic {analytic:.4g} vs XLA {xla:.4g}"


@pytest.mark.parametrize("overrides", [
    {}, {"model.image.patch_dropout": 0.75},
    {"phases": "100%: image_size=16, context_length=8"}], ids=["full", "dropout", "phase"])
def test_vit_clip_train_step_flops_match_xla(overrides):
    """3x the forward products (backward = 2x forward) against the whole compiled
    step, which also holds LayerNorms, softmaxes, the loss and AdamW
    (measured: XLA 5.5% above the analytic count); with patch dropout the kept
    patches only, in a phase at its own sizes."""
    config = vit_config()
    with config.unlocked():
        config_overrides.apply(config, overrides)
    step, state, batch, _ = capacity.abstract_train_step(config, jax.devices()[:1])
    xla = capacity.compiled_flops(step.lower(state, batch).compile())
    analytic = flops.train_step_flops(phases.first_phase_model(config), BATCH)["train_step"]
    assert_within(analytic, xla)
    if overrides:
        assert analytic < 0.8 * flops.train_step_flops(vit_config().model, BATCH)["train_step"]


@pytest.mark.parametrize("objective, text_encoder", [
    ("contrastive", "bag_of_words"), ("bow_predict", "transformer"),
    ("caption_lm", "transformer")])
def test_other_objectives_train_step_flops_match_xla(objective, text_encoder):
    """The objective study's models (bag-of-words text tower, bag-of-words
    prediction head, caption decoder) against their whole compiled steps."""
    config = vit_config()
    with config.unlocked():
        config.objective, config.model.text_encoder = objective, text_encoder
    step, state, batch, _ = capacity.abstract_train_step(config, jax.devices()[:1])
    xla = capacity.compiled_flops(step.lower(state, batch).compile())
    counts = flops.train_step_flops(config.model, BATCH, objective=objective)
    assert_within(counts["train_step"], xla)
    clip = flops.train_step_flops(vit_config().model, BATCH)  # contrastive, Transformer text
    assert counts["image"] == clip["image"]  # the same image tower
    assert counts["train_step"] != clip["train_step"]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_vit_clip_tower_forward_flops_match_xla(tower):
    """Each tower's forward alone (measured: XLA 3.5-3.7% above)."""
    model_config = vit_config().model
    size, length = model_config.image.image_size, model_config.text.context_length
    inputs = (jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32) if tower == "image"
              else jax.ShapeDtypeStruct((BATCH, length), jnp.int32))
    xla = forward_xla_flops(model_config, f"encode_{tower}", inputs)
    assert_within(flops.train_step_flops(model_config, BATCH)[tower], xla)


def test_resnet_image_forward_flops_match_xla():
    """The ResNet tower's forward (measured: XLA 2% below: padding taps)."""
    model_config = resnet_config().model
    size = model_config.image.image_size
    xla = forward_xla_flops(model_config, "encode_image",
                            jax.ShapeDtypeStruct((8, size, size, 3), jnp.float32))
    assert_within(flops.train_step_flops(model_config, 8)["image"], xla)


# Per-example forward GFLOPs (image, text) of OpenCLIP's docs/model_profile.csv
# (fvcore counts of the PyTorch models, v3.x).
OPEN_CLIP_PROFILE = {
    "ViT-B-32": (8.82, 5.96), "ViT-B-16": (35.13, 5.96), "ViT-L-14": (162.03, 13.3),
    "ViT-L-14-336": (381.92, 13.3), "ViT-H-14": (334.59, 47.09), "ViT-g-14": (534.06, 47.09),
    "ViT-bigG-14": (967.5, 97.86),
}


@pytest.mark.parametrize("variant", sorted(OPEN_CLIP_PROFILE))
def test_vit_presets_match_open_clip_published_flops(variant):
    """The full-size presets against an independent count, to its two decimals."""
    counts = flops.train_step_flops(get_config(variant).model, 1, full_last_block=True)
    image, text = OPEN_CLIP_PROFILE[variant]
    assert counts["image"] / 1e9 == pytest.approx(image, abs=0.006)
    assert counts["text"] / 1e9 == pytest.approx(text, abs=0.006)


def test_a_locked_tower_counts_its_forward_once():
    model_config = vit_config().model
    free = flops.train_step_flops(model_config, BATCH)
    locked = flops.train_step_flops(model_config, BATCH, locked=("image",))
    assert free["train_step"] - locked["train_step"] == 2 * free["image"]
    assert free["train_step"] == 3 * free["forward"]


@pytest.mark.parametrize("device_kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H200", 989e12), ("cpu", None)])
def test_mfu_peak_is_found_from_the_device_kind(device_kind, peak):
    assert flops.peak_flops_per_device(device_kind) == peak
