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
import time
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


def open_clip_model_kwargs(model_config):
    """OpenCLIP `CLIP(**kwargs)` of the same architecture as a ViT config.model
    (any preset or the tiny one), with its patch dropout (OpenCLIP's
    `patch_dropout`, applied in train mode); ResNet towers are not mapped
    (ValueError)."""
    image, text = model_config.image, model_config.text
    if image.kind != "vit":
        raise ValueError(f"the OpenCLIP reference maps ViT image towers only, not {image.kind!r}")
    return dict(
        embed_dim=model_config.embed_dim,
        quick_gelu=model_config.activation == "quick_gelu",
        vision_cfg=dict(image_size=image.image_size, patch_size=image.patch_size,
                        width=image.width, layers=image.layers,
                        head_width=image.width // image.heads, mlp_ratio=image.mlp_ratio,
                        patch_dropout=image.get("patch_dropout", 0.0)),
        text_cfg=dict(context_length=text.context_length, vocab_size=text.vocab_size,
                      width=text.width, heads=text.heads, layers=text.layers,
                      mlp_ratio=text.mlp_ratio))


def open_clip_train_step_times(config, steps, warmup, seed=0):
    """Seconds of each timed OpenCLIP training step (after `warmup` untimed ones) of
    config's ViT architecture, global batch, compute dtype and AdamW settings, on
    PyTorch's CPU threads: forward, OpenCLIP's symmetric contrastive loss (as its
    ClipLoss on one process), backward, global-norm clipping when the config clips
    (as OpenCLIP's `--grad-clip-norm`), AdamW step. bfloat16 runs under autocast,
    as OpenCLIP's `--precision amp_bf16`."""
    import torch  # noqa: PLC0415  (optional dependency)

    model_lib, _, _ = open_clip_modules()
    torch.manual_seed(seed)
    model = model_lib.CLIP(**open_clip_model_kwargs(config.model)).train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2),
                                  eps=opt.eps, weight_decay=opt.weight_decay)
    size, text = config.model.image.image_size, config.model.text
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(config.batch_size, 3, size, size, generator=generator)
    tokens = torch.randint(1, text.vocab_size, (config.batch_size, text.context_length),
                           generator=generator)
    labels = torch.arange(config.batch_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                              enabled=config.model.dtype == "bfloat16")

    def step():
        with autocast:
            image_features, text_features, logit_scale = model(images, tokens)
            logits = logit_scale * image_features @ text_features.T
            loss = (torch.nn.functional.cross_entropy(logits, labels)
                    + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
        optimizer.step()
        return float(loss.detach())  # waits for the step, as block_until_ready does

    seconds = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        step()
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
    return seconds


if __name__ == "__main__":
    # python -m clip_jax.references --train-step-times CONFIG_JSON STEPS WARMUP: prints
    # the timed steps' seconds as one JSON list (benchmark train --reference open_clip).
    import ml_collections  # noqa: PLC0415

    _, flag, config_json, steps, warmup = sys.argv
    if flag != "--train-step-times":
        raise SystemExit(f"unknown command {flag!r}")
    config = ml_collections.ConfigDict(json.loads(config_json))
    print(json.dumps(open_clip_train_step_times(config, int(steps), int(warmup))))
