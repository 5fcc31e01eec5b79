"""op_profile: device time of a traced program by kind of operation, on programs
and timelines whose answer is known by construction."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import hlo_stats, op_profile
from clip_jax.op_profile import Event


def test_instructions_are_sorted_into_matmul_collective_data_movement_and_fusions():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:8])

    def fn(a, b):
        product = a @ b  # rows split over x: a local matmul
        return jnp.tanh(product).sum(axis=0), product.T  # a sum over x: an all-reduce

    compiled = jax.jit(fn, in_shardings=(NamedSharding(mesh, P("x")), NamedSharding(mesh, P())),
                       out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P()))
                       ).lower(jnp.ones((64, 32)), jnp.ones((32, 48))).compile()
    kinds = hlo_stats.instruction_kinds(compiled.as_text())
    found = {kind for kind, _ in kinds.values()}
    assert {"matmul", "collective"} <= found
    (matmul_source,) = {source for kind, source in kinds.values() if kind == "matmul"} - {""}
    assert matmul_source.endswith("dot_general")
    assert all(kind in hlo_stats.OP_KINDS for kind, _ in kinds.values())


def test_a_fused_attention_call_counts_as_attention_and_a_library_gemm_as_matmul():
    hlo = """HloModule jit_step, entry_computation_layout={()->f32[]}

ENTRY %main () -> f32[] {
  %a = bf16[8,128,64]{2,1,0} parameter(0)
  %custom-call.1 = (bf16[8,128,64]{2,1,0}, u8[0]{0}) custom-call(%a, %a, %a), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/attn/dot_product_attention"}
  %custom-call.2 = (bf16[64,64]{1,0}, s8[4]{0}) custom-call(%a, %a), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/mlp/dot_general"}
  %custom-call.3 = bf16[8,128,64]{2,1,0} custom-call(%a), custom_call_target="tpu_custom_call", metadata={op_name="jit(step)/attn/splash_mha_fwd/pallas_call"}
  ROOT %c = f32[] constant(0)
}
"""  # noqa: E501  (HLO text as XLA prints it)
    kinds = hlo_stats.instruction_kinds(hlo)
    assert kinds["custom-call.1"][0] == "attention"
    assert kinds["custom-call.2"] == ("matmul", "jit(step)/mlp/dot_general")
    assert kinds["custom-call.3"][0] == "attention"


def test_an_asynchronous_fusion_has_the_kind_of_what_it_fuses():
    hlo = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_dot (a: bf16[8,16], b: bf16[16,32]) -> bf16[8,32] {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,32]{1,0} parameter(1)
  ROOT %product = bf16[8,32]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/mlp/dot_general"}
}

ENTRY %main () -> f32[] {
  %x = bf16[8,16]{1,0} parameter(0)
  %w = bf16[16,32]{1,0} parameter(1)
  %start = ((bf16[8,16]{1,0}, bf16[16,32]{1,0}), bf16[8,32]{1,0}, u32[]) fusion-start(%x, %w), kind=kCustom, calls=%fused_dot
  %done = bf16[8,32]{1,0} fusion-done(%start)
  ROOT %c = f32[] constant(0)
}
"""  # noqa: E501  (HLO text as XLA prints it)
    assert hlo_stats.instruction_kinds(hlo)["start"] == ("matmul", "jit(step)/mlp/dot_general")


@pytest.mark.parametrize("name, kind", [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "collective"),
    ("loop_multiply_fusion_12", "fusion"),
    ("input_reduce_fusion", "fusion"),
    ("[CUDA memcpy Device-to-Device]", "data movement"),
    ("some_kernel", "other"),
])
def test_gpu_kernels_without_an_instruction_are_sorted_by_name(name, kind):
    assert op_profile.kernel_kind(name) == kind


def event(name, start, duration, hlo_op="", line="ops", device="/device:GPU:0", module="jit_step"):
    return Event(device, line, name, start, duration, hlo_op, module)


def test_a_loop_event_keeps_only_the_time_its_body_ops_do_not_cover():
    loop = event("while.1", 0, 100)
    inner = [event("fusion.1", 10, 30), event("fusion.2", 50, 20)]
    straddling = event("fusion.3", 90, 30)  # ends after the loop: 10 ns inside it
    own = op_profile.self_times([loop, *inner, straddling])
    assert own[loop] == 100 - 30 - 20 - 10
    assert [own[e] for e in inner] == [30, 20] and own[straddling] == 30


def test_busy_time_counts_overlapping_streams_once():
    events = [event("a", 0, 50, line="s1"), event("b", 25, 50, line="s2"),
              event("c", 200, 10, line="s1")]
    assert op_profile.busy_ns(events) == 75 + 10


HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_dot (p: bf16[64,64]) -> bf16[64,64] {
  %p = bf16[64,64]{1,0} parameter(0)
  ROOT %dot.1 = bf16[64,64]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/mlp/dot_general"}
}

ENTRY %main () -> f32[] {
  %a = bf16[64,64]{1,0} parameter(0)
  %gemm_fusion.1 = bf16[64,64]{1,0} fusion(%a), kind=kCustom, calls=%fused_dot
  %all-reduce.1 = bf16[64,64]{1,0} all-reduce(%gemm_fusion.1), replica_groups={}, to_apply=%add
  %copy.1 = bf16[64,64]{0,1} copy(%all-reduce.1)
  ROOT %c = f32[] constant(0)
}
"""  # noqa: E501  (HLO text as XLA prints it)


def test_the_summary_sums_each_kind_per_device_and_step():
    events = []
    for device in ("/device:GPU:0", "/device:GPU:1"):
        for step in range(2):
            t = step * 1000
            events += [event("gemm_kernel_a", t, 300, "gemm_fusion.1", device=device),
                       event("nccl_kernel", t + 300, 100, "all-reduce.1", device=device),
                       event("copy_kernel", t + 400, 50, "copy.1", device=device),
                       # No instruction recorded: sorted by the kernel's name.
                       event("loop_add_fusion_7", t + 450, 50, device=device),
                       # Another program's work in the same trace.
                       event("gemm_kernel_b", t + 600, 999, "gemm_fusion.1", device=device,
                             module="jit_prepare")]
    summary = op_profile.summarize(events, HLO, steps=2, wall_s=2000e-9,
                                   module=op_profile.module_name(HLO))
    assert summary["devices"] == 2
    assert summary["op_s_per_step"] == pytest.approx({
        "matmul": 300e-9, "attention": 0, "fusion": 50e-9, "collective": 100e-9,
        "data movement": 50e-9, "other": 0})
    assert summary["busy_s_per_step"] == pytest.approx(500e-9)
    assert summary["busy_fraction"] == pytest.approx(0.5)
    assert summary["unattributed_fraction"] == pytest.approx(50 / 500)
    top = summary["top_ops"][0]
    assert (top["op"], top["kind"], top["calls_per_step"]) == ("gemm_fusion.1", "matmul", 1)
    assert top["source"] == "jit(step)/mlp/dot_general"
    # 1 GFLOP per step in 300 ns of matmul on a 1e16 FLOP/s device: a third of peak.
    assert op_profile.kernel_flops_fraction(summary, 1e9, 1e16) == pytest.approx(1 / 3)


def test_a_cpu_trace_attributes_the_programs_time_to_its_matmuls_and_fusions(tmp_path):
    fn = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
    a = jnp.ones((256, 256))
    compiled = fn.lower(a, a).compile()
    compiled(a, a).block_until_ready()
    kept = tmp_path / "trace.xplane.pb"
    with op_profile.traced(keep_as=str(kept)) as trace:
        for _ in range(3):
            compiled(a, a).block_until_ready()
    assert kept.stat().st_size > 0
    text = compiled.as_text()
    events = op_profile.device_events(trace[0])
    assert events and {e.hlo_module for e in events} == {op_profile.module_name(text)}
    summary = op_profile.summarize(events, text, steps=3, wall_s=1.0,
                                   module=op_profile.module_name(text))
    assert summary["unattributed_fraction"] == 0
    assert summary["op_s_per_step"]["matmul"] > 0
    assert summary["op_s_per_step"]["matmul"] + summary["op_s_per_step"]["fusion"] > 0.5 * (
        summary["op_s_total_per_step"])


def test_op_line_events_named_by_instruction_and_unknown_module_names_are_attributed():
    """A TPU's op line names events by instruction and may carry no hlo_op stat; a
    profiler whose module names differ from the HLO text's drops nothing."""
    events = [event("gemm_fusion.1", 0, 300, device="/device:TPU:0", module=""),
              event("copy.1", 300, 100, device="/device:TPU:0", module="jit_other")]
    summary = op_profile.summarize(events, HLO, steps=1, wall_s=400e-9, module="jit_step")
    assert summary["op_s_per_step"]["matmul"] == pytest.approx(300e-9)
    assert summary["op_s_per_step"]["data movement"] == 0  # another program's
    assert summary["unattributed_fraction"] == 0
    renamed = [event("copy.1", 300, 100, device="/device:TPU:0", module="jit_step.7")]
    summary = op_profile.summarize(renamed, HLO, steps=1, wall_s=400e-9, module="jit_step")
    assert summary["op_s_per_step"]["data movement"] == pytest.approx(100e-9)
