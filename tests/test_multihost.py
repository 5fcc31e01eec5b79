"""Two processes on localhost (gloo collectives) train like one process."""

import os
import subprocess
import sys

import numpy as np
import pytest

from clip_jax import cpu_devices
from tests.trainer_process import (REPO, distributed_flags, free_port, launch_trainer,
                                   read_metrics)

pytestmark = pytest.mark.slow
COMPARED = ("train/loss", "train/grad_norm", "train/logit_scale")


def train_losses(processes, workdir):
    """Waits for the trainer processes; returns {step: (loss, gradient norm,
    temperature)} from metrics.jsonl, and process 0's log."""
    logs = [process.communicate(timeout=600)[0] for process in processes]
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    rows = read_metrics(workdir)
    return {row["step"]: [row[key] for key in COMPARED] for row in rows if "train/loss" in row}, logs[0]


# Step 3's loss and the final evals follow updates at a non-zero learning rate
# (TINY_RUN warms up over 2 steps from 0).
STEPS = {"total_steps": 3}


def test_trainer_on_two_processes_matches_one_process(tmp_path, shrunk_data_dir):
    """The real CLI: 2 processes x 4 CPU devices (gloo) log the same per-step
    losses, gradient norms and temperatures as 1 process x 8 devices: same global
    batches, same gradients, same updates; with GradCache's 2 micro-batches too,
    on replicas and with FSDP's weights gathered once."""
    data_dir = shrunk_data_dir
    single, multi = tmp_path / "one_process", tmp_path / "two_processes"
    losses_1, _ = train_losses([launch_trainer(single, data_dir, 8, config=STEPS)], single)
    port = free_port()
    processes = [launch_trainer(multi, data_dir, 4, distributed_flags(port, i), config=STEPS)
                 for i in range(2)]
    losses_2, log = train_losses(processes, multi)
    assert "8 x cpu on 2 process(es)" in log.lower()
    assert sorted(losses_1) == sorted(losses_2) == [1, 2, 3]
    for step in losses_1:
        np.testing.assert_allclose(losses_2[step], losses_1[step], rtol=1e-5,
                                   err_msg=f"step {step}: {COMPARED}")
    # The final evals run on both processes' devices and rank the same rows the same way.
    evals_1, evals_2 = ([row for row in read_metrics(workdir) if "zeroshot/synthetic_shapes/top1"
                         in row][-1] for workdir in (single, multi))
    assert evals_1.keys() == evals_2.keys()
    assert "retrieval/synthetic_shapes/image_to_text_r1" in evals_1
    for name in evals_1:
        np.testing.assert_allclose(evals_2[name], evals_1[name], atol=1e-6, err_msg=name)
    # GradCache's replicas span the processes: each sums its 2 micro-batches'
    # gradients, reduced over all 8 devices once.
    gradcache = tmp_path / "two_processes_gradcache"
    port = free_port()
    processes = [launch_trainer(gradcache, data_dir, 4, distributed_flags(port, i),
                                config={**STEPS, "microbatches": 2}) for i in range(2)]
    losses_k2, _ = train_losses(processes, gradcache)
    assert sorted(losses_k2) == [1, 2, 3]
    for step in losses_1:
        np.testing.assert_allclose(losses_k2[step], losses_1[step], rtol=1e-5,
                                   err_msg=f"step {step}, 2 micro-batches: {COMPARED}")
    # FSDP over both processes with the weights gathered once per step: each
    # device sums whole gradients, reduce-scattered over the 8 devices once.
    gathered = tmp_path / "two_processes_gathered"
    port = free_port()
    processes = [launch_trainer(gathered, data_dir, 4, distributed_flags(port, i),
                                config={**STEPS, "microbatches": 2, "mesh.data": 1,
                                        "mesh.fsdp": 8, "gradcache_weights": "gathered"})
                 for i in range(2)]
    losses_gathered, _ = train_losses(processes, gathered)
    assert sorted(losses_gathered) == [1, 2, 3]
    for step in losses_1:
        np.testing.assert_allclose(losses_gathered[step], losses_1[step], rtol=1e-5,
                                   err_msg=f"step {step}, gathered weights: {COMPARED}")


# One process of a 2-process run on 2 CPU devices each: joins as the trainer
# does, reduce-scatters a few hundred bytes as a train step's loss does first,
# then prints the smallest send buffer of its TCP connections.
_SEND_BUFFERS = """
import socket, sys, os
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from clip_jax.distributed import initialize_distributed
initialize_distributed(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
spec = PartitionSpec("devices")
scatter = jax.jit(jax.shard_map(lambda x: jax.lax.psum_scatter(x, "devices", tiled=True),
                                mesh=mesh, in_specs=spec, out_specs=spec))
tiny = np.ones((2 * 4, 16), np.float32)
jax.block_until_ready(scatter(jax.make_array_from_process_local_data(NamedSharding(mesh, spec), tiny)))
sizes = []
for name in os.listdir("/proc/self/fd"):
    try:
        sock = socket.socket(fileno=int(name))
    except OSError:
        continue
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sizes.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
    sock.detach()
print("send buffers", min(sizes), len(sizes))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_gloo_connections_keep_send_buffers_wider_than_the_default():
    """After start-up, a tiny reduce-scatter leaves no gloo connection's send
    buffer below TCP's default (16 KiB): gloo sizes a connection's buffer to the
    first message it reduce-scatters and Linux then stops growing it, so a
    connection whose first was a few hundred bytes stayed at the kernel's
    minimum and moved megabytes one delayed ACK at a time
    (clip_jax/distributed.widen_gloo_send_buffers)."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=cpu_devices.xla_flags(2, os.environ.get("XLA_FLAGS", "")),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    processes = [subprocess.Popen([sys.executable, "-c", _SEND_BUFFERS, str(port), str(rank)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [process.communicate(timeout=300)[0] for process in processes]
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
        smallest, count = map(int, log.split("send buffers")[-1].split())
        assert count >= 3  # the coordinator's connection and gloo's to the 3 other devices
        assert smallest >= 16384, log[-2000:]
