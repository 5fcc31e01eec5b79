"""A small, realistic web image-text dataset written on the fly, for tests.

    sources = write_web_dataset(tmp_path)
    prepare.prepare({"train": [sources["shards"].path, sources["csv"].path]}, ...)

`write_web_dataset` writes webdataset tar shards and a CSV and a TSV of image
files, with every kind of broken or awkward input web crawls contain, and
returns what preparing them must give: the good samples under the keys the
preparation names them (`<file basename>/<key in file>`), each with its caption
and the colour all its pixels have, and the number of samples skipped per reason.
Good images are solid colours (distinct per sample), at least 64 px a side.

The expectations assume preparation with max_side=MAX_SIDE: one good image is
larger and must come back resized; all others fit.
"""

import csv
import dataclasses
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

from clip_jax.data import decode

MAX_SIDE = 128


@dataclasses.dataclass(frozen=True)
class GoodSample:
    """A sample preparation must keep."""
    caption: str  # as decode_caption returns it
    colour: tuple  # (r, g, b) every stored pixel is close to (JPEG tolerance)
    size: tuple  # (width, height) stored with max_side=MAX_SIDE
    kind: str  # what is awkward about it, e.g. "cmyk_jpeg", "exif_rotated", "plain"
    original: bytes  # the image bytes as written
    verbatim: bool  # preparation must store `original` unchanged


@dataclasses.dataclass(frozen=True)
class Source:
    """One --source value and what preparing it must give."""
    path: str  # a glob of tar shards, or a CSV/TSV file
    good: dict  # key -> GoodSample, in input order
    skipped: dict  # reason (decode.REASONS) -> count
    not_utf8_captions: int  # good samples whose caption bytes are not UTF-8


def write_web_dataset(root, *, good_per_shard=4, shards=2, seed=0):
    """Writes root/shards/0000N.tar, root/images/*, root/captions.csv and
    root/captions.tsv -> {"shards": Source, "csv": Source, "tsv": Source}.

    Each shard has `good_per_shard` plain good samples; the awkward cases are
    dealt round-robin over the shards. `seed` picks colours, sizes and order.
    """
    rng = np.random.default_rng(seed)
    palette = _Palette(rng)
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    return {
        "shards": _write_shards(root, rng, palette, good_per_shard=good_per_shard, shards=shards),
        "csv": _write_table(root, rng, palette, "captions.csv", _csv_rows),
        "tsv": _write_table(root, rng, palette, "captions.tsv", _tsv_rows),
    }


# ---------------------------------------------------------------- colours and images


class _Palette:
    """Hands out distinct colours at least 48 levels apart in some channel."""
    _LEVELS = (24, 72, 120, 168, 216)

    def __init__(self, rng):
        grid = [(r, g, b) for r in self._LEVELS for g in self._LEVELS for b in self._LEVELS]
        self._colours = [grid[i] for i in rng.permutation(len(grid)) if len(set(grid[i])) > 1]
        self._greys = [(level,) * 3 for level in self._LEVELS]

    def colour(self):
        if not self._colours:
            raise ValueError("write_web_dataset: too many good samples for distinct colours")
        return self._colours.pop()

    def grey(self):
        return self._greys.pop()


