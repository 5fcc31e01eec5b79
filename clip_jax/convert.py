r"""Weight interchange with PyTorch CLIPs: OpenAI, OpenCLIP and Hugging Face.

  variables = from_torch("ViT-B-32.pt", "ViT-B-32")   # {"params": ..., "batch_stats": ...}
  state_dict = to_torch(variables, "ViT-B-32")          # OpenCLIP/OpenAI names, numpy arrays

One table of rules per architecture maps each PyTorch key to the flax leaves it
holds and back, so the two directions cannot drift apart. Hugging Face
`CLIPModel` checkpoints are renamed to OpenCLIP's layout first.

CLI (orbax checkpoint <-> PyTorch file):

  python -m clip_jax.convert --model ViT-B-32 --input ViT-B-32.pt --output /tmp/vit_b32
  python -m clip_jax.convert --model ViT-B-32 --input /tmp/vit_b32 --output out.safetensors --to-torch
"""

from clip_jax import quiet_tensorflow  # noqa: F401  (before TensorFlow loads)
import argparse
import dataclasses
import os
import sys
from typing import Callable, Mapping, Union

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clip_jax import variables as variables_lib
from clip_jax.models import zoo
from clip_jax.pytree import get_path, set_path
from clip_jax.models.clip import CLIP
from clip_jax.models.coca import CoCa
from clip_jax.models.transformer import stack_layers, unstack_layers

# Keys in OpenAI/OpenCLIP files that are not weights (OpenAI's TorchScript archives
# store the input sizes; old OpenCLIP versions saved the causal mask).
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


class ConversionError(ValueError):
    """A checkpoint that does not fit the architecture; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One PyTorch tensor <-> the flax leaves it holds (several for packed q/k/v)."""

    torch_key: str
    paths: tuple  # flax paths, e.g. ("params", "visual", "conv1", "kernel"); () for torch-only
    to_flax: Callable  # torch array -> tuple of flax arrays, one per path
    to_torch: Callable  # tuple of flax arrays -> torch array


def _concat(parts):
    xp = jnp if any(isinstance(p, jax.Array) or hasattr(p, "aval") for p in parts) else np
    return xp.concatenate(parts)


def _same(torch_key, path):
    return [Rule(torch_key, (path,), lambda t: (t,), lambda f: f[0])]


def _linear(torch_key, path, bias=True):
    """torch Linear weight [out, in] <-> flax kernel [in, out]."""
    rules = [Rule(f"{torch_key}.weight", (path + ("kernel",),), lambda t: (t.T,), lambda f: f[0].T)]
    return rules + (_same(f"{torch_key}.bias", path + ("bias",)) if bias else [])


def _projection(torch_key, path):
    """A bare [in, out] projection matrix, stored the same way in both."""
    return _same(torch_key, path)


def _layer_norm(torch_key, path):
    return (_same(f"{torch_key}.weight", path + ("scale",))
            + _same(f"{torch_key}.bias", path + ("bias",)))


def _conv(torch_key, path):
    """torch [out, in, kh, kw] <-> flax [kh, kw, in, out]."""
    return [Rule(torch_key, (path + ("kernel",),), lambda t: (t.transpose(2, 3, 1, 0),),
                 lambda f: f[0].transpose(3, 2, 0, 1))]


def _batch_norm(torch_key, path):
    stats = ("batch_stats",) + path[1:]
    return (_same(f"{torch_key}.weight", path + ("scale",))
            + _same(f"{torch_key}.bias", path + ("bias",))
            + _same(f"{torch_key}.running_mean", stats + ("mean",))
            + _same(f"{torch_key}.running_var", stats + ("var",))
            # Only read by BatchNorm with momentum=None; written as 0, ignored on load.
            + [Rule(f"{torch_key}.num_batches_tracked", (), lambda t: (),
                    lambda f: np.zeros((), np.int64))])


def _heads_in(weight_rows, heads):
    """torch [H*D, in] rows -> flax DenseGeneral kernel [in, H, D]."""
    return weight_rows.T.reshape(weight_rows.shape[1], heads, -1)


def _heads_out(kernel):
    """flax kernel [in, H, D] -> torch [H*D, in]."""
    return kernel.reshape(kernel.shape[0], -1).T


