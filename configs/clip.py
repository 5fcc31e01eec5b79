r"""CLIP training configs: one base, small named deltas per variant.

Train the default (CPU-sized) model on the built-in synthetic dataset:

  python -m clip_jax.train --config configs/clip.py:tiny --workdir /tmp/clip_tiny

A paper-sized preset, with any key overridden from the command line:

  python -m clip_jax.train --config configs/clip.py:ViT-B-32 --workdir gs://bucket/run \
      --config.batch_size=32768 --config.data.train=my_prepared_dataset:train

`arg` is `VARIANT` or `VARIANT,key=value,...` (big_vision style), e.g.
`configs/clip.py:tiny,total_steps=100`; the named knobs are the top-level keys.
Every key is read by the trainer; unknown keys stop the run with a one-line error.

Sweeps are declared here too (`get_sweep`) and run, then tabulated, by

  python -m launch.sweep run --config configs/clip.py:tiny --sweep lr_batch --root /tmp/sweep
  python -m launch.sweep collect --root /tmp/sweep --metric zeroshot/synthetic_shapes/top1 \
      --x optimizer.lr
"""

import ml_collections

from clip_jax import overrides, sharding_rules
from clip_jax.evals.specs import evaluator_config
from clip_jax.models import zoo
from configs import sweeps

# The CPU-sized default: trains to >90% zero-shot top-1 on synthetic_shapes in minutes.
_TINY_MODEL = dict(
    image=dict(kind="vit", image_size=32, patch_size=8, width=96, layers=3, heads=3, mlp_ratio=4.0,
               patch_dropout=0.0),
    text=dict(context_length=16, vocab_size=49408, width=64, layers=2, heads=2, mlp_ratio=4.0),
    embed_dim=64,
    activation="gelu",
)
# CoCa at the tiny size: the tiny towers, the image pooled by 17 queries (its 16
# patches' worth of tokens, plus the embedding's), the text by a class token, and a
# 2-layer decoder as wide as the text tower.
_TINY_COCA_MODEL = dict(
    _TINY_MODEL,
    image=dict(_TINY_MODEL["image"], pool_queries=17, pool_heads=2),
    text=dict(_TINY_MODEL["text"], embed_cls=True, cls_mask="legacy"),
    decoder=dict(layers=2, heads=2, mlp_ratio=4.0),
)
_TINY_RUN = dict(batch_size=128, total_steps=1200, log_every=50, eval_every=300,
                 checkpoint_every=600, optimizer=dict(lr=2e-3, warmup_steps=100))

# The paper's schedule for every named architecture: batch 32,768, 32 epochs of
# 400M pairs (390,625 steps), 2,000 warmup steps, lr 5e-4 (4e-4 for ViT-L/14).
_PAPER_RUN = dict(batch_size=32768, total_steps=390_625, eval_every=2000, checkpoint_every=1000,
                  optimizer=dict(lr=5e-4, warmup_steps=2000))
_PAPER_LR = {"ViT-L-14": 4e-4, "ViT-L-14-336": 4e-4}

# `tiny` and `coca_tiny`, then every model of the zoo by its OpenCLIP name (e.g.
# ViT-B-32, RN50-quickgelu, coca_ViT-B-32); the CoCa ones train config.objective="coca".
VARIANTS = ("tiny", "coca_tiny") + zoo.MODEL_NAMES


def _variant(name):
    """(config.model, run-level settings) of a variant."""
    if name == "tiny":
        return zoo.build_model_config(**_TINY_MODEL), _TINY_RUN
    if name == "coca_tiny":
        return zoo.build_model_config(**_TINY_COCA_MODEL), dict(_TINY_RUN, objective="coca")
    lr = _PAPER_LR.get(name.removesuffix(zoo.QUICKGELU_SUFFIX), 5e-4)
    model = zoo.model_config(name)
    # Stacked blocks: one checkpoint layout on every platform; model.layer_loop
    # "auto" unrolls them on CPUs, and on GPUs and TPUs (a faster step in less
    # memory) unless remat keeps nothing, where a lax.scan keeps less
    # (models/transformer.py).
    model.scan_layers = True
    objective = {"objective": "coca"} if name in zoo.COCA_NAMES else {}
    return model, dict(_PAPER_RUN, optimizer=dict(lr=lr, warmup_steps=2000), **objective)


