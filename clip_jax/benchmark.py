r"""Benchmarks (not tests): figures for the README, printed as a table or JSON lines.

Memory and compile benchmarks only compile (nothing is allocated or run; XLA's
analysis is read). Per-device memory (temp + argument + output bytes) of the sharded contrastive
loss and its gradient w.r.t. the embeddings, per loss and global batch, on 8
simulated CPU devices (data=8); --train-step adds the `tiny` preset's full step:

  python -m clip_jax.benchmark memory [--json] [--train-step] [--batches 1024,4096,16384,32768]

Lower and compile time of a preset's full train step on one device, with and
without scanned layers:

  python -m clip_jax.benchmark compile [--variant ViT-L-14]

Tokenizer throughput, clip_jax.tokenize against OpenCLIP's SimpleTokenizer on
the same captions (`--no-reference` when OpenCLIP is not installed):

  python -m clip_jax.benchmark tokenizer [--texts 50000] [--json]

Input throughput (decode + augment + tokenize + batch at 224 px) of webdataset
shards, against an OpenCLIP-style webdataset reader (see clip_jax/data/throughput.py):

  python -m clip_jax.benchmark data --source 'shards/*.tar' [--no-reference] [--json]
  python -m clip_jax.benchmark data --synthetic 6000   # writes photo-like JPEG shards first

Retrieval ranking (both directions, Recall@10 top-k) of random unit embeddings,
COCO-sized by default (5,000 images x 5 captions), on 8 simulated devices: bytes
per device against the full similarity matrix, and wall time:

  python -m clip_jax.benchmark retrieval [--images 5000] [--chunk-size 4096] [--json]

Training speed of a preset on random uint8 images and random tokens: compile
time, median step time, samples/s, model FLOPs per step (clip_jax/flops.py)
against XLA's count, achieved FLOP/s and MFU against the device's peak dense
bf16 FLOP/s, and peak device memory. On CPU it runs on one device unless
--devices says otherwise (the 8 simulated devices share the same cores):

  python -m clip_jax.benchmark train --config ViT-B-32 --batch-size 256 \
      [--steps 10] [--warmup 2] [--dtype bfloat16] [--devices N] [--set model.remat=full] [--json]

--config also takes the trainer's form (configs/clip.py:ViT-B-32, any config
file), and --config.model.remat=full the trainer's overrides.

With `--reference open_clip` the same architecture, global batch, precision and
AdamW settings then train in OpenCLIP (PyTorch, CPU) in the same process for the
same number of steps, and the ratio of samples/s is printed (ViT towers only).

Capacity plan of a run before renting its chips (clip_jax/capacity.py): the
train step compiled for --devices simulated devices on --mesh, per device:
parameter, optimizer, temporary and total bytes, model FLOPs, bytes moved per
collective kind against the FSDP / data-parallel ideal, and which accelerators'
memory it fits; --largest-batch also compiles at twice the per-device batch and
extrapolates the largest per-device batch each accelerator holds:

  python -m clip_jax.benchmark plan --config configs/clip.py:ViT-L-14 --devices 64 \
      --mesh fsdp=64 --batch-size 32768 --dtype bfloat16 [--set model.remat=full] \
      [--largest-batch] [--json]
"""

import sys

from clip_jax import cpu_devices


def _devices_wanted(argv):
    """Simulated devices this command needs: 8, or more for a larger --devices."""
    for index, argument in enumerate(argv):
        value = (argument.partition("=")[2] if argument.startswith("--devices=")
                 else argv[index + 1] if argument == "--devices" and index + 1 < len(argv)
                 else None)
        if value is not None and value.isdigit():
            return max(8, int(value))
    return 8


# Simulated devices must be requested before JAX starts its backend.
cpu_devices.request(_devices_wanted(sys.argv[1:]))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clip_jax import capacity, config_files, flops, losses, overrides, sharding  # noqa: E402
from clip_jax import tokenizer as tokenizer_lib  # noqa: E402
from clip_jax.config_checks import check_config  # noqa: E402
from clip_jax.train_step import setup_training  # noqa: E402
from clip_jax.data import throughput  # noqa: E402

