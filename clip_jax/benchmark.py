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
  python -m clip_jax.benchmark data --synthetic 6000 [--source-side 256] [--workers 1,2]
      # writes photo-like JPEG shards first; per worker count: samples/s and the
      # training process's own CPU time per sample

Retrieval ranking (both directions, Recall@10 top-k) of random unit embeddings,
COCO-sized by default (5,000 images x 5 captions), on 8 simulated devices: bytes
per device against the full similarity matrix, and wall time:

  python -m clip_jax.benchmark retrieval [--images 5000] [--chunk-size 4096] [--json]

Training speed of a preset on random uint8 images and random tokens: compile
time, mean step time of back-to-back steps, samples/s, model FLOPs per step (clip_jax/flops.py)
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

The device check for a lent GPU or TPU host (clip_jax/benchmarks/accelerator.py):
ViT-B/16, B/32 and L/14 in bf16 per attention implementation and backward form,
at the largest per-device batch that fits, with where each step's time goes
(clip_jax/op_profile.py); --tiny runs it on CPU:

  python -m clip_jax.benchmark accelerator [--tiny] [--output accelerator.json] [--trace-dir D]

Capacity plan of a run before renting its chips (clip_jax/capacity.py): the
train step compiled for --devices simulated devices on --mesh, per device:
parameter, optimizer, temporary and total bytes, model FLOPs, bytes moved per
collective kind against the FSDP / data-parallel ideal, and which accelerators'
memory it fits; --largest-batch also compiles at twice the per-device batch and
extrapolates the largest per-device batch each accelerator holds:

  python -m clip_jax.benchmark plan --config configs/clip.py:ViT-L-14 --devices 64 \
      --mesh fsdp=64 --batch-size 32768 --dtype bfloat16 [--set model.remat=full] \
      [--largest-batch] [--json]

With --tpu TOPOLOGY (and --slices N) the TPU compiler (libtpu, on this
machine) compiles the step for that slice instead: the chips' own buffers,
layouts and collectives, and whether the step fits their HBM:

  python -m clip_jax.benchmark plan --config configs/clip.py:ViT-B-16 --tpu v5p:2x2x2 \
      --mesh fsdp=8 --batch-size 2048 --dtype bfloat16

With --gpu CHIP (h100 or h200) XLA's GPU compiler (JAX's CUDA plugin, no GPU
needed) compiles it for --devices GPUs of that chip, 8 to a host:

  python -m clip_jax.benchmark plan --config configs/clip.py:ViT-B-16 --gpu h100 \
      --devices 8 --mesh fsdp=8 --batch-size 2048 --dtype bfloat16 --largest-batch
"""

from clip_jax import quiet_tensorflow  # noqa: F401  (before TensorFlow loads)
import argparse
import os
import sys

import jax

from clip_jax import cpu_devices, spawn
from clip_jax.benchmarks import accelerator as accelerator_bench
from clip_jax.benchmarks import compile_time as compile_bench
from clip_jax.benchmarks import data as data_bench
from clip_jax.benchmarks import memory as memory_bench
from clip_jax.benchmarks import plan as plan_bench
from clip_jax.benchmarks import retrieval as retrieval_bench
from clip_jax.benchmarks import tokenizer as tokenizer_bench
from clip_jax.benchmarks import train as train_bench


def _devices_wanted(argv):
    """Simulated devices this command needs: 8, or more for a larger --devices."""
    for index, argument in enumerate(argv):
        value = (argument.partition("=")[2] if argument.startswith("--devices=")
                 else argv[index + 1] if argument == "--devices" and index + 1 < len(argv)
                 else None)
        if value is not None and value.isdigit():
            return max(8, int(value))
    return 8


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
    memory.add_argument("--batches", default=",".join(map(str, memory_bench.DEFAULT_BATCHES)),
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
    data.add_argument("--workers", default="0",
                      help="worker processes, comma-separated counts to compare (1,2); 0: CPU count")
    data.add_argument("--beam-workers", default="",
                      help="also prepare with the Beam DirectRunner at these worker counts (1,2)")
    data.add_argument("--source-side", type=int, default=None,
                      help="--synthetic images' longer side (256: img2dataset's default)")
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
    train.add_argument("--steps", type=int, default=10, help="timed steps, run back to back (mean reported)")
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
    train.add_argument("--profile-steps", type=int, default=0,
                       help="also trace this many steps and print where their time goes")
    train.add_argument("--trace", default=None,
                       help="with --profile-steps: keep the trace here (.xplane.pb, for xprof)")
    train.add_argument("--json", action="store_true", help="one JSON line")
    plan = commands.add_parser("plan", help="per-device memory, FLOPs and collective bytes of "
                                            "a train step on a simulated mesh")
    plan.add_argument("--config", default="tiny",
                      help="configs/clip.py variant or FILE.py:ARG, as for train")
    plan.add_argument("--devices", type=int, default=8, help="simulated devices of the mesh")
    plan.add_argument("--tpu", default="", metavar="TOPOLOGY",
                      help="compile with the TPU compiler for this slice instead (libtpu's "
                           "form: v5e:4x4, v5p:2x2x2, v6e:2x2; needs libtpu); --devices unused")
    plan.add_argument("--gpu", default="", metavar="CHIP", choices=("", "h100", "h200"),
                      help="compile with XLA's GPU compiler for --devices GPUs of this chip "
                           "instead (h100, h200; 8 to a host; needs the CUDA plugin)")
    plan.add_argument("--slices", type=int, default=1,
                      help="with --tpu: this many slices, joined over DCN (mesh.dcn_data)")
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
    accelerator = commands.add_parser(
        "accelerator", help="the device check: ViT-B/32, B/16, L/14 bf16 train steps per "
                            "attention and backward form, MFU, peak memory")
    accelerator.add_argument("--tiny", action="store_true",
                             help="the tiny model for a few steps (CPU: that the check runs)")
    accelerator.add_argument("--output", default="accelerator.json", help="JSON written here")
    accelerator.add_argument("--budget-s", type=float, default=420,
                             help="start no measurement after this many seconds")
    accelerator.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    accelerator.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    accelerator.add_argument("--profile-steps", type=int, default=3,
                             help="steps traced per measurement for the time breakdown (0: none)")
    accelerator.add_argument("--row-timeout-s", type=float, default=600,
                             help="a measurement's process is killed after this many seconds")
    accelerator.add_argument("--trace-dir", default=None,
                             help="keep each measurement's trace here (.xplane.pb, for xprof)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(config_overrides_as_sets(argv))
    # Before any benchmark starts JAX's backend (importing JAX does not).
    cpu_devices.request(_devices_wanted(argv))
    if (getattr(args, "tpu", "") or getattr(args, "gpu", "")) and not os.environ.get(
            "JAX_PLATFORMS"):  # compile-only devices; JAX has read its environment already
        jax.config.update("jax_platforms", "cpu")
    if args.command == "memory":
        memory_bench.run_memory([int(b) for b in args.batches.split(",")], args.json, args.train_step)
    elif args.command == "compile":
        compile_bench.run_compile(args.variant, args.json)
    elif args.command == "data":
        data_bench.run_data(args)
    elif args.command == "retrieval":
        retrieval_bench.run_retrieval(args)
    elif args.command == "train":
        train_bench.run_train(args)
    elif args.command == "plan":
        plan_bench.run_plan(args)
    elif args.command == "accelerator":
        accelerator_bench.run_accelerator(args)
    else:
        tokenizer_bench.run_tokenizer(args.texts, not args.no_reference, args.json)


if __name__ == "__main__":
    spawn.detach_main_module()  # the data benchmark's input workers need none of this
    main()
