"""Named CLIP architectures, as OpenCLIP names and defines them.

`model_config(name)` gives the `config.model` ConfigDict of a preset
(`clip_jax.create_model(name)`, in `models.clip`, the flax Module). Sizes are from OpenCLIP's
`open_clip/model_configs/*.json` (v3.3.0), which reproduce OpenAI's released
models; the `-quickgelu` names use OpenAI's activation, which OpenAI's released
weights need, the plain names PyTorch's exact GELU.
"""

import math

import ml_collections

QUICKGELU_SUFFIX = "-quickgelu"


def _vit(width, layers, patch_size, image_size=224, head_width=64, mlp_ratio=4.0):
    # patch_dropout: the share of patch tokens each training image drops (FLIP;
    # OpenCLIP's name); 0: none. Evaluation never drops.
    return dict(kind="vit", image_size=image_size, patch_size=patch_size, width=width,
                layers=layers, heads=width // head_width, mlp_ratio=mlp_ratio, patch_dropout=0.0)


def _resnet(stage_layers, width, image_size):
    # The attention pool runs over the last stage's width * 32 channels in 64-wide heads.
    return dict(kind="resnet", image_size=image_size, stage_layers=tuple(stage_layers),
                width=width, heads=width * 32 // 64)


def _text(width, heads, layers=12):
    return dict(context_length=77, vocab_size=49408, width=width, layers=layers, heads=heads,
                mlp_ratio=4.0)


# name -> (embed_dim, image tower, text tower)
_ARCHITECTURES = {
    "ViT-B-32": (512, _vit(768, 12, 32), _text(512, 8)),
    "ViT-B-16": (512, _vit(768, 12, 16), _text(512, 8)),
    "ViT-L-14": (768, _vit(1024, 24, 14), _text(768, 12)),
    "ViT-L-14-336": (768, _vit(1024, 24, 14, image_size=336), _text(768, 12)),
    "ViT-H-14": (1024, _vit(1280, 32, 14, head_width=80), _text(1024, 16, 24)),
    "ViT-g-14": (1024, _vit(1408, 40, 14, head_width=88, mlp_ratio=4.3637), _text(1024, 16, 24)),
    "ViT-bigG-14": (1280, _vit(1664, 48, 14, head_width=104, mlp_ratio=4.9231),
                    _text(1280, 20, 32)),
    "RN50": (1024, _resnet((3, 4, 6, 3), 64, 224), _text(512, 8)),
    "RN101": (512, _resnet((3, 4, 23, 3), 64, 224), _text(512, 8)),
    "RN50x4": (640, _resnet((4, 6, 10, 6), 80, 288), _text(640, 10)),
    "RN50x16": (768, _resnet((6, 8, 18, 8), 96, 384), _text(768, 12)),
    "RN50x64": (1024, _resnet((3, 15, 36, 10), 128, 448), _text(1024, 16)),
}


def _coca(embed_dim, image, text, decoder_heads, decoder_layers=12, pool_heads=8):
    """CoCa's towers (OpenCLIP's coca_*.json): the image tower pools with 256
    learned queries, the text tower (76 caption tokens) with an appended class
    token; the decoder is as wide as the text tower."""
    image = dict(image, pool_queries=256, pool_heads=pool_heads)
    text = dict(text, context_length=76, embed_cls=True, cls_mask="legacy")
    decoder = dict(layers=decoder_layers, heads=decoder_heads, mlp_ratio=4.0)
    return embed_dim, image, text, decoder


# name -> (embed_dim, image tower, text tower, decoder): CoCa (config.objective="coca").
_COCA_ARCHITECTURES = {
    "coca_ViT-B-32": _coca(512, _vit(768, 12, 32), _text(512, 8), decoder_heads=8),
    "coca_ViT-L-14": _coca(768, _vit(1024, 24, 14), _text(768, 12), decoder_heads=12),
}

COCA_NAMES = tuple(_COCA_ARCHITECTURES)
MODEL_NAMES = tuple(name + suffix for name in _ARCHITECTURES
                    for suffix in ("", QUICKGELU_SUFFIX)) + COCA_NAMES


def build_model_config(image, text, embed_dim, activation, decoder=None):
    """config.model from tower dicts; the shared fields get their defaults here.
    `decoder` (CoCa's multimodal decoder: layers, heads, mlp_ratio) adds
    config.model.decoder."""
    extra = {} if decoder is None else {"decoder": dict(decoder)}
    return ml_collections.ConfigDict(dict(
        **extra,
        image=dict(image),  # keys depend on image.kind (vit | resnet)
        text=dict(text),
        embed_dim=embed_dim,
        activation=activation,
        # The contrastive objective's text tower: CLIP's "transformer", or "bag_of_words"
        # (the mean of the caption's token embeddings, projected; paper §2.3).
        text_encoder="transformer",
        # What the predictive objectives (bow_predict, caption_lm) predict over: "full"
        # as token ids with a class each, the rest one class "other"; empty: every
        # id (clip_jax/models/output_classes.py, clip_jax/output_vocab.py).
        output_vocab=(),
        # Compute dtype of the towers; parameters and the loss stay float32.
        dtype="float32",
        # Run each tower's residual blocks in a loop (lax.scan), params stacked on a leading
        # `layers` axis (`resblocks/...` instead of `resblocks_0/...`): compile time
        # stops growing with depth. Convert with models.transformer.stack_layers.
        scan_layers=False,
        # How stacked blocks run: "scan" (lax.scan), "unrolled" (one call per block on
        # its slice of the stack) or "auto" (unrolled on CPUs, and on GPUs and TPUs
        # unless remat keeps nothing).
        layer_loop="auto",
        # Rematerialise each residual block in the backward pass: "none", "full", or a
        # jax.checkpoint_policies name (models.transformer.REMAT_NAMES).
        remat="none",
        # The hand-written LayerNorm/GELU backward passes and flattened kernel
        # gradient (models/lean_ops.py): "auto" (on CPU, where they were measured
        # faster), "on" or "off" on any platform.
        lean_backward="auto",
        # The dtype matmul kernels' gradients leave their dot in, and so are reduced
        # across devices in (models/weight_grads.py): "compute" (autodiff's: bfloat16
        # under bfloat16 compute, half the bytes) or "float32" (OpenCLIP's precision).
        grad_reduce_dtype="compute",
        # Attention kernel (models/transformer.py): "xla", "cudnn" (GPU, bf16/fp16),
        # "splash" (Pallas TPU kernel, models/splash.py) or "auto" (cuDNN where it
        # applies, else XLA's).
        attention="xla",
        logit_scale_init=math.log(1 / 0.07),
        logit_scale_max=100.0,
        # Learned logit bias (SigLIP: init -10, with logit_scale_init log 10); None: none.
        logit_bias_init=ml_collections.FieldReference(None, field_type=float),
    ))


def model_config(name: str) -> ml_collections.ConfigDict:
    """config.model of a preset, e.g. 'ViT-B-32', 'RN50-quickgelu' or 'coca_ViT-B-32'."""
    if name in _COCA_ARCHITECTURES:
        embed_dim, image, text, decoder = _COCA_ARCHITECTURES[name]
        return build_model_config(image, text, embed_dim, "gelu", decoder)
    base = name.removesuffix(QUICKGELU_SUFFIX)
    if base not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    embed_dim, image, text = _ARCHITECTURES[base]
    activation = "quick_gelu" if name.endswith(QUICKGELU_SUFFIX) else "gelu"
    return build_model_config(image, text, embed_dim, activation)