# Benchmark name -> contrastive_loss arguments. The chunked losses hold
# [B_local, chunk_size] logits at a time (linear in B at a fixed device count);
# the plain softmax [B_local, B_global] and the plain sigmoid ring
# [B_local, B_local] (both quadratic), shown for contrast.
LOSS_SETTINGS = {
    "softmax": dict(kind="softmax", chunk_size=0),
    "softmax_chunked": dict(kind="softmax", chunk_size=512),
    "sigmoid": dict(kind="sigmoid", chunk_size=0),
    "sigmoid_chunked": dict(kind="sigmoid", chunk_size=128),
}
DEFAULT_BATCHES = (1024, 4096, 16384, 32768)


def data_parallel_mesh(num_devices):
    """A mesh with the batch split num_devices ways (data=num_devices)."""
    return sharding.make_mesh({"data": num_devices, "fsdp": 1, "tensor": 1},
                              jax.devices()[:num_devices])


def loss_memory(loss, global_batch, num_devices=8, embed_dim=512, chunk_size=None):
    """Per-device bytes of the loss and its gradient w.r.t. both embeddings
    [global_batch, embed_dim], batch sharded over num_devices; compiled, not run.
    chunk_size, if given, replaces the chunked losses' chunk (the others have none)."""
    settings = dict(LOSS_SETTINGS[loss])
    if chunk_size is not None and settings["chunk_size"]:
        settings["chunk_size"] = chunk_size
    mesh = data_parallel_mesh(num_devices)
    loss_fn = losses.contrastive_loss(mesh, sharding.BATCH_AXES, **settings)

    def loss_and_grads(image, text, scale, bias):
        return jax.value_and_grad(lambda i, t: loss_fn(i, t, scale, bias)["loss"],
                                  argnums=(0, 1))(image, text)

    embeddings = jax.ShapeDtypeStruct((global_batch, embed_dim), jnp.float32,
                                      sharding=sharding.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    compiled = jax.jit(loss_and_grads).lower(embeddings, embeddings, scalar, scalar).compile()
    return {"part": "loss", "loss": loss, "global_batch": global_batch, "devices": num_devices,
            "embed_dim": embed_dim, "chunk_size": settings["chunk_size"],
            **capacity.memory_bytes(compiled)}


def _mib(n):
    return f"{n / 2**20:10.2f}"


def measure_all(measure, batches, as_json):
    """[measure(loss, batch) for every loss and batch], each with its growth
    normalised to a 4x larger batch (~4: linear, ~16: quadratic); JSON lines
    are printed as they come."""
    rows = []
    for loss in LOSS_SETTINGS:
        previous = None
        for batch in batches:
            row = measure(loss, batch)
            row["growth_per_4x_batch"] = None if previous is None else round(
                (row["bytes_per_device"] / previous["bytes_per_device"])
                ** (math.log(4) / math.log(batch / previous["global_batch"])), 2)
            previous = row
            rows.append(row)
            if as_json:
                print(json.dumps(row), flush=True)
    return rows


def print_table(title, rows):
    print(title)
    print(f"{'loss':<16} {'global_batch':>12} {'temp':>10} {'argument':>10} {'output':>10} "
          f"{'total':>10} {'growth per 4x B':>16}")
    for row in rows:
        growth = row["growth_per_4x_batch"]
        print(f"{row['loss']:<16} {row['global_batch']:>12} {_mib(row['temp'])} "
              f"{_mib(row['argument'])} {_mib(row['output'])} {_mib(row['bytes_per_device'])} "
              f"{'' if growth is None else f'{growth:.2f}':>16}", flush=True)


def run_memory(batches, as_json, train_step):
    """Measures the loss part (and optionally the tiny train step) at every batch."""
    rows = measure_all(loss_memory, batches, as_json)
    chunks = ", ".join(f"{name}: chunk_size={settings['chunk_size']}"
                       for name, settings in LOSS_SETTINGS.items() if settings["chunk_size"])
    if not as_json:
        print_table(f"Loss + gradient w.r.t. both embeddings [B, {rows[0]['embed_dim']}] float32, "
                    f"per device, data={rows[0]['devices']}, MiB ({chunks}):", rows)
    if train_step:
        rows = measure_all(train_step_memory, batches, as_json)
        if not as_json:
            print_table(f"Full train step of the `tiny` preset, per device, "
                        f"data={rows[0]['devices']}, MiB:", rows)


def compiled_flops(compiled):
    """XLA's count of the FLOPs of a compiled executable (per device)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # one entry per computation in older JAX versions
        analysis = analysis[0]
    return float(analysis["flops"])


def train_step_memory(loss, global_batch, num_devices=8):
    """Per-device bytes of the `tiny` preset's full train step (data=num_devices)."""
    settings = LOSS_SETTINGS[loss]
    config = config_files.load("tiny")
    with config.unlocked():
        config.batch_size = global_batch
        config.mesh.update(data=num_devices, fsdp=1, tensor=1)
        config.loss.update(settings)
        if settings["kind"] == "sigmoid":
            config.model.logit_bias_init = -10.0
    step, state, batch, _ = capacity.abstract_train_step(config, jax.devices()[:num_devices])
    compiled = step.lower(state, batch).compile()
    return {"part": "train_step_tiny", "loss": loss, "global_batch": global_batch,
            "devices": num_devices, "chunk_size": settings["chunk_size"],
            **capacity.memory_bytes(compiled)}


def train_step_compile_times(variant, scan_layers, batch_size=8):
    """{lower_s, compile_s} of the variant's full train step on one device."""
    config = config_files.load(variant)
    with config.unlocked():
        config.model.scan_layers = scan_layers
        config.mesh.update(data=1, fsdp=1, tensor=1)
        config.batch_size = batch_size
    step, state, batch, _ = capacity.abstract_train_step(config, jax.devices()[:1])
    # Process CPU time as well as wall time: on a shared machine the wall time
    # also counts other processes' load.
    started, started_cpu = time.perf_counter(), time.process_time()
    lowered = step.lower(state, batch)
    lowered_at, lowered_cpu = time.perf_counter(), time.process_time()
    lowered.compile()
    compiled_at, compiled_cpu = time.perf_counter(), time.process_time()
    return {"part": "train_step", "variant": variant, "scan_layers": scan_layers,
            "batch_size": batch_size, "lower_s": round(lowered_at - started, 2),
            "compile_s": round(compiled_at - lowered_at, 2),
            "lower_cpu_s": round(lowered_cpu - started_cpu, 2),
            "compile_cpu_s": round(compiled_cpu - lowered_cpu, 2)}


def run_compile(variant, as_json):
    """Times the variant's train step compile without, then with, scan_layers."""
    for scan_layers in (False, True):
        row = train_step_compile_times(variant, scan_layers)
        if as_json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{variant} train step, 1 device, batch {row['batch_size']}, "
                  f"scan_layers={scan_layers!s:<5}: lower {row['lower_s']:6.1f} s "
                  f"({row['lower_cpu_s']:.1f} s CPU), compile {row['compile_s']:6.1f} s "
                  f"({row['compile_cpu_s']:.1f} s CPU)", flush=True)


