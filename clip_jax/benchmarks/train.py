"""Training speed of a preset on random data: compile time, step time,
samples/s, model and XLA FLOPs, MFU against known accelerator peaks, peak
memory; optionally side by side with OpenCLIP on the same machine."""

import functools
import json
import subprocess
import sys
import time

import jax
import numpy as np

from clip_jax import (capacity, config_files, flops, huge_pages, op_profile, overrides, phases,
                      sharding)
from clip_jax.config_checks import check_config
from clip_jax.train_step import setup_training

def train_config(variant, batch_size, dtype="float32", sets=()):
    """The config named by `variant` (see load_config) with the given global batch,
    compute dtype and --set overrides."""
    config = config_files.load(variant)
    with config.unlocked():
        config.batch_size = batch_size
        config.model.dtype = dtype
        overrides.apply(config, sets)
    return config


def random_batch(config, mesh, seed=0):
    """Random uint8 images [B, S, S, 3] and tokens [B, L] in the batch sharding, of
    the first phase's sizes."""
    rng = np.random.default_rng(seed)
    model = phases.first_phase_model(config)
    size, text = model.image.image_size, model.text
    batch = {"images": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
             "tokens": rng.integers(1, text.vocab_size, (config.batch_size, text.context_length),
                                    dtype=np.int32)}
    return jax.device_put(batch, sharding.batch_sharding(mesh))


class DoesNotFit(RuntimeError):
    """The compiled step needs more memory than the device has (XLA's analysis)."""


def _device_peak_bytes(device):
    return (device.memory_stats() or {}).get("peak_bytes_in_use")


