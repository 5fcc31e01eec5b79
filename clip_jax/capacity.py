"""Capacity planning: what one train step costs each device, read from the
compiled program before any accelerator is rented.

`plan(config, devices)` builds the run's mesh over `devices` and AOT-compiles
its train step on abstract inputs (nothing is allocated), then reads per
device: parameter and optimizer-state bytes (from the state's shardings),
temporaries and totals (XLA's memory analysis), model FLOPs
(clip_jax/flops.py) and the bytes each kind of collective moves per step
(clip_jax/hlo_stats.py), against the ideal for the same parameter sharding.

Three compilers can do the planning. With compile-only TPU devices
(clip_jax/tpu_topology.py) the TPU compiler builds the program a TPU slice
runs: its buffers, layouts (padded to TPU tiles), fusions and collective
decompositions are the chips' own, and the plan is that slice's. With
compile-only H100 or H200 devices (clip_jax/gpu_target.py) XLA's GPU compiler
does the same for GPUs, cuDNN's attention kernels included. Otherwise
simulated CPU devices stand in for the accelerators: the partitioner decides
every array's sharding and every collective before any backend code exists,
so what is split, gathered and reduced is the program a TPU or GPU would run.
Byte figures are XLA:CPU's buffer assignment, which fuses and schedules
differently from the TPU and GPU compilers, with bfloat16 results rounded
where an accelerator rounds them (DEVICE_NUMERICS); collectives are counted at
the width a bfloat16 run moves (see hlo_stats._wire_dtype). Settings that "auto"
resolves by platform are planned as the accelerators run them: the layer loop
of the platform compiled for (model.layer_loop: unrolled on GPUs and TPUs
unless remat keeps nothing, else one lax.scan; simulated CPU devices plan the
scan, an upper estimate of memory without remat),
autodiff's backward passes (model.lean_backward) and the platform's attention
kernel (model.attention), where the CPU doing the planning would take its
hand-written passes and XLA's attention; a config that names any of them is
planned as it says.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from clip_jax import (flops, gpu_target, hlo_stats, phases, roofline, sharding, tpu_topology,
                      variables)
from clip_jax.config_checks import check_config
from clip_jax.models.transformer import attention_implementation, unrolled_layer_loop
from clip_jax.train_step import setup_training

# Memory per chip (GiB), from the vendors' spec sheets.
ACCELERATOR_MEMORY_GIB = {
    "TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32,
    "A100 40GB": 40, "A100 80GB": 80, "H100": 80, "H200": 141,
}


def memory_bytes(compiled):
    """{temp, argument, output, bytes_per_device} of a compiled executable, per
    device (XLA's memory analysis). Outputs donated back into the arguments'
    buffers (a train step's new state) are not counted twice."""
    analysis = compiled.memory_analysis()
    sizes = {"temp": analysis.temp_size_in_bytes,
             "argument": analysis.argument_size_in_bytes,
             "output": analysis.output_size_in_bytes}
    return {**sizes, "bytes_per_device": sum(sizes.values()) - analysis.alias_size_in_bytes}


def compiled_flops(compiled):
    """XLA's count of the FLOPs of a compiled executable (per device)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # one entry per computation in older JAX versions
        analysis = analysis[0]
    return float(analysis["flops"])


def shard_bytes(abstract_tree, shardings):
    """Bytes one device holds of a tree of abstract arrays under `shardings`."""
    leaves = zip(jax.tree.leaves(abstract_tree),
                 jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding)))
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in leaves)


def ideal_collective_bytes(abstract_params, param_shardings, mesh):
    """Bytes each device sends per step when the parameters, split as they are,
    move no more than FSDP (ZeRO-3) needs, in float32 and by the ring
    algorithm: a parameter split g ways over the batch axes is all-gathered in
    the forward and again in the backward and its gradient reduce-scattered
    (3 (g-1)/g of its size); replicated over r batch-axis ways, its gradient
    (shard) is all-reduced (2 (r-1)/r), which is data parallelism's ideal.
    Tensor parallelism's activation all-reduces come on top."""
    total = 0.0
    for value, shard in zip(jax.tree.leaves(abstract_params),
                            jax.tree.leaves(param_shardings,
                                            is_leaf=lambda s: isinstance(s, NamedSharding))):
        split = {axis for entry in shard.spec if entry is not None
                 for axis in (entry if isinstance(entry, tuple) else (entry,))}
        local = math.prod(shard.shard_shape(value.shape)) * 4
        gathered = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES if a in split)
        replicated = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES if a not in split)
        total += 3 * local * (gathered - 1) + 2 * local * (replicated - 1) / replicated
    return int(total)