# ---------------------------------------------------------------- tokenizer


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


def run_data(args):
    if not args.source and not args.synthetic:
        raise SystemExit("data: give --source 'shards/*.tar' or --synthetic N")
    rows = throughput.data_benchmark(args.source, config_files.load("tiny"),
                                     synthetic=args.synthetic,
                                     image_size=args.image_size, batch_size=args.batch_size,
                                     batches=args.batches, workers=args.workers or None,
                                     reference=not args.no_reference)
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['pipeline']:<28} {row['samples_per_sec']:>8,.0f} samples/s "
                  f"({row['samples_per_sec_per_core']:,.0f} per core, {row['cores']} cores)",
                  flush=True)
    if len(rows) == 3 and not args.json:
        print(f"clip_jax / reference: {rows[1]['samples_per_sec'] / rows[2]['samples_per_sec']:.2f}x")


def retrieval_benchmark(images=5000, captions_per_image=5, embed_dim=512, chunk_size=4096,
                        num_devices=8, repeats=3):
    """Per-device bytes (compiled) and wall time of ranking images x captions both ways."""
    from clip_jax.evals import ranking  # noqa: PLC0415
    mesh = data_parallel_mesh(num_devices)
    rng = np.random.default_rng(0)
    unit = lambda rows: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(  # noqa: E731
        rng.normal(size=(rows, embed_dim)).astype(np.float32))
    image_embeddings = jax.device_put(unit(images), sharding.batch_sharding(mesh))
    text_embeddings = jax.device_put(unit(images * captions_per_image),
                                     sharding.batch_sharding(mesh))
    directions = {"image_to_text": (image_embeddings, text_embeddings),
                  "text_to_image": (text_embeddings, image_embeddings)}
    rows = []
    for direction, (queries, gallery) in directions.items():
        valid = np.ones(gallery.shape[0], bool)
        rank = ranking.sharded_top_k_function(mesh, 10, chunk_size)
        compiled = rank.lower(queries, gallery, valid).compile()
        jax.block_until_ready(rank(queries, gallery, valid))  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(rank(queries, gallery, valid))
            seconds.append(time.perf_counter() - start)
        rows.append({"direction": direction, "queries": queries.shape[0],
                     "gallery": gallery.shape[0], "embed_dim": embed_dim,
                     "chunk_size": chunk_size, "devices": num_devices,
                     "full_matrix_bytes": 4 * queries.shape[0] * gallery.shape[0],
                     "median_seconds": float(np.median(seconds)), **capacity.memory_bytes(compiled)})
    return rows


