"""Input throughput: clip_jax's training input against an OpenCLIP-style reader.

`python -m clip_jax.benchmark data --source 'DIR/*.tar'` times decode + augment +
tokenize + batch of webdataset shards at 224 px:

- clip_jax: the shards prepared once into a TFDS ArrayRecord dataset (originals
  kept byte for byte), read by `pipeline.TrainInput` (uint8 out; normalisation
  happens on the device);
- reference: OpenCLIP's webdataset recipe with a torch DataLoader
  (`clip_jax/data/openclip_reader.py`), normalised float32 out.

`--synthetic N` first writes N photo-sized JPEGs into shards to read.
"""

import glob
import io
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from clip_jax import tokenizer as tokenizer_lib


def write_photo_shards(directory, count, *, per_shard=500, seed=0, captions=None,
                       longer_side=None):
    """Writes `count` photo-like JPEGs (smooth colour fields plus sensor-like
    noise, 480-1024 px wide, or with the longer side `longer_side` as
    img2dataset writes them, quality 90) with captions into webdataset tar
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
                if longer_side:
                    scale = longer_side / max(width, height)
                    width, height = max(1, round(width * scale)), max(1, round(height * scale))
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


def clip_jax_rates(config, batches, warmup=2):
    """(samples/s, the training process's own CPU microseconds per sample) of
    TrainInput for `config` over `batches` batches after `warmup`. The CPU time
    is this process's, all threads (not the worker processes'): what caps one
    host's input however many cores decode for it."""
    from clip_jax.data import pipeline  # noqa: PLC0415  (TFDS import only when timed)
    with pipeline.TrainInput(config) as stream:
        for _ in range(warmup):
            next(stream)
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(stream)
        samples = batches * config.batch_size
        return (samples / (time.perf_counter() - start),
                (time.process_time() - start_cpu) / samples * 1e6)


def reference_samples_per_sec(paths, image_size, batch_size, batches, workers, warmup=2, seed=0):
    """Samples/s of the OpenCLIP-style reader (torch DataLoader with `workers`
    processes, spawned: forking a process that runs JAX threads can deadlock)."""
    import torch  # noqa: PLC0415

    from clip_jax.data import openclip_reader  # noqa: PLC0415
    loader = torch.utils.data.DataLoader(
        openclip_reader.WebDatasetStream(paths, image_size, seed), batch_size=batch_size,
        num_workers=workers, prefetch_factor=2, multiprocessing_context="spawn")
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - start)


def caption_corpus(count, seed=0):
    """Alt-text-like captions: 4-24 words drawn Zipf-like from the BPE vocabulary's
    whole words of 2+ letters (merge rank stands in for frequency), capitals, digits and
    punctuation; 5% carry non-ASCII words (accents, CJK, emoji)."""
    tokenizer = tokenizer_lib.default_tokenizer()
    # Merged symbols (ids from 512 on) come in merge order, a proxy for frequency.
    words = [s[:-4] for s in tokenizer._decoder[512:] if s.endswith("</w>") and s[:-4].isascii()
             and s[:-4].isalpha() and len(s) > 5]
    foreign = ["café", "naïve", "日本の", "straße", "🐱", "über", "señor", "ñandú", "北京", "😀"]
    rng = np.random.default_rng(seed)
    ranks = (rng.zipf(1.2, size=(count, 24)) - 1) % len(words)  # the heavy tail wraps
    lengths = rng.integers(4, 25, size=count)
    captions = []
    for i in range(count):
        caption = [words[r] for r in ranks[i, :lengths[i]]]
        caption[0] = caption[0].capitalize()
        if rng.random() < 0.3:
            caption.insert(rng.integers(len(caption)), str(rng.integers(1, 3000)))
        if rng.random() < 0.05:
            caption.insert(rng.integers(len(caption)), foreign[rng.integers(len(foreign))])
        captions.append(" ".join(caption) + rng.choice([".", "", "!", " - stock photo"]))
    return captions


def data_benchmark(source, config, *, synthetic=0, image_size=224, batch_size=256, batches=20,
                   workers=(), reference=True, source_side=None, beam_workers=()):
    """Rows of {"pipeline", "workers", "samples_per_sec", "samples_per_sec_per_core",
    "consumer_cpu_us_per_sample", ...}, one per pipeline and worker count in
    `workers` (default: the CPU count), and one per Beam DirectRunner
    preparation with each worker count in `beam_workers`; `config` is a training config whose
    input is measured (its data keys are pointed at the scratch dataset);
    scratch files (shards, prepared dataset) are removed afterwards."""
    workers = tuple(workers) or (os.cpu_count(),)
    scratch = tempfile.mkdtemp(prefix="clip_jax_data_benchmark_")
    try:
        return _measure(source, config, scratch, synthetic, image_size, batch_size, batches,
                        workers, reference, source_side, beam_workers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure(source, config, scratch, synthetic, image_size, batch_size, batches, workers,
             reference, source_side, beam_workers):
    from clip_jax.data import prepare  # noqa: PLC0415
    cores = os.cpu_count()
    if synthetic:
        paths = write_photo_shards(os.path.join(scratch, "shards"), synthetic,
                                   captions=caption_corpus(synthetic), longer_side=source_side)
    else:
        paths = sorted(glob.glob(source))
    if not paths:
        raise SystemExit(f"--source {source!r}: no files match")
    start = time.perf_counter()
    report = prepare.prepare({"train": paths}, "benchmark_shards", os.path.join(scratch, "tfds"),
                             max_side=100_000, workers=max(workers))
    prepare_seconds = time.perf_counter() - start
    written = report["splits"]["train"]["written"]
    with config.unlocked():
        config.batch_size = batch_size
        config.model.image.image_size = image_size
        config.model.text.context_length = 77
        config.data.update(train="benchmark_shards:train", data_dir=os.path.join(scratch, "tfds"),
                           prefetch=2)
    rows = [{"pipeline": "prepare (once)", "samples_per_sec": written / prepare_seconds,
             "samples": written, "workers": max(workers)}]
    for count in beam_workers:
        start = time.perf_counter()
        beam_report = prepare.prepare(
            {"train": paths}, "benchmark_shards", os.path.join(scratch, f"tfds_beam_{count}"),
            max_side=100_000, beam_options=f"runner=DirectRunner,direct_num_workers={count},"
                                           "direct_running_mode=multi_processing")
        rows.append({"pipeline": "prepare, Beam DirectRunner", "workers": count,
                     "samples": beam_report["splits"]["train"]["written"],
                     "samples_per_sec": beam_report["splits"]["train"]["written"]
                     / (time.perf_counter() - start)})
    for count in workers:
        with config.unlocked():
            config.data.workers = count
        rate, consumer_cpu = clip_jax_rates(config, batches)
        rows.append({"pipeline": "clip_jax", "workers": count, "samples_per_sec": rate,
                     "consumer_cpu_us_per_sample": consumer_cpu})
        if reference:
            rows.append({"pipeline": "open_clip-style webdataset", "workers": count,
                         "samples_per_sec": reference_samples_per_sec(
                             paths, image_size, batch_size, batches, count)})
    for row in rows:
        row.update(samples_per_sec_per_core=row["samples_per_sec"] / cores, cores=cores,
                   image_size=image_size, batch_size=batch_size, source_side=source_side)
    return rows
