#!/usr/bin/env bash
# The device check on a GPU or TPU host whose image has JAX but not this
# project's other packages: installs the wheels tools/device_wheels.sh fetched
# (if wheels/ is there), records the machine, runs
# `python -m clip_jax.benchmark accelerator`, and leaves in OUTDIR the JSON
# document, its table, the log and the traces (one .tar.gz).
#   tools/device_check.sh OUTDIR [extra arguments for the check, e.g. --budget-s 300]
set -uo pipefail
out="${1:?usage: tools/device_check.sh OUTDIR [check arguments]}"
shift
mkdir -p "$out"
if compgen -G "wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/clip_jax_site \
        wheels/*.whl || exit
    export PYTHONPATH="/tmp/clip_jax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{
    date -u; uname -m; nvidia-smi 2>/dev/null || true
    python3 -c 'import jax, jaxlib, flax, optax; print("jax", jax.__version__, "jaxlib",
jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__); print(jax.devices())'
} 2>&1 | tee "$out/machine.txt"
traces="$(mktemp -d)"
python3 -m clip_jax.benchmark accelerator --output "$out/accelerator.json" \
    --trace-dir "$traces" "$@" 2>&1 | tee "$out/check.log"
status=${PIPESTATUS[0]}
tail -n 30 "$out/check.log" | sed -n '/^| model/,/^wrote/p' > "$out/table.md"
tar czf "$out/traces.tar.gz" -C "$traces" . && rm -rf "$traces"
exit "$status"