def run_retrieval(args):
    rows = retrieval_benchmark(args.images, args.captions_per_image, args.embed_dim,
                               args.chunk_size)
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['direction']:<14} {row['queries']:>7,} x {row['gallery']:>7,}: "
                  f"{row['bytes_per_device'] / 2**20:8.1f} MiB per device (full matrix "
                  f"{row['full_matrix_bytes'] / 2**20:,.1f} MiB), {row['median_seconds']:.2f} s",
                  flush=True)


# ---------------------------------------------------------------- train step speed

# Peak dense bf16 FLOP/s of one device (a TPU chip, a GPU) by a lower-case part of
# jax's device_kind, most specific first (v5e reports "TPU v5 lite", v6e "TPU v6 lite").
PEAK_BF16_FLOPS = (
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu v4", 275e12),
    ("a100", 312e12), ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12),
)


def peak_flops_per_device(device_kind):
    """The device's peak dense bf16 FLOP/s, or None when unknown (CPUs)."""
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def load_config(spec):
    """--config: a configs/clip.py variant (`ViT-B-32`) or, as the trainer takes
    it, a config file with its argument (`configs/clip.py:ViT-B-32`)."""
    return config_files.load(spec)


def train_config(variant, batch_size, dtype="float32", sets=()):
    """The config named by `variant` (see load_config) with the given global batch,
    compute dtype and --set overrides."""
    config = load_config(variant)
    with config.unlocked():
        config.batch_size = batch_size
        config.model.dtype = dtype
        overrides.apply(config, sets)
    return config


