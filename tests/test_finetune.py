"""Fine-tuning: locked towers, and weights loaded from converted checkpoints."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from clip_jax import checkpoint, convert
from clip_jax.models import CLIP
from clip_jax.models.named import create_model
from clip_jax.train import _initialise_from
from clip_jax.train_step import setup_training
from tests.conftest import small_config
from tests.test_train_step import random_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resnet_config():
    config = small_config(**{"mesh.data": 8, "optimizer.warmup_steps": 0})
    with config.unlocked():
        config.model.image = dict(kind="resnet", image_size=32, stage_layers=(1, 1, 1, 1), width=8,
                                  heads=4)
    return config


def one_step(config, locked):
    with config.unlocked():
        for tower in locked:
            config[f"lock_{tower}"] = True
    training = setup_training(config)
    state = training.init_state(jax.random.key(0))
    before = jax.device_get(state)
    after, _ = training.step(state, random_batch(config))
    return before, jax.device_get(after)


def changed(a, b):
    return jax.tree.leaves(jax.tree.map(lambda x, y: bool((x != y).any()), a, b))


@pytest.mark.parametrize("locked", [("image",), ("text",)])
def test_locked_tower_gets_no_update_and_keeps_running_stats(locked):
    config = resnet_config()
    before, after = one_step(config, locked)
    frozen, trained = ("visual", "text") if locked == ("image",) else ("text", "visual")
    assert not any(changed(before.params[frozen], after.params[frozen]))
    assert all(changed(before.params[trained], after.params[trained]))
    # An unlocked ResNet tower updates its running statistics; a locked one must not.
    stats_moved = changed(before.model_state, after.model_state)
    assert (not any(stats_moved)) if locked == ("image",) else all(stats_moved)
    # No Adam moments are kept for the frozen tower.
    moments = [x for x in jax.tree.leaves(after.opt_state) if np.ndim(x) > 0]
    trained_size = sum(np.size(x) for x in jax.tree.leaves(after.params[trained]))
    assert sum(np.size(x) for x in moments) < 2 * trained_size + 64


def test_converted_weights_initialise_training(tmp_path):
    config = small_config(**{"mesh.data": 8})
    training = setup_training(config)
    pretrained = jax.device_get(nn.unbox(training.model.init(jax.random.key(7), *(
        np.zeros((1, 16, 16, 3), np.float32), np.zeros((1, 8), np.int32)))))
    checkpoint.save_variables(str(tmp_path / "converted"), pretrained)
    state = _initialise_from(str(tmp_path / "converted"), training.init_state(jax.random.key(0)),
                             training.abstract_state, training.shardings)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), pretrained["params"])
    assert state.params["visual"]["proj"].sharding == training.shardings.params["visual"]["proj"]


def test_wrong_architecture_in_init_from_is_one_line(tmp_path):
    config = small_config()
    other = small_config(**{"model.embed_dim": 8})
    checkpoint.save_variables(str(tmp_path / "other"), jax.device_get(nn.unbox(
        CLIP(other.model).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32),
                               np.zeros((1, 8), np.int32)))))
    with pytest.raises(ValueError, match=r"params/text/text_projection has shape \(32, 8\), "
                                         r"the model expects \(32, 16\)"):
        checkpoint.load_variables(str(tmp_path / "other"), convert.abstract_variables(config.model))


@pytest.mark.slow
def test_cli_converts_both_ways(tmp_path):
    """Full-size RN50: PyTorch .safetensors -> orbax -> .safetensors, unchanged."""
    from safetensors.numpy import load_file, save_file
    model = create_model("RN50")
    shapes = convert.abstract_variables(model.config)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    state_dict = convert.to_torch(variables, "RN50")
    save_file(state_dict, str(tmp_path / "rn50.safetensors"))
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "clip_jax.convert", "--model", "RN50", *args], cwd=REPO,
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    converted = run("--input", str(tmp_path / "rn50.safetensors"), "--output", str(tmp_path / "orbax"))
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert "102,007,137 parameters" in converted.stdout
    back = run("--input", str(tmp_path / "orbax"), "--output", str(tmp_path / "back.safetensors"),
               "--to-torch")
    assert back.returncode == 0, back.stderr[-2000:]
    round_trip = load_file(str(tmp_path / "back.safetensors"))
    assert set(round_trip) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(round_trip[key], value, err_msg=key)
    vit = subprocess.run([sys.executable, "-m", "clip_jax.convert", "--model", "ViT-B-32",
                          "--input", str(tmp_path / "rn50.safetensors"), "--output",
                          str(tmp_path / "y")], cwd=REPO, capture_output=True, text=True)
    assert vit.returncode == 1
    assert vit.stderr.strip().splitlines()[-1].startswith("convert error: ViT-B-32: ")
