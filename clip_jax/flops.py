"""Analytic model FLOPs of a CLIP train step, for MFU (model FLOPs utilisation).

Convention (Kaplan et al. 2020; PaLM, appendix B): only matrix multiplications
and convolutions count, 2 * m * n * k for an [m, k] @ [k, n] product (one
multiply and one add per term). The backward pass costs twice the forward (a
product for the input gradient and one for the weight gradient), so a train
step is 3x the forward FLOPs. Left out, as is usual: LayerNorm, softmax,
activations, BatchNorm, pooling, embedding lookups and the optimizer update;
they are elementwise and small next to the matrix products at real sizes.

Choices where conventions differ:
- Causal text attention counts the full [L, L] score matrix, as the model
  computes it (masked), not the half a causal kernel could skip.
- The contrastive loss counts one [B, E] @ [E, B] logits matrix over the global
  batch: both directions (image->text, text->image) are its rows and columns.
  (losses.py computes each direction's rows separately, 2x this on hardware.)
- Model FLOPs, not hardware FLOPs: rematerialisation and GradCache's second
  forward pass (config.microbatches > 1) are not counted.
- A locked tower (LiT) has no backward pass: its forward counts once.
- A distillation teacher (config.distill) counts its forward pass once, at the
  student's image size, with its own logits matrix.
- Patch dropout counts the kept patches only; a phase of the run counts at its
  own sizes (`phases.with_phase(config.model, phase)`).
- Each Transformer tower's last block runs for the pooled token only (keys and
  values for every token, the rest for one: models/transformer.py), and is
  counted so; `full_last_block=True` counts it over every token, the
  architecture's nominal count that OpenCLIP publishes.

Objectives (config.objective, the paper's study): `contrastive` counts the two
towers (the Transformer or, with model.text_encoder="bag_of_words", the mean of
the word embeddings and the projection) and the logits; `bow_predict` the image
tower and its linear head over the output vocabulary; `caption_lm` the image
tower and the caption decoder (its image-prefix projection, every block over the
prefix and the caption, and the head at every caption position).

`train_step_flops(config.model, global_batch, objective=config.objective)`
gives the per-part forward FLOPs of the global batch and the `train_step` total. tests/test_flops.py
checks them against XLA's cost analysis, and the ViT presets against
OpenCLIP's published per-example GFLOPs (ViT-B-32: 8.82 image, 5.96 text).
"""

import functools

from clip_jax import patch_dropout
from clip_jax.models import output_classes

# Backward = 2x forward: gradients w.r.t. activations and w.r.t. weights.
TRAIN_MULTIPLIER = 3


def matmul(m, k, n):
    """FLOPs of an [m, k] @ [k, n] product."""
    return 2 * m * k * n


