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
