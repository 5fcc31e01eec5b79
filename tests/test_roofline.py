"""The roofline reader against hand-written HLO of the GPU compiler's forms,
whose FLOPs and bytes are known by construction (the bound on a whole ViT
step, compiled for an H100, is in tests/test_gpu_target.py)."""

import pytest

from clip_jax import roofline

PEAK, BANDWIDTH = 1e15, 1e12  # 1 PFLOP/s, 1 TB/s: a byte costs as much as 1,000 FLOPs

_HLO = """
HloModule roofline

%fused_stack (p0: bf16[4,8,16], p1: s32[], p2: bf16[8,16]) -> bf16[4,8,16] {
  %p0 = bf16[4,8,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = bf16[8,16]{1,0} parameter(2)
  %one = bf16[1,8,16]{2,1,0} bitcast(%p2)
  %zero = s32[] constant(0)
  ROOT %stacked = bf16[4,8,16]{2,1,0} dynamic-update-slice(%p0, %one, %p1, %zero, %zero)
}

%fused_layer (q0: bf16[4,8,16], q1: s32[]) -> bf16[8,16] {
  %q0 = bf16[4,8,16]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %zero.1 = s32[] constant(0)
  %sliced = bf16[1,8,16]{2,1,0} dynamic-slice(%q0, %q1, %zero.1, %zero.1), dynamic_slice_sizes={1,8,16}
  ROOT %layer = bf16[8,16]{1,0} bitcast(%sliced)
}

%fused_dot (a: bf16[8,16], b: bf16[16,32]) -> bf16[8,32] {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,32]{1,0} parameter(1)
  ROOT %product = bf16[8,32]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (loop: (s32[], bf16[4,8,16], bf16[16,32])) -> (s32[], bf16[4,8,16], bf16[16,32]) {
  %loop = (s32[], bf16[4,8,16], bf16[16,32]) parameter(0)
  %i = s32[] get-tuple-element(%loop), index=0
  %stack = bf16[4,8,16]{2,1,0} get-tuple-element(%loop), index=1
  %w = bf16[16,32]{1,0} get-tuple-element(%loop), index=2
  %layer.1 = bf16[8,16]{1,0} fusion(%stack, %i), kind=kLoop, calls=%fused_layer
  %product.1 = bf16[8,32]{1,0} fusion(%layer.1, %w), kind=kCustom, calls=%fused_dot
  %stacked.1 = bf16[4,8,16]{2,1,0} fusion(%stack, %i, %layer.1), kind=kLoop, calls=%fused_stack
  %step = s32[] constant(1)
  %next = s32[] add(%i, %step)
  ROOT %carry = (s32[], bf16[4,8,16], bf16[16,32]) tuple(%next, %stacked.1, %w)
}

%condition (c: (s32[], bf16[4,8,16], bf16[16,32])) -> pred[] {
  %c = (s32[], bf16[4,8,16], bf16[16,32]) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %limit = s32[] constant(4)
  ROOT %more = pred[] compare(%ci, %limit), direction=LT
}

%fused_small (s: f32[1000]) -> f32[1000] {
  %s = f32[1000]{0} parameter(0)
  ROOT %twice = f32[1000]{0} add(%s, %s)
}

%skip (x0: f32[1000]) -> f32[4000] {
  %x0 = f32[1000]{0} parameter(0)
  ROOT %z0 = f32[4000]{0} broadcast(%x0), dimensions={0}
}

%apply (x1: f32[1000]) -> f32[4000] {
  %x1 = f32[1000]{0} parameter(0)
  %y1 = f32[1000]{0} fusion(%x1), kind=kLoop, calls=%fused_small
  ROOT %z1 = f32[4000]{0} broadcast(%y1), dimensions={0}
}

ENTRY %main (lhs: bf16[64,128], rhs: bf16[128,256], stack: bf16[4,8,16], w: bf16[16,32], \
flag: s32[], v: f32[1000]) -> ((bf16[64,256], s8[1024]), (s32[], bf16[4,8,16], bf16[16,32]), f32[4000]) {
  %lhs = bf16[64,128]{1,0} parameter(0)
  %rhs = bf16[128,256]{1,0} parameter(1)
  %stack.1 = bf16[4,8,16]{2,1,0} parameter(2)
  %w.1 = bf16[16,32]{1,0} parameter(3)
  %flag = s32[] parameter(4)
  %v = f32[1000]{0} parameter(5)
  %gemm = (bf16[64,256]{1,0}, s8[1024]{0}) custom-call(%lhs, %rhs), custom_call_target="__cublas$lt$matmul", \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %start = s32[] constant(0)
  %init = (s32[], bf16[4,8,16], bf16[16,32]) tuple(%start, %stack.1, %w.1)
  %loop.1 = (s32[], bf16[4,8,16], bf16[16,32]) while(%init), condition=%condition, body=%body, \
backend_config={"known_trip_count":{"n":"4"}}
  %guarded = f32[4000]{0} conditional(%flag, %v, %v), branch_computations={%skip, %apply}
  ROOT %out = ((bf16[64,256], s8[1024]), (s32[], bf16[4,8,16], bf16[16,32]), f32[4000]) \
tuple(%gemm, %loop.1, %guarded)
}
"""


