"""Compiling for GPUs that are not here (clip_jax/gpu_target.py): XLA's GPU
compiler (JAX's CUDA plugin, installed by the gpu extra) builds the train step
for compile-only H100 and H200 devices, with no GPU or driver. Nothing runs;
what is checked is what the GPU compiler makes of the program: cuDNN's fused
attention in a training step, the collectives of FSDP, and the plan's bytes.

As for the TPU compiler (tests/test_tpu_topology.py), the compiling happens in
one spawned process per module, whose functions return plain data: the plugin
loads CUDA's libraries, its profiler's among them, into the process."""

import json
import re
import sys

import pytest

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import capacity, config_files, gpu_target, hlo_stats, roofline
from clip_jax.models import transformer
from tests.test_tpu_topology import _small_bf16_config, plan_command_output, planned_loops

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="JAX's CUDA plugin is Linux's")


def _on_gpu_devices():
    one_host, two_hosts = gpu_target.devices("h100", 8), gpu_target.devices("H200", 16)
    return ([(d.platform, gpu_target.chip_name(d)) for d in one_host],
            sorted(d.process_index for d in two_hosts), gpu_target.chip_name(two_hosts[0]))


def test_devices_are_gpus_of_the_chip_eight_to_a_host(compile_only_process):
    one_host, hosts, chip = compile_only_process(_on_gpu_devices)
    assert one_host == [("gpu", "H100")] * 8
    assert hosts == [0] * 8 + [1] * 8 and chip == "H200"


@pytest.mark.parametrize("chip, count, message", [
    ("a100", 1, "GPU 'a100': expected one of h100, h200"),
    ("h100", 12, "GPU count 12: expected 1 to 8, or whole hosts of 8"),
    ("h100", 0, "GPU count 0: expected 1 to 8, or whole hosts of 8"),
])
def test_a_bad_gpu_target_is_one_line(compile_only_process, chip, count, message):
    with pytest.raises(ValueError) as raised:
        compile_only_process(gpu_target.devices, chip, count)
    assert str(raised.value) == message


def _planned_loops(remat):
    return planned_loops(gpu_target.devices("h100", 1), remat)


def test_the_gpu_plan_unrolls_the_blocks_unless_remat_keeps_nothing(compile_only_process):
    """layer_loop=auto, as a GPU resolves it: unrolled (no loop) without remat
    and under a policy that keeps the matmuls' outputs, a scan per tower
    (forward and backward) under full remat."""
    assert compile_only_process(_planned_loops, "none") == 0
    assert compile_only_process(_planned_loops, "dots_saveable") == 0
    assert compile_only_process(_planned_loops, "full") >= 4


def _kernels(text):
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))


def _token_table_collectives(text, vocab, width):
    """{kind: element types} of the all-gathers and reduce-scatters that move
    the whole [vocab, width] token table (as a result or as an operand; the GPU
    compiler may hold it transposed)."""
    moved = {}
    whole = rf"\b(\w+)\[(?:{vocab},{width}|{width},{vocab})\]"
    for match in re.finditer(r"^\s*%\S+ = (.*?) (all-gather|reduce-scatter)(?:-start)?\(", text,
                             re.MULTILINE):
        for dtype in re.findall(whole, match.group(1)):
            moved.setdefault(match.group(2), set()).add(dtype)
    return moved


def _on_gpu_plan(attention):
    """The test model's bf16 train step (5 image tokens, 8 text tokens), FSDP
    over 4 H100s, with config.model.attention=`attention`: (plan row, kernels,
    the token table's collectives)."""
    config = _small_bf16_config(fsdp=4)
    with config.unlocked():
        config.model.attention = attention
    compiled, training = capacity.compile_train_step(config, gpu_target.devices("h100", 4))
    text = compiled.as_text()
    table = _token_table_collectives(text, config.model.text.vocab_size,
                                     config.model.text.width)
    return capacity.summarize(config, compiled, training), _kernels(text), table


@pytest.mark.parametrize("attention", ["cudnn", "auto"])
def test_cudnn_attention_trains_in_the_h100_step(compile_only_process, attention):
    """cuDNN's fused attention, forward and backward, in the compiled train step
    (the image tower's odd sequence padded, the text tower's not); `auto` takes
    it when the step is compiled for a GPU."""
    row, kernels, _ = compile_only_process(_on_gpu_plan, attention)
    assert "__cudnn$fmhaSoftmax" in kernels and "__cudnn$fmhaSoftmaxBackward" in kernels
    assert row["compiled_for"] == "NVIDIA H100 80GB HBM3" and row["fits"] == {"H100": True}
    # FSDP over 4 GPUs gathers 3/4 of every bfloat16 parameter, the token table's
    # (most of this model) in the forward only, the blocks' again in the
    # backward: over 1.5x the bytes of the float32 shard each GPU holds (every
    # array of the GPU compiler's combined gathers counted).
    assert row["collective_bytes"]["all-gather"] > 1.5 * row["param_bytes"]
    assert row["collective_bytes"]["reduce-scatter"] > 0
    assert 0 < row["temp_bytes"] < row["bytes_per_device"]
    # The roofline reads the GEMMs' and cuDNN's FLOPs from the compiled kernels:
    # the model's count, but for the few FLOPs outside matmuls (the test model's
    # are 2.5%). At width 32 the step is all memory traffic: MFU far below 1%.
    bound = row["roofline"]
    assert bound["kernel_flops"] == pytest.approx(row["model_flops_per_device"], rel=0.05)
    assert bound["seconds_by_kind"]["attention"] > 0
    assert 0 < bound["mfu_at_most"] < 0.01


