"""The README's notebook snippet runs as written (IPython `!` lines aside)."""

import os
import re

import numpy as np
import pytest

from clip_jax import train as train_lib
from clip_jax.data import synthetic_shapes
from tests.conftest import small_config

pytestmark = pytest.mark.slow
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def notebook_snippet():
    with open(README) as f:
        text = f.read()
    block = re.search(r"<!-- notebook-snippet -->\n```python\n(.*?)```\n<!-- /notebook-snippet -->",
                      text, re.S)
    assert block, "README.md lost its notebook snippet markers"
    return "\n".join(line for line in block.group(1).splitlines() if not line.startswith("!"))


def test_the_notebook_snippet_runs_on_a_trained_workdir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synthetic_shapes.SyntheticShapes, "train_examples", 64)
    monkeypatch.setattr(synthetic_shapes.SyntheticShapes, "test_examples", 32)
    workdir = str(tmp_path / "clip_tiny")
    config = small_config(**{"data.data_dir": str(tmp_path / "tfds"), "total_steps": 2,
                             "eval_every": 0, "evals.zeroshot.batch_size": 32,
                             "evals.retrieval.batch_size": 32})
    train_lib.train(config, workdir)
    code = notebook_snippet()
    assert '"/tmp/clip_tiny"' in code
    namespace = {}
    exec(compile(code.replace('"/tmp/clip_tiny"', repr(workdir)), "README snippet", "exec"),
         namespace)
    probabilities = namespace["probabilities"]
    assert probabilities.shape == (3, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    for name, rows in (("image_embeddings", 3), ("text_embeddings", 4)):
        embeddings = namespace[name]
        assert embeddings.shape == (rows, config.model.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    printed = capsys.readouterr().out.splitlines()[-3:]
    assert all(line.split()[-1].replace(".", "").isdigit() for line in printed)
