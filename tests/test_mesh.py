"""The dcn_data mesh axis (data parallelism across slices over the data-centre
network): device layout and equality with one device."""

import dataclasses

import jax
import numpy as np
import pytest

from clip_jax import sharding
from clip_jax.sharding_rules import DEFAULT_RULES
from tests.test_train_step import run_on_one_and_eight


@dataclasses.dataclass(frozen=True)
class StandInDevice:
    """What mesh construction reads of a device of a multi-slice system."""
    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "stand-in"


def _sizes(**sizes):
    return {**dict.fromkeys(sharding.MESH_AXES, 1), **sizes}


def test_each_slice_fills_the_inner_axes_and_dcn_data_runs_across_slices():
    # Slices interleaved in the device list, as no launcher promises an order.
    devices = [StandInDevice(i, slice_index=i % 2, process_index=i % 2) for i in range(8)]
    grid = sharding.device_grid(_sizes(dcn_data=2, data=2, fsdp=2), devices)
    assert grid.shape == (2, 2, 2, 1)
    for dcn in range(2):
        assert {device.slice_index for device in grid[dcn].ravel()} == {dcn}
    assert sorted(device.id for device in grid.ravel()) == list(range(8))


def test_dcn_data_other_than_the_slice_count_is_a_clear_error():
    devices = [StandInDevice(i, slice_index=i // 2, process_index=i // 2) for i in range(8)]
    with pytest.raises(ValueError, match="devices are on 4 slices; set config.mesh.dcn_data=4"):
        sharding.device_grid(_sizes(dcn_data=2, data=4), devices)


def test_one_slice_keeps_jax_device_order():
    devices = jax.devices()
    grid = sharding.device_grid(_sizes(dcn_data=2, data=4), devices)
    np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(grid).ravel(),
                                  [d.id for d in devices])


@pytest.mark.parametrize("mesh", [dict(dcn_data=2, data=4, fsdp=1, tensor=1),
                                  dict(dcn_data=2, data=1, fsdp=4, tensor=1)],
                         ids=["dcn_data=2,data=4", "dcn_data=2,fsdp=4"])
def test_dcn_data_meshes_equal_one_device(mesh):
    (params_1, history_1), (params_8, history_8) = run_on_one_and_eight(mesh, 2)
    for metrics_1, metrics_8 in zip(history_1, history_8):
        np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 params_8, params_1)


@pytest.mark.parametrize("mesh, rules, replicas, weight_axes", [
    (dict(dcn_data=2, data=4), DEFAULT_RULES, ("dcn_data", "data"), ()),
    (dict(data=2, fsdp=2, tensor=2), DEFAULT_RULES, ("data",), ("fsdp",)),
    (dict(fsdp=8), DEFAULT_RULES, (), ("fsdp",)),  # FSDP splits the weights: no replicas
    (dict(data=1, fsdp=8), DEFAULT_RULES, (), ("fsdp",)),
    # Rules that split the weights' embed over data too leave no replica axis.
    (dict(data=2, fsdp=4), (("embed", ("data", "fsdp")), *DEFAULT_RULES[1:]), (),
     ("data", "fsdp")),
])
def test_replica_axes_are_batch_axes_that_split_no_parameter(mesh, rules, replicas, weight_axes):
    """The batch axes of more than one device are the replicas' or the weights'
    (FSDP's, which GradCache's gathered weights gather over)."""
    sizes = {"dcn_data": 1, "data": 1, "fsdp": 1, "tensor": 1, **mesh}
    devices = np.array(jax.devices()).reshape(tuple(sizes.values()))
    mesh = jax.sharding.Mesh(devices, tuple(sizes))
    assert sharding.replica_axes(mesh, rules) == replicas
    assert sharding.weight_batch_axes(mesh, rules) == weight_axes


def test_rules_without_manual_axes_keep_the_others():
    rules = (("embed", "fsdp"), ("activation_batch", ("dcn_data", "data", "fsdp")),
             ("activation_mlp", "tensor"), ("kv", None))
    assert sharding.rules_without(rules, ("dcn_data", "data")) == (
        ("embed", "fsdp"), ("activation_batch", "fsdp"), ("activation_mlp", "tensor"),
        ("kv", None))
    assert sharding.rules_without(rules, ("fsdp",))[1] == ("activation_batch",
                                                           ("dcn_data", "data"))
    assert sharding.rules_without(rules, ("data", "fsdp"))[:2] == (
        ("embed", None), ("activation_batch", "dcn_data"))
    # Weights gathered over fsdp, activations still split over it.
    assert sharding.rules_without(rules, ("fsdp",), weights_only=True) == (
        ("embed", None), *rules[1:])
