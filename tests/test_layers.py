"""Layers point down: configs import the library, never the reverse; no import
cycles (function-level imports included); `import clip_jax` stays light;
loading weights for inference builds no optimizer."""

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clip_jax import optim, output_vocab, pretrained, run_config
from clip_jax import train as train_lib
from clip_jax.data import builtin_datasets
from tests.conftest import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_modules():
    """{dotted module name: path} of every module under clip_jax/."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(REPO, "clip_jax")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def imports_of(path, module, modules):
    """Dotted names `module` imports anywhere in its file (function bodies too),
    resolved to modules of `modules` where they are one, else as written."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = library_modules()
    return {module: imports_of(path, module, modules) for module, path in modules.items()}


def test_the_library_never_imports_configs(graph):
    assert {module: sorted(d for d in deps if d.split(".")[0] == "configs")
            for module, deps in graph.items()
            if any(d.split(".")[0] == "configs" for d in deps)} == {}


def test_no_import_cycles(graph):
    cycles, state, path = [], {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for dep in sorted(d for d in graph[module] if d in graph):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


def test_models_know_no_dataset_optimizer_trainer_or_evaluator(graph):
    heavy = ("clip_jax.train", "clip_jax.train_step", "clip_jax.optim", "clip_jax.evals",
             "clip_jax.objectives", "clip_jax.checkpoint", "clip_jax.data",
             "clip_jax.output_vocab")
    assert {module: sorted(d for d in deps if d.startswith(heavy))
            for module, deps in graph.items() if module.startswith("clip_jax.models")
            and any(d.startswith(heavy) for d in deps)} == {}


def loaded_after(statement, modules):
    """Which of `modules` a fresh interpreter has loaded after running `statement`."""
    done = subprocess.run([sys.executable, "-c", f"import sys; {statement}; "
                           f"print(sorted(m for m in {tuple(modules)!r} if m in sys.modules))"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    return done.stdout.strip()


@pytest.mark.parametrize("statement", [
    "import clip_jax",
    # Launchers and sweeps read configs: that costs neither JAX nor Flax.
    "import configs.clip, configs.objectives; configs.clip.get_config('ViT-L-14,batch_size=64'); "
    "configs.objectives.get_config('objective=caption_lm')",
])
def test_light_imports_load_neither_jax_nor_flax(statement):
    assert loaded_after(statement, ("jax", "flax", "tensorflow", "orbax")) == "[]"


def test_commands_that_read_no_data_import_no_tensorflow():
    """Planning, benchmarking, converting, loading weights and launching sweeps
    need no TensorFlow; only the data pipelines (training, evaluation, prepare) do."""
    modules = ("clip_jax.benchmark", "clip_jax.convert", "clip_jax.pretrained",
               "clip_jax.capacity", "launch.sweep", "launch.tpu_vm", "launch.slurm")
    assert loaded_after(f"import {', '.join(modules)}",
                        ("tensorflow", "tensorflow_datasets")) == "[]"


def test_loading_a_workdir_builds_no_optimizer(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_datasets.SyntheticShapes, "train_examples", 64)
    monkeypatch.setattr(builtin_datasets.SyntheticShapes, "test_examples", 32)
    workdir = str(tmp_path / "run")
    train_lib.train(small_config(**{"data.data_dir": str(tmp_path / "tfds"), "total_steps": 1,
                                    "eval_every": 0, "evals": {}}), workdir)

    def no_optimizer(*args, **kwargs):
        raise AssertionError("clip_jax.load built an optimizer")

    monkeypatch.setattr(optim, "make_optimizer", no_optimizer)
    clip = pretrained.load(workdir)
    assert clip.encode_texts(["a red circle"]).shape == (1, small_config().model.embed_dim)
    # The 16 px ViT at 32 px: preprocessing at that size, positions resampled to 4 x 4.
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    larger = pretrained.load(workdir, image_size=32)
    assert larger.preprocess([image]).shape == (1, 32, 32, 3)
    embeddings = larger.encode_images([image])
    assert embeddings.shape == (1, 16) and np.isfinite(embeddings).all()
    assert not np.allclose(embeddings, clip.encode_images([image]))


def test_earlier_runs_output_vocabulary_names_read_as_token_ids(tmp_path):
    config = small_config().to_dict()
    for name, ids in (("full", ()), ("synthetic_shapes", output_vocab.synthetic_shapes())):
        config["model"]["output_vocab"] = name
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert run_config.read(str(tmp_path)).model.output_vocab == ids


def test_importing_the_benchmark_cli_starts_nothing():
    """Simulated devices are requested when a benchmark runs, not on import."""
    done = subprocess.run([sys.executable, "-c", "import os; os.environ.pop('XLA_FLAGS', None); "
                           "import clip_jax.benchmark; print(os.environ.get('XLA_FLAGS'))"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.strip() == "None"
