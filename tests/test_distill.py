"""Distillation (config.distill): a frozen teacher's embeddings enter the step,
the loss adds OpenCLIP's distillation term, GradCache splits the student only."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from clip_jax import capacity, checkpoint, flops, image_ops, sharding, teacher
from clip_jax.config_checks import ConfigError, check_config
from clip_jax.models import CLIP
from clip_jax.train_step import setup_training
from clip_jax.variables import dummy_inputs
from tests.conftest import small_config
from tests.test_losses import numpy_clip_loss, numpy_distill_loss
from tests.test_train_step import random_batch


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher workdir: a wider small CLIP (embed_dim 24), random weights and
    its config.json, as a training run leaves them."""
    directory = str(tmp_path_factory.mktemp("teacher") / "run")
    config = small_config(**{"model.embed_dim": 24, "model.image.width": 48,
                             "model.text.width": 48, "model.text.context_length": 12})
    model = CLIP(config.model)
    variables = nn.unbox(model.init(jax.random.key(3), *dummy_inputs(config.model)))
    checkpoint.save_variables(directory, jax.device_get(variables))
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(config.to_json())
    return directory


def distilled(teacher_dir, **overrides):
    return small_config(**{"distill.teacher": teacher_dir, "batch_size": 32, **overrides})


def one_sgd_step(config, devices=None):
    training = setup_training(config, devices or jax.devices(), optax.sgd(1.0))
    state = training.init_state(jax.random.key(0))
    state, metrics = training.step(state, training.prepare(random_batch(config)))
    return training, jax.device_get(state.params), jax.device_get(metrics)


def test_the_loss_is_contrastive_plus_weight_times_openclip_distillation(teacher_dir):
    config = distilled(teacher_dir, **{"distill.weight": 0.5, "mesh.data": 8})
    training = setup_training(config, jax.devices(), optax.sgd(1.0))
    state = training.init_state(jax.random.key(0))
    batch = random_batch(config)
    prepared = training.prepare(batch)
    assert prepared["teacher_image"].shape == prepared["teacher_text"].shape == (32, 24)
    student_image, student_text, scale, _ = jax.device_get(CLIP(config.model).apply(
        state.variables(), image_ops.normalize(batch["images"]), batch["tokens"]))
    teacher_image, teacher_text = (np.asarray(prepared[k]) for k in ("teacher_image",
                                                                       "teacher_text"))
    np.testing.assert_allclose(np.linalg.norm(teacher_image, axis=1), 1, rtol=1e-5)
    _, metrics = training.step(state, prepared)
    contrastive = numpy_clip_loss(student_image, student_text, scale)
    distill = numpy_distill_loss(student_image, student_text, scale, teacher_image,
                                 teacher_text, training.teacher.logit_scale)
    np.testing.assert_allclose(metrics["contrastive_loss"], contrastive, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill_loss"], distill, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], contrastive + 0.5 * distill, rtol=1e-5)


@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=2, tensor=2)])
def test_gradcache_with_a_teacher_equals_one_microbatch(teacher_dir, mesh):
    """k=4 micro-batches: the loss, its parts and the update of k=1."""
    overrides = {f"mesh.{axis}": size for axis, size in mesh.items()}
    _, params_1, metrics_1 = one_sgd_step(distilled(teacher_dir, **overrides))
    _, params_4, metrics_4 = one_sgd_step(distilled(teacher_dir, microbatches=4, **overrides))
    for key in ("loss", "contrastive_loss", "distill_loss"):
        np.testing.assert_allclose(metrics_4[key], metrics_1[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=max(1e-5 * np.abs(b).max(), 1e-7)), params_4, params_1)


def test_weight_zero_trains_as_without_a_teacher(teacher_dir):
    _, with_teacher, metrics = one_sgd_step(distilled(teacher_dir, **{"distill.weight": 0.0}))
    _, without, plain = one_sgd_step(small_config(batch_size=32))
    assert metrics["distill_loss"] > 0
    np.testing.assert_allclose(metrics["loss"], plain["loss"], rtol=1e-6)
    # Another program: float32 sums in another order, as in test_train_step.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=max(1e-5 * np.abs(b).max(), 1e-7)), with_teacher, without)


def test_a_bfloat16_teacher_stores_and_computes_in_bfloat16(teacher_dir):
    config = distilled(teacher_dir, **{"distill.dtype": "bfloat16"})
    training = setup_training(config, jax.devices())
    floats = [x for x in jax.tree.leaves(training.teacher.variables)]
    assert floats and all(x.dtype == np.dtype("bfloat16") for x in floats)
    f32 = setup_training(distilled(teacher_dir), jax.devices()).teacher
    batch = random_batch(config)
    for key in ("teacher_image", "teacher_text"):
        np.testing.assert_allclose(training.prepare(batch)[key], f32.embed(batch)[key], atol=3e-2)


@pytest.mark.parametrize("overrides, message", [
    ({"distill.teacher": "/no/such/run"}, "config.distill.teacher='/no/such/run' is neither a "
                                          "training workdir nor ARCHITECTURE:WEIGHTS"),
    ({"distill.teacher": "ViT-B-32:/no/such.pt"}, "config.distill.teacher='ViT-B-32:/no/such.pt'"
                                                  ": /no/such.pt does not exist"),
    ({"model.text.context_length": 16}, "captions of 16 tokens exceed its context length 12"),
])
def test_an_unusable_teacher_is_one_line(teacher_dir, overrides, message):
    config = distilled(teacher_dir, **overrides)
    with pytest.raises(ValueError) as error:
        teacher.load(config, setup_training(small_config(), jax.devices()[:1]).mesh)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "caption_lm"}, "distillation adds to the contrastive loss; "
                                  "config.objective='caption_lm'"),
    ({"distill.dtype": "float16"}, "config.distill.dtype='float16' is unknown"),
    ({"distill.weight": -1.0}, "config.distill.weight=-1.0 must be >= 0"),
])
def test_bad_distill_settings_are_one_line(teacher_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(distilled(teacher_dir, **overrides), num_devices=8)


def test_a_teacher_config_is_what_the_workdir_says(teacher_dir):
    config, weights = teacher.teacher_source(teacher_dir)
    with open(os.path.join(teacher_dir, "config.json")) as f:
        assert config.model.embed_dim == json.load(f)["model"]["embed_dim"] == 24
    assert weights == teacher_dir


def test_the_teachers_flops_and_bytes_are_in_the_plan_and_match_xla(teacher_dir):
    """The planner counts the teacher's forward (XLA's count of its program
    within 10%) and its resident parameters."""
    config = distilled(teacher_dir, **{"mesh.data": 8})
    plan = capacity.plan(config, jax.devices()[:8])
    training = setup_training(config, jax.devices()[:8])
    student = flops.train_step_flops(config.model, config.batch_size)["train_step"]
    expected_teacher = flops.teacher_flops(training.teacher.model.config, config.batch_size,
                                           config.model.image.image_size,
                                           config.model.text.context_length)
    assert plan["model_flops_per_device"] * 8 == pytest.approx(student + expected_teacher)
    batch = jax.device_put(random_batch(config), sharding.batch_sharding(training.mesh))
    xla = capacity.compiled_flops(training.teacher._embed.lower(
        training.teacher.variables, batch["images"], batch["tokens"]).compile()) * 8
    assert abs(expected_teacher / xla - 1) < 0.10, (expected_teacher, xla)
    teacher_params = sum(x.size * 4 for x in jax.tree.leaves(training.teacher.variables))
    assert plan["teacher_bytes"] == teacher_params  # replicated under data parallelism
