"""CoCa (config.objective="coca"): the model against OpenCLIP's CoCa at random
init, weight interchange both ways, the loss against NumPy, mesh and GradCache
equality, and captioning."""

import functools
import itertools

import jax
import numpy as np
import optax
import pytest
import torch

from clip_jax import capacity, captioning, convert, flops, image_ops, optim, tokenize, tokenizer
from clip_jax import overrides as config_overrides
from clip_jax.models import CLIP, output_classes, zoo
from clip_jax.models.coca import CoCa
from clip_jax.models.named import create_model
from clip_jax.pytree import get_path
from clip_jax import variables as variables_lib
from clip_jax.config_checks import ConfigError, check_config
from clip_jax.train_step import setup_training
from clip_jax.references import open_clip_config, open_clip_modules

from tests.conftest import small_config
from tests.test_interchange import _perturbed, relative_error
from tests.test_train_step import random_batch

VOCAB = 512
CONTEXT = 12
CAPTIONS = ["a photo of a cat", "Two DOGS in the snow!", "word " * 100, ""]


def open_clip_coca(vocab=VOCAB):
    open_clip_modules()
    import open_clip.coca_model as coca_model  # noqa: PLC0415 (after open_clip_modules' stand-ins)
    torch.manual_seed(0)
    text = dict(context_length=CONTEXT, vocab_size=vocab, width=32, heads=2, layers=2)
    model = coca_model.CoCa(
        embed_dim=32, multimodal_cfg=dict(text, attn_pooler_heads=2),
        text_cfg=dict(text, embed_cls=True, output_tokens=True),
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32,
                        attentional_pool=True, attn_pooler_queries=5, attn_pooler_heads=2,
                        output_tokens=True))
    # OpenCLIP leaves the decoder's vocabulary projection as torch.empty made it.
    torch.nn.init.normal_(model.text_decoder.text_projection, std=32 ** -0.5)
    return _perturbed(model)


def coca_config(vocab=VOCAB):
    """config.model of open_clip_coca()."""
    return zoo.build_model_config(
        dict(kind="vit", image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0,
             patch_dropout=0.0, pool_queries=5, pool_heads=2),
        dict(context_length=CONTEXT, vocab_size=vocab, width=32, layers=2, heads=2,
             mlp_ratio=4.0, embed_cls=True, cls_mask="legacy"),
        32, "gelu", decoder=dict(layers=2, heads=2, mlp_ratio=4.0))


def small_coca_config(**overrides):
    """conftest's small_config as a CoCa: 5 pooling queries, the text tower as wide
    as the embedding, a decoder of one block pair; overrides use dotted keys."""
    config = small_config(objective="coca")
    with config.unlocked():
        config.model.embed_dim = config.model.text.width
        config.model.image.update(pool_queries=5, pool_heads=2)
        config.model.text.update(embed_cls=True, cls_mask="legacy")
        config.model.decoder = dict(layers=1, heads=2, mlp_ratio=4.0)
    config_overrides.apply(config, overrides)
    return config


def inputs(batch=4):
    images = np.random.default_rng(0).normal(size=(batch, 32, 32, 3)).astype(np.float32)
    tokens = np.asarray(tokenize(CAPTIONS, CONTEXT)) % VOCAB
    return images, tokens


def test_open_clip_coca_weights_give_open_clip_outputs():
    reference = open_clip_coca()
    images, tokens = inputs()
    with torch.no_grad():
        outputs = reference(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                            torch.from_numpy(tokens).long())
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    config = coca_config()
    variables = convert.from_torch(state_dict, config)
    model = CoCa(config)
    image, text, scale, _, logits = model.apply(variables, images, tokens)
    assert relative_error(np.asarray(image), outputs["image_features"].numpy()) < 1e-4
    assert relative_error(np.asarray(text), outputs["text_features"].numpy()) < 1e-4
    assert relative_error(np.asarray(logits), outputs["logits"].numpy()) < 1e-4
    np.testing.assert_allclose(float(scale), float(outputs["logit_scale"]), rtol=1e-6)
    # The unnormalised embeddings the evaluators use, and every position's logits.
    with torch.no_grad():
        torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2))
        image_latent, image_embs = reference._encode_image(torch_images, normalize=False)
        text_latent = reference.encode_text(torch.from_numpy(tokens).long(), normalize=False)
        _, token_embs = reference._encode_text(torch.from_numpy(tokens).long())
        all_logits = reference.text_decoder(image_embs, token_embs)
    assert relative_error(np.asarray(model.apply(variables, images, method=model.encode_image)),
                          image_latent.numpy()) < 1e-4
    assert relative_error(np.asarray(model.apply(variables, tokens, method=model.encode_text)),
                          text_latent.numpy()) < 1e-4
    assert relative_error(np.asarray(model.apply(variables, images, tokens,
                                                 method=model.caption_logits)),
                          all_logits.numpy()) < 1e-4


