"""Config files as the trainer's --config names them: `path/to/file.py[:arg]`,
a Python file whose get_config(arg) returns an ml_collections.ConfigDict.

The library reads config files by path, as the trainer's flag does, and never
imports the `configs` package: configs build on the library, not the reverse.
"""

import importlib.util
import os

# The trainer's default --config file, beside the package in a clone or an install.
DEFAULT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "clip.py")


def load_module(path):
    """The config file at `path` (e.g. configs/clip.py) as a module; a missing
    file is a one-line FileNotFoundError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(
        f"_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec):
    """'path/to/file.py[:arg]' -> that file's get_config(arg) (arg None when absent);
    a bare argument ('ViT-B-32', 'tiny,total_steps=10') is one of DEFAULT_FILE's."""
    if ".py" not in spec:
        return load_module(DEFAULT_FILE).get_config(spec or None)
    path, _, arg = spec.partition(":")
    return load_module(path).get_config(arg or None)