def random_batch(config, mesh, seed=0):
    """Random uint8 images [B, S, S, 3] and tokens [B, L] in the batch sharding."""
    rng = np.random.default_rng(seed)
    size, text = config.model.image.image_size, config.model.text
    batch = {"images": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
             "tokens": rng.integers(1, text.vocab_size, (config.batch_size, text.context_length),
                                    dtype=np.int32)}
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def train_benchmark(config, num_devices=1, steps=10, warmup=2):
    """Speed of config's train step on the first num_devices devices: compile
    time, median step time after `warmup` steps, samples/s, model and XLA FLOPs,
    achieved FLOP/s, MFU (None without a known peak) and peak memory."""
    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise ValueError(f"--devices {num_devices}: only {len(devices)} devices are visible")
    training = setup_training(config, devices)
    state = training.init_state(jax.random.key(config.seed))
    batch = random_batch(config, training.mesh)

    started = time.perf_counter()
    compiled = training.step.lower(state, batch).compile()
    compile_time = time.perf_counter() - started
    progress = functools.partial(print, file=sys.stderr, flush=True)  # stdout stays JSON
    progress(f"compiled in {compile_time:.1f} s")

    seconds = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        state, metrics = compiled(state, batch)  # the old state is donated
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - started
        progress(f"step {i + 1}/{warmup + steps}{' (warm-up)' if i < warmup else ''}: "
                 f"{elapsed:.2f} s")
        if i >= warmup:
            seconds.append(elapsed)
    step_time = float(np.median(seconds))

    locked = tuple(tower for tower in ("image", "text") if config[f"lock_{tower}"])
    model_flops = flops.train_step_flops(config.model, config.batch_size, locked,
                                         objective=config.objective)["train_step"]
    achieved = model_flops / step_time
    kind = devices[0].device_kind
    peak = peak_flops_per_device(kind)
    # XLA's count also holds elementwise work, the optimizer, and any recomputation
    # (remat, GradCache): hardware FLOPs. It is of the partitioned per-device program.
    xla_flops = compiled_flops(compiled) * num_devices
    stats = devices[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak_memory, memory_source = stats["peak_bytes_in_use"], "memory_stats"
    else:
        peak_memory, memory_source = capacity.memory_bytes(compiled)["bytes_per_device"], "memory_analysis"
    return {"benchmark": "train", "device_kind": kind, "devices": num_devices,
            "global_batch": config.batch_size, "dtype": config.model.dtype,
            "steps": steps, "warmup": warmup, "compile_time_s": compile_time,
            "step_time_s": step_time, "samples_per_sec": config.batch_size / step_time,
            "samples_per_sec_per_device": config.batch_size / step_time / num_devices,
            "flops_per_step": model_flops, "xla_flops_per_step": xla_flops,
            "achieved_flops_per_sec": achieved,
            "achieved_flops_per_sec_per_device": achieved / num_devices,
            "peak_flops_per_device": peak,
            "mfu": None if peak is None else achieved / (peak * num_devices),
            "peak_memory_bytes": int(peak_memory), "peak_memory_source": memory_source,
            "loss": float(metrics["loss"])}


def reference_benchmark(config, steps, warmup):
    """OpenCLIP's speed on the same architecture, batch, precision and optimizer,
    in a child process: this one's XLA thread pools stay alive and would compete
    with PyTorch's threads for the cores."""
    command = [sys.executable, "-m", "clip_jax.references", "--train-step-times",
               config.to_json(), str(steps), str(warmup)]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"the OpenCLIP reference failed: {child.stderr.strip().splitlines()[-1]}")
    seconds = json.loads(child.stdout.strip().splitlines()[-1])
    step_time = float(np.median(seconds))
    return {"reference": "open_clip", "reference_step_time_s": step_time,
            "reference_samples_per_sec": config.batch_size / step_time}


def run_train(args):
    try:
        config = train_config(args.config, args.batch_size, args.dtype, args.set)
        check_config(config, args.devices)
    except (ValueError, FileNotFoundError) as error:  # a bad name, file, key or value: one line
        raise SystemExit(f"config error: {error}") from None
    row = {"config": args.config, **train_benchmark(config, args.devices, args.steps, args.warmup)}
    if args.reference:
        row.update(reference_benchmark(config, args.steps, args.warmup))
        row["speedup"] = row["samples_per_sec"] / row["reference_samples_per_sec"]
    if args.json:
        print(json.dumps(row), flush=True)
        return
    mfu = ("n/a (no known peak for this device)" if row["mfu"] is None
           else f"{100 * row['mfu']:.1f}% of {row['peak_flops_per_device']:.3g} FLOP/s (bf16) "
                f"per device")
    print(f"{args.config} train step: {row['devices']} x {row['device_kind']}, global batch "
          f"{row['global_batch']}, {row['dtype']}\n"
          f"  compile            {row['compile_time_s']:10.1f} s\n"
          f"  step time          {row['step_time_s']:10.3f} s  (median of {row['steps']}, "
          f"after {row['warmup']} warm-up)\n"
          f"  samples/s          {row['samples_per_sec']:10.1f}    "
          f"({row['samples_per_sec_per_device']:.1f} per device)\n"
          f"  model FLOPs/step   {row['flops_per_step']:10.3e}    "
          f"(XLA's count: {row['xla_flops_per_step']:.3e})\n"
          f"  achieved           {row['achieved_flops_per_sec']:10.3e} FLOP/s  "
          f"({row['achieved_flops_per_sec_per_device']:.3e} per device)\n"
          f"  MFU                {mfu}\n"
          f"  peak memory        {row['peak_memory_bytes'] / 2**30:10.2f} GiB  "
          f"(per device, {row['peak_memory_source']})\n"
          f"  final loss         {row['loss']:10.4f}", flush=True)
    if args.reference:
        print(f"  OpenCLIP step time {row['reference_step_time_s']:10.3f} s  (same steps, "
              f"batch, precision, AdamW; PyTorch, another process)\n"
              f"  OpenCLIP samples/s {row['reference_samples_per_sec']:10.1f}\n"
              f"  clip_jax / OpenCLIP {row['speedup']:9.2f}x samples/s", flush=True)