def by_op(found):
    return sorted((kernel.kind, kernel.flops, kernel.bytes, kernel.executions) for kernel in found)


def test_kernels_count_flops_bytes_and_trips():
    found = roofline.kernels(_HLO, PEAK, BANDWIDTH)
    assert by_op(found) == sorted([
        # cuBLAS GEMM: 2 M N K FLOPs; operands and result, not its workspace.
        ("matmul", 2 * 64 * 256 * 128, (64 * 128 + 128 * 256 + 64 * 256) * 2, 1),
        # In the loop (4 trips): one layer sliced from the stack (its slice read,
        # not the stack), a fused dot, and the layer written back into the stack
        # in place (the update read and written, not the whole stack).
        ("other", 0, 8 * 16 * 2 + 4 + 8 * 16 * 2, 4),
        ("matmul", 2 * 8 * 32 * 16, (8 * 16 + 16 * 32 + 8 * 32) * 2, 4),
        ("other", 0, 8 * 16 * 2 + 4 + 8 * 16 * 2, 4),
        ("other", 0, 3 * 4, 4),  # the loop counter's add, a kernel of its own here
        # Of the conditional's branches the slower, `apply`: its fusion and its
        # broadcast (`skip` has the broadcast only).
        ("other", 0, 1000 * 4 + 1000 * 4, 1), ("other", 0, 1000 * 4 + 4000 * 4, 1),
    ])


# Newer XLA runs the stacking fusion asynchronously: a start whose type holds its
# operands, its result and a context word, and a done that launches nothing.
_ASYNC_STACKING = _HLO.replace(
    "  %stacked.1 = bf16[4,8,16]{2,1,0} fusion(%stack, %i, %layer.1), kind=kLoop, "
    "calls=%fused_stack\n",
    "  %stacking = ((bf16[4,8,16]{2,1,0}, s32[], bf16[8,16]{1,0}), bf16[4,8,16]{2,1,0}, u32[]) "
    "fusion-start(%stack, %i, %layer.1), kind=kLoop, calls=%fused_stack\n"
    "  %stacked.1 = bf16[4,8,16]{2,1,0} fusion-done(%stacking)\n")


def test_an_asynchronous_fusion_counts_as_the_fusion_it_runs():
    assert "fusion-start" in _ASYNC_STACKING
    assert by_op(roofline.kernels(_ASYNC_STACKING, PEAK, BANDWIDTH)) == by_op(
        roofline.kernels(_HLO, PEAK, BANDWIDTH))


# The GPU compiler often reaches a scan's stack through a bitcast that changes
# its layout (a free view): stacking into it and slicing from it are still
# in place and sliced.
_STACK_THROUGH_BITCASTS = _HLO.replace(
    "  ROOT %stacked = bf16[4,8,16]{2,1,0} dynamic-update-slice(%p0, %one, %p1, %zero, %zero)",
    "  %p0_view = bf16[4,8,16]{2,1,0} bitcast(%p0)\n"
    "  ROOT %stacked = bf16[4,8,16]{2,1,0} dynamic-update-slice(%p0_view, %one, %p1, %zero, %zero)",
).replace(
    "  %sliced = bf16[1,8,16]{2,1,0} dynamic-slice(%q0, ",
    "  %q0_view = bf16[4,8,16]{1,2,0} bitcast(%q0)\n"
    "  %sliced = bf16[1,8,16]{2,1,0} dynamic-slice(%q0_view, ")


def test_a_stack_seen_through_a_bitcast_is_still_updated_in_place_and_sliced():
    assert _STACK_THROUGH_BITCASTS.count("bitcast(%p0)") == 1
    assert _STACK_THROUGH_BITCASTS.count("bitcast(%q0)") == 1
    assert by_op(roofline.kernels(_STACK_THROUGH_BITCASTS, PEAK, BANDWIDTH)) == by_op(
        roofline.kernels(_HLO, PEAK, BANDWIDTH))


def test_the_step_bound_sums_each_kernels_roof():
    bound = roofline.step_bound(_HLO, PEAK, BANDWIDTH)
    found = roofline.kernels(_HLO, PEAK, BANDWIDTH)
    expected = sum(max(k.flops / PEAK, k.bytes / BANDWIDTH) * k.executions for k in found)
    assert bound["seconds"] == pytest.approx(expected)
    assert bound["flops"] == 2 * 64 * 256 * 128 + 4 * 2 * 8 * 32 * 16
    assert set(bound["by_kind"]) == {"matmul", "attention", "other"}


