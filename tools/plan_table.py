"""Writes docs/capacity_table.md: the capacity plan of the large CLIP models at
the paper's batch of 32,768 on pod-sized meshes, one `benchmark plan` per row;
with --tpu, docs/capacity_tpu_table.md: ViT-B/16 and ViT-L/14 compiled by the
TPU compiler for 4-chip v5e and v6e slices, per attention kernel and remat
(scanned blocks), beside the simulated-device plan of the same step.

    python tools/plan_table.py [--out docs/capacity_table.md] [--models ViT-B-16,...]
    python tools/plan_table.py --tpu [--out docs/capacity_tpu_table.md]
    python tools/plan_table.py --gpu [--out docs/capacity_gpu_table.md]

With --gpu, docs/capacity_gpu_table.md: the device check's models and
variants (clip_jax/benchmarks/accelerator.py) compiled by XLA's GPU compiler
for one H100 (and the default variant for one H200): whether each compiles,
its memory at a per-device batch, the largest per-device batch that fits, and
the roofline's bound on its step time and MFU (clip_jax/roofline.py).

Each row runs `python -m clip_jax.benchmark plan ... --largest-batch --json` in
its own process (the simulated device count is fixed when JAX starts), so a
row that fails to compile is reported and the rest still run.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

MODELS = ("ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14")
# (devices, mesh, remat): FSDP alone and with 4-way data parallelism, on a
# 64-chip and a 256-chip slice; no remat only where it has a chance to fit.
MESHES = ((64, "fsdp=64", "none"), (64, "fsdp=64", "full"), (64, "data=4,fsdp=16", "full"),
          (256, "fsdp=256", "full"), (256, "data=4,fsdp=64", "full"))
GLOBAL_BATCH = 32768
CHIPS = ("TPU v5e", "TPU v4", "TPU v5p", "A100 80GB", "H100", "H200")

# --tpu: (model, per-chip batch, attention, remat) on each 4-chip slice, fsdp=4,
# the blocks in one scan (what `auto` ran on TPUs when the table was made; it
# unrolls them now without remat); each also compiled at twice the batch to
# extrapolate the largest that fits.
TPU_SLICES = ("v5e:2x2", "v6e:2x2")
TPU_ROWS = (("ViT-B-16", 32, "xla", "none"), ("ViT-B-16", 32, "splash", "none"),
            ("ViT-B-16", 128, "xla", "full"), ("ViT-L-14", 8, "xla", "none"),
            ("ViT-L-14", 8, "splash", "none"), ("ViT-L-14", 32, "xla", "full"))

# --gpu: (model, per-device batch) on one GPU, for each (attention, lean_backward,
# layer_loop, remat) of the device check on a GPU (the first is the platform's
# default, also compiled for an H200); each also at twice the batch.
GPU_MODELS = (("ViT-B-32", 256), ("ViT-B-16", 128), ("ViT-L-14", 32))
GPU_VARIANTS = (("cudnn", "off", "unrolled", "none"), ("cudnn", "on", "unrolled", "none"),
                ("xla", "off", "unrolled", "none"), ("xla", "on", "unrolled", "none"),
                ("cudnn", "off", "scan", "none"), ("cudnn", "on", "scan", "none"),
                ("cudnn", "on", "unrolled", "dots_saveable"), ("cudnn", "on", "scan", "dots_saveable"))


def plan_row(model, devices, mesh, remat, batch=GLOBAL_BATCH, extra=()):
    command = [sys.executable, "-m", "clip_jax.benchmark", "plan", "--config", model,
               "--devices", str(devices), "--mesh", mesh, "--batch-size", str(batch),
               "--dtype", "bfloat16", "--set", f"model.remat={remat}", "--largest-batch",
               "--json", *extra]
    started = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
        # A width the fsdp axis does not divide (ViT-g's 1408, bigG's 1664 over 256):
        # the error names the factor to move to the data axis; plan that mesh instead.
        factor = re.search(r"move a factor of (\d+)", last)
        if factor and mesh == f"fsdp={devices}":
            moved = int(factor.group(1))
            return plan_row(model, devices, f"data={moved},fsdp={devices // moved}", remat,
                            batch, extra)
        return {"config": model, "devices": devices, "mesh_text": mesh, "remat": remat,
                "error": last, "seconds": seconds}
    row = json.loads(child.stdout.strip().splitlines()[-1])
    return {**row, "mesh_text": mesh, "seconds": seconds}


def gib(n):
    return f"{n / 2**30:.1f}"


def markdown(rows, commit, machine):
    lines = [
        f"| model | devices | mesh | remat | state MiB | temporaries GiB | total GiB | "
        f"collectives GiB/step (x ideal) | TFLOP/step | largest batch/device: "
        f"{' / '.join(CHIPS)} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['config']} | {row['devices']} | {row['mesh_text']} | {row['remat']} |"
        if "error" in row:
            lines.append(f"{head} not compiled: {row['error'][:120]} | | | | | |")
            continue
        ideal = row["ideal_collective_bytes"]
        largest = " / ".join("-" if row["largest_batch_per_device"][chip] is None
                             else str(row["largest_batch_per_device"][chip]) for chip in CHIPS)
        lines.append(
            f"{head} {(row['param_bytes'] + row['optimizer_bytes']) / 2**20:,.0f} | "
            f"{gib(row['temp_bytes'])} | {gib(row['bytes_per_device'])} | "
            f"{gib(row['collective_bytes_total'])} ({row['collective_bytes_total'] / ideal:.2f}x) | "
            f"{row['model_flops_per_device'] / 1e12:.0f} | {largest} |")
    return "\n".join(lines) + f"\n\nCompiled at commit {commit} on {machine}.\n"


def tpu_rows():
    """TPU_ROWS on each of TPU_SLICES, each with the simulated-device plan of the
    same step (compiled once per row, for both slices)."""
    rows = []
    for model, per_chip, attention, remat in TPU_ROWS:
        setting = ("--set", f"model.attention={attention}", "--set", "model.layer_loop=scan")
        simulated = plan_row(model, 4, "fsdp=4", remat, 4 * per_chip, setting)
        for topology in TPU_SLICES:
            row = plan_row(model, 4, "fsdp=4", remat, 4 * per_chip,
                           (*setting, "--tpu", topology))
            rows.append({**row, "topology": topology, "attention": attention, "remat": remat,
                         "per_chip": per_chip, "simulated_temp_bytes": simulated.get("temp_bytes")})
            print(json.dumps({k: rows[-1].get(k) for k in (
                "config", "topology", "attention", "remat", "per_chip", "bytes_per_device",
                "simulated_temp_bytes", "does_not_fit", "error", "seconds")}), flush=True)
    return rows


def tpu_markdown(rows, commit, machine):
    lines = [
        "| model | slice | attention | remat | batch/chip | state MiB | temporaries GiB "
        "(simulated CPU devices) | total GiB | collectives GiB/step (x ideal) | "
        "largest batch/chip |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = (f"| {row['config']} | {row['topology']} | {row['attention']} | {row['remat']} | "
                f"{row['per_chip']} |")
        if "error" in row or "does_not_fit" in row:
            reason = row.get("error") or "does not fit: " + row["does_not_fit"]
            lines.append(f"{head} {reason[:160]} | | | | |")
            continue
        simulated = row["simulated_temp_bytes"]
        ideal = row["ideal_collective_bytes"]
        chip, largest = next(iter(row["largest_batch_per_device"].items()))
        largest = (f"under {2 * row['per_chip']}" if "largest_batch_note" in row
                   else "-" if largest is None else str(largest))
        lines.append(
            f"{head} {(row['param_bytes'] + row['optimizer_bytes']) / 2**20:,.0f} | "
            f"{gib(row['temp_bytes'])} ({'-' if simulated is None else gib(simulated)}) | "
            f"{gib(row['bytes_per_device'])} | "
            f"{gib(row['collective_bytes_total'])} ({row['collective_bytes_total'] / ideal:.2f}x) | "
            f"{chip} {largest} |")
    return "\n".join(lines) + (f"\n\nCompiled at commit {commit} on {machine}, by libtpu "
                               f"{rows[0].get('libtpu')} (TPU rows).\n")


def gpu_rows():
    """GPU_VARIANTS of GPU_MODELS on one H100, the default variant on one H200,
    as the device check runs them (stacked blocks in a lax.scan)."""
    rows = []
    for model, per_device in GPU_MODELS:
        for index, (attention, lean, loop, remat) in enumerate(GPU_VARIANTS):
            for chip in ("h100", "h200") if index == 0 else ("h100",):
                settings = ("--set", f"model.attention={attention}", "--set",
                            f"model.lean_backward={lean}", "--set", "model.scan_layers=True",
                            "--set", f"model.layer_loop={loop}", "--gpu", chip)
                row = plan_row(model, 1, "fsdp=1", remat, per_device, settings)
                rows.append({**row, "chip": chip, "attention": attention, "lean_backward": lean,
                             "layer_loop": loop, "remat": remat, "per_chip": per_device})
                print(json.dumps({k: rows[-1].get(k) for k in (
                    "config", "chip", "attention", "lean_backward", "layer_loop", "remat",
                    "per_chip",
                    "bytes_per_device", "largest_batch_per_device", "roofline", "error",
                    "seconds")}), flush=True)
    return rows


def gpu_markdown(rows, commit, machine):
    lines = [
        "| model | GPU | attention | lean backward | layer loop | remat | batch/GPU | "
        "temporaries GiB | total GiB | largest batch/GPU | roofline: step >= ms (matmul / "
        "attention / other) | MFU <= |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = (f"| {row['config']} | {row['chip'].upper()} | {row['attention']} | "
                f"{row['lean_backward']} | {row['layer_loop']} | {row['remat']} | "
                f"{row['per_chip']} |")
        if "error" in row:
            lines.append(f"{head} not compiled: {row['error'][:160]} | | | | |")
            continue
        largest = next(iter(row["largest_batch_per_device"].values()))
        bound = row["roofline"]
        kinds = " / ".join(f"{1e3 * s:.1f}" for s in bound["seconds_by_kind"].values())
        lines.append(f"{head} {gib(row['temp_bytes'])} | {gib(row['bytes_per_device'])} | "
                     f"{'-' if largest is None else largest} | "
                     f"{1e3 * bound['step_seconds_at_least']:.1f} ({kinds}) | "
                     f"{100 * bound['mfu_at_most']:.0f}% |")
    return "\n".join(lines) + (f"\n\nCompiled at commit {commit} on {machine}, by "
                               f"{rows[0].get('cuda_plugin')}.\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--tpu", action="store_true",
                        help="the TPU compiler's table (TPU_ROWS on TPU_SLICES); needs libtpu")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU compiler's table (GPU_MODELS x GPU_VARIANTS); needs "
                             "JAX's CUDA plugin")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--from-jsonl", default="",
                        help="rewrite the table from an earlier run's JSONL (no compiling)")
    parser.add_argument("--commit", default="", help="with --from-jsonl: the run's commit")
    args = parser.parse_args()
    target = "_tpu" if args.tpu else "_gpu" if args.gpu else ""
    args.out = args.out or f"docs/capacity{target}_table.md"
    render = tpu_markdown if args.tpu else gpu_markdown if args.gpu else markdown
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True,
                                           check=True).stdout.strip()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
               f"{platform.python_version()}"
               + ("" if args.tpu or args.gpu else ", simulated CPU devices"))
    if args.from_jsonl:
        with open(args.from_jsonl) as raw:
            rows = [json.loads(line) for line in raw]
        with open(args.out, "w") as table:
            table.write(render(rows, commit, machine))
        return
    rows = tpu_rows() if args.tpu else gpu_rows() if args.gpu else []
    for model in [] if args.tpu or args.gpu else args.models.split(","):
        for devices, mesh, remat in MESHES:
            rows.append(plan_row(model, devices, mesh, remat))
            print(json.dumps({k: rows[-1].get(k) for k in ("config", "devices", "mesh_text",
                                                            "remat", "bytes_per_device",
                                                            "error", "seconds")}), flush=True)
    with open(args.out, "w") as table:
        table.write(render(rows, commit, machine))
    with open(os.path.splitext(args.out)[0] + ".jsonl", "w") as raw:
        raw.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
