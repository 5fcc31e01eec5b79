"""What a compiled XLA program moves between devices and which arrays it holds,
read from its optimised HLO text (`compiled.as_text()`).

XLA reports memory (`memory_analysis`) and FLOPs (`cost_analysis`) but no
collective traffic, so this reads the program itself: each collective's result
shape and replica-group size, each computation's call sites, and the trip
counts XLA proves for its while loops, so that a collective in a scanned
layer's body counts once per layer. A well-kept parser of the HLO text exists
only inside XLA (C++); this one reads the few fields needed and is tested
against programs of known traffic (tests/test_hlo_stats.py).
"""

import dataclasses
import functools
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Between TPU slices the compiler sends over the data-centre network by host
# transfers (send, with a megascale transfer type), not by collective ops.
DCN_TRANSFER = "dcn-transfer"
KINDS = (*COLLECTIVES, DCN_TRANSFER)

_ITEM_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
               "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([^\s(]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(ROOT )?%([^\s=]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# A TPU asynchronous collective fusion's later parts (its start has flag_start -1).
_DCN_TRANSFER_TYPE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')
_CONTINUED = re.compile(r'"async_collective_fusion_config":\{"flag_start":"(?!-1")')


def array_shapes(type_text):
    """[(dtype, (dims...)), ...] of an HLO type: one array or a tuple of them."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(type_text) if dtype in _ITEM_BYTES]


def type_bytes(type_text):
    """Bytes of the arrays in an HLO type."""
    return sum(_ITEM_BYTES[dtype] * math.prod(dims) for dtype, dims in array_shapes(type_text))


def group_size(attributes, num_devices):
    """Devices per replica group of a collective, from its `replica_groups`
    (mesh-axes, iota or explicit form); an empty list is one group of all."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\S*?\)(?= \{|,))?"
                     r"(?: \{([^}]*)\})?", attributes)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        axes = sizes if mesh.group(2) is None else re.findall(r"'([^']+)'", mesh.group(2))
        return math.prod(sizes[axis] for axis in axes)
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    if explicit:
        return len(explicit.group(1).split(","))
    return num_devices


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    result_bytes: int  # per device, of one execution
    group_size: int
    executions: int  # per run of the program (loop trip counts multiplied)
    op_name: str  # the JAX operation it came from (HLO metadata)
    dtypes: tuple = ()  # the element type of each array it moves, at the wire width

    @property
    def bytes_moved(self):
        """Bytes each device sends per run, as a bandwidth-optimal (ring)
        algorithm moves them: all-gather (n-1)/n of its result, reduce-scatter
        (n-1) times its result (its input is n times larger), all-reduce a
        reduce-scatter plus an all-gather, all-to-all (n-1)/n, a permute or
        a DCN send its whole buffer."""
        n = self.group_size
        if n <= 1 and self.kind not in ("collective-permute", DCN_TRANSFER):
            return 0
        per_execution = {
            "all-gather": self.result_bytes * (n - 1) / n,
            "reduce-scatter": self.result_bytes * (n - 1),
            "all-reduce": 2 * self.result_bytes * (n - 1) / n,
            "all-to-all": self.result_bytes * (n - 1) / n,
            "collective-permute": self.result_bytes,
            DCN_TRANSFER: self.result_bytes,
        }[self.kind]
        return per_execution * self.executions


@dataclasses.dataclass
class _Instruction:
    is_root: bool
    name: str
    type_text: str
    opcode: str
    attributes: str  # operands, then the attributes

    def operands(self):
        return re.findall(r"%([^\s,)]+)", self.attributes.split(")", 1)[0])


