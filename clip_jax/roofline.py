"""A lower bound on a compiled step's time on a GPU, read from its optimised
HLO (`compiled.as_text()`) before the GPU is lent, and so an upper bound on
its MFU.

Every kernel the program launches (a fusion, a cuBLAS GEMM, a cuDNN
attention, a copy; each loop body's kernels once per trip) takes at least the
longer of its FLOPs at the chip's peak and its bytes (operands read, results
written) at the chip's memory bandwidth: the roofline. Summed over kernels,
that bounds the step's time below, assuming nothing overlaps and every kernel
runs at its roof. The bound says which kernels a step cannot make faster than
what, and whether an MFU goal is reachable by the program as compiled; the
gap between it and a measured step is then the kernels' own efficiency,
launch gaps and collectives (the device check's profile splits that).

What a kernel touches is read as XLA's GPU cost model reads it, simplified: a
fusion parameter used only through (dynamic) slices is read as those slices,
and a fusion that updates a slice of a buffer in place (a scanned layer
writing its activations into the stack) writes that slice, not the buffer,
also where it reaches the buffer through a bitcast (a free change of layout).
Collectives are left out (clip_jax/hlo_stats.py counts them); so is the GEMM
workspace. XLA keeps no cost analysis for a program compiled without a GPU,
so this reads the HLO itself, with the parser of hlo_stats.

The TPU compiler writes its own cost model's figure into each kernel it
emits (`estimated_cycles` in the kernel's backend config): `estimated_cycles`
sums them the same way, each loop body's once per trip. That is an estimate
of the step, not a bound: the compiler's model of its own kernels (MXU,
vector unit and memory together), which a TPU's profile can check. A roofline
like the GPU's does not fit a TPU program: its kernels stage operands in the
chip's on-core memory (VMEM) by asynchronous copies the HLO shows as
separate instructions, so operand bytes are not HBM traffic.
"""

import dataclasses
import math
import re

from clip_jax import hlo_stats

# Instructions that launch no kernel: data-flow bookkeeping, control flow (its
# computations are walked instead) and collectives (hlo_stats counts them).
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
              "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
              "add-dependency", "domain", "send", "send-done", "recv", "recv-done",
              "copy-start", "copy-done", "async-start", "async-update", "async-done",
              "fusion-done"}
_SLICES = ("dynamic-slice", "slice")
_CUDNN_ATTENTION = re.compile(r'custom_call_target="__cudnn\$fmha[^"]*"')
_GEMM = re.compile(r'custom_call_target="__cublas\$[^"]*"')
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]*)"')
# A Pallas kernel compiled by Mosaic, for which the TPU compiler gives no estimate.
_MOSAIC = "tpu_custom_call"
_ESTIMATED_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_CONTRACTING = re.compile(r'lhs_contracting_dim(?:ension)?s"?[=:]\s*[{\[]([^}\]]*)[}\]]')
KINDS = ("matmul", "attention", "other")


@dataclasses.dataclass(frozen=True)
class Kernel:
    kind: str  # one of KINDS
    flops: float  # of one execution
    bytes: float  # read and written by one execution
    executions: int  # per run of the program
    op_name: str
    estimated_cycles: int | None = None  # of one execution, the TPU compiler's estimate
    custom_call: str = ""  # a custom call's target


def _array_bytes(shapes):
    return sum(hlo_stats._ITEM_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes)


def _dot_flops(instruction, by_name):
    """2 x result elements x contracted size of a dot (or GEMM custom call)."""
    lhs = by_name.get(next(iter(instruction.operands()), None))
    contracting = _CONTRACTING.search(instruction.attributes)
    if lhs is None or contracting is None:
        return 0.0
    lhs_dims = hlo_stats.array_shapes(lhs.type_text)[0][1]
    contracted = math.prod(lhs_dims[int(d.strip(' "'))]
                           for d in contracting.group(1).split(",") if d.strip(' "'))
    result_dims = hlo_stats.array_shapes(instruction.type_text)[0][1]
    return 2.0 * math.prod(result_dims) * contracted


