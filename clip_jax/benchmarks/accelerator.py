"""The device check: train-step speed, MFU, where the step's time goes, and peak
memory of the zoo's ViT-B/16, ViT-B/32 and ViT-L/14 in bfloat16 on one
accelerator host, for each attention implementation the platform offers, with
the hand-written backward passes off and on, with the layer loops and remat
policies and under the XLA flags worth comparing there.

  python -m clip_jax.benchmark accelerator [--output accelerator.json] [--budget-s 420] \
      [--trace-dir traces/]
  python -m clip_jax.benchmark accelerator --tiny   # CPU: the tiny model, a few steps

Every measurement is `python -m clip_jax.benchmark train --json` in a child
process: XLA reads its flags once per process, a TPU opens to one process at a
time, the device's peak-memory counter never resets, and a kernel that crashes
or hangs then costs one row, not the check. This process never starts an
accelerator backend itself.

Each model's first variant (the platform's defaults) takes the largest
per-device batch of its short list that fits; its other variants run at that
batch, so that their rows compare like for like (a variant that does not fit
there goes down the list, and its row says so). Every model's first two
variants run first (ViT-B/16's, the model the MFU goal is set on, before the
others'), then B/16's default variant under each flag set, then the rest: a
budget running out stops what is least needed. A batch
is skipped when XLA's memory analysis puts it over the device's memory or the
step runs out of memory; a variant that fails otherwise (a kernel the platform
lacks) is a row with its error, and the check goes on. Each measurement also
traces a few steps (clip_jax/op_profile.py): the table gives the share of the
step in matmul and attention kernels, how close to peak they run, and how long
the device idles. On GPUs a row also has the roofline's lower bound on the step
it compiled (clip_jax/roofline.py): the gap between it and the measured step is
what the profile has to explain.

The JSON document is rewritten after every row, so a check stopped early keeps
what it measured; no measurement starts after --budget-s seconds. It ends with
what the rows decide (fastest_settings): each model's fastest variant, the one
fastest for every model, and each flag set's speed-up.
"""

import json
import os
import subprocess
import sys
import time

# The per-device batches tried for each model, largest first: the largest of
# each fits the 90% of an 80 GB H100 the check lets JAX take (MEMORY_FRACTION)
# with every GPU variant, so that all compare at it, as XLA's GPU compiler
# plans the step (docs/capacity_gpu_table.md: the scan without remat fits the
# least, 552, 1,328 and 166 on the whole GPU; the default, unrolled, 1,189,
# 2,972 and 366; an H200 about 1.8x).
BATCHES_PER_DEVICE = {"ViT-B-16": (384, 256, 128), "ViT-B-32": (1024, 512, 256),
                      "ViT-L-14": (128, 64, 32)}
TINY = dict(batches={"tiny": (32,)}, steps=1, warmup=1, profile_steps=1)
# JAX's GPU client takes 75% of the memory by default; the batches above are
# sized to the whole device, as the capacity planner sizes them.
MEMORY_FRACTION = "0.9"
_PROBE = ("import json, jax; d = jax.devices(); print(json.dumps({'platform': "
          "jax.default_backend(), 'device_kind': d[0].device_kind, 'devices': len(d), "
          "'jax': jax.__version__, 'memory_limit_bytes': (d[0].memory_stats() or {})"
          ".get('bytes_limit')}))")


def attention_choices(platform):
    """The config.model.attention values worth measuring on `platform`, the one
    `auto` picks there first."""
    return {"gpu": ("cudnn", "xla"), "tpu": ("xla", "splash")}.get(platform, ("xla",))


# The config.model keys a variant sets, in a variant tuple's order.
VARIANT_KEYS = ("attention", "lean_backward", "layer_loop", "remat")


