"""Compiling for TPU slices that are not here (clip_jax/tpu_topology.py): the
TPU compiler (libtpu, installed by the tpu extra) builds the train step for
compile-only v5e devices, one slice or two over DCN. Nothing runs; what is
checked is what the chips' own compiler makes of the program: the real splash
kernel, multi-slice placement, and the plan's bytes.

The compiling happens in one spawned process per module (conftest's
`compile_only_process`: loading libtpu brings its profiler into the process).
Each `_on_tpu_*` function runs there and returns plain data."""

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import (benchmark, capacity, flops, hlo_stats, optim, roofline, sharding,
                      tpu_topology, train_step)
from clip_jax.models import lean_ops
from clip_jax.models.splash import splash_attention
from clip_jax.models.transformer import split_layers
from tests.conftest import small_config
from tests.trainer_process import REPO

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="libtpu ships for Linux only")

SLICE = "v5e:2x2"  # one host's 4 chips


def _on_tpu_devices():
    one, two = tpu_topology.devices(SLICE), tpu_topology.devices(SLICE, slices=2)
    return ([(d.platform, tpu_topology.chip_name(d)) for d in one],
            [d.slice_index for d in two])


def test_topology_devices_are_tpu_chips_with_slice_indices(compile_only_process):
    one_slice, slice_indices = compile_only_process(_on_tpu_devices)
    assert one_slice == [("tpu", "TPU v5e")] * 4
    assert sorted(slice_indices) == [0] * 4 + [1] * 4


@pytest.mark.parametrize("name, slices, message", [
    ("v5e-8", 1, "TPU topology 'v5e-8' (e.g. v5e:4x4, v5p:2x2x2 or v6e:2x2): "),
    (SLICE, 0, "TPU slices: expected at least 1, got 0"),
])
def test_a_bad_topology_is_one_line(compile_only_process, name, slices, message):
    with pytest.raises(ValueError) as raised:
        compile_only_process(tpu_topology.devices, name, slices)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def _on_tpu_two_slice_mesh():
    devices = tpu_topology.devices(SLICE, slices=2)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(dcn_data=2, fsdp=4)), devices)
    placed = [sorted({d.slice_index for d in mesh.devices[index].ravel()}) for index in range(2)]
    try:
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)), devices)
    except ValueError as error:
        return placed, str(error)
    return placed, None


def test_a_two_slice_mesh_puts_each_slice_on_the_inner_axes(compile_only_process):
    """dcn_data runs across the slices; fsdp within one slice's chips (ICI)."""
    placed, refusal = compile_only_process(_on_tpu_two_slice_mesh)
    assert placed == [[0], [1]]
    assert "set config.mesh.dcn_data=2" in refusal


def _on_tpu_splash(tokens, causal):
    device = tpu_topology.devices(SLICE)[:1]
    abstract = jax.ShapeDtypeStruct((2, tokens, 12, 64), jnp.bfloat16,
                                    sharding=NamedSharding(jax.sharding.Mesh(device, "x"), P()))
    loss = lambda q, k, v: splash_attention(q, k, v, causal=causal).astype(jnp.float32).sum()  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(abstract, abstract, abstract) \
        .compile().as_text()


@pytest.mark.parametrize("tokens, causal", [(197, False), (77, True)])
def test_splash_lowers_to_the_mosaic_kernel_for_tpu(compile_only_process, tokens, causal):
    """Traced on the CPU host, lowered for a TPU: the kernel itself (a Mosaic
    custom call), forward and backward, not the interpreter the CPU runs."""
    text = compile_only_process(_on_tpu_splash, tokens, causal)
    assert text.count('custom_call_target="tpu_custom_call"') >= 2, "forward and backward"
    assert "splash" in text


