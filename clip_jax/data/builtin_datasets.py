"""The built-in TFDS datasets: synthetic_shapes and synthetic_shapes_alt_text
(drawn and captioned by `synthetic_shapes`), prepared on first use. Importing
this module registers them with TFDS."""

import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

from clip_jax.data.synthetic_shapes import (
    CLASS_NAMES, COLOURS, IMAGE_SIZE, SEED, SHAPES, TEST_EXAMPLES, TRAIN_EXAMPLES,
    alt_text_caption, draw_example)


def _png(image):
    """uint8 [H, W, 3] -> PNG bytes. ~3x faster than TFDS's encoder here: the
    noise leaves deflate no long matches, so Huffman-only coding (filter "none")
    compresses nearly as well and skips the match search."""
    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB
            + chunk(b"IDAT", deflate.compress(rows.tobytes()) + deflate.flush())
            + chunk(b"IEND", b""))


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes with captions. Example i of a split is drawn from its own
    seed [SEED, split_id, i], so the data does not depend on generation order.
    `test` comes from another seed stream than `train` and has one object per
    image (train: a second, smaller object 30% of the time), so its label is
    unambiguous."""

    # 1.1.0 has the same examples; training prepares it as ArrayRecord (random
    # access), and a new version keeps older TFRecord copies from being picked up.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "8 colours x 6 shapes, 64 px, captions from 12 templates.",
                     "1.1.0": "Same examples, prepared as ArrayRecord by clip_jax."}
    # Split sizes; tests shrink them (e.g. with monkeypatch.setattr on the class).
    train_examples = TRAIN_EXAMPLES
    test_examples = TEST_EXAMPLES

    captions_description = "captions"

    # TFDS's own lines speak of downloading and of unknown sizes; nothing is downloaded here.
    def _log_download_bytes(self):
        print(f"preparing the built-in dataset {self.name} ({self.train_examples:,} + "
              f"{self.test_examples:,} images, drawn here, once) in {self.data_dir}", flush=True)

    def _log_download_done(self):
        print(f"{self.name} ready in {self.data_dir}", flush=True)

    def _info(self):
        info = self.dataset_info_from_configs(
            description=(f"Procedurally drawn coloured shapes with {self.captions_description}: "
                         f"{len(COLOURS)} colours x {len(SHAPES)} shapes = {len(CLASS_NAMES)} "
                         "classes (label: '<colour> <shape>' of the main object), for CLIP "
                         "training and zero-shot evaluation."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                             encoding_format="png"),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            supervised_keys=None,
        )
        # Never in TFDS's GCS bucket, and asking makes an empty temporary
        # directory that TFDS never removes: one per builder made before the
        # dataset is prepared (DatasetInfo.initialize_from_bucket).
        info.initialize_from_bucket = lambda: None
        return info

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples(0, self.train_examples, second_object_prob=0.3),
            "test": self._generate_examples(1, self.test_examples, second_object_prob=0.0),
        }

    def _generate_examples(self, split_id, count, second_object_prob):
        for index in range(count):
            rng = np.random.default_rng([SEED, split_id, index])
            example = draw_example(rng, IMAGE_SIZE, second_object_prob)
            yield index, dict(example, image=_png(example["image"]))


class SyntheticShapesAltText(SyntheticShapes):
    """synthetic_shapes with alt-text captions: the same images and labels (the
    same seeds), each caption passed through `alt_text_caption` with its own seed
    [SEED, split_id, i, 1], so it is still deterministic and order-free."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "synthetic_shapes 1.1.0's examples, captions as noisy alt-text."}
    captions_description = ("alt-text-like captions (boilerplate around the description, "
                            "some captions uninformative)")

    def _generate_examples(self, split_id, count, second_object_prob):
        for index, example in super()._generate_examples(split_id, count, second_object_prob):
            rng = np.random.default_rng([SEED, split_id, index, 1])
            yield index, dict(example, caption=alt_text_caption(example["caption"], rng))