def parse_mesh(text):
    """--mesh 'fsdp=64' or 'data=4,fsdp=16' -> config.mesh values (axes not named: 1)."""
    sizes = dict.fromkeys(sharding.MESH_AXES, 1)
    for part in filter(None, text.split(",")):
        axis, equals, size = part.partition("=")
        if not equals or axis not in sizes or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE,... with axes "
                             f"{', '.join(sharding.MESH_AXES)}, e.g. data=4,fsdp=16")
        sizes[axis] = int(size)
    return sizes


def _gib(n):
    return f"{n / 2**30:.2f} GiB"


def run_plan(args):
    try:
        config = load_config(args.config)
        with config.unlocked():
            if args.batch_size:
                config.batch_size = args.batch_size
            if args.dtype:
                config.model.dtype = args.dtype
            if args.mesh:
                config.mesh.update(parse_mesh(args.mesh))
            overrides.apply(config, args.set)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"config error: {error}") from None
    devices = jax.devices()[:args.devices]
    try:
        row = {"config": args.config, **capacity.plan(config, devices)}
        if args.largest_batch:
            doubled = config.copy_and_resolve_references()
            doubled.batch_size = 2 * config.batch_size
            row["largest_batch_per_device"] = capacity.largest_batch_per_device(
                [row, capacity.plan(doubled, devices)])
    except ValueError as error:  # config_checks.ConfigError: one line
        raise SystemExit(f"config error: {error}") from None
    if args.json:
        print(json.dumps(row), flush=True)
        return
    mesh = " ".join(f"{axis}={size}" for axis, size in row["mesh"].items())
    collectives = ", ".join(f"{kind} {_gib(n)}" for kind, n in row["collective_bytes"].items() if n)
    ideal = row["ideal_collective_bytes"]
    ratio = f", {row['collective_bytes_total'] / ideal:.2f}x" if ideal else ""
    fits = ", ".join(f"{name} {'yes' if fit else 'no'}" for name, fit in row["fits"].items())
    print(f"{args.config} train step plan: {row['devices']} devices, mesh {mesh}, global batch "
          f"{row['global_batch']} ({row['batch_per_device']} per device), {row['dtype']}, "
          f"remat {row['remat']}\n"
          f"  parameters       {_gib(row['param_bytes']):>12} per device\n"
          f"  optimizer state  {_gib(row['optimizer_bytes']):>12}\n"
          f"  arguments        {_gib(row['argument_bytes']):>12}  (state and batch)\n"
          f"  temporaries      {_gib(row['temp_bytes']):>12}\n"
          f"  total            {_gib(row['bytes_per_device']):>12}\n"
          f"  model FLOPs      {row['model_flops_per_device']:12.3e}  per device per step\n"
          f"  collectives      {_gib(row['collective_bytes_total']):>12}  sent per device per "
          f"step ({collectives}; FSDP/data-parallel ideal {_gib(ideal)}{ratio})\n"
          f"  fits             {fits}", flush=True)
    for collective in row["largest_collectives"]:
        print(f"    {collective['kind']:<18} {_gib(collective['bytes']):>12}  "
              f"{collective['executions']:>4} x over {collective['group_size']} devices  "
              f"{collective['op'][-70:]}")
    if args.largest_batch:
        print("  largest batch per device: " + ", ".join(
            f"{name} {'-' if b is None else b}"
            for name, b in row["largest_batch_per_device"].items()), flush=True)