def _base():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 256  # global, over all hosts and devices
    # GradCache: the step holds activations of batch_size / microbatches examples at a
    # time; loss and gradients stay those of the global batch (BatchNorm excepted).
    config.microbatches = 1
    # With microbatches > 1 under FSDP: "sharded" gathers the weights and
    # reduce-scatters their gradients in every micro-batch's passes; "gathered"
    # gathers them once per step and reduce-scatters once, at the cost of whole
    # float32 weights and gradient sums on every device (docs/scaling.md).
    config.gradcache_weights = "sharded"
    config.total_steps = 1000
    config.log_every = 50
    config.eval_every = 500  # 0 disables in-training evaluation (the final one still runs)
    config.checkpoint_every = 500  # a checkpoint is always written at the end
    # Also save when this many minutes passed since the last save (0: off); checked
    # at log steps, when all hosts agree on it.
    config.checkpoint_minutes = 0.0
    config.keep_checkpoints = 3  # the newest ones; older ones are deleted
    # Also keep the save with the best value of this eval metric (higher is better),
    # e.g. "zeroshot/synthetic_shapes/top1", in WORKDIR/best ("": off).
    config.keep_best = ""
    # Steps whose loss or gradients are not finite are skipped (train/skipped_steps);
    # this many in a row stop the run with a diagnostic and a checkpoint.
    config.max_bad_steps = 10
    # Trace `steps` train steps from `start_step` (0: off) with jax.profiler into
    # WORKDIR/plugins/profile (TensorBoard's profile tab, xprof) and log where their
    # device time went (clip_jax/op_profile.py); pick a step after compilation.
    config.profile = ml_collections.ConfigDict(dict(start_step=0, steps=3))
    # What the image tower learns from the captions (CLIP paper §2.3, Figure 2):
    # "contrastive" (CLIP; text tower config.model.text_encoder), "bow_predict" (the
    # caption's bag of words from the image), "caption_lm" (a Transformer decoder
    # on the image embedding predicts the caption) or "coca" (contrastive plus a
    # captioning decoder on the image tokens; a CoCa model: coca_tiny, coca_ViT-*);
    # clip_jax/objectives/.
    config.objective = "contrastive"
    # Phases of the run with their own training image size, patch dropout and caption
    # length, e.g. "90%: image_size=112, patch_dropout=0.5, context_length=32; 10%"
    # (FLIP / CLIPA; clip_jax/phases.py); "": the model config's settings throughout.
    config.phases = ""

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=5e-4, warmup_steps=100, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6,
        grad_clip_norm=1.0,  # 0 disables clipping
    ))

    # Training data: any prepared TFDS split stored as ArrayRecord (random access,
    # which makes the input exactly resumable): the built-in dataset, a catalogue
    # dataset built with `--file_format=array_record`, or image-text shards/CSVs
    # prepared by `python -m clip_jax.data.prepare`.
    config.data = ml_collections.ConfigDict(dict(
        # TFDS 'name[:version]:split', or a weighted mixture
        # 'a:train@0.2(caption_key=captions/text) + b:train@0.8' (clip_jax/data/spec.py).
        train="synthetic_shapes:train",
        data_dir=ml_collections.FieldReference(None, field_type=str),  # None: TFDS default
        image_key="image",  # feature keys; 'a/b' reaches nested features
        caption_key="caption",  # a list of captions (e.g. coco_captions) gives a random one
        crop_scale=(0.9, 1.0),  # RandomResizedCrop area range; (1.0, 1.0): no crop
        workers=0,  # input worker processes per training process; 0: one per CPU core
        threads=1,  # decoding threads in each worker
        in_process=False,  # True: no worker processes, decode in this process (debugging)
        prefetch=2,  # blocks (batches) each worker keeps ready ahead of the step
    ))

    # Evaluators run during training (every `every` steps, 0: eval_every, -1: only at
    # the end) and by `python -m clip_jax.evaluate`; empty fields (split, feature
    # keys) take the dataset's defaults (clip_jax/evals/specs.py). Metrics are named
    # "<kind>/<dataset>/<metric>", e.g. zeroshot/synthetic_shapes/top1.
    config.evals = ml_collections.ConfigDict(dict(
        zeroshot=evaluator_config("zeroshot", "synthetic_shapes"),
        retrieval=evaluator_config("retrieval", "synthetic_shapes"),
    ))

    # softmax: CLIP's symmetric cross-entropy; sigmoid: SigLIP's pairwise loss
    # (set model.logit_scale_init=2.302585 and model.logit_bias_init=-10).
    # chunk_size > 0 bounds the softmax logits held per device to
    # [B_local, chunk_size]; the sigmoid loss is always [B_local, B_local].
    config.loss = ml_collections.ConfigDict(dict(kind="softmax", chunk_size=0))

    # Distillation (OpenCLIP's --distill-model): a frozen teacher, a training workdir
    # or ARCHITECTURE:WEIGHTS (a zoo name and a clip_jax.convert directory or a
    # PyTorch file), adds weight x OpenCLIP's distillation term to the contrastive
    # loss; dtype: the teacher's parameters and compute ("float32" or "bfloat16").
    # "" trains without one.
    config.distill = ml_collections.ConfigDict(dict(teacher="", weight=1.0, dtype="float32"))
    # CoCa's loss weights (config.objective="coca"; OpenCLIP's --coca-*-loss-weight
    # defaults): clip x contrastive + caption x the captioning cross-entropy.
    config.coca = ml_collections.ConfigDict(dict(clip_loss_weight=1.0, caption_loss_weight=2.0))

    # Fine-tuning: start from weights written by `python -m clip_jax.convert` or from a
    # training workdir (its latest checkpoint); None trains from scratch. A run whose
    # own --workdir holds checkpoints resumes from those instead.
    config.init_from = ml_collections.FieldReference(None, field_type=str)
    # Locked towers get no updates and run in inference mode (LiT locks the image tower).
    config.lock_image = False
    config.lock_text = False

    # Mesh axis sizes; -1 takes the remaining devices. dcn_data: data parallelism
    # across slices (multi-slice TPU) or hosts over the data-centre network, the
    # slice count; the rest within a slice. The batch is split over dcn_data x
    # data x fsdp; parameters and activations are placed by `sharding_rules`.
    config.mesh = ml_collections.ConfigDict(dict(dcn_data=1, data=-1, fsdp=1, tensor=1))
    # Logical axis -> mesh axis (None: replicated), for parameters and
    # activations: FSDP and tensor parallelism as clip_jax/sharding.py says.
    config.sharding_rules = sharding_rules.DEFAULT_RULES
    return config


