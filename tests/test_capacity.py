"""FSDP that stays FSDP: what the compiled train step holds and moves per device
(clip_jax/capacity.py), for the meshes users run. Compiled only; nothing runs.

The mesh-equality tests (test_train_step.py and others) show every mesh gives
the same numbers; these show what each costs: activations split over the batch
under FSDP as under data parallelism, parameters and optimizer state split over
the devices, and collectives close to ideal FSDP's."""

import functools
import json
import re

import jax
import pytest

from clip_jax import benchmark, capacity, hlo_stats, output_vocab
from configs.clip import get_config
from tests.conftest import small_config

FLOATS = ("f32", "bf16", "f16")


def vit_b16(mesh, global_batch=128):
    """ViT-B/16 in bfloat16 at the issue's global batch, no remat, on `mesh`."""
    config = get_config("ViT-B-16")
    with config.unlocked():
        config.batch_size = global_batch
        config.model.dtype = "bfloat16"
        config.mesh.update({**dict(data=1, fsdp=1, tensor=1), **mesh})
    return config


@functools.lru_cache(maxsize=None)
def compiled_plan(name, mesh_items):
    """(plan dict, compiled HLO text, parameter shapes) of a named test config on
    8 devices; the shapes are every parameter's and optimizer leaf's, whole, per
    device and per layer of a stacked block, so that arrays shaped like a
    parameter are not mistaken for activations."""
    config = CONFIGS[name](dict(mesh_items))
    compiled, training = capacity.compile_train_step(config, jax.devices()[:8])
    shapes = set()
    for tree, shardings in ((training.abstract_state.params, training.shardings.params),
                            (training.abstract_state.opt_state, training.shardings.opt_state)):
        for value, shard in zip(jax.tree.leaves(tree), jax.tree.leaves(
                shardings, is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))):
            for shape in (tuple(value.shape), tuple(shard.shard_shape(value.shape))):
                shapes |= {shape, shape[1:]}
    return capacity.summarize(config, compiled, training), compiled.as_text(), frozenset(shapes)


def global_batch_activations(compiled, global_batch):
    """Float arrays of rank >= 3 led by the global batch and not shaped like a
    parameter: activations that hold every example on one device (rank 2
    [B, E] are the contrastive loss's all-gathered embeddings, by design)."""
    _, text, parameter_shapes = compiled
    return [(dtype, dims, op) for dtype, dims, op in
            hlo_stats.arrays_with_leading_dim(text, global_batch, min_rank=3)
            if dtype in FLOATS and dims not in parameter_shapes]


# A batch no model dimension equals, nor a device's tokens (14 x 12 = 168), so
# that a leading dimension of this size is the batch.
SMALL_BATCH = 112


def small(mesh, **overrides):
    return small_config(**{"batch_size": SMALL_BATCH, "model.scan_layers": True,
                           "model.text.context_length": 12,
                           **{f"mesh.{axis}": size for axis, size in
                              {**dict(data=1, fsdp=1, tensor=1), **mesh}.items()},
                           **overrides})


def small_resnet(mesh):
    return small(mesh, **{"model.image": dict(kind="resnet", image_size=32,
                                              stage_layers=(1, 1, 1, 1), width=16, heads=2)})


CONFIGS = {
    "vit_b16": vit_b16,
    "scanned": small,
    # 65 image tokens, batch 256: activations outweigh the parameters.
    "long_sequences": lambda mesh: small(mesh, batch_size=256, **{"model.image.image_size": 32,
                                                                  "model.image.patch_size": 4}),
    "unscanned_remat": lambda mesh: small(mesh, **{"model.scan_layers": False,
                                                   "model.remat": "full"}),
    "gradcache": lambda mesh: small(mesh, microbatches=2),
    "patch_dropout": lambda mesh: small(mesh, **{"model.image.patch_dropout": 0.5}),
    "patch_dropout_gradcache": lambda mesh: small(mesh, microbatches=2,
                                                  **{"model.image.patch_dropout": 0.5}),
    "resnet": small_resnet,
    "bow_text": lambda mesh: small(mesh, **{"model.text_encoder": "bag_of_words"}),
    "bow_predict": lambda mesh: small(mesh, objective="bow_predict"),
    "caption_lm": lambda mesh: small(mesh, objective="caption_lm",
                                     **{"model.output_vocab": output_vocab.synthetic_shapes()}),
}