def config_overrides_as_sets(argv):
    """The trainer's `--config.key=value` (or `--config.key value`) -> `--set key=value`."""
    converted, rest = [], list(argv)
    while rest:
        argument = rest.pop(0)
        if argument.startswith("--config."):
            key, equals, value = argument.removeprefix("--config.").partition("=")
            if not equals:
                if not rest:
                    raise SystemExit(f"{argument}: expected a value")
                value = rest.pop(0)
            converted += ["--set", f"{key}={value}"]
        else:
            converted.append(argument)
    return converted


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m clip_jax.benchmark",
                                     description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    memory = commands.add_parser("memory", help="per-device bytes of the loss vs global batch")
    memory.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                        help="comma-separated global batch sizes")
    memory.add_argument("--json", action="store_true", help="one JSON line per measurement")
    memory.add_argument("--train-step", action="store_true",
                        help="also measure the tiny preset's full train step")
    compile_parser = commands.add_parser("compile", help="train-step compile time, scan on/off")
    compile_parser.add_argument("--variant", default="ViT-L-14", help="configs/clip.py variant")
    compile_parser.add_argument("--json", action="store_true", help="one JSON line per measurement")
    tokenizer = commands.add_parser("tokenizer", help="tokenizer texts/s vs OpenCLIP's")
    tokenizer.add_argument("--texts", type=int, default=50_000, help="captions timed")
    tokenizer.add_argument("--no-reference", action="store_true", help="skip OpenCLIP")
    tokenizer.add_argument("--json", action="store_true", help="one JSON line per tokenizer")
    data = commands.add_parser("data", help="input samples/s vs an OpenCLIP-style reader")
    data.add_argument("--source", default="", help="webdataset shards (glob)")
    data.add_argument("--synthetic", type=int, default=0,
                      help="write this many photo-like JPEGs into shards and read those")
    data.add_argument("--image-size", type=int, default=224)
    data.add_argument("--batch-size", type=int, default=256)
    data.add_argument("--batches", type=int, default=20, help="batches timed per pipeline")
    data.add_argument("--workers", type=int, default=0, help="threads/processes; 0: CPU count")
    data.add_argument("--no-reference", action="store_true", help="skip the OpenCLIP-style reader")
    data.add_argument("--json", action="store_true", help="one JSON line per pipeline")
    retrieval = commands.add_parser("retrieval", help="sharded retrieval ranking: memory, time")
    retrieval.add_argument("--images", type=int, default=5000)
    retrieval.add_argument("--captions-per-image", type=int, default=5)
    retrieval.add_argument("--embed-dim", type=int, default=512)
    retrieval.add_argument("--chunk-size", type=int, default=4096)
    retrieval.add_argument("--json", action="store_true", help="one JSON line per direction")
    train = commands.add_parser("train", help="train-step speed, FLOPs and MFU of a preset")
    train.add_argument("--config", default="tiny",
                       help="configs/clip.py variant (ViT-B-32) or FILE.py:ARG as the trainer "
                            "takes it (configs/clip.py:ViT-B-32)")
    train.add_argument("--batch-size", type=int, default=32, help="global batch")
    train.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    train.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="compute dtype of the towers (config.model.dtype)")
    train.add_argument("--devices", type=int, default=1,
                       help="devices of the mesh (the first N of jax.devices())")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="config override, e.g. model.remat=full (repeatable); the "
                            "trainer's form --config.model.remat=full works too")
    train.add_argument("--reference", choices=("open_clip",),
                       help="also train the same model in OpenCLIP and print the ratio")
    train.add_argument("--json", action="store_true", help="one JSON line")
    plan = commands.add_parser("plan", help="per-device memory, FLOPs and collective bytes of "
                                            "a train step on a simulated mesh")
    plan.add_argument("--config", default="tiny",
                      help="configs/clip.py variant or FILE.py:ARG, as for train")
    plan.add_argument("--devices", type=int, default=8, help="simulated devices of the mesh")
    plan.add_argument("--mesh", default="", help="AXIS=SIZE,... e.g. data=4,fsdp=16 (unnamed "
                                                 "axes 1; default: the config's mesh)")
    plan.add_argument("--batch-size", type=int, default=0, help="global batch (default: config's)")
    plan.add_argument("--dtype", choices=("float32", "bfloat16"), default="",
                      help="compute dtype (default: config's)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. model.remat=full (repeatable)")
    plan.add_argument("--largest-batch", action="store_true",
                      help="also compile at twice the batch and extrapolate the largest "
                           "per-device batch per accelerator")
    plan.add_argument("--json", action="store_true", help="one JSON line")
    args = parser.parse_args(config_overrides_as_sets(sys.argv[1:] if argv is None else argv))
    if args.command == "memory":
        run_memory([int(b) for b in args.batches.split(",")], args.json, args.train_step)
    elif args.command == "compile":
        run_compile(args.variant, args.json)
    elif args.command == "data":
        run_data(args)
    elif args.command == "retrieval":
        run_retrieval(args)
    elif args.command == "train":
        run_train(args)
    elif args.command == "plan":
        run_plan(args)
    else:
        run_tokenizer(args.texts, not args.no_reference, args.json)


if __name__ == "__main__":
    main()