def test_to_torch_inverts_from_torch_exactly():
    state_dict = {k: v.numpy() for k, v in open_clip_coca().state_dict().items()}
    config = coca_config()
    back = convert.to_torch(convert.from_torch(state_dict, config), config)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_mismatched_coca_checkpoint_is_one_line_error():
    state_dict = {k: v.numpy() for k, v in open_clip_coca().state_dict().items()}
    without_decoder = {k: v for k, v in state_dict.items() if not k.startswith("text_decoder.")}
    with pytest.raises(convert.ConversionError, match="missing key 'text_decoder.resblocks.0"):
        convert.from_torch(without_decoder, coca_config())
    del state_dict["visual.attn_pool.attn.k_proj_weight"]
    with pytest.raises(convert.ConversionError, match="missing key 'visual.attn_pool.attn.k_proj"):
        convert.from_torch(state_dict, coca_config())


@pytest.mark.parametrize("name", zoo.COCA_NAMES)
def test_coca_presets_have_open_clip_shapes_and_counts(name):
    open_clip_modules()
    import open_clip.coca_model as coca_model  # noqa: PLC0415
    config = open_clip_config(name)
    with torch.device("meta"):
        reference = coca_model.CoCa(embed_dim=config["embed_dim"],
                                    multimodal_cfg=config["multimodal_cfg"],
                                    text_cfg=config["text_cfg"], vision_cfg=config["vision_cfg"])
    model = create_model(name)
    assert isinstance(model, CoCa)
    params = variables_lib.abstract_variables(model)["params"]
    assert (sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
            == sum(p.numel() for p in reference.parameters()))
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    shapes = {rule.torch_key: tuple(jax.eval_shape(
        rule.to_torch, tuple(get_path({"params": params}, path) for path in rule.paths)).shape)
        for rule in convert.rules_for(model.config)}
    assert shapes == expected



# ---------------------------------------------------------------- training


def one_step(config, devices=None, optimizer=None):
    """(params, metrics) after one step of `optimizer` (None: SGD at lr 1, so that
    every gradient moves the parameters visibly)."""
    training = setup_training(config, devices or jax.devices(), optimizer or optax.sgd(1.0))
    state = training.init_state(jax.random.key(0))
    state, metrics = training.step(state, random_batch(config))
    return jax.device_get(state.params), jax.device_get(metrics)


def assert_same_step(params, metrics, reference_params, reference_metrics, atol=None):
    """Same metrics and parameters; `atol` None: relative to each leaf's scale."""
    for key in ("loss", "contrastive_loss", "caption_loss", "caption_token_top1"):
        np.testing.assert_allclose(metrics[key], reference_metrics[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=atol or max(1e-5 * np.abs(b).max(), 1e-7)),
        params, reference_params)


def test_an_adamw_step_on_8_devices_equals_one_device():
    """The config's AdamW (warm-up off, so the first step updates); data x fsdp x
    tensor is tests/test_objectives.py's coca case. Adam scales near-zero
    gradients (summed in another order on 8 devices) up to about lr x 1e-4, so
    parameters are compared to 1e-5 absolute, as there."""
    config = small_coca_config(**{"optimizer.warmup_steps": 0})
    adamw = optim.make_optimizer(config.optimizer, config.total_steps)
    params_1, metrics_1 = one_step(config, jax.devices()[:1], adamw)
    params_8, metrics_8 = one_step(small_coca_config(**{"optimizer.warmup_steps": 0,
                                                            "mesh.data": 8}), None, adamw)
    assert_same_step(params_8, metrics_8, params_1, metrics_1, atol=1e-5)


@pytest.mark.parametrize("mesh, weights", [(dict(data=8), "sharded"),
                                           (dict(data=2, fsdp=2, tensor=2), "sharded"),
                                           (dict(data=2, fsdp=2, tensor=2), "gathered")])
def test_gradcache_equals_one_microbatch(mesh, weights):
    """k=4 micro-batches: the loss, its parts and the update of k=1; the caption
    term is computed in each micro-batch's second forward pass, on FSDP's
    weights as they are split or gathered once (config.gradcache_weights).
    Batch 32: each micro-batch splits over the 8 devices (config_checks
    requires it)."""
    overrides = ({f"mesh.{axis}": size for axis, size in mesh.items()}
                 | {"batch_size": 32, "gradcache_weights": weights})
    params_1, metrics_1 = one_step(small_coca_config(**overrides))
    params_4, metrics_4 = one_step(small_coca_config(microbatches=4, **overrides))
    assert_same_step(params_4, metrics_4, params_1, metrics_1)


