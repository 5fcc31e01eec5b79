"""The BPE tokenizer against ids OpenAI CLIP's SimpleTokenizer gives, and its batching rules."""

import numpy as np
import pytest

from clip_jax import tokenizer as tokenizer_lib

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.Tokenizer()


def test_vocab_size_and_special_ids(tok):
    assert (tok.vocab_size, tok.sot_token, tok.eot_token) == (49408, SOT, EOT)


@pytest.mark.parametrize("text, ids", [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("a diagram", [320, 22697]),
])
def test_known_ids_match_openai_clip(text, ids):
    row = tokenizer_lib.tokenize(text)[0]
    expected = np.zeros(77, np.int32)
    expected[:len(ids) + 2] = [SOT, *ids, EOT]
    np.testing.assert_array_equal(row, expected)


def test_cleaning_unescapes_html_collapses_whitespace_and_lowercases(tok):
    assert tok.encode("A  Photo\tof\n a CAT") == tok.encode("a photo of a cat")
    assert tok.encode("Caf&amp;eacute; &lt;3") == tok.encode("café <3")


@pytest.mark.parametrize("text, decoded", [
    ("a photo of a cat", "a photo of a cat"),
    ("Two DOGS playing in the snow", "two dogs playing in the snow"),
    ("Café déjà vu!", "café déjà vu !"),
    ("It's 2021, isn't it?", "it 's 2 0 2 1 , isn 't it ?"),
    ("東京 at night: 3 lights", "東京 at night : 3 lights"),
])
def test_decode_inverts_encode_up_to_word_spacing(tok, text, decoded):
    assert tok.decode(tok.encode(text)) == decoded


def test_decode_drops_special_tokens(tok):
    assert tok.decode([SOT, *tok.encode("a cat"), EOT]) == "a cat"


def test_long_text_is_truncated_to_end_in_eot(tok):
    text = " ".join(f"word{i}" for i in range(200))
    rows = tok(text, context_length=16)
    assert rows.shape == (1, 16)
    assert rows[0, 0] == SOT and rows[0, -1] == EOT
    np.testing.assert_array_equal(rows[0, 1:-1], tok.encode(text)[:14])


def test_batch_is_zero_padded_int32(tok):
    texts = ["a cat", "a photo of a dog on the grass", ""]
    rows = tok(texts, context_length=12)
    assert rows.shape == (3, 12) and rows.dtype == np.int32
    for row, text in zip(rows, texts):
        ids = [SOT, *tok.encode(text), EOT]
        np.testing.assert_array_equal(row[:len(ids)], ids)
        assert not row[len(ids):].any()


def test_single_string_gives_one_row(tok):
    assert tok("a cat", context_length=10).shape == (1, 10)


@pytest.mark.parametrize("context_length", [0, 1])
def test_context_length_below_two_raises(tok, context_length):
    with pytest.raises(ValueError, match="context_length"):
        tok("a cat", context_length=context_length)


def test_word_cache_does_not_change_ids(tok):
    text = "a photo of a cat chasing a cat photo"
    warm = [tok.encode(text), tok.encode(text)]
    cold = tokenizer_lib.Tokenizer().encode(text)
    assert warm[0] == warm[1] == cold


def test_tokenize_uses_one_cached_default_tokenizer(tok):
    np.testing.assert_array_equal(tokenizer_lib.tokenize(["a cat"], 8), tok(["a cat"], 8))
    assert tokenizer_lib.default_tokenizer() is tokenizer_lib.default_tokenizer()


def _varied_corpus(count=3000, seed=0):
    """Hand-picked hard cases plus random strings over many Unicode blocks."""
    corpus = [
        "A photo of a CAT.", "it's the dog's   bone\t\n", "Caf\u00e9 d\u00e9j\u00e0 vu", "na\u0308ive",
        "\u00c5ngstr\u00f6m \u212b", "\U0001f431\U0001f436 emoji \U0001f469\u200d\U0001f4bb", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;", "&lt;3 &quot;quoted&quot; &#39;x&#39;",
        "Ã©tÃ© (mojibake)", "\ufb01ne \uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48", "tab\tand\u00a0nbsp\u2003em",
        "<|startoftext|>inside<|endoftext|>", "!!<|endoftext|>", "1,234.56 km/h -- 3x4=12",
        "word " * 200, "", "   ", "\u0000\u0007control\u001f", "I'LL WE'VE THEY'RE I'D",
        "\u0130stanbul \u00df \u1e9e", "x\u0301\u0302\u0303", "\u2460\u2461 \u00bd \u0663\u0664",
    ]
    rng = np.random.default_rng(seed)
    blocks = [(0x20, 0x7f), (0xa0, 0x250), (0x370, 0x400), (0x400, 0x500), (0x590, 0x700),
              (0x900, 0x980), (0x2000, 0x2070), (0x3040, 0x3100), (0x4e00, 0x4f00),
              (0xac00, 0xac80), (0xff00, 0xff60), (0x1f300, 0x1f650), (0x300, 0x370)]
    for _ in range(count):
        pieces = []
        for _ in range(rng.integers(1, 12)):
            low, high = blocks[rng.integers(len(blocks))]
            pieces.append("".join(chr(c) for c in rng.integers(low, high, rng.integers(1, 8))))
            pieces.append(rng.choice([" ", "  ", "", "&amp;", "\n", "'s "]))
        corpus.append("".join(pieces))
    return corpus


def test_ids_equal_open_clip_simple_tokenizer_on_varied_unicode(tok):
    """OpenCLIP's SimpleTokenizer is OpenAI's, except that it renamed the special
    tokens, so a caption that spells out '<|endoftext|>' literally differs: OpenAI's
    (and this) tokenizer maps it to the special id. Those captions are left out."""
    from clip_jax.references import open_clip_modules
    _, tokenizer_module, _ = open_clip_modules()
    reference = tokenizer_module.SimpleTokenizer()
    corpus = [text for text in _varied_corpus() if "<|" not in text]
    expected = reference(corpus).numpy()  # its default context of 77, end token kept
    np.testing.assert_array_equal(tok(corpus), expected)
    np.testing.assert_array_equal(tok(corpus, context_length=16),
                                  reference(corpus, context_length=16).numpy())