# The TPU compiler's forms: each kernel carries its cost model's estimate; a
# plain matmul is a convolution with a 1-wide window, a batched one (here 4
# batches of [8, 16] x [16, 32]) a convolution whose batch is a window dilated so
# that one tap lands on input; a Pallas kernel (Mosaic) has no estimate.
_TPU_HLO = """
HloModule tpu_forms

%fused_matmul (a: bf16[2,32,128], b: bf16[128,256,1]) -> bf16[2,32,256] {
  %a = bf16[2,32,128]{2,1,0:T(8,128)(2,1)} parameter(0)
  %b = bf16[128,256,1]{1,0,2:T(8,128)(2,1)} parameter(1)
  ROOT %product = bf16[2,32,256]{2,1,0:T(8,128)(2,1)} convolution(%a, %b), window={size=1}, \
dim_labels=0bf_io0->0bf
}

%body (loop: (s32[], bf16[4,8,16], bf16[4,16,32])) -> (s32[], bf16[4,8,16], bf16[4,16,32]) {
  %loop = (s32[], bf16[4,8,16], bf16[4,16,32]) parameter(0)
  %i = s32[] get-tuple-element(%loop), index=0
  %x = bf16[4,8,16]{2,1,0} get-tuple-element(%loop), index=1
  %w = bf16[4,16,32]{2,1,0} get-tuple-element(%loop), index=2
  %batched = bf16[4,8,32]{2,1,0} convolution(%x, %w), window={size=4 stride=3 lhs_dilate=4}, \
dim_labels=0bf_0io->0bf, backend_config={"window_config":{"estimated_cycles":"700"}}
  %kernel = bf16[4,8,16]{2,1,0} custom-call(%x), custom_call_target="tpu_custom_call"
  %step = s32[] constant(1)
  %next = s32[] add(%i, %step)
  ROOT %carry = (s32[], bf16[4,8,16], bf16[4,16,32]) tuple(%next, %kernel, %w)
}

%condition (c: (s32[], bf16[4,8,16], bf16[4,16,32])) -> pred[] {
  %c = (s32[], bf16[4,8,16], bf16[4,16,32]) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %limit = s32[] constant(3)
  ROOT %more = pred[] compare(%ci, %limit), direction=LT
}

ENTRY %main (lhs: bf16[2,32,128], rhs: bf16[128,256,1], x: bf16[4,8,16], w: bf16[4,16,32]) -> \
(bf16[2,32,256], (s32[], bf16[4,8,16], bf16[4,16,32])) {
  %lhs = bf16[2,32,128]{2,1,0} parameter(0)
  %rhs = bf16[128,256,1]{1,0,2} parameter(1)
  %x.1 = bf16[4,8,16]{2,1,0} parameter(2)
  %w.1 = bf16[4,16,32]{2,1,0} parameter(3)
  %matmul = bf16[2,32,256]{2,1,0} fusion(%lhs, %rhs), kind=kOutput, calls=%fused_matmul, \
backend_config={"window_config":{"estimated_cycles":"5000"}}
  %start = s32[] constant(0)
  %init = (s32[], bf16[4,8,16], bf16[4,16,32]) tuple(%start, %x.1, %w.1)
  %loop.1 = (s32[], bf16[4,8,16], bf16[4,16,32]) while(%init), condition=%condition, body=%body, \
backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = (bf16[2,32,256], (s32[], bf16[4,8,16], bf16[4,16,32])) tuple(%matmul, %loop.1)
}
"""


def test_convolutions_count_as_the_matmuls_they_are():
    matmuls = sorted((k.flops, k.executions) for k in roofline.kernels(_TPU_HLO, PEAK, BANDWIDTH)
                     if k.kind == "matmul")
    assert matmuls == [(2 * 4 * 8 * 32 * 16, 3), (2 * 64 * 256 * 128, 1)]


def test_the_tpu_compilers_estimates_are_summed_over_executions():
    estimate = roofline.estimated_cycles(_TPU_HLO)
    assert estimate["by_kind"] == {"matmul": 5000 + 3 * 700, "attention": 0, "other": 0}
    assert estimate["cycles"] == 7100
    assert estimate["mosaic_kernels"] == 3  # the Pallas kernel, left out, once per trip
    assert roofline.estimated_cycles(_HLO) == {  # the GPU compiler's: no estimates
        "cycles": 0, "by_kind": {"matmul": 0, "attention": 0, "other": 0}, "mosaic_kernels": 0}
