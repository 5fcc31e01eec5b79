"""The reference input for `benchmark data`: OpenCLIP's webdataset recipe.

Per sample, as OpenCLIP's `get_wds_dataset` + `image_transform` do: stream the
tar shards split over DataLoader workers, decode with PIL to RGB ("pilrgb"),
torchvision-style RandomResizedCrop(scale=(0.9, 1.0)) (crop, then bicubic
resize), ToTensor + Normalize with CLIP's mean/std, tokenize with OpenCLIP's
SimpleTokenizer; the DataLoader batches. Written out here because torchvision
does not import beside the CPU torch build; tar members are read with our own
reader (`sources.read_samples`), which does what webdataset's tar expander does.
"""

import io
import itertools

import numpy as np
import torch
from PIL import Image

from clip_jax import references
from clip_jax.data import augment, decode, sampling, sources
from clip_jax.image_ops import CLIP_MEAN, CLIP_STD


class WebDatasetStream(torch.utils.data.IterableDataset):
    """(normalised float32 [3, S, S] tensor, int64 [77] tokens) per sample, epoch
    after epoch over each worker's shards (as a training run streams them), so a
    benchmark may time more batches than one pass holds."""

    def __init__(self, paths, image_size, seed=0):
        super().__init__()
        self.paths, self.image_size, self.seed = list(paths), image_size, seed

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        _, open_clip_tokenizer, _ = references.open_clip_modules()
        tokenize = open_clip_tokenizer.SimpleTokenizer()
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        paths = self.paths[worker_id::workers]
        if not paths:  # more workers than shards: this one has none
            return
        samples = (sample for _ in itertools.count() for path in paths
                   for sample in sources.read_samples(path, image_column="", caption_column=""))
        for index, sample in enumerate(s for s in samples if not isinstance(s, decode.Skipped)):
            image = Image.open(io.BytesIO(sample.image)).convert("RGB")
            draws = sampling.uniforms(self.seed, [index], augment.CROP_DRAWS)[0]
            box = augment.crop_box(image.width, image.height, draws, (0.9, 1.0))
            image = image.crop(box).resize((self.image_size, self.image_size),
                                           Image.Resampling.BICUBIC)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
            caption = sample.caption
            caption = caption.decode("utf-8") if isinstance(caption, bytes) else caption
            yield (pixels - mean) / std, tokenize([caption])[0]