def variants(platform):
    """(attention, lean_backward, layer_loop, remat) to measure, the platform's
    defaults first: lean_backward=auto is off on accelerators and on on CPUs,
    layer_loop auto unrolled unless remat keeps nothing
    (models.transformer.unrolled_layer_loop), no remat.

    On GPUs the lean backward passes come right after the defaults: the
    roofline of the steps compiled for an H100 (docs/capacity.md, "Compiled by
    the GPU compiler") bounds the unrolled, lean ViT-B/16 at 54% MFU against
    46% with autodiff's passes; then XLA's attention. On TPUs splash comes
    second: the TPU compiler leaves its kernels out of its estimates. Last on
    both, the scan without remat, then remat="dots_saveable" (keeping only
    matmul outputs, what fits the largest batch) in the loop `auto` runs it in,
    unrolled, and in the scan, which the compilers' figures put behind it."""
    default_lean = "on" if platform == "cpu" else "off"
    leans = (default_lean, "off" if default_lean == "on" else "on")
    first = attention_choices(platform)[0]
    if platform == "gpu":
        found = [(attention, lean, "unrolled", "none")
                 for attention in attention_choices(platform) for lean in leans]
    else:
        found = [(attention, lean, "unrolled", "none") for lean in leans
                 for attention in attention_choices(platform)]
    if platform in ("gpu", "tpu"):
        found += [(first, default_lean, "scan", "none"),
                  (first, "on", "unrolled", "dots_saveable"), (first, "on", "scan", "dots_saveable")]
    return found


def flag_sets(platform, devices):
    """{name: (environment variable, flags)} to compare against XLA's defaults on
    the first model's default variant. The collective-overlap flags only matter
    with several devices (the check runs on all of a host's)."""
    if platform == "gpu":
        sets = {"cuBLAS GEMMs": ("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false"),
                "no CUDA graphs": ("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")}
        if devices > 1:
            sets["latency-hiding scheduler"] = (
                "XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")
        return sets
    if platform == "tpu" and devices > 1:
        return {"async collective fusion": ("LIBTPU_INIT_ARGS", " ".join((
            "--xla_tpu_enable_async_collective_fusion=true",
            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
            "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
            "--xla_tpu_overlap_compute_collective_tc=true",
            "--xla_enable_async_all_gather=true")))}
    return {}