def _on_tpu_estimates():
    """The TPU compiler's estimates of one large matmul, of a loop of 5 and 10
    matmuls, and the FLOPs read from attention's batched matmul."""
    device = tpu_topology.devices(SLICE)[0]
    placed = jax.sharding.SingleDeviceSharding(device)

    def compiled(function, *shapes):
        abstract = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=placed) for shape in shapes]
        return jax.jit(function).lower(*abstract).compile().as_text()

    def matmuls(trips):
        return lambda x, w: jax.lax.fori_loop(0, trips, lambda _, y: y @ w, x)

    large = compiled(lambda a, b: a @ b, (4096, 4096), (4096, 4096))
    seconds = roofline.estimated_cycles(large)["cycles"] / tpu_topology.clock_hz(device)
    at_peak = 2 * 4096**3 / flops.peak_flops_per_device(device.device_kind)
    loops = [roofline.estimated_cycles(compiled(matmuls(trips), (1024, 1024), (1024, 1024)))
             for trips in (5, 10)]
    attention = compiled(lambda p, v: jnp.einsum("bnts,bsnh->btnh", p, v),
                         (8, 12, 197, 197), (8, 197, 12, 64))
    return (seconds / at_peak, [loop["by_kind"]["matmul"] for loop in loops],
            roofline.step_bound(attention, 1e15, 1e12)["flops"])


def test_the_tpu_compilers_estimates_are_summed_per_trip_at_the_chips_clock(compile_only_process):
    """A 4096^3 matmul is estimated at no less than the chip's peak allows (else
    the clock would be wrong) and near it; a loop's matmuls count once per trip;
    a batched matmul, which the TPU compiler writes as a convolution with dilated
    windows, counts 2 B N T S H FLOPs."""
    large_vs_peak, loop_matmul_cycles, attention_flops = compile_only_process(_on_tpu_estimates)
    assert 1.0 <= large_vs_peak < 1.5
    assert loop_matmul_cycles[1] == 2 * loop_matmul_cycles[0] > 0
    assert attention_flops == 2 * 8 * 12 * 197 * 197 * 64


def _on_tpu_mlp_matmul_cycles(rows=2048, width=768, hidden=3072):
    """The TPU compiler's estimated matmul cycles of a ViT-B MLP's parameter
    gradients in bfloat16, with no activation and with the towers' GELU as
    accelerators differentiate it (autodiff's backward pass)."""
    device = tpu_topology.devices(SLICE)[0]
    placed = jax.sharding.SingleDeviceSharding(device)

    def matmul_cycles(activation):
        def loss(params, x):
            w1, w2 = (w.astype(x.dtype) for w in params)
            return jnp.sum(jnp.square((activation(x @ w1) @ w2).astype(jnp.float32)))
        params = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=placed)
                  for shape in ((width, hidden), (hidden, width))]
        x = jax.ShapeDtypeStruct((rows, width), jnp.bfloat16, sharding=placed)
        hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
        return roofline.estimated_cycles(hlo)["by_kind"]["matmul"]

    with lean_ops.lean_backward("off"):
        return matmul_cycles(lambda h: h), matmul_cycles(lean_ops.gelu)


def test_the_gelu_costs_the_tpus_mlp_matmuls_nothing(compile_only_process):
    """The TPU compiler fuses the GELU into the matmul that makes its input and
    its derivative into the one that takes its gradient; the erf form the
    towers use adds no cycles there (jax.nn.gelu's erfc form adds 7%)."""
    plain, with_gelu = compile_only_process(_on_tpu_mlp_matmul_cycles)
    assert plain > 0
    assert with_gelu <= 1.02 * plain


def _on_tpu_update_fusions(layers=12, width=256, hidden=1024, rows=512):
    """How many kernels the TPU compiler writes a stacked [layers, width,
    hidden] parameter's AdamW update into, in the train step (its non-finite
    guard included) of a stack run one layer at a time, the layers taken by
    split_layers and by plain slices."""
    device = tpu_topology.devices(SLICE)[0]
    placed = jax.sharding.SingleDeviceSharding(device)
    opt_config = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=1, b1=0.9, b2=0.98,
                                                 eps=1e-6, weight_decay=0.1, grad_clip_norm=0.0))
    optimizer = optim.make_optimizer(opt_config, total_steps=10)
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placed), tree)

    def update_kernels(layer_kernels):
        def loss(params, x):
            for kernel in layer_kernels(params["stack"]):
                x = jnp.tanh(x @ kernel.astype(x.dtype))[:, :width]
            return jnp.sum(x.astype(jnp.float32))

        def compute_grads(state, batch):
            value, grads = jax.value_and_grad(loss)(state.params, batch)
            return grads, {"loss": value}, {}

        params = {"stack": jax.ShapeDtypeStruct((layers, width, hidden), jnp.float32)}
        state = train_step.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
            opt_state=jax.eval_shape(optimizer.init, params), model_state={},
            skipped_steps=jax.ShapeDtypeStruct((), jnp.int32),
            bad_steps_in_a_row=jax.ShapeDtypeStruct((), jnp.int32))
        step = train_step.make_train_step(compute_grads, optimizer, lambda count: opt_config.lr)
        x = jax.ShapeDtypeStruct((rows, width), jnp.bfloat16)
        hlo = jax.jit(step, donate_argnums=0).lower(abstract(state), abstract(x)).compile().as_text()
        stacked = f"f32[{layers},{width},{hidden}]"
        return sum(1 for line in hlo.splitlines() if line.startswith("  %")
                   and " fusion(" in line and stacked in line.split(" fusion(")[0])

    return (update_kernels(lambda stack: [group[0] for group in
                                          split_layers(stack, (1,) * layers)]),
            update_kernels(lambda stack: [stack[i] for i in range(layers)]))


