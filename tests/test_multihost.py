"""Two processes on localhost (gloo collectives) train like one process."""

import numpy as np
import pytest

from tests.trainer_process import distributed_flags, free_port, launch_trainer, read_metrics

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
    batches, same gradients, same updates."""
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
