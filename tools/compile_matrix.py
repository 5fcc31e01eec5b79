"""Compiles the tiny models' bf16 train step for a TPU slice or for GPUs over
the features users combine (objective x mesh x GradCache x attention kernel
and layer layout), one `python -m clip_jax.benchmark plan` per case in its own
process (a compiler's CHECK failure aborts the process), and prints which
compile. It measures nothing: it finds what only the TPU or GPU compiler
refuses, which no CPU run shows (three such failures were found this way:
FSDP's reduce-scatter in GradCache's loop aborting the TPU compiler, splash on
cross-attention, cuDNN's partitioning on a partly manual mesh).

    python tools/compile_matrix.py --tpu v5e:2x2 [--limit N] [--match gathered]
    python tools/compile_matrix.py --gpu h100 [--limit N] [--match gathered]

Exits 1 if any case fails to compile (74 cases; times in docs/benchmarks.md).
"""

import argparse
import itertools
import subprocess
import sys

# (name, configs/clip.py variant, overrides)
OBJECTIVES = (
    ("softmax", "tiny", ()),
    ("sigmoid", "tiny", ("loss.kind=sigmoid", "model.logit_bias_init=-10.0")),
    ("coca", "coca_tiny", ()),
    ("caption_lm", "tiny", ("objective=caption_lm",)),
)
MESHES = ("data=4", "fsdp=4", "data=2,fsdp=2", "fsdp=2,tensor=2")
# (microbatches, gradcache_weights): the gathered weights where FSDP splits them.
GRADCACHE = ((1, "sharded"), (2, "sharded"), (2, "gathered"))


def layouts(fast_attention):
    """(name, overrides): XLA's attention with stacked blocks in the layer loop
    `auto` picks (the presets' default: unrolled on TPUs and GPUs, no remat), and
    the platform's fused kernel with one block per layer, lean backward passes
    and full remat."""
    return (("xla, stacked", ("model.attention=xla", "model.scan_layers=True")),
            (f"{fast_attention}, unrolled, lean, remat",
             (f"model.attention={fast_attention}", "model.scan_layers=False",
              "model.lean_backward=on", "model.remat=full")))


def cases(fast_attention):
    """(label, plan arguments) of every case; caption_lm has no GradCache."""
    for (objective, variant, extra), mesh, (k, weights), (layout, settings) in itertools.product(
            OBJECTIVES, MESHES, GRADCACHE, layouts(fast_attention)):
        if (objective == "caption_lm" and k > 1) or (weights == "gathered" and "fsdp" not in mesh):
            continue
        # Two image heads (the tiny preset has 3), so that tensor=2 splits them.
        overrides = ("model.dtype=bfloat16", "model.image.heads=2", f"microbatches={k}",
                     f"gradcache_weights={weights}", *extra, *settings)
        label = (f"{objective:<10} {mesh:<16} k={k}{' gathered' if weights == 'gathered' else ''}"
                 f"  {layout}")
        yield label, ["--config", variant, "--mesh", mesh, "--batch-size", "64",
                      *(arg for override in overrides for arg in ("--set", override))]


def compile_case(target, arguments):
    """None if the case compiles, else the last line of its error."""
    command = [sys.executable, "-m", "clip_jax.benchmark", "plan", *target, *arguments]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode == 0:
        return None
    lines = [line for line in (child.stderr + child.stdout).splitlines() if line.strip()]
    return lines[-1][:200] if lines else f"exit status {child.returncode}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    chip = parser.add_mutually_exclusive_group(required=True)
    chip.add_argument("--tpu", metavar="TOPOLOGY", help="a 4-chip slice, e.g. v5e:2x2")
    chip.add_argument("--gpu", metavar="CHIP", help="4 GPUs of this chip, e.g. h100")
    parser.add_argument("--limit", type=int, help="only the first N cases")
    parser.add_argument("--match", default="", help="only the cases whose label has this text")
    args = parser.parse_args(argv)
    target = ["--tpu", args.tpu] if args.tpu else ["--gpu", args.gpu, "--devices", "4"]
    selected = [case for case in cases("splash" if args.tpu else "cudnn")
                if args.match in case[0]][:args.limit]
    failed = 0
    for label, arguments in selected:
        error = compile_case(target, arguments)
        failed += error is not None
        print(f"{'ok  ' if error is None else 'FAIL'} {label}" + (f"\n     {error}" if error else ""),
              flush=True)
    print(f"{len(selected) - failed} of {len(selected)} compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
