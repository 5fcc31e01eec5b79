"""PyTorch reference implementations, for the interchange tests and side-by-side
benchmarks: OpenCLIP (`pip install --no-deps open_clip_torch`) and PyTorch.

OpenCLIP's package __init__ imports torchvision for its image transforms, and
PyPI's torchvision does not import beside a CPU-only torch build, so the model
and tokenizer modules are loaded directly, with a stand-in for the one
torchvision class its utils module names (FrozenBatchNorm2d, used only by
`lock_image_tower`, which nothing here calls).
"""

import functools
import importlib.util
import json
import os
import sys
import types


class ReferenceUnavailable(ImportError):
    """A reference implementation is not installed; the message says how to get it."""


@functools.lru_cache(maxsize=None)
def open_clip_modules():
    """(open_clip.model, open_clip.tokenizer, model_configs directory)."""
    try:
        import torch  # noqa: PLC0415
        import transformers  # noqa: F401,PLC0415  (before the stand-in: it must see no torchvision)
    except ImportError as error:
        raise ReferenceUnavailable(f"OpenCLIP needs {error.name}: pip install 'clip_jax[test]'") from None
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ReferenceUnavailable("OpenCLIP is not installed: "
                                   "pip install --no-deps open_clip_torch==3.3.0")
    if "open_clip" not in sys.modules:
        package = types.ModuleType("open_clip")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["open_clip"] = package
        if importlib.util.find_spec("torchvision") is None:
            misc = types.ModuleType("torchvision.ops.misc")
            misc.FrozenBatchNorm2d = torch.nn.BatchNorm2d
            sys.modules.update({"torchvision": types.ModuleType("torchvision"),
                                "torchvision.ops": types.ModuleType("torchvision.ops"),
                                "torchvision.ops.misc": misc})
    import open_clip.model as model  # noqa: PLC0415
    import open_clip.tokenizer as tokenizer  # noqa: PLC0415
    configs = os.path.join(list(spec.submodule_search_locations)[0], "model_configs")
    return model, tokenizer, configs


def open_clip_config(name):
    """OpenCLIP's JSON config of a model name (e.g. 'ViT-B-32-quickgelu')."""
    _, _, configs = open_clip_modules()
    with open(os.path.join(configs, f"{name}.json")) as f:
        return json.load(f)