def test_xla_attention_calls_no_cudnn_kernel(compile_only_process):
    _, kernels, _ = compile_only_process(_on_gpu_plan, "xla")
    assert not any(kernel.startswith("__cudnn$fmha") for kernel in kernels)


def test_the_token_table_moves_in_the_compute_dtype(compile_only_process):
    """Under FSDP the text tower's token table is gathered, and its gradient
    reduce-scattered, in bfloat16 like every other weight of a bf16 step: half
    the bytes of its float32 parameter. (XLA:CPU gathers float32 whatever the
    program says, so this is the GPU compiler's program.)"""
    _, _, table = compile_only_process(_on_gpu_plan, "xla")
    assert table == {"all-gather": {"bf16"}, "reduce-scatter": {"bf16"}}


def _head_projection_kernels():
    """(kind, JAX op) of each kernel of an attention projection's forward pass
    (models.transformer.DenseGeneral onto 4 heads of 16, bfloat16) compiled
    for an H100."""
    devices = gpu_target.devices("h100", 1)
    layer = transformer.DenseGeneral((4, 16), 0.02, ("embed", "heads", "kv"), dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((8, 16, 64), jnp.bfloat16)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    whole = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("data",)), jax.P())
    compiled = jax.jit(layer.apply, in_shardings=whole).lower(params, x).compile(
        compiler_options=gpu_target.compiler_options())
    return [(kernel.kind, kernel.op_name.rsplit("/", 1)[-1])
            for kernel in roofline.kernels(compiled.as_text(), 989e12, 3.35e12)]


def test_a_head_projection_adds_its_bias_inside_the_gemm(compile_only_process):
    """The bias is added to the matmul's flat [M, heads * head_dim] result, which
    the GPU compiler folds into the GEMM (cuBLASLt's bias epilogue); added after
    the reshape to heads it was a pass of its own over the queries, keys and
    values (0.55 ms of ViT-B/16's 32.1 ms H100 roofline bound at 128)."""
    kernels = compile_only_process(_head_projection_kernels)
    assert [kind for kind, _ in kernels].count("matmul") == 1
    assert all(op in ("dot_general", "convert_element_type") for _, op in kernels), kernels


def _batch_minor_activations(batch):
    """How many arrays of ViT-B/32's bf16 train step at `batch` on one H100
    (cuDNN, unrolled blocks, lean backward passes) are laid out [tokens,
    width, batch] for either tower's width: a residual stream transposed
    batch-minor."""
    devices = gpu_target.devices("h100", 1)
    config = config_files.load("ViT-B-32")
    with config.unlocked():
        config.batch_size = batch
        config.model.update(dtype="bfloat16", attention="cudnn", scan_layers=True,
                            layer_loop="unrolled", lean_backward="on")
    compiled, _ = capacity.compile_train_step(config, devices)
    widths = {config.model.image.width, config.model.text.width}
    return sum(1 for tokens, dim, rows in re.findall(
        r"\w+\[(\d+),(\d+),(\d+)\]\{2,1,0\}", compiled.as_text())
        if int(rows) == batch and int(dim) in widths and int(tokens) > 1)


def test_the_residual_streams_stay_batch_major(compile_only_process):
    """Two sums over the batch made the GPU compiler lay a residual stream out
    batch-minor and transpose it around its kernels. The lean LayerNorm sums
    its scale and bias gradients over its rows flattened to one axis (summed
    over the batch and token axes: 1,643 such arrays in this step, 3 ms of
    ViT-B/16's 31.6 ms H100 roofline bound at 128); the text tower's positions
    take their gradient as a matmul (summed: its whole stream, 1.1 ms of 28.6)."""
    assert compile_only_process(_batch_minor_activations, 32) == 0


def test_plan_command_compiles_for_gpus(compile_only_process):
    row = json.loads(compile_only_process(
        plan_command_output, "--config", "tiny", "--gpu", "h200", "--devices", "2", "--mesh",
        "fsdp=2", "--batch-size", "32", "--dtype", "bfloat16", "--json"))
    assert row["compiled_for"] == "NVIDIA H200 141GB HBM3e" and row["devices"] == 2
    assert row["cuda_plugin"] == gpu_target.cuda_plugin_version() is not None
    assert row["fits"] == {"H200": True} and row["bytes_per_device"] > 0