def test_loss_weights_weigh_the_parts():
    _, metrics = one_step(small_coca_config(**{"coca.clip_loss_weight": 0.5,
                                                   "coca.caption_loss_weight": 3.0}))
    np.testing.assert_allclose(
        metrics["loss"], 0.5 * metrics["contrastive_loss"] + 3.0 * metrics["caption_loss"],
        rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "contrastive"}, "has a CoCa decoder"),
    ({"model.embed_dim": 16}, "must equal config.model.embed_dim"),
    ({"model.decoder.heads": 3}, "must divide the text width"),
    ({"coca.caption_loss_weight": -1.0}, "must be >= 0"),
])
def test_bad_coca_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_config(small_coca_config(**overrides), 8)
    assert "\n" not in str(error.value)


def test_coca_objective_needs_a_coca_model():
    with pytest.raises(ConfigError, match="needs a CoCa model config"):
        check_config(small_config(objective="coca"), 8)


# ---------------------------------------------------------------- captioning


def test_cached_greedy_captions_equal_decoding_each_prefix_in_full():
    """The jitted loop with its key/value cache against a plain loop that decodes
    each growing prefix in full at its own length; the full vocabulary and a
    compact one, unscanned and scanned blocks (decoding unstacks them)."""
    compact = (*range(200, 260), tokenizer.default_tokenizer().eot_token)
    for output_vocab, scanned in (((), False), (compact, True)):
        config = small_coca_config(**{"model.output_vocab": output_vocab,
                                      "model.scan_layers": scanned})
        model = CoCa(config.model)
        images = random_batch(config)["images"][:3]
        variables = jax.jit(model.init)(jax.random.key(1), image_ops.normalize(images),
                                        random_batch(config)["tokens"][:3])
        rows = np.asarray(jax.jit(lambda v, x: captioning.greedy_tokens(model, v, x, 6))(
            variables, images))
        token_of_class = output_classes.class_token_ids(output_vocab, config.model.text.vocab_size)
        expected = np.full((3, 1), tokenizer.default_tokenizer().sot_token, np.int32)
        caption_logits = jax.jit(functools.partial(model.apply, method=model.caption_logits))
        for _ in range(5):
            logits = np.array(caption_logits(variables, image_ops.normalize(images),
                                             expected))[:, -1]
            logits[:, token_of_class < 0] = -np.inf
            expected = np.concatenate([expected, token_of_class[logits.argmax(-1)][:, None]], 1)
        eot = tokenizer.default_tokenizer().eot_token
        for row, reference in zip(rows, expected):
            if eot in reference[1:]:  # the caption ends there, padding after it
                end = list(reference[1:]).index(eot) + 1
                np.testing.assert_array_equal(row[:end + 1], reference[:end + 1])
                assert not row[end + 1:].any()
            else:  # cut at max_len, ended by the end token as the tokenizer ends rows
                np.testing.assert_array_equal(row[:5], reference[:5])
                assert row[5] == eot
        assert np.all(np.isin(rows[:, 1:], [*token_of_class[token_of_class >= 0], 0]))