FSDP = (("fsdp", 8),)
DATA = (("data", 8),)
DATA_FSDP = (("data", 2), ("fsdp", 4))


# data=2 x fsdp=4 splits the state 4 ways (the data axis replicates it, as in
# ZeRO-3): a quarter, plus the few parameters no fsdp axis splits.
@pytest.mark.parametrize("mesh, state_fraction", [(FSDP, 1 / 6), (DATA_FSDP, 1.02 / 4)],
                         ids=["fsdp=8", "data=2,fsdp=4"])
def test_fsdp_temporaries_stay_near_data_parallel_and_state_is_split(mesh, state_fraction):
    """ViT-B/16, bf16, batch 128 on 8 devices: FSDP's temporaries at most 1.25x
    data parallelism's (they were 5x when activations followed the weights'
    layout), its parameters and optimizer state split over the fsdp axis."""
    fsdp = compiled_plan("vit_b16", mesh)[0]
    data = compiled_plan("vit_b16", DATA)[0]
    assert fsdp["temp_bytes"] <= 1.25 * data["temp_bytes"]
    fsdp_state = fsdp["param_bytes"] + fsdp["optimizer_bytes"]
    assert fsdp_state <= state_fraction * (data["param_bytes"] + data["optimizer_bytes"])


@pytest.mark.parametrize("mesh", [FSDP, DATA_FSDP, DATA], ids=["fsdp=8", "data=2,fsdp=4",
                                                               "data=8"])
def test_no_activation_of_vit_b16_holds_the_global_batch(mesh):
    assert global_batch_activations(compiled_plan("vit_b16", mesh), 128) == []


