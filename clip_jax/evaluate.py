r"""Evaluates a trained or released CLIP: zero-shot classification, retrieval, linear probes.

A training workdir (its latest checkpoint, with the evals of its config):

  python -m clip_jax.evaluate --workdir /tmp/clip_tiny

Released or converted weights, on any prepared TFDS datasets:

  python -m clip_jax.evaluate --model ViT-B-32 --weights ViT-B-32.safetensors \
      --evals zeroshot:imagenet2012,zeroshot:cifar10,retrieval:coco_captions \
      --output results.json --report report/

--weights takes a PyTorch/safetensors file (OpenAI, OpenCLIP or Hugging Face) or
a directory written by `python -m clip_jax.convert`. Metric names match the
training metrics (zeroshot/cifar10/top1, retrieval/coco_captions/image_to_text_r1).
"""

from clip_jax import quiet_tensorflow  # noqa: F401  (before TensorFlow loads)
import json
import sys

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath

from clip_jax import checkpoint, convert, sharding
from clip_jax.config_checks import ConfigError
from clip_jax.evals import specs
from clip_jax.evals.report import format_value, natural_order, write_report
from clip_jax.evals.suite import EvalSuite
from clip_jax import run_config
from clip_jax.pretrained import load_model, released_config
from clip_jax.distributed import define_distributed_flags, initialize_distributed


def evaluate(config, weights, entries, *, data_dir=None, batch_size=0, workers=0, image_size=0,
             progress=True):
    """({metric: value}, {prefix: EvalResult}) of the weights at `weights` (workdir,
    converted directory or PyTorch file) on `entries` ({key: config.evals entry})."""
    model, mesh, variables, shardings = load_model(config, weights)
    if image_size and config.model.image.kind != "vit":
        raise ValueError(f"--image_size={image_size}: only a ViT runs at another size than "
                         f"its {config.model.image.image_size}")
    data_parallel = sharding.data_parallel_size(mesh)
    entries = ml_collections.ConfigDict({key: entry.to_dict() for key, entry in entries.items()})
    for entry in entries.values():
        if batch_size:
            entry.batch_size = batch_size
        # Any batch works from the command line: round up to whole device shares.
        entry.batch_size = -(-entry.batch_size // data_parallel) * data_parallel
        if data_dir:
            entry.data_dir = data_dir
    suite = EvalSuite(entries, model, mesh, shardings,
                      default_data_dir=config.data.get("data_dir"), workers=workers,
                      image_size=image_size or None)
    return suite(variables, final=True, progress=progress)


def format_table(metrics):
    width = max(len(name) for name in metrics)
    return "\n".join(f"{name:<{width}}  {format_value(name, metrics[name])}"
                     for name in natural_order(metrics))


def main(argv, options, distributed):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.ERROR)  # orbax warns about metadata it does not need
    workdir, model_name, weights = (options[k].value for k in ("workdir", "model", "weights"))
    if bool(workdir) == bool(model_name):
        raise app.UsageError("give either --workdir or --model with --weights")
    if model_name and not weights:
        raise app.UsageError("--model needs --weights")
    if model_name and not options["evals"].value:
        raise app.UsageError("--model needs --evals, e.g. --evals zeroshot:cifar10")
    initialize_distributed(**{key: flag.value for key, flag in distributed.items()})
    try:
        config = run_config.read(workdir) if workdir else released_config(model_name)
        entries = (ml_collections.ConfigDict({spec: specs.parse_spec(spec)
                                              for spec in options["evals"].value})
                   if options["evals"].value else config.evals)
        step = checkpoint.latest_step(workdir) if workdir else None
        if workdir and step is None:
            raise ValueError(f"{workdir}: the workdir holds no complete checkpoint")
        metrics, results = evaluate(config, workdir or weights, entries,
                                    data_dir=options["data_dir"].value,
                                    batch_size=options["batch_size"].value,
                                    workers=options["workers"].value,
                                    image_size=options["image_size"].value)
    except (ConfigError, ValueError, convert.ConversionError, FileNotFoundError) as error:
        sys.exit(f"evaluate error: {error}")
    if jax.process_index() != 0:
        return
    source = workdir or f"{model_name} {weights}"
    print(f"{source}" + (f" (step {step})" if step is not None else ""))
    print(format_table(metrics))
    if options["output"].value:
        with epath.Path(options["output"].value).open("w") as f:
            json.dump({"source": source, "step": step, **metrics}, f, indent=1)
    if options["report"].value:
        title = f"{source}" + (f", step {step}" if step is not None else "")
        for path in write_report(options["report"].value, metrics, results, title):
            print(f"wrote {path}")


def define_flags():
    return dict(
        workdir=flags.DEFINE_string("workdir", None, "A training workdir: evaluates its latest "
                                    "checkpoint, on its config's evals unless --evals is given."),
        model=flags.DEFINE_string("model", None, "Architecture of --weights, e.g. ViT-B-32 "
                                  "(the names of configs/clip.py)."),
        weights=flags.DEFINE_string("weights", None, "PyTorch/safetensors file or clip_jax.convert "
                                    "output directory."),
        evals=flags.DEFINE_list("evals", None, "Comma-separated kind:dataset[:split], kind one of "
                                f"{', '.join(specs.KINDS)}, e.g. zeroshot:cifar10,"
                                "retrieval:coco_captions."),
        data_dir=flags.DEFINE_string("data_dir", None, "TFDS data_dir of the eval datasets "
                                     "(default: the run's config.data.data_dir / TFDS's)."),
        batch_size=flags.DEFINE_integer("batch_size", 0, "Global eval batch (0: each eval's own)."),
        workers=flags.DEFINE_integer("workers", 0, "Image decoding threads (0: one per core)."),
        image_size=flags.DEFINE_integer("image_size", 0, "Evaluate at this image size (0: the "
                                        "model's); a ViT resamples its positional embeddings, "
                                        "e.g. ViT-L-14 weights at 336."),
        output=flags.DEFINE_string("output", None, "Write the metrics as JSON to this file."),
        report=flags.DEFINE_string("report", None, "Write report.md and PNG charts to this "
                                   "directory."),
    )


if __name__ == "__main__":
    _options = define_flags()
    _distributed = define_distributed_flags()
    app.run(lambda argv: main(argv, _options, _distributed))
