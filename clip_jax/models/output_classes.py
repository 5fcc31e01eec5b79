"""The classes a predictive head (bow_predict's bag-of-words head, caption_lm's
decoder) predicts over, from config.model.output_vocab: the token ids that get
a class of their own, in class order, every other id sharing one class
"other"; empty for every id of the tokenizer (the paper's choice). The ids come
from the config (configs/objectives.py lists the built-in captions' ones,
clip_jax/output_vocab.py), so the models need no dataset.

A head has `head_size` classes: rounded up to a multiple of 128 (49,408 is
386 x 128) so that it shards over any tensor axis up to 128; the extra classes
are never targets, like the ids of the full vocabulary that no caption uses.
"""

import functools

import numpy as np

HEAD_MULTIPLE = 128


def check(ids, vocab_size):
    """ValueError unless `ids` are distinct token ids below vocab_size."""
    ids = tuple(ids)
    bad = [i for i in ids if not (isinstance(i, (int, np.integer)) and 0 <= i < vocab_size)]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(f"config.model.output_vocab must list distinct token ids below "
                         f"{vocab_size} (or be empty: every id); got {bad[:3] or 'repeats'}")


def head_size(ids, vocab_size):
    """Output classes of a head: len(ids) + 1 ("other"), or vocab_size for no
    ids, rounded up to a multiple of HEAD_MULTIPLE."""
    classes = len(ids) + 1 if len(ids) else vocab_size
    return -(-classes // HEAD_MULTIPLE) * HEAD_MULTIPLE


@functools.cache
def _token_classes(ids, vocab_size):
    if not ids:
        return np.arange(vocab_size, dtype=np.int32)
    table = np.full(vocab_size, len(ids), np.int32)
    table[list(ids)] = np.arange(len(ids), dtype=np.int32)
    table.flags.writeable = False
    return table


def token_classes(ids, vocab_size):
    """int32 [vocab_size]: the output class of every token id (listed ids get
    0..K-1 in order, all others K, "other"; with no ids the id itself)."""
    return _token_classes(tuple(int(i) for i in ids), vocab_size)


def class_token_ids(ids, vocab_size):
    """int32 [head_size]: the token id each output class stands for, -1 for the
    classes that stand for none ("other", and the padding up to head_size): the
    inverse of token_classes, for decoding predictions back into tokens."""
    ids = tuple(int(i) for i in ids)
    table = np.full(head_size(ids, vocab_size), -1, np.int32)
    if ids:
        table[:len(ids)] = ids
    else:
        table[:vocab_size] = np.arange(vocab_size, dtype=np.int32)
    return table
