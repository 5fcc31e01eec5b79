r"""The fewer-tokens study, FLIP- and CLIPA-style, on the built-in data.

FLIP (Li et al., CVPR 2023) drops 50-75% of the image patches during
pre-training and ends with a short unmasked phase; CLIPA (Li, Wang, Xie,
NeurIPS 2023) pre-trains at low resolution with short captions, then briefly at
full size. Here the same model, data, optimiser and image budget train with
each schedule, with zero-shot top-1 on synthetic_shapes logged against images
seen and against training time:

  python -m launch.sweep run --config configs/fewer_tokens.py --sweep fewer_tokens \
      --root /tmp/fewer_tokens
  python -m launch.sweep collect --root /tmp/fewer_tokens --efficiency \
      --metric zeroshot/synthetic_shapes/top1

The second writes the plot (against images and against seconds), the time and
images each run needs to reach a target, and the speed-ups next to the
published ones (`COMPARISONS`). Run the sweep on an otherwise idle machine:
training time is wall-clock.

`arg`: top-level keys of configs/clip.py, e.g. `configs/fewer_tokens.py:total_steps=600`.
"""

from clip_jax import overrides
from clip_jax.evals.specs import evaluator_config
from configs import clip

# The tiny config's towers, optimiser and batch at 64 px in 8 px patches: 64 patch
# tokens, so that dropping 75% still leaves 16 per image, and the image tower
# (not the text tower, the loss or the input) is most of the step's FLOPs.
IMAGE_SIZE = 64
_STUDY = {"total_steps": 1200, "eval_every": 100, "checkpoint_every": 0}


def get_config(arg=None):
    """The study's base config: unmasked at 64 px throughout; `arg` as above."""
    knobs = dict(overrides.split(knob) for knob in (arg or "").split(",") if knob)
    config = clip.get_config(",".join(["tiny", *(f"{k}={v}" for k, v in
                                                 {**_STUDY, **knobs}.items())]))
    with config.unlocked():
        config.model.image.image_size = IMAGE_SIZE
        config.evals = {"zeroshot": evaluator_config("zeroshot", "synthetic_shapes")}
    return config


# Fixed before the first result: 90% of the steps reduced, the last 10% at the full
# setting (FLIP's unmasked tuning; CLIPA's fine-tune), the same for every schedule.
UNMASKED = {"phases": ""}
FLIP_50 = {"phases": "90%: patch_dropout=0.5; 10%"}
FLIP_75 = {"phases": "90%: patch_dropout=0.75; 10%"}
# 32 px is a quarter of the image tokens (16), 8 caption tokens about two thirds of
# the built-in captions' 9 (the end token kept: the words after the 6th are cut).
CLIPA = {"phases": "90%: image_size=32, context_length=8; 10%"}

SWEEPS = {"fewer_tokens": [UNMASKED, FLIP_50, FLIP_75, CLIPA]}

# What the papers publish, for the table beside the measured ratios (images or time
# the unmasked run needs to reach the target, over the reduced run's).
COMPARISONS = {
    "fewer_tokens": [
        dict(slower=UNMASKED, faster=FLIP_50, label="unmasked vs patch dropout 0.5",
             paper="2-3.7x less training time for 50-75% masking (FLIP)"),
        dict(slower=UNMASKED, faster=FLIP_75, label="unmasked vs patch dropout 0.75",
             paper="2-3.7x less training time for 50-75% masking (FLIP)"),
        dict(slower=UNMASKED, faster=CLIPA, label="full size vs low resolution, short captions",
             paper="none as a ratio (CLIPA: 63.2% ImageNet zero-shot in ~2 days on 8 A100)"),
    ],
}


def get_sweep(name):
    """The runs of the sweep `name`: a list of {dotted config key: value}."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; choose one of {', '.join(SWEEPS)}")
    return [dict(run) for run in SWEEPS[name]]


def get_comparisons(name):
    """[{slower, faster (a run's overrides), paper (what was published), label}] of
    the sweep `name`, for `launch.sweep collect --efficiency`."""
    return [dict(comparison) for comparison in COMPARISONS.get(name, [])]
