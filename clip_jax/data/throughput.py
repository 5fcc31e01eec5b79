"""Input throughput: clip_jax's training input against an OpenCLIP-style reader.

`python -m clip_jax.benchmark data --source 'DIR/*.tar'` times decode + augment +
tokenize + batch of webdataset shards at 224 px:

- clip_jax: the shards prepared once into a TFDS ArrayRecord dataset (originals
  kept byte for byte), read by `pipeline.TrainInput` (uint8 out; normalisation
  happens on the device);
- reference: OpenCLIP's webdataset recipe (tar streaming per DataLoader worker,
  PIL decode to RGB, torchvision-style RandomResizedCrop(scale=(0.9, 1)) +
  bicubic resize, ToTensor + Normalize, OpenCLIP's tokenizer per sample, torch
  DataLoader batching), written out here because torchvision does not import
  beside the CPU torch build.

`--synthetic N` first writes N photo-sized JPEGs into shards to read.
"""

import glob
import io
import os
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from clip_jax.data import augment, sampling
from clip_jax.image_ops import CLIP_MEAN, CLIP_STD


def write_photo_shards(directory, count, *, per_shard=500, seed=0, captions=None):
    """Writes `count` photo-like JPEGs (smooth colour fields plus sensor-like
    noise, 480-1024 px wide, quality 90) with captions into webdataset tar
    shards DIRECTORY/%05d.tar; returns their paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for shard in range(0, count, per_shard):
        path = os.path.join(directory, f"{shard // per_shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for index in range(shard, min(count, shard + per_shard)):
                width = int(rng.integers(480, 1025))
                height = int(width * rng.choice([0.5625, 0.75, 1.0, 1.333]))
                field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
                pixels = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC),
                                    np.float32) + rng.normal(0, 6, (height, width, 1))
                buffer = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    buffer, "JPEG", quality=90)
                caption = captions[index % len(captions)] if captions else f"photo {index}"
                for name, data in ((f"{index:08d}.jpg", buffer.getvalue()),
                                   (f"{index:08d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def clip_jax_samples_per_sec(config, batches, warmup=2):
    """Samples/s of TrainInput for `config` over `batches` batches after `warmup`."""
    from clip_jax.data import pipeline  # noqa: PLC0415  (TFDS import only when timed)
    with pipeline.TrainInput(config) as stream:
        for _ in range(warmup):
            next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        return batches * config.batch_size / (time.perf_counter() - start)


def _tar_samples(paths):
    """(jpeg bytes, caption bytes) of webdataset shards, streamed member by member."""
    for path in paths:
        with tarfile.open(path, "r|*") as tar:
            current, sample = None, {}
            for member in tar:
                key, _, extension = os.path.basename(member.name).partition(".")
                if key != current:
                    if "jpg" in sample and "txt" in sample:
                        yield sample["jpg"], sample["txt"]
                    current, sample = key, {}
                sample[extension] = tar.extractfile(member).read()
            if "jpg" in sample and "txt" in sample:
                yield sample["jpg"], sample["txt"]


def _open_clip_style_dataset(paths, image_size, seed):
    """A torch IterableDataset doing OpenCLIP's per-sample webdataset work."""
    import torch  # noqa: PLC0415

    from clip_jax import references  # noqa: PLC0415
    _, open_clip_tokenizer, _ = references.open_clip_modules()
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            worker = torch.utils.data.get_worker_info()
            worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
            tokenize = open_clip_tokenizer.SimpleTokenizer()
            for index, (jpeg, caption) in enumerate(_tar_samples(paths[worker_id::workers])):
                image = Image.open(io.BytesIO(jpeg)).convert("RGB")
                draws = sampling.uniforms(seed, [index], augment.CROP_DRAWS)[0]
                box = augment.crop_box(image.width, image.height, draws, (0.9, 1.0))
                image = image.crop(box).resize((image_size, image_size),
                                               Image.Resampling.BICUBIC)
                pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
                yield (pixels - mean) / std, tokenize([caption.decode("utf-8")])[0]

    return Stream()


def reference_samples_per_sec(paths, image_size, batch_size, batches, workers, warmup=2, seed=0):
    """Samples/s of the OpenCLIP-style reader (torch DataLoader with `workers`)."""
    import torch  # noqa: PLC0415
    loader = torch.utils.data.DataLoader(
        _open_clip_style_dataset(paths, image_size, seed), batch_size=batch_size,
        num_workers=workers, persistent_workers=False, prefetch_factor=2)
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - start)


def data_benchmark(source, *, synthetic=0, image_size=224, batch_size=256, batches=20,
                   workers=None, reference=True):
    """Rows of {"pipeline", "samples_per_sec", "samples_per_sec_per_core", ...}."""
    from clip_jax.data import prepare  # noqa: PLC0415
    from configs.clip import get_config  # noqa: PLC0415
    cores = os.cpu_count()
    workers = workers or cores
    scratch = tempfile.mkdtemp(prefix="clip_jax_data_benchmark_")
    if synthetic:
        from clip_jax.benchmark import caption_corpus  # noqa: PLC0415
        source = os.path.join(write_photo_shards(os.path.join(scratch, "shards"), synthetic,
                                                 captions=caption_corpus(synthetic))[0]
                              .rsplit("/", 1)[0], "*.tar")
    paths = sorted(glob.glob(source))
    if not paths:
        raise SystemExit(f"--source {source!r}: no files match")
    start = time.perf_counter()
    report = prepare.prepare({"train": paths}, "benchmark_shards", os.path.join(scratch, "tfds"),
                             max_side=100_000, workers=workers)
    prepare_seconds = time.perf_counter() - start
    written = report["splits"]["train"]["written"] if "splits" in report else report["train"]["written"]
    config = get_config("tiny")
    with config.unlocked():
        config.batch_size = batch_size
        config.model.image.image_size = image_size
        config.model.text.context_length = 77
        config.data.update(train="benchmark_shards:train", data_dir=os.path.join(scratch, "tfds"),
                           workers=workers, prefetch=2)
    rows = [{"pipeline": "prepare (once)", "samples_per_sec": written / prepare_seconds,
             "samples": written}]
    rows.append({"pipeline": "clip_jax", "samples_per_sec": clip_jax_samples_per_sec(config, batches)})
    if reference:
        rows.append({"pipeline": "open_clip-style webdataset",
                     "samples_per_sec": reference_samples_per_sec(paths, image_size, batch_size,
                                                                  batches, workers)})
    for row in rows:
        row.update(samples_per_sec_per_core=row["samples_per_sec"] / cores, cores=cores,
                   workers=workers, image_size=image_size, batch_size=batch_size)
    return rows
