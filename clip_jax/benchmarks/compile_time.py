"""Lower and compile time of a preset's full train step on one device, with
one block per layer and with stacked blocks in one lax.scan."""

import json
import time

import jax

from clip_jax import capacity, config_files

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