def test_beam_search_with_beams_enough_for_every_path_finds_the_best_caption():
    """Three tokens (two words and the end token) and max_len 4: 15 complete
    paths, so 16 beams keep every one, and the search must return the path whose
    log probability per generated token, computed here by full forward passes,
    is highest. One beam is greedy."""
    eot = tokenizer.default_tokenizer().eot_token
    config = small_coca_config(**{"model.output_vocab": (200, 201, eot)})
    model = CoCa(config.model)
    images = random_batch(config)["images"][:2]
    variables = jax.jit(model.init)(jax.random.key(2), image_ops.normalize(images),
                                    random_batch(config)["tokens"][:2])
    rows, scores = jax.jit(lambda v, x: captioning.beam_tokens(model, v, x, 4, 16))(
        variables, images)
    greedy = jax.jit(lambda v, x: captioning.greedy_tokens(model, v, x, 4))(variables, images)
    one_beam, _ = jax.jit(lambda v, x: captioning.beam_tokens(model, v, x, 4, 1))(
        variables, images)
    np.testing.assert_array_equal(one_beam, greedy)
    classes = output_classes.token_classes(config.model.output_vocab, config.model.text.vocab_size)
    sot = tokenizer.default_tokenizer().sot_token
    paths = sorted({p[:p.index(eot) + 1] if eot in p else p  # a caption ends at its end token
                    for p in itertools.product((200, 201, eot), repeat=3)})
    assert len(paths) == 15
    caption_logits = jax.jit(functools.partial(model.apply, method=model.caption_logits))
    for image, row, score in zip(images, np.asarray(rows), np.asarray(scores)):
        best = None
        for path in paths:
            tokens = np.array([[sot, *path]], np.int32)
            log_p = jax.nn.log_softmax(np.where(
                output_classes.class_token_ids(config.model.output_vocab,
                                               config.model.text.vocab_size) >= 0,
                np.asarray(caption_logits(variables, image_ops.normalize(image[None]),
                                          tokens))[0, :-1], -np.inf))
            per_token = float(sum(log_p[i, classes[t]] for i, t in enumerate(path))) / len(path)
            if best is None or per_token > best[0]:
                best = (per_token, path)
        np.testing.assert_allclose(score, best[0], rtol=1e-5)
        expected = [sot, *best[1]] + [0] * (3 - len(best[1]))
        if eot not in best[1]:
            expected[-1] = eot
        np.testing.assert_array_equal(row, expected)


def test_caption_refuses_a_model_without_a_decoder():
    from clip_jax.pretrained import Pretrained  # noqa: PLC0415
    config = small_config()
    with pytest.raises(ValueError, match="caption needs a CoCa model"):
        Pretrained(model=CLIP(config.model), variables={}, encoders=None).caption([])
    with pytest.raises(ValueError, match="max_len=1 must be in"):
        captioning.greedy_tokens(CoCa(small_coca_config().model), {}, np.zeros((1, 16, 16, 3)), 1)
    compact = small_coca_config(**{"model.output_vocab": (200, 201)})
    with pytest.raises(ValueError, match="captions need the end token"):
        captioning.greedy_tokens(CoCa(compact.model), {}, np.zeros((1, 16, 16, 3)), 4)


def test_train_step_flops_match_xla():
    """The analytic count (clip_jax.flops) against XLA's of the whole compiled step,
    widths of 64 and quick_gelu as tests/test_flops.py chooses them."""
    config = small_coca_config(**{
        "batch_size": 32, "mesh.data": 1, "model.activation": "quick_gelu",
        "model.image.image_size": 32, "model.image.width": 64, "model.text.width": 64,
        "model.embed_dim": 64, "model.text.context_length": 16, "model.text.vocab_size": 128,
        "model.decoder.layers": 2, "model.image.pool_queries": 9})
    step, state, batch, _ = capacity.abstract_train_step(config, jax.devices()[:1])
    xla = capacity.compiled_flops(step.lower(state, batch).compile())
    counts = flops.train_step_flops(config.model, 32, objective="coca")
    assert abs(counts["train_step"] / xla - 1) < 0.10, (counts["train_step"], xla)


def test_full_size_coca_vit_b_32_matches_open_clip():
    """OpenCLIP's coca_ViT-B-32 itself (253M parameters, random init perturbed):
    from_torch gives its embeddings and decoder logits, to_torch its state dict."""
    open_clip_modules()
    import open_clip.coca_model as coca_model  # noqa: PLC0415
    config = open_clip_config("coca_ViT-B-32")
    torch.manual_seed(0)
    reference = coca_model.CoCa(embed_dim=config["embed_dim"],
                                multimodal_cfg=config["multimodal_cfg"],
                                text_cfg=config["text_cfg"], vision_cfg=config["vision_cfg"])
    torch.nn.init.normal_(reference.text_decoder.text_projection, std=512 ** -0.5)
    reference = _perturbed(reference)
    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    tokens = np.asarray(tokenize(CAPTIONS[:2], 76))
    with torch.no_grad():
        outputs = reference(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                            torch.from_numpy(tokens).long())
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    del reference
    variables = convert.from_torch(state_dict, "coca_ViT-B-32")
    model = create_model("coca_ViT-B-32")
    image, text, _, _, logits = jax.jit(model.apply)(variables, images, tokens)
    for ours, theirs in ((image, "image_features"), (text, "text_features"), (logits, "logits")):
        assert relative_error(np.asarray(ours), outputs[theirs].numpy()) < 1e-4, theirs
    back = convert.to_torch(variables, "coca_ViT-B-32")
    assert back.keys() == state_dict.keys()
    assert all(np.array_equal(back[key], value) for key, value in state_dict.items())