def _computations(hlo_text):
    """{computation name: [instructions]} and the entry computation's name."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(1), [])
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction:
            root, *fields = instruction.groups()
            current.append(_Instruction(bool(root), *fields))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


_PASS_THROUGH = ("copy", "bitcast", "convert")


def _through_copies(name, by_name):
    """The instruction `name` stands for, past copies, bitcasts and conversions."""
    node = by_name.get(name)
    while node is not None and node.opcode in _PASS_THROUGH:
        node = by_name.get(next(iter(node.operands()), None))
    return node


def _scalar_constant(name, by_name):
    """The integer value of a scalar constant `name` (through copies and
    conversions), or None."""
    node = _through_copies(name, by_name)
    if node is None or node.opcode != "constant":
        return None
    value = node.attributes.split(")", 1)[0].strip()
    return int(value) if re.fullmatch(r"-?\d+", value) else None


def _tuple_index(name, by_name):
    """k when `name` is (a copy of) get-tuple-element k of the computation's
    parameter, else None."""
    node = _through_copies(name, by_name)
    if node is None or node.opcode != "get-tuple-element":
        return None
    source = by_name.get(next(iter(node.operands()), None))
    index = re.search(r"index=(\d+)", node.attributes)
    return int(index.group(1)) if source is not None and source.opcode == "parameter" else None


def _counted_trips(loop, computations, caller):
    """Trip count of a while loop XLA left unannotated but that counts
    i = start; i < limit (or <=, !=); i += step, with constant start, limit and
    step, as the TPU compiler's windowed-einsum loops do; None otherwise."""
    names = {key: re.search(key + r"=%([^\s,]+)", loop.attributes) for key in ("condition", "body")}
    if not all(names.values()):
        return None
    condition = {i.name: i for i in computations.get(names["condition"].group(1), ())}
    body = {i.name: i for i in computations.get(names["body"].group(1), ())}
    compare = next((i for i in condition.values() if i.is_root), None)
    direction = compare and re.search(r"direction=([A-Z]+)", compare.attributes)
    if compare is None or compare.opcode != "compare" or not direction:
        return None
    lhs, rhs = compare.operands()[:2]
    direction = direction.group(1)
    if _tuple_index(lhs, condition) is None:  # limit OP i -> i OP' limit
        lhs, rhs = rhs, lhs
        direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    index, limit = _tuple_index(lhs, condition), _scalar_constant(rhs, condition)
    root = next((i for i in body.values() if i.is_root), None)
    operands = caller.get(next(iter(loop.operands()), None))
    if None in (index, limit, root, operands) or root.opcode != "tuple" \
            or operands.opcode != "tuple":
        return None
    start = _scalar_constant(operands.operands()[index], caller)
    update = body.get(root.operands()[index])
    if start is None or update is None or update.opcode != "add":
        return None
    first, second = update.operands()[:2]
    if _tuple_index(first, body) != index:
        first, second = second, first
    step = _scalar_constant(second, body)
    if _tuple_index(first, body) != index or not step or step < 0:
        return None
    if direction == "LT":
        return max(0, -(-(limit - start) // step))
    if direction == "LE":
        return max(0, (limit - start) // step + 1)
    if direction == "NE" and (limit - start) % step == 0 and limit >= start:
        return (limit - start) // step
    return None


def _callees(instruction, computations, caller):
    """[(computation, times it runs per execution of `instruction`, is_branch)];
    `caller` maps names to the instructions of the computation holding it."""
    attributes = instruction.attributes
    if instruction.opcode == "while":
        trip_count = _TRIP_COUNT.search(attributes)
        trips = (int(trip_count.group(1)) if trip_count
                 else _counted_trips(instruction, computations, caller))
        body = re.search(r"body=%([^\s,]+)", attributes).group(1)
        return [(body, 1 if trips is None else trips, False)]
    if instruction.opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", attributes)
        names = (re.findall(r"%([^\s,]+)", branches.group(1)) if branches else
                 re.findall(r"(?:true|false)_computation=%([^\s,]+)", attributes))
        return [(name, 1, True) for name in names]
    return [(name, 1, False) for name in re.findall(r"(?:calls|to_apply)=%([^\s,]+)", attributes)]


_NARROW_FLOATS = ("bf16", "f16", "f8e4m3fn", "f8e5m2", "f8e4m3b11fnuz", "f8e4m3fnuz", "f8e5m2fnuz")


_LAYOUT_OPS = ("bitcast", "reshape", "copy", "transpose")


def _wire_dtype(operand, computations):
    """The float type an operand of a collective holds its values in: XLA:CPU
    has no bfloat16 collectives, so it widens a bfloat16 operand to float32 (a
    fusion whose root converts a narrower float up, then at most changes its
    layout) and moves twice the bytes a GPU or TPU would. None when the operand
    is not such a fusion."""
    if operand is None or operand.opcode != "fusion":
        return None
    called = re.search(r"calls=%([^\s,]+)", operand.attributes)
    body = {i.name: i for i in computations.get(called.group(1), ())} if called else {}
    node = next((i for i in body.values() if i.is_root), None)
    while node is not None and node.opcode in _LAYOUT_OPS:
        node = body.get(next(iter(node.operands()), None))
    if node is None or node.opcode != "convert":
        return None
    source = body.get(next(iter(node.operands()), None))
    narrow = array_shapes(source.type_text)[0][0] if source is not None else None
    return narrow if narrow in _NARROW_FLOATS else None


def _moved_arrays(instruction, kind, by_name, computations):
    """[(wire dtype, dims)] of the arrays one execution of a collective returns,
    each at its operand's wire width."""
    shapes = array_shapes(instruction.type_text)
    operand_names = instruction.operands()
    # An async start's result holds its operands, then its results (and, for a
    # permute, context words): count the results. The GPU compiler combines
    # several arrays' collectives into one start of that many operands.
    if instruction.opcode.endswith("-start") and kind != "all-reduce":
        shapes = shapes[len(operand_names):2 * len(operand_names)]
    operands = [by_name.get(name) for name in operand_names]
    moved = []
    for index, (dtype, dims) in enumerate(shapes):
        wire = _wire_dtype(operands[index], computations) if index < len(operands) else None
        moved.append((wire or dtype, dims))
    return moved


def collectives(hlo_text, num_devices):
    """Every collective of the program with its executions per run: a while
    body's counted trip-count times (a loop XLA cannot bound counts once), and
    of a conditional's branches the one that moves the most. Bytes are counted
    at the width of the values moved (see _wire_dtype).

    Two forms of the TPU compiler's are read as what they do: a fusion of an
    all-reduce and the slice of it each device keeps (a computation named
    all-reduce-scatter) is one reduce-scatter, and an asynchronous collective
    fusion, whose collective reappears in each fusion that continues it
    (async_collective_fusion_config's flag_start set), counts at its start.
    What a multi-slice program sends between slices (DCN_TRANSFER) counts
    each send's buffer; the in-slice part of the same reduction is a
    collective of its own."""
    computations, entry = _computations(hlo_text)

    @functools.lru_cache(maxsize=None)
    def inside(name):
        """(collectives, bytes moved) of one execution of computation `name`."""
        found = []
        by_name = {instruction.name: instruction for instruction in computations.get(name, ())}
        for instruction in by_name.values():
            kind = instruction.opcode.removesuffix("-start")
            if kind in COLLECTIVES and not _CONTINUED.search(instruction.attributes):
                op_name = _OP_NAME.search(instruction.attributes)
                moved = _moved_arrays(instruction, kind, by_name, computations)
                result = sum(_ITEM_BYTES[dtype] * math.prod(dims) for dtype, dims in moved)
                size = group_size(instruction.attributes, num_devices)
                if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                    kind, result = "reduce-scatter", result // size
                found.append(Collective(kind, result, size, 1, op_name.group(1) if op_name else "",
                                        tuple(dtype for dtype, _ in moved)))
            transfer = (_DCN_TRANSFER_TYPE.search(instruction.attributes)
                        if instruction.opcode == "send" else None)
            if transfer:
                sent = array_shapes(instruction.type_text)[:1]  # (buffer, context, token)
                found.append(Collective(
                    DCN_TRANSFER, sum(_ITEM_BYTES[dtype] * math.prod(dims) for dtype, dims in sent),
                    2, 1, f"DCN {transfer.group(1).lower().replace('_', '-')}",
                    tuple(dtype for dtype, _ in sent)))
            branches = []
            for callee, times, is_branch in _callees(instruction, computations, by_name):
                called = [dataclasses.replace(c, executions=c.executions * times)
                          for c in inside(callee)[0]]
                if is_branch:
                    branches.append(called)
                else:
                    found += called
            if branches:
                found += max(branches, key=lambda cs: sum(c.bytes_moved for c in cs))
        return tuple(found), sum(c.bytes_moved for c in found)

    return list(inside(entry)[0])


def bytes_by_kind(found):
    """{kind: bytes each device sends per run} over KINDS (zeros included)."""
    totals = dict.fromkeys(KINDS, 0)
    for collective in found:
        totals[collective.kind] += collective.bytes_moved
    return {kind: int(total) for kind, total in totals.items()}


# A fusion, or the start of one the GPU compiler runs asynchronously (newer XLA
# runs a scanned layer's stacking of its activations so; its fusion-done launches
# nothing).
FUSION_OPS = ("fusion", "fusion-start")

# What an instruction spends device time on, as op_profile reports it.
OP_KINDS = ("matmul", "attention", "fusion", "collective", "data movement", "other")
_MATMUL_OPS = ("dot", "convolution")
_DATA_MOVEMENT_OPS = ("copy", "copy-start", "copy-done", "transpose", "dynamic-slice",
                      "dynamic-update-slice", "slice", "concatenate", "pad", "gather", "scatter",
                      "broadcast", "reverse")
_ATTENTION_TARGETS = ("fmha", "flash", "sdpa", "attention", "splash")
_MATMUL_TARGETS = ("gemm", "matmul", "cublas", "conv")
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _kind(instruction, computations):
    """The OP_KINDS entry of one instruction: matmul (a dot or convolution, fused or
    a library call), attention (a fused attention kernel: cuDNN's, a Pallas
    flash/splash kernel), collective, data movement, any other fusion, other."""
    opcode = instruction.opcode
    if opcode.removesuffix("-start").removesuffix("-done") in COLLECTIVES:
        return "collective"
    if opcode in _MATMUL_OPS:
        return "matmul"
    if opcode == "custom-call":
        target = _CUSTOM_CALL_TARGET.search(instruction.attributes)
        target = target.group(1).lower() if target else ""
        op_name = _OP_NAME.search(instruction.attributes)
        # A Pallas TPU kernel's target is generic; its JAX name says what it computes.
        described = target + " " + (op_name.group(1).lower() if op_name else "")
        if any(word in described for word in _ATTENTION_TARGETS):
            return "attention"
        return "matmul" if any(word in target for word in _MATMUL_TARGETS) else "other"
    if opcode in FUSION_OPS:
        called = re.search(r"calls=%([^\s,]+)", instruction.attributes)
        inner = computations.get(called.group(1), ()) if called else ()
        kinds = {_kind(i, computations) for i in inner if i.opcode not in ("parameter",)}
        for kind in ("attention", "matmul", "collective"):
            if kind in kinds:
                return kind
        return "fusion"
    return "data movement" if opcode in _DATA_MOVEMENT_OPS else "other"


def instruction_kinds(hlo_text):
    """{instruction name: (OP_KINDS entry, the JAX operation it came from)} of every
    instruction of the program, fusion bodies and loop bodies included: what a
    profiler's per-op events (named by instruction) spend their time on."""
    computations, _ = _computations(hlo_text)

    def source(instruction, kind):
        """Its op_name, or a fusion's from the fused op that gives it its kind
        (else its root)."""
        op_name = _OP_NAME.search(instruction.attributes)
        if op_name or instruction.opcode not in FUSION_OPS:
            return op_name.group(1) if op_name else ""
        called = re.search(r"calls=%([^\s,]+)", instruction.attributes)
        inner = computations.get(called.group(1), ()) if called else ()
        chosen = next((i for i in inner if _kind(i, computations) == kind),
                      next((i for i in inner if i.is_root), None))
        return source(chosen, kind) if chosen is not None else ""

    kinds = {}
    for instructions in computations.values():
        for instruction in instructions:
            kind = _kind(instruction, computations)
            kinds[instruction.name] = (kind, source(instruction, kind))
    return kinds


def arrays_with_leading_dim(hlo_text, size, min_rank=1):
    """[(dtype, dims, op_name)] of every array of rank >= min_rank whose first
    dimension is `size`, among the results of all instructions (fusion bodies
    included)."""
    computations, _ = _computations(hlo_text)
    found = []
    for instructions in computations.values():
        for instruction in instructions:
            op_name = _OP_NAME.search(instruction.attributes)
            found += [(dtype, dims, op_name.group(1) if op_name else "")
                      for dtype, dims in array_shapes(instruction.type_text)
                      if len(dims) >= min_rank and dims[0] == size]
    return found
