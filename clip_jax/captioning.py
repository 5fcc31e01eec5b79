"""Captions from a CoCa model (clip_jax.models.coca), greedy or by beam search:
the image tower runs once, then one jitted loop predicts the caption a token at
a time with a fixed-length key/value cache.

The cache (flax's "cache" collection, models.transformer.decoding) holds, for
every block of the text tower and of the decoder, the keys and values of the
max_len positions, and for every cross-attention block the image tokens' keys
and values; each step computes one position. Decoding runs the text side
unscanned (a scanned model's text tower is unstacked for it). OpenCLIP's
generate re-runs the whole prefix each step instead; both give the same tokens
(tests/test_coca.py), except where a generated token is id 0 ('!'), which
OpenCLIP's legacy padding mask then hides from the next position.

Beam search keeps the `beams` most likely prefixes of each image (summed log
probabilities; a finished caption keeps its score and grows by padding) and
returns the one with the highest log probability per generated token
(Hugging Face's length_penalty 1, which OpenCLIP's generate uses).
"""

import dataclasses
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class _Decoder:
    """One step of the text side for rows of image tokens, from a filled cache."""

    model: Any  # the unscanned CoCa
    params: Any
    image_tokens: jax.Array  # [R, N, E], one row per caption decoded
    token_of_class: jax.Array  # [classes]: token id of each output class, -1 for none

    def log_probabilities(self, cache, previous):
        """(log p [R, classes] of the next token given the previous ones, new cache):
        classes that stand for no token get -inf."""
        logits, cache = self.model.apply({"params": self.params, **cache}, self.image_tokens,
                                         previous[:, None], method=self.model.decode,
                                         mutable=["cache"])
        logits = jnp.where(self.token_of_class >= 0, logits[:, 0], -jnp.inf)
        return jax.nn.log_softmax(logits), cache


def _start(model, variables, images, max_len, copies):
    """(decoder, token buffer [R, max_len] holding the start tokens, empty cache)
    for R = images x copies rows (copies: beams per image)."""
    config = model.config
    if not 2 <= max_len <= config.text.context_length:
        raise ValueError(f"max_len={max_len} must be in [2, context_length="
                         f"{config.text.context_length}]")
    words = tokenizer.default_tokenizer()
    if config.output_vocab and words.eot_token not in tuple(config.output_vocab):
        raise ValueError("captions need the end token among config.model.output_vocab "
                         f"({words.eot_token}): without it no caption can end")
    image_tokens = model.apply(variables, image_ops.normalize(images), method=model.image_tokens)
    image_tokens = jnp.repeat(image_tokens, copies, axis=0)
    unscanned, params = _unscanned(model, variables["params"])
    rows = image_tokens.shape[0]
    buffer = jnp.zeros((rows, max_len), jnp.int32).at[:, 0].set(words.sot_token)
    _, cache = unscanned.apply({"params": params}, image_tokens, buffer,
                               method=unscanned.decode, mutable=["cache"])
    token_of_class = jnp.asarray(output_classes.class_token_ids(config.output_vocab,
                                                                config.text.vocab_size))
    return _Decoder(unscanned, params, image_tokens, token_of_class), buffer, cache


def _end_cut_rows(buffer, done):
    """A row that reached max_len without its end token ends with it, as the
    tokenizer ends rows it truncates."""
    eot = tokenizer.default_tokenizer().eot_token
    return buffer.at[..., -1].set(jnp.where(done, buffer[..., -1], eot))


