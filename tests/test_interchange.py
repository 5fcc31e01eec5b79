"""Weight interchange against PyTorch references nobody here wrote: OpenCLIP's
CLIP (ViT and modified ResNet) and Hugging Face's CLIPModel, at random init.

Small widths keep the tests fast; every code path of the full presets runs
(patch conv, class token, packed attention, 3-conv stem, anti-aliased strides,
attention pooling, BatchNorm running statistics, QuickGELU).
"""

import copy

import jax
import numpy as np
import pytest
import torch

from clip_jax import convert, tokenize
from clip_jax.models import CLIP, zoo
from clip_jax.pytree import get_path
from clip_jax.references import open_clip_config, open_clip_modules

TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
TOWERS = {
    # name: (OpenCLIP vision_cfg, our config.model.image)
    "vit": (dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
            dict(kind="vit", image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0)),
    "resnet": (dict(image_size=64, layers=[1, 2, 1, 1], width=16, head_width=32),
               dict(kind="resnet", image_size=64, stage_layers=(1, 2, 1, 1), width=16, heads=16)),
}
CAPTIONS = ["a photo of a cat", "Two DOGS in the snow!", "word " * 100, ""]


def _perturbed(module):
    """Random weights and running statistics, so no zero-initialised bias or unit
    variance hides a mistake in the conversion."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    return module.eval()


def open_clip_model(kind, quick_gelu=True):
    model_lib, _, _ = open_clip_modules()
    torch.manual_seed(0)
    return _perturbed(model_lib.CLIP(embed_dim=24, vision_cfg=TOWERS[kind][0], text_cfg=TEXT,
                                     quick_gelu=quick_gelu))


def our_config(kind, activation="quick_gelu"):
    return zoo.build_model_config(TOWERS[kind][1], dict(TEXT, mlp_ratio=4.0), 24, activation)


def images_for(kind, batch=4):
    size = TOWERS[kind][1]["image_size"]
    return np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)


def relative_error(ours, reference):
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def embeddings(config, variables, images, tokens):
    model = CLIP(config)
    return (np.asarray(model.apply(variables, images, method=model.encode_image)),
            np.asarray(model.apply(variables, tokens, method=model.encode_text)))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_open_clip_weights_give_open_clip_embeddings(kind, activation):
    reference = open_clip_model(kind, quick_gelu=activation == "quick_gelu")
    config = our_config(kind, activation)
    variables = convert.from_torch(reference.state_dict(), config)
    images, tokens = images_for(kind), tokenize(CAPTIONS)
    with torch.no_grad():
        expected_image = reference.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
        expected_text = reference.encode_text(torch.from_numpy(tokens).long())
    image, text = embeddings(config, variables, images, tokens)
    assert relative_error(image, expected_image.numpy()) < 1e-4
    assert relative_error(text, expected_text.numpy()) < 1e-4
    assert float(variables["params"]["logit_scale"]) == float(reference.logit_scale.detach())


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_round_trip_is_exact(kind):
    state_dict = {k: v.numpy() for k, v in open_clip_model(kind).state_dict().items()}
    back = convert.to_torch(convert.from_torch(state_dict, our_config(kind)), our_config(kind))
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_hugging_face_clip_model_gives_its_embeddings():
    import transformers
    torch.manual_seed(0)
    hf_config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8,
                           hidden_act="quick_gelu"),
        projection_dim=24)
    reference = _perturbed(transformers.CLIPModel(hf_config))
    config = our_config("vit")
    variables = convert.from_torch(reference.state_dict(), config)
    images, tokens = images_for("vit"), tokenize(CAPTIONS)
    with torch.no_grad():
        expected_image = reference.get_image_features(
            pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
        expected_text = reference.get_text_features(input_ids=torch.from_numpy(tokens).long())
    # transformers 5 returns model outputs here; 4.x returned the tensor.
    expected_image = getattr(expected_image, "pooler_output", expected_image).numpy()
    expected_text = getattr(expected_text, "pooler_output", expected_text).numpy()
    image, text = embeddings(config, variables, images, tokens)
    assert relative_error(image, expected_image) < 1e-4
    assert relative_error(text, expected_text) < 1e-4


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14",
                                  "ViT-g-14", "ViT-bigG-14", "RN50", "RN101", "RN50x4", "RN50x16",
                                  "RN50x64"])
def test_every_preset_has_open_clip_shapes(name):
    """Same state-dict keys and shapes as OpenCLIP builds from its own JSON config
    (on the meta device: nothing is allocated), so the parameter counts agree too."""
    model_lib, _, _ = open_clip_modules()
    with torch.device("meta"):
        reference = model_lib.CLIP(**open_clip_config(name))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    abstract = convert.abstract_variables(zoo.model_config(name))
    ours = {rule.torch_key: tuple(jax.eval_shape(rule.to_torch, tuple(
        get_path(abstract, p) for p in rule.paths)).shape) if rule.paths else ()
        for rule in convert.rules_for(zoo.model_config(name))}
    assert ours == expected
    count = sum(np.prod(v.shape) for v in jax.tree.leaves(abstract["params"]))
    assert count == sum(p.numel() for p in reference.parameters())


def test_published_parameter_counts():
    def count(name):
        abstract = convert.abstract_variables(zoo.model_config(name))
        return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract["params"]))
    assert count("ViT-B-32") == 151_277_313
    assert count("RN50") == 102_007_137


def test_quickgelu_names_select_the_activation():
    assert zoo.model_config("ViT-B-32").activation == "gelu"
    assert zoo.model_config("ViT-B-32-quickgelu").activation == "quick_gelu"
    with pytest.raises(ValueError, match="unknown model 'ViT-X'"):
        zoo.model_config("ViT-X")


def test_missing_and_misshapen_keys_are_named():
    config = our_config("vit")
    state_dict = {k: v.numpy() for k, v in open_clip_model("vit").state_dict().items()}
    missing = dict(state_dict)
    del missing["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(convert.ConversionError,
                       match="missing key 'visual.transformer.resblocks.1.mlp.c_fc.bias'"):
        convert.from_torch(missing, config)
    misshapen = dict(state_dict, **{"visual.proj": np.zeros((64, 25), np.float32)})
    with pytest.raises(convert.ConversionError,
                       match=r"'visual.proj' has shape \(64, 25\), expected \(64, 24\)"):
        convert.from_torch(misshapen, config)
    with pytest.raises(convert.ConversionError, match="unexpected key 'visual.extra'"):
        convert.from_torch(dict(state_dict, **{"visual.extra": np.zeros(1)}), config)


def test_files_safetensors_pickle_and_torchscript(tmp_path):
    from safetensors.numpy import save_file
    reference = open_clip_model("vit")
    config = our_config("vit")
    expected = convert.from_torch(reference.state_dict(), config)
    save_file({k: v.numpy() for k, v in reference.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    # OpenCLIP training checkpoints wrap the weights, saved from DistributedDataParallel.
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v
                                           for k, v in reference.state_dict().items()}},
               tmp_path / "epoch_3.pt")
    # OpenAI ships TorchScript archives of half-precision models.
    traced = torch.jit.trace(copy.deepcopy(reference).half(),
                             (torch.zeros(1, 3, 32, 32).half(), torch.zeros(1, 77).long()),
                             strict=False, check_trace=False)
    traced.save(str(tmp_path / "openai.pt"))
    for name in ("model.safetensors", "epoch_3.pt"):
        got = convert.from_torch(tmp_path / name, config)
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    got = convert.from_torch(tmp_path / "openai.pt", config)  # float16 -> float32
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), got, expected)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(got))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_scanned_models_convert_through_the_stacked_layout(kind):
    state_dict = {k: v.numpy() for k, v in open_clip_model(kind).state_dict().items()}
    config = our_config(kind)
    scanned = our_config(kind)
    scanned.scan_layers = True
    variables = convert.from_torch(state_dict, scanned)
    shapes = convert.abstract_variables(scanned)
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    images, tokens = images_for(kind), tokenize(CAPTIONS)
    for ours, expected in zip(embeddings(scanned, variables, images, tokens),
                              embeddings(config, convert.from_torch(state_dict, config), images,
                                         tokens)):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    back = convert.to_torch(variables, scanned)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["broken.pt", "broken.safetensors"])
def test_unreadable_files_are_one_line_errors(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(convert.ConversionError, match=f"{name}: not a readable") as error:
        convert.from_torch(tmp_path / name, our_config("vit"))
    assert "\n" not in str(error.value)
