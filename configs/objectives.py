r"""The objective study of the CLIP paper (§2.3, Figure 2) on the built-in data.

The paper chose its objective by training efficiency: at equal compute, a
Transformer language model of the captions learned zero-shot ImageNet 3x
slower than a model predicting the captions' bag of words, and a contrastive
objective on the same bag-of-words text was 4x faster again. Here the same
image tower (the CPU-sized ViT of configs/clip.py:tiny), data, optimiser and
image budget train with each objective, and zero-shot top-1 on synthetic_shapes
is logged against images seen:

  python -m launch.sweep run --config configs/objectives.py --sweep objectives \
      --root /tmp/objectives
  python -m launch.sweep collect --root /tmp/objectives --efficiency \
      --metric zeroshot/synthetic_shapes/top1

The second writes the Figure-2-style plot and the table of images needed to
reach a target accuracy, with the ratios next to the paper's (`COMPARISONS`).

`arg` knobs: `captions=alt_text` (default: synthetic_shapes_alt_text, the web-
alt-text-like captions) or `captions=templates` (synthetic_shapes' clean
template captions), and any top-level key of configs/clip.py, e.g.
`configs/objectives.py:captions=templates,total_steps=300`.
"""

from clip_jax import output_vocab, overrides
from clip_jax.evals.specs import evaluator_config
from configs import clip

# captions knob -> the training data (the images are the same in both).
CAPTIONS = {"alt_text": "synthetic_shapes_alt_text:train", "templates": "synthetic_shapes:train"}

# Every run: the tiny config's ViT, text shape, optimiser and batch, with a context long
# enough for the longest alt-text caption (22 tokens), the predictive heads over the
# data's 90-odd tokens instead of 49,408 (clip_jax/output_vocab.py), and zero-shot
# top-1 as the only eval, with CLIP's single default prompt for every objective.
_STUDY = {
    "total_steps": 1200,  # the tiny run's; the measured study: docs/objectives.md
    "eval_every": 100,
    "checkpoint_every": 0,  # the final checkpoint only
    "model.text.context_length": 24,
    "model.output_vocab": output_vocab.synthetic_shapes(),
}
PROMPT_TEMPLATES = ("a photo of a {}.",)


def get_config(arg=None):
    """The study's base config (contrastive, Transformer text); `arg` as above."""
    knobs = dict(overrides.split(knob) for knob in (arg or "").split(",") if knob)
    captions = knobs.pop("captions", "alt_text")
    if captions not in CAPTIONS:
        raise ValueError(f"unknown captions={captions!r}; choose one of {', '.join(CAPTIONS)}")
    study_knobs = {key: value for key, value in _STUDY.items() if "." not in key}
    config = clip.get_config(",".join(["tiny", *(f"{k}={v}" for k, v in
                                                 {**study_knobs, **knobs}.items())]))
    with config.unlocked():
        config.model.text.context_length = _STUDY["model.text.context_length"]
        config.model.output_vocab = _STUDY["model.output_vocab"]
        config.data.train = CAPTIONS[captions]
        config.evals = {"zeroshot": evaluator_config("zeroshot", "synthetic_shapes",
                                                     templates=PROMPT_TEMPLATES)}
    return config


# The runs, slowest objective first as in the paper's Figure 2; contrastive with the
# Transformer text tower (CLIP itself) comes last, beyond what the figure compares.
SWEEPS = {
    "objectives": [
        {"objective": "caption_lm"},
        {"objective": "bow_predict"},
        {"objective": "contrastive", "model.text_encoder": "bag_of_words"},
        {"objective": "contrastive", "model.text_encoder": "transformer"},
    ],
}

# The paper's efficiency ratios (Figure 2): images the slower objective needs to reach
# an accuracy, over images the faster one needs.
COMPARISONS = {
    "objectives": [
        dict(slower={"objective": "caption_lm"}, faster={"objective": "bow_predict"},
             paper=3.0, label="Transformer LM vs bag-of-words prediction"),
        dict(slower={"objective": "bow_predict"},
             faster={"objective": "contrastive", "model.text_encoder": "bag_of_words"},
             paper=4.0, label="bag-of-words prediction vs bag-of-words contrastive"),
    ],
}


def get_sweep(name):
    """The runs of the sweep `name`: a list of {dotted config key: value}."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; choose one of {', '.join(SWEEPS)}")
    return [dict(run) for run in SWEEPS[name]]


def get_comparisons(name):
    """[{slower, faster (a run's overrides), paper (the paper's ratio), label}] of the
    sweep `name`, for `launch.sweep collect --efficiency`."""
    return [dict(comparison) for comparison in COMPARISONS.get(name, [])]