def greedy_tokens(model, variables, images, max_len):
    """Token rows int32 [B, max_len] of uint8 images [B, S, S, 3]: the start token,
    then at each position the most likely token that is a vocabulary entry,
    until the end token (zero padding after it). Traceable: jit it."""
    decoder, buffer, cache = _start(model, variables, images, max_len, copies=1)
    eot = tokenizer.default_tokenizer().eot_token

    def step(position, carry):
        buffer, done, cache = carry
        log_p, cache = decoder.log_probabilities(cache, buffer[:, position - 1])
        token = jnp.where(done, 0, decoder.token_of_class[jnp.argmax(log_p, axis=-1)])
        return buffer.at[:, position].set(token), done | (token == eot), cache

    buffer, done, _ = jax.lax.fori_loop(1, max_len, step,
                                        (buffer, jnp.zeros(buffer.shape[:1], bool), cache))
    return _end_cut_rows(buffer, done)


def beam_tokens(model, variables, images, max_len, beams):
    """(token rows int32 [B, max_len], their log probability per generated token
    [B]) by beam search with `beams` beams per image. Traceable: jit it."""
    decoder, buffer, cache = _start(model, variables, images, max_len, copies=beams)
    eot = tokenizer.default_tokenizer().eot_token
    batch = images.shape[0]
    classes = decoder.token_of_class.shape[0]
    buffer = buffer.reshape(batch, beams, max_len)
    # Only the first beam of each image is live at the start: the others are copies.
    scores = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf) * jnp.ones((batch, 1))
    # A finished beam's one continuation: class 0 as a stand-in for padding, score kept.
    finished_row = jnp.where(jnp.arange(classes) == 0, 0.0, -jnp.inf)

    def step(position, carry):
        buffer, scores, done, lengths, cache = carry
        log_p, cache = decoder.log_probabilities(cache, buffer[:, :, position - 1].reshape(-1))
        log_p = jnp.where(done.reshape(-1, 1), finished_row, log_p).reshape(batch, beams, classes)
        candidates = (scores[..., None] + log_p).reshape(batch, beams * classes)
        scores, chosen = jax.lax.top_k(candidates, beams)  # [B, K]
        source, token_class = chosen // classes, chosen % classes
        keep = lambda x: jnp.take_along_axis(x, source.reshape(  # noqa: E731
            batch, beams, *(1,) * (x.ndim - 2)), axis=1)
        buffer, done, lengths = keep(buffer), keep(done), keep(lengths)
        token = jnp.where(done, 0, decoder.token_of_class[token_class])
        lengths = lengths + ~done
        rows = (jnp.arange(batch)[:, None] * beams + source).reshape(-1)
        cache = jax.tree.map(lambda leaf: leaf[rows] if leaf.ndim and leaf.shape[0] == rows.size
                             else leaf, cache)
        buffer = buffer.at[:, :, position].set(token)
        return buffer, scores, done | (token == eot), lengths, cache

    zeros = jnp.zeros((batch, beams), jnp.int32)
    buffer, scores, done, lengths, _ = jax.lax.fori_loop(
        1, max_len, step, (buffer, scores, zeros.astype(bool), zeros, cache))
    per_token = scores / jnp.maximum(lengths, 1)
    best = jnp.argmax(per_token, axis=1)
    pick = lambda x: jnp.take_along_axis(x, best.reshape(batch, 1, *(1,) * (x.ndim - 2)),  # noqa: E731
                                         axis=1)[:, 0]
    return _end_cut_rows(pick(buffer), pick(done)), pick(per_token)


def captions(model, variables, images, max_len=20, beams=1):
    """Caption strings of uint8 images [B, S, S, 3]: greedy (beams=1) or the best
    of a beam search."""
    if beams < 1:
        raise ValueError(f"beams={beams} must be >= 1")
    if beams == 1:
        decode = lambda variables, images: greedy_tokens(  # noqa: E731
            model, variables, images, max_len)
    else:
        decode = lambda variables, images: beam_tokens(  # noqa: E731
            model, variables, images, max_len, beams)[0]
    rows = np.asarray(jax.jit(decode)(variables, images))
    words = tokenizer.default_tokenizer()
    return [words.decode(row[:list(row).index(words.eot_token) + 1] if words.eot_token in row
                         else row).strip() for row in rows]
