"""The trainer CLI as a subprocess, on the tiny test run (tests.conftest.small_config
as command-line overrides), for tests that need real processes: multi-process
runs, signals, kills."""

import json
import os
import socket
import subprocess
import sys

from clip_jax import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = {"batch_size": 16, "total_steps": 5, "log_every": 1, "eval_every": 0,
            "checkpoint_every": 0, "optimizer.warmup_steps": 2,
            "evals.zeroshot.batch_size": 64, "evals.retrieval.batch_size": 64,
            "model.embed_dim": 16, "model.image.image_size": 16,
            "model.image.patch_size": 8, "model.image.width": 32, "model.image.layers": 2,
            "model.image.heads": 2, "model.text.context_length": 8, "model.text.width": 32,
            "model.text.layers": 2, "model.text.heads": 2}


def launch_trainer(workdir, data_dir, devices=8, extra_flags=(), config=None):
    """Starts `python -m clip_jax.train` on TINY_RUN updated with `config`
    ({dotted key: value}) on `devices` CPU devices."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=cpu_devices.xla_flags(devices, os.environ.get("XLA_FLAGS", "")),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    config = {**TINY_RUN, **(config or {})}
    command = [sys.executable, "-m", "clip_jax.train", "--workdir", str(workdir),
               f"--config.data.data_dir={data_dir}", *extra_flags,
               *(f"--config.{key}={value}" for key, value in config.items())]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_metrics(workdir):
    """The rows of WORKDIR/metrics.jsonl; [] before the first is written."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def distributed_flags(port, process_id, num_processes=2):
    """The trainer's flags for process `process_id` of a localhost run."""
    return [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
            f"--process_id={process_id}"]
