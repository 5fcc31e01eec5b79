"""Two processes on localhost (gloo collectives) train like one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import small_config
from tests.test_train_step import build, random_batch

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
    port = free_port()
    outputs = [tmp_path / f"process_{i}.json" for i in range(2)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    workers = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(outputs[i])],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    logs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log[-3000:]
    results = [json.loads(path.read_text()) for path in outputs]

    config = small_config(**{"mesh.data": 1, "optimizer.warmup_steps": 0})
    step, state = build(config, jax.devices()[:1])
    state, metrics = step(state, random_batch(config))
    for result in results:
        assert result["devices"] == 8
        np.testing.assert_allclose(result["loss"], float(metrics["loss"]), rtol=1e-5)
        np.testing.assert_allclose(result["grad_norm"], float(metrics["grad_norm"]), rtol=1e-5)
        np.testing.assert_allclose(result["logit_scale"], float(state.params["logit_scale"]),
                                   rtol=1e-6)
