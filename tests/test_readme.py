"""The README's notebook snippet runs as written (IPython `!` lines aside)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from clip_jax import train as train_lib
from clip_jax.data import builtin_datasets
from tests.conftest import small_config

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def notebook_snippet():
    """The snippet as a notebook runs it: `!` shell lines are the reader's set-up
    (done here by the test), `%cd DIR` changes directory."""
    with open(README) as f:
        text = f.read()
    block = re.search(r"<!-- notebook-snippet -->\n```python\n(.*?)```\n<!-- /notebook-snippet -->",
                      text, re.S)
    assert block, "README.md lost its notebook snippet markers"
    lines = []
    for line in block.group(1).splitlines():
        if line.startswith("%cd "):
            lines.append(f"import os; os.chdir({line[4:].split('#')[0].strip()!r})")
        elif not line.startswith("!"):
            lines.append(line)
    return "\n".join(lines)


# What the test reads back from the snippet's fresh interpreter.
REPORT = """
import json, numpy as np
print("REPORT " + json.dumps({
    "probabilities": np.asarray(probabilities).tolist(),
    "image_norms": np.linalg.norm(image_embeddings, axis=1).tolist(),
    "text_norms": np.linalg.norm(text_embeddings, axis=1).tolist(),
    "embed_dim": int(image_embeddings.shape[1]), "module": clip_jax.__file__}))
"""


def test_the_notebook_snippet_runs_in_a_fresh_interpreter_beside_the_clone(
        tmp_path, monkeypatch):
    """Trained here; the snippet then runs as `python -c` (a notebook's import
    path: the working directory first) from a folder holding the clone as
    `clip_jax`, as the README's `pip install -e clip_jax` has it."""
    monkeypatch.setattr(builtin_datasets.SyntheticShapes, "train_examples", 64)
    monkeypatch.setattr(builtin_datasets.SyntheticShapes, "test_examples", 32)
    workdir = str(tmp_path / "clip_tiny")
    config = small_config(**{"data.data_dir": str(tmp_path / "tfds"), "total_steps": 2,
                             "eval_every": 0, "evals.zeroshot.batch_size": 32,
                             "evals.retrieval.batch_size": 32})
    train_lib.train(config, workdir)
    code = notebook_snippet()
    assert '"/tmp/clip_tiny"' in code
    beside = tmp_path / "notebook"
    beside.mkdir()
    os.symlink(REPO, beside / "clip_jax")
    done = subprocess.run([sys.executable, "-c", code.replace('"/tmp/clip_tiny"', repr(workdir))
                           + REPORT], cwd=beside, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [line for line in done.stdout.splitlines() if not line.startswith("REPORT ")]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    probabilities = np.asarray(report["probabilities"])
    assert probabilities.shape == (3, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(report["image_norms"] + report["text_norms"], 1.0, rtol=1e-5)
    assert report["embed_dim"] == config.model.embed_dim
    assert report["module"].startswith(REPO)
    assert len(printed) >= 3 and all(line.split()[-1].replace(".", "").isdigit()
                                     for line in printed[-3:])