def _window(attributes):
    """{size, stride, pad, lhs_dilate, rhs_dilate}: per spatial dimension, of a
    convolution's window attribute (XLA's defaults where one is not written)."""
    text = re.search(r"window=\{([^}]*)\}", attributes)
    fields = dict(part.split("=") for part in text.group(1).split()) if text else {}
    sizes = [int(n) for n in fields.get("size", "").split("x") if n]
    spatial = len(sizes)

    def numbers(key, default):
        return [int(n) for n in fields[key].split("x")] if key in fields else [default] * spatial

    pads = ([tuple(int(n) for n in pair.split("_")) for pair in fields["pad"].split("x")]
            if "pad" in fields else [(0, 0)] * spatial)
    return {"size": sizes, "stride": numbers("stride", 1), "pad": pads,
            "lhs_dilate": numbers("lhs_dilate", 1), "rhs_dilate": numbers("rhs_dilate", 1)}


def _taps_on_input(inputs, outputs, size, stride, pad, lhs_dilate, rhs_dilate):
    """Mean over one spatial dimension's output positions of the window taps
    that land on an input element (not on padding or a dilation's hole)."""
    last = (inputs - 1) * lhs_dilate
    taps = sum(1 for out in range(outputs) for tap in range(size)
               if 0 <= (at := out * stride + tap * rhs_dilate - pad[0]) <= last
               and at % lhs_dilate == 0)
    return taps / max(outputs, 1)


def _convolution_flops(instruction, by_name):
    """2 x result elements x the multiply-adds of each: the kernel's input
    features times the window taps that land on input. The TPU compiler writes
    a step's matmuls as convolutions: plain ones with 1-wide windows, batched
    ones (attention's) with the batch dimensions as windows dilated so that
    one tap in each lands on input."""
    lhs, kernel = (by_name.get(name) for name in (instruction.operands() + [None, None])[:2])
    labels = re.search(r"dim_labels=([^_]*)_([^-]*)->(\S*?)[,\s]", instruction.attributes + " ")
    if lhs is None or kernel is None or labels is None:
        return 0.0
    lhs_labels, kernel_labels, result_labels = labels.groups()
    lhs_dims = hlo_stats.array_shapes(lhs.type_text)[0][1]
    kernel_dims = hlo_stats.array_shapes(kernel.type_text)[0][1]
    result_dims = hlo_stats.array_shapes(instruction.type_text)[0][1]
    window = _window(instruction.attributes)
    per_result = kernel_dims[kernel_labels.index("i")]
    for d, size in enumerate(window["size"]):
        per_result *= _taps_on_input(
            lhs_dims[lhs_labels.index(str(d))], result_dims[result_labels.index(str(d))], size,
            window["stride"][d], window["pad"][d], window["lhs_dilate"][d],
            window["rhs_dilate"][d])
    return 2.0 * math.prod(result_dims) * per_result


def _matmul_flops(instruction, by_name):
    """FLOPs of a dot or convolution instruction; 0 for any other."""
    if instruction.opcode == "dot":
        return _dot_flops(instruction, by_name)
    if instruction.opcode == "convolution":
        return _convolution_flops(instruction, by_name)
    return 0.0


def _attention_flops(instruction, by_name):
    """cuDNN attention of [B, T, N, H] queries over [B, S, N, H] keys: 2 B N T S H
    per matmul, two forward (scores, weighted values), five backward (the scores
    recomputed, and the gradients of the weights, values, queries and keys)."""
    query, key = (by_name.get(name) for name in instruction.operands()[:2])
    if query is None or key is None:
        return 0.0
    batch, tokens, heads, head_dim = hlo_stats.array_shapes(query.type_text)[0][1]
    sources = hlo_stats.array_shapes(key.type_text)[0][1][1]
    matmuls = 5 if "Backward" in instruction.attributes else 2
    return matmuls * 2.0 * batch * heads * tokens * sources * head_dim


def _fusion_flops(name, computations):
    """FLOPs of the dots and convolutions inside a fused computation (nested
    ones included)."""
    body = {i.name: i for i in computations.get(name, ())}
    total = 0.0
    for instruction in body.values():
        total += _matmul_flops(instruction, body)
        for called in re.findall(r"calls=%([^\s,]+)", instruction.attributes):
            total += _fusion_flops(called, computations)
    return total


