"""The device check: train-step speed, MFU and peak memory of the zoo's ViT-B/32,
ViT-B/16 and ViT-L/14 in bfloat16 on one accelerator host, for each attention
implementation the platform offers and with the hand-written backward passes
on and off, at the largest per-device batch of a short list that fits.

  python -m clip_jax.benchmark accelerator [--output accelerator.json] [--budget-s 420]
  python -m clip_jax.benchmark accelerator --tiny   # CPU: the tiny model, a few steps

Writes one JSON document (the rows and what was skipped) and prints a table.
Measurements stop being started once --budget-s seconds have passed, so the
check fits a lent machine's time; the rows measured so far are kept. Batches
that do not fit (XLA's resource-exhausted error, or more than the device's
memory by XLA's own analysis) are skipped down the list.
"""

import json
import sys
import time

import jax

from clip_jax.benchmarks import train as train_bench
from clip_jax.config_checks import check_config

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
# Per-device batches tried, largest first.
BATCHES_PER_DEVICE = (512, 256, 128, 64, 32)
TINY = dict(models=("tiny",), batches=(32,), steps=1, warmup=0)


def attention_choices(platform):
    """The config.model.attention values worth measuring on `platform`."""
    return {"gpu": ("xla", "cudnn"), "tpu": ("xla", "splash")}.get(platform, ("xla",))


def _fits(error):
    """Whether an exception is a device out-of-memory (skip the batch), not a bug."""
    text = str(error)
    return not ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
                or "Out of memory" in text)


def measure(model, attention, lean_backward, batches, steps, warmup, dtype, devices):
    """The train benchmark's row at the first per-device batch of `batches` that
    fits, or ({"skipped": reason}) when none does."""
    tried = []
    for per_device in batches:
        config = train_bench.train_config(
            model, per_device * devices, dtype,
            [f"model.attention={attention}", f"model.lean_backward={lean_backward}",
             "model.scan_layers=True"])
        check_config(config, devices)
        try:
            row = train_bench.train_benchmark(config, devices, steps, warmup)
        except Exception as error:  # noqa: BLE001  (XLA raises its own error types)
            if _fits(error):
                raise
            tried.append(per_device)
            continue
        return {"model": model, "attention": attention, "lean_backward": lean_backward,
                "batch_per_device": per_device, **row}
    return {"model": model, "attention": attention, "lean_backward": lean_backward,
            "skipped": f"no per-device batch of {list(tried)} fits"}


def table(rows):
    """Markdown table of the measured rows."""
    lines = ["| model | attention | lean backward | batch / device | step s | samples/s / device "
             "| MFU | peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['attention']} | {row['lean_backward']} | "
                         f"{row['skipped']} | | | | |")
            continue
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        lines.append(f"| {row['model']} | {row['attention']} | {row['lean_backward']} | "
                     f"{row['batch_per_device']} | {row['step_time_s']:.3f} | "
                     f"{row['samples_per_sec_per_device']:.1f} | {mfu} | "
                     f"{row['peak_memory_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def run_accelerator(args):
    started = time.perf_counter()
    plan = TINY if args.tiny else dict(models=MODELS, batches=BATCHES_PER_DEVICE,
                                       steps=args.steps, warmup=args.warmup)
    platform = jax.default_backend()
    devices = jax.local_device_count() if platform != "cpu" else 1
    rows, unmeasured = [], []
    for model in plan["models"]:
        for attention in attention_choices(platform):
            for lean_backward in ("on", "off"):
                if time.perf_counter() - started > args.budget_s:
                    unmeasured.append(f"{model} {attention} lean={lean_backward}")
                    continue
                row = measure(model, attention, lean_backward, plan["batches"], plan["steps"],
                              plan["warmup"], "bfloat16", devices)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    document = {"platform": platform, "device_kind": jax.devices()[0].device_kind,
                "devices": devices, "jax": jax.__version__, "rows": rows,
                "not_measured_within_budget": unmeasured,
                "seconds": time.perf_counter() - started}
    with open(args.output, "w") as f:
        json.dump(document, f, indent=1)
    print(f"{document['device_kind']} x {devices}, jax {jax.__version__}, bfloat16\n"
          + table(rows)
          + (f"\nnot measured within --budget-s {args.budget_s:g}: {', '.join(unmeasured)}"
             if unmeasured else "")
          + f"\nwrote {args.output}", flush=True)
    return document
