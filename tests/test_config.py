"""Configs: every variant is valid; bad values stop with one line naming the key."""

import os
import subprocess
import sys

import jax
import pytest

from clip_jax import cpu_devices, sharding_rules
from clip_jax.config_checks import ConfigError, check_config
from configs.clip import VARIANTS, get_config
from tests.conftest import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_valid_on_8_devices(variant):
    check_config(get_config(variant), num_devices=8)


def test_public_keys_exist():
    config = get_config()
    for key in ("seed", "batch_size", "total_steps", "log_every", "eval_every",
                "checkpoint_every", "model", "optimizer", "data", "mesh"):
        assert key in config
    for key in ("lr", "warmup_steps", "weight_decay", "b1", "b2", "eps", "grad_clip_norm"):
        assert key in config.optimizer


def test_knobs_in_the_config_argument():
    config = get_config("tiny,total_steps=7,batch_size=64")
    assert (config.total_steps, config.batch_size) == (7, 64)
    with pytest.raises(ValueError, match="unknown config variant 'vit_x'"):
        get_config("vit_x")
    with pytest.raises(ValueError, match="unknown config knob 'steps'"):
        get_config("tiny,steps=3")


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 100}, "config.batch_size=100 is not divisible by the data-parallel size 8"),
    ({"optimizer.lr": -1.0}, "config.optimizer.lr=-1.0 must be >= 0"),
    ({"optimizer.b2": 1.0}, "config.optimizer.b2=1.0 must be in [0, 1)"),
    ({"mesh.fsdp": 3}, "8 devices are not divisible by 3"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, "needs 4 devices, but 8 are available"),
    ({"model.image.patch_size": 5}, "config.model.image.image_size=16 is not divisible by patch_size=5"),
    ({"model.text.width": 30, "model.text.heads": 4},
     "config.model.text.width=30 is not divisible by heads=4"),
    ({"model.activation": "relu"}, "config.model.activation='relu' is unknown"),
    ({"model.remat": "some"}, "config.model.remat='some' is unknown"),
    ({"total_steps": 0}, "config.total_steps=0 must be positive"),
    ({"profile.steps": 0}, "config.profile.steps=0 must be positive"),
    ({"profile.start_step": -1}, "config.profile.start_step=-1 must be >= 0"),
    ({"loss.kind": "hinge"}, "config.loss.kind='hinge' is unknown"),
    ({"loss.kind": "sigmoid"}, "config.loss.kind='sigmoid' needs a learned bias"),
    ({"loss.chunk_size": 5}, "config.loss.chunk_size=5 does not divide config.batch_size=16"),
    ({"batch_size": 96, "loss.kind": "sigmoid", "model.logit_bias_init": -10.0,
      "loss.chunk_size": 8}, "config.loss.chunk_size=8 does not divide the per-device batch 12"),
    ({"evals.zeroshot.batch_size": 12}, "config.evals.zeroshot.batch_size=12 must be a "
                                        "positive multiple of the data-parallel size 8"),
    ({"evals.retrieval.kind": "captioning"}, "config.evals.retrieval.kind='captioning' is unknown"),
    ({"evals.zeroshot.every": -2}, "config.evals.zeroshot.every=-2 must be >= -1"),
    ({"microbatches": 0}, "config.microbatches=0 must be >= 1"),
    ({"microbatches": 4}, "config.batch_size=16 is not divisible by config.microbatches x "
                          "data-parallel size = 4 x 8"),
    ({"gradcache_weights": "whole"}, "config.gradcache_weights='whole' is unknown; choose one "
                                     "of sharded, gathered"),
    ({"gradcache_weights": "gathered", "model.image": dict(
        kind="resnet", image_size=32, stage_layers=(1, 1, 1, 1), width=16, heads=2)},
     "config.gradcache_weights='gathered': a ResNet tower's BatchNorm"),
    ({"model.image.patch_dropout": 1.0}, "patch_dropout=1 must be in [0, 1)"),
    ({"model.attention": "flash"}, "config.model.attention='flash' is unknown; choose one of "
                                   "xla, cudnn, splash, auto"),
    ({"model.attention": "cudnn"}, "config.model.attention='cudnn' needs a GPU with cuDNN; "
                                   "this platform is cpu"),
    ({"model.lean_backward": "yes"}, "config.model.lean_backward='yes' is unknown"),
    ({"model.grad_reduce_dtype": "bf16"}, "config.model.grad_reduce_dtype='bf16' is unknown"),
    ({"model.layer_loop": "while"}, "config.model.layer_loop='while' is unknown; choose one of "
                                    "auto, scan, unrolled"),
    ({"phases": "90%: image_size=12; 10%"}, "image_size=12 in config.phases (steps 1-1080: 12 px, "
                                            "patch dropout 0, 8 caption tokens) is not a positive "
                                            "multiple of config.model.image.patch_size=8"),
    ({"phases": "90%: context_length=9; 10%"}, "context_length=9 in config.phases"),
    ({"phases": "90%: patch_dropout=0.5"}, "the phases cover 1080 of total_steps=1200 steps"),
    ({"phases": "most: image_size=8"}, "start with its length, 'N%' of total_steps or N steps"),
    ({"phases": "50%: size=8; 50%"}, "'size=8' is not KEY=VALUE with KEY one of image_size, "
                                     "patch_dropout, context_length"),
    ({"phases": "50%: patch_dropout=0.5; 50%", "model.image": dict(
        kind="resnet", image_size=32, stage_layers=(1, 1, 1, 1), width=16, heads=2)},
     "patch dropout needs a ViT image tower"),
    ({"mesh.dcn_data": 2, "mesh.data": 4, "batch_size": 12},
     "not divisible by the data-parallel size 8 (mesh dcn_data x data x fsdp = 2 x 4 x 1)"),
    ({"mesh.dcn_data": 2, "mesh.data": 4, "sharding_rules": (
        *((name, axes) for name, axes in sharding_rules.DEFAULT_RULES
          if name != "activation_batch"), ("activation_batch", ("data", "fsdp")))},
     "config.mesh.dcn_data=2: config.sharding_rules' activation_batch -> ('data', 'fsdp') "
     "leaves dcn_data out"),
    ({"sharding_rules": (("embed", "fsdp"), ("activation_batch", ("data", "fsdp")))},
     "config.sharding_rules has no rule for activation_length, activation_embed"),
])
def test_invalid_values_are_named(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_config(small_config(**overrides), num_devices=8)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_splash_attention_is_refused_on_a_gpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ConfigError, match="^config.model.attention='splash' is a TPU kernel; "
                                          "on a GPU use 'cudnn' or 'auto'$"):
        check_config(small_config(**{"model.attention": "splash"}), num_devices=8)


@pytest.mark.parametrize("flag,message", [
    ("--config.batch_size=100", "config.batch_size=100 is not divisible by the data-parallel size 8"),
    ("--config.optimizer.lrr=0.1", "lrr"),
])
def test_command_line_errors_are_one_line_before_any_compile(flag, message, tmp_path):
    env = dict(os.environ, XLA_FLAGS=cpu_devices.xla_flags(8, os.environ.get("XLA_FLAGS", "")),
               TF_CPP_MIN_LOG_LEVEL="3", JAX_LOG_COMPILES="1")
    result = subprocess.run(
        [sys.executable, "-m", "clip_jax.train", "--workdir", str(tmp_path), flag],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if message in line]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert "Compiling" not in result.stderr  # JAX_LOG_COMPILES logs every compile
    assert "Traceback" not in result.stderr


def test_trainer_help_explains_configs_exits_0_and_prints_no_tensorflow_banner():
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    done = subprocess.run([sys.executable, "-m", "clip_jax.train", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-1000:]
    assert "oneDNN" not in done.stdout + done.stderr
    assert "--config.KEY=VALUE" in done.stdout and "docs/configs.md" in done.stdout
    assert "--workdir" in done.stdout
