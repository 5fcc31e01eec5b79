"""One override text, one value: the trainer's --config.KEY=VALUE flags, config
file knobs, benchmark --set and sweeps all read `key=value` the same way."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from clip_jax import overrides
from clip_jax.benchmarks import train as train_bench
from configs.clip import get_config

CONFIG_FILE = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "clip.py")

# (key, text, value) for every field type the configs hold.
CASES = [
    ("lock_image", "False", False), ("lock_image", "false", False), ("lock_image", "0", False),
    ("lock_text", "True", True), ("lock_text", "1", True),
    ("init_from", "/x", "/x"),  # a None field of type str
    ("seed", "7", 7), ("total_steps", "100", 100),
    ("checkpoint_minutes", "2.5", 2.5), ("checkpoint_minutes", "3", 3.0),
    ("keep_best", "zeroshot/synthetic_shapes/top1", "zeroshot/synthetic_shapes/top1"),
    ("data.crop_scale", "(0.8, 1.0)", (0.8, 1.0)), ("data.crop_scale", "0.8,1.0", (0.8, 1.0)),
    ("model.logit_bias_init", "-10", -10.0),  # a None field of type float
    ("model.remat", "full", "full"),
]


def trainer_flag_value(key, text, monkeypatch):
    """What `python -m clip_jax.train --config configs/clip.py:tiny --config.KEY=TEXT`
    reads, through the same ml_collections flag the trainer defines (which reads
    its overrides from sys.argv when it is defined)."""
    argv = [__file__, f"--config={CONFIG_FILE}:tiny", f"--config.{key}={text}"]
    monkeypatch.setattr("sys.argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(argv)
    return overrides.lookup(values.config, key)


@pytest.mark.parametrize("key, text, value", CASES)
def test_every_entry_point_reads_the_same_value(key, text, value, monkeypatch):
    assert trainer_flag_value(key, text, monkeypatch) == value
    via_set = train_bench.train_config("tiny", 32, sets=[f"{key}={text}"])
    assert overrides.lookup(via_set, key) == value
    assert type(overrides.lookup(via_set, key)) is type(value)
    if "." not in key:  # config file knobs are the top-level keys
        assert overrides.lookup(get_config(f"tiny,{key}={text}"), key) == value


def test_knobs_are_typed_not_truthy():
    assert get_config("tiny,lock_image=False").lock_image is False
    assert get_config("tiny,init_from=/x").init_from == "/x"


@pytest.mark.parametrize("text, message", [
    ("tiny,seed=1.5", "config.seed='1.5': not a valid int"),
    ("tiny,lock_image=maybe", "config.lock_image='maybe': not a valid bool"),
    ("tiny,seed", "override 'seed': expected key=value"),
])
def test_a_bad_knob_is_one_line(text, message):
    with pytest.raises(ValueError, match=message) as error:
        get_config(text)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("assignment, message", [
    ("model.nope=1", "no config key 'model.nope'"),
    ("optimizer.lr=fast", "config.optimizer.lr='fast': not a valid float"),
    ("model=1", "config.model holds a ConfigDict"),
])
def test_apply_names_the_bad_key(assignment, message):
    config = get_config("tiny")
    with config.unlocked(), pytest.raises(ValueError, match=message):
        overrides.apply(config, [assignment])


def test_mappings_keep_python_values_and_parse_texts():
    config = get_config("tiny")
    with config.unlocked():
        overrides.apply(config, {"optimizer.lr": 1e-3, "lock_image": "false",
                                 "data.crop_scale": (0.5, 1.0)})
    assert (config.optimizer.lr, config.lock_image, config.data.crop_scale) == (1e-3, False,
                                                                                (0.5, 1.0))
