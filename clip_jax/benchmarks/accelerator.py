"""The device check: train-step speed, MFU, where the step's time goes, and peak
memory of the zoo's ViT-B/16, ViT-B/32 and ViT-L/14 in bfloat16 on one
accelerator host, for each attention implementation the platform offers and
with the hand-written backward passes off and on.

  python -m clip_jax.benchmark accelerator [--output accelerator.json] [--budget-s 420] \
      [--trace-dir traces/]
  python -m clip_jax.benchmark accelerator --tiny   # CPU: the tiny model, a few steps

Each model's first variant (the platform's defaults) takes the largest
per-device batch of its short list that fits; its other variants run at that
batch, so that their rows compare like for like (a variant that does not fit
there goes down the list, and its row says so). ViT-B/16, the model the MFU goal
is set on, goes first. Batches that do not fit (XLA's analysis over the
device's memory, or its resource-exhausted error) are skipped; a variant that
fails otherwise (a kernel the platform lacks) is recorded with its error and
the check goes on. Each measurement also traces a few steps (op_profile) and
reports how much of the step the matmul and attention kernels take, how close
to peak they run, and how long the device idles.

The JSON document is rewritten after every row, so a check stopped early keeps
what it measured; no measurement starts after --budget-s seconds.
"""

import json
import os
import sys
import time
import traceback

import jax

from clip_jax.benchmarks import train as train_bench
from clip_jax.config_checks import check_config

# The per-device batches tried for each model, largest first. The capacity
# planner (`benchmark plan --devices 1 --largest-batch`, bf16, autodiff backward)
# puts the largest that fit an 80 GB H100 at about 758 (B/32), 276 (B/16) and
# 76 (L/14), and about 1.8x that on a 141 GB H200.
BATCHES_PER_DEVICE = {"ViT-B-16": (256, 128, 64), "ViT-B-32": (512, 256, 128),
                      "ViT-L-14": (128, 64, 32)}
TINY = dict(batches={"tiny": (32,)}, steps=1, warmup=0, profile_steps=1)


def attention_choices(platform):
    """The config.model.attention values worth measuring on `platform`, the one
    `auto` picks there first."""
    return {"gpu": ("cudnn", "xla"), "tpu": ("xla", "splash")}.get(platform, ("xla",))


def variants(platform):
    """(attention, lean_backward) pairs to measure, the platform's defaults first:
    lean_backward=auto is off on accelerators and on on CPUs."""
    default_lean = "on" if platform == "cpu" else "off"
    leans = (default_lean, "off" if default_lean == "on" else "on")
    return [(attention, lean) for lean in leans for attention in attention_choices(platform)]


def _out_of_memory(error):
    """Whether an exception says the step does not fit (skip the batch), not a bug."""
    text = str(error)
    return (isinstance(error, train_bench.DoesNotFit) or "RESOURCE_EXHAUSTED" in text
            or "out of memory" in text.lower())


def _one_line(error):
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:400]}"


def measure(model, attention, lean_backward, batches, steps, warmup, devices, profile_steps=0,
            trace_dir=None):
    """The train benchmark's row at the first per-device batch of `batches` that
    fits; {"skipped": why} when none does, {"error": why} when the step fails
    for another reason."""
    label = {"model": model, "attention": attention, "lean_backward": lean_backward}
    tried = []
    for per_device in batches:
        trace_path = trace_dir and os.path.join(
            trace_dir, f"{model}_{attention}_lean-{lean_backward}_{per_device}.xplane.pb")
        try:
            config = train_bench.train_config(
                model, per_device * devices, "bfloat16",
                [f"model.attention={attention}", f"model.lean_backward={lean_backward}",
                 "model.scan_layers=True"])
            check_config(config, devices)
            row = train_bench.train_benchmark(config, devices, steps, warmup, profile_steps,
                                              trace_path)
        except Exception as error:  # noqa: BLE001  (XLA and the kernels raise their own types)
            if not _out_of_memory(error):
                traceback.print_exc(file=sys.stderr)
                return {**label, "batch_per_device": per_device, "error": _one_line(error)}
            tried.append(per_device)
            continue
        return {**label, "batch_per_device": per_device, "batches_not_fitting": tried, **row}
    return {**label, "skipped": f"no per-device batch of {tried} fits"}


def _percent(fraction):
    return "" if fraction is None else f"{100 * fraction:.0f}%"


def table(rows):
    """Markdown table of the rows: speed, MFU, and from the profile the share of
    the step in matmul and attention kernels, their FLOP/s against peak, and
    the device's idle share."""
    lines = ["| model | attention | lean backward | batch / device | step s | samples/s / device "
             "| MFU | matmul + attention kernels | their FLOP/s / peak | device idle "
             "| peak GiB |", "|" + " --- |" * 11]
    for row in rows:
        head = f"| {row['model']} | {row['attention']} | {row['lean_backward']} |"
        if "skipped" in row or "error" in row:
            lines.append(f"{head} {row.get('skipped') or row['error']} |" + " |" * 7)
            continue
        profile = row.get("profile") or {}
        share = idle = None
        if "op_s_per_step" in profile:
            kinds = profile["op_s_per_step"]
            share = (kinds["matmul"] + kinds["attention"]) / profile["wall_s_per_step"]
            idle = max(0.0, 1 - profile["busy_fraction"])
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        lines.append(f"{head} {row['batch_per_device']} | {row['step_time_s']:.3f} | "
                     f"{row['samples_per_sec_per_device']:.1f} | {mfu} | {_percent(share)} | "
                     f"{_percent(profile.get('kernel_flops_fraction'))} | {_percent(idle)} | "
                     f"{row['peak_memory_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def _write(document, path):
    """Replaces `path` whole, so that a reader never sees half a document."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(document, f, indent=1)
    os.replace(partial, path)


def run_accelerator(args):
    started = time.perf_counter()
    plan = TINY if args.tiny else dict(batches=BATCHES_PER_DEVICE, steps=args.steps,
                                       warmup=args.warmup, profile_steps=args.profile_steps)
    platform = jax.default_backend()
    devices = jax.local_device_count() if platform != "cpu" else 1
    document = {"platform": platform, "device_kind": jax.devices()[0].device_kind,
                "devices": devices, "jax": jax.__version__,
                "memory_limit_bytes": (jax.devices()[0].memory_stats() or {}).get("bytes_limit"),
                "rows": [], "not_measured_within_budget": [], "seconds": 0.0}
    for model, batches in plan["batches"].items():
        for attention, lean_backward in variants(platform):
            if time.perf_counter() - started > args.budget_s:
                document["not_measured_within_budget"].append(
                    f"{model} {attention} lean={lean_backward}")
                continue
            row = measure(model, attention, lean_backward, batches, plan["steps"],
                          plan["warmup"], devices, plan["profile_steps"], args.trace_dir)
            # The model's other variants start at the batch its first one fitted.
            if "batch_per_device" in row and "error" not in row:
                batches = batches[batches.index(row["batch_per_device"]):]
            document["rows"].append(row)
            document["seconds"] = time.perf_counter() - started
            _write(document, args.output)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), file=sys.stderr,
                  flush=True)
    document["seconds"] = time.perf_counter() - started
    _write(document, args.output)
    unmeasured = document["not_measured_within_budget"]
    print(f"{document['device_kind']} x {devices}, jax {jax.__version__}, bfloat16\n"
          + table(document["rows"])
          + (f"\nnot measured within --budget-s {args.budget_s:g}: {', '.join(unmeasured)}"
             if unmeasured else "")
          + f"\nwrote {args.output}", flush=True)
    return document