def _attention(torch_key, path, heads):
    """nn.MultiheadAttention's packed in_proj <-> flax query/key/value + out."""
    qkv = tuple(path + (name, "kernel") for name in ("query", "key", "value"))
    qkv_bias = tuple(path + (name, "bias") for name in ("query", "key", "value"))
    return [
        Rule(f"{torch_key}.in_proj_weight", qkv,
             lambda t: tuple(_heads_in(part, heads) for part in np.split(t, 3)),
             lambda f: _concat([_heads_out(k) for k in f])),
        Rule(f"{torch_key}.in_proj_bias", qkv_bias,
             lambda t: tuple(part.reshape(heads, -1) for part in np.split(t, 3)),
             lambda f: _concat([b.reshape(-1) for b in f])),
        Rule(f"{torch_key}.out_proj.weight", (path + ("out", "kernel"),),
             lambda t: (t.T.reshape(heads, -1, t.shape[0]),),
             lambda f: f[0].reshape(-1, f[0].shape[-1]).T),
        *_same(f"{torch_key}.out_proj.bias", path + ("out", "bias")),
    ]


def _block(torch_block, flax_block, heads, cross_attention=False):
    """A ResidualAttentionBlock (with ln_1_kv when it cross-attends)."""
    return (_layer_norm(f"{torch_block}.ln_1", flax_block + ("ln_1",))
            + (_layer_norm(f"{torch_block}.ln_1_kv", flax_block + ("ln_1_kv",))
               if cross_attention else [])
            + _attention(f"{torch_block}.attn", flax_block + ("attn",), heads)
            + _layer_norm(f"{torch_block}.ln_2", flax_block + ("ln_2",))
            + _linear(f"{torch_block}.mlp.c_fc", flax_block + ("c_fc",))
            + _linear(f"{torch_block}.mlp.c_proj", flax_block + ("c_proj",)))


def _transformer(torch_key, path, layers, heads):
    return [rule for i in range(layers)
            for rule in _block(f"{torch_key}.resblocks.{i}", path + (f"resblocks_{i}",), heads)]


def _attentional_pooler(torch_key, path, heads):
    """OpenCLIP's AttentionalPooler: its nn.MultiheadAttention has separate q/k/v
    weights (the keys' width differs from the queries') and one packed bias."""
    attention, flax_attention = f"{torch_key}.attn", path + ("attn",)
    rules = _same(f"{torch_key}.query", path + ("query",))
    for name, flax_name in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += [Rule(f"{attention}.{name}_proj_weight", (flax_attention + (flax_name, "kernel"),),
                       lambda t: (_heads_in(t, heads),), lambda f: _heads_out(f[0]))]
    packed = _attention(attention, flax_attention, heads)
    rules += [rule for rule in packed if not rule.torch_key.endswith("in_proj_weight")]
    return (rules + _layer_norm(f"{torch_key}.ln_q", path + ("ln_q",))
            + _layer_norm(f"{torch_key}.ln_k", path + ("ln_k",)))


def _vit_rules(image):
    v = ("params", "visual")
    pool = (_attentional_pooler("visual.attn_pool", v + ("attn_pool",), image.pool_heads)
            if image.get("pool_queries", 0) else [])
    return (_conv("visual.conv1.weight", v + ("conv1",))
            + _same("visual.class_embedding", v + ("class_embedding",))
            + _same("visual.positional_embedding", v + ("positional_embedding",))
            + _layer_norm("visual.ln_pre", v + ("ln_pre",))
            + _transformer("visual.transformer", v + ("transformer",), image.layers, image.heads)
            + pool
            + _layer_norm("visual.ln_post", v + ("ln_post",))
            + _projection("visual.proj", v + ("proj",)))


def _pool_projection(torch_key, path, heads):
    """Attention-pool q/k/v Linear [H*D, C] <-> DenseGeneral [C, H, D]."""
    return [Rule(f"{torch_key}.weight", (path + ("kernel",),),
                 lambda t: (_heads_in(t, heads),), lambda f: _heads_out(f[0])),
            Rule(f"{torch_key}.bias", (path + ("bias",),),
                 lambda t: (t.reshape(heads, -1),), lambda f: f[0].reshape(-1))]


