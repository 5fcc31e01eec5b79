"""The HLO reader against compiled programs whose traffic is known by construction."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import hlo_stats


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:8])


def compiled_text(fn, mesh, *args, in_specs, out_spec):
    return jax.jit(fn, in_shardings=tuple(NamedSharding(mesh, s) for s in in_specs),
                   out_shardings=NamedSharding(mesh, out_spec)).lower(*args).compile().as_text()


def test_all_gather_bytes_are_seven_eighths_of_the_result(mesh):
    text = compiled_text(lambda x: x * 2, mesh, jnp.ones((64, 32)), in_specs=[P("x")],
                         out_spec=P())
    moved = hlo_stats.bytes_by_kind(hlo_stats.collectives(text, 8))
    assert moved["all-gather"] == 64 * 32 * 4 * 7 // 8
    assert moved["all-reduce"] == moved["reduce-scatter"] == 0


def test_bfloat16_gathers_count_two_bytes_per_value(mesh):
    """XLA:CPU widens bf16 collectives to f32; the reader counts what a GPU/TPU moves."""
    text = compiled_text(lambda x: (x.astype(jnp.bfloat16) * 2), mesh, jnp.ones((64, 32)),
                         in_specs=[P("x")], out_spec=P())
    found = hlo_stats.collectives(text, 8)
    assert hlo_stats.bytes_by_kind(found)["all-gather"] == 64 * 32 * 2 * 7 // 8
    assert [collective.dtypes for collective in found] == [("bf16",)]


def test_a_collective_in_a_loop_counts_once_per_iteration(mesh):
    """A sum over the sharded axis inside a 5-step scan: 5 all-reduces of [32]."""
    def fn(x):
        def body(carry, _):
            carry = carry + jnp.sum(x * carry[None, :], axis=0)
            return carry, None
        return jax.lax.scan(body, jnp.ones(32), None, length=5)[0]

    text = compiled_text(fn, mesh, jnp.ones((64, 32)), in_specs=[P("x")], out_spec=P())
    found = [c for c in hlo_stats.collectives(text, 8) if c.kind == "all-reduce"]
    assert sum(c.executions for c in found) == 5
    assert hlo_stats.bytes_by_kind(found)["all-reduce"] == 5 * 2 * 32 * 4 * 7 // 8


def test_of_a_conditional_the_branch_that_moves_most_counts(mesh):
    def fn(x, flag):
        return jax.lax.cond(flag > 0, lambda v: jnp.sum(v, axis=0), lambda v: v[0] * 0, x)

    text = jax.jit(fn, in_shardings=(NamedSharding(mesh, P("x")), NamedSharding(mesh, P())),
                   out_shardings=NamedSharding(mesh, P())).lower(
        jnp.ones((64, 32)), jnp.ones(())).compile().as_text()
    found = hlo_stats.collectives(text, 8)
    # Either branch needs data from other devices; the sum needs [32] all-reduced at most.
    assert 0 < sum(c.bytes_moved for c in found) <= 2 * 64 * 32 * 4


@pytest.mark.parametrize("attributes, size", [
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}", 4),
    ("replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=4], device_ids=([4,2]T(1,0)) "
     "{'axis_1'}, use_global_device_ids=true", 2),
    ("replica_groups=mesh['a'=2,'b'=4], use_global_device_ids=true", 8),
    ("replica_groups=[2,4]<=[4,2]T(1,0), dimensions={2}", 4),
    ("replica_groups={{0,1,2},{3,4,5}}, dimensions={0}", 3),
    ("replica_groups={}, dimensions={0}", 16),
])
def test_group_size_reads_every_replica_group_form(attributes, size):
    assert hlo_stats.group_size(attributes, 16) == size


def test_arrays_with_leading_dim_finds_them_in_fusions(mesh):
    text = compiled_text(lambda x: jnp.tanh(x) @ jnp.ones((32, 24)), mesh, jnp.ones((40, 32)),
                         in_specs=[P()], out_spec=P())
    shapes = {dims for _, dims, _ in hlo_stats.arrays_with_leading_dim(text, 40, min_rank=2)}
    assert (40, 24) in shapes and (40, 32) in shapes
    assert not hlo_stats.arrays_with_leading_dim(text, 41)


# A counted loop as the TPU compiler writes a windowed einsum: no known_trip_count,
# the counter (tuple element 1) starts at a copied constant and steps by 2.
_COUNTED_LOOP = """HloModule counted

%cond (param: (f32[8], u32[])) -> pred[] {
  %param = (f32[8], u32[]) parameter(0)
  %counter = u32[] get-tuple-element(%param), index=1
  %limit = u32[] constant(LIMIT)
  ROOT %compare = pred[] compare(%counter, %limit), direction=DIRECTION
}

