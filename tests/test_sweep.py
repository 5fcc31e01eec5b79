"""Sweeps: a declared sweep expands to named runs, the launcher prints and runs
their trainer commands (skipping finished runs, going on past failed ones), and
collect turns the runs into an ablation table, CSV and plot."""

import csv
import json
import os
import shlex
import sys

import pytest

from clip_jax import cpu_devices
from configs import sweeps
from configs.clip import get_sweep
from launch import ablation, sweep, sweep_plan
from tests.trainer_process import REPO, TINY_RUN, read_metrics

CONFIG = f"{os.path.join(REPO, 'configs', 'clip.py')}:tiny"
TOP1 = "zeroshot/synthetic_shapes/top1"
LR_BATCH = [{"optimizer.lr": 1e-3, "batch_size": 64}, {"optimizer.lr": 1e-3, "batch_size": 128},
            {"optimizer.lr": 4e-3, "batch_size": 64}, {"optimizer.lr": 4e-3, "batch_size": 128}]
LR_BATCH_NAMES = ["optimizer.lr=0.001_batch_size=64", "optimizer.lr=0.001_batch_size=128",
                  "optimizer.lr=0.004_batch_size=64", "optimizer.lr=0.004_batch_size=128"]


def test_lr_batch_grid_expands_to_four_runs_with_distinct_names():
    runs = get_sweep("lr_batch")
    assert runs == LR_BATCH
    assert sweep_plan.run_names(runs) == LR_BATCH_NAMES


def test_product_zipped_and_unsafe_names():
    assert sweeps.zipped({"a": [1, 2], "b.c": ["x", "y"]}) == [{"a": 1, "b.c": "x"},
                                                               {"a": 2, "b.c": "y"}]
    with pytest.raises(ValueError, match="differ in length"):
        sweeps.zipped({"a": [1, 2], "b": [1]})
    assert len(sweeps.product({"a": [1, 2, 3], "b": [1, 2], "c": [0]})) == 6
    assert sweep_plan.run_name({"data.train": "my data/v1:train"}) == "data.train=my-data-v1-train"
    long_name = sweep_plan.run_name({"data.train": "x" * 300})
    assert len(long_name) == sweep_plan.MAX_NAME_LENGTH
    with pytest.raises(ValueError, match="same workdir name"):
        sweep_plan.run_names([{"k": "a/b"}, {"k": "a:b"}])


def test_unknown_sweep_and_keys_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown sweep 'lr'; choose one of lr_batch, "):
        get_sweep("lr")
    with pytest.raises(sweep.SweepError, match="no config key 'optimizer.rate'"):
        sweep.run_sweep(CONFIG, "lr_batch", "/nonexistent", ["optimizer.rate=1"])
    with pytest.raises(sweep.SweepError, match="--set batch_size is swept"):
        sweep.run_sweep(CONFIG, "lr_batch", "/nonexistent", ["batch_size=8"])


def _commands(printed):
    return [shlex.split(line) for line in printed.splitlines() if line and line[0] != "#"]


def test_dry_run_prints_the_four_trainer_commands(tmp_path, capsys):
    assert sweep.main(["run", "--config", CONFIG, "--sweep", "lr_batch", "--root",
                       str(tmp_path), "--set", "total_steps=3", "--dry-run"]) == 0
    commands = _commands(capsys.readouterr().out)
    assert commands == [
        [sys.executable, "-m", "clip_jax.train", "--config", CONFIG,
         "--workdir", str(tmp_path / name), f"--config.optimizer.lr={run['optimizer.lr']}",
         f"--config.batch_size={run['batch_size']}", "--config.total_steps=3"]
        for name, run in zip(LR_BATCH_NAMES, LR_BATCH)]
    assert os.listdir(tmp_path) == []  # a dry run writes nothing


TPU_ARGS = ["--name", "sweep-tpu", "--zone", "us-central2-b", "--accelerator-type", "v4-16",
            "--repo", "https://example.com/clip_jax.git", "--ref", "abc123"]


def test_emitted_tpu_and_slurm_commands_are_what_the_launchers_accept(capsys):
    from launch import slurm, tpu_vm
    workdir = ("gs://bucket/sweep/loss.kind=sigmoid_model.logit_scale_init=2.302585_"
               "model.logit_bias_init=-10.0")
    overrides = ["--config.loss.kind=sigmoid", "--config.model.logit_scale_init=2.302585",
                 "--config.model.logit_bias_init=-10.0"]
    sweep.main(["run", "--config", "configs/clip.py:tiny", "--sweep", "loss", "--root",
                "gs://bucket/sweep", "--emit", "tpu", "--", *TPU_ARGS])
    commands = _commands(capsys.readouterr().out)
    assert len(commands) == 2
    assert commands[1] == ["python", "-m", "launch.tpu_vm", *TPU_ARGS, "--config",
                           "configs/clip.py:tiny", "--workdir", workdir, *overrides]
    tpu_slice, job, _ = tpu_vm.parse(commands[1][3:])
    assert (tpu_slice.name, job.workdir) == ("sweep-tpu", workdir)
    assert list(job.trainer_args) == ["--config", "configs/clip.py:tiny", *overrides]

    sweep.main(["run", "--config", "configs/clip.py:tiny", "--sweep", "loss", "--root",
                "gs://bucket/sweep", "--emit", "slurm", "--", "--nodes", "2",
                "--gpus_per_node", "4"])
    commands = _commands(capsys.readouterr().out)
    options, trainer_args = slurm.parse(commands[1][3:])
    assert (options.nodes, options.workdir) == (2, workdir)
    assert trainer_args == ["--config", "configs/clip.py:tiny", *overrides]