def abstract_train_step(config, devices):
    """(jitted train step, abstract state, abstract batch, Training) for `config`
    on a mesh over `devices`; shapes and shardings only, nothing allocated."""
    # What "auto" resolves to on the TPU or GPU compiled for, not on the CPU doing
    # the planning. Simulated CPU devices plan the scanned loop, whose compile
    # time stays flat in depth on hundreds of them: unless remat keeps nothing an
    # accelerator unrolls, and holds less (see models.transformer.Transformer).
    platform = devices[0].platform
    unrolled = platform != "cpu" and unrolled_layer_loop("auto", platform,
                                                         config.model.get("remat", "none"))
    accelerator_choices = {
        "layer_loop": "unrolled" if unrolled else "scan",
        "lean_backward": "off",
        "attention": attention_implementation("auto", config.model.dtype, platform)}
    unresolved = {key: value for key, value in accelerator_choices.items()
                  if config.model.get(key, "auto") == "auto"}
    if unresolved:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.model.update(unresolved)
    training = setup_training(config, devices)
    state = variables.with_shardings(training.abstract_state, training.shardings)
    model = phases.first_phase_model(config)  # the shapes of the first phase's batches
    size, length = model.image.image_size, model.text.context_length
    batch_sharding = sharding.batch_sharding(training.mesh)
    batch = {"images": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8,
                                            sharding=batch_sharding),
             "tokens": jax.ShapeDtypeStruct((config.batch_size, length), jnp.int32,
                                            sharding=batch_sharding)}
    if training.teacher is not None:  # its embeddings, computed by its own program
        for key in ("teacher_image", "teacher_text"):
            batch[key] = jax.ShapeDtypeStruct((config.batch_size, training.teacher.embed_dim),
                                              jnp.float32, sharding=batch_sharding)
    return training.step, state, batch, training


# XLA:CPU computes a bfloat16 dot in float32 and, allowed excess precision, keeps
# its result in float32 until something needs it rounded, across a gradient
# all-reduce too; a GPU or TPU computes the dot natively and reduces its bfloat16
# result. Without excess precision XLA:CPU rounds where they do: collective
# dtypes and buffer sizes follow the program as written.
DEVICE_NUMERICS = {"xla_allow_excess_precision": False}


class DoesNotFit(ValueError):
    """The TPU compiler refused the step: it needs more memory than the chip has."""


def compile_train_step(config, devices):
    """(compiled train step, Training) of a checked config on a mesh over `devices`
    (a ConfigError names the first bad value); simulated CPU devices round as
    accelerators round (DEVICE_NUMERICS). DoesNotFit, with the compiler's
    figures, when compiling for TPU devices whose memory the step overflows."""
    check_config(config, len(devices), devices[0].platform)
    step, abstract_state, batch, training = abstract_train_step(config, devices)
    platform = devices[0].platform
    options = (DEVICE_NUMERICS if platform == "cpu"
               else gpu_target.compiler_options() if platform == "gpu" else {})
    try:
        return step.lower(abstract_state, batch).compile(compiler_options=options), training
    except jax.errors.JaxRuntimeError as error:
        message = str(error).splitlines()[0]
        if not message.startswith("RESOURCE_EXHAUSTED: "):
            raise
        reason = message.removeprefix("RESOURCE_EXHAUSTED: ")
        raise DoesNotFit(f"{devices[0].device_kind}: {reason}") from None


def plan(config, devices):
    """Per-device cost of config's train step on a mesh over `devices`: a dict
    of bytes (parameters, optimizer state, arguments, temporaries, total),
    model FLOPs, collective bytes by kind and their ideal (FSDP's), and
    per accelerator whether the total fits its memory (compiled for TPU
    devices: their chip's only)."""
    return summarize(config, *compile_train_step(config, devices))