def test_the_stacks_adamw_update_is_one_tpu_kernel(compile_only_process):
    """With the layers' gradients concatenated (split_layers), the TPU compiler
    updates the parameter and both moments in one kernel; summed from the
    slices' zero-padded gradients, as autodiff transposes slicing, it
    recomputes the sum in three."""
    concatenated, summed = compile_only_process(_on_tpu_update_fusions)
    assert concatenated == 1
    assert summed > 1


def _small_bf16_config(**mesh):
    config = small_config()
    with config.unlocked():
        config.batch_size = 64
        config.model.dtype = "bfloat16"
        config.mesh.update({**dict(data=1, fsdp=1, tensor=1), **mesh})
    return config


def planned_loops(devices, remat):
    """How many while loops the planner's lowered train step of the test model
    (two-block towers, stacked, layer_loop auto) runs on `devices` under `remat`."""
    config = _small_bf16_config()
    with config.unlocked():
        config.model.update(scan_layers=True, remat=remat)
    step, state, batch, _ = capacity.abstract_train_step(config, devices)
    return step.lower(state, batch).as_text().count("stablehlo.while")


def _planned_tpu_loops(remat):
    return planned_loops(tpu_topology.devices(SLICE)[:1], remat)


def test_the_tpu_plan_unrolls_the_blocks_unless_remat_keeps_nothing(compile_only_process):
    """layer_loop=auto, as a TPU resolves it: unrolled without remat (no loop),
    a scan per tower (forward and backward) under full remat; simulated CPU
    devices plan the scan either way."""
    assert compile_only_process(_planned_tpu_loops, "none") == 0
    assert compile_only_process(_planned_tpu_loops, "full") >= 4
    assert planned_loops(jax.devices()[:1], "none") >= 4


def _on_tpu_slice_plan():
    """The test model's bf16 train step with splash attention, FSDP over one slice."""
    config = _small_bf16_config(fsdp=4)
    with config.unlocked():
        config.model.attention = "splash"
    compiled, training = capacity.compile_train_step(config, tpu_topology.devices(SLICE))
    return capacity.summarize(config, compiled, training), compiled.as_text()


def test_the_tpu_plan_is_the_chips_own_program(compile_only_process):
    row, text = compile_only_process(_on_tpu_slice_plan)
    assert row["compiled_for"] == "TPU v5 lite" and row["fits"] == {"TPU v5e": True}
    assert "tpu_custom_call" in text  # splash's kernel, per device inside shard_map
    assert row["collective_bytes"]["all-gather"] > 0
    # FSDP as the TPU compiler decomposes it stays within 1.5x of ideal FSDP's bytes.
    assert 0 < row["collective_bytes_total"] <= 1.5 * row["ideal_collective_bytes"]
    assert 0 < row["temp_bytes"] < row["bytes_per_device"]
    # The compiler's estimate of the step, less splash's kernels (Mosaic's).
    estimate = row["tpu_estimate"]
    assert estimate["cycles"] == sum(estimate["cycles_by_kind"].values()) > 0
    assert estimate["mosaic_kernels"] > 0 and 0 < estimate["mfu"] < 1
    assert estimate["step_seconds"] == estimate["cycles"] / tpu_topology.CLOCK_HZ["TPU v5e"]


def _on_tpu_two_slice_collectives(microbatches=1):
    config = _small_bf16_config(dcn_data=2, fsdp=4)
    with config.unlocked():
        config.microbatches = microbatches
    compiled, _ = capacity.compile_train_step(config, tpu_topology.devices(SLICE, slices=2))
    return hlo_stats.collectives(compiled.as_text(), 8)


