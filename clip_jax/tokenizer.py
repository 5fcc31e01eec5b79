"""CLIP's byte-level BPE tokenizer: text -> int32 token ids, id-for-id compatible with OpenAI CLIP.

Vocabulary: 256 byte symbols, the same 256 with an end-of-word marker '</w>', 48,894 merges from
`assets/bpe_simple_vocab_16e6.txt.gz` (OpenAI, MIT licence) and two special tokens, 49,408 ids.
"""

import functools
import gzip
import html
import importlib.resources
import itertools
import pathlib
import re
from typing import Iterable, Sequence, Union

import ftfy
import numpy as np
import regex

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"
# The special strings come first so that a caption containing them literally maps to their ids,
# as in OpenAI's tokenizer; the rest splits off contractions, letter runs, single digits, symbols.
_WORD_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)
# The same pattern for cleaned (lower-case) ASCII text, where \p{L} is [a-z] and \p{N} is
# [0-9]: the standard library's engine runs it about twice as fast as `regex` runs the above.
_ASCII_WORD_PATTERN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")
_WHITESPACE = re.compile(r"\s+")


def byte_to_unicode() -> dict[int, str]:
    """256 byte values -> 256 printable characters; dict order is the order of vocab ids 0..255."""
    # BPE must never see whitespace or control bytes, so those move up past U+0100; printable
    # Latin-1 bytes keep their own character.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def clean_text(text: str) -> str:
    """Fixes mojibake and HTML entities, collapses whitespace and lowercases, as CLIP does."""
    # ftfy costs ~30us a caption; printable ASCII without '&' is a fixed point of ftfy and
    # html.unescape and its only whitespace is ' ', so the common case skips both.
    if text.isascii() and text.isprintable() and "&" not in text:
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text).strip().lower()


class Tokenizer:
    """OpenAI CLIP's BPE tokenizer; `__call__` gives padded [N, context_length] int32 batches."""

    def __init__(self, vocab_path=None, word_cache_size: int = 1 << 18):
        vocab = (pathlib.Path(vocab_path) if vocab_path is not None
                 else importlib.resources.files("clip_jax") / "assets" / _VOCAB_FILE)
        lines = gzip.decompress(vocab.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]  # line 0 is a header
        byte_map = byte_to_unicode()
        byte_chars = list(byte_map.values())
        symbols = (byte_chars + [c + "</w>" for c in byte_chars]
                   + ["".join(m) for m in merges] + [_SOT, _EOT])
        self._encoder = {s: i for i, s in enumerate(symbols)}
        self._decoder = symbols
        self._ranks = {m: r for r, m in enumerate(merges)}
        # str.translate over latin-1 decoded bytes applies the byte table in C.
        self._byte_table = str.maketrans({chr(b): c for b, c in byte_map.items()})
        self._byte_values = {c: b for b, c in byte_map.items()}
        # Captions repeat a small vocabulary of words, so a hit costs one C-level lookup; the
        # bound keeps memory flat over billions of captions with their long tail of rare words.
        self._word_ids = functools.lru_cache(maxsize=word_cache_size)(self._bpe)

    @property
    def vocab_size(self) -> int:
        """Number of token ids: 49408."""
        return len(self._decoder)

    @property
    def sot_token(self) -> int:
        """Id of '<|startoftext|>' (49406), first in every row."""
        return self._encoder[_SOT]

    @property
    def eot_token(self) -> int:
        """Id of '<|endoftext|>' (49407), the highest id, last in every row."""
        return self._encoder[_EOT]

    def _bpe(self, word: str) -> tuple[int, ...]:
        """One pre-split word -> its token ids, merging the lowest-ranked adjacent pair first."""
        if word in (_SOT, _EOT):
            return (self._encoder[word],)
        chars = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
        parts = [*chars[:-1], chars[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self._ranks.get(p, _NUM_MERGES))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self._encoder[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        """str -> token ids [T], without start/end tokens."""
        text = clean_text(text)
        words = (_ASCII_WORD_PATTERN if text.isascii() else _WORD_PATTERN).findall(text)
        # map/chain keep the per-word loop in C: a cached word costs one dict lookup.
        return list(itertools.chain.from_iterable(map(self._word_ids, words)))

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids [T] -> text, dropping start/end tokens; word ends become spaces."""
        special = (self.sot_token, self.eot_token)
        chars = "".join(self._decoder[int(i)] for i in ids if int(i) not in special)
        data = bytes(self._byte_values[c] for c in chars)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = 77) -> np.ndarray:
        """str or N strs -> int32 [N, context_length]: sot, tokens, eot, zero padding."""
        # Too-long texts are cut so eot survives: the text encoder pools at the eot position.
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold the start and end tokens, "
                             f"got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        sot, eot = self.sot_token, self.eot_token
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in zip(out, texts):
            ids = [sot, *self.encode(text)[:context_length - 2], eot]
            row[:len(ids)] = ids
        return out


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> Tokenizer:
    """The packaged-vocabulary Tokenizer, loaded once per process."""
    return Tokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77) -> np.ndarray:
    """str or N strs -> int32 [N, context_length] with the default Tokenizer."""
    return default_tokenizer()(texts, context_length)
