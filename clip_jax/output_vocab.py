"""Output vocabularies of the predictive objectives: the classes over which a
bag-of-words head (bow_predict) or a caption decoder (caption_lm) predicts.

`config.model.output_vocab` names one:
- `full`: every id of CLIP's tokenizer (config.model.text.vocab_size, 49,408),
  as in the paper.
- `synthetic_shapes`: the tokens that the built-in datasets' captions (both
  variants) and their zero-shot prompts use, 90 of them, plus one class "other"
  that every other id maps to. The full softmax dominates a small caption
  model's cost on a CPU: the study's caption_lm step (configs/objectives.py,
  128 captions of 24 tokens) takes 5.0 s with it and 0.26 s with this subset
  on one core. On these captions the subset loses nothing, and on any text
  targets and log-likelihoods stay exact for the coarser vocabulary.

A head has `head_size` classes: rounded up to a multiple of 128 (49,408 is
386 x 128) so that it shards over any tensor axis up to 128; the extra classes
are never targets, like the ids of the full vocabulary that no caption uses.
"""

import functools

import numpy as np

HEAD_MULTIPLE = 128


def _synthetic_shapes_ids():
    # Imported here: the dataset module brings in TFDS, which the models do not need.
    from clip_jax import tokenizer  # noqa: PLC0415
    from clip_jax.data import synthetic_shapes  # noqa: PLC0415
    from clip_jax.evals import prompts  # noqa: PLC0415
    task = prompts.zeroshot_task("synthetic_shapes")
    texts = synthetic_shapes.caption_vocabulary() + [
        task.edit_prompt(template.format(name))
        for name in task.class_names for template in task.templates]
    encode = tokenizer.default_tokenizer().encode
    return sorted({token for text in texts for token in encode(text)})


# config.model.output_vocab -> the listed token ids (None: every id).
VOCABULARIES = {"full": None, "synthetic_shapes": _synthetic_shapes_ids}


def check_name(name):
    if name not in VOCABULARIES:
        raise ValueError(f"config.model.output_vocab={name!r} is unknown; "
                         f"choose one of {', '.join(VOCABULARIES)}")


@functools.cache
def listed_ids(name):
    """The token ids with a class of their own, in class order; None for all ids."""
    check_name(name)
    build = VOCABULARIES[name]
    return None if build is None else tuple(build())


def head_size(name, vocab_size):
    """Number of output classes of a head: the listed ids (+1 for "other"), or
    vocab_size, rounded up to a multiple of HEAD_MULTIPLE."""
    ids = listed_ids(name)
    classes = vocab_size if ids is None else len(ids) + 1
    return -(-classes // HEAD_MULTIPLE) * HEAD_MULTIPLE


@functools.cache
def token_classes(name, vocab_size):
    """int32 [vocab_size]: the output class of every token id (listed ids get
    0..K-1 in order, all others K, "other"; with `full` the id itself)."""
    ids = listed_ids(name)
    if ids is None:
        return np.arange(vocab_size, dtype=np.int32)
    table = np.full(vocab_size, len(ids), np.int32)
    table[list(ids)] = np.arange(len(ids), dtype=np.int32)
    table.flags.writeable = False
    return table