def environment(flag_set=None):
    """The children's environment: this one's, the GPU memory fraction, and
    `flag_set` ((variable, flags)) appended to what the variable holds."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEMORY_FRACTION)
    if flag_set:
        variable, flags = flag_set
        env[variable] = " ".join(filter(None, [env.get(variable, ""), flags]))
    return env


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_child(command, env, timeout_s):
    """Runs `command` -> (return code, its stdout, its stderr), its stderr (the
    progress) also written to ours; a child past `timeout_s` is killed (code None)."""
    try:
        child = subprocess.run(command, env=env, capture_output=True, text=True,
                               timeout=timeout_s, check=False)
        code, stdout, stderr = child.returncode, child.stdout, child.stderr
    except subprocess.TimeoutExpired as expired:
        code, stdout, stderr = None, "", expired.stderr or ""
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    sys.stderr.write(stderr)
    return code, stdout, stderr


def row_command(model, per_device, devices, variant, plan, trace_path):
    settings = [part for key, value in zip(VARIANT_KEYS, variant)
                for part in ("--set", f"model.{key}={value}")]
    return [sys.executable, "-m", "clip_jax.benchmark", "train", "--config", model,
            "--batch-size", str(per_device * devices), "--devices", str(devices),
            "--dtype", "bfloat16", *settings, "--set", "model.scan_layers=True",
            "--steps", str(plan["steps"]), "--warmup", str(plan["warmup"]),
            "--profile-steps", str(plan["profile_steps"]), "--json",
            *(["--trace", trace_path] if trace_path else [])]


def _out_of_memory(message):
    return ("DoesNotFit" in message or "RESOURCE_EXHAUSTED" in message
            or "out of memory" in message.lower())


def measure(model, variant, batches, devices, plan, flags=None, trace_dir=None, timeout_s=600):
    """The train benchmark's row of `variant` (VARIANT_KEYS' values) at the
    first per-device batch of `batches` that fits; {"skipped": why} when none
    does, {"error": why} when the step fails for another reason. `flags`:
    (name, (variable, flags)) to run under."""
    attention, lean_backward, layer_loop, remat = variant
    name, flag_set = flags or ("", None)
    label = {"model": model, **dict(zip(VARIANT_KEYS, variant)), "flag_set": name,
             "flags": flag_set and f"{flag_set[0]}={flag_set[1]}"}
    tried = []
    for per_device in batches:
        trace_path = trace_dir and os.path.join(trace_dir, "_".join(filter(None, (
            model, attention, f"lean-{lean_backward}", layer_loop,
            "" if remat == "none" else f"remat-{remat}", str(per_device),
            name.replace(" ", "-")))) + ".xplane.pb")
        command = row_command(model, per_device, devices, variant, plan, trace_path)
        code, stdout, stderr = run_child(command, environment(flag_set), timeout_s)
        if code == 0:
            try:
                return {**label, "batch_per_device": per_device, "batches_not_fitting": tried,
                        **json.loads(_last_line(stdout))}
            except json.JSONDecodeError:
                message = f"no JSON result; its output ends {_last_line(stdout)[:200]!r}"
        else:
            message = (f"no result within {timeout_s:g} s" if code is None else
                       _last_line(stderr) or f"the child exited with status {code}")
        if not _out_of_memory(message):
            return {**label, "batch_per_device": per_device, "error": message[:400]}
        tried.append(per_device)
    return {**label, "skipped": f"no per-device batch of {tried} fits"}


def _percent(fraction):
    return "" if fraction is None else f"{100 * fraction:.0f}%"


def table(rows):
    """Markdown table of the rows: speed, on GPUs the roofline's lower bound on
    the same program's step (clip_jax/roofline.py) and on TPUs the compiler's
    own estimate of it (capacity.tpu_estimate), MFU, and from the profile the share of
    the step in matmul and attention kernels, their FLOP/s against peak, and
    the device's idle share."""
    lines = ["| model | attention | lean backward | layer loop | remat | XLA flags "
             "| batch / device | step s | GPU roofline: step >= s, TPU compiler: ~s "
             "| samples/s / device | MFU "
             "| matmul + attention kernels | their FLOP/s / peak | device idle | peak GiB |",
             "|" + " --- |" * 15]
    for row in rows:
        head = (f"| {row['model']} | {row['attention']} | {row['lean_backward']} | "
                f"{row['layer_loop']} | {row['remat']} | {row.get('flag_set') or 'default'} |")
        if "skipped" in row or "error" in row:
            lines.append(f"{head} {row.get('skipped') or row['error']} |" + " |" * 8)
            continue
        profile = row.get("profile") or {}
        share = idle = None
        if "op_s_per_step" in profile:
            kinds = profile["op_s_per_step"]
            share = (kinds["matmul"] + kinds["attention"]) / profile["wall_s_per_step"]
            idle = max(0.0, 1 - profile["busy_fraction"])
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        bound, estimate = row.get("roofline"), row.get("tpu_estimate") or {}
        bound = (f">= {bound['step_seconds_at_least']:.3f}" if bound
                 else f"~{estimate['step_seconds']:.3f}" if estimate.get("step_seconds") else "")
        lines.append(f"{head} {row['batch_per_device']} | {row['step_time_s']:.3f} | {bound} | "
                     f"{row['samples_per_sec_per_device']:.1f} | {mfu} | {_percent(share)} | "
                     f"{_percent(profile.get('kernel_flops_fraction'))} | {_percent(idle)} | "
                     f"{row['peak_memory_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def _measured(row):
    return "error" not in row and "skipped" not in row


def fastest_settings(rows):
    """What the measurements decide, from the rows as measured (each model's
    first row is its variant with every setting "auto", as the platform picks
    it): {"models": {model: the fastest variant at that row's batch, its
    samples/s per device and speed-up over the auto settings}, "variant": the
    variant fastest for every model, or None where they disagree,
    "flag_sets": {name: speed-up of the first model's auto settings under
    it}}: auto's choice, the presets' defaults and the
    launchers' flags on this platform. Rows at another batch (a variant that
    did not fit the auto settings' batch) are not compared."""
    by_model, flag_sets = {}, {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    models = {}
    for model, model_rows in by_model.items():
        auto = model_rows[0]
        if not _measured(auto) or auto.get("flag_set"):
            continue
        comparable = [row for row in model_rows if _measured(row) and not row.get("flag_set")
                      and row["batch_per_device"] == auto["batch_per_device"]]
        best = max(comparable, key=lambda row: row["samples_per_sec_per_device"])
        models[model] = {
            "variant": [best[key] for key in VARIANT_KEYS],
            "batch_per_device": best["batch_per_device"],
            "samples_per_sec_per_device": best["samples_per_sec_per_device"],
            "speedup_over_auto": (best["samples_per_sec_per_device"]
                                  / auto["samples_per_sec_per_device"])}
        for row in model_rows:
            if row.get("flag_set") and _measured(row) and (
                    row["batch_per_device"] == auto["batch_per_device"]):
                flag_sets[row["flag_set"]] = (row["samples_per_sec_per_device"]
                                              / auto["samples_per_sec_per_device"])
    winners = {tuple(found["variant"]) for found in models.values()}
    return {"models": models, "variant": list(winners.pop()) if len(winners) == 1 else None,
            "flag_sets": flag_sets}


def _settings_lines(settings):
    lines = [f"fastest for {model}: "
             + " ".join(f"{key}={value}" for key, value in zip(VARIANT_KEYS, found["variant"]))
             + f", {found['speedup_over_auto']:.2f}x the auto settings"
             for model, found in settings["models"].items()]
    lines += [f"XLA flags {name}: {speedup:.2f}x XLA's defaults"
              for name, speedup in settings["flag_sets"].items()]
    return "\n".join(lines)


def _write(document, path):
    """Replaces `path` whole, so that a reader never sees half a document."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(document, f, indent=1)
    os.replace(partial, path)


def probe(timeout_s=300):
    """The platform, device kind and count, JAX version and device memory, as a
    child process sees them."""
    code, stdout, stderr = run_child([sys.executable, "-c", _PROBE], environment(), timeout_s)
    if code != 0:
        raise SystemExit(f"the device probe failed: {_last_line(stderr)}")
    return json.loads(_last_line(stdout))


def measurements(platform, devices, batches_by_model):
    """(model, variant, flags or None) in the order measured, so that a budget
    running out leaves the most worth knowing: every model's first two variants
    (its defaults, which find its batch, and the next), then the first model's
    default variant under each flag set, then every model's other variants."""
    found = variants(platform)
    models = list(batches_by_model)
    return ([(model, variant, None) for model in models for variant in found[:2]]
            + [(models[0], found[0], flags) for flags in flag_sets(platform, devices).items()]
            + [(model, variant, None) for model in models for variant in found[2:]])


def run_accelerator(args):
    started = time.perf_counter()
    plan = TINY if args.tiny else dict(batches=BATCHES_PER_DEVICE, steps=args.steps,
                                       warmup=args.warmup, profile_steps=args.profile_steps)
    machine = probe()
    platform = machine["platform"]
    devices = machine["devices"] if platform != "cpu" else 1
    document = {**machine, "devices": devices, "rows": [], "not_measured_within_budget": [],
                "seconds": 0.0}
    batches = dict(plan["batches"])
    for model, variant, flags in measurements(platform, devices, batches):
        attention, lean_backward, layer_loop, remat = variant
        name = (f"{model} {attention} lean={lean_backward} {layer_loop}"
                + ("" if remat == "none" else f" remat={remat}")
                + (f" {flags[0]}" if flags else ""))
        if time.perf_counter() - started > args.budget_s:
            document["not_measured_within_budget"].append(name)
            continue
        row = measure(model, variant, batches[model], devices, plan, flags, args.trace_dir,
                      args.row_timeout_s)
        # The model's other variants start at the batch its first one fitted.
        if "batch_per_device" in row and "error" not in row:
            batches[model] = batches[model][batches[model].index(row["batch_per_device"]):]
        document["rows"].append(row)
        document["seconds"] = time.perf_counter() - started
        _write(document, args.output)
        print(f"{name}: " + json.dumps({k: v for k, v in row.items() if k != "profile"}),
              file=sys.stderr, flush=True)
    document["seconds"] = time.perf_counter() - started
    document["fastest"] = fastest_settings(document["rows"])
    _write(document, args.output)
    unmeasured = document["not_measured_within_budget"]
    print(f"{document['device_kind']} x {devices}, jax {document['jax']}, bfloat16\n"
          + table(document["rows"]) + "\n" + _settings_lines(document["fastest"])
          + (f"\nnot measured within --budget-s {args.budget_s:g}: {', '.join(unmeasured)}"
             if unmeasured else "")
          + f"\nwrote {args.output}", flush=True)
    return document