def _resnet_rules(image):
    v = ("params", "visual")
    rules = []
    for i in (1, 2, 3):  # the 3-conv stem
        rules += _conv(f"visual.conv{i}.weight", v + (f"conv{i}",))
        rules += _batch_norm(f"visual.bn{i}", v + (f"bn{i}",))
    for stage, blocks in enumerate(image.stage_layers):
        for block in range(blocks):
            torch_block, flax_block = f"visual.layer{stage + 1}.{block}", v + (f"layer{stage + 1}_{block}",)
            for i in (1, 2, 3):
                rules += _conv(f"{torch_block}.conv{i}.weight", flax_block + (f"conv{i}",))
                rules += _batch_norm(f"{torch_block}.bn{i}", flax_block + (f"bn{i}",))
            if block == 0:  # the first block of every stage changes width or stride
                rules += _conv(f"{torch_block}.downsample.0.weight", flax_block + ("downsample_conv",))
                rules += _batch_norm(f"{torch_block}.downsample.1", flax_block + ("downsample_bn",))
    pool = v + ("attnpool",)
    rules += _same("visual.attnpool.positional_embedding", pool + ("positional_embedding",))
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += _pool_projection(f"visual.attnpool.{name}", pool + (name,), image.heads)
    rules += [Rule("visual.attnpool.c_proj.weight", (pool + ("c_proj", "kernel"),),
                   lambda t: (t.T.reshape(image.heads, -1, t.shape[0]),),
                   lambda f: f[0].reshape(-1, f[0].shape[-1]).T)]
    rules += _same("visual.attnpool.c_proj.bias", pool + ("c_proj", "bias"))
    return rules


def _text_rules(text, prefix=""):
    """CLIP's text tower keys, at the state dict's top level (CLIP) or under
    `prefix` "text." (CoCa, whose text tower is a module of its own)."""
    t = ("params", "text")
    cls = _same(f"{prefix}cls_emb", t + ("cls_emb",)) if text.get("embed_cls", False) else []
    return (_same(f"{prefix}token_embedding.weight", t + ("token_embedding",))
            + _same(f"{prefix}positional_embedding", t + ("positional_embedding",))
            + cls
            + _transformer(f"{prefix}transformer", t + ("transformer",), text.layers, text.heads)
            + _layer_norm(f"{prefix}ln_final", t + ("ln_final",))
            + _projection(f"{prefix}text_projection", t + ("text_projection",)))


def _decoder_rules(decoder):
    """CoCa's multimodal decoder, OpenCLIP's `text_decoder`."""
    d = ("params", "decoder")
    rules = []
    for i in range(decoder.layers):
        rules += _block(f"text_decoder.resblocks.{i}", d + (f"resblocks_{i}",), decoder.heads)
        rules += _block(f"text_decoder.cross_attn.{i}", d + (f"cross_attn_{i}",), decoder.heads,
                        cross_attention=True)
    return (rules + _layer_norm("text_decoder.ln_final", d + ("ln_final",))
            + _projection("text_decoder.text_projection", d + ("text_projection",)))


def rules_for(model_config: ml_collections.ConfigDict) -> list:
    """The conversion table of an architecture: one Rule per PyTorch key."""
    text_encoder = model_config.get("text_encoder", "transformer")
    if text_encoder != "transformer":
        raise ConversionError(f"config.model.text_encoder={text_encoder!r}: OpenCLIP has "
                              "CLIP's Transformer text tower only")
    image_rules = {"vit": _vit_rules, "resnet": _resnet_rules}[model_config.image.kind]
    if "decoder" in model_config:  # CoCa
        rules = (_text_rules(model_config.text, prefix="text.") + image_rules(model_config.image)
                 + _decoder_rules(model_config.decoder))
    else:
        rules = _text_rules(model_config.text)
        rules = rules[:2] + image_rules(model_config.image) + rules[2:]
    rules += _same("logit_scale", ("params", "logit_scale"))
    if model_config.logit_bias_init is not None:
        rules += _same("logit_bias", ("params", "logit_bias"))
    return rules


def _resolve(model):
    """(config.model, name for messages) from a zoo name or a config.model."""
    if isinstance(model, str):
        return zoo.model_config(model), model
    return model, "the given config"


def _unscanned(model_config):
    """The config of the per-block layout (resblocks_i), which the rules describe."""
    config = model_config.copy_and_resolve_references()
    config.scan_layers = False
    return config


def _transformer_paths(model_config):
    """Paths of the Transformer stacks whose blocks scan_layers stacks."""
    towers = ("visual", "text") if model_config.image.kind == "vit" else ("text",)
    return [("params", tower, "transformer") for tower in towers]


def _relayout(variables, model_config, convert_stack):
    """variables with every Transformer stack passed through `convert_stack`."""
    for path in _transformer_paths(model_config):
        parent = get_path(variables, path[:-1])
        parent[path[-1]] = jax.device_get(convert_stack(parent[path[-1]]))
    return variables


