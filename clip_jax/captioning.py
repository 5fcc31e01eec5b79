"""Greedy captions from a CoCa model (clip_jax.models.coca): the image tower runs
once, then one jitted loop predicts the caption a token at a time.

The loop keeps a fixed-length buffer of max_len tokens (one compiled program
for every step and every caption) and re-runs the causal text tower and the
decoder over it at each step, taking the logits at the step's position; later
positions hold padding, which causal attention keeps from the earlier ones.
There is no key/value cache: each step costs a full forward pass of the text
side, which for captions of tens of tokens on a model whose text tower runs
its context length anyway (CoCa's class token sits at its end) costs max_len
times the cached decoder's FLOPs, and no memory beyond one forward pass.
"""

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import image_ops, tokenizer
from clip_jax.models import output_classes


def greedy_tokens(model, variables, images, max_len):
    """Token rows int32 [B, max_len] of uint8 images [B, S, S, 3]: the start token,
    then at each position the most likely token that is a vocabulary entry,
    until the end token (zero padding after it). Traceable: jit it."""
    config = model.config
    if not 2 <= max_len <= config.text.context_length:
        raise ValueError(f"max_len={max_len} must be in [2, context_length="
                         f"{config.text.context_length}]")
    words = tokenizer.default_tokenizer()
    if config.output_vocab and words.eot_token not in tuple(config.output_vocab):
        raise ValueError("captions need the end token among config.model.output_vocab "
                         f"({words.eot_token}): without it no caption can end")
    token_of_class = jnp.asarray(output_classes.class_token_ids(config.output_vocab,
                                                                config.text.vocab_size))
    image_tokens = model.apply(variables, image_ops.normalize(images), method=model.image_tokens)
    batch = images.shape[0]
    buffer = jnp.zeros((batch, max_len), jnp.int32).at[:, 0].set(words.sot_token)

    def step(position, carry):
        buffer, done = carry
        logits = model.apply(variables, image_tokens, buffer, method=model.decode)
        row = jnp.where(token_of_class >= 0, logits[:, position - 1], -jnp.inf)  # [B, C]
        token = jnp.where(done, 0, token_of_class[jnp.argmax(row, axis=-1)])
        return buffer.at[:, position].set(token), done | (token == words.eot_token)

    buffer, done = jax.lax.fori_loop(1, max_len, step, (buffer, jnp.zeros((batch,), bool)))
    # A caption cut at max_len still ends with the end token, as the tokenizer ends them.
    last = jnp.where(done, buffer[:, -1], words.eot_token)
    return buffer.at[:, -1].set(last)


def captions(model, variables, images, max_len=20):
    """Greedy caption strings of uint8 images [B, S, S, 3]."""
    rows = np.asarray(jax.jit(lambda variables, images: greedy_tokens(
        model, variables, images, max_len))(variables, images))
    words = tokenizer.default_tokenizer()
    return [words.decode(row[:list(row).index(words.eot_token) + 1] if words.eot_token in row
                         else row).strip() for row in rows]
