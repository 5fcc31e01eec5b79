"""Writes docs/capacity.md: the capacity plan of the large CLIP models at the
paper's batch of 32,768 on pod-sized meshes, one `benchmark plan` per row.

    python tools/plan_table.py [--out docs/capacity.md] [--models ViT-B-16,...]

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


def plan_row(model, devices, mesh, remat):
    command = [sys.executable, "-m", "clip_jax.benchmark", "plan", "--config", model,
               "--devices", str(devices), "--mesh", mesh, "--batch-size", str(GLOBAL_BATCH),
               "--dtype", "bfloat16", "--set", f"model.remat={remat}", "--largest-batch",
               "--json"]
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
            return plan_row(model, devices, f"data={moved},fsdp={devices // moved}", remat)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/capacity_table.md")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--from-jsonl", default="",
                        help="rewrite the table from an earlier run's JSONL (no compiling)")
    parser.add_argument("--commit", default="", help="with --from-jsonl: the run's commit")
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True,
                                           check=True).stdout.strip()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
               f"{platform.python_version()}, simulated CPU devices")
    if args.from_jsonl:
        with open(args.from_jsonl) as raw:
            rows = [json.loads(line) for line in raw]
        with open(args.out, "w") as table:
            table.write(markdown(rows, commit, machine))
        return
    rows = []
    for model in args.models.split(","):
        for devices, mesh, remat in MESHES:
            rows.append(plan_row(model, devices, mesh, remat))
            print(json.dumps({k: rows[-1].get(k) for k in ("config", "devices", "mesh_text",
                                                            "remat", "bytes_per_device",
                                                            "error", "seconds")}), flush=True)
    with open(args.out, "w") as table:
        table.write(markdown(rows, commit, machine))
    with open(os.path.splitext(args.out)[0] + ".jsonl", "w") as raw:
        raw.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