def summarize(config, compiled, training):
    """plan's dict, from the compiled step and its Training."""
    mesh = training.mesh
    memory = memory_bytes(compiled)
    # A distillation teacher's parameters stay on the devices beside the step's
    # (its activations live in its own program, freed before the step runs).
    teacher = training.teacher
    teacher_bytes = 0 if teacher is None else sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(teacher.variables))
    total = memory["bytes_per_device"] + teacher_bytes
    num_devices = mesh.devices.size
    hlo_text = compiled.as_text()  # seconds for a large model: read once
    found = hlo_stats.collectives(hlo_text, num_devices)
    by_kind = hlo_stats.bytes_by_kind(found)
    locked = tuple(tower for tower in ("image", "text") if config[f"lock_{tower}"])
    model_flops = flops.train_step_flops(
        phases.first_phase_model(config), config.batch_size, locked, objective=config.objective,
        teacher_config=teacher and teacher.model.config)["train_step"]
    state, shardings = training.abstract_state, training.shardings
    device = mesh.devices.flat[0]
    return {
        "compiled_for": ("simulated CPU devices" if device.platform == "cpu"
                         else device.device_kind),
        "devices": num_devices, "mesh": dict(mesh.shape), "global_batch": config.batch_size,
        "batch_per_device": config.batch_size // sharding.data_parallel_size(mesh),
        "dtype": config.model.dtype, "remat": config.model.remat,
        "param_bytes": shard_bytes(state.params, shardings.params),
        "optimizer_bytes": shard_bytes(state.opt_state, shardings.opt_state),
        "argument_bytes": memory["argument"],
        "temp_bytes": memory["temp"],
        "teacher_bytes": teacher_bytes,
        "bytes_per_device": total,
        "model_flops_per_device": model_flops / num_devices,
        "collective_bytes": by_kind,
        "collective_bytes_total": sum(by_kind.values()),
        "ideal_collective_bytes": ideal_collective_bytes(state.params, shardings.params, mesh),
        # A TPU compiler refuses a step its chip cannot hold (DoesNotFit): compiled, it fits.
        "fits": {name: device.platform == "tpu" or total <= gib * 2**30
                 for name, gib in accelerators(device).items()},
        "roofline": gpu_roofline(hlo_text, device, model_flops / num_devices),
        "tpu_estimate": tpu_estimate(hlo_text, device, model_flops / num_devices),
        "largest_collectives": [
            {"kind": c.kind, "bytes": int(c.bytes_moved), "executions": c.executions,
             "group_size": c.group_size, "op": c.op_name}
            for c in sorted(found, key=lambda c: -c.bytes_moved)[:5]],
    }


def gpu_roofline(hlo_text, device, model_flops_per_device):
    """For a step compiled for a GPU: the roofline's lower bound on its time
    (clip_jax/roofline.py), by kind of kernel, and so the most MFU it can reach
    on that chip; None for other devices."""
    bandwidth = gpu_target.memory_bandwidth(device)
    peak = flops.peak_flops_per_device(device.device_kind)
    if device.platform != "gpu" or bandwidth is None or peak is None:
        return None
    bound = roofline.step_bound(hlo_text, peak, bandwidth)
    return {"step_seconds_at_least": bound["seconds"], "seconds_by_kind": bound["by_kind"],
            "kernel_flops": bound["flops"], "kernel_bytes": bound["bytes"],
            "mfu_at_most": model_flops_per_device / (bound["seconds"] * peak)}


def tpu_estimate(hlo_text, device, model_flops_per_device):
    """For a step compiled for a TPU: the TPU compiler's own estimate of its
    time (clip_jax/roofline.estimated_cycles), in cycles by kind of kernel, and
    where the chip's clock is known (tpu_topology.CLOCK_HZ) in seconds and the
    MFU they make; `mosaic_kernels` counts the Pallas kernels (splash) it leaves
    out. None for other devices and programs without estimates."""
    if device.platform != "tpu":
        return None
    estimate = roofline.estimated_cycles(hlo_text)
    if not estimate["cycles"]:
        return None
    clock = tpu_topology.clock_hz(device)
    peak = flops.peak_flops_per_device(device.device_kind)
    seconds = estimate["cycles"] / clock if clock else None
    return {"cycles": estimate["cycles"], "cycles_by_kind": estimate["by_kind"],
            "mosaic_kernels": estimate["mosaic_kernels"], "step_seconds": seconds,
            "mfu": model_flops_per_device / (seconds * peak) if seconds and peak else None}


def accelerators(device):
    """{chip: memory GiB} a plan compiled for `device` speaks for: a TPU's or
    GPU's own chip, or (simulated devices) every chip of ACCELERATOR_MEMORY_GIB."""
    name = tpu_topology.chip_name(device) or gpu_target.chip_name(device)
    return {name: ACCELERATOR_MEMORY_GIB[name]} if name else ACCELERATOR_MEMORY_GIB


def largest_batch_per_device(rows):
    """{accelerator: the largest per-device batch whose total fits its memory},
    from plans at two per-device batches (memory is affine in the batch: fixed
    state plus per-example activations); None where even the state does not fit."""
    small, large = sorted(rows, key=lambda row: row["batch_per_device"])
    per_example = ((large["bytes_per_device"] - small["bytes_per_device"])
                   / (large["batch_per_device"] - small["batch_per_device"]))
    fixed = small["bytes_per_device"] - per_example * small["batch_per_device"]
    largest = {}
    for name in small.get("fits", ACCELERATOR_MEMORY_GIB):  # the chips the plans speak for
        room = ACCELERATOR_MEMORY_GIB[name] * 2**30 - fixed
        largest[name] = int(np.floor(room / per_example)) if room > 0 and per_example > 0 else None
    return largest