%body (body.param: (f32[8], u32[])) -> (f32[8], u32[]) {
  %body.param = (f32[8], u32[]) parameter(0)
  %values = f32[8] get-tuple-element(%body.param), index=0
  %counter.1 = u32[] get-tuple-element(%body.param), index=1
  %counter.copy = u32[] copy(%counter.1)
  %permute-start = (f32[8], f32[8], u32[], u32[]) collective-permute-start(%values), \
      source_target_pairs={{0,1},{1,0}}
  %permute-done = f32[8] collective-permute-done(%permute-start)
  %step = u32[] constant(2)
  %next = u32[] add(%counter.copy, %step)
  ROOT %tuple.1 = (f32[8], u32[]) tuple(%permute-done, %next)
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8] parameter(0)
  %zero = u32[] constant(0)
  %start = u32[] copy(%zero)
  %init = (f32[8], u32[]) tuple(%x, %start)
  %loop = (f32[8], u32[]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8] get-tuple-element(%loop), index=0
}
"""


@pytest.mark.parametrize("limit, direction, trips", [
    (6, "LT", 3), (7, "LT", 4), (6, "LE", 4), (6, "NE", 3), (0, "LT", 0),
    (6, "GT", 1),  # not a count up to a limit: counted once
])
def test_a_counted_loop_without_a_trip_count_counts_each_trip(limit, direction, trips):
    text = _COUNTED_LOOP.replace("LIMIT", str(limit)).replace("DIRECTION", direction)
    found = hlo_stats.collectives(text, 2)
    assert [(c.kind, c.executions) for c in found] == [("collective-permute", trips)]
    assert hlo_stats.bytes_by_kind(found)["collective-permute"] == trips * 8 * 4


# The TPU compiler's reduce-scatter (an all-reduce whose slice each device keeps,
# in a fusion named all-reduce-scatter) and an asynchronous all-gather continued
# by a second fusion that repeats the collective.
_TPU_FORMS = """HloModule tpu_forms

%all-reduce-scatter.1 (input: f32[64,8]) -> f32[16,8] {
  %input = f32[64,8] parameter(0)
  %reduced = f32[64,8] all-reduce(%input), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %id = u32[] partition-id()
  %rows = u32[] constant(16)
  %offset = u32[] multiply(%id, %rows)
  %zero = u32[] constant(0)
  ROOT %mine = f32[16,8] dynamic-slice(%reduced, %offset, %zero), dynamic_slice_sizes={16,8}
}

%gather_start (p: f32[4,8]) -> f32[16,8] {
  %p = f32[4,8] parameter(0)
  ROOT %gathered = f32[16,8] all-gather(%p), channel_id=2, replica_groups={{0,1,2,3}}, \
      dimensions={0}, backend_config={"async_collective_fusion_config":{"flag_start":"-1","flag_end":"-1"}}
}

%async_collective_fusion.1 (q: f32[4,8]) -> f32[16,8] {
  %q = f32[4,8] parameter(0)
  ROOT %gathered.1 = f32[16,8] all-gather(%q), channel_id=2, replica_groups={{0,1,2,3}}, \
      dimensions={0}, backend_config={"async_collective_fusion_config":{"flag_start":"2","flag_end":"8"}}
}

ENTRY %main (x: f32[64,8], y: f32[4,8]) -> (f32[16,8], f32[16,8], f32[16,8]) {
  %x = f32[64,8] parameter(0)
  %y = f32[4,8] parameter(1)
  %scattered = f32[16,8] fusion(%x), kind=kCustom, calls=%all-reduce-scatter.1
  %start = f32[16,8] fusion(%y), kind=kCustom, calls=%gather_start
  %more = f32[16,8] fusion(%y), kind=kCustom, calls=%async_collective_fusion.1
  ROOT %out = (f32[16,8], f32[16,8], f32[16,8]) tuple(%scattered, %start, %more)
}
"""


def test_the_tpu_compilers_collective_fusions_count_as_what_they_move():
    found = hlo_stats.collectives(_TPU_FORMS, 4)
    assert sorted((c.kind, c.result_bytes) for c in found) == [
        ("all-gather", 16 * 8 * 4), ("reduce-scatter", 16 * 8 * 4)]
    moved = hlo_stats.bytes_by_kind(found)
    assert moved["reduce-scatter"] == 16 * 8 * 4 * 3 and moved["all-gather"] == 16 * 8 * 4 * 3 // 4


# The GPU compiler's combined asynchronous collectives: one start gathers (or
# reduce-scatters) several arrays, its result the tuple of its operands, then
# the tuple of its results.
_GPU_FORMS = """
HloModule gpu_forms

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

ENTRY %main (w: f32[96], v: bf16[96,768], g: f32[768]) -> (f32[768], bf16[768,768], f32[96]) {
  %w = f32[96] parameter(0)
  %v = bf16[96,768] parameter(1)
  %g = f32[768] parameter(2)
  %ag-start = ((f32[96], bf16[96,768]), (f32[768], bf16[768,768])) all-gather-start(%w, %v), \
      channel_id=1, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}
  %ag-done = (f32[768], bf16[768,768]) all-gather-done(%ag-start)
  %rs-start = ((f32[768]), (f32[96])) reduce-scatter-start(%g), channel_id=2, \
      replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={0}, to_apply=%add
  %rs-done = (f32[96]) reduce-scatter-done(%rs-start)
  %gathered = f32[768] get-tuple-element(%ag-done), index=0
  %gathered.1 = bf16[768,768] get-tuple-element(%ag-done), index=1
  %scattered = f32[96] get-tuple-element(%rs-done), index=0
  ROOT %out = (f32[768], bf16[768,768], f32[96]) tuple(%gathered, %gathered.1, %scattered)
}
"""


def test_the_gpu_compilers_combined_collectives_count_every_array():
    found = hlo_stats.collectives(_GPU_FORMS, 8)
    assert sorted((c.kind, c.result_bytes, c.group_size) for c in found) == [
        ("all-gather", 768 * 4 + 768 * 768 * 2, 8), ("reduce-scatter", 96 * 4, 8)]
    moved = hlo_stats.bytes_by_kind(found)
    assert moved["all-gather"] == (768 * 4 + 768 * 768 * 2) * 7 // 8
    assert moved["reduce-scatter"] == 96 * 4 * 7