@pytest.mark.parametrize("mesh", [FSDP, DATA_FSDP], ids=["fsdp=8", "data=2,fsdp=4"])
def test_the_token_tables_gradient_is_reduce_scattered_not_summed_whole(mesh):
    """Each device scatters its own captions' rows into a partial table, which is
    reduce-scattered in bfloat16 onto the table's fsdp split: no all-reduce
    carries the whole 49,408 x 512 table (autodiff's pin to the gathered table
    made one, twice the bytes), and no activation gathers every shard's rows."""
    config = vit_b16(dict(mesh))
    vocab, width, fsdp = config.model.text.vocab_size, config.model.text.width, dict(mesh)["fsdp"]
    _, text, _ = compiled_plan("vit_b16", mesh)
    table_grads = [(c.group_size, c.dtypes, c.bytes_moved) for c in hlo_stats.collectives(text, 8)
                   if c.kind == "reduce-scatter" and "encode_text/text/shard_map" in c.op_name]
    assert table_grads == [(fsdp, ("bf16",), 2 * vocab * width * (fsdp - 1) // fsdp)]
    all_reduced = [match.group(1) for match in re.finditer(
        r"^\s*(?:ROOT )?%\S+ = (.*?) all-reduce(?:-start)?\(", text, re.MULTILINE)]
    assert not [types for types in all_reduced if f"[{vocab},{width}]" in types]


# Gathers the partitioner may choose on purpose: to form the attention pool's
# query weight gradient [C, N, H] it can all-gather the one-query gradient
# [B, 1, N, H] instead of reduce-scattering the weight's, which is cheaper when
# B x N x H is below C x N x H (this test's 112 x 512 < 512 x 512; not at RN50's
# batches).
ALLOWED = {"resnet": "attnpool/q_proj/dot_general"}


@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in ("vit_b16", "long_sequences")])
def test_every_tower_and_objective_keeps_its_activations_batch_split(name):
    """Scanned and unrolled stacks with remat, the pooled last block, GradCache's
    micro-batches, the ResNet, the bag-of-words tower and both predictive
    objectives, under fsdp=8: no activation holds the global batch (or, under
    GradCache, a micro-batch's global rows)."""
    config = CONFIGS[name](dict(FSDP))
    batches = {config.batch_size, config.batch_size // config.microbatches}
    found = [a for size in batches
             for a in global_batch_activations(compiled_plan(name, FSDP), size)]
    assert [a for a in found if name not in ALLOWED or ALLOWED[name] not in a[2]] == []


@pytest.mark.parametrize("mesh", [(("data", 4), ("tensor", 2)), (("fsdp", 4), ("tensor", 2))],
                         ids=["data=4,tensor=2", "fsdp=4,tensor=2"])
def test_tensor_parallel_mlp_hidden_units_stay_split(mesh):
    """The MLP's hidden activations are [B/4, T, F/2] (Megatron keeps them split;
    the block output is all-reduced), never [., T, F]; with FSDP too."""
    _, text, _ = compiled_plan("vit_b16", mesh)
    hidden = {(dims[-2], dims[-1]) for dtype, dims, _ in
              hlo_stats.arrays_with_leading_dim(text, 128 // 4, min_rank=3) if dtype in FLOATS}
    assert (197, 3072 // 2) in hidden and (77, 2048 // 2) in hidden
    assert (197, 3072) not in hidden and (77, 2048) not in hidden


@pytest.mark.parametrize("mesh", [FSDP, DATA_FSDP], ids=["fsdp=8", "data=2,fsdp=4"])
def test_fsdp_collectives_are_within_1_5x_of_ideal_fsdp(mesh):
    """A small model, f32: bytes sent per device per step at most 1.5x ideal
    FSDP's (parameters gathered forward and backward, gradients reduce-scattered,
    then all-reduced over `data`); activations following the weights' layout
    cost 4.3x (measured on the unconstrained towers)."""
    row = compiled_plan("long_sequences", mesh)[0]
    assert row["dtype"] == "float32"
    assert 0 < row["collective_bytes_total"] <= 1.5 * row["ideal_collective_bytes"]


def test_state_bytes_split_over_fsdp_devices():
    data = compiled_plan("scanned", DATA)[0]
    fsdp = compiled_plan("scanned", FSDP)[0]
    # Only parameters no `embed` axis splits (logit scale, tiny LayerNorm-free
    # vectors) stay whole: close to 1/8 of the replicated state.
    assert fsdp["param_bytes"] <= data["param_bytes"] / 7
    assert fsdp["optimizer_bytes"] <= data["optimizer_bytes"] / 7


def test_plan_command_prints_one_json_line(capsys):
    benchmark.main(["plan", "--config", "tiny", "--devices", "8", "--mesh", "fsdp=8",
                    "--batch-size", "64", "--json"])
    row = json.loads(capsys.readouterr().out)
    assert row["mesh"] == {"dcn_data": 1, "data": 1, "fsdp": 8, "tensor": 1} and row["batch_per_device"] == 8
    assert {"temp_bytes", "argument_bytes", "bytes_per_device", "collective_bytes",
            "fits"} <= set(row)
    assert set(row["collective_bytes"]) == set(hlo_stats.KINDS)
    assert row["fits"]["TPU v5e"] and row["bytes_per_device"] >= row["temp_bytes"] > 0


def test_largest_batch_extrapolates_linearly_between_two_plans():
    rows = [{"batch_per_device": 8, "bytes_per_device": 10 * 2**30},
            {"batch_per_device": 16, "bytes_per_device": 14 * 2**30}]
    largest = capacity.largest_batch_per_device(rows)
    # 6 GiB fixed + 0.5 GiB per example.
    assert largest["TPU v5e"] == 20 and largest["H100"] == 148
    rows[0]["bytes_per_device"] = 20 * 2**30  # state alone over 16 GiB
    rows[1]["bytes_per_device"] = 21 * 2**30
    assert capacity.largest_batch_per_device(rows)["TPU v5e"] is None


@pytest.mark.parametrize("mesh, message", [
    ("fsdp=3", "needs 3 devices, but 8 are available"),
    ("pipeline=8", "--mesh 'pipeline=8': expected AXIS=SIZE"),
])
def test_plan_command_bad_mesh_is_one_line(mesh, message):
    with pytest.raises(SystemExit, match=message):
        benchmark.main(["plan", "--config", "tiny", "--devices", "8", "--mesh", mesh])


def test_a_width_the_fsdp_axis_does_not_divide_is_named_in_one_line():
    """ViT-bigG's 1664 over fsdp=256 fails the same way: name the parameter, the
    largest split that works and the factor to move to `data`."""
    config = small(dict(FSDP), **{"model.image.width": 36})
    with pytest.raises(ValueError, match=r"visual/class_embedding \(36,\): its axis 0 "
                                         r"\('embed', size 36\) cannot be split 8 ways over mesh "
                                         r"axes \('fsdp',\), at most 4; e.g. move a factor of 2"):
        capacity.compile_train_step(config, jax.devices()[:8])


@pytest.mark.parametrize("name", ["patch_dropout", "patch_dropout_gradcache"])
def test_each_device_draws_only_its_own_rows_patch_masks(name):
    """The masks' random bits, sort and kept indices are [B_local, N]: no integer
    array of the global batch (XLA's top_k would have computed every row's
    mask on every device)."""
    _, text, _ = compiled_plan(name, FSDP)
    assert [(dtype, dims, op) for dtype, dims, op in
            hlo_stats.arrays_with_leading_dim(text, SMALL_BATCH, min_rank=2)
            if dtype in ("s32", "u32")] == []


def test_the_plan_compiles_what_auto_resolves_to_on_accelerators():
    """On CPU layer_loop="auto" unrolls the blocks and lean_backward="auto" takes the
    hand-written backward passes; on simulated devices the planner compiles
    autodiff's passes, which a TPU or GPU runs, and the scan (an accelerator
    unrolls without remat: the plans compiled for TPUs and GPUs test that),
    unless the config names a setting itself."""
    def lowered(**model):
        config = small_config(**{"mesh.data": 1, "model.scan_layers": True,
                                 **{f"model.{key}": value for key, value in model.items()}})
        step, state, batch, _ = capacity.abstract_train_step(config, jax.devices()[:1])
        return step.lower(state, batch).as_text()

    planned = lowered(layer_loop="auto", lean_backward="auto")
    assert planned == lowered(layer_loop="scan", lean_backward="off")
    assert planned.count("stablehlo.while") > lowered(layer_loop="unrolled").count(
        "stablehlo.while")
    assert planned != lowered(layer_loop="scan", lean_backward="on")


def test_the_plan_reduces_bfloat16_gradients_in_bfloat16_as_accelerators_do():
    """XLA:CPU computes bfloat16 dots in float32; allowed excess precision, it would
    keep the kernel gradients' dot results in float32 through their all-reduce
    (and only with the lean passes' flattened dots), where a GPU or TPU reduces
    bfloat16. The planner rounds as accelerators do: both backward forms move
    the same bytes, with bfloat16 on the wire."""
    def gradient_reductions(lean_backward):
        config = small_config(**{"mesh.data": 8, "model.dtype": "bfloat16",
                                 "model.lean_backward": lean_backward})
        compiled, _ = capacity.compile_train_step(config, jax.devices()[:8])
        return [c for c in hlo_stats.collectives(compiled.as_text(), 8) if c.kind == "all-reduce"]

    lean, autodiff = gradient_reductions("on"), gradient_reductions("off")
    assert sum(c.bytes_moved for c in lean) == sum(c.bytes_moved for c in autodiff)
    assert any("bf16" in c.dtypes for c in lean)