def test_collect_without_sweep_records_uses_the_differing_config_values(tmp_path):
    for lr, top1 in ((0.1, 0.5), (0.01, 0.75)):
        run = tmp_path / f"run_{lr}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"optimizer": {"lr": lr}, "seed": 0}))
        (run / "metrics.jsonl").write_text(
            json.dumps({"step": 1, TOP1: top1 + 0.1}) + "\n" + json.dumps({"step": 2, TOP1: top1})
            + "\n" + json.dumps({"step": 2, "train/loss": 1.0}) + "\n{\"step\": 3")
    header, rows = ablation.table(ablation.with_overrides(ablation.read_runs(str(tmp_path))),
                                  TOP1)
    assert header[0] == "optimizer.lr"
    assert rows == [[0.01, 2, 0.75, 1.0, 0.85, 1], [0.1, 2, 0.5, 1.0, 0.6, 1]]


# A user's own config file: the tiny config with a two-run sweep of its own.
PAIR_CONFIG = """
from configs import clip

get_config = clip.get_config


def get_sweep(name):
    return {"pair": [{"optimizer.lr": 1e-3, "batch_size": 64},
                     {"optimizer.lr": 4e-3, "batch_size": 128}]}[name]
"""
PAIR = [{"optimizer.lr": 1e-3, "batch_size": 64}, {"optimizer.lr": 4e-3, "batch_size": 128}]
PAIR_NAMES = ["optimizer.lr=0.001_batch_size=64", "optimizer.lr=0.004_batch_size=128"]


@pytest.mark.slow
def test_sweep_trains_every_run_then_collects_a_table(tmp_path, shrunk_data_dir, monkeypatch,
                                                      capsys):
    """A two-run sweep from a user's config file on the tiny trainer, 2 steps a
    run. A setting that only the batch-128 run accepts fails the batch-64 one: the
    sweep goes on and reports it; a re-run trains it and skips the finished one."""
    # One device per run; the suite's other XLA flags (tests/conftest.py builds the
    # code at -O0, which compiling dominates) stay.
    monkeypatch.setenv("XLA_FLAGS", cpu_devices.xla_flags(1, os.environ.get("XLA_FLAGS", "")))
    monkeypatch.setenv("PYTHONPATH", REPO)
    # The runs share their eval programs: compile them once.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    config_file = tmp_path / "my_config.py"
    config_file.write_text(PAIR_CONFIG)
    config = f"{config_file}:tiny"
    root = tmp_path / "sweep"
    tiny = {**TINY_RUN, "total_steps": 2, "data.data_dir": shrunk_data_dir}
    sets = [f"{key}={value}" for key, value in tiny.items() if key != "batch_size"]

    failed = sweep.run_sweep(config, "pair", str(root), [*sets, "loss.chunk_size=128"])
    assert failed == [PAIR_NAMES[0]]
    assert "FAILED" in capsys.readouterr().out
    assert sweep.run_sweep(config, "pair", str(root), sets) == []
    printed = capsys.readouterr().out
    assert printed.count("finished (step 2), skipped") == 1
    assert "1 trained, 1 already finished, 0 failed" in printed

    for name, run in zip(PAIR_NAMES, PAIR):
        workdir = root / name
        run_config = json.loads((workdir / "config.json").read_text())
        assert (run_config["optimizer"]["lr"], run_config["batch_size"],
                run_config["total_steps"]) == (run["optimizer.lr"], run["batch_size"], 2)
        assert json.loads((workdir / "sweep.json").read_text())["overrides"] == run
        assert [row["step"] for row in read_metrics(workdir) if "train/loss" in row] == [1, 2]

    # Every run finished: nothing is trained again.
    logs = {name: (root / name / "train.log").read_text() for name in PAIR_NAMES}
    assert sweep.run_sweep(config, "pair", str(root), sets) == []
    assert capsys.readouterr().out.count("skipped") == 2
    assert logs == {name: (root / name / "train.log").read_text() for name in PAIR_NAMES}

    assert sweep.main(["collect", "--root", str(root), "--metric", TOP1,
                       "--x", "optimizer.lr"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.splitlines()[0] == (
        f"| optimizer.lr | batch_size | steps | final {TOP1} | final train/loss | best {TOP1} "
        "| best at step |")
    assert len([line for line in markdown.splitlines() if line.startswith("| 0.00")]) == 2
    with open(root / "ablation.csv") as f:
        table = list(csv.reader(f))
    assert len(table) == 3
    assert [row[:3] for row in table[1:]] == [
        [str(run["optimizer.lr"]), str(run["batch_size"]), "2"] for run in PAIR]
    for row in table[1:]:
        final_top1, loss, best_top1, best_step = map(float, row[3:])
        assert 0 <= final_top1 <= 1 and loss > 0 and best_top1 == final_top1 and best_step == 2
    with open(root / "ablation.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