def abstract_variables(model_config):
    """Flax variable shapes of an architecture, without allocating them."""
    model_class = CoCa if "decoder" in model_config else CLIP
    return variables_lib.abstract_variables(model_class(model_config))


# ---------------------------------------------------------------- reading files


def _torch_to_numpy(value):
    value = value.detach().cpu()
    if value.dtype.is_floating_point:
        value = value.float()  # OpenAI ships float16; parameters here are float32
    return value.numpy()


def _load_torch_file(path):
    try:
        import torch  # noqa: PLC0415 (optional extra: pip install 'clip_jax[convert]')
    except ImportError:
        raise ConversionError(f"{path}: reading PyTorch files needs torch "
                              "(pip install 'clip_jax[convert]'); .safetensors files do not") from None
    try:  # OpenAI's released models are TorchScript archives
        state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 (pickle, zip and torch errors alike)
            raise ConversionError(f"{path}: not a readable PyTorch checkpoint "
                                  f"({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if "state_dict" in state_dict:  # an OpenCLIP training checkpoint
        state_dict = state_dict["state_dict"]
    return state_dict


def load_state_dict(source) -> dict:
    """A state dict (torch tensors or numpy arrays) or a file -> {key: numpy array}."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ConversionError(f"{path}: no such file")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file  # noqa: PLC0415
            try:
                source = load_file(path)
            except Exception as error:  # noqa: BLE001 (safetensors raises its own error types)
                raise ConversionError(f"{path}: not a readable .safetensors file "
                                      f"({str(error).splitlines()[0]})") from None
        else:
            source = _load_torch_file(path)
    state_dict = {}
    for key, value in source.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key.rsplit(".", 1)[-1] in _NON_WEIGHT_KEYS or key in _NON_WEIGHT_KEYS:
            continue
        state_dict[key] = value if isinstance(value, np.ndarray) else _torch_to_numpy(value)
    if "text_model.embeddings.token_embedding.weight" in state_dict:
        state_dict = _from_hugging_face(state_dict)
    return state_dict


def _from_hugging_face(hf):
    """Hugging Face CLIPModel keys -> OpenCLIP keys (q/k/v packed, Linear transposed)."""
    renames = {"embeddings.token_embedding.weight": "token_embedding.weight",
               "embeddings.position_embedding.weight": "positional_embedding",
               "final_layer_norm": "ln_final", "embeddings.patch_embedding.weight": "conv1.weight",
               "embeddings.class_embedding": "class_embedding", "pre_layrnorm": "ln_pre",
               "post_layernorm": "ln_post", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj",
               "encoder.layers": "transformer.resblocks"}
    out = {}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = value.T
            continue
        if key == "vision_model.embeddings.position_embedding.weight":
            out["visual.positional_embedding"] = value
            continue
        name = key.replace("text_model.", "", 1).replace("vision_model.", "visual.", 1)
        for old, new in renames.items():
            name = name.replace(old, new)
        if ".self_attn." in name:  # packed below
            continue
        out[name] = value
    for key in hf:
        if key.endswith("self_attn.q_proj.weight") or key.endswith("self_attn.q_proj.bias"):
            kind = key.rsplit(".", 1)[-1]
            prefix = key[: -len(f"q_proj.{kind}")]
            name = prefix.replace("text_model.", "", 1).replace("vision_model.", "visual.", 1)
            name = name.replace("encoder.layers", "transformer.resblocks").replace("self_attn.", "attn.")
            out[f"{name}in_proj_{kind}"] = np.concatenate(
                [hf[f"{prefix}{p}_proj.{kind}"] for p in "qkv"])
    return out


# ---------------------------------------------------------------- conversion


def from_torch(source: Union[str, os.PathLike, Mapping], model) -> dict:
    """OpenAI / OpenCLIP / Hugging Face weights -> {"params": ..., ["batch_stats": ...]}.

    `source`: a state dict (torch tensors or numpy arrays) or a .pt/.bin/TorchScript/
    .safetensors file; `model`: a zoo name (e.g. "ViT-B-32") or a config.model.
    Raises ConversionError naming the first missing, mis-shaped or unexpected key.
    """
    model_config, name = _resolve(model)
    scanned, model_config = model_config.get("scan_layers", False), _unscanned(model_config)
    state_dict = load_state_dict(source)
    abstract = flax.core.unfreeze(abstract_variables(model_config))
    variables = {}
    used = set()
    for rule in rules_for(model_config):
        if rule.torch_key not in state_dict:
            if not rule.paths:  # torch-only bookkeeping, e.g. num_batches_tracked
                continue
            raise ConversionError(f"{name}: missing key {rule.torch_key!r} in the checkpoint")
        value = state_dict[rule.torch_key]
        used.add(rule.torch_key)
        if not rule.paths:
            continue
        expected = jax.eval_shape(rule.to_torch, tuple(get_path(abstract, p) for p in rule.paths))
        if tuple(value.shape) != tuple(expected.shape):
            raise ConversionError(f"{name}: key {rule.torch_key!r} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(expected.shape)}")
        for path, leaf in zip(rule.paths, rule.to_flax(value)):
            set_path(variables, path, np.array(leaf, dtype=get_path(abstract, path).dtype))
    unexpected = [key for key in state_dict if key not in used]
    if unexpected:
        raise ConversionError(f"{name}: unexpected key {unexpected[0]!r} in the checkpoint "
                              f"({len(unexpected)} unexpected in all): a different architecture?")
    return _relayout(variables, model_config, stack_layers) if scanned else variables


def to_torch(variables: Mapping, model) -> dict:
    """{"params": ..., ["batch_stats": ...]} -> OpenCLIP/OpenAI state dict of numpy arrays."""
    model_config, _ = _resolve(model)
    variables = flax.core.unfreeze(variables)
    if model_config.get("scan_layers", False):
        variables = _relayout(variables, model_config, unstack_layers)  # unfreeze copied it
    model_config = _unscanned(model_config)
    # Fresh C-ordered arrays: transposed views would be written wrongly by writers that
    # take the raw buffer.
    return {rule.torch_key: np.array(rule.to_torch(tuple(np.asarray(get_path(variables, p))
                                                         for p in rule.paths)), order="C")
            for rule in rules_for(model_config)}


# ---------------------------------------------------------------- CLI


def _check_trained_as_clip(path):
    """ConversionError unless `path`, when it is a training workdir, trained the
    contrastive (or CoCa) objective with the Transformer text tower (OpenCLIP's models)."""
    from clip_jax import run_config  # noqa: PLC0415 (TensorFlow's gfile; from_torch needs none)
    try:
        config = run_config.read(path)
    except ValueError:
        return  # no config.json: a clip_jax.convert output, which is CLIP by construction
    if config.objective not in ("contrastive", "coca"):
        raise ConversionError(f"{path} was trained with config.objective={config.objective!r}; "
                              "OpenCLIP holds contrastive models (CLIP, CoCa) only")
    rules_for(config.model)  # raises for a bag-of-words text tower


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m clip_jax.convert",
        description="Convert CLIP weights between PyTorch files and orbax checkpoints.")
    parser.add_argument("--model", required=True,
                        help=f"architecture, one of: {', '.join(zoo.MODEL_NAMES)}")
    parser.add_argument("--input", required=True,
                        help="PyTorch file (.pt/.bin/TorchScript/.safetensors, OpenAI, OpenCLIP or "
                             "Hugging Face); with --to-torch an orbax checkpoint directory")
    parser.add_argument("--output", required=True,
                        help="orbax checkpoint directory; with --to-torch a .safetensors file")
    parser.add_argument("--to-torch", action="store_true",
                        help="orbax checkpoint -> OpenCLIP-loadable .safetensors")
    parser.add_argument("--scan-layers", action="store_true",
                        help="the orbax side uses the scanned layout (config.model.scan_layers)")
    args = parser.parse_args(argv)
    from clip_jax import checkpoint  # noqa: PLC0415 (orbax import is slow; not needed for --help)
    try:
        model_config = zoo.model_config(args.model)
        model_config.scan_layers = args.scan_layers
        if args.to_torch:
            _check_trained_as_clip(args.input)
            variables = checkpoint.load_variables(args.input, abstract_variables(model_config))
            from safetensors.numpy import save_file  # noqa: PLC0415
            state_dict = to_torch(jax.device_get(variables), model_config)
            save_file(state_dict, args.output)
            print(f"wrote {len(state_dict)} tensors to {args.output}")
        else:
            variables = from_torch(args.input, model_config if args.scan_layers else args.model)
            checkpoint.save_variables(args.output, variables)
            count = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
            print(f"wrote {count:,} parameters of {args.model} to {args.output}")
    except (ConversionError, ValueError, FileNotFoundError) as error:
        sys.exit(f"convert error: {error}")


if __name__ == "__main__":
    main()
