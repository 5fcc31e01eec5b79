"""End-to-end: the trainer on a shrunk synthetic_shapes, with metrics and resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from clip_jax import cpu_devices
from clip_jax import train as train_lib
from clip_jax.data import builtin_datasets
from tests.conftest import small_config

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(autouse=True)
def small_dataset(monkeypatch):
    monkeypatch.setattr(builtin_datasets.SyntheticShapes, "train_examples", 256)
    monkeypatch.setattr(builtin_datasets.SyntheticShapes, "test_examples", 100)


def e2e_config(data_dir, total_steps):
    return small_config(**{"data.data_dir": data_dir,
                           "total_steps": total_steps, "log_every": 2, "eval_every": 3,
                           "checkpoint_every": 3, "optimizer.warmup_steps": 2})


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_writes_metrics_checkpoints_tensorboard_and_evals_the_cli_repeats(
        data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    final = train_lib.train(e2e_config(data_dir, 6), workdir)
    rows = read_rows(workdir)
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "zeroshot/synthetic_shapes/top1" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert [r["step"] for r in eval_rows] == [3, 6]
    for key in ("train/loss", "train/lr", "train/logit_scale", "train/samples_per_sec"):
        assert key in train_rows[-1]
    seconds = [r["train/seconds"] for r in train_rows]  # training time so far, evals left out
    assert 0 < seconds[0] < seconds[1] < seconds[2]
    assert 0.0 <= eval_rows[-1]["zeroshot/synthetic_shapes/top1"] <= 1.0
    assert final["zeroshot/synthetic_shapes/top1"] == eval_rows[-1]["zeroshot/synthetic_shapes/top1"]
    for direction in ("image_to_text", "text_to_image"):
        assert 0.0 <= eval_rows[-1][f"retrieval/synthetic_shapes/{direction}_r10"] <= 1.0
    assert eval_rows[-1]["retrieval/synthetic_shapes/captions"] == 100
    saved_steps = [name for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()]
    assert sorted(saved_steps) == ["3", "6"]
    assert any(name.startswith("events.out.tfevents")
               for name in os.listdir(os.path.join(workdir, "tensorboard")))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["total_steps"] == 6
    _check_the_evaluate_cli_gives_the_logged_numbers(workdir, eval_rows[-1], tmp_path)


def _check_the_evaluate_cli_gives_the_logged_numbers(workdir, logged, tmp_path):
    """Same checkpoint, same evaluators, another process: the same numbers."""
    output, report = str(tmp_path / "eval.json"), str(tmp_path / "report")
    env = dict(os.environ, XLA_FLAGS=cpu_devices.xla_flags(8, os.environ.get("XLA_FLAGS", "")),
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "clip_jax.evaluate", "--workdir", workdir,
                           "--output", output, "--report", report],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(output) as f:
        evaluated = json.load(f)
    assert evaluated["step"] == logged["step"] == 6
    for name, value in logged.items():
        if name != "step":
            assert evaluated[name] == value, name
    assert "zeroshot/synthetic_shapes/top1" in done.stdout
    assert sorted(os.listdir(report)) == ["confusion_synthetic_shapes.png", "metrics.png",
                                          "report.md"]
    with open(os.path.join(report, "report.md")) as f:
        assert "| `zeroshot/synthetic_shapes/top1` |" in f.read()


def _saved_variables(workdir, config):
    from clip_jax import convert, checkpoint
    return checkpoint.load_variables(workdir, convert.abstract_variables(config.model))


def test_finetune_from_a_run_with_a_locked_image_tower(data_dir, tmp_path):
    """LiT-style: init_from another run's weights, image tower locked."""
    pretrained, finetuned = str(tmp_path / "pretrained"), str(tmp_path / "finetuned")
    train_lib.train(e2e_config(data_dir, 3), pretrained)
    config = e2e_config(data_dir, 3)
    with config.unlocked():
        config.init_from, config.lock_image, config.seed = pretrained, True, 1
    train_lib.train(config, finetuned)
    before, after = _saved_variables(pretrained, config), _saved_variables(finetuned, config)
    jax.tree.map(np.testing.assert_array_equal, after["params"]["visual"],
                 before["params"]["visual"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()),
                                         after["params"]["text"], before["params"]["text"]))
    assert all(moved)


def test_output_to_a_file_gets_one_line_per_logged_step_and_no_bar_frames(
        data_dir, tmp_path, capfd):
    """pytest's capture is not a terminal, as a SLURM or TPU VM log is not. The
    profile of steps 4-5 (config.profile) is logged and its trace kept where
    TensorBoard's profile plugin looks."""
    config = e2e_config(data_dir, 6)
    with config.unlocked():
        config.evals.retrieval.every = -1
        config.profile.start_step, config.profile.steps = 4, 2
    train_lib.train(config, str(tmp_path / "run"))
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    lines = (out + err).splitlines()
    step_lines = [line for line in lines if line.startswith("step ") and "/6: loss" in line]
    assert [line.split("/")[0] for line in step_lines] == ["step 2", "step 4", "step 6"]
    assert "samples/s, ETA" in step_lines[-1]
    compiling = next(line for line in lines if line.startswith("compiling the train step"))
    assert lines.index(compiling) < lines.index(step_lines[0])
    evals = [line for line in lines if line.startswith("step 3: ")]
    assert evals and evals[0].startswith("step 3: zeroshot/synthetic_shapes top-1 ")
    profile = next(index for index, line in enumerate(lines)
                   if line.startswith("profile of steps 4-5, trace in "))
    assert lines[profile + 1].startswith("device time per step: matmul ")
    (trace,) = os.listdir(tmp_path / "run" / "plugins" / "profile" / "steps_4-5")
    assert trace.endswith("_process0.xplane.pb")


def test_eval_lines_lead_with_zero_shot_and_fit_a_terminal():
    row = {f"retrieval/coco/{direction}_r{k}": 0.5 for direction in ("image_to_text", "text_to_image")
           for k in (1, 5, 10)}
    row.update({"retrieval/coco/images": 5000, "zeroshot/imagenet2012/top1": 0.25,
                "zeroshot/imagenet2012/top5": 0.5, "zeroshot/imagenet2012/examples": 50000,
                "zeroshot/imagenet2012/skipped": 3, "retrieval/coco/skipped": 0})
    line = train_lib._eval_line(7, row)
    assert line == ("step 7: zeroshot/imagenet2012 top-1 0.25, skipped 3; "
                    "retrieval/coco i2t R@1 0.5, t2i R@1 0.5 (+6 in metrics.jsonl)")
    assert len(line) <= 120
