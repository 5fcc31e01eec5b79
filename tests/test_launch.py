"""Launchers: the exact commands and batch script they print in dry runs, the TPU
preemption loop against a scripted gcloud, and the local launcher's process
handling on tiny `python -c` children (no trainer, no gcloud, no SLURM)."""

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

from clip_jax import cpu_devices
from launch import local, slurm, tpu_vm

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


def test_slurm_dry_run_writes_and_prints_the_batch_script(tmp_path, capsys):
    script_path = str(tmp_path / "job.sbatch")
    assert slurm.main(["--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu",
                       "--time", "24:00:00", "--job_name", "b32", "--output", "logs/%x-%j.out",
                       "--requeue", "--workdir", "/shared/runs/b32",
                       "--config", "configs/clip.py:ViT-B-32", "--config.batch_size=4096",
                       "--script", script_path, "--dry-run"]) == 0
    expected_script = textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --job-name=b32
        #SBATCH --nodes=2
        #SBATCH --ntasks=8
        #SBATCH --ntasks-per-node=4
        #SBATCH --gpus-per-task=1
        #SBATCH --partition=gpu
        #SBATCH --time=24:00:00
        #SBATCH --output=logs/%x-%j.out
        #SBATCH --open-mode=append
        #SBATCH --requeue
        #SBATCH --signal=B:USR1@120

        # Each task sees only its own GPU, as device 0.
        export JAX_LOCAL_DEVICE_IDS=0

        # USR1 comes 120 s before the time limit: SIGTERM goes to the training tasks
        # (by scancel: srun would turn it into SIGKILL), they save at the next step boundary and
        # exit 0, then the job is requeued and resumes from the workdir.
        time_limit=0
        trap 'time_limit=1; scancel --signal=TERM "$SLURM_JOB_ID"' USR1

        srun --kill-on-bad-exit=1 python -m clip_jax.train --distributed_auto --workdir /shared/runs/b32 --config configs/clip.py:ViT-B-32 --config.batch_size=4096 &
        srun_pid=$!
        wait "$srun_pid"
        status=$?
        if [ "$time_limit" = 1 ]; then
            # The trap interrupted the wait above: wait for the save.
            wait "$srun_pid"
            status=$?
            if [ "$status" = 0 ]; then
                scontrol requeue "$SLURM_JOB_ID"
            fi
        fi
        exit "$status"
        """)
    assert capsys.readouterr().out.splitlines() == (
        expected_script.splitlines() + [f"sbatch {script_path}"])
    with open(script_path) as f:
        assert f.read() == expected_script
    assert subprocess.run(["bash", "-n", script_path]).returncode == 0


def test_slurm_one_task_per_node_drives_all_its_gpus():
    sbatch, devices = slurm.resource_lines(nodes=2, gpus_per_node=4, task_per_node=True)
    assert sbatch == ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --gpus-per-node=4"]
    assert devices[-1] == "export JAX_LOCAL_DEVICE_IDS=0,1,2,3"


def test_local_dry_run_prints_each_process_with_its_environment(capsys):
    assert local.main(["--processes", "2", "--gpus_per_process", "2", "--port", "12345",
                       "--dry-run", "--", "--workdir", "/tmp/run",
                       "--config", "configs/clip.py:tiny"]) == 0
    python = shlex.quote(sys.executable)
    assert capsys.readouterr().out.splitlines() == [
        f"CUDA_VISIBLE_DEVICES=0,1 {python} -m clip_jax.train "
        "--coordinator_address=localhost:12345 --num_processes=2 --process_id=0 "
        "--workdir /tmp/run --config configs/clip.py:tiny",
        f"CUDA_VISIBLE_DEVICES=2,3 {python} -m clip_jax.train "
        "--coordinator_address=localhost:12345 --num_processes=2 --process_id=1 "
        "--workdir /tmp/run --config configs/clip.py:tiny > /tmp/run/process_1.log 2>&1",
    ]


def test_local_dry_run_on_cpu_devices(capsys):
    assert local.main(["--processes", "2", "--cpu_devices", "4", "--port", "12345",
                       "--log_dir", "/tmp/logs", "--dry-run", "--", "--workdir=gs://b/r"]) == 0
    python = shlex.quote(sys.executable)
    cpu = f"JAX_PLATFORMS=cpu XLA_FLAGS={shlex.quote(cpu_devices.xla_flags(4))}"
    flags = "--coordinator_address=localhost:12345 --num_processes=2"
    assert capsys.readouterr().out.splitlines() == [
        f"{cpu} {python} -m clip_jax.train {flags} --process_id=0 --workdir=gs://b/r",
        f"{cpu} {python} -m clip_jax.train {flags} --process_id=1 --workdir=gs://b/r"
        " > /tmp/logs/process_1.log 2>&1",
    ]


def _python(code):
    return (sys.executable, "-c", textwrap.dedent(code))


def _sigterm_marker(path):
    """A child that writes `path` when SIGTERM arrives, then exits 0 (as the trainer
    does after saving); it says `ready` once the handler is in place."""
    return _python(f"""
        import signal, sys, time
        def on_term(signum, frame):
            open({str(path)!r}, "w").close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep(60)
        """)


def _wait_for(path, text):
    """Python lines (for _python) that wait until the file at `path` holds `text`."""
    return f"""
        import os, time
        while not (os.path.exists({str(path)!r}) and {text!r} in open({str(path)!r}).read()):
            time.sleep(0.02)
        """


def test_local_failure_stops_the_others_and_propagates_its_status(tmp_path, capfd):
    log = tmp_path / "process_1.log"
    failing = _python(_wait_for(log, "ready") + """
        print("process 0 fails on", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
        raise SystemExit(3)
        """)
    specs = [local.Process(failing, (("CUDA_VISIBLE_DEVICES", "0,1"),)),
             local.Process(_sigterm_marker(tmp_path / "terminated"), log_path=str(log))]
    assert local.run(specs) == 3
    assert (tmp_path / "terminated").exists()
    assert "process 0 fails on 0,1" in capfd.readouterr().out  # streamed, with its variables
    assert log.read_text() == "ready\n"  # process 1 writes to its log


def test_local_sigterm_reaches_every_process(tmp_path):
    """The launcher as a process of its own, as under a scheduler or a terminal."""
    markers = [tmp_path / f"terminated_{i}" for i in range(2)]
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    specs = [local.Process(_sigterm_marker(marker), log_path=str(log))
             for marker, log in zip(markers, logs)]
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from launch.local import Process, run; "
         f"sys.exit(run({specs!r}))"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stderr=subprocess.PIPE, text=True)
    try:
        while not all(log.exists() and log.read_text() == "ready\n" for log in logs):
            assert launcher.poll() is None, launcher.stderr.read()
            time.sleep(0.02)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0  # both children "saved" and exited 0
    finally:
        launcher.kill()
        launcher.wait()
    assert all(marker.exists() for marker in markers)
    assert "SIGTERM to 2 processes" in launcher.stderr.read()


def test_simulated_device_flags_replace_the_count_and_keep_chosen_timeouts():
    flags = cpu_devices.xla_flags(4, "--xla_force_host_platform_device_count=8 "
                                     "--xla_cpu_collective_call_terminate_timeout_seconds=5 --other")
    assert flags.split() == ["--xla_cpu_collective_call_terminate_timeout_seconds=5", "--other",
                             "--xla_force_host_platform_device_count=4",
                             "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300"]