def transformer_block(tokens, width, heads, mlp_ratio, queries=None):
    """Forward FLOPs of one pre-LN residual block on one sequence of `tokens`
    with outputs for `queries` of them (default: all): K, V projections of every
    token; Q projection, scores Q K^T, attention-weighted V, output projection
    and the two MLP layers for the queries."""
    queries = tokens if queries is None else queries
    inner = heads * (width // heads)  # heads x head_dim, = width when divisible
    hidden = int(width * mlp_ratio)
    projections = (2 * matmul(tokens, width, inner) + matmul(queries, width, inner)
                   + matmul(queries, inner, width))
    attention = 2 * matmul(queries, inner, tokens)  # Q K^T and softmax(.) V, all heads
    mlp = matmul(queries, width, hidden) + matmul(queries, hidden, width)
    return projections + attention + mlp


def transformer_tower(tokens, tower, full_last_block=False):
    """Forward FLOPs of `tower.layers` blocks on `tokens`, the last one for the
    pooled token only unless full_last_block."""
    block = functools.partial(transformer_block, tokens, tower.width, tower.heads, tower.mlp_ratio)
    return (tower.layers - 1) * block() + block(None if full_last_block else 1)


def vit_image(image, embed_dim, full_last_block=False):
    """Forward FLOPs of the ViT tower on one image: the patch convolution as a
    [patches, p*p*3] @ [p*p*3, width] product, the blocks over the patches plus
    the class token, and the projection of the class token. Under patch dropout
    (image.patch_dropout) only the kept patches are embedded and encoded."""
    patches = patch_dropout.kept_patches((image.image_size // image.patch_size) ** 2,
                                         image.get("patch_dropout", 0.0))
    patch_embedding = matmul(patches, image.patch_size ** 2 * 3, image.width)
    blocks = transformer_tower(patches + 1, image, full_last_block)
    return patch_embedding + blocks + matmul(1, image.width, embed_dim)


def text(text_config, embed_dim, full_last_block=False):
    """Forward FLOPs of the causal text tower on one caption of context_length
    tokens; the token embedding lookup is free, the projection is of the
    end-of-text token only."""
    blocks = transformer_tower(text_config.context_length, text_config, full_last_block)
    return blocks + matmul(1, text_config.width, embed_dim)


def conv(size, kernel, in_channels, out_channels):
    """FLOPs of a kernel x kernel convolution with `size` x `size` outputs."""
    return matmul(size * size, kernel * kernel * in_channels, out_channels)


def resnet_image(image, embed_dim, full_last_block=False):
    """Forward FLOPs of CLIP's modified ResNet on one image (models/resnet.py):
    the 3-conv stem, the bottlenecks (1x1, 3x3, 1x1 at the pooled size, and the
    pooled 1x1 shortcut) and the attention pool, whose only query is the mean.
    (OpenCLIP's published profile is ~5% higher, e.g. RN50 12.22 GFLOPs against
    11.59 here: the size of a pool whose query spans all positions.)
    full_last_block: unused (no Transformer blocks), for the common signature."""
    del full_last_block
    width = image.width
    size = -(-image.image_size // 2)  # the stride-2 3x3 conv, padded 1: ceil(S / 2)
    total = (conv(size, 3, 3, width // 2) + conv(size, 3, width // 2, width // 2)
             + conv(size, 3, width // 2, width))
    size //= 2  # average pool
    channels = width
    for stage, blocks in enumerate(image.stage_layers):
        planes = width * 2 ** stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            total += conv(size, 1, channels, planes) + conv(size, 3, planes, planes)
            pooled = size // stride
            total += conv(pooled, 1, planes, 4 * planes)
            if stride > 1 or channels != 4 * planes:
                total += conv(pooled, 1, channels, 4 * planes)
            size, channels = pooled, 4 * planes
    positions = size * size + 1  # the mean token, then every position
    inner = image.heads * (channels // image.heads)
    attention_pool = (matmul(1, channels, inner) + 2 * matmul(positions, channels, inner)
                      + 2 * matmul(1, inner, positions) + matmul(1, inner, embed_dim))
    return total + attention_pool


def bag_of_words_text(text_config, embed_dim):
    """Forward FLOPs of the bag-of-words text tower on one caption: the mean of its
    word embeddings (a [1, L] @ [L, width] product) and the projection."""
    return (matmul(1, text_config.context_length, text_config.width)
            + matmul(1, text_config.width, embed_dim))


def caption_decoder(model_config):
    """Forward FLOPs of the caption decoder on one caption of context_length
    tokens: the image-prefix projection, every block over prefix + caption, and
    the output head at every caption position."""
    text_config = model_config.text
    tokens = text_config.context_length
    classes = output_classes.head_size(model_config.output_vocab, text_config.vocab_size)
    blocks = text_config.layers * transformer_block(tokens + 1, text_config.width,
                                                    text_config.heads, text_config.mlp_ratio)
    return (matmul(1, model_config.embed_dim, text_config.width) + blocks
            + matmul(tokens, text_config.width, classes))


def coca_image(image, embed_dim):
    """Forward FLOPs of CoCa's ViT on one image: every block over every token
    (the pooler reads them all), the attentional pooler (its queries projected
    per image, keys and values from the tokens) and the first query's projection."""
    tokens = patch_dropout.kept_patches((image.image_size // image.patch_size) ** 2,
                                        image.get("patch_dropout", 0.0)) + 1
    queries = image.pool_queries
    tower = vit_image(image, embed_dim, full_last_block=True) - matmul(1, image.width, embed_dim)
    pooler = (matmul(queries, embed_dim, embed_dim) + 2 * matmul(tokens, image.width, embed_dim)
              + 2 * matmul(queries, embed_dim, tokens) + matmul(queries, embed_dim, embed_dim))
    return tower + pooler + matmul(1, embed_dim, embed_dim)


def coca_text_and_decoder(model_config):
    """(text tower, decoder) forward FLOPs of CoCa on one caption: the text tower
    over context_length tokens plus its class token, every block in full; the
    decoder over context_length - 1 positions, each layer a causal block and a
    cross-attention block on the pool_queries - 1 image tokens, then the head."""
    text_config, decoder = model_config.text, model_config.decoder
    width, tokens = text_config.width, text_config.context_length
    text_flops = (transformer_tower(tokens + 1, text_config, full_last_block=True)
                  + matmul(1, width, model_config.embed_dim))
    positions, image_tokens = tokens - 1, model_config.image.pool_queries - 1
    hidden = int(width * decoder.mlp_ratio)
    cross = (2 * matmul(image_tokens, width, width) + 2 * matmul(positions, width, width)
             + 2 * matmul(positions, width, image_tokens)
             + matmul(positions, width, hidden) + matmul(positions, hidden, width))
    classes = output_classes.head_size(model_config.output_vocab, text_config.vocab_size)
    layer = transformer_block(positions, width, decoder.heads, decoder.mlp_ratio) + cross
    return text_flops, decoder.layers * layer + matmul(positions, width, classes)


# config.model.image.kind -> FLOPs of the image tower on one image.
IMAGE_TOWERS = {"vit": vit_image, "resnet": resnet_image}


def contrastive_logits(global_batch, embed_dim):
    """Forward FLOPs of the [B, B] logits of the global batch."""
    return matmul(global_batch, embed_dim, global_batch)


def _objective_parts(objective, model_config, global_batch, full_last_block):
    """{part: forward FLOPs of the global batch} besides the image tower."""
    embed_dim = model_config.embed_dim
    if objective == "bow_predict":
        classes = output_classes.head_size(model_config.output_vocab,
                                         model_config.text.vocab_size)
        return {"head": global_batch * matmul(1, embed_dim, classes)}
    if objective == "caption_lm":
        return {"text": global_batch * caption_decoder(model_config)}
    if objective == "coca":
        text_flops, decoder_flops = coca_text_and_decoder(model_config)
        return {"text": global_batch * text_flops, "decoder": global_batch * decoder_flops,
                "loss": contrastive_logits(global_batch, embed_dim)}
    if objective != "contrastive":
        raise NotImplementedError(f"no FLOP count for config.objective={objective!r}")
    if model_config.text_encoder == "bag_of_words":
        text_flops = bag_of_words_text(model_config.text, embed_dim)
    else:
        text_flops = text(model_config.text, embed_dim, full_last_block)
    return {"text": global_batch * text_flops,
            "loss": contrastive_logits(global_batch, embed_dim)}


def teacher_flops(teacher_config, global_batch, image_size, context_length):
    """Forward FLOPs of a distillation teacher (clip_jax.teacher) on the global
    batch as the student sees it (its `image_size` and caption `context_length`),
    without patch dropout: both towers and its [B, B] logits."""
    image = teacher_config.image.copy_and_resolve_references()
    text_config = teacher_config.text.copy_and_resolve_references()
    with image.unlocked(), text_config.unlocked():
        image.image_size = image_size
        image.patch_dropout = 0.0
        text_config.context_length = context_length
    return global_batch * (IMAGE_TOWERS[image.kind](image, teacher_config.embed_dim)
                           + text(text_config, teacher_config.embed_dim)) \
        + contrastive_logits(global_batch, teacher_config.embed_dim)


def train_step_flops(model_config, global_batch, locked=(), full_last_block=False,
                     objective="contrastive", teacher_config=None):
    """{"image", then the objective's parts ("text" and "loss" for contrastive,
    "head" for bow_predict, "text" (the caption decoder) for caption_lm, "text",
    "decoder" and "loss" for coca): forward
    FLOPs of the global batch; "forward": their sum; "train_step": forward +
    backward} for config.model. `locked` names towers ("image", "text") that get
    no backward pass; full_last_block: see the module docstring. With a
    distillation teacher's model config, "teacher": its forward (no backward)."""
    kind = model_config.image.kind
    if kind not in IMAGE_TOWERS:
        raise NotImplementedError(f"no FLOP count for config.model.image.kind={kind!r}; "
                                  f"known: {', '.join(IMAGE_TOWERS)}")
    image_flops = (coca_image(model_config.image, model_config.embed_dim) if objective == "coca"
                   else IMAGE_TOWERS[kind](model_config.image, model_config.embed_dim,
                                           full_last_block))
    parts = {"image": global_batch * image_flops,
             **_objective_parts(objective, model_config, global_batch, full_last_block)}
    if teacher_config is not None:
        parts["teacher"] = teacher_flops(teacher_config, global_batch,
                                         model_config.image.image_size,
                                         model_config.text.context_length)
    train_step = sum(part_flops * (1 if part in (*locked, "teacher") else TRAIN_MULTIPLIER)
                     for part, part_flops in parts.items())
    return {**parts, "forward": sum(parts.values()), "train_step": train_step}


# Peak dense bf16 FLOP/s of one device (a TPU chip, a GPU) by a lower-case part of
# jax's device_kind, most specific first (v5e reports "TPU v5 lite", v6e "TPU v6 lite").
PEAK_BF16_FLOPS = (
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu v4", 275e12),
    ("a100", 312e12), ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12),
)


def peak_flops_per_device(device_kind):
    """The device's peak dense bf16 FLOP/s, or None when unknown (CPUs)."""
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)