def _result_shapes(instruction, by_name):
    """[(dtype, dims)] of what a fusion writes. An asynchronous start's type holds
    its operands, then its results, then a context word: the results."""
    shapes = hlo_stats.array_shapes(instruction.type_text)
    if instruction.opcode != "fusion-start":
        return shapes
    operand_shapes = sum(len(hlo_stats.array_shapes(by_name[name].type_text))
                         for name in instruction.operands() if name in by_name)
    return shapes[operand_shapes:-1]


def _past_bitcasts(name, body):
    """The instruction `name` stands for in a fused computation, past bitcasts."""
    node = body.get(name)
    while node is not None and node.opcode == "bitcast":
        node = body.get(next(iter(node.operands()), None))
    return node


def _uses_past_bitcasts(name, users):
    """[(operand name, user)] of `name`, a bitcast's users standing for the bitcast's."""
    found = []
    for user in users.get(name, []):
        if user.opcode == "bitcast":
            found.extend(_uses_past_bitcasts(user.name, users))
        else:
            found.append((name, user))
    return found


def _fusion_bytes(instruction, by_name, computations):
    """Bytes a fusion reads and writes: each operand whole unless the fused
    computation only slices it, and its result, less a buffer it updates in
    place (only the update is written)."""
    called = re.search(r"calls=%([^\s,]+)", instruction.attributes)
    body = {i.name: i for i in computations.get(called.group(1), ())} if called else {}
    parameters = {int(re.match(r"\s*(\d+)", i.attributes).group(1)): i
                  for i in body.values() if i.opcode == "parameter"}
    users = {}
    for inner in body.values():
        for operand in inner.operands():
            users.setdefault(operand, []).append(inner)
    # Buffers (fusion parameters, seen through bitcasts: a layout change of the
    # stack) updated in place -> the update written into each.
    in_place = {}
    for inner in body.values():
        buffer = _past_bitcasts(next(iter(inner.operands()), None), body)
        if inner.opcode == "dynamic-update-slice" and buffer and buffer.opcode == "parameter":
            in_place[buffer.name] = body.get(inner.operands()[1])
    moved = _array_bytes(_result_shapes(instruction, by_name))
    for buffer, update in in_place.items():
        moved -= _array_bytes(hlo_stats.array_shapes(body[buffer].type_text))
        moved += _array_bytes(hlo_stats.array_shapes(update.type_text)) if update else 0
    moved = max(moved, 0)
    for index, operand in enumerate(instruction.operands()):
        source, parameter = by_name.get(operand), parameters.get(index)
        if source is None or (parameter is not None and parameter.name in in_place):
            continue  # a buffer written in place: its update counted above
        uses = _uses_past_bitcasts(parameter.name, users) if parameter is not None else []
        if uses and all(use.opcode in _SLICES and sliced == use.operands()[0]
                        for sliced, use in uses):
            moved += sum(_array_bytes(hlo_stats.array_shapes(use.type_text)) for _, use in uses)
        else:
            moved += _array_bytes(hlo_stats.array_shapes(source.type_text))
    return moved


def _kernel(instruction, by_name, computations, executions):
    op_name = hlo_stats._OP_NAME.search(instruction.attributes)
    op_name = op_name.group(1) if op_name else ""
    cycles = _ESTIMATED_CYCLES.search(instruction.attributes)
    target = _CUSTOM_CALL_TARGET.search(instruction.attributes)
    return dataclasses.replace(_kernel_cost(instruction, by_name, computations, executions,
                                            op_name),
                               estimated_cycles=int(cycles.group(1)) if cycles else None,
                               custom_call=target.group(1) if target else "")