def test_plan_command_bad_gpu_count_is_one_line(compile_only_process):
    with pytest.raises(SystemExit) as raised:
        compile_only_process(plan_command_output, "--config", "tiny", "--gpu", "h100",
                             "--devices", "9")
    assert str(raised.value) == "plan error: GPU count 9: expected 1 to 8, or whole hosts of 8"


@pytest.mark.parametrize("kind, bandwidth", [
    ("NVIDIA H100 80GB HBM3", gpu_target.CHIPS["h100"][2]),  # compile-only, and the SXM board
    ("NVIDIA H200", gpu_target.CHIPS["h200"][2]),  # an attached H200's CUDA name
    ("NVIDIA H200 141GB HBM3e", gpu_target.CHIPS["h200"][2]),
    ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H100 NVL", 3.9e12),
    ("NVIDIA A100-SXM4-80GB", None), ("cpu", None)])
def test_memory_bandwidth_knows_attached_boards_by_their_cuda_names(kind, bandwidth):
    """The device check's roofline on an attached GPU reads its bandwidth by the
    board's CUDA name, which is not the compile-only device's for an H200."""
    class Device:
        device_kind = kind
    assert gpu_target.memory_bandwidth(Device()) == bandwidth


def _gradcache_all_reduces(scan_layers, attention, microbatches):
    """(bytes all-reduced per step, their share reduced once per micro-batch,
    kernels) of the test model's bf16 step on 8 data-parallel H100s."""
    config = _small_bf16_config(data=8)
    with config.unlocked():
        config.microbatches = microbatches
        config.model.scan_layers = scan_layers
        config.model.attention = attention
    compiled, _ = capacity.compile_train_step(config, gpu_target.devices("h100", 8))
    text = compiled.as_text()
    reduced = [c for c in hlo_stats.collectives(text, 8) if c.kind == "all-reduce"]
    total = sum(c.bytes_moved for c in reduced)
    looped = sum(c.bytes_moved for c in reduced
                 if microbatches > 1 and c.executions == microbatches)
    return total, looped / total, _kernels(text)


def _gradcache_fsdp_bytes(weights, microbatches):
    """(bytes sent per step, most executions of one collective) of the test
    model's bf16 step, stacked blocks, on 8 FSDP H100s."""
    config = _small_bf16_config(fsdp=8)
    with config.unlocked():
        config.microbatches = microbatches
        config.gradcache_weights = weights
        config.model.scan_layers = True
    compiled, _ = capacity.compile_train_step(config, gpu_target.devices("h100", 8))
    found = hlo_stats.collectives(compiled.as_text(), 8)
    return sum(c.bytes_moved for c in found), max(c.executions for c in found)


def test_gathered_weights_move_fsdp_bytes_once_per_gradcache_step(compile_only_process):
    """config.gradcache_weights="gathered" gathers the weights once per step and
    reduce-scatters their gradients once: k=4 sends about k=1's bytes, where
    the sharded weights are gathered and reduced in every micro-batch's passes
    (docs/scaling.md)."""
    full_batch, _ = compile_only_process(_gradcache_fsdp_bytes, "sharded", 1)
    sharded, sharded_executions = compile_only_process(_gradcache_fsdp_bytes, "sharded", 4)
    gathered, gathered_executions = compile_only_process(_gradcache_fsdp_bytes, "gathered", 4)
    assert sharded > 3 * full_batch  # here 5.9x
    # Whole float32 weights gathered once: the bytes of k=1's two bfloat16
    # gathers of the matrices, and the token table whole (1.5x here; 1.05x for
    # ViT-B/16, docs/scaling.md).
    assert gathered < 2 * full_batch
    assert sharded_executions >= 4 and gathered_executions == 1


@pytest.mark.parametrize("scan_layers, attention", [(False, "xla"), (True, "cudnn")])
def test_gradcache_reduces_data_parallel_gradients_once_per_step(compile_only_process,
                                                                 scan_layers, attention):
    """Each replica sums its micro-batches' gradients and they are all-reduced
    once, after the loop: left to the partitioner, stacked blocks were
    all-reduced once per micro-batch (docs/scaling.md), 4x k=1's bytes here.
    The reduction carries what k=1's does: matrices in bf16. cuDNN's kernel
    runs per device inside the replicas' loop (its own partitioning fails on a
    partly manual mesh)."""
    full_batch, _, _ = compile_only_process(_gradcache_all_reduces, scan_layers, attention, 1)
    gradcache, per_microbatch, kernels = compile_only_process(
        _gradcache_all_reduces, scan_layers, attention, 4)
    assert per_microbatch < 0.01
    assert gradcache == pytest.approx(full_batch, rel=0.05)
    assert ("__cudnn$fmhaSoftmaxBackward" in kernels) == (attention == "cudnn")