def _encode(image, format, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _random_size(rng):
    return int(rng.integers(64, 121)), int(rng.integers(64, 121))


def _on_white(colour, alpha):
    """What an RGB colour with this alpha looks like composited on white."""
    return tuple(round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in colour)


def _noise_jpeg(rng, size=(96, 96)):
    """A JPEG whose entropy-coded data is long, so truncating it cuts the pixels."""
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG", quality=95)


def _exif_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _good_image(kind, rng, palette):
    """kind -> (extension, encoded bytes, GoodSample fields but caption/original)."""
    size = _random_size(rng)
    colour = palette.grey() if kind in ("grey_jpeg", "grey16_png") else palette.colour()
    solid = Image.new("RGB", size, colour)
    stored_colour, stored_size, verbatim = colour, size, False
    if kind == "plain":
        extension, verbatim = "jpg", True
        encoded = _encode(solid, "JPEG", quality=95)
    elif kind == "exif_orientation_1":  # upright, said explicitly
        extension, verbatim = "jpg", True
        encoded = _encode(solid, "JPEG", quality=95, exif=_exif_orientation(1))
    elif kind == "progressive_jpeg":
        extension, verbatim = "jpg", True
        encoded = _encode(solid, "JPEG", quality=95, progressive=True)
    elif kind == "exif_rotated":
        extension = "jpg"
        # Stored sideways, 96 x 64; displayed turned 90 degrees clockwise.
        encoded = _encode(Image.new("RGB", (96, 64), colour), "JPEG", quality=95,
                          exif=_exif_orientation(6))
        stored_size = (64, 96)
    elif kind == "oversize_jpeg":
        extension = "jpg"
        encoded = _encode(Image.new("RGB", (3 * MAX_SIDE, 2 * MAX_SIDE), colour), "JPEG",
                          quality=95)
        stored_size = (MAX_SIDE, round(MAX_SIDE * 2 / 3))
    elif kind == "webp":
        extension, encoded = "webp", _encode(solid, "WEBP", quality=90)
    elif kind == "png":
        extension, encoded = "png", _encode(solid, "PNG")
    elif kind == "png_named_jpg":  # the extension lies, as it often does on the web
        extension, encoded = "jpg", _encode(solid, "PNG")
    elif kind == "grey_jpeg":
        extension, encoded = "jpg", _encode(solid.convert("L"), "JPEG", quality=95)
    elif kind == "cmyk_jpeg":
        extension, encoded = "jpg", _encode(solid.convert("CMYK"), "JPEG", quality=95)
    elif kind == "rgba_png":
        extension = "png"
        encoded = _encode(Image.new("RGBA", size, colour + (128,)), "PNG")
        stored_colour = _on_white(colour, 128)
    elif kind in ("palette_png", "palette_png_transparent"):
        extension = "png"
        palette_image = Image.new("P", size, 0)
        palette_image.putpalette(list(colour) + [0] * 765)
        if kind == "palette_png":
            encoded = _encode(palette_image, "PNG")
        else:  # a tRNS chunk: palette entry 0 is half transparent
            encoded = _encode(palette_image, "PNG", transparency=bytes([128]))
            stored_colour = _on_white(colour, 128)
    elif kind == "grey16_png":
        extension = "png"
        encoded = _encode(Image.fromarray(np.full(size[::-1], colour[0] * 257, np.uint16)), "PNG")
    else:
        raise ValueError(f"unknown good image kind {kind!r}")
    return extension, encoded, dict(colour=stored_colour, size=stored_size, kind=kind,
                                    verbatim=verbatim)


def _bad_image(kind, rng):
    """kind -> (extension, encoded bytes) of an image preparation must skip."""
    if kind == "truncated_jpeg":  # a partial download
        encoded = _noise_jpeg(rng)
        return "jpg", encoded[:len(encoded) // 2]
    if kind == "corrupt_png":
        encoded = bytearray(_encode(Image.fromarray(
            rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG"))
        encoded[len(encoded) // 2] ^= 0xFF
        return "png", bytes(encoded)
    if kind == "zero_bytes":
        return "jpg", b""
    if kind == "html_as_jpg":  # an error page saved under an image name
        return "jpg", b"<html><body><h1>404 Not Found</h1></body></html>"
    if kind == "huge_png_header":  # 20000 x 20000 claimed, no pixel data at all
        header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
        return "png", (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                       + _png_chunk(b"IEND", b""))
    if kind == "huge_jpeg_header":  # claims 20000 x 20000, truncated
        encoded = bytearray(_noise_jpeg(rng, (64, 64)))
        start_of_frame = encoded.index(b"\xff\xc0")
        struct.pack_into(">HH", encoded, start_of_frame + 5, 20000, 20000)
        return "jpg", bytes(encoded[:len(encoded) * 3 // 4])
    raise ValueError(f"unknown bad image kind {kind!r}")


# What each bad image is skipped for. The huge JPEG fits in max_pixels once draft
# mode decodes it at 1/8 scale, and is then found truncated.
_BAD_IMAGE_REASONS = {
    "truncated_jpeg": decode.CORRUPT_IMAGE,
    "corrupt_png": decode.CORRUPT_IMAGE,
    "zero_bytes": decode.EMPTY_IMAGE,
    "html_as_jpg": decode.CORRUPT_IMAGE,
    "huge_png_header": decode.IMAGE_TOO_LARGE,
    "huge_jpeg_header": decode.CORRUPT_IMAGE,
}

_AWKWARD_GOOD_IMAGES = ("webp", "png", "png_named_jpg", "grey_jpeg", "cmyk_jpeg", "rgba_png",
                        "palette_png", "palette_png_transparent", "grey16_png", "exif_rotated",
                        "exif_orientation_1", "progressive_jpeg", "oversize_jpeg")

# Awkward captions of good samples: (stored bytes, what decode_caption gives).
_CP1252_CAPTION = ("caf\u00e9 \u2013 na\u00efve r\u00e9sum\u00e9".encode("cp1252"),
                   "caf\u00e9 \u2013 na\u00efve r\u00e9sum\u00e9")
_WHITESPACE_CAPTION = (b"  a red\tkite\r\nover the  hill \n", "a red kite over the hill")
_UTF8_CAPTION = ("\u732b\u306e\u5199\u771f, a photo of a cat".encode("utf-8"),
                 "\u732b\u306e\u5199\u771f, a photo of a cat")


# ---------------------------------------------------------------- tar shards


class _Expected:
    """Accumulates a Source's expectations."""

    def __init__(self):
        self.good, self.skipped, self.not_utf8_captions = {}, {}, 0

    def keep(self, key, caption, original, fields, *, not_utf8=False):
        self.good[key] = GoodSample(caption=caption, original=original, **fields)
        self.not_utf8_captions += not_utf8

    def skip(self, reason):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def source(self, path):
        return Source(path, self.good, self.skipped, self.not_utf8_captions)


def _tar_cases(rng, palette, good_per_shard, shards):
    """Per shard, a list of samples: (members {extension: bytes}, outcome) where
    outcome is (caption, GoodSample fields, not_utf8) or a skip reason."""
    cases = [[] for _ in range(shards)]

    def good(shard, kind, caption=None, *, caption_member="txt", not_utf8=False):
        extension, encoded, fields = _good_image(kind, rng, palette)
        text = f"photo {len(cases[shard])} of a {kind} patch"
        raw, text = caption or (text.encode(), text)
        members = {extension: encoded}
        if caption_member == "txt":
            members["txt"] = raw
        else:  # img2dataset's metadata, caption as a JSON string
            members["json"] = json.dumps({"caption": raw.decode("utf-8"), "url": "x"}).encode()
        cases[shard].append((members, (text, encoded, fields, not_utf8)))

    def bad(shard, members, reason):
        cases[shard].append((members, reason))

    for shard in range(shards):
        for _ in range(good_per_shard):
            good(shard, "plain")
    awkward = [lambda s, kind=kind: good(s, kind) for kind in _AWKWARD_GOOD_IMAGES]
    awkward += [
        lambda s: good(s, "plain", _CP1252_CAPTION, not_utf8=True),
        lambda s: good(s, "plain", _WHITESPACE_CAPTION),
        lambda s: good(s, "plain", _UTF8_CAPTION, caption_member="json"),
        lambda s: good(s, "plain", caption_member="json"),
        # .txt wins over the .json caption
        lambda s: cases[s].append(_caption_members_case(
            rng, palette, {"json": b'{"caption": "from the json"}', "txt": b"from the txt"},
            "from the txt")),
        # A lone surrogate escaped in the JSON cannot be stored as UTF-8: it becomes "?".
        lambda s: cases[s].append(_caption_members_case(
            rng, palette, {"json": b'{"caption": "broken \\ud800 escape"}'},
            "broken ? escape")),
    ]
    awkward += [lambda s, kind=kind: bad(s, dict([_bad_image(kind, rng), ("txt", b"a caption")]),
                                         _BAD_IMAGE_REASONS[kind]) for kind in _BAD_IMAGE_REASONS]
    awkward += [
        lambda s: bad(s, {"jpg": _good_image("plain", rng, palette)[1]}, decode.MISSING_CAPTION),
        lambda s: bad(s, {"jpg": _good_image("plain", rng, palette)[1],
                          "json": b'{"caption": null, "url": "x"}'}, decode.MISSING_CAPTION),
        lambda s: bad(s, {"jpg": _good_image("plain", rng, palette)[1], "txt": b" \n\t "},
                      decode.EMPTY_CAPTION),
        lambda s: bad(s, {"txt": b"a caption whose image failed to download"},
                      decode.MISSING_IMAGE),
    ]
    for index, add_case in enumerate(awkward):
        add_case(index % shards)
    for shard_cases in cases:
        order = rng.permutation(len(shard_cases))
        shard_cases[:] = [shard_cases[i] for i in order]
    return cases


def _caption_members_case(rng, palette, caption_members, caption):
    """A plain good image with these caption members, stored with `caption`."""
    extension, encoded, fields = _good_image("plain", rng, palette)
    return {**caption_members, extension: encoded}, (caption, encoded, fields, False)


def _write_shards(root, rng, palette, *, good_per_shard, shards):
    expected = _Expected()
    for shard, shard_cases in enumerate(_tar_cases(rng, palette, good_per_shard, shards)):
        shard_name = f"{shard:05d}.tar"
        with tarfile.open(os.path.join(root, "shards", shard_name), "w") as tar:
            for index, (members, outcome) in enumerate(shard_cases):
                key = f"{shard:05d}{index:04d}"  # img2dataset's key layout
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                if isinstance(outcome, str):
                    expected.skip(outcome)
                else:
                    caption, encoded, fields, not_utf8 = outcome
                    expected.keep(f"{shard_name}/{key}", caption, encoded, fields,
                                  not_utf8=not_utf8)
    return expected.source(os.path.join(root, "shards", "*.tar"))


# ---------------------------------------------------------------- CSV and TSV


def _write_image_file(root, name, encoded):
    with open(os.path.join(root, "images", name), "wb") as file:
        file.write(encoded)
    return os.path.join("images", name)


def _csv_rows(root, rng, palette, expected, file_name):
    """Rows (filepath, title) of captions.csv, recording what each must give."""
    rows = []

    def good(kind, caption, name, *, absolute=False, not_utf8=False):
        extension, encoded, fields = _good_image(kind, rng, palette)
        path = _write_image_file(root, f"{name}.{extension}", encoded)
        raw, text = caption
        expected.keep(f"{file_name}/{len(rows)}", text, encoded, fields, not_utf8=not_utf8)
        rows.append([os.path.join(root, path) if absolute else path, raw])

    def bad(path, caption, reason):
        expected.skip(reason)
        rows.append([path, caption] if caption is not None else [path])

    good("plain", (b"a plain jpeg, with a comma", "a plain jpeg, with a comma"), "plain")
    good("png", (b'a "quoted"\nmulti-line caption', 'a "quoted" multi-line caption'), "png")
    good("webp", (b"a webp image", "a webp image"), "webp")
    good("plain", _CP1252_CAPTION, "cp1252", not_utf8=True)
    good("plain", (b"given by absolute path", "given by absolute path"), "absolute",
         absolute=True)
    bad("images/not_downloaded.jpg", b"an image that was never downloaded",
        decode.MISSING_IMAGE)
    bad("", b"a row without an image path", decode.MISSING_IMAGE)
    bad(_write_image_file(root, "empty.jpg", b""), b"a zero-byte file", decode.EMPTY_IMAGE)
    bad(_write_image_file(root, "truncated.jpg", _bad_image("truncated_jpeg", rng)[1]),
        b"a truncated file", decode.CORRUPT_IMAGE)
    bad(_write_image_file(root, "no_caption.jpg", _good_image("plain", rng, palette)[1]),
        b"", decode.EMPTY_CAPTION)
    bad(_write_image_file(root, "short_row.jpg", _good_image("plain", rng, palette)[1]),
        None, decode.MISSING_CAPTION)
    return ["filepath", "title"], rows


def _tsv_rows(root, rng, palette, expected, file_name):
    """Rows of captions.tsv: other column order and an extra column."""
    rows = []
    for index in range(2):
        extension, encoded, fields = _good_image("plain", rng, palette)
        path = _write_image_file(root, f"tsv_{index}.{extension}", encoded)
        caption = f"tsv photo {index}, with a comma"
        expected.keep(f"{file_name}/{len(rows)}", caption, encoded, fields)
        rows.append([caption.encode(), "cc-by", path])
    expected.skip(decode.MISSING_IMAGE)
    rows.append([b"its image is missing", "cc-by", "images/tsv_missing.jpg"])
    return ["title", "license", "filepath"], rows


def _write_table(root, rng, palette, file_name, make_rows):
    """Writes a CSV (.csv) or TSV (.tsv) file of make_rows' rows -> its Source.
    Caption bytes are written as they are, UTF-8 or not."""
    expected = _Expected()
    header, rows = make_rows(root, rng, palette, expected, file_name)
    text = io.StringIO(newline="")
    writer = csv.writer(text, delimiter="\t" if file_name.endswith(".tsv") else ",")
    writer.writerow(header)
    for row in rows:
        writer.writerow([field.decode("utf-8", "surrogateescape") if isinstance(field, bytes)
                         else field for field in row])
    path = os.path.join(root, file_name)
    with open(path, "wb") as file:
        file.write(text.getvalue().encode("utf-8", "surrogateescape"))
    return expected.source(path)