def _kernel_cost(instruction, by_name, computations, executions, op_name):
    operands_bytes = sum(_array_bytes(hlo_stats.array_shapes(by_name[name].type_text))
                         for name in instruction.operands() if name in by_name)
    if instruction.opcode == "custom-call":
        result = hlo_stats.array_shapes(instruction.type_text)
        if _GEMM.search(instruction.attributes):  # its result, then its workspace
            return Kernel("matmul", _dot_flops(instruction, by_name),
                          operands_bytes + _array_bytes(result[:1]), executions, op_name)
        if _CUDNN_ATTENTION.search(instruction.attributes):
            written = [shape for shape in result if shape[0] != "u8"]  # not the workspace
            return Kernel("attention", _attention_flops(instruction, by_name),
                          operands_bytes + _array_bytes(written), executions, op_name)
    if instruction.opcode in hlo_stats.FUSION_OPS:
        called = re.search(r"calls=%([^\s,]+)", instruction.attributes)
        flops = _fusion_flops(called.group(1), computations) if called else 0.0
        return Kernel("matmul" if flops else "other", flops,
                      _fusion_bytes(instruction, by_name, computations), executions, op_name)
    flops = _matmul_flops(instruction, by_name)
    written = _array_bytes(hlo_stats.array_shapes(instruction.type_text))
    return Kernel("matmul" if flops else "other", flops, operands_bytes + written, executions,
                  op_name)


def _seconds(kernels_found, peak_flops, bandwidth):
    return sum(max(kernel.flops / peak_flops, kernel.bytes / bandwidth) * kernel.executions
               for kernel in kernels_found)


def kernels(hlo_text, peak_flops, bandwidth):
    """Every kernel launch of the program, with its executions per run: a while
    body's counted trips (as hlo_stats counts them), and of a conditional's
    branches the slowest at the roofline (a train step's guard applies its
    update, the heavier branch, on every good step)."""
    return _launches(hlo_text, lambda branch: _seconds(branch, peak_flops, bandwidth))


def _launches(hlo_text, branch_cost):
    """kernels' list, taking of each conditional the branch of highest branch_cost."""
    computations, entry = hlo_stats._computations(hlo_text)

    def walk(name, executions):
        found = []
        body = computations.get(name, ())
        by_name = {instruction.name: instruction for instruction in body}
        for instruction in body:
            kind = instruction.opcode.removesuffix("-start").removesuffix("-done")
            if instruction.opcode in ("while", "conditional", "call"):
                called = [walk(callee, executions * times) for callee, times, _
                          in hlo_stats._callees(instruction, computations, by_name)]
                if instruction.opcode == "conditional":
                    called = [max(called, default=[], key=branch_cost)]
                found.extend(kernel for branch in called for kernel in branch)
            elif instruction.opcode not in _NO_KERNEL and kind not in hlo_stats.COLLECTIVES:
                found.append(_kernel(instruction, by_name, computations, executions))
        return found

    return walk(entry, 1)


def _cycles(kernels_found):
    return sum((kernel.estimated_cycles or 0) * kernel.executions for kernel in kernels_found)


def estimated_cycles(hlo_text):
    """{cycles, by_kind: {kind: cycles}, mosaic_kernels}: the TPU compiler's
    estimate of one run of the program, its kernels' estimated cycles times
    their executions (of a conditional, the costlier branch), and the executions
    of Pallas (Mosaic) kernels, which it does not estimate and the cycles leave
    out; zeros for a program without estimates (XLA's GPU and CPU compilers
    write none)."""
    by_kind = dict.fromkeys(KINDS, 0)
    mosaic_kernels = 0
    for kernel in _launches(hlo_text, _cycles):
        by_kind[kernel.kind] += (kernel.estimated_cycles or 0) * kernel.executions
        if kernel.custom_call == _MOSAIC and kernel.estimated_cycles is None:
            mosaic_kernels += kernel.executions
    return {"cycles": sum(by_kind.values()), "by_kind": by_kind,
            "mosaic_kernels": mosaic_kernels}


def step_bound(hlo_text, peak_flops, bandwidth):
    """{seconds, by_kind: {kind: seconds}, flops, bytes}: the roofline lower
    bound on one run of the program, per kind of kernel."""
    by_kind = dict.fromkeys(KINDS, 0.0)
    flops = moved = 0.0
    for kernel in kernels(hlo_text, peak_flops, bandwidth):
        seconds = max(kernel.flops / peak_flops, kernel.bytes / bandwidth)
        by_kind[kernel.kind] += seconds * kernel.executions
        flops += kernel.flops * kernel.executions
        moved += kernel.bytes * kernel.executions
    return {"seconds": sum(by_kind.values()), "by_kind": by_kind, "flops": flops,
            "bytes": moved}

