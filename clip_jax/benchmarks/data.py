"""Input throughput of webdataset shards through clip_jax's input against an
OpenCLIP-style reader (clip_jax/data/throughput.py does the work)."""

import json

from clip_jax import config_files
from clip_jax.data import throughput

def run_data(args):
    if not args.source and not args.synthetic:
        raise SystemExit("data: give --source 'shards/*.tar' or --synthetic N")
    rows = throughput.data_benchmark(args.source, config_files.load("tiny"),
                                     synthetic=args.synthetic,
                                     image_size=args.image_size, batch_size=args.batch_size,
                                     batches=args.batches,
                                     workers=[int(n) for n in args.workers.split(",") if n != "0"],
                                     reference=not args.no_reference, source_side=args.source_side,
                                     beam_workers=[int(n) for n in args.beam_workers.split(",") if n])
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
            continue
        consumer = row.get("consumer_cpu_us_per_sample")
        print(f"{row['pipeline']:<28} {row['workers']:>2} workers {row['samples_per_sec']:>8,.0f} "
              f"samples/s ({row['samples_per_sec_per_core']:,.0f} per core, {row['cores']} cores)"
              + (f", training process {consumer:.1f} us CPU per sample" if consumer else ""),
              flush=True)
