"""Launchers: the exact commands they print in dry runs and the TPU preemption
loop against a scripted gcloud (no gcloud runs)."""

import os
import subprocess
import sys

from launch import tpu_vm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POD_SLICE_FLAGS = ["--name", "clip-run", "--zone", "us-central2-b", "--accelerator-type",
                   "v4-16", "--version", "tpu-ubuntu2204-base", "--spot",
                   "--workdir", "gs://bucket/run", "--config", "configs/clip.py:ViT-B-32",
                   "--config.batch_size=4096",
                   "--repo", "https://github.com/example/clip_jax.git", "--ref", "0123abc"]
INSTALL_LINE = (
    "gcloud compute tpus tpu-vm ssh clip-run --zone us-central2-b --worker=all --command "
    "'rm -rf ~/clip_jax && git clone -q https://github.com/example/clip_jax.git ~/clip_jax"
    " && cd ~/clip_jax && git checkout -q 0123abc && python3 -m pip install -q -e \".[tpu]\"'")
TRAIN_LINE = (
    "gcloud compute tpus tpu-vm ssh clip-run --zone us-central2-b --worker=all --command "
    "'set -o pipefail; cd ~/clip_jax && python3 -m clip_jax.train --distributed_auto "
    "--workdir gs://bucket/run --config configs/clip.py:ViT-B-32 --config.batch_size=4096 "
    "--config.log_every=10 2>&1 | tee -a ~/clip_jax_train.log'")


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_tpu_dry_run_prints_the_pod_slice_commands(capsys):
    assert tpu_vm.main(POD_SLICE_FLAGS + ["--dry-run", "--", "--config.log_every=10"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "gcloud compute tpus tpu-vm create clip-run --zone us-central2-b "
        "--accelerator-type v4-16 --version tpu-ubuntu2204-base --spot",
        INSTALL_LINE,
        TRAIN_LINE,
        "gcloud compute tpus tpu-vm delete clip-run --zone us-central2-b --quiet",
    ]


def test_tpu_dry_run_prints_the_queued_resource_commands(capsys):
    assert tpu_vm.main(POD_SLICE_FLAGS + ["--queued", "--dry-run", "--",
                                          "--config.log_every=10"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "gcloud compute tpus queued-resources create clip-run --zone us-central2-b "
        "--node-id clip-run --accelerator-type v4-16 --runtime-version tpu-ubuntu2204-base "
        "--spot",
        "gcloud compute tpus queued-resources describe clip-run --zone us-central2-b "
        "--format 'value(state.state)'",
        INSTALL_LINE,
        TRAIN_LINE,
        "gcloud compute tpus queued-resources delete clip-run --zone us-central2-b "
        "--force --quiet",
    ]


def test_tpu_local_workdir_is_a_one_line_error():
    result = _cli("launch.tpu_vm", *[flag.replace("gs://bucket/run", "/tmp/run")
                                    for flag in POD_SLICE_FLAGS], "--dry-run")
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--workdir=/tmp/run" in result.stderr and "gs://" in result.stderr
    assert "Traceback" not in result.stderr


class ScriptedGcloud(tpu_vm.Shell):
    """Records the commands; training runs and `describe` answers follow a script
    (a state string, or None for a VM that no longer exists)."""

    def __init__(self, train_statuses, states):
        super().__init__(poll_seconds=0)
        self.train_statuses, self.states, self.log = list(train_statuses), list(states), []

    def run(self, command):
        if command[3] == "tpu-vm" and command[4] == "ssh":
            is_train = "clip_jax.train" in command[-1]
            self.log.append("train" if is_train else "install")
            return self.train_statuses.pop(0) if is_train else 0
        self.log.append(" ".join(command[3:5]))
        return 0

    def query(self, command):
        self.log.append(" ".join(command[3:5]))
        state = self.states.pop(0)
        if state is None:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: (gcloud.compute.tpus."
                                               "tpu-vm.describe) NOT_FOUND: Resource not found")
        return subprocess.CompletedProcess(command, 0, f"{state}\n", "")


SLICE = tpu_vm.Slice("clip-run", "us-central2-b", "v4-16", "tpu-ubuntu2204-base", "spot")
JOB = tpu_vm.Job("https://github.com/example/clip_jax.git", "0123abc", "gs://bucket/run")


def test_tpu_preempted_slice_is_recreated_and_training_rerun():
    gcloud = ScriptedGcloud(train_statuses=[255, 0], states=["PREEMPTED", "READY"])
    assert tpu_vm.launch(SLICE, JOB, gcloud) == 0
    assert gcloud.log == ["tpu-vm create", "install", "train", "tpu-vm describe",
                          "tpu-vm delete", "tpu-vm create", "install", "train",
                          "tpu-vm describe", "tpu-vm delete"]


def test_tpu_failure_on_a_healthy_slice_is_final():
    gcloud = ScriptedGcloud(train_statuses=[1], states=["READY"])
    assert tpu_vm.launch(SLICE, JOB, gcloud) == 1
    assert gcloud.log == ["tpu-vm create", "install", "train", "tpu-vm describe",
                          "tpu-vm delete"]


def test_tpu_gives_up_after_max_restarts():
    gcloud = ScriptedGcloud(train_statuses=[255, 255], states=["PREEMPTED", None])
    assert tpu_vm.launch(SLICE, JOB, gcloud, max_restarts=1) == 255
    assert gcloud.log == ["tpu-vm create", "install", "train", "tpu-vm describe",
                          "tpu-vm delete", "tpu-vm create", "install", "train",
                          "tpu-vm describe", "tpu-vm delete"]


def test_tpu_queued_resource_is_polled_until_active_and_kept():
    queued = tpu_vm.Slice("clip-run", "us-central2-b", "v4-16", "tpu-ubuntu2204-base", "spot",
                          queued=True)
    gcloud = ScriptedGcloud(train_statuses=[0],
                            states=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "READY"])
    assert tpu_vm.launch(queued, JOB, gcloud, keep=True) == 0
    assert gcloud.log == ["queued-resources create"] + ["queued-resources describe"] * 3 + [
        "install", "train", "tpu-vm describe"]


def test_tpu_default_repo_and_ref_come_from_the_checkout(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True,
                              capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    git("remote", "add", "origin", "https://github.com/example/clip_jax.git")
    assert tpu_vm.local_checkout(tmp_path) == (
        "https://github.com/example/clip_jax.git", git("rev-parse", "HEAD"), False)
