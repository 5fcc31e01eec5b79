r"""CoCa next to CLIP on the built-in data: configs/clip.py's tiny run, and the
same run as CoCa (the coca_tiny towers and decoder, OpenCLIP's loss weights),
its decoder predicting over the built-in captions' vocabulary and the end
token (clip_jax/output_vocab.py) instead of all 49,408 ids, which at this size
would cost more than the towers:

  python -m clip_jax.train --config configs/coca.py --workdir /tmp/coca
  python -m clip_jax.train --config configs/coca.py:clip --workdir /tmp/clip

`arg`: "coca" (default) or "clip", then any configs/clip.py knobs, e.g.
`configs/coca.py:coca,total_steps=300`.
"""

from clip_jax import output_vocab, tokenizer
from configs import clip

# arg -> the configs/clip.py variant.
MODELS = {"coca": "coca_tiny", "clip": "tiny"}


def get_config(arg=None):
    model, *knobs = (arg or "coca").split(",")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    config = clip.get_config(",".join([MODELS[model], *knobs]))
    with config.unlocked():
        # With the end token as a class of its own, so that greedy captions end.
        config.model.output_vocab = tuple(sorted(
            {*output_vocab.synthetic_shapes(), tokenizer.default_tokenizer().eot_token}))
    return config