def get_config(arg=None):
    """Returns the locked config of a variant; `arg` is 'VARIANT[,key=value,...]'."""
    variant, *knobs = (arg or "tiny").split(",")
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    config = _base()
    config.model, run = _variant(variant)
    for key, value in run.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    for knob in knobs:
        key, value = overrides.split(knob)
        if key not in config or isinstance(config[key], ml_collections.ConfigDict):
            raise ValueError(f"unknown config knob {key!r} in {arg!r}; use a top-level key")
        overrides.apply(config, {key: value})
    config.lock()
    return config


# Named sweeps: each a list of runs, a run being {dotted config key: value} applied
# on top of the config (and of any `--set` of the sweep command).
SWEEPS = {
    # Learning rate x global batch on the tiny config (its default: 2e-3 x 128).
    "lr_batch": sweeps.product({"optimizer.lr": [1e-3, 4e-3], "batch_size": [64, 128]}),
    # The learning rate scaled linearly with the batch, as a single axis.
    "batch_scaling": sweeps.zipped({"batch_size": [64, 128, 256],
                                    "optimizer.lr": [1e-3, 2e-3, 4e-3]}),
    # CLIP's softmax loss vs SigLIP's sigmoid loss, which needs SigLIP's logit
    # initialisation (scale log 10, learned bias -10) to start near its optimum.
    "loss": [{"loss.kind": "softmax"},
             {"loss.kind": "sigmoid", "model.logit_scale_init": 2.302585,
              "model.logit_bias_init": -10.0}],
}


def get_sweep(name):
    """The runs of the sweep `name`: a list of {dotted config key: value}."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; choose one of {', '.join(SWEEPS)}")
    return [dict(run) for run in SWEEPS[name]]