def train_benchmark(config, num_devices=1, steps=10, warmup=2, profile_steps=0, trace_path=None):
    """Speed of config's train step on the first num_devices devices: compile
    time, step time, samples/s, model and XLA FLOPs, achieved FLOP/s, MFU (None
    without a known peak) and peak memory.

    The `steps` timed steps run back to back, as training runs them (the host
    dispatches ahead of the device), and wait once at the end; the step time is
    their mean. With `profile_steps`, that many more steps are traced and
    summarised by op_profile (row["profile"]; the trace is kept at
    `trace_path`). Raises DoesNotFit before running a step that XLA's memory
    analysis puts over the device's memory."""
    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise ValueError(f"--devices {num_devices}: only {len(devices)} devices are visible")
    # The device's peak counter never resets: it is this run's only if it rises.
    peak_before = _device_peak_bytes(devices[0])
    training = setup_training(config, devices)
    state = training.init_state(jax.random.key(config.seed))
    batch = random_batch(config, training.mesh)

    started = time.perf_counter()
    compiled = training.step.lower(state, training.prepare(batch)).compile()
    compile_time = time.perf_counter() - started
    progress = functools.partial(print, file=sys.stderr, flush=True)  # stdout stays JSON
    progress(f"compiled in {compile_time:.1f} s")
    planned_bytes = capacity.memory_bytes(compiled)["bytes_per_device"]
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    if limit and planned_bytes > limit:
        raise DoesNotFit(f"the step needs {planned_bytes / 2**30:.1f} GiB per device by XLA's "
                         f"analysis; the device has {limit / 2**30:.1f} GiB")

    def run(count):
        nonlocal state
        metrics = None
        for _ in range(count):
            # A distillation teacher runs in its own program first, timed with the step.
            state, metrics = compiled(state, training.prepare(batch))  # the old state is donated
        jax.block_until_ready((state, metrics))
        return metrics

    for i in range(warmup):
        started = time.perf_counter()
        run(1)
        progress(f"warm-up step {i + 1}/{warmup}: {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    metrics = run(steps)
    step_time = (time.perf_counter() - started) / steps
    progress(f"{steps} steps: {step_time:.3f} s each")

    locked = tuple(tower for tower in ("image", "text") if config[f"lock_{tower}"])
    model_flops = flops.train_step_flops(
        phases.first_phase_model(config), config.batch_size, locked, objective=config.objective,
        teacher_config=training.teacher and training.teacher.model.config)["train_step"]
    achieved = model_flops / step_time
    kind = devices[0].device_kind
    peak = flops.peak_flops_per_device(kind)
    # XLA's count also holds elementwise work, the optimizer, and any recomputation
    # (remat, GradCache): hardware FLOPs. It is of the partitioned per-device program.
    xla_flops = capacity.compiled_flops(compiled) * num_devices
    peak_after = _device_peak_bytes(devices[0])
    if peak_after is not None and (peak_before is None or peak_after > peak_before):
        peak_memory, memory_source = peak_after, "memory_stats"
    else:
        peak_memory, memory_source = planned_bytes, "memory_analysis"
    measured = phases.first_phase_model(config)
    on_accelerator = devices[0].platform in ("gpu", "tpu")
    hlo_text = (compiled.as_text() if on_accelerator or profile_steps
                else None)  # seconds for a large model
    # What the measured step time is to be compared with: on a GPU the roofline's
    # lower bound on this very program's step, on a TPU its compiler's estimate
    # (each None on other devices).
    bound = capacity.gpu_roofline(hlo_text, devices[0], model_flops / num_devices)
    estimate = capacity.tpu_estimate(hlo_text, devices[0], model_flops / num_devices)
    row = {"benchmark": "train", "device_kind": kind, "devices": num_devices,
           "global_batch": config.batch_size, "dtype": config.model.dtype,
           "image_size": measured.image.image_size,
           "patch_dropout": measured.image.get("patch_dropout", 0.0),
           "context_length": measured.text.context_length,
           "steps": steps, "warmup": warmup, "compile_time_s": compile_time,
           "step_time_s": step_time, "samples_per_sec": config.batch_size / step_time,
           "samples_per_sec_per_device": config.batch_size / step_time / num_devices,
           "flops_per_step": model_flops, "xla_flops_per_step": xla_flops,
           "achieved_flops_per_sec": achieved,
           "achieved_flops_per_sec_per_device": achieved / num_devices,
           "peak_flops_per_device": peak,
           "mfu": None if peak is None else achieved / (peak * num_devices),
           "peak_memory_bytes": int(peak_memory), "peak_memory_source": memory_source,
           "loss": float(metrics["loss"]), "huge_pages": huge_pages.requested(),
           "roofline": bound, "tpu_estimate": estimate}
    if profile_steps:
        row["profile"] = _profile(hlo_text, run, profile_steps, trace_path,
                                  model_flops / num_devices, peak)
    return row


def _profile(hlo_text, run, steps, trace_path, model_flops_per_device, peak):
    """op_profile's summary of `steps` traced steps of the program `hlo_text`, or
    {"error": why} when the profiler fails (a missing CUPTI, say): the timing
    row stands either way."""
    try:
        with op_profile.traced(trace_path) as trace:
            started = time.perf_counter()
            run(steps)
            wall = time.perf_counter() - started
        summary = op_profile.summarize(op_profile.device_events(trace[0]), hlo_text, steps,
                                       wall, op_profile.module_name(hlo_text))
    except Exception as error:  # noqa: BLE001  (the profiler raises its own error types)
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
    summary["kernel_flops_fraction"] = op_profile.kernel_flops_fraction(
        summary, model_flops_per_device, peak)
    return summary


def reference_benchmark(config, steps, warmup):
    """OpenCLIP's speed on the same architecture, batch, precision, optimizer,
    image size, caption length and patch dropout (the first phase's), in a
    child process: this one's XLA thread pools stay alive and would compete
    with PyTorch's threads for the cores."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = phases.first_phase_model(config)
    command = [sys.executable, "-m", "clip_jax.references", "--train-step-times",
               config.to_json(), str(steps), str(warmup)]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"the OpenCLIP reference failed: {child.stderr.strip().splitlines()[-1]}")
    seconds = json.loads(child.stdout.strip().splitlines()[-1])
    step_time = float(np.mean(seconds))  # PyTorch on a CPU runs each step to its end
    return {"reference": "open_clip", "reference_step_time_s": step_time,
            "reference_samples_per_sec": config.batch_size / step_time}


def run_train(args):
    try:
        config = train_config(args.config, args.batch_size, args.dtype, args.set)
        check_config(config, args.devices)
    except (ValueError, FileNotFoundError) as error:  # a bad name, file, key or value: one line
        raise SystemExit(f"config error: {error}") from None
    row = {"config": args.config, **train_benchmark(config, args.devices, args.steps, args.warmup,
                                                    args.profile_steps, args.trace)}
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
          f"{row['global_batch']}, {row['dtype']}, {row['image_size']} px, patch dropout "
          f"{row['patch_dropout']:g}, {row['context_length']} caption tokens\n"
          f"  compile            {row['compile_time_s']:10.1f} s\n"
          f"  step time          {row['step_time_s']:10.3f} s  (mean of {row['steps']} back to "
          f"back, after {row['warmup']} warm-up)\n"
          f"  samples/s          {row['samples_per_sec']:10.1f}    "
          f"({row['samples_per_sec_per_device']:.1f} per device)\n"
          f"  model FLOPs/step   {row['flops_per_step']:10.3e}    "
          f"(XLA's count: {row['xla_flops_per_step']:.3e})\n"
          f"  achieved           {row['achieved_flops_per_sec']:10.3e} FLOP/s  "
          f"({row['achieved_flops_per_sec_per_device']:.3e} per device)\n"
          f"  MFU                {mfu}\n"
          f"  peak memory        {row['peak_memory_bytes'] / 2**30:10.2f} GiB  "
          f"(per device, {row['peak_memory_source']})\n"
          + (f"  roofline bound     {row['roofline']['step_seconds_at_least']:10.3f} s  "
             f"(this program's kernels at peak FLOP/s or memory bandwidth: MFU at most "
             f"{100 * row['roofline']['mfu_at_most']:.0f}%)\n" if row["roofline"] else "")
          + (f"  TPU compiler       {row['tpu_estimate']['step_seconds']:10.3f} s  "
             f"(its cost model's estimate of this program's step: MFU "
             f"{100 * row['tpu_estimate']['mfu']:.0f}%)\n"
             if (row["tpu_estimate"] or {}).get("step_seconds") else "")
          + f"  final loss         {row['loss']:10.4f}\n"
          f"  host pages         {'transparent huge pages' if row['huge_pages'] else '4 KiB'} "
          f"(clip_jax/huge_pages.py)", flush=True)
    if "profile" in row:
        profile = row["profile"]
        print("\n".join(f"  {line}" for line in (
            [f"profile not taken: {profile['error']}"] if "error" in profile
            else op_profile.describe(profile))), flush=True)
    if args.reference:
        print(f"  OpenCLIP step time {row['reference_step_time_s']:10.3f} s  (same steps, "
              f"batch, precision, AdamW, clipping; PyTorch, a child process with the same environment)\n"
              f"  OpenCLIP samples/s {row['reference_samples_per_sec']:10.1f}\n"
              f"  clip_jax / OpenCLIP {row['speedup']:9.2f}x samples/s", flush=True)
