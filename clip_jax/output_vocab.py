"""Named output vocabularies for config.model.output_vocab (models/output_classes.py).

`synthetic_shapes()`: the tokens that the built-in datasets' captions (both
variants) and their zero-shot prompts use, 90 of them (every other id then maps
to one class "other"). The full softmax dominates a small caption model's cost
on a CPU: the study's caption_lm step (configs/objectives.py, 128 captions of
24 tokens) takes 5.0 s with it and 0.26 s with this subset on one core. On
these captions the subset loses nothing, and on any text targets and
log-likelihoods stay exact for the coarser vocabulary.
"""

import functools

from clip_jax import tokenizer
from clip_jax.data import synthetic_shapes as synthetic_shapes_data
from clip_jax.evals import prompts

# The names config.json of earlier runs held -> the ids they meant.
NAMES = {"full": lambda: (), "synthetic_shapes": lambda: synthetic_shapes()}


@functools.cache
def synthetic_shapes():
    """Sorted token ids of the built-in captions and their zero-shot prompts."""
    task = prompts.zeroshot_task("synthetic_shapes")
    texts = synthetic_shapes_data.caption_vocabulary() + task.prompts()
    encode = tokenizer.default_tokenizer().encode
    return tuple(sorted({token for text in texts for token in encode(text)}))
