"""Mesh construction and the mapping from logical axis names to mesh axes.

Models name their parameter axes (`embed`, `mlp`, `heads`, `vocab`, ...) and
their activations' (`activation_batch`, `activation_mlp`, ...;
models.partitioning); the config's `sharding_rules` say which mesh axis each
name is split over (defaults: `sharding_rules`). This is the one place where
logical names meet devices.
"""

import contextlib
import functools
import math
import re

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax.models.partitioning import ACTIVATION_AXES, BATCH as ACTIVATION_BATCH, spec_axes
from clip_jax.sharding_rules import BATCH_AXES, MESH_AXES


def mesh_shape(mesh_config, num_devices):
    """Resolves config.mesh (one size may be -1) into {axis: size} for num_devices;
    an axis the config lacks (dcn_data in runs from before it) has size 1."""
    sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {sizes}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"config.mesh={sizes}: {num_devices} devices are not divisible by {known}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config.mesh={sizes} needs {math.prod(sizes.values())} devices, "
                         f"but {num_devices} are available")
    return sizes


def device_grid(sizes, devices):
    """The devices as an array of shape sizes[MESH_AXES]. Devices of several
    slices (a `slice_index` attribute, as multi-slice TPUs have) are laid out
    with mesh_utils.create_hybrid_device_mesh: dcn_data runs across slices,
    the inner axes within each (over its fast interconnect); a ValueError when
    dcn_data is not the slice count. Otherwise jax's own device order for the
    platform (mesh_utils.create_device_mesh)."""
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    if slices == 1:
        return mesh_utils.create_device_mesh(shape, devices=devices,
                                             allow_split_physical_axes=True)
    if sizes["dcn_data"] != slices:
        raise ValueError(f"config.mesh.dcn_data={sizes['dcn_data']}: the devices are on {slices} "
                         f"slices; set config.mesh.dcn_data={slices}")
    return mesh_utils.create_hybrid_device_mesh(
        (1, *shape[1:]), (slices, *(1,) * (len(shape) - 1)), devices=devices,
        allow_split_physical_axes=True)


def make_mesh(mesh_config, devices=None):
    """A jax Mesh over `devices` (default: all) with axes dcn_data, data, fsdp,
    tensor (device_grid places them)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(mesh_config, len(devices))
    # Auto axes: flax's logical constraints and jit's sharding propagation need them.
    return jax.sharding.Mesh(device_grid(sizes, devices), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh):
    """How many ways the batch is split."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def replica_axes(mesh, rules):
    """The batch axes (of more than one device) that split no parameter under
    `rules`: the devices along them hold equal parameters, data parallelism's
    replicas (dcn_data and data by default; fsdp splits the weights)."""
    batch = dict(rules).get(ACTIVATION_BATCH)
    parameter_axes = {axis for name, entry in rules if name not in ACTIVATION_AXES
                      for axis in spec_axes(entry)}
    return tuple(axis for axis in spec_axes(batch)
                 if mesh.shape[axis] > 1 and axis not in parameter_axes)


def weight_batch_axes(mesh, rules):
    """The batch axes (of more than one device) that also split parameters under
    `rules`: FSDP's (fsdp by default); the other batch axes are replica_axes."""
    replicas = replica_axes(mesh, rules)
    batch = dict(rules).get(ACTIVATION_BATCH)
    return tuple(axis for axis in spec_axes(batch)
                 if mesh.shape[axis] > 1 and axis not in replicas)


def spec_without(spec, axes):
    """PartitionSpec `spec` with `axes` dropped from every entry."""
    def kept(entry):
        remaining = tuple(axis for axis in spec_axes(entry) if axis not in axes)
        return remaining if len(remaining) > 1 else remaining[0] if remaining else None
    return P(*(kept(entry) for entry in spec))


def rules_without(rules, axes, weights_only=False):
    """`rules` with `axes` dropped from every entry: the rules inside a
    shard_map that is manual over `axes`; `weights_only`: from the parameters'
    names only, activations keeping their split (computing with weights
    gathered over `axes`)."""
    return tuple((name, entry if weights_only and name in ACTIVATION_AXES
                  else spec_without(P(entry), axes)[0]) for name, entry in rules)


def batch_sharding(mesh):
    """Sharding of a batch array: leading dimension over the batch axes."""
    return NamedSharding(mesh, P(BATCH_AXES))


def microbatch_sharding(mesh):
    """Sharding of a micro-batched array [k, B/k, ...]: rows over the batch axes."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh):
    return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh, rules):
    """NamedShardings for a tree of nn.LogicallyPartitioned (abstract) values;
    a ValueError names the first array a mesh axis does not divide."""
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, [tuple(rule) for rule in rules])
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=is_box)[0]
    for (path, leaf), shard in zip(leaves, jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        shape = (leaf.value if is_box(leaf) else leaf).shape
        for dim, (size, entry) in enumerate(zip(shape, shard.spec)):
            axes = spec_axes(entry)
            ways = math.prod(mesh.shape[axis] for axis in axes)
            if size % ways:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                fits = math.gcd(size, ways)
                raise ValueError(
                    f"{name} {tuple(shape)}: its axis {dim} ({leaf.names[dim]!r}, size {size}) "
                    f"cannot be split {ways} ways over mesh axes {axes}, at most {fits}; "
                    f"e.g. move a factor of {ways // fits} of them to mesh.data")
    return shardings


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """While tracing under jit inside this context, the models' activation
    constraints (models.partitioning.constrain) place activations on `mesh` by
    `rules`; outside it they do nothing."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
            nn.logical_axis_rules([tuple(rule) for rule in rules]):
        yield


def with_activation_sharding(fn, mesh, rules):
    """fn, traced inside `activation_sharding(mesh, rules)` (wrap before jit)."""
    @functools.wraps(fn)
    def constrained(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)
    return constrained


def sharding_table(params, shardings):
    """Compact start-up table: one line per parameter kind (repeated Transformer
    blocks folded into one line with a count), its shape and mesh placement."""
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    rows = {}  # folded name -> [shape, spec, count]
    for (path, value), sharding in zip(flat_params, flat_shardings):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        folded = re.sub(r"(resblocks|layer\d)_\d+", r"\1_*", name)
        row = rows.setdefault((folded, tuple(value.shape), str(sharding.spec)), 0)
        rows[(folded, tuple(value.shape), str(sharding.spec))] = row + 1
    lines = [f"  {name + (f' (x{count})' if count > 1 else ''):<56} {str(shape):<16} {spec}"
             for (name, shape, spec), count in rows.items()]
    total = sum(int(np.prod(v.shape)) for _, v in flat_params)
    lines.append(f"  total parameters: {total:,}")
    return "\n".join(lines)
