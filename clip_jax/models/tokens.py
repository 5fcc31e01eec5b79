"""Where the words are in a tokenized caption row.

clip_jax.tokenizer writes each caption as [SOT, w_1, ..., w_n, EOT, 0, ...]:
the start token first, the end token right after the last word, zero padding
after it. The end token has the highest id, so argmax finds it (as the text
Transformer's pooling does) without a separate length input; position masks,
not id tests, then pick the words, so a word whose id is 0 ('!') still counts.
"""

import jax.numpy as jnp


def end_positions(tokens):
    """Index of the end-of-text token of each row: int [...], tokens int [..., L]."""
    return jnp.argmax(tokens, axis=-1)


def word_mask(tokens):
    """bool [..., L]: the caption's own tokens w_1..w_n, not start, end or padding."""
    positions = jnp.arange(tokens.shape[-1])
    return (positions >= 1) & (positions < end_positions(tokens)[..., None])


def next_token_mask(tokens):
    """bool [..., L-1]: entry j says whether tokens[..., j+1] is predicted by a
    left-to-right model reading tokens[..., :j+1]: the words w_1..w_n and the end
    token, not the padding after it."""
    positions = jnp.arange(1, tokens.shape[-1])
    return positions <= end_positions(tokens)[..., None]
