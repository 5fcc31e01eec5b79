#!/usr/bin/env bash
# The pure-Python packages (and PyYAML's CPython 3.12 wheel) that the device check
# (python -m clip_jax.benchmark accelerator) needs beyond a bare JAX image:
# Python 3.12, jax with its accelerator plugin, flax, optax, orbax-checkpoint,
# absl, etils, pillow, regex, tqdm. Usage: tools/device_wheels.sh [DIR] (default
# wheels/, git-ignored); on the device:
#   pip install --no-index --no-deps wheels/*.whl && python -m clip_jax.benchmark accelerator
set -euo pipefail
dir="${1:-wheels}"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$dir" \
    ml-collections==1.1.0 PyYAML==6.0.3 ftfy==6.3.1 wcwidth==0.7.0
du -sh "$dir"
