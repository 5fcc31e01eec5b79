"""Greedy captions from a CoCa model (clip_jax.models.coca): the image tower runs
once, then one jitted loop predicts the caption a token at a time with a
fixed-length key/value cache.

The cache (flax's "cache" collection, models.transformer.decoding) holds, for
every block of the text tower and of the decoder, the keys and values of the
max_len positions, and for every cross-attention block the image tokens' keys
and values; each step computes one position. Decoding runs the text side
unscanned (a scanned model's text tower is unstacked for it). OpenCLIP's
generate re-runs the whole prefix each step instead; both give the same tokens
(tests/test_coca.py), except where a generated token is id 0 ('!'), which
OpenCLIP's legacy padding mask then hides from the next position.
"""

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import image_ops, tokenizer
from clip_jax.models import output_classes
from clip_jax.models.transformer import unstack_layers


def _unscanned(model, params):
    """(model, params) whose text tower runs its blocks one by one, without remat."""
    config = model.config
    if not config.scan_layers and config.remat == "none":
        return model, params
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.scan_layers, config.remat = False, "none"
    text = dict(params["text"])
    if model.config.scan_layers:
        text["transformer"] = unstack_layers(text["transformer"])
    return model.clone(config=config), {**params, "text": text}


def greedy_tokens(model, variables, images, max_len):
    """Token rows int32 [B, max_len] of uint8 images [B, S, S, 3]: the start token,
    then at each position the most likely token that is a vocabulary entry,
    until the end token (zero padding after it); a caption cut at max_len ends
    with the end token, as the tokenizer ends rows. Traceable: jit it."""
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
    decoder, params = _unscanned(model, variables["params"])
    batch = images.shape[0]
    buffer = jnp.zeros((batch, max_len), jnp.int32).at[:, 0].set(words.sot_token)
    _, cache = decoder.apply({"params": params}, image_tokens, buffer, method=decoder.decode,
                             mutable=["cache"])

    def step(position, carry):
        buffer, done, cache = carry
        previous = jax.lax.dynamic_slice_in_dim(buffer, position - 1, 1, axis=1)  # [B, 1]
        logits, cache = decoder.apply({"params": params, **cache}, image_tokens, previous,
                                      method=decoder.decode, mutable=["cache"])
        row = jnp.where(token_of_class >= 0, logits[:, 0], -jnp.inf)  # [B, classes]
        token = jnp.where(done, 0, token_of_class[jnp.argmax(row, axis=-1)])
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], position, axis=1)
        return buffer, done | (token == words.eot_token), cache

    buffer, done, _ = jax.lax.fori_loop(1, max_len, step,
                                        (buffer, jnp.zeros((batch,), bool), cache))
    return buffer.at[:, -1].set(jnp.where(done, buffer[:, -1], words.eot_token))


def captions(model, variables, images, max_len=20):
    """Greedy caption strings of uint8 images [B, S, S, 3]."""
    rows = np.asarray(jax.jit(lambda variables, images: greedy_tokens(
        model, variables, images, max_len))(variables, images))
    words = tokenizer.default_tokenizer()
    return [words.decode(row[:list(row).index(words.eot_token) + 1] if words.eot_token in row
                         else row).strip() for row in rows]
