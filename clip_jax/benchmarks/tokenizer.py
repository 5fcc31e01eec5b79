"""Tokenizer throughput: clip_jax.tokenize against OpenCLIP's SimpleTokenizer
on the same alt-text-like captions."""

import json
import time

from clip_jax import tokenizer as tokenizer_lib
from clip_jax.data import throughput

def _texts_per_sec(tokenize, texts, batch=256):
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        tokenize(texts[i:i + batch])
    return len(texts) / (time.perf_counter() - start)


def tokenizer_benchmark(count=50_000, reference=True):
    """Texts/s of clip_jax.tokenize and OpenCLIP's SimpleTokenizer on the same captions,
    in batches of 256 after a warm-up on as many other captions (word caches filled, as
    in a long-running input pipeline)."""
    warmup, texts = (throughput.caption_corpus(count, seed=1),
                     throughput.caption_corpus(count, seed=2))
    contenders = {"clip_jax": tokenizer_lib.Tokenizer()}
    if reference:
        from clip_jax import references  # noqa: PLC0415
        _, open_clip_tokenizer, _ = references.open_clip_modules()
        contenders["open_clip"] = open_clip_tokenizer.SimpleTokenizer()
    rows = []
    for name, tokenize in contenders.items():
        _texts_per_sec(tokenize, warmup)
        rows.append({"tokenizer": name, "texts": count, "texts_per_sec": _texts_per_sec(tokenize, texts)})
    return rows


def run_tokenizer(count, reference, as_json):
    rows = tokenizer_benchmark(count, reference)
    for row in rows:
        if as_json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['tokenizer']:<10} {row['texts_per_sec']:>10,.0f} texts/s "
                  f"({row['texts']:,} captions, batches of 256)", flush=True)
    if len(rows) == 2 and not as_json:
        print(f"clip_jax / open_clip: {rows[0]['texts_per_sec'] / rows[1]['texts_per_sec']:.1f}x")