def test_two_slices_reduce_gradients_over_dcn_and_gather_within_a_slice(compile_only_process):
    """dcn_data=2 x fsdp=4: parameters are gathered among a slice's 4 chips only;
    between slices go sends over DCN, most of them the gradients' all-reduce."""
    found = compile_only_process(_on_tpu_two_slice_collectives)
    gathers = {c.group_size for c in found if c.kind == "all-gather" and c.bytes_moved}
    assert gathers == {4}
    over_dcn = [c for c in found if c.kind == hlo_stats.DCN_TRANSFER]
    reduced = sum(c.bytes_moved for c in over_dcn if c.op_name == "DCN all-reduce")
    assert reduced > 0.9 * sum(c.bytes_moved for c in over_dcn)


def test_gradcache_on_two_slices_crosses_dcn_once_per_step(compile_only_process):
    """4 micro-batches: each slice sums its gradients before the one reduction
    between slices, no more DCN bytes than k=1 (once per micro-batch was 3.4x
    for ViT-B/16, docs/scaling.md). (Compiling it at all needs the
    token table's barrier: the compiler's loop all-reduce code motion aborted
    on FSDP's reduce-scatter of the bf16 table gradient in the micro-batch loop.)"""
    def over_dcn(found):
        return sum(c.bytes_moved for c in found if c.kind == hlo_stats.DCN_TRANSFER)
    one = over_dcn(compile_only_process(_on_tpu_two_slice_collectives, 1))
    four = over_dcn(compile_only_process(_on_tpu_two_slice_collectives, 4))
    assert 0 < four <= 1.1 * one


def plan_command_output(*argv):
    """What `benchmark plan ARGV` prints (run in the compiling process)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        benchmark.main(["plan", *argv])
    return printed.getvalue()


def test_plan_command_compiles_for_a_tpu_topology(compile_only_process):
    row = json.loads(compile_only_process(
        plan_command_output, "--config", "tiny", "--tpu", SLICE, "--mesh", "fsdp=4",
        "--batch-size", "32", "--dtype", "bfloat16", "--json"))
    assert row["compiled_for"] == "TPU v5 lite" and row["devices"] == 4
    assert row["libtpu"] == tpu_topology.libtpu_version() is not None
    assert row["fits"] == {"TPU v5e": True} and row["bytes_per_device"] > 0
    printed = compile_only_process(
        plan_command_output, "--config", "tiny", "--tpu", SLICE, "--mesh", "fsdp=4",
        "--batch-size", "32", "--dtype", "bfloat16")
    estimate = next(line for line in printed.splitlines() if "TPU estimate" in line)
    assert " M cycles = " in estimate and "MFU" in estimate and "not a measurement" in estimate


def test_plan_command_bad_topology_is_one_line(compile_only_process):
    with pytest.raises(SystemExit) as raised:
        compile_only_process(plan_command_output, "--config", "tiny", "--tpu", "v9z:2x2")
    assert str(raised.value).startswith("plan error: TPU topology 'v9z:2x2'")
    assert "\n" not in str(raised.value)


def _on_tpu_oversized_step():
    """A 16,384-wide text tower (a 3 GiB token table, and Adam's state) on one
    16 GiB v5e chip."""
    config = _small_bf16_config()
    with config.unlocked():
        config.batch_size = 8
        config.model.text.update(width=16384, heads=2, layers=1)
    capacity.compile_train_step(config, tpu_topology.devices(SLICE)[:1])


def test_a_step_the_chip_cannot_hold_is_the_compilers_one_line_answer(compile_only_process):
    with pytest.raises(capacity.DoesNotFit) as raised:
        compile_only_process(_on_tpu_oversized_step)
    message = str(raised.value)
    assert message.startswith("TPU v5 lite: ") and "exceeds available HBM" in message
    assert "\n" not in message


def test_compile_matrix_reports_each_case_and_the_count():
    """tools/compile_matrix.py compiles each case in its own process and says
    how many compiled (its first case here: softmax, data=4, XLA's attention)."""
    child = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compile_matrix.py"),
                            "--tpu", SLICE, "--limit", "1"],
                           cwd=REPO, capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stdout + child.stderr[-2000:]
    lines = child.stdout.splitlines()
    assert lines[0].startswith("ok   softmax    data=4") and lines[-1] == "1 of 1 compiled"
