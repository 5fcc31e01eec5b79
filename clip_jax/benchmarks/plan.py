"""The capacity plan command (clip_jax/capacity.py does the work): per-device
memory, FLOPs and collective bytes of a train step on a simulated mesh, or
compiled by the TPU compiler for a TPU topology (clip_jax/tpu_topology.py), or
by XLA's GPU compiler for H100 or H200 GPUs (clip_jax/gpu_target.py)."""

import json

import jax

from clip_jax import capacity, config_files, gpu_target, overrides, sharding, tpu_topology

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


def _largest_batch(config, devices, row):
    """{largest_batch_per_device} from a second plan at twice the batch; when the
    TPU compiler says that one does not fit, None per chip and why."""
    doubled = config.copy_and_resolve_references()
    doubled.batch_size = 2 * config.batch_size
    try:
        return {"largest_batch_per_device": capacity.largest_batch_per_device(
            [row, capacity.plan(doubled, devices)])}
    except capacity.DoesNotFit as error:
        return {"largest_batch_per_device": dict.fromkeys(row["fits"]),
                "largest_batch_note": f"under {2 * row['batch_per_device']}: {error}"}


def _gib(n):
    return f"{n / 2**30:.2f} GiB"


def run_plan(args):
    try:
        config = config_files.load(args.config)
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
    try:
        devices = (tpu_topology.devices(args.tpu, args.slices) if args.tpu
                   else gpu_target.devices(args.gpu, args.devices) if args.gpu
                   else jax.devices()[:args.devices])
        row = {"config": args.config, **capacity.plan(config, devices)}
        if args.largest_batch:
            row.update(_largest_batch(config, devices, row))
    except capacity.DoesNotFit as error:  # the TPU compiler's answer, not a failure
        print(json.dumps({"config": args.config, "devices": len(devices),
                          "global_batch": config.batch_size, "does_not_fit": str(error)})
              if args.json else f"{args.config} at global batch {config.batch_size} does not "
                                f"fit: {error}", flush=True)
        return
    except ValueError as error:  # config_checks.ConfigError, a bad topology: one line
        raise SystemExit(f"{'plan' if args.tpu or args.gpu else 'config'} error: {error}") \
            from None
    if args.tpu:
        row["libtpu"] = tpu_topology.libtpu_version()
    if args.gpu:
        row["cuda_plugin"] = gpu_target.cuda_plugin_version()
    if args.json:
        print(json.dumps(row), flush=True)
        return
    mesh = " ".join(f"{axis}={size}" for axis, size in row["mesh"].items())
    collectives = ", ".join(f"{kind} {_gib(n)}" for kind, n in row["collective_bytes"].items() if n)
    ideal = row["ideal_collective_bytes"]
    ratio = f", {row['collective_bytes_total'] / ideal:.2f}x" if ideal else ""
    fits = ", ".join(f"{name} {'yes' if fit else 'no'}" for name, fit in row["fits"].items())
    target = (f"{row['compiled_for']} chips (TPU compiler, libtpu {row['libtpu']})" if args.tpu
              else f"{row['compiled_for']} GPUs (XLA's GPU compiler, {row['cuda_plugin']})"
              if args.gpu else "devices")
    print(f"{args.config} train step plan: {row['devices']} {target}, mesh {mesh}, global batch "
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
    bound = row["roofline"]
    if bound:
        kinds = ", ".join(f"{kind} {1e3 * seconds:.1f}"
                          for kind, seconds in bound["seconds_by_kind"].items())
        print(f"  roofline         step >= {1e3 * bound['step_seconds_at_least']:.1f} ms "
              f"({kinds} ms; {bound['kernel_bytes'] / 1e9:.0f} GB through memory), "
              f"MFU <= {100 * bound['mfu_at_most']:.0f}%", flush=True)
    estimate = row["tpu_estimate"]
    if estimate:
        cycles = estimate["cycles"]
        kinds = ", ".join(f"{kind} {100 * n / cycles:.0f}%"
                          for kind, n in estimate["cycles_by_kind"].items() if n)
        timed = (f" = {1e3 * estimate['step_seconds']:.1f} ms, MFU {100 * estimate['mfu']:.0f}%"
                 if estimate["step_seconds"] else " (this chip's clock is not known here)")
        left_out = (f"; leaves out {estimate['mosaic_kernels']} Pallas kernel runs"
                    if estimate["mosaic_kernels"] else "")
        print(f"  TPU estimate     {cycles / 1e6:.1f} M cycles{timed} ({kinds}{left_out}): "
              "the compiler's cost model, not a measurement", flush=True)
    for collective in row["largest_collectives"]:
        print(f"    {collective['kind']:<18} {_gib(collective['bytes']):>12}  "
              f"{collective['executions']:>4} x over {collective['group_size']} devices  "
              f"{collective['op'][-70:]}")
    if args.largest_batch:
        print("  largest batch per device: " + row.get("largest_batch_note", ", ".join(
            f"{name} {'-' if b is None else b}"
            for name, b in row["largest_batch_per_device"].items())), flush=True)
